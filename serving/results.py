"""What a query answers: `SearchResults` over the one hit type
(pipelines.index.sharded_search.Hit)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipelines.index.sharded_search import Hit


def cap_metadata(value: Any, max_chars: int) -> tuple[Any, bool]:
    """`value` with every text longer than `max_chars` cut to it (ending in "…"), and
    whether anything was cut; nested dicts and lists too."""
    if isinstance(value, str):
        return (value, False) if len(value) <= max_chars else (value[:max_chars] + "…", True)
    if isinstance(value, dict):
        out, cut = {}, False
        for key, item in value.items():
            out[key], c = cap_metadata(item, max_chars)
            cut = cut or c
        return (out, True) if cut else (value, False)
    if isinstance(value, list):
        pairs = [cap_metadata(item, max_chars) for item in value]
        return ([v for v, _ in pairs], True) if any(c for _, c in pairs) else (value, False)
    return value, False


def capped_hits(hits: list[Hit], max_chars: int) -> list[Hit]:
    """Hits whose metadata texts are at most `max_chars` long (serving.max_metadata_chars):
    an index built before embed.max_cell_bytes, or with a large cap, cannot make every
    answer megabytes."""
    out = []
    for hit in hits:
        metadata, cut = cap_metadata(hit.metadata, max_chars)
        out.append(dataclasses.replace(hit, metadata=metadata) if cut else hit)
    return out


def hit_to_dict(hit: Hit) -> dict[str, Any]:
    """The public fields of a hit (rows, shards and views stay internal); the fused score's
    parts only for image + text queries."""
    out: dict[str, Any] = {"product_id": hit.product_id, "image_id": hit.image_id,
                           "score": hit.score, "metadata": hit.metadata,
                           "image_uri": hit.image_uri}
    if hit.visual_score is not None:
        out["visual_score"] = hit.visual_score
    if hit.text_score is not None:
        out["text_score"] = hit.text_score
    return out


@dataclass(frozen=True)
class SearchResults:
    """The answer to one query."""
    version: str
    k: int
    collapsed: bool
    hits: list[Hit]
    timings_ms: dict[str, float] = field(default_factory=dict)
    crowding: dict[str, Any] | None = None  # {"group_by", "max_per_group"} when asked for
    # Photo / vector queries: the query vector in model space (L2-normed, before the
    # version's adapter) and what made it, kept for POST /v1/feedback; never answered.
    model_vector: Any = field(default=None, repr=False, compare=False)
    model_id: str | None = field(default=None, repr=False, compare=False)
    adapter_id: str | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = {"version": self.version, "k": self.k, "collapsed": self.collapsed,
               "results": [hit_to_dict(h) for h in self.hits], "timings_ms": self.timings_ms}
        if self.crowding is not None:
            out.update(self.crowding)
        return out
