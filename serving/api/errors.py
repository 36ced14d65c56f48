"""Error answers: every error is JSON `{"error": {"reason": ..., "message": ...}}` with an
`x-error-reason` header (counted by the metrics), never a 5xx for bad input."""
from __future__ import annotations

from typing import Any, Sequence, TypeVar

from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from serving.errors import NotReadyError, QueryError

M = TypeVar("M", bound=BaseModel)

# Statuses of the reasons that are not 422.
STATUS_BY_REASON = {"too_large": 413, "unknown_product": 404, "unknown_image": 404}
# A request field -> the reason its malformed value is answered with.
REASON_BY_FIELD = {"k": "bad_k", "filters": "bad_filter", "collapse": "bad_collapse",
                   "text": "bad_text", "text_weight": "bad_text_weight",
                   "vector": "bad_vector", "group_by": "bad_group_by",
                   "max_per_group": "bad_max_per_group"}
# The order fields are checked in: the first bad one names the reason.
_FIELD_ORDER = ("k", "filters", "collapse", "group_by", "max_per_group", "text", "text_weight",
                "vector")


class ApiError(Exception):
    """An HTTP error answer: status, machine-readable reason, human message, extra headers."""

    def __init__(self, status: int, reason: str, message: str,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message
        self.headers = headers or {}


def error_response(status: int, reason: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    response = JSONResponse({"error": {"reason": reason, "message": message}},
                            status_code=status)
    response.headers["x-error-reason"] = reason
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def api_error(e: Exception) -> ApiError:
    """The HTTP answer to an error of the search layer (re-raises anything else)."""
    if isinstance(e, QueryError):
        return ApiError(STATUS_BY_REASON.get(e.reason, 422), e.reason, str(e))
    if isinstance(e, NotReadyError):
        return ApiError(503, "not_ready", str(e))
    raise e


def _field(err: Any) -> str:
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
    return loc[0] if loc else ""


def validation_api_error(errors: Sequence[Any]) -> ApiError:
    """pydantic / FastAPI validation errors -> one ApiError (the first bad field's reason).

    Our validators raise PydanticCustomError with the reason as its type (serving.api.
    schemas); other errors take the reason of their field (REASON_BY_FIELD); unknown
    fields are `bad_request`.
    """
    errors = list(errors)
    unknown = sorted(_field(e) for e in errors if e.get("type") == "extra_forbidden")
    if unknown:
        return ApiError(422, "bad_request", f"unknown fields: {', '.join(unknown)}")
    if not errors:
        return ApiError(422, "bad_request", "invalid request")
    order = {name: i for i, name in enumerate(_FIELD_ORDER)}
    first = min(errors, key=lambda e: order.get(_field(e), len(order)))
    kind = str(first.get("type", ""))
    if kind.startswith("bad_") or kind in ("too_deep", "too_large"):
        reason = kind
    elif {_field(e) for e in errors} == {_field(first)}:
        reason = REASON_BY_FIELD.get(_field(first), "bad_request")
    else:
        reason = "bad_request"
    message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}"
                        for e in errors)
    return ApiError(STATUS_BY_REASON.get(reason, 422), reason, message or "invalid request")


def validated(model: type[M], data: Any, context: dict[str, Any] | None = None) -> M:
    """`data` validated as `model`; ApiError (the first bad field's reason) if it is not."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as e:
        raise validation_api_error(e.errors()) from None


def install_error_handlers(app: FastAPI) -> None:
    """ApiError and FastAPI's request validation answer in the one error shape."""

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.reason, e.message, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        """Starlette's own answers (an unmatched route, a wrong method) in the one shape."""
        reason = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code,
                                                                  f"http_{e.status_code}")
        message = {404: f"no such endpoint: {request.method} {request.url.path[:200]!r}",
                   405: f"{request.method} is not allowed on this endpoint"}.get(
            e.status_code, str(e.detail))
        return error_response(e.status_code, reason, message, dict(e.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def on_request_validation(request: Request, e: RequestValidationError
                                    ) -> JSONResponse:
        err = validation_api_error(e.errors())
        return error_response(err.status, err.reason, err.message)
