"""The local Airflow stack of docs/AIRFLOW.md: start it, stop all of it.

    python -m pipelines.orchestration.airflow_local up   [--home out/airflow] [--data out/data] [--wait 300] [--expose]
    python -m pipelines.orchestration.airflow_local down [--home out/airflow]
    python -m pipelines.orchestration.airflow_local status [--home out/airflow]

`up` starts, detached and in its own process group, a supervisor (`… airflow_local run`,
what `airflow standalone` does, with the binding under our control) that creates the
database (`airflow db migrate`) and runs the components as `airflow …` subprocesses:
scheduler, dag-processor, triggerer and the API server + UI on http://localhost:8080 —
with this venv's bin/ first on PATH, a SQLite AIRFLOW_HOME, dags/ as DAGs folder, no
examples, LocalExecutor and the simple auth manager. Bound to the loopback interface
only: the API server on 127.0.0.1 (`[api] host`), and the scheduler's and triggerer's log
servers (8793/8794) not started, since Airflow's log server listens on every interface
with no option to change it (task logs are files under HOME/logs, read from there).
`--expose` binds the API server to 0.0.0.0 and starts the log servers (every interface).
Log in HOME/stack.log (lines prefixed by component), group id in HOME/stack.pid; it then
waits (up to --wait seconds, 0: not at all) until the dag-processor has stored this
project's DAGs, so that `airflow dags unpause …` right after it finds them (exit 1 with
the log's tail if the stack dies or the wait runs out). It writes the sample catalog to
DATA/catalog first if it is missing (catalog_refresh's default manifest), and
HOME/config/airflow_local_settings.py (KNOWN_WARNINGS). `down` stops the whole group
(SIGTERM, then SIGKILL after 20 s): the scheduler and its executor processes included.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from contextlib import closing
from typing import Sequence

from pipelines.core import procgroup

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The DAGs of dags/ that `up` waits for (docs/AIRFLOW.md unpauses and triggers these).
DAG_IDS = ("catalog_refresh", "catalog_backfill", "index_handoff")

#: Warnings of our dependencies that a user of the local Airflow cannot act on, ignored by
#: exact message (a regex matched at its start) and category:
#: - Airflow's CLI imports its DAG renderer for every `airflow dags …` call, which warns
#:   (3 lines) without the optional graphviz package; nothing here renders DAG graphs.
#: - Airflow's execution API imports svcs, whose FastAPI helpers import fastapi.testclient
#:   for a type; Starlette then says to install httpx2 for its TestClient, which nothing
#:   here uses outside the tests (StarletteDeprecationWarning is a UserWarning).
KNOWN_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"Could not import graphviz\. Rendering graph", UserWarning),
    (r"Using `httpx` with `starlette\.testclient` is deprecated", UserWarning),
)
LOCAL_SETTINGS_MARK = "# written by pipelines/orchestration/airflow_local.py"


def ignore_known_warnings() -> None:
    """Ignore exactly the KNOWN_WARNINGS in this process."""
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def write_local_settings(home: str) -> bool:
    """HOME/config/airflow_local_settings.py ignoring the KNOWN_WARNINGS.

    Airflow imports that module in every process on this home (CLI calls, the stack's
    components, task processes) before any of its own commands. A file of the user's own
    (without our first line) is left as it is: False.
    """
    path = os.path.join(os.path.abspath(home), "config", "airflow_local_settings.py")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if not f.readline().startswith(LOCAL_SETTINGS_MARK):
                return False
    os.makedirs(os.path.dirname(path), exist_ok=True)
    filters = "".join(f"_warnings.filterwarnings('ignore', message={m!r}, "
                      f"category={c.__name__})\n" for m, c in KNOWN_WARNINGS)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(f"{LOCAL_SETTINGS_MARK} (rewritten by `make airflow-up`)\n"
                '"""Warnings of our dependencies a user cannot act on (see KNOWN_WARNINGS there)."""\n'
                "import warnings as _warnings\n\n__all__: list = []\n" + filters)
    os.replace(path + ".tmp", path)
    return True


LOOPBACK, ALL_INTERFACES = "127.0.0.1", "0.0.0.0"


def stack_env(home: str, data: str, expose: bool = False) -> dict[str, str]:
    """Environment of the stack (also what to export in a shell that uses the `airflow` CLI)."""
    bin_dir = os.path.dirname(os.path.abspath(sys.executable))
    return dict(os.environ, **{
        "AIRFLOW_HOME": os.path.abspath(home),
        "AIRFLOW__API__HOST": ALL_INTERFACES if expose else LOOPBACK,
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__AUTH_MANAGER":
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": os.path.join(REPO_ROOT, "dags"),
        "CATALOG_SEARCH_DATA": os.path.abspath(data),
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p),
    })


def _pid_file(home: str) -> str:
    return os.path.join(os.path.abspath(home), "stack.pid")


def _running(home: str) -> int | None:
    try:
        with open(_pid_file(home), encoding="utf-8") as f:
            pgid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return pgid if procgroup.group_alive(pgid) else None


def components(expose: bool = False) -> dict[str, list[str]]:
    """The stack's `airflow` subcommands by name (log servers only when exposed)."""
    skip = [] if expose else ["--skip-serve-logs"]
    return {"scheduler": ["scheduler", *skip], "dag-processor": ["dag-processor"],
            "triggerer": ["triggerer", *skip], "api-server": ["api-server"]}


