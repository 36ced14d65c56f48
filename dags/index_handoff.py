"""index_handoff: tell the search service that a new index version exists.

Scheduled on the index Asset that catalog_refresh and catalog_backfill update: each
published version triggers a run, which calls the service's POST /v1/reload (the
service then loads LATEST) and checks that it now serves the version. The service's URL:
the serving_url param, else the Airflow HTTP connection `catalog_search_api` (param
serving_conn_id), else $CATALOG_SEARCH_SERVING_URL (for dag.test). With none the version
is only recorded in the task log and XCom; the service also
polls LATEST on its own (serving.reload_interval_s), so this is the fast path.
"""
from __future__ import annotations

import pendulum
from airflow.sdk import Asset, Param, dag, task

from pipelines.orchestration import handoff
from pipelines.orchestration import params as orch_params
from pipelines.orchestration import plan as orch_plan

INDEX_ASSET = Asset(name=orch_params.INDEX_ASSET_NAME, uri=orch_params.INDEX_ASSET_URI)


@dag(
    dag_id="index_handoff",
    schedule=[INDEX_ASSET],
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    default_args=orch_params.task_defaults(retries=3),
    params={
        "serving_conn_id": Param(handoff.SERVING_CONN_ID, type=["null", "string"],
                                 description="Airflow HTTP connection of the search service "
                                             "(used when serving_url is empty)"),
        "serving_url": Param("", type="string",
                             description="search service base URL, e.g. http://127.0.0.1:8080;"
                                         " empty = the connection, else "
                                         "$CATALOG_SEARCH_SERVING_URL, else only record the "
                                         "version"),
        "index_root": Param(orch_plan.default_params(orch_plan.REFRESH)["index_root"], type="string",
                            minLength=1,
                            description="index root to read LATEST from on a manual run"),
    },
    tags=["catalog-search"],
    doc_md=__doc__,
)
def index_handoff():
    @task
    def notify_search_service(params=None, triggering_asset_events=None) -> dict:
        """POST /v1/reload for the version of the triggering Asset event (or LATEST)."""
        events = list((triggering_asset_events or {}).get(INDEX_ASSET, []))
        extra = events[-1].extra if events else None
        url = handoff.resolve_serving_url(params.get("serving_url"), params.get("serving_conn_id"))
        return handoff.hand_off(extra, url, params["index_root"])

    notify_search_service()


index_handoff()
