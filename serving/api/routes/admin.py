"""POST /v1/reload: check LATEST now and load it if it changed (the Airflow hand-off);
409 when the version is refused. Needs the admin bearer token when one is set."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from serving.api.schemas import ReloadResponse, error_responses
from serving.api.state import State

router = APIRouter(tags=["admin"])


@router.post("/v1/reload", summary="Check LATEST now and load it if it changed",
             response_model=ReloadResponse,
             responses={409: {"model": ReloadResponse,
                              "description": "the version was refused (reason in the body)"},
                        **error_responses(401, 403, 422)})
async def reload(request: Request, state: State, force: Annotated[bool, Query(
        description="retry a version refused before even if its files did not change")] = False
                 ) -> JSONResponse:
    state.require_admin(request)
    outcome = await run_in_threadpool(state.searcher.reload, None, force)
    status = 409 if outcome.status == "refused" else 200
    return JSONResponse(outcome.to_dict(), status_code=status,
                        headers={"x-error-reason": "refused"} if status == 409 else None)