def api_url() -> str:
    return f"http://localhost:{os.environ.get('AIRFLOW__API__PORT', '8080')}"


def up(home: str, data: str, expose: bool = False) -> int:
    """Start the stack (detached); its process group id."""
    if (pgid := _running(home)) is not None:
        print(f"airflow stack already running (process group {pgid}); "
              f"stop it with: make airflow-down")
        return pgid
    os.makedirs(home, exist_ok=True)
    write_local_settings(home)
    manifest = os.path.join(data, "catalog", "manifest.csv")
    if not os.path.exists(manifest):
        from pipelines.embed.sample_catalog import write_catalog
        write_catalog(os.path.join(data, "catalog"), queries_per_product=2, relative_uris=True)
        print(f"wrote the sample catalog: {manifest}")
    log_path = os.path.join(home, "stack.log")
    cmd = [sys.executable, "-m", "pipelines.orchestration.airflow_local", "run",
           "--home", os.path.abspath(home), "--data", os.path.abspath(data)]
    with open(log_path, "ab") as log:
        proc = procgroup.start(cmd + (["--expose"] if expose else []),
                               env=stack_env(home, data, expose), stdout=log, stderr=log,
                               cwd=REPO_ROOT)
    with open(_pid_file(home), "w", encoding="utf-8") as f:
        f.write(str(proc.pid))
    print(f"airflow stack started (process group {proc.pid}); log: {log_path}")
    where = ("on every interface (--expose), log servers on" if expose
             else "on 127.0.0.1 only, log servers off")
    print(f"UI/API: {api_url()} ({where}; admin password: "
          f"{os.path.join(os.path.abspath(home), 'simple_auth_manager_passwords.json.generated')})")
    return proc.pid


