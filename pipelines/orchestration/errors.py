"""The orchestration's errors, by what a retry can do about them (see params.task_defaults)."""
from __future__ import annotations

from pipelines.core.errors import BadInputError, CatalogSearchError, UnavailableError


class OrchestrationError(BadInputError):
    """DAG params or the state of the roots do not allow the run (refused before Beam starts)."""


class StepError(UnavailableError):
    """A step subprocess failed unexpectedly (crash, lost worker, I/O error): worth a retry."""


class PermanentStepError(CatalogSearchError):
    """A step failed for a reason a retry cannot fix: bad input, a failed evaluation gate."""

    permanent = True

