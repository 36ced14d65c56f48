"""A bounded window of calls in flight on a worker's shared thread pool, for a DoFn.

`ResolveImage` (pipelines/embed/transforms.py) hands each element's slow part -- the
change-signal lookup (one stat / object HEAD) and the fetch -- to `InFlight.submit` and
emits the results of whichever calls have finished, in completion order, so one slow or
hanging host holds one slot, not the bundle. At most `limit` calls are in flight per
DoFn instance; when the window is full, `process` waits for the first to finish. Every
call submitted in a bundle is finished and emitted by that bundle's `finish_bundle`
(nothing is carried into the next bundle), and `start_bundle` discards whatever a failed
bundle left, so a retried bundle's outputs -- and the outcome counts built from them --
are counted exactly once.

The threads are shared by every DoFn instance in the process (`shared_executor`), so
`fetch.concurrency` bounds the fetches in flight per worker process.
"""
from __future__ import annotations

import concurrent.futures as cf
import threading
from typing import Any, Callable, Iterator

_EXECUTORS: dict[int, cf.ThreadPoolExecutor] = {}
_LOCK = threading.Lock()


def shared_executor(threads: int) -> cf.ThreadPoolExecutor:
    """This process's thread pool of `threads` threads (created once, shared)."""
    with _LOCK:
        pool = _EXECUTORS.get(threads)
        if pool is None:
            pool = _EXECUTORS[threads] = cf.ThreadPoolExecutor(
                threads, thread_name_prefix="catalog-fetch")
        return pool


class InFlight:
    """Up to `limit` calls of one bundle in flight; results in the order they finish.

    limit == 1 runs each call inline when it is submitted (no thread: the sequential path).
    A call's exception is raised where its result is collected (it fails the bundle)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._pool = shared_executor(limit) if limit > 1 else None
        self._pending: dict[cf.Future, Any] = {}
        self._done: list[tuple[Any, Any]] = []

    def __len__(self) -> int:
        return len(self._pending) + len(self._done)

    def submit(self, fn: Callable[..., Any], arg: Any, tag: Any = None) -> None:
        if self._pool is None:
            self._done.append((tag, fn(arg)))
            return
        self._pending[self._pool.submit(fn, arg)] = tag

    def ready(self) -> Iterator[tuple[Any, Any]]:
        """(tag, result) of the calls finished so far; waits for one when the window is full."""
        if self._pending:
            block = len(self._pending) >= self.limit
            done, _ = cf.wait(list(self._pending), timeout=None if block else 0,
                              return_when=cf.FIRST_COMPLETED)
            yield from self._collect(done)
        done_now, self._done = self._done, []
        yield from done_now

    def drain(self) -> Iterator[tuple[Any, Any]]:
        """(tag, result) of every call still in flight, as each finishes."""
        done_now, self._done = self._done, []
        yield from done_now
        while self._pending:
            done, _ = cf.wait(list(self._pending), return_when=cf.FIRST_COMPLETED)
            yield from self._collect(done)

    def discard(self) -> None:
        """Forget every call (a failed bundle's): queued ones are cancelled, running ones
        finish on their own and their results are dropped."""
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._done.clear()

    def _collect(self, done) -> Iterator[tuple[Any, Any]]:
        for future in done:
            tag = self._pending.pop(future)
            yield tag, future.result()
