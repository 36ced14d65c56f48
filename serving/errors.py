"""The errors of the search layer (serving.searcher and what it calls); the HTTP layer maps
them to statuses (serving/api/errors.py)."""
from __future__ import annotations

from pipelines.core.errors import BadInputError, UnavailableError


class QueryError(BadInputError):
    """A query cannot be answered as asked; `reason` is a short machine-readable cause.

    Reasons: bad_k, bad_filter, bad_vector, bad_text, bad_text_weight, bad_query,
    unknown_product, unknown_image, too_large, no_model, text_unavailable, and the decode
    reasons of pipelines.model.image_decode.DecodeError (not_an_image, empty, truncated,
    corrupt, too_many_pixels).
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class IndexLoadError(UnavailableError):
    """An index version cannot be loaded or fails verification."""


class NotReadyError(UnavailableError):
    """No index version is loaded yet."""
