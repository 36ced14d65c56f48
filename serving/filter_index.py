"""Filtered visual search that stays fast for rare values and complete for every value.

A metadata filter (`{"category": "dairy"}`) that only post-filtered over-fetched
neighbours would need many rounds for a value holding 0.1% of the catalog, and an
approximate search could return fewer than k hits although k exist. So:

- `FilterIndex` (built once per loaded version, from the row table's metadata) holds,
  per metadata key, the sorted global rows of each value (`rows(key, value)`; its
  length is the value's count). Keys with more than MAX_DISTINCT_VALUES values, or with
  values longer than MAX_VALUE_CHARS (titles, descriptions), are not indexed: filters on
  them post-filter over-fetched neighbours. `product_id` / `image_id` filters use the index's own
  product and image row lists.
- `matching_rows(idx, filters)`: the rows that can pass the filters (the intersection
  over the indexed keys of the union of each key's accepted values; None when no key
  is indexed). Hits are still checked against every filter, so a superset is safe.
- `collect_hits` (serving/query.py) then searches exactly over those rows when there
  are at most EXACT_MAX_ROWS of them (`exact_ranking`: the filter's own rows scored
  with the stored float32 vectors, every one of them ranked: exactly the top-k of the
  filter's rows), else over-fetches from the approximate index by 1 / selectivity and,
  when that still leaves fewer than k hits, finishes with the exact ranking: k hits
  whenever k exist.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from pipelines.index.sharded_search import parse_metadata

#: Filter rows up to this many are searched exactly (scored from the stored vectors).
EXACT_MAX_ROWS = 8192
#: A key with more distinct values than this is not indexed (post-filtered instead).
MAX_DISTINCT_VALUES = 50_000
#: A key with a value longer than this is not indexed (free text, not a category).
MAX_VALUE_CHARS = 200
#: Stored vectors scored per block by `exact_ranking` (bounds its memory).
_BLOCK_ROWS = 32768


def filter_text(v: Any) -> str:
    """A metadata value as the text filters compare (serving.filters' rule)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


class FilterIndex:
    """Per metadata key, the sorted rows of each value (see the module docstring)."""

    def __init__(self, values: dict[str, dict[str, np.ndarray]], skipped: set[str],
                 num_rows: int):
        self._values = values
        self.skipped = frozenset(skipped)     # keys seen but not indexed
        self.num_rows = num_rows

    @classmethod
    def build(cls, metadata: Sequence[str | None]) -> "FilterIndex":
        """From a row table's metadata column (JSON object text per row)."""
        lists: dict[str, dict[str, list[int]]] = {}
        skipped: set[str] = set()
        for row, text in enumerate(metadata):
            if not text:
                continue
            for key, value in parse_metadata(text).items():
                if key in skipped:
                    continue
                t = filter_text(value) if value is not None else None
                if t is None:
                    continue
                per = lists.setdefault(key, {})
                if len(t) > MAX_VALUE_CHARS or (t not in per
                                                and len(per) >= MAX_DISTINCT_VALUES):
                    skipped.add(key)
                    del lists[key]
                    continue
                per.setdefault(t, []).append(row)
        values = {key: {v: np.asarray(rows, np.int64) for v, rows in per.items()}
                  for key, per in lists.items()}
        return cls(values, skipped, len(metadata))

    def indexed(self, key: str) -> bool:
        return key in self._values

    def rows(self, key: str, value: str) -> np.ndarray:
        """Sorted rows whose metadata `key` has the (filter text) `value`."""
        return self._values.get(key, {}).get(value, _NO_ROWS)

    def count(self, key: str, value: str) -> int:
        return len(self.rows(key, value))

    def counts(self, key: str) -> dict[str, int]:
        """Every value of an indexed key with its row count."""
        return {v: len(r) for v, r in self._values.get(key, {}).items()}


_NO_ROWS = np.zeros(0, np.int64)


def _union(parts: Iterable[np.ndarray]) -> np.ndarray:
    parts = [p for p in parts if len(p)]
    if not parts:
        return _NO_ROWS
    if len(parts) == 1:
        return parts[0]
    return np.unique(np.concatenate(parts))


def matching_rows(idx: Any, filters: Mapping[str, frozenset[str]]) -> np.ndarray | None:
    """Sorted rows that can pass `filters` on `idx` (a LoadedIndex), or None when none of
    the filter's keys is indexed (then only post-filtering can answer)."""
    fi: FilterIndex | None = getattr(idx, "filter_index", None)
    found: np.ndarray | None = None
    for key, accepted in filters.items():
        if key == "product_id":
            rows = _union(np.asarray(sorted(idx.product_rows(v)), np.int64) for v in accepted)
        elif key == "image_id":
            rows = _union(np.asarray(sorted(idx.image_rows(v)), np.int64) for v in accepted)
        elif fi is not None and fi.indexed(key):
            rows = _union(fi.rows(key, v) for v in accepted)
        else:
            continue
        found = rows if found is None else np.intersect1d(found, rows, assume_unique=True)
        if not len(found):
            break
    return found


def exact_ranking(idx: Any, vector: np.ndarray, rows: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Every one of `rows` scored exactly against `vector` (stored float32 vectors, read
    through `idx.vectors_of`), best first, ties by the lower row: (scores, rows)."""
    rows = np.asarray(rows, np.int64)
    scores = np.empty(len(rows), np.float32)
    for start in range(0, len(rows), _BLOCK_ROWS):
        block = rows[start:start + _BLOCK_ROWS]
        scores[start:start + len(block)] = idx.vectors_of(block) @ vector
    order = np.lexsort((rows, -scores))
    return scores[order], rows[order]


class OverlayFilterIndex(FilterIndex):
    """A version's FilterIndex with some of its rows masked (deleted, replaced, taken down)
    and extra rows appended (delta rows `first_row`.., their metadata): what
    serving.delta_index serves."""

    def __init__(self, base: FilterIndex, masked: np.ndarray, first_row: int,
                 extra_metadata: Sequence[str | None]):
        self.base = base
        self._masked = masked                  # bool per row of the whole row space
        self._extra = FilterIndex.build(extra_metadata)
        self._first = first_row
        super().__init__({}, set(base.skipped | self._extra.skipped), len(masked))

    def indexed(self, key: str) -> bool:
        return key not in self.skipped and (self.base.indexed(key) or self._extra.indexed(key))

    def rows(self, key: str, value: str) -> np.ndarray:
        rows = np.concatenate([self.base.rows(key, value),
                               self._extra.rows(key, value) + self._first])
        return rows[~self._masked[rows]] if len(rows) else rows

    def count(self, key: str, value: str) -> int:
        return len(self.rows(key, value))

    def counts(self, key: str) -> dict[str, int]:
        values = set(self.base.counts(key)) | set(self._extra.counts(key))
        return {v: self.count(key, v) for v in values}
