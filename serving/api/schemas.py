"""The request and response models of the HTTP API (pydantic): FastAPI builds the OpenAPI
schema from them, and every search request's values (photo / vector search, text search,
"more like this") are validated with them, here only.

A value is read from its wire form (a form field or query string is text; JSON has
numbers) and then held to the query's own rule (serving.query: check_k, check_weight,
the same rule the Python API applies). A bad value fails validation with its reason as
the error type (PydanticCustomError), which the error handler answers as
`{"error": {"reason": ..., "message": ...}}` (serving.api.errors).
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Callable, Literal, NoReturn
from urllib.parse import quote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, WithJsonSchema, field_validator
from pydantic_core import PydanticCustomError

from serving.api.errors import REASON_BY_FIELD, ApiError
from serving.api.parsing import check_json_depth
from serving.errors import QueryError
from serving.query import check_k, check_weight
from serving.results import SearchResults

# Largest integer accepted in a vector (beyond it float32 overflows).
_MAX_VECTOR_INT = 2 ** 128


def _refuse(reason: str, message: str) -> NoReturn:
    raise PydanticCustomError(reason, "{message}", {"message": message})


def _rule(check: Callable[..., Any], *args: Any) -> Any:
    """A rule of serving.query; its QueryError becomes a validation error of that reason."""
    try:
        return check(*args)
    except QueryError as e:
        _refuse(e.reason, str(e))


def _absent(raw: Any) -> bool:
    return raw is None or raw == ""  # a form's empty field is "not given"


def _integer(raw: Any, name: str) -> int | None:
    """An integer from JSON (3.0 is one, as in JSON Schema) or from text."""
    if _absent(raw):
        return None
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if not isinstance(raw, (bool, float)):
        try:
            return int(str(raw).strip())
        except ValueError:
            pass
    _refuse(f"bad_{name}", f"{name} must be an integer, got {str(raw)[:40]!r}"
            if isinstance(raw, str) else f"{name} must be an integer, got {raw!r}")


# --------------------------------------------------------------------------- requests

class SearchOptions(BaseModel):
    """What every search request may carry besides the photo or vector."""
    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, description="query words: fused with the photo or vector, "
                                               "or searched alone (BM25 over product text)")
    text_weight: float | None = Field(
        None, description="weight of the text score, 0..1 (default fusion.text_weight)",
        json_schema_extra={"minimum": 0, "maximum": 1})
    k: int | None = Field(None, description="results wanted (default serving.default_k, "
                                            "at most serving.max_k)",
                          json_schema_extra={"minimum": 1})
    filters: dict[str, Any] | None = Field(
        None, description='metadata filter: key -> value or list of accepted values, e.g. '
                          '{"category": "dairy"} (a JSON object; a JSON string in forms)')
    collapse: bool = Field(True, description="best image per product (default) or images")
    group_by: str | None = Field(
        None, description="crowding: a metadata field (e.g. brand, seller; product_id = images "
                          "per product) whose values get at most max_per_group results")
    max_per_group: int | None = Field(
        None, description="crowding: results per group_by value (default 1; alone: images "
                          "per product)", json_schema_extra={"minimum": 1})

    @field_validator("k", mode="before")
    @classmethod
    def _k(cls, raw: Any, info: ValidationInfo) -> Any:
        k = _integer(raw, "k")
        config = (info.context or {}).get("config")
        if k is None or config is None:
            return k
        return _rule(check_k, k, config)  # 1 <= k <= serving.max_k

    @field_validator("filters", mode="before")
    @classmethod
    def _filters(cls, raw: Any, info: ValidationInfo) -> Any:
        if _absent(raw):
            return None
        context = info.context or {}
        if isinstance(raw, str):
            max_bytes = context.get("max_json_bytes", 1_000_000)
            if len(raw) > max_bytes:
                _refuse("too_large", f"filters is longer than {max_bytes} characters")
            try:
                check_json_depth(raw, context.get("max_json_depth", 8), "filters")
                raw = json.loads(raw)
            except ApiError as e:  # too_deep
                _refuse(e.reason, e.message)
            except (ValueError, RecursionError) as e:
                _refuse("bad_filter", f"filters must be a JSON object: {e}")
        if not isinstance(raw, dict):
            _refuse("bad_filter", "filters must be a JSON object of key -> value(s)")
        return raw

    @field_validator("collapse", mode="before")
    @classmethod
    def _collapse(cls, raw: Any) -> Any:
        if _absent(raw):
            return True
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        _refuse("bad_collapse", f"collapse must be true or false, got {raw!r}")

    @field_validator("group_by", mode="before")
    @classmethod
    def _group_by(cls, raw: Any) -> Any:
        """A metadata field name (whether the index has it is checked by the query)."""
        if _absent(raw):
            return None
        if not isinstance(raw, str):
            _refuse("bad_group_by", "group_by must be a metadata field name (a string)")
        return raw.strip()

    @field_validator("max_per_group", mode="before")
    @classmethod
    def _max_per_group(cls, raw: Any) -> Any:
        return _integer(raw, "max_per_group")  # its range: serving.crowding

    @field_validator("text", mode="before")
    @classmethod
    def _text(cls, raw: Any) -> Any:
        if raw is not None and not isinstance(raw, str):  # its length: serving.query
            _refuse("bad_text", "text must be a string")
        return raw

    @field_validator("text_weight", mode="before")
    @classmethod
    def _text_weight(cls, raw: Any) -> Any:
        """A number in [0, 1], refused even where it is not used (a text-only search), as
        the OpenAPI schema states."""
        if _absent(raw):
            return None
        if isinstance(raw, str):
            try:
                raw = float(raw.strip())
            except ValueError:
                _refuse("bad_text_weight", f"text_weight must be a number, got {raw[:40]!r}")
        elif isinstance(raw, bool) or not isinstance(raw, (int, float)):
            _refuse("bad_text_weight", f"text_weight must be a number, got {raw!r}")
        return _rule(check_weight, raw, 0.0)


class VectorSearchRequest(SearchOptions):
    """application/json: search by embedding, by text, or both."""

    # absent or a list: an explicit null is refused (bad_vector), so the schema says array
    vector: Annotated[list[float] | None, WithJsonSchema(
        {"type": "array", "items": {"type": "number"}, "title": "Vector"})] = Field(
        None, description="a query embedding in model space (the model's dimension; the "
                          "server normalises it and projects it through the index version's "
                          "adapter, if it has one); required unless 'text' is given")

    @field_validator("vector", mode="before")
    @classmethod
    def _vector(cls, raw: Any) -> Any:
        if not isinstance(raw, list) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in raw):
            raise PydanticCustomError("bad_vector", "vector must be a list of numbers")
        if any(isinstance(x, int) and not -_MAX_VECTOR_INT < x < _MAX_VECTOR_INT for x in raw):
            raise PydanticCustomError("bad_vector", "vector has a number too large for float32")
        return raw

    @field_validator("k", "filters", "collapse", "group_by", "max_per_group", "text",
                     "text_weight", mode="before")
    @classmethod
    def _not_empty(cls, raw: Any, info: ValidationInfo) -> Any:
        # A form's empty field means "not given"; JSON has no such convention, and the schema
        # says an empty string is not a value of these (schemathesis: {"group_by": ""}).
        if raw == "":
            name = str(info.field_name)
            raise PydanticCustomError(REASON_BY_FIELD.get(name, "bad_request"),
                                      "{name} must not be an empty string", {"name": name})
        return raw


class ImageSearchForm(SearchOptions):
    """multipart/form-data: search by photo (fused with 'text' if given) or by text alone."""
    model_config = ConfigDict(extra="ignore")

    image: bytes | None = Field(None, description="the query photo (JPEG, PNG, WebP, ...); "
                                                  "required unless 'text' is given")


# --------------------------------------------------------------------------- responses

class ErrorDetail(BaseModel):
    reason: str = Field(description="machine-readable cause, e.g. bad_k, not_an_image, busy")
    message: str


class ErrorResponse(BaseModel):
    """Every error answer (4xx, and 503 not_ready / busy)."""
    error: ErrorDetail


class HitOut(BaseModel):
    """One result: a catalog image (the best one of its product when collapsed)."""
    product_id: str
    image_id: str
    score: float = Field(description="cosine similarity, or the fused score with text")
    metadata: dict[str, Any]
    image_url: str = Field(description="the catalog's own http(s) URL, else /v1/images/{id}")
    visual_score: float | None = Field(None, description="image + text queries only")
    text_score: float | None = Field(None, description="image + text queries only")


class SearchResponse(BaseModel):
    version: str = Field(description="the index version that answered")
    k: int
    collapsed: bool
    group_by: str | None = Field(None, description="crowding field, when asked for")
    max_per_group: int | None = Field(None, description="crowding cap, when asked for")
    results: list[HitOut]
    timings_ms: dict[str, float]
    query_id: str | None = Field(
        None, description="photo / vector searches when feedback is on (serving."
                          "feedback_root): send it to POST /v1/feedback with the product "
                          "the shopper chose")

    @classmethod
    def from_results(cls, results: SearchResults,
                     query_id: str | None = None) -> "SearchResponse":
        crowding = results.crowding or {}
        return cls(version=results.version, k=results.k, collapsed=results.collapsed,
                   query_id=query_id,
                   group_by=crowding.get("group_by"),
                   max_per_group=crowding.get("max_per_group"),
                   timings_ms=results.timings_ms,
                   results=[HitOut(product_id=h.product_id, image_id=h.image_id, score=h.score,
                                   metadata=h.metadata,
                                   image_url=public_image_url(h.image_id, h.image_uri),
                                   visual_score=h.visual_score, text_score=h.text_score)
                            for h in results.hits])


class FeedbackRequest(BaseModel):
    """POST /v1/feedback: the product a shopper chose for a search answer."""
    model_config = ConfigDict(extra="forbid")

    query_id: str = Field(description="the search answer's query_id", min_length=1,
                          max_length=64)
    product_id: str = Field(description="the chosen product (of the serving index version)",
                            min_length=1, max_length=1000)


class FeedbackResponse(BaseModel):
    """What POST /v1/feedback recorded (the vector is logged, not answered)."""
    status: Literal["recorded"]
    query_id: str
    product_id: str
    version: str = Field(description="the index version that answered the search")


class ReloadResponse(BaseModel):
    """What POST /v1/reload did (status 409 when the version was refused)."""
    status: Literal["loaded", "unchanged", "refused", "deltas_applied"]
    version: str | None
    serving_version: str | None
    reason: str = ""
    seconds: float = 0.0


class DeleteIds(BaseModel):
    image_ids: list[str]
    product_ids: list[str]


class DeleteResponse(BaseModel):
    """What POST /v1/admin/delete did: durable before the answer, applied to serving."""
    version: str
    delta: int
    reason: str
    removed: DeleteIds
    not_found: DeleteIds
    already_taken_down: DeleteIds
    applied: ReloadResponse


class ReadyResponse(BaseModel):
    """The serving index version (503 with {"ready": false, "version": null} before one)."""
    ready: bool
    version: str | None
    num_vectors: int | None = None
    num_products: int | None = None
    dim: int | None = None
    shards: list[int] | None = None
    model_id: str | None = None
    adapter_id: str | None = None  # the version's adapter (index space = adapter(model space))
    fields: list[str] | None = Field(None, description="metadata fields (filters, group_by)")
    created_at: Any = None
    loaded_at: float | None = None
    deltas: dict[str, Any] | None = None  # serving.delta_index.DeltaIndex.delta_info
    saturated: str | None = None  # 503: why the service takes no more searches now


class HealthResponse(BaseModel):
    status: str


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` of a route: its error statuses documented with the error model."""
    what = {401: "admin token missing (when one is set)", 403: "admin token wrong",
            404: "unknown product or image", 409: "the version was refused (reason in the body)",
            413: "upload or body larger than its limit",
            415: "neither multipart/form-data nor application/json",
            422: "undecodable image, bad k, vector, filters, text, text_weight, group_by "
                 "(unknown field: the known ones are listed) or max_per_group",
            503: "no index version loaded yet, or every decode slot busy (Retry-After)"}
    return {s: {"model": ErrorResponse, "description": what[s]} for s in statuses}


def public_image_url(image_id: str, image_uri: str | None) -> str:
    """Where a client loads a result's image: the catalog's own http(s) URL, else our endpoint.

    The server never fetches a URL read from the catalog; an http(s) catalog image is
    loaded by the client from its host. Any other URI is served by /v1/images/{id}, with
    the id percent-encoded (every character but unreserved ones).
    """
    if image_uri and image_uri[:8].lower().startswith(("http://", "https://")):
        try:
            parts = urlsplit(image_uri)
        except ValueError:
            parts = None
        if parts is not None and parts.scheme.lower() in ("http", "https") and parts.hostname \
                and not any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in image_uri):
            return quote(image_uri, safe=":/?#[]@!$&'()*+,;=%~")
    return "/v1/images/" + quote(image_id, safe="")