def run(expose: bool = False) -> int:
    """The supervisor (foreground, what `up` starts): db migrate, then the components.

    Each component's output goes to stdout prefixed with its name. When one exits, the
    others are stopped and this returns 1; SIGTERM (what `down` sends the whole group)
    stops them all.
    """
    print(f"stack: airflow db migrate (AIRFLOW_HOME={os.environ.get('AIRFLOW_HOME')})",
          flush=True)
    if (rc := subprocess.call(["airflow", "db", "migrate"])) != 0:
        print(f"stack: airflow db migrate failed (exit {rc})", flush=True)
        return 1
    lock = threading.Lock()
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def relay(name: str, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip()
            with lock:
                print(f"{name:13} | {line}", flush=True)

    for name, args in components(expose).items():
        procs[name] = subprocess.Popen(["airflow", *args], stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT)
        threading.Thread(target=relay, args=(name, procs[name]), daemon=True).start()
    host = os.environ.get("AIRFLOW__API__HOST")
    print(f"stack: started {', '.join(procs)} (API server on {host}, log servers "
          f"{'on' if expose else 'off'})", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            for name, proc in procs.items():
                if (status := proc.poll()) is not None:
                    print(f"stack: {name} exited (status {status}); stopping the others",
                          flush=True)
                    return 1
            time.sleep(1.0)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def stored_dags(home: str) -> set[str]:
    """DAG ids the dag-processor has stored in HOME's SQLite database (empty before it has)."""
    db = os.path.join(os.path.abspath(home), "airflow.db")
    if not os.path.exists(db):
        return set()
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
            return {row[0] for row in conn.execute("SELECT dag_id FROM dag")}
    except sqlite3.Error:  # not migrated yet, or locked for a moment
        return set()


def api_listening() -> bool:
    """Does the API server accept connections on 127.0.0.1 (its port from the environment)?"""
    try:
        with socket.create_connection(
                ("127.0.0.1", int(os.environ.get("AIRFLOW__API__PORT", "8080"))), timeout=1):
            return True
    except OSError:
        return False


def wait_ready(home: str, pgid: int, timeout_s: float,
               dag_ids: Sequence[str] = DAG_IDS) -> bool:
    """Wait until `dag_ids` are stored and the API server listens; False (with the log's
    tail) if the stack dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if set(dag_ids) <= stored_dags(home) and api_listening():
            print(f"airflow stack ready: DAGs {', '.join(dag_ids)} loaded, API server up")
            return True
        if not procgroup.group_alive(pgid):
            break
        time.sleep(1.0)
    what = "stopped" if not procgroup.group_alive(pgid) else f"not ready after {timeout_s:.0f} s"
    print(f"airflow stack {what}; missing DAGs: "
          f"{', '.join(sorted(set(dag_ids) - stored_dags(home)))}; last lines of the log:")
    try:
        with open(os.path.join(home, "stack.log"), encoding="utf-8", errors="replace") as f:
            print("".join(f.readlines()[-30:]), end="")
    except OSError:
        pass
    return False


def down(home: str, grace_s: float = 20.0) -> bool:
    """Stop every process of the stack; True when none is left."""
    pgid = _running(home)
    if pgid is None:
        print("airflow stack not running")
        return True
    ok = procgroup.stop_group(pgid, grace_s)
    print(f"airflow stack (process group {pgid}) " + ("stopped" if ok else "NOT fully stopped"))
    if ok:
        os.remove(_pid_file(home))
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.orchestration.airflow_local",
                                description="Start / stop the local Airflow stack (SQLite).")
    p.add_argument("action", choices=("up", "down", "status", "run"),
                   help="run: the supervisor `up` starts (foreground)")
    p.add_argument("--home", default="out/airflow", help="AIRFLOW_HOME (default out/airflow)")
    p.add_argument("--data", default="out/data",
                   help="CATALOG_SEARCH_DATA: catalog, embeddings, index (default out/data)")
    p.add_argument("--wait", type=float, default=300.0, metavar="SECONDS",
                   help="up: wait this long for the DAGs to be loaded (default 300; 0: return "
                        "at once)")
    p.add_argument("--expose", action="store_true",
                   help="up: bind the API server to every interface (0.0.0.0) and start "
                        "Airflow's log servers (8793/8794, every interface); default: the "
                        "API server on 127.0.0.1 only, no log servers")
    args = p.parse_args(argv)
    if args.action == "run":
        return run(args.expose)
    if args.action == "up":
        pgid = up(args.home, args.data, args.expose)
        return 0 if args.wait <= 0 or wait_ready(args.home, pgid, args.wait) else 1
    if args.action == "down":
        return 0 if down(args.home) else 1
    running = _running(args.home)
    print(f"running (process group {running})" if running else "not running")
    return 0 if running else 1


if __name__ == "__main__":
    time.tzset()
    sys.exit(main())
