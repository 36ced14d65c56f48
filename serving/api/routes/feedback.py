"""POST /v1/feedback: the product a shopper chose for a search answer (its query_id), appended
with the query's model-space vector to the feedback log (serving.feedback); 404
feedback_off when serving.feedback_root is not set."""
from __future__ import annotations

import json
import logging

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from serving.api.errors import ApiError, api_error, validated
from serving.api.parsing import parse_json_body, read_body_limited
from serving.api.schemas import ErrorResponse, FeedbackRequest, FeedbackResponse
from serving.api.state import State
from serving.errors import NotReadyError

log = logging.getLogger(__name__)

router = APIRouter(tags=["feedback"])


def _error(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


@router.post("/v1/feedback", summary="Record the product a shopper chose for a search",
             response_model=FeedbackResponse, status_code=202,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": FeedbackRequest.model_json_schema()}}}},
             responses={404: _error("feedback is off (serving.feedback_root), or the "
                                    "query_id is unknown or expired"),
                        413: _error("body larger than serving.max_json_bytes"),
                        422: _error("malformed body, or a product not in the serving "
                                    "index version"),
                        503: _error("no index loaded, or the feedback log cannot be "
                                    "written")})
async def feedback(request: Request, state: State) -> JSONResponse:
    """Body `{"query_id": ..., "product_id": ...}`: `query_id` from a photo / vector search
    answer (kept for the serving.feedback_recent_queries most recent queries), the product
    the shopper chose. 202: appended to the log (the query's model-space vector, never the
    photo)."""
    fb = state.feedback
    if fb is None:
        raise ApiError(404, "feedback_off", "feedback is not configured on this server "
                                            "(serving.feedback_root is null)")
    body = await read_body_limited(request, state.config.serving.max_json_bytes)
    payload = parse_json_body(body, state.config.serving.max_json_depth)
    if not isinstance(payload, dict):
        raise ApiError(422, "bad_feedback", 'body must be an object {"query_id": ..., '
                                            '"product_id": ...}')
    try:
        given = validated(FeedbackRequest, payload)
    except ApiError as e:
        raise ApiError(422, "bad_feedback", e.message) from None
    query = fb.recent.get(given.query_id)
    if query is None:
        raise ApiError(404, "unknown_query",
                       f"query_id {json.dumps(given.query_id)} is unknown or expired (only "
                       f"the {fb.recent.capacity} most recent searches can get feedback)")
    try:
        idx = state.searcher.current
    except NotReadyError as e:
        raise api_error(e) from None
    if not idx.product_rows(given.product_id):
        raise ApiError(422, "unknown_product",
                       f"product {json.dumps(given.product_id)[:200]} is not in index "
                       f"version {idx.version}")
    try:
        await run_in_threadpool(fb.record, given.query_id, given.product_id, query)
    except (OSError, ValueError) as e:  # disk full / not writable; a record > max_bytes
        log.error("feedback log %s: cannot append: %s", fb.log.root, e)
        raise ApiError(503, "feedback_unavailable",
                       "the feedback log cannot be written now") from None
    out = FeedbackResponse(status="recorded", query_id=given.query_id,
                           product_id=given.product_id, version=query.version)
    return JSONResponse(out.model_dump(), status_code=202)
