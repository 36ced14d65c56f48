"""What a stage module exposes to the `catalog-search` CLI (see catalog_search/cli.py)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable
from pipelines.core.errors import BadInputError

if TYPE_CHECKING:
    from pipelines.core.config import Config


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, "Config"], int]


class UsageError(BadInputError):
    """Bad command-line arguments: printed with the command name, exit code 2."""


def check_uri_arg(what: str, uri: str | None) -> str:
    """A URI command-line argument (`what`, e.g. "--index-root"), normalised; UsageError
    when it is empty or no Beam filesystem serves its scheme (naming the pip extra)."""
    from pipelines.core import filesystem as fs
    if not uri or not uri.strip():
        raise UsageError(f"{what} must not be empty")
    try:
        return fs.check_supported(uri, what)
    except fs.UnsupportedUriError as e:
        raise UsageError(str(e)) from e


def check_name_arg(what: str, value: str | None) -> str | None:
    """A run id / version name argument (`what`, e.g. "--run-id") when it is None or a safe
    single path segment (pipelines.core.names); else UsageError."""
    from pipelines.core.names import InvalidNameError, check_segment
    if value is None:
        return None
    try:
        return check_segment(value, what)
    except InvalidNameError as e:
        raise UsageError(str(e)) from e
