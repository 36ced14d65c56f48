"""Progress of a running Beam job against a known total: done/total, rate, ETA.

The FnApiRunner that runs our jobs locally returns from `pipeline.run()` only when the
job is done, so Beam metrics cannot be read while it runs. Instead the launcher sets
`$CATALOG_SEARCH_PROGRESS_FILE` (workers are subprocesses and inherit it) and every
worker appends one byte per finished item with O_APPEND (atomic for small writes, so
any number of worker processes share one file). The launcher's reporter thread reads
the file size every second and logs a line every `interval_s` seconds or every 10 %:

    embed progress: 120/300 images (40%), 11.8/s, ETA 15s

On a cluster runner the workers cannot write the launcher's local file; the env var is
not set there and `tick()` is a no-op (Dataflow's and Flink's UIs show their progress).
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from typing import Iterator

log = logging.getLogger(__name__)

#: Env var naming the local file workers append progress bytes to.
PROGRESS_FILE_ENV = "CATALOG_SEARCH_PROGRESS_FILE"
#: Env var overriding the seconds between progress lines (default 5).
PROGRESS_INTERVAL_ENV = "CATALOG_SEARCH_PROGRESS_INTERVAL_S"
DEFAULT_INTERVAL_S = 5.0


def tick(n: int = 1) -> None:
    """Count `n` finished items of the running job (a no-op when no reporter listens)."""
    path = os.environ.get(PROGRESS_FILE_ENV)
    if not path or n <= 0:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError:
        return
    try:
        os.write(fd, b"." * n)
    finally:
        os.close(fd)


def format_line(what: str, unit: str, done: int, total: int, elapsed_s: float) -> str:
    """`<what> progress: done/total <unit> (pct), rate/s, ETA`."""
    pct = 100.0 * done / total if total else 100.0
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    if done >= total:
        eta = "done"
    elif rate > 0:
        eta = f"ETA {_duration((total - done) / rate)}"
    else:
        eta = "ETA unknown"
    return (f"{what} progress: {done}/{total} {unit} ({pct:.0f}%), {rate:.1f}/s, "
            f"{eta}, {_duration(elapsed_s)} elapsed")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _interval() -> float:
    try:
        return max(0.2, float(os.environ.get(PROGRESS_INTERVAL_ENV, DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


@contextlib.contextmanager
def report_progress(what: str, total: int, unit: str = "items",
                    enabled: bool = True) -> Iterator[None]:
    """While the block runs, log `what`'s progress against `total` from the workers' ticks.

    Sets $CATALOG_SEARCH_PROGRESS_FILE for the block (workers started inside it inherit
    it). `enabled=False` (a cluster runner) only runs the block.
    """
    if not enabled or total <= 0:
        yield
        return
    fd, path = tempfile.mkstemp(prefix=f"catalog-{what}-progress-")
    os.close(fd)
    previous = os.environ.get(PROGRESS_FILE_ENV)
    os.environ[PROGRESS_FILE_ENV] = path
    stop = threading.Event()
    started = time.time()
    interval = _interval()

    def done_count() -> int:
        try:
            return min(os.path.getsize(path), total)
        except OSError:
            return 0

    printed = [0]  # the last count a line was logged for

    def run() -> None:
        last_line, last_done, last_decile = time.time(), 0, 0
        while not stop.wait(min(1.0, interval)):
            done = done_count()
            decile = done * 10 // total
            now = time.time()
            if done != last_done and (now - last_line >= interval or decile > last_decile):
                log.info("%s", format_line(what, unit, done, total, now - started))
                last_line, last_done, last_decile = now, done, decile
                printed[0] = done

    thread = threading.Thread(target=run, name=f"{what}-progress", daemon=True)
    thread.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        stop.set()
        thread.join()
        if ok and printed[0] != done_count():
            log.info("%s", format_line(what, unit, done_count(), total, time.time() - started))
        if previous is None:
            os.environ.pop(PROGRESS_FILE_ENV, None)
        else:
            os.environ[PROGRESS_FILE_ENV] = previous
        with contextlib.suppress(OSError):
            os.remove(path)
