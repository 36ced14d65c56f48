"""Validation of user-supplied path segments: run ids, index version names, backfill ids.

Every name that becomes one folder or object-name segment under a root (a snapshot
`<embeddings_root>/<run_id>/`, an index version `<index_root>/versions/<version>/`, the
value written to a LATEST pointer) goes through `check_segment` before anything is
deleted or written, so no value can name the root itself (`.`), its parent (`..`), a
nested path (`a/b`) or an absolute path.
"""
from __future__ import annotations

import re
from pipelines.core.errors import BadInputError

MAX_SEGMENT_LENGTH = 128
#: A letter or digit first, then letters, digits, '.', '_' and '-'; at most 128 characters.
SEGMENT_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_SEGMENT_RE = re.compile(SEGMENT_PATTERN)


class InvalidNameError(BadInputError):
    """A user-supplied name cannot be used as a single, safe path segment."""


def check_segment(value: object, what: str = "name") -> str:
    """`value` itself when it is a safe path segment, else InvalidNameError naming `what`.

    Safe: 1-128 characters from [A-Za-z0-9._-], starting with a letter or digit, and not
    containing '..' (so never `.`, `..`, a path with '/', '\\' or a NUL, or whitespace).
    """
    if not isinstance(value, str):
        raise InvalidNameError(f"{what} must be a string, got {type(value).__name__}")
    shown = value if len(value) <= 80 else value[:77] + "..."
    if not value:
        raise InvalidNameError(f"{what} must not be empty")
    if len(value) > MAX_SEGMENT_LENGTH:
        raise InvalidNameError(f"{what} {shown!r} is {len(value)} characters long; at most "
                               f"{MAX_SEGMENT_LENGTH} are allowed")
    if not _SEGMENT_RE.fullmatch(value) or ".." in value:
        raise InvalidNameError(
            f"{what} {shown!r} is not a safe name: use letters, digits, '.', '_' and '-' "
            f"(starting with a letter or digit, no '..', at most {MAX_SEGMENT_LENGTH} "
            f"characters)")
    return value


def is_safe_segment(value: object) -> bool:
    """True when `check_segment` would accept `value`."""
    try:
        check_segment(value)
    except InvalidNameError:
        return False
    return True
