"""Metadata filters of a query: `{"category": "dairy"}` (a value or a list of accepted
values; `product_id` and `image_id` are filterable too) checked against the index's keys."""
from __future__ import annotations

import reprlib
from typing import Any, Iterable, Mapping

from pipelines.index.sharded_search import Hit
from serving.errors import QueryError

MAX_FILTER_KEYS = 16
MAX_FILTER_VALUES = 100


def validate_filters(filters: Any, known_keys: Iterable[str] | None = None
                     ) -> dict[str, frozenset[str]]:
    """{"key": value | [values]} -> {"key": accepted values as strings}; QueryError if bad."""
    if filters is None:
        return {}
    if not isinstance(filters, Mapping):
        raise QueryError("bad_filter", f"filters must be an object of key -> value(s), "
                                       f"got {type(filters).__name__}")
    if len(filters) > MAX_FILTER_KEYS:
        raise QueryError("bad_filter", f"at most {MAX_FILTER_KEYS} filter keys")
    known = set(known_keys) if known_keys is not None else None
    out: dict[str, frozenset[str]] = {}
    for key, value in filters.items():
        if not isinstance(key, str) or not key:
            raise QueryError("bad_filter", f"filter key {reprlib.repr(key)} must be a non-empty "
                                           f"string")
        if known is not None and key not in known:
            raise QueryError("bad_filter", f"filter key {reprlib.repr(key)} is not a metadata "
                                           f"field of this index; known: "
                                           f"{', '.join(sorted(known))}")
        values = value if isinstance(value, list) else [value]
        if not values or len(values) > MAX_FILTER_VALUES:
            raise QueryError("bad_filter", f"filter {reprlib.repr(key)} needs 1 to "
                                           f"{MAX_FILTER_VALUES} values")
        for v in values:
            if isinstance(v, (dict, list)) or v is None:
                raise QueryError("bad_filter", f"filter {reprlib.repr(key)}: values must be "
                                               f"strings, numbers or booleans, got "
                                               f"{reprlib.repr(v)}")
        out[key] = frozenset(_filter_text(v) for v in values)
    return out


def _filter_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def matches(hit_fields: Mapping[str, Any], filters: Mapping[str, frozenset[str]]) -> bool:
    for key, accepted in filters.items():
        value = hit_fields.get(key)
        if value is None or _filter_text(value) not in accepted:
            return False
    return True



def hit_matches(hit: Hit, filters: Mapping[str, frozenset[str]]) -> bool:
    """Whether a hit's metadata, product id and image id pass the (validated) filters."""
    return matches({**hit.metadata, "product_id": hit.product_id, "image_id": hit.image_id},
                   filters)
