"""POST /v1/reload: check LATEST now and load it if it changed (the Airflow hand-off);
409 when the version is refused. POST /v1/admin/delete: take products / images down
(a durable delete delta + the takedown list, pipelines/index/delete.py), applied before
the answer. Both need the admin bearer token when one is set."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from serving.api.errors import ApiError
from serving.api.parsing import parse_json_body, read_body_limited
from serving.api.schemas import DeleteResponse, ReloadResponse, error_responses
from serving.api.state import AdminCredentials, State

router = APIRouter(tags=["admin"])


@router.post("/v1/reload", summary="Check LATEST now and load it if it changed",
             response_model=ReloadResponse,
             responses={409: {"model": ReloadResponse,
                              "description": "the version was refused (reason in the body)"},
                        **error_responses(401, 403, 422)})
async def reload(state: State, credentials: AdminCredentials, force: Annotated[bool, Query(
        description="retry a version refused before even if its files did not change")] = False
                 ) -> JSONResponse:
    state.require_admin(credentials)
    outcome = await run_in_threadpool(state.searcher.reload, None, force)
    status = 409 if outcome.status == "refused" else 200
    return JSONResponse(outcome.to_dict(), status_code=status,
                        headers={"x-error-reason": "refused"} if status == 409 else None)


@router.post("/v1/admin/delete", summary="Take products / images down now (durable)",
             response_model=DeleteResponse,
             responses=error_responses(401, 403, 413, 422))
async def admin_delete(request: Request, state: State,
                       credentials: AdminCredentials) -> JSONResponse:
    """Body `{"product_ids": [...], "image_ids": [...], "reason": "..."}`. The delete delta
    and the takedown list are fsynced, then applied to the serving index, before the answer;
    it lists the ids removed, those not found (still listed) and those listed already."""
    state.require_admin(credentials)
    body = await read_body_limited(request, state.config.serving.max_json_bytes)
    payload = parse_json_body(body, state.config.serving.max_json_depth)
    if not isinstance(payload, dict) or not set(payload) <= {"product_ids", "image_ids",
                                                             "reason"}:
        raise ApiError(422, "bad_delete", 'body must be an object with "product_ids" and/or '
                                          '"image_ids" (lists of ids) and optional "reason"')
    products, images = payload.get("product_ids", []), payload.get("image_ids", [])
    reason = payload.get("reason", "takedown")
    if not isinstance(products, list) or not isinstance(images, list) \
            or not isinstance(reason, str) or not reason.strip() or len(reason) > 500:
        raise ApiError(422, "bad_delete", "product_ids and image_ids must be lists of ids, "
                                          "reason a non-empty string of at most 500 characters")
    from pipelines.core import filesystem as fs
    from pipelines.index import delete
    from pipelines.index.deltas import DeltaError
    root = state.searcher.index_root
    if not fs.is_local(root):
        raise ApiError(409, "not_local", f"takedowns are written to local index roots only; "
                                         f"this server serves {root}")
    try:
        delete.check_ids(images, products)
        result = await run_in_threadpool(delete.delete_ids, root, images, products, reason,
                                         {"by": "POST /v1/admin/delete"})
    except DeltaError as e:
        raise ApiError(422, "bad_delete", str(e)) from None
    outcome = await run_in_threadpool(state.searcher.apply_deltas_now)
    result["applied"] = outcome.to_dict()
    return JSONResponse(result)
