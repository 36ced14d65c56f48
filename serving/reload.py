"""Hot reload: the outcome of one reload (`ReloadOutcome`) and the background thread that
reloads whenever LATEST changes (`IndexWatcher`); serving.searcher.CatalogSearcher.reload
does the loading, verifying and swapping."""
from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass
from typing import Any, Protocol


class Reloadable(Protocol):
    """What the watcher needs of a searcher (serving.searcher.CatalogSearcher is one);
    named by its shape so that this module does not import the searcher back."""
    config: Any

    def reload(self) -> "ReloadOutcome": ...

log = logging.getLogger("serving.searcher")


@dataclass(frozen=True)
class ReloadOutcome:
    """What `CatalogSearcher.reload` did: loaded, unchanged or refused (with the reason)."""
    status: str
    version: str | None
    serving_version: str | None
    reason: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class IndexWatcher:
    """Background thread: every `interval_s`, load what LATEST names if it changed."""

    def __init__(self, searcher: Reloadable, interval_s: float | None = None):
        self.searcher = searcher
        self.interval_s = interval_s or searcher.config.serving.reload_interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_outcome: ReloadOutcome | None = None

    def start(self) -> "IndexWatcher":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="index-watcher",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def check_now(self) -> ReloadOutcome:
        outcome = self.searcher.reload()
        self.last_outcome = outcome
        return outcome

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check_now()
            except Exception:  # the watcher must outlive any single bad check
                log.exception("index watcher: reload check failed")
