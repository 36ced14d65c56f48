"""Crowding: at most `max_per_group` results per value of one metadata field.

`group_by` names any metadata field of the index (`seller`, `brand`, `category`, ...) or
`product_id` / `image_id`. The default product collapse is crowding by `product_id` with a cap
of 1; `group_by="product_id", max_per_group=3` lists up to three images per product
instead. For any other field the product collapse still applies (one image per product
unless `collapse` is off) and the cap counts the products (or images) per field value.

The cap is applied where hits are collapsed (serving.query.collect_hits for visual
queries, serving.fusion for text and fused ones), walking the ranking best first: a hit
whose group is full is skipped and the walk goes on, so the answer is the top-k of the
ranking that respects the cap (the search asks the index for more neighbours until k
such hits are found or the whole index was asked). A hit without a value for the field
is its own group (never crowded out).
"""
from __future__ import annotations

import json
import reprlib
from dataclasses import dataclass
from typing import Any, Iterable

from pipelines.index.sharded_search import Hit
from serving.errors import QueryError


@dataclass(frozen=True)
class Crowding:
    """A validated crowding request: at most `max_per_group` hits per `group_by` value."""
    group_by: str
    max_per_group: int

    @property
    def replaces_collapse(self) -> bool:
        """Crowding by product_id is the collapse itself (with a cap other than 1)."""
        return self.group_by == "product_id"

    def counter(self) -> "CrowdCounter":
        return CrowdCounter(self)

    def to_dict(self) -> dict[str, Any]:
        return {"group_by": self.group_by, "max_per_group": self.max_per_group}


def check_crowding(group_by: Any, max_per_group: Any, known_fields: Iterable[str],
                   max_k: int) -> Crowding | None:
    """None (no crowding) or a `Crowding`; QueryError (bad_group_by / bad_max_per_group).

    `max_per_group` alone groups by product_id; `group_by` alone caps at 1 per group.
    """
    if group_by is None and max_per_group is None:
        return None
    if max_per_group is None:
        cap = 1
    elif isinstance(max_per_group, bool) or not isinstance(max_per_group, int):
        raise QueryError("bad_max_per_group", f"max_per_group must be an integer, got "
                                              f"{reprlib.repr(max_per_group)}")
    elif not 1 <= max_per_group <= max_k:
        raise QueryError("bad_max_per_group", f"max_per_group must be between 1 and {max_k}, "
                                              f"got {max_per_group}")
    else:
        cap = int(max_per_group)
    field = "product_id" if group_by is None else group_by
    known = sorted(set(known_fields) | {"product_id", "image_id"})
    if not isinstance(field, str) or not field.strip():
        raise QueryError("bad_group_by", f"group_by must be a metadata field name; known: "
                                         f"{', '.join(known)}")
    if field not in known:
        raise QueryError("bad_group_by", f"group_by {reprlib.repr(field)} is not a metadata "
                                         f"field of this index; known: {', '.join(known)}")
    return Crowding(field, cap)


def group_value(hit: Hit, field: str) -> str | None:
    """The value `hit` is grouped by (None: the hit has no value for the field)."""
    if field == "product_id":
        return hit.product_id
    if field == "image_id":
        return hit.image_id
    value = hit.metadata.get(field)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


class CrowdCounter:
    """Counts admitted hits per group during one ranking walk."""

    def __init__(self, crowding: Crowding):
        self.crowding = crowding
        self._counts: dict[str, int] = {}

    def admit(self, hit: Hit) -> bool:
        """True (and counted) if the hit's group has room; False if it is full."""
        value = group_value(hit, self.crowding.group_by)
        if value is None:
            return True
        count = self._counts.get(value, 0)
        if count >= self.crowding.max_per_group:
            return False
        self._counts[value] = count + 1
        return True
