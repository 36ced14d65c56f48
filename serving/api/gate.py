"""Decode slots: uploads decode and embed a photo (memory and CPU), so only a bounded
number run at once; beyond a short queue a request is answered 503 busy + Retry-After."""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator

from serving.api.errors import ApiError


class QueryGate:
    """Bounds concurrent decode+embed work: `slots` at a time, at most `max_queued` waiting.

    A request that finds every slot busy and the queue full, or waits longer than
    `timeout_s`, gets 503 (reason busy) with Retry-After instead of holding more memory.
    """

    def __init__(self, slots: int, max_queued: int, timeout_s: float):
        self.slots, self.max_queued, self.timeout_s = slots, max_queued, timeout_s
        self._semaphore: asyncio.Semaphore | None = None
        self.waiting = 0
        self.rejected = 0

    def _busy(self, why: str) -> ApiError:
        self.rejected += 1
        return ApiError(503, "busy", f"the server is decoding {self.slots} photos already "
                                     f"({why}); retry shortly", headers={"Retry-After": "1"})

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._semaphore is None:  # created on the serving event loop
            self._semaphore = asyncio.Semaphore(self.slots)
        sem = self._semaphore
        if sem.locked():
            if self.waiting >= self.max_queued:
                raise self._busy(f"{self.waiting} more waiting")
            self.waiting += 1
            try:
                await asyncio.wait_for(sem.acquire(), self.timeout_s)
            except (asyncio.TimeoutError, TimeoutError):
                raise self._busy(f"no slot within {self.timeout_s:g}s") from None
            finally:
                self.waiting -= 1
        else:
            await sem.acquire()
        try:
            yield
        finally:
            sem.release()

