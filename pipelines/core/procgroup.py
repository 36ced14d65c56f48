"""Run a command in its own process group and stop all of it: the command, its children
(Beam step subprocesses, Beam workers, Airflow components and executor processes).

Signals sent to one process do not reach its children (Airflow's `standalone` left its
scheduler and executor processes running after a SIGTERM; `dag.test` ignores it), so
the command gets a new session and is stopped with `killpg`: SIGTERM to the group, then
SIGKILL to whatever is left after a grace period.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Mapping, Sequence


def start(cmd: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | None = None,
          stdout=None, stderr=None) -> subprocess.Popen:
    """Start `cmd` as the leader of a new process group (its pid is the group id)."""
    return subprocess.Popen(list(cmd), env=dict(env) if env is not None else None, cwd=cwd,
                            stdout=stdout, stderr=stderr, start_new_session=True)


def group_alive(pgid: int) -> bool:
    """Does any process of group `pgid` still exist?"""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(pgid: int, grace_s: float = 10.0, proc: subprocess.Popen | None = None) -> bool:
    """SIGTERM the whole group, SIGKILL it after `grace_s`; True when nothing is left.

    `proc` (the leader, when it is our child) is reaped so that it does not linger as a zombie.
    """
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.time() + grace_s
    while time.time() < deadline:
        if proc is not None:
            proc.poll()
        if not group_alive(pgid):
            return True
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    for _ in range(50):
        if proc is not None:
            proc.poll()
        if not group_alive(pgid):
            return True
        time.sleep(0.1)
    return not group_alive(pgid)


def run_supervised(cmd: Sequence[str], env: Mapping[str, str] | None = None,
                   grace_s: float = 10.0) -> int:
    """Run `cmd` in its own process group and wait for it; its exit status.

    Ctrl-C (SIGINT) or SIGTERM to this process stops the whole group (SIGTERM, then
    SIGKILL after `grace_s`) and returns 128 + the signal number. When the command ends
    on its own, anything it left behind in its group is stopped too.
    """
    proc = start(cmd, env=env)
    received: list[int] = []

    def on_signal(signum, _frame) -> None:
        received.append(signum)
        stop_group(proc.pid, grace_s, proc)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                rc = proc.wait()
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries wait() itself
                continue
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if group_alive(proc.pid):
            stop_group(proc.pid, grace_s)
    if received:
        return 128 + received[0]
    return rc
