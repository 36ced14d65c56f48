"""What a stage module exposes to the `catalog-search` CLI (see catalog_search/cli.py)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from pipelines.core.config import Config


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, "Config"], int]


class UsageError(ValueError):
    """Bad command-line arguments: printed with the command name, exit code 2."""
