"""Progress of a running Beam job against a known total: done/total, rate, ETA.

The FnApiRunner that runs our jobs locally returns from `pipeline.run()` only when the
job is done, so Beam metrics cannot be read while it runs. Instead the launcher sets
`$CATALOG_SEARCH_PROGRESS_FILE` (workers are subprocesses and inherit it) and every
worker appends one byte per finished item with O_APPEND (atomic for small writes, so
any number of worker processes share one file; each opens it once per job). The
launcher's reporter thread reads the file size every second and logs a line every
`interval_s` seconds or every 10 %:

    embed progress: 12/300 rows (4%), ETA estimating…, 6s elapsed
    embed progress: 120/300 rows (40%), 11.8/s, ETA 15s, 16s elapsed

The rate (`EtaEstimator`) starts at the first finished items, not at the job's start: Beam's
start-up (worker processes, model load) would otherwise make the first ETAs many times
too long. It is smoothed (an exponential moving average over ~15 s) and the line says
"estimating…" until MIN_ESTIMATE_S seconds and two progress updates have followed the
first items.

On a cluster runner the workers cannot write the launcher's local file; the env var is
not set there and `tick()` is a no-op (Dataflow's and Flink's UIs show their progress).
"""
from __future__ import annotations

import contextlib
import logging
import math
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


#: This process's open progress file: (path, fd), opened on the first tick of a job.
_OPEN: tuple[str, int] | None = None
_OPEN_LOCK = threading.Lock()


def tick(n: int = 1) -> None:
    """Count `n` finished items of the running job (a no-op when no reporter listens).

    The file is opened once per process and job (not per tick); a tick after the
    reporter removed it (the job is over) counts nowhere."""
    path = os.environ.get(PROGRESS_FILE_ENV)
    if not path or n <= 0:
        return
    fd = _progress_fd(path)
    if fd is not None:
        try:
            os.write(fd, b"." * n)
        except OSError:
            pass


def _progress_fd(path: str) -> int | None:
    global _OPEN
    with _OPEN_LOCK:
        if _OPEN is not None and _OPEN[0] == path:
            return _OPEN[1]
        if _OPEN is not None:  # another job's file (several jobs in one process)
            with contextlib.suppress(OSError):
                os.close(_OPEN[1])
            _OPEN = None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            return None
        _OPEN = (path, fd)
        return fd


#: Seconds of progress after the first finished items before the line gives a rate and ETA.
MIN_ESTIMATE_S = 3.0
#: Time constant of the rate's exponential moving average (seconds).
SMOOTHING_S = 15.0
ESTIMATING = "estimating…"


class EtaEstimator:
    """The rate and ETA of a job from (time, items done) observations.

    The first observation with items done is the anchor: start-up time before it does not
    count. Once MIN_ESTIMATE_S seconds and two increments have followed the anchor, the
    rate is the average since the anchor; after that, an exponential moving average (time
    constant SMOOTHING_S) of the rate between increments (items arrive in bundles: an
    observation with nothing new carries no rate), so one slow or bursty bundle moves it
    only a little. `rate()` / `eta_s()` are None until then (the line says estimating…).
    """

    def __init__(self, total: int, min_estimate_s: float = MIN_ESTIMATE_S,
                 smoothing_s: float = SMOOTHING_S) -> None:
        self.total = total
        self.min_estimate_s = min_estimate_s
        self.smoothing_s = smoothing_s
        self._anchor: tuple[float, int] | None = None
        self._last: tuple[float, int] | None = None
        self._increments = 0
        self._rate: float | None = None
        self.done = 0

    def update(self, now: float, done: int) -> None:
        """Record that `done` items are finished at time `now` (seconds, monotonic)."""
        self.done = done
        if done <= 0:
            return
        if self._anchor is None:
            self._anchor = self._last = (now, done)
            return
        assert self._last is not None
        last_t, last_done = self._last
        if now <= last_t or done <= last_done:
            return  # no news: items arrive in bundles, the rate is read between arrivals
        self._increments += 1
        t0, d0 = self._anchor
        if self._rate is None:
            if now - t0 >= self.min_estimate_s and self._increments >= 2:
                self._rate = (done - d0) / (now - t0)
        else:
            alpha = 1.0 - math.exp(-(now - last_t) / self.smoothing_s)
            self._rate += alpha * ((done - last_done) / (now - last_t) - self._rate)
        self._last = (now, done)

    def rate(self) -> float | None:
        """Items per second, or None while estimating."""
        return self._rate if self._rate else None

    def eta_s(self) -> float | None:
        """Seconds to go (0 when done), or None while estimating."""
        if self.done >= self.total:
            return 0.0
        rate = self.rate()
        return (self.total - self.done) / rate if rate else None


def format_line(what: str, unit: str, done: int, total: int, elapsed_s: float,
                rate: float | None) -> str:
    """`<what> progress: done/total <unit> (pct), rate/s, ETA, elapsed`; with `rate` None
    (not known yet) `ETA estimating…` and no rate."""
    pct = 100.0 * done / total if total else 100.0
    if done >= total:
        eta = "done"
    elif rate:
        eta = f"{rate:.1f}/s, ETA {_duration((total - done) / rate)}"
    else:
        eta = f"ETA {ESTIMATING}"
    return (f"{what} progress: {done}/{total} {unit} ({pct:.0f}%), {eta}, "
            f"{_duration(elapsed_s)} elapsed")


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
    started = time.monotonic()
    interval = _interval()

    def done_count() -> int:
        try:
            return min(os.path.getsize(path), total)
        except OSError:
            return 0

    printed = [0]  # the last count a line was logged for
    estimator = EtaEstimator(total)

    def line(done: int, now: float) -> str:
        return format_line(what, unit, done, total, now - started, estimator.rate())

    def run() -> None:
        last_line, last_done, last_decile = time.monotonic(), 0, 0
        while not stop.wait(min(1.0, interval)):
            done = done_count()
            now = time.monotonic()
            estimator.update(now, done)
            decile = done * 10 // total
            if done != last_done and (now - last_line >= interval or decile > last_decile):
                log.info("%s", line(done, now))
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
            estimator.update(time.monotonic(), done_count())
            log.info("%s", line(done_count(), time.monotonic()))
        if previous is None:
            os.environ.pop(PROGRESS_FILE_ENV, None)
        else:
            os.environ[PROGRESS_FILE_ENV] = previous
        with contextlib.suppress(OSError):
            os.remove(path)
