"""The one result type of the project (`Hit`) and the metadata parser its hits use.

Re-exported by pipelines.index.sharded_search, where callers import them from.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Hit:
    """One neighbour of a query, mapped back to the catalog.

    The one result type of the project: ShardedSearcher.hits returns it, and serving
    answers with it (collapsed to the best image per product, filtered, or fused with the
    text score: then `score` is the fused score and `visual_score` / `text_score` its parts).
    """
    row: int
    shard: int
    score: float
    image_id: str
    product_id: str
    view: str
    image_uri: str | None
    metadata: dict[str, Any]
    visual_score: float | None = None
    text_score: float | None = None


# `new_hit(Hit)` then setting the fields skips Hit's __init__: the hot path of every query.
new_hit = object.__new__


def parse_metadata(text: str | None) -> dict[str, Any]:
    """A row's metadata column (JSON object text) as a dict; {} when empty or not an object.

    The one metadata parser: search hits, serving's filters and its text index use it.
    """
    if not text:
        return {}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}
