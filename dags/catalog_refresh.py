"""catalog_refresh: keep the visual search index fresh, every night.

validate_params -> embed (Beam, incremental against the previous snapshot)
    -> train_adapter (optional, adapter.enabled / Param train_adapter: a gated embedding
       adapter; a gate failure keeps the previous adapter and the log says why)
    -> build_index (Beam: shards, ScaNN, evaluation gate, publish LATEST)
    -> duplicates (optional, off by default: config duplicates.in_refresh; Beam: near-duplicate
       listings of the new version -> <index_root>/duplicates/<version>/)
    -> publish (check LATEST and counts; emit the index Asset event with version and counts,
       the adapter's figures, and the duplicates figures when the report ran)

The task logic lives in pipelines/orchestration/ (plan, launcher, steps); Beam jobs run in a subprocess with the
pipeline's interpreter (see docs/AIRFLOW.md for why, and for the runner options).
"""
from __future__ import annotations

import pendulum
from airflow.sdk import Asset, dag, task

from pipelines.orchestration import launcher, steps
from pipelines.orchestration import params as orch_params
from pipelines.orchestration import plan as orch_plan

INDEX_ASSET = Asset(name=orch_params.INDEX_ASSET_NAME, uri=orch_params.INDEX_ASSET_URI)


@dag(
    dag_id="catalog_refresh",
    schedule="@daily",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=orch_params.task_defaults(),
    params=orch_params.dag_params(orch_plan.REFRESH),
    tags=["catalog-search"],
    doc_md=__doc__,
)
def catalog_refresh():
    @task
    def validate_params(params=None, dag_run=None) -> dict:
        """Refuse bad params before any Beam job starts; the run's plan."""
        run_date = dag_run.logical_date or dag_run.run_after
        return orch_plan.validate_params(params, orch_plan.REFRESH, run_date).to_dict()

    @task
    def embed(plan: dict) -> dict:
        """Beam embed job: the catalog -> snapshot <embeddings_root>/<run_id>/."""
        return launcher.launch_step(launcher.EMBED_STEP, {"plan": plan})

    @task
    def train_adapter(plan: dict, embed_summary: dict) -> dict:
        """Train a gated adapter on the snapshot (when enabled); which adapter to index with."""
        if not steps.adapter_enabled(plan):
            return dict(steps.ADAPTER_DISABLED)
        return launcher.launch_step(launcher.TRAIN_ADAPTER_STEP,
                                    {"plan": plan, "embed_summary": embed_summary})

    @task
    def build_index(plan: dict, embed_summary: dict, adapter_result: dict) -> dict:
        """Beam build_index job: snapshot -> gated index version, published as LATEST."""
        return launcher.launch_step(launcher.BUILD_INDEX_STEP,
                                    {"plan": plan, "embed_summary": embed_summary,
                                     "adapter_result": adapter_result})

    @task
    def duplicates(plan: dict, index_manifest: dict) -> dict:
        """Optional Beam duplicates job (duplicates.in_refresh): near-duplicate listings."""
        if not steps.duplicates_enabled(plan):
            return {"enabled": False}
        return launcher.launch_step(launcher.DUPLICATES_STEP,
                                    {"plan": plan, "index_manifest": index_manifest})

    @task(outlets=[INDEX_ASSET])
    def publish(plan: dict, embed_summary: dict, index_manifest: dict, adapter_result: dict,
                duplicates: dict, outlet_events=None) -> dict:
        """Check LATEST and the counts; the index Asset event carries version, counts, the
        adapter's figures (and the duplicates figures when the report ran)."""
        extra = steps.publish_results(plan, embed_summary, index_manifest, adapter_result)
        if duplicates.get("enabled"):
            extra["duplicates"] = duplicates
        outlet_events[INDEX_ASSET].extra = extra
        return extra

    plan = validate_params()
    summary = embed(plan)
    adapter = train_adapter(plan, summary)
    manifest = build_index(plan, summary, adapter)
    publish(plan, summary, manifest, adapter, duplicates(plan, manifest))


catalog_refresh()
