"""The project's errors: one base, four kinds (docs/ARCHITECTURE.md, "Errors").

Every error a user or an operator acts on is a `CatalogSearchError`, of one of four kinds:

- `BadInputError`: arguments, configuration, DAG params, manifests or a request are wrong;
  fix them and run again.
- `BadArtifactError`: a stored file (snapshot, index version, delta, adapter, model
  checkpoint, LATEST) is missing, damaged or of another format; repair or rebuild it.
- `UnavailableError`: something needed is busy, unreachable or not loaded yet; try later.
- `RefusedError`: the run worked and a quality gate refused its result; nothing was published.

`permanent` says whether a retry can help. A permanent error ends a DAG step subprocess
with exit code 3 (pipelines.orchestration.launcher), which fails the Airflow task without a
retry, as do the permanent kinds raised in the Airflow worker itself
(pipelines.orchestration.params.task_defaults); any other failure is retried. Bad input and
refusals are permanent; a damaged artifact is not, except where the class says so. Each kind keeps a builtin parent (ValueError / RuntimeError), so `except ValueError`
callers keep working.
"""
from __future__ import annotations

from typing import ClassVar


class CatalogSearchError(Exception):
    """Base of the project's errors. `source` (a file or payload) and `field`, when given,
    are named first: "SOURCE: field 'FIELD': message"."""

    #: A retry cannot fix it: exit 3 in a step subprocess, no Airflow retry.
    permanent: ClassVar[bool] = False

    def __init__(self, message: str = "", source: str | None = None,
                 field: str | None = None):
        where = f"{source}: " if source else ""
        what = f"field {field!r}: " if field else ""
        super().__init__(f"{where}{what}{message}")
        self.source = source
        self.field = field


class BadInputError(CatalogSearchError, ValueError):
    """Arguments, configuration, params, manifests or a request are wrong: fix them."""

    permanent = True


class BadArtifactError(CatalogSearchError, ValueError):
    """A stored artifact is missing, damaged or of another format: repair or rebuild it."""


class UnavailableError(CatalogSearchError, RuntimeError):
    """Something needed is busy, unreachable or not loaded yet: a retry may succeed."""


class RefusedError(CatalogSearchError, RuntimeError):
    """The run worked and a quality gate refused its result (nothing was published)."""

    permanent = True
