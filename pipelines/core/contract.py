"""Helpers for the typed, versioned contracts between stages (the JSON files and payloads
one stage writes and the next reads: pipelines/embed/summary.py, pipelines/index/manifest.py,
pipelines/orchestration/plan.py).

Each contract is a dataclass with `to_dict()` / `from_dict(d, source)` and a format string
`<name>/<version>` under the key "format". `from_dict` refuses, with a `ContractError`
naming the field and the file (or payload), a missing or unknown format and a missing or
wrongly typed required field.
"""
from __future__ import annotations

from typing import Any, Mapping
from pipelines.core.errors import BadArtifactError, CatalogSearchError

FORMAT_KEY = "format"

_MISSING = object()


class ContractError(BadArtifactError):
    """A contract file or payload does not follow its format: names the field and the source.
    Each contract raises its own subclass of its stage's error (`error=`), e.g.
    SummaryError, ManifestFormatError, PlanFormatError."""


def check_format(d: Any, expected: str, source: str, legacy: bool = False,
                 error: type[CatalogSearchError] = ContractError) -> None:
    """`d` must be an object whose "format" is `expected`; with `legacy`, an object without
    the key is accepted as the first version (files written before the key existed)."""
    if not isinstance(d, Mapping):
        raise error(f"expected a JSON object of format {expected}, got {type(d).__name__}",
                    source)
    found = d.get(FORMAT_KEY, _MISSING)
    if found is _MISSING:
        if legacy:
            return
        raise error(f"missing; expected {expected!r}", source, FORMAT_KEY)
    if found != expected:
        raise error(f"unknown format {found!r}; this code reads {expected!r}", source,
                    FORMAT_KEY)


def field(d: Mapping[str, Any], name: str, kind: type | tuple[type, ...], source: str,
          default: Any = _MISSING, error: type[CatalogSearchError] = ContractError,
          nullable: bool = False) -> Any:
    """d[name], checked to be of `kind` (bool is never an int here); `default` when absent
    (no default: a missing field is an error)."""
    if name not in d:
        if default is _MISSING:
            raise error("required field is missing", source, name)
        return default
    value = d[name]
    if value is None and nullable:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds)
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise error(f"expected {names}, got {value!r:.80}", source, name)
    return value
