"""Hand-off: tell the search service that a new index version exists (dags/index_handoff.py)."""
from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from datetime import datetime, timezone
from typing import Any, Mapping

from pipelines.orchestration.errors import OrchestrationError, StepError
from pipelines.orchestration.plan import read_index_latest

log = logging.getLogger(__name__)

#: Environment variable with the search service's base URL for the hand-off DAG.
SERVING_URL_ENV = "CATALOG_SEARCH_SERVING_URL"
#: Airflow connection (HTTP) of the search service for the hand-off DAG; e.g. from
#: AIRFLOW_CONN_CATALOG_SEARCH_API='http://127.0.0.1:8081' or the UI (Admin > Connections).
SERVING_CONN_ID = "catalog_search_api"


def serving_url_from_connection(conn_id: str) -> str | None:
    """Base URL of the Airflow connection `conn_id` (http/https), or None when it does not
    exist. Looked up through Airflow (secrets backends, AIRFLOW_CONN_<ID>, the database)."""
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException
    try:
        conn = Connection.get(conn_id)
    except AirflowNotFoundException:
        return None
    host = (conn.host or "").strip()
    if not host:
        raise OrchestrationError(f"Airflow connection {conn_id!r} has no host")
    if "://" in host:
        return host.rstrip("/")
    scheme = conn.schema if conn.schema in ("http", "https") else (
        "https" if conn.conn_type == "https" else "http")
    return f"{scheme}://{host}" + (f":{conn.port}" if conn.port else "")


def resolve_serving_url(serving_url: str | None, conn_id: str | None) -> str:
    """The hand-off target: the serving_url param if given, else the Airflow connection
    `conn_id`, else $CATALOG_SEARCH_SERVING_URL (for dag.test without connections); ""
    when none is set (the version is only recorded)."""
    if serving_url:
        return serving_url
    if conn_id:
        url = serving_url_from_connection(conn_id)
        if url:
            log.info("search service from Airflow connection %s: %s", conn_id, url)
            return url
    return os.environ.get(SERVING_URL_ENV, "")


def hand_off(event_extra: Mapping[str, Any] | None, serving_url: str | None, index_root: str,
             timeout_s: float = 30.0) -> dict[str, Any]:
    """Tell the search service that a new index version exists: POST <serving_url>/v1/reload.

    The version comes from the triggering Asset event's extra, or (a manual run) from the
    index LATEST. With no serving_url the version is only recorded (returned and logged).
    When CATALOG_SEARCH_ADMIN_TOKEN (or _FILE) is set in the worker's environment, the
    request carries it as a bearer token (the service then requires it).
    Raises StepError when the service cannot be reached or answers with an error.
    """
    version = (event_extra or {}).get("version") or read_index_latest(index_root)
    if not version:
        raise OrchestrationError(f"no index version to hand off: no triggering asset event and "
                                 f"no LATEST under {index_root}")
    record: dict[str, Any] = {"version": version,
                              "index_root": (event_extra or {}).get("index_root", index_root),
                              "recorded_at": datetime.now(timezone.utc).isoformat()}
    if not serving_url:
        log.info("new index version %s (no serving_url: recorded only)", version)
        return {**record, "notified": False}
    url = serving_url.rstrip("/") + "/v1/reload"
    from pipelines.core.admin_token import AdminTokenError, admin_token_from_env, bearer_header
    try:
        token = admin_token_from_env()  # CATALOG_SEARCH_ADMIN_TOKEN(_FILE), as the server's
    except AdminTokenError as e:
        raise OrchestrationError(f"cannot hand off to {url}: {e}") from None
    request = urllib.request.Request(url, data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json",
                                              **bearer_header(token)})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read().decode("utf-8", errors="replace")
            status = response.status
    except urllib.error.HTTPError as e:
        raise StepError(f"POST {url} answered {e.code}: "
                        f"{e.read().decode('utf-8', errors='replace')[:500]}") from e
    except (urllib.error.URLError, OSError) as e:
        raise StepError(f"cannot reach the search service at {url}: {e}") from e
    try:
        answer = json.loads(body)
    except json.JSONDecodeError:
        answer = {"body": body[:500]}
    log.info("POST %s -> %d %s", url, status, answer)
    serving = answer.get("serving_version") if isinstance(answer, dict) else None
    if serving is not None and serving < version:
        raise StepError(f"the search service at {serving_url} still serves {serving} after "
                        f"POST /v1/reload, not {version}: {answer.get('reason') or answer}")
    return {**record, "notified": True, "url": url, "status": status, "response": answer}
