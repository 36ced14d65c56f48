"""What the routers share: the searcher, config, decode slots, metrics and admin token of
one app (`ServingState` on app.state.serving, given to routes by `Depends(serving_state)`).

The admin token (read by pipelines/core/admin_token.py) guards the mutating endpoints: with
none set they are open (development on loopback); with one set, a request without
`Authorization: Bearer <token>` gets 401 and one with a wrong token 403. The header is
parsed by fastapi.security.HTTPBearer (`AdminCredentials`), which also states the scheme in
the OpenAPI schema; the comparison is constant-time.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated, Any, Callable

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pipelines.core.config import Config
from serving.api.errors import ApiError, api_error
from serving.api.gate import QueryGate
from serving.api.metrics import ServingMetrics
from serving.errors import NotReadyError, QueryError
from serving.feedback import Feedback
from serving.results import SearchResults
from serving.reload import IndexWatcher
from serving.searcher import CatalogSearcher


@dataclass
class ServingState:
    searcher: CatalogSearcher
    config: Config
    gate: QueryGate
    metrics: ServingMetrics
    watcher: IndexWatcher
    admin_token: str | None
    feedback: Feedback | None = None  # POST /v1/feedback (serving.feedback_root), else off

    def answer(self, results: SearchResults, remember: bool = True) -> Any:
        """The SearchResponse of `results`; with feedback on, a photo / vector query's
        answer carries a new query_id (its model-space vector kept for POST /v1/feedback)."""
        from serving.api.schemas import SearchResponse
        query_id = self.feedback.remember(results) if remember and self.feedback else None
        return SearchResponse.from_results(results, query_id)

    def json_context(self) -> dict[str, Any]:
        """What the request models' validators apply (serving.api.schemas): the JSON
        limits, and the config whose rules a query value is held to (k <= serving.max_k)."""
        return {"max_json_depth": self.config.serving.max_json_depth,
                "max_json_bytes": self.config.serving.max_json_bytes, "config": self.config}

    def require_admin(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        """401 without a bearer token, 403 with a wrong one (when an admin token is set).

        Called by the route itself, after FastAPI validated its parameters (a bad parameter
        answers 422 with or without the token)."""
        if self.admin_token is None:
            return
        if credentials is None:
            raise ApiError(401, "unauthorized", "this endpoint needs 'Authorization: Bearer "
                                                "<admin token>'",
                           headers={"WWW-Authenticate": 'Bearer realm="catalog-search"'})
        given = credentials.credentials.encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, self.admin_token.encode("utf-8")):
            raise ApiError(403, "forbidden", "the admin token is wrong")


async def serving_state(request: Request) -> ServingState:
    """FastAPI dependency: the ServingState of the app answering `request` (async: a sync
    dependency would take a worker thread, so /readyz could not answer a saturated pool)."""
    return request.app.state.serving


async def run_search(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a searcher call off the event loop; its QueryError / NotReadyError -> ApiError."""
    try:
        return await run_in_threadpool(fn, *args, **kwargs)
    except (QueryError, NotReadyError) as e:
        raise api_error(e) from None


# A route parameter `state: State` receives the app's ServingState.
State = Annotated[ServingState, Depends(serving_state)]

# A route parameter `credentials: AdminCredentials` receives the request's bearer token, or
# None when it carries no `Authorization: Bearer <token>` (auto_error=False: the route
# decides, by ServingState.require_admin, so an open server needs none).
_admin_bearer = HTTPBearer(auto_error=False, scheme_name="adminToken",
                           description="the admin token (CATALOG_SEARCH_ADMIN_TOKEN), "
                                       "needed only when the server has one")
AdminCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_admin_bearer)]
