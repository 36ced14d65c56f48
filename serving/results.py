"""What a query answers: `SearchResults` over the one hit type
(pipelines.index.sharded_search.Hit)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipelines.index.sharded_search import Hit


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

    def to_dict(self) -> dict[str, Any]:
        out = {"version": self.version, "k": self.k, "collapsed": self.collapsed,
               "results": [hit_to_dict(h) for h in self.hits], "timings_ms": self.timings_ms}
        if self.crowding is not None:
            out.update(self.crowding)
        return out
