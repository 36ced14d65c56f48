"""The feedback log: which product a shopper chose for a search (POST /v1/feedback), with
the query's model-space vector, as training pairs for the next adapter.

    <root>/feedback.jsonl                     the file being appended to
    <root>/feedback-<UTC stamp>-<n>.jsonl     rotated files, newest last; at most
                                              `max_files` are kept (the oldest deleted)

One JSON object per line: {"query_id", "product_id", "version", "model_id", "adapter_id",
"vector" (model-space floats, never the photo), "at"}. The current file is rotated when
appending would take it past `max_bytes`, so the log never holds more than about
(max_files + 1) x max_bytes. Appends are serialised by a lock (one server process).
`read_feedback_pairs(root)` turns every file into pairs for `train-adapter --feedback`;
unreadable lines are skipped (counted in the log).
"""
from __future__ import annotations

import datetime as dt
import glob
import json
import logging
import os
import threading
from typing import Any, Mapping, Sequence

from pipelines.adapter.data import LabelledVectors, feedback_pairs_from_records

log = logging.getLogger(__name__)

CURRENT_FILE = "feedback.jsonl"
ROTATED_GLOB = "feedback-*.jsonl"


class FeedbackLog:
    """Bounded, rotated append-only log under a local root folder."""

    def __init__(self, root: str, max_bytes: int = 16 << 20, max_files: int = 8):
        if max_bytes < 1024 or max_files < 1:
            raise ValueError("feedback log: max_bytes must be >= 1024 and max_files >= 1")
        self.root = os.path.abspath(root)
        self.max_bytes = int(max_bytes)
        self.max_files = int(max_files)
        self._lock = threading.Lock()
        os.makedirs(self.root, exist_ok=True)

    @property
    def current(self) -> str:
        return os.path.join(self.root, CURRENT_FILE)

    def rotated(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.root, ROTATED_GLOB)))

    def append(self, record: Mapping[str, Any]) -> None:
        line = (json.dumps(dict(record), sort_keys=True, separators=(",", ":")) + "\n").encode()
        if len(line) > self.max_bytes:
            raise ValueError(f"feedback record of {len(line)} bytes exceeds the log's "
                             f"max_bytes {self.max_bytes}")
        with self._lock:
            size = os.path.getsize(self.current) if os.path.exists(self.current) else 0
            if size and size + len(line) > self.max_bytes:
                self._rotate()
            with open(self.current, "ab") as f:
                f.write(line)

    def _rotate(self) -> None:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        existing = self.rotated()
        os.replace(self.current, os.path.join(
            self.root, f"feedback-{stamp}-{len(existing):06d}.jsonl"))
        for old in self.rotated()[:-self.max_files]:
            os.unlink(old)

    def total_bytes(self) -> int:
        files = self.rotated() + ([self.current] if os.path.exists(self.current) else [])
        return sum(os.path.getsize(f) for f in files)


def read_records(root: str) -> list[dict[str, Any]]:
    """Every well-formed record of the log, oldest first."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        from pipelines.adapter.artifact import AdapterError
        raise AdapterError(f"--feedback {root} is not a folder")
    files = sorted(glob.glob(os.path.join(root, ROTATED_GLOB)))
    current = os.path.join(root, CURRENT_FILE)
    if os.path.exists(current):
        files.append(current)
    out, bad = [], 0
    for path in files:
        with open(path, "rb") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    bad += 1
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("product_id"), str):
                    out.append(rec)
                else:
                    bad += 1
    if bad:
        log.warning("feedback %s: %d unreadable lines skipped", root, bad)
    return out


def read_feedback_pairs(root: str, dim: int | None = None,
                        records: Sequence[Mapping[str, Any]] | None = None) -> LabelledVectors:
    """The log as pairs (query vector, chosen product); `dim`: keep only vectors of it
    (default: the most common length in the log)."""
    recs = list(records) if records is not None else read_records(root)
    if dim is None:
        lengths: dict[int, int] = {}
        for r in recs:
            v = r.get("vector")
            if isinstance(v, list):
                lengths[len(v)] = lengths.get(len(v), 0) + 1
        dim = max(lengths, key=lambda d: lengths[d]) if lengths else 1
    return feedback_pairs_from_records(recs, dim)
