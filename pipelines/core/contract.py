"""The typed, versioned contracts between stages (the JSON files and payloads one stage
writes and the next reads: pipelines/embed/summary.py, pipelines/index/manifest.py,
pipelines/orchestration/plan.py): one validation layer, pydantic's.

Each contract is a dataclass with `to_dict()` / `from_dict(d, source)` and a format string
`<name>/<version>` under the key "format". Its field annotations are what its JSON must
hold (the strict aliases below: no "3" for an int, no true for a number); `read` checks a
JSON object against them with pydantic and builds the dataclass, and refuses, with the
contract's error naming the field and the file (or payload), a missing or wrongly typed
field. `check_format` refuses a missing or unknown format. Keys a contract does not
declare (a newer writer's additions) go to its `extra` field, at every level. Writers
build the dataclasses directly (trusted, typed code: nothing is re-validated there).
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Annotated, Any, Mapping, TypeVar

from pydantic import BeforeValidator, Strict, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from pipelines.core.errors import BadArtifactError, CatalogSearchError

FORMAT_KEY = "format"
EXTRA = "extra"

_MISSING = object()
T = TypeVar("T")


def _null_is_empty(value: Any) -> Any:
    return {} if value is None else value


#: What a contract field may hold in its JSON form (an int is also a valid Float).
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]
#: A JSON object; null reads as {}.
Obj = Annotated[dict[str, Any], BeforeValidator(_null_is_empty)]


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


@functools.cache
def _adapter(cls: Any) -> TypeAdapter[Any]:
    return TypeAdapter(cls)


@functools.cache
def _nested(cls: type) -> dict[str, tuple[type, bool]]:
    """cls's fields that hold contract dataclasses: name -> (class, a list of them)."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        if dataclasses.is_dataclass(hint):
            out[name] = (typing.cast(type, hint), False)
        elif typing.get_origin(hint) is list and args and dataclasses.is_dataclass(args[0]):
            out[name] = (typing.cast(type, args[0]), True)
    return out


def _with_extra(cls: type, d: Any) -> Any:
    """`d` with the keys `cls` does not declare moved to its `extra` (when it has one)."""
    if not isinstance(d, Mapping):
        return d
    known = {f.name for f in dataclasses.fields(cls)} - {EXTRA}
    out = {k: v for k, v in d.items() if k in known}
    if EXTRA in {f.name for f in dataclasses.fields(cls)}:
        out[EXTRA] = {k: v for k, v in d.items() if k not in known and k != FORMAT_KEY}
    for name, (sub, many) in _nested(cls).items():
        if name in out:
            value = out[name]
            out[name] = ([_with_extra(sub, v) for v in value] if many and isinstance(value, list)
                         else value if many else _with_extra(sub, value))
    return out


_WORDS = {"int_type": "int", "float_type": "float", "string_type": "str",
          "bool_type": "bool", "dict_type": "dict", "list_type": "list",
          "tuple_type": "list", "dataclass_type": "an object"}


def _refusal(err: ErrorDetails, source: str, error: type[CatalogSearchError]) -> Exception:
    """One pydantic error as the contract's error: source + path to the object, the field."""
    parts = list(err["loc"])
    where = source
    for i, part in enumerate(parts[:-1]):
        if isinstance(part, str) and isinstance(parts[i + 1], int):
            where += f" {part}[{parts[i + 1]}]"
    name = parts[-1] if parts and isinstance(parts[-1], str) else None
    kind = err["type"]
    if kind == "missing":
        message = "required field is missing"
    elif kind in _WORDS:
        message = f"expected {_WORDS[kind]}, got {err['input']!r:.80}"
    elif kind == "literal_error":
        expected = (err.get("ctx") or {}).get("expected")
        message = f"must be one of {expected}, got {err['input']!r:.80}"
    else:
        message = err["msg"]
    return error(message, where, name)


def read(cls: type[T], d: Any, source: str,
         error: type[CatalogSearchError] = ContractError) -> T:
    """`d` (a JSON object) as a `cls`, checked against its field annotations; `error`
    naming the first wrong field and `source` (with the path to a nested object) if not."""
    try:
        adapter = _adapter(typing.cast(Any, cls))
        return typing.cast(T, adapter.validate_python(_with_extra(cls, d)))
    except ValidationError as e:
        raise _refusal(e.errors()[0], source, error) from None
