"""catalog_backfill: add a catalog drop without re-embedding the whole catalog.

Trigger it with Params naming the drop, e.g. {"manifests": ["gs://bucket/drops/2025-06-01.csv"]}.

validate_params (refuses missing, unreadable or empty drops before any Beam job starts)
    -> embed (Beam: embeds only the drop, merged with the latest snapshot into a new one;
              a drop row whose image_id already exists replaces it, reported as replaced)
    -> build_index (the drop's rows published as a delta of the version LATEST names, no
                    rebuild, while the version's delta rows stay within
                    index.delta_max_rows; otherwise the Beam build: shards, ScaNN,
                    evaluation gate, publish LATEST)
    -> publish (check LATEST and counts; emit the index Asset event with version, mode
                (delta / full) and counts)

The task logic lives in pipelines/orchestration/ (plan, launcher, steps) (see docs/AIRFLOW.md).
"""
from __future__ import annotations

import pendulum
from airflow.sdk import Asset, dag, task

from pipelines.orchestration import delta_step, launcher
from pipelines.orchestration import params as orch_params
from pipelines.orchestration import plan as orch_plan

INDEX_ASSET = Asset(name=orch_params.INDEX_ASSET_NAME, uri=orch_params.INDEX_ASSET_URI)


@dag(
    dag_id="catalog_backfill",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=orch_params.task_defaults(),
    params=orch_params.dag_params(orch_plan.BACKFILL),
    tags=["catalog-search"],
    doc_md=__doc__,
)
def catalog_backfill():
    @task
    def validate_params(params=None, dag_run=None) -> dict:
        """Refuse bad params (and a missing, unreadable or empty drop) before Beam starts."""
        run_date = dag_run.logical_date or dag_run.run_after
        return orch_plan.validate_params(params, orch_plan.BACKFILL, run_date).to_dict()

    @task
    def embed_drop(plan: dict) -> dict:
        """Beam embed job: the drop only, merged with the latest snapshot (drop rows win)."""
        return launcher.launch_step(launcher.EMBED_STEP, {"plan": plan})

    @task
    def build_index(plan: dict, embed_summary: dict) -> dict:
        """The drop as a delta of LATEST (pipelines/orchestration/delta_step.py), or when it
        is too large the Beam build_index job (gated version, published as LATEST)."""
        return launcher.launch_step(launcher.BACKFILL_INDEX_STEP,
                                {"plan": plan, "embed_summary": embed_summary})

    @task(outlets=[INDEX_ASSET])
    def publish(plan: dict, embed_summary: dict, index_result: dict,
                outlet_events=None) -> dict:
        """Check LATEST and the counts; the index Asset event carries version, mode, counts."""
        extra = delta_step.publish_backfill_results(plan, embed_summary, index_result)
        outlet_events[INDEX_ASSET].extra = extra
        return extra

    plan = validate_params()
    summary = embed_drop(plan)
    manifest = build_index(plan, summary)
    publish(plan, summary, manifest)


catalog_backfill()
