"""POST /v1/search: by photo (multipart/form-data), by vector (application/json), by text
alone (either), or photo/vector + text fused. The request body is read under its byte
limit and parsed here (two media types on one path); FastAPI documents both from the
pydantic models (serving.api.schemas)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from serving.api.errors import REASON_BY_FIELD, ApiError, validated
from serving.api.parsing import parse_json_body, read_body_limited
from serving.api.schemas import (ImageSearchForm, SearchResponse, VectorSearchRequest,
                                 error_responses)
from serving.api.state import ServingState, State, run_search

router = APIRouter(tags=["search"])

# Multipart framing and form fields on top of the image itself.
MULTIPART_OVERHEAD = 64 * 1024
_FORM_OPTIONS = ("k", "filters", "collapse", "text", "text_weight", "group_by",
                 "max_per_group")
_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": ImageSearchForm.model_json_schema()},
    "application/json": {"schema": VectorSearchRequest.model_json_schema()}}}}


@router.post("/v1/search", summary="Search by photo (multipart) or by vector (JSON), "
                                   "with or instead of text",
             response_model=SearchResponse, response_model_exclude_none=True,
             openapi_extra=_BODY, responses=error_responses(413, 415, 422, 503))
async def search(request: Request,
                 state: State) -> SearchResponse:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _search_form(request, state)
    if content_type == "application/json":
        return await _search_json(request, state)
    raise ApiError(415, "unsupported_media_type",
                   "send multipart/form-data with an 'image' file, or application/json "
                   "with a 'vector'")


async def _search_form(request: Request, state: ServingState) -> SearchResponse:
    searcher, max_upload = state.searcher, state.config.serving.max_upload_bytes
    await read_body_limited(request, max_upload + MULTIPART_OVERHEAD)
    try:
        form = await request.form(max_files=1, max_fields=16, max_part_size=max_upload + 1)
    except Exception as e:  # MultiPartException and malformed bodies
        raise ApiError(422, "bad_multipart", f"cannot parse the form: {e}") from None
    for name in (*_FORM_OPTIONS, "image"):  # the schema gives each one value
        if len(form.getlist(name)) > 1:
            raise ApiError(422, REASON_BY_FIELD.get(name, "bad_multipart"),
                           f"form field {name!r} is sent {len(form.getlist(name))} times; "
                           f"send it once")
    given = {name: form.get(name) for name in _FORM_OPTIONS if form.get(name) is not None}
    options = validated(ImageSearchForm, given, state.json_context())
    upload = form.get("image")
    if upload is None and options.text is not None:  # text-only query
        return state.answer(await run_search(
            searcher.search_text, options.text, options.k, options.filters, options.collapse,
            options.group_by, options.max_per_group))
    if not isinstance(upload, UploadFile):
        raise ApiError(422, "missing_image", "multipart field 'image' (a file) is required "
                                             "(or 'text' alone)")
    data = await upload.read()
    if len(data) > max_upload:
        raise ApiError(413, "too_large", f"image is {len(data)} bytes; the limit is "
                                         f"{max_upload}")
    async with state.gate.slot():  # bounds the memory of concurrent decodes + embeds
        results = await run_search(searcher.search_image, data, options.k, options.filters,
                                   options.collapse, options.text, options.text_weight,
                                   options.group_by, options.max_per_group)
    return state.answer(results)


def _vector_request(body: bytes, state: ServingState) -> tuple[VectorSearchRequest, bool]:
    """The JSON body as a VectorSearchRequest, and whether it carries a vector."""
    payload = parse_json_body(body, state.config.serving.max_json_depth)
    if not isinstance(payload, dict) or not ("vector" in payload or "text" in payload):
        raise ApiError(422, "bad_vector", 'JSON body must be an object with "vector" and/or '
                                          '"text"')
    return validated(VectorSearchRequest, payload, state.json_context()), "vector" in payload


async def _search_json(request: Request, state: ServingState) -> SearchResponse:
    searcher = state.searcher
    body = await read_body_limited(request, state.config.serving.max_json_bytes)
    query, has_vector = await run_in_threadpool(_vector_request, body, state)
    if not has_vector:  # text-only query
        if query.text is None:
            raise ApiError(422, "bad_text", '"text" must be a non-empty string')
        return state.answer(await run_search(
            searcher.search_text, query.text, query.k, query.filters, query.collapse,
            query.group_by, query.max_per_group))
    if query.vector is None:
        raise ApiError(422, "bad_vector", "vector must be a list of numbers")
    return state.answer(await run_search(
        searcher.search_vector, query.vector, query.k, query.filters, query.collapse,
        query.text, query.text_weight, query.group_by, query.max_per_group))
