"""Blocking storage reads with a deadline, off the shared worker threads.

`GET /v1/images/{id}` reads catalog files from storage, which can block for as long as
the storage likes (a FIFO put in an image's place, a hung network filesystem). Such
reads run on their own daemon threads, at most MAX_READERS at once, and the request
waits at most `timeout_s` for the answer; the event loop and the thread pool that
searches use (anyio's) are never held by them, and a read that never returns does not
keep the process from exiting. When all reader threads are stuck the answer is 503
busy with Retry-After at once instead of piling up more threads.

`saturation()` tells /readyz whether the service can still answer searches.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, TypeVar

from serving.api.errors import ApiError

T = TypeVar("T")
MAX_READERS = 16

_lock = threading.Lock()
_active = 0


class DeadlineExceeded(TimeoutError):
    """The read did not finish within its deadline (it may still be running)."""


async def run_with_deadline(fn: Callable[..., T], *args: Any, timeout_s: float) -> T:
    """`fn(*args)` on a daemon reader thread; DeadlineExceeded after `timeout_s` seconds,
    ApiError 503 busy when MAX_READERS reads are running already."""
    global _active
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        global _active
        try:
            result, error = fn(*args), None
        except BaseException as e:  # handed to the waiting request
            result, error = None, e
        finally:
            with _lock:
                _active -= 1
        try:
            loop.call_soon_threadsafe(deliver, result, error)
        except RuntimeError:  # the loop closed while the read blocked
            pass

    with _lock:
        if _active >= MAX_READERS:
            raise ApiError(503, "busy", f"{MAX_READERS} storage reads are in progress; retry "
                                        "shortly", headers={"Retry-After": "1"})
        _active += 1
    try:
        threading.Thread(target=work, name="storage-read", daemon=True).start()
    except BaseException:
        with _lock:
            _active -= 1
        raise
    try:
        return await asyncio.wait_for(future, timeout_s)
    except asyncio.TimeoutError:
        raise DeadlineExceeded(f"not done within {timeout_s:g}s") from None


def active_readers() -> int:
    return _active


def saturation(gate: Any) -> str | None:
    """Why the service cannot take more searches now (None: it can): every worker thread
    of the shared pool is busy, or the decode queue is full."""
    try:
        import anyio.to_thread
        stats = anyio.to_thread.current_default_thread_limiter().statistics()
        if stats.borrowed_tokens >= stats.total_tokens and stats.tasks_waiting > 0:
            return (f"all {stats.total_tokens} worker threads are busy and "
                    f"{stats.tasks_waiting} calls wait for one")
    except Exception:  # no running loop / anyio internals changed: no verdict
        pass
    if gate is not None and gate.max_queued and gate.waiting >= gate.max_queued:
        return f"the decode queue is full ({gate.waiting} uploads waiting)"
    return None
