"""catalog_backfill's index step: publish the embedded drop as a delta of the version LATEST
names (pipelines/index/deltas.py) instead of rebuilding, unless it is too large.

`backfill_index_step` (run by the launcher as step "backfill_index"):
- no published version, or the version's delta rows plus the drop's rows above
  `index.delta_max_rows` (0: always): a full build (`build_index_step`), as before;
- a snapshot whose model fingerprint, dimension or feature settings differ from the
  version's: PermanentStepError with the reason (a retry cannot fix it);
- otherwise the drop's rows of the merged snapshot (their model-space vectors, projected
  by the delta writer with the version's adapter) become one delta. A retried task finds
  the delta its run already wrote (source.run_id) and does not write it twice.

`publish_backfill` checks the result (LATEST, the counts: every drop row served, base +
added - removed = searchable rows) and returns the index Asset event's extra.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from pipelines.orchestration.errors import OrchestrationError, PermanentStepError
from pipelines.orchestration.plan import RunPlan, read_index_latest

if TYPE_CHECKING:
    import pyarrow as pa

    from pipelines.embed.summary import SnapshotSummary

log = logging.getLogger(__name__)

MODE_DELTA, MODE_FULL = "delta", "full"


def drop_image_ids(manifests: Sequence[str]) -> set[str]:
    """The image_ids the drop manifests name (rows that do not validate are dead letters
    of the embed job and are not in the snapshot)."""
    from pipelines.embed.manifest import expand_manifests, read_rows
    ids: set[str] = set()
    for i, uri in enumerate(expand_manifests(list(manifests))):
        for row in read_rows(i, uri):
            if not row.get("error") and row.get("image_id"):
                ids.add(str(row["image_id"]))
    return ids


def drop_rows(snapshot_dir: str, image_ids: set[str]) -> "pa.Table":
    """The snapshot's rows of `image_ids` (only files holding some are read whole)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipelines.core import filesystem as fs
    from pipelines.embed import snapshot
    wanted = pa.array(sorted(image_ids), pa.string())
    parts = []
    for uri in snapshot.embedding_files(snapshot_dir):
        ids = fs.read_parquet(uri, columns=["image_id"]).column("image_id")
        if not pc.any(pc.is_in(ids, value_set=wanted)).as_py():
            continue
        table = fs.read_parquet(uri)
        parts.append(table.filter(pc.is_in(table.column("image_id"), value_set=wanted)))
    if not parts:
        summary = snapshot.read_summary(snapshot_dir)
        return snapshot.embeddings_schema(summary.dim).empty_table()
    return pa.concat_tables(parts, promote_options="default")


def check_same_model(summary: "SnapshotSummary", manifest_model: Mapping[str, Any],
                     version: str) -> None:
    """PermanentStepError unless the snapshot's vectors are of the version's model
    (fingerprint, dimension, feature settings)."""
    model = summary.model or {}
    for key in ("fingerprint", "dim", "features"):
        mine, theirs = model.get(key), manifest_model.get(key)
        if key == "dim":
            mine = summary.dim
        if mine is not None and theirs is not None and mine != theirs:
            raise PermanentStepError(
                f"the drop's snapshot {summary.snapshot} has model {key} {str(mine)[:80]!r}, "
                f"index version {version} has {str(theirs)[:80]!r}: its vectors cannot be "
                f"added as a delta (rebuild with the version's model, or run a full build)")


def decide(index_root: str, summary: "SnapshotSummary", manifests: Sequence[str],
           max_rows: int) -> dict[str, Any]:
    """{"mode": "full", "reason"} or {"mode": "delta", "version", "rows": pa.Table}."""
    from pipelines.index import artifact as art
    from pipelines.index import deltas as dl
    if max_rows <= 0:
        return {"mode": MODE_FULL, "reason": "index.delta_max_rows is 0"}
    version = read_index_latest(index_root)
    if version is None:
        return {"mode": MODE_FULL, "reason": "no published index version to add a delta to"}
    manifest = art.read_manifest(index_root, version)
    check_same_model(summary, manifest.model, version)
    if not summary.snapshot:
        raise PermanentStepError(f"the embed summary of run {summary.run_id} names no snapshot")
    rows = drop_rows(summary.snapshot, drop_image_ids(manifests))
    existing = sum(d.manifest.num_rows for d in dl.read_log(index_root, version).deltas)
    if existing + rows.num_rows > max_rows:
        return {"mode": MODE_FULL, "version": version,
                "reason": f"the drop's {rows.num_rows} rows + the {existing} delta rows of "
                          f"{version} exceed index.delta_max_rows {max_rows}"}
    return {"mode": MODE_DELTA, "version": version, "rows": rows, "manifest": manifest}


