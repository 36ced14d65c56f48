"""`make airflow-up`'s stack listens on the loopback interface only (issue 23 item 1): a
real stack (pipelines.orchestration.airflow_local up) on a temporary SQLite home, its
listening sockets read from /proc via psutil, then `down`."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.orchestration import airflow_local

psutil = pytest.importorskip("psutil")  # installed with apache-airflow

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = {"127.0.0.1", "::1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group(pgid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return found


def _listening(pgid: int) -> dict[tuple[str, int], str]:
    """(address, port) -> command line, for every listening TCP socket of the group."""
    out = {}
    for proc in _group(pgid):
        try:
            for c in proc.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    out[(c.laddr.ip, c.laddr.port)] = " ".join(proc.cmdline()[:4])
        except psutil.Error:
            pass
    return out


def test_components_bind_to_loopback_unless_exposed():
    assert airflow_local.stack_env("h", "d")["AIRFLOW__API__HOST"] == "127.0.0.1"
    assert airflow_local.stack_env("h", "d", expose=True)["AIRFLOW__API__HOST"] == "0.0.0.0"
    local, exposed = airflow_local.components(), airflow_local.components(expose=True)
    assert set(local) == set(exposed) == {"scheduler", "dag-processor", "triggerer",
                                         "api-server"}
    # Airflow's log server (scheduler 8793, triggerer 8794) binds every interface, always
    assert local["scheduler"][-1] == local["triggerer"][-1] == "--skip-serve-logs"
    assert not any("--skip-serve-logs" in args for args in exposed.values())


@pytest.mark.slow
def test_started_stack_listens_on_loopback_only(tmp_path):
    """The whole stack up (DAGs loaded, API server answering): every listening socket of
    its process group is on 127.0.0.1/::1, the API server's port among them, nothing on
    the log-server ports; `down` leaves no process."""
    api, worker_logs, trigger_logs = _free_port(), _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CATALOG_SEARCH_"))}
    env.update(AIRFLOW__API__PORT=str(api), AIRFLOW__API__BASE_URL=f"http://localhost:{api}",
               AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(worker_logs),
               AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(trigger_logs),
               TF_CPP_MIN_LOG_LEVEL="3")
    home, data = tmp_path / "airflow", tmp_path / "data"
    cli = [sys.executable, "-m", "pipelines.orchestration.airflow_local"]
    pgid = None
    try:
        up = subprocess.run(cli + ["up", "--home", str(home), "--data", str(data),
                                   "--wait", "400"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=480)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "127.0.0.1 only" in up.stdout, up.stdout
        pgid = int((home / "stack.pid").read_text())
        names = " ".join(" ".join(p.cmdline()) for p in _group(pgid))
        # (the API server retitles itself "airflow api_server -- host:127.0.0.1 port:…")
        for component in ("scheduler", "dag-processor", "triggerer", "api[-_]server"):
            assert re.search(f"airflow {component}", names), names
        sockets = _listening(pgid)
        assert ("127.0.0.1", api) in sockets, sockets
        assert {addr for addr, _ in sockets} <= LOOPBACK, sockets
        assert not {port for _, port in sockets} & {worker_logs, trigger_logs}, sockets
    finally:
        down = subprocess.run(cli + ["down", "--home", str(home)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert pgid is not None and not _group(pgid)
