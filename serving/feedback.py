"""Feedback as supervision (POST /v1/feedback): which product a shopper chose for a search.

With `serving.feedback_root` set, every photo / vector search answer (fused with text or
not) carries a `query_id` (uuid4 hex: random, unguessable), and the query's model-space
vector (L2-normed, before the version's adapter: docs/ARCHITECTURE.md, "vector spaces";
never the photo) is kept in memory for the `serving.feedback_recent_queries` most recent
ids (LRU). `POST /v1/feedback {"query_id", "product_id"}` appends
{query_id, product_id, version, model_id, adapter_id, vector, at} to the bounded, rotated
log of pipelines.adapter.feedback.FeedbackLog, which `train-adapter --feedback ROOT` (and
the catalog_refresh DAG's train_adapter task with adapter.feedback) reads as pairs.

Text-only searches have no vector, and "more like this" queries are a catalog product
(its neighbours are other products by construction): their answers carry no query_id.
"""
from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.core.config import ServingConfig


@dataclass(frozen=True)
class RecentQuery:
    vector: np.ndarray  # float32, model space, L2-normed
    version: str
    model_id: str | None
    adapter_id: str | None


class RecentQueries:
    """The model-space vectors of the `capacity` most recent query ids (thread-safe LRU)."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("recent queries: capacity must be >= 1")
        self.capacity = int(capacity)
        self._items: OrderedDict[str, RecentQuery] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, query: RecentQuery) -> str:
        query_id = uuid.uuid4().hex
        with self._lock:
            self._items[query_id] = query
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return query_id

    def get(self, query_id: str) -> RecentQuery | None:
        with self._lock:
            query = self._items.get(query_id)
            if query is not None:
                self._items.move_to_end(query_id)
            return query

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class Feedback:
    """The feedback log of one server and its recent queries."""

    def __init__(self, config: ServingConfig):
        from pipelines.adapter.feedback import FeedbackLog
        from pipelines.core import filesystem as fs
        root = config.feedback_root
        if root is None:
            raise ValueError("serving.feedback_root is not set")
        if not fs.is_local(root):
            raise ValueError(f"serving.feedback_root must be a local folder, got {root}")
        self.log = FeedbackLog(root, config.feedback_max_bytes, config.feedback_max_files)
        self.recent = RecentQueries(config.feedback_recent_queries)

    @classmethod
    def from_config(cls, config: ServingConfig) -> "Feedback | None":
        return cls(config) if config.feedback_root is not None else None

    def remember(self, results: Any) -> str | None:
        """A new query id for a search answer that has a model-space vector, else None."""
        vector = getattr(results, "model_vector", None)
        if vector is None:
            return None
        return self.recent.add(RecentQuery(np.asarray(vector, dtype=np.float32),
                                           results.version, results.model_id,
                                           results.adapter_id))

    def record(self, query_id: str, product_id: str, query: RecentQuery) -> dict[str, Any]:
        """Append one record to the log (OSError when the folder cannot be written)."""
        record = {"query_id": query_id, "product_id": product_id, "version": query.version,
                  "model_id": query.model_id, "adapter_id": query.adapter_id,
                  "vector": [float(x) for x in query.vector],
                  "at": dt.datetime.now(dt.timezone.utc).isoformat()}
        self.log.append(record)
        return record
