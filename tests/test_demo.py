"""`make demo` (python -m catalog_search.demo): fails fast on a failing step, stops on SIGTERM.

Real Airflow dag.test() on a temporary SQLite home, real Beam step subprocesses.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _demo_cmd(workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "catalog_search.demo", "--workdir", str(workdir),
            "--products", "3", "--images-per-product", "1", "--size", "64", *extra]


def _env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
                CATALOG_SEARCH_CACHE=str(tmp_path / "cache"))


@pytest.mark.heavy
def test_a_failing_step_ends_the_demo_within_a_minute(tmp_path, tiny_model):
    # model.cache_dir under a regular file: the embed step crashes (a retryable error,
    # which the DAGs would retry after 2 and 4 minutes); the demo does not retry.
    (tmp_path / "a-file").write_text("")
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model:\n  cache_dir: {tmp_path / 'a-file' / 'cache'}\n")
    started = time.time()
    proc = subprocess.run(_demo_cmd(tmp_path / "demo", "--config", str(bad)), cwd=REPO,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    seconds = time.time() - started
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert seconds < 60, f"the demo took {seconds:.0f}s to fail"
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("demo: error: catalog_refresh ended failed (failed: embed)")
    assert "cannot create model cache directory" in last
    assert "No tasks to run" not in proc.stdout + proc.stderr  # no retry wait loop
    assert "apitools" not in proc.stdout + proc.stderr


@pytest.mark.heavy
def test_sigterm_stops_the_demo_and_everything_it_started(tmp_path, tiny_model):
    log_path = tmp_path / "demo.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_demo_cmd(tmp_path / "demo", "--model", tiny_model), cwd=REPO,
                                env=_env(tmp_path), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.time() + 120
            while "launching embed" not in log_path.read_text():
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.time() < deadline, "the embed step did not start"
                time.sleep(0.2)
            deadline = time.time() + 60
            while not any("pipelines.orchestration.launcher" in a for a in _descendants(proc.pid).values()):
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.time() < deadline, "no step subprocess"
                time.sleep(0.1)
            time.sleep(1.0)
            before = _descendants(proc.pid)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 128 + signal.SIGTERM, log_path.read_text()[-3000:]
    assert "stopped by signal 15" in log_path.read_text()
    time.sleep(0.5)
    alive = {pid: args for pid, args in before.items() if _alive(pid)}
    assert not alive, alive


def _descendants(root: int) -> dict[int, str]:
    """pid -> command line of every process below `root`."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,stat=,args="], capture_output=True,
                         text=True).stdout
    children: dict[int, list[int]] = {}
    args: dict[int, str] = {}
    for line in out.splitlines():
        pid, ppid, stat, cmd = (line.split(None, 3) + [""])[:4]
        if stat.startswith("Z"):
            continue
        children.setdefault(int(ppid), []).append(int(pid))
        args[int(pid)] = cmd
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = args[child]
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_the_settling_pass_warning_is_dropped_but_a_retry_wait_is_not():
    """dag.test()'s "No tasks to run" is hidden only for tasks that merely await being
    marked upstream_failed (state None); a task waiting for its retry still shows."""
    import logging

    from catalog_search.demo import DropSettlingPass

    class TI:  # hashable, like Airflow's TaskInstance
        def __init__(self, state):
            self.state = state

    def record(*states):
        tis = {TI(s) for s in states}
        return logging.LogRecord("airflow.sdk.definitions.dag", logging.WARNING, __file__, 1,
                                 "No tasks to run. unrunnable tasks: %s", (tis,), None)
    f = DropSettlingPass()
    assert not f.filter(record(None, None))
    assert f.filter(record(None, "up_for_retry"))
    assert f.filter(logging.LogRecord("x", logging.WARNING, __file__, 1, "other", None, None))
