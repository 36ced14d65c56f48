"""Entry point of the local Beam SDK worker processes: exit when the launcher dies, and quiet.

The FnApiRunner (multi_processing) starts each worker as
`sh -c "<python> -m apache_beam.runners.worker.sdk_worker_main"`; when the launcher is
SIGKILLed nothing tells those workers, and they linger for minutes. pipelines/core/runner.py
starts them through this module instead, which first arms two guards and then runs
Beam's own worker main:

- Linux: prctl(PR_SET_PDEATHSIG, SIGKILL), so the kernel kills the worker the moment its
  parent process dies;
- everywhere: a daemon thread that polls every `POLL_S` seconds whether the launcher
  (its pid in $CATALOG_SEARCH_LAUNCHER_PID, set by the runner) is still alive and
  whether this process was re-parented, and exits the worker at once if not (covers the
  `sh -c` in between, which the death signal alone would not).

It also logs in our format on stderr and drops known-noise lines a worker prints once per
process: "apitools not found …" (Beam's optional GCP client is not installed; nothing here
uses it), "Resource module is not available …" (Beam's RunInference without torch; see
_NOISE), "Logging handler created.", and Beam's start-up chatter.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

LAUNCHER_PID_ENV = "CATALOG_SEARCH_LAUNCHER_PID"
POLL_S = 0.5
_PR_SET_PDEATHSIG = 1
_NOISE = ("apitools not found", "Logging handler created", "semi_persistent_directory",
          "Load pipeline options", "Pipeline_options:", "Creating insecure",
          # Beam's RunInference (apache_beam/ml/inference/base.py) imports `resource`
          # together with its torch-based ModelManager and, without torch, reports
          # `resource` missing on every memory reading (twice per small in-process run);
          # nothing here reads those memory metrics.
          "Resource module is not available")


class DropKnownNoise(logging.Filter):
    """Drops log records that start with one of the known-noise prefixes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NOISE)


def _set_parent_death_signal() -> bool:
    """Ask the Linux kernel to SIGKILL this process when its parent dies; False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def process_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a killed, not yet reaped launcher)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def _watch(launcher_pid: int | None, parent_pid: int) -> None:
    while True:
        time.sleep(POLL_S)
        orphaned = os.getppid() != parent_pid
        if orphaned or (launcher_pid is not None and not process_alive(launcher_pid)):
            os._exit(70)  # no cleanup: the job this worker served is gone


def arm_guards() -> None:
    """Install the parent-death signal and start the watchdog thread (idempotent enough:
    called once at worker start-up)."""
    parent = os.getppid()
    _set_parent_death_signal()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(70)
    raw = os.environ.get(LAUNCHER_PID_ENV, "")
    launcher = int(raw) if raw.isdigit() else None
    threading.Thread(target=_watch, args=(launcher, parent), daemon=True,
                     name="launcher-watchdog").start()


def main() -> None:
    """Arm the launcher guards, configure quiet stderr logging, run Beam's SDK worker main."""
    arm_guards()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(DropKnownNoise())
    root = logging.getLogger()
    root.addHandler(handler)
    root.addFilter(DropKnownNoise())
    # Run as __main__, Beam's start-up messages went to a logger the harness level
    # (ERROR) silenced; imported, their logger needs to be told.
    logging.getLogger("apache_beam.runners.worker.sdk_worker_main").setLevel(logging.ERROR)
    from apache_beam.runners.worker import sdk_worker_main
    sdk_worker_main.main(sys.argv)


if __name__ == "__main__":
    main()
