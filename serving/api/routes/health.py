"""GET /healthz (the process is up), /readyz (an index version is loaded and the service is
not saturated: 503 otherwise) and
/metrics (Prometheus, serving.api.metrics)."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from serving.api.deadline import saturation
from serving.api.schemas import HealthResponse, ReadyResponse
from serving.api.state import State

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up", response_model=HealthResponse)
async def healthz() -> HealthResponse:
    return HealthResponse(status="ok")


@router.get("/readyz", summary="An index version is loaded", response_model=ReadyResponse,
            responses={503: {"model": ReadyResponse,
                             "description": "no version loaded yet, or saturated (every "
                                            "worker thread busy, or the decode queue full)"}})
async def readyz(state: State) -> JSONResponse:
    idx = state.searcher.loaded
    if idx is None:
        return JSONResponse({"ready": False, "version": None}, status_code=503,
                            headers={"x-error-reason": "not_ready"})
    busy = saturation(state.gate)
    if busy is not None:  # up, but a search sent now would wait: take it out of rotation
        return JSONResponse({"ready": False, "saturated": busy, **idx.describe()},
                            status_code=503, headers={"x-error-reason": "saturated"})
    return JSONResponse({"ready": True, **idx.describe()})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"description": "Prometheus text format",
                             "content": {"text/plain": {}}}})
async def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