def backfill_index_step(plan: RunPlan, embed_summary: "SnapshotSummary") -> dict[str, Any]:
    """A delta when the drop fits (module docstring), else a full build."""
    from pipelines.embed import snapshot
    from pipelines.index import deltas as dl
    from pipelines.index.artifact import ROW_COLUMNS
    from pipelines.orchestration.steps import build_index_step
    config = plan.config()
    decision = decide(plan.index_root, embed_summary, plan.manifests,
                      config.index.delta_max_rows)
    if decision["mode"] == MODE_FULL:
        log.info("backfill %s: full build: %s", plan.run_id, decision["reason"])
        manifest = build_index_step(plan, embed_summary)
        return {"mode": MODE_FULL, "reason": decision["reason"], "manifest": manifest.to_dict()}
    version, rows = decision["version"], decision["rows"]
    for d in dl.read_log(plan.index_root, version).deltas:
        if d.manifest.source.get("run_id") == plan.run_id:
            log.info("backfill %s: delta %d of %s was written by this run already", plan.run_id,
                     d.seq, version)
            return {"mode": MODE_DELTA, "version": version, "delta": d.seq,
                    "rows": d.manifest.num_rows, "reason": "written by an earlier attempt"}
    if rows.num_rows == 0:
        return {"mode": MODE_DELTA, "version": version, "delta": None, "rows": 0,
                "reason": "the drop has no embedded rows"}
    vectors = snapshot.embedding_matrix(rows.column("embedding"), embed_summary.dim)
    try:
        dm = dl.write_delta(plan.index_root, version, rows=rows.select(list(ROW_COLUMNS)),
                            vectors=vectors, model_space=True,
                            model_fingerprint=(embed_summary.model or {}).get("fingerprint"),
                            dim=embed_summary.dim, manifest=decision["manifest"],
                            source={"run_id": plan.run_id, "snapshot": embed_summary.snapshot,
                                    "manifests": list(plan.manifests)})
    except dl.DeltaError as e:
        raise PermanentStepError(f"backfill {plan.run_id}: {e}") from e
    log.info("backfill %s: %d rows published as delta %d of index version %s (no rebuild)",
             plan.run_id, dm.num_rows, dm.seq, version)
    return {"mode": MODE_DELTA, "version": version, "delta": dm.seq, "rows": dm.num_rows,
            "reason": f"{dm.num_rows} rows within index.delta_max_rows "
                      f"{config.index.delta_max_rows}"}


def publish_backfill(plan: RunPlan, embed_summary: "SnapshotSummary",
                     result: Mapping[str, Any]) -> dict[str, Any]:
    """The backfill's Asset event extra; for a delta, checks LATEST and the counts."""
    from pipelines.index import deltas as dl
    from pipelines.index import takedowns as td
    from pipelines.index.manifest import IndexManifest
    from pipelines.orchestration.steps import publish
    if result.get("mode") == MODE_FULL:
        manifest = IndexManifest.from_dict(result.get("manifest"), "the build_index result")
        return {**publish(plan, embed_summary, manifest), "mode": MODE_FULL,
                "mode_reason": result.get("reason")}
    version = result.get("version")
    if not isinstance(version, str):
        raise OrchestrationError(f"malformed backfill_index result: {dict(result)!r:.200}")
    s = embed_summary
    if s.embedded + s.reused + s.dead_lettered != s.input_rows:
        raise PermanentStepError(f"{s.input_rows} input rows but {s.embedded} embedded + "
                                 f"{s.reused} reused + {s.dead_lettered} dead-lettered")
    published = read_index_latest(plan.index_root)
    if published != version:
        log.warning("LATEST moved from %s to %s after the delta was written; the new version's "
                    "build decides what it holds", version, published)
    listed = td.read_takedowns(plan.index_root)
    log_ = dl.read_log(plan.index_root, version)
    served = dl.served_rows(plan.index_root, version, log_, listed.image_ids,
                            listed.product_ids)
    counts = dl.summarize(log_)
    if served["error"]:
        raise PermanentStepError(f"index version {version}: {served['error']}")
    if len(served["live"]) != served["searchable_rows"]:
        raise PermanentStepError(f"index version {version}: {len(served['live'])} rows served, "
                                 f"but base {served['base_rows']} + added {served['rows_added']}"
                                 f" - removed {served['rows_removed']} = "
                                 f"{served['searchable_rows']}")
    rows = drop_rows(s.snapshot or "", drop_image_ids(plan.manifests))
    taken = set(listed.image_ids)
    missing = [(i, v) for i, v, p in zip(rows.column("image_id").to_pylist(),
                                         rows.column("view").to_pylist(),
                                         rows.column("product_id").to_pylist())
               if (i, v) not in served["live"] and i not in taken
               and p not in listed.product_ids]
    if missing:
        raise PermanentStepError(f"index version {version}: {len(missing)} rows of the drop are "
                                 f"not served (first {missing[0]})")
    extra = {"version": version, "run_id": plan.run_id, "kind": plan.kind, "mode": MODE_DELTA,
             "mode_reason": result.get("reason"), "delta": result.get("delta"),
             "index_root": plan.index_root, "snapshot": s.snapshot,
             "input_rows": s.input_rows, "embedded": s.embedded, "reused": s.reused,
             "dead_lettered": s.dead_lettered, "carried_forward": s.carried_forward,
             "replaced_existing": s.replaced_existing, "model_id": s.model_id,
             "drop_rows": rows.num_rows,
             **{k: served[k] for k in ("base_rows", "rows_added", "rows_removed",
                                       "searchable_rows", "deltas")},
             **{k: counts[k] for k in ("rows_upserted", "image_ids_deleted",
                                       "product_ids_deleted", "oldest_age_s")},
             "num_vectors": served["searchable_rows"]}
    log.info("published delta %s of %s: %s", result.get("delta"), version, extra)
    return extra


def publish_backfill_results(plan: Mapping[str, Any], embed_summary: Mapping[str, Any],
                             result: Mapping[str, Any]) -> dict[str, Any]:
    """`publish_backfill` on the JSON results of the earlier tasks (XCom)."""
    from pipelines.embed.summary import SnapshotSummary, SummaryError
    from pipelines.index.manifest import ManifestFormatError
    try:
        return publish_backfill(RunPlan.from_dict(plan),
                                SnapshotSummary.from_dict(embed_summary, "the embed task's result"),
                                result)
    except (SummaryError, ManifestFormatError) as e:  # here a malformed record is bad input
        raise OrchestrationError(str(e)) from e
