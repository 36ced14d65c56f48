"""The steps of a DAG run: embed, the optional train_adapter, build_index, the optional
duplicates report (run in the pipeline interpreter by pipelines.orchestration.launcher)
and publish (checks LATEST and the counts; the extra of the index Asset event)."""
from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, Mapping

from pipelines.orchestration.errors import OrchestrationError, PermanentStepError
from pipelines.orchestration.plan import (BACKFILL, REVISION_SEPARATOR, RunPlan,
                                          read_index_latest, previous_snapshot)

if TYPE_CHECKING:
    from pipelines.embed.summary import SnapshotSummary
    from pipelines.index.manifest import IndexManifest

log = logging.getLogger(__name__)


def embed_step(plan: RunPlan) -> SnapshotSummary:
    """Embed the run's manifests: incremental against the previous snapshot; a backfill
    embeds only the drop and merges it with the latest snapshot (drop rows win)."""
    from pipelines.embed.job import run_embed
    previous = previous_snapshot(plan.embeddings_root, plan.run_id)
    merge = plan.kind == BACKFILL
    if merge and previous is None:
        raise OrchestrationError(f"backfill {plan.run_id}: no snapshot under "
                                 f"{plan.embeddings_root} to merge the drop into")
    summary = run_embed(list(plan.manifests), plan.embeddings_root, plan.config(),
                        run_id=plan.run_id, previous=previous, merge_previous=merge)
    log.info("embed %s: %d input rows = %d embedded + %d reused + %d dead-lettered %s",
             plan.run_id, summary.input_rows, summary.embedded, summary.reused,
             summary.dead_lettered, summary.dead_letter_reasons or "")
    if merge:
        log.info("backfill %s: %d rows carried forward from %s; %d image_ids of the drop "
                 "replaced existing rows (the drop wins)", plan.run_id,
                 summary.carried_forward, previous, summary.replaced_existing)
    return summary


def adapter_dir(plan: RunPlan) -> str:
    """The run's adapter folder: config adapter.dir, else `adapter` beside the index root."""
    from pipelines.core import filesystem as fs
    configured = plan.config().adapter.dir
    if configured:
        return configured
    root = plan.index_root.rstrip("/")
    parent = root.rsplit("/", 1)[0] if "/" in root else "."
    return fs.join(parent, "adapter")


def _usable_adapter(folder: str, summary: SnapshotSummary) -> tuple[str | None, str]:
    """(folder, its id) when it holds an adapter that fits the snapshot, else (None, why)."""
    from pipelines.adapter import AdapterError, load_adapter
    from pipelines.adapter.artifact import is_adapter
    if not is_adapter(folder):
        return None, f"{folder} holds no adapter"
    try:
        adapter = load_adapter(folder)
        adapter.check_base(summary.model, summary.dim, f"snapshot {summary.snapshot}")
    except AdapterError as e:
        return None, str(e)
    return folder, adapter.id


#: train_adapter's result when adapter.enabled is false (no subprocess is started).
ADAPTER_DISABLED: dict[str, Any] = {"enabled": False, "trained": False, "adapter": None,
                                    "adapter_id": None, "reason": "adapter.enabled is false",
                                    "validation": None}


def adapter_enabled(plan: Mapping[str, Any]) -> bool:
    """Whether the run trains an adapter (config adapter.enabled / Param train_adapter)."""
    return bool(RunPlan.from_dict(plan).config().adapter.enabled)


def train_adapter_step(plan: RunPlan, embed_summary: SnapshotSummary) -> dict[str, Any]:
    """Train an adapter on the run's snapshot (+ adapter.pairs, adapter.feedback) when
    adapter.enabled; the result names the adapter build_index uses.

    The gate refusing the new adapter is not a failure of the run: the folder keeps its
    previous adapter (used when it fits this snapshot, else none) and the log says why.
    Returns {"enabled", "trained", "adapter" (folder or None), "adapter_id", "reason",
    "validation"}.
    """
    config = plan.config()
    folder = adapter_dir(plan)
    if not config.adapter.enabled:
        log.info("train_adapter: adapter.enabled is false: nothing trained")
        return dict(ADAPTER_DISABLED)
    from pipelines.adapter import AdapterError
    from pipelines.adapter.commands import AdapterGateError, run_train_adapter
    snapshot_dir = _snapshot_dir(embed_summary)
    try:
        result = run_train_adapter(snapshot_dir, folder, config, list(config.adapter.pairs),
                                   config.adapter.feedback)
    except AdapterGateError as e:
        kept, why = _usable_adapter(folder, embed_summary)
        log.warning("train_adapter: %s; build_index uses %s", e,
                    f"the previous adapter {why} in {kept}" if kept else f"no adapter ({why})")
        return {"enabled": True, "trained": False, "adapter": kept,
                "adapter_id": why if kept else None, "reason": str(e),
                "validation": e.result.figures.get("validation")}
    except AdapterError as e:
        raise PermanentStepError(f"train_adapter: {e}") from e
    log.info("train_adapter: %s: %s", result.adapter.id if result.adapter else None,
             result.reason)
    return {"enabled": True, "trained": True, "adapter": folder,
            "adapter_id": result.adapter.id if result.adapter else None,
            "reason": result.reason, "validation": result.figures.get("validation")}


def _revision_name(run_id: str, revision: int) -> str:
    return run_id if revision == 1 else f"{run_id}{REVISION_SEPARATOR}{revision:02d}"


def run_versions(index_root: str, run_id: str) -> list[str]:
    """Index versions a run has built: `<run_id>`, then `<run_id>.rNN` for rebuilds whose
    snapshot content differed from an already published version of the same run."""
    from pipelines.core import filesystem as fs
    from pipelines.index import artifact as art
    names = [n for n in fs.list_children(art.versions_dir(index_root))
             if n == run_id or n.startswith(run_id + REVISION_SEPARATOR)]
    return sorted(names)


def _next_revision(run_id: str, last: str) -> str:
    """The revision after `last` (`<run_id>` is revision 1)."""
    revision = int(last.split(REVISION_SEPARATOR, 1)[1]) + 1 if REVISION_SEPARATOR in last else 2
    return _revision_name(run_id, revision)


def build_index_step(plan: RunPlan, embed_summary: SnapshotSummary,
                     adapter_result: Mapping[str, Any] | None = None) -> IndexManifest:
    """Build the run's index version from its snapshot, gate it on recall and publish LATEST.

    Index versions are immutable, so a re-run of the same date (or a retried task):
    - keeps a passed version of this run that holds exactly the snapshot (re-publishing it,
      a no-op when it is LATEST) instead of rebuilding it;
    - replaces a rejected or incomplete version of an earlier attempt, unless the index
      LATEST names it (a served version whose manifest no longer reads): that one is never
      deleted, the run builds the next revision instead;
    - builds a new revision `<run_id>.rNN` when a passed version holds other content.
    """
    from pipelines.core import filesystem as fs
    from pipelines.index import artifact as art
    from pipelines.index.build import run_build_index
    from pipelines.index.reader import version_matches_snapshot

    config = plan.config()
    snapshot_dir = _snapshot_dir(embed_summary)
    adapter = config.index.adapter  # adapter.enabled false: config's index.adapter, if any
    if adapter_result is not None and adapter_result.get("enabled"):
        adapter = adapter_result.get("adapter")  # train_adapter's new or kept one (or none)
    elif adapter_result is None and config.adapter.enabled:  # a run without train_adapter
        adapter, why = _usable_adapter(adapter_dir(plan), embed_summary)
        if adapter is None:
            log.warning("adapter.enabled but no usable adapter (%s): built without one", why)
    config = config.replace(index={"adapter": adapter})
    existing = run_versions(plan.index_root, plan.run_id)
    version = plan.run_id
    if existing:
        last = existing[-1]
        # read once: its state, its content and the publish below all use it
        state, existing_manifest = art.read_version_state(plan.index_root, last)
        if existing_manifest is not None and existing_manifest.passed:
            same, why = version_matches_snapshot(plan.index_root, existing_manifest,
                                                 snapshot_dir)
            if same and _adapter_source_id(adapter) != (existing_manifest.adapter or {}).get("id"):
                same, why = False, "it was built with another adapter"  # retrained adapter
            if same:
                log.info("index version %s already holds exactly snapshot %s: kept, not rebuilt",
                         last, snapshot_dir)
                art.publish_version(plan.index_root, last, retention=config.index.retention,
                                    manifest=existing_manifest)
                return existing_manifest
            version = _next_revision(plan.run_id, last)
            log.info("index version %s holds other content (%s): building %s", last, why, version)
        elif read_index_latest(plan.index_root) == last:
            version = _next_revision(plan.run_id, last)
            log.warning("index version %s is LATEST but its manifest does not read (%s): kept "
                        "for the operator, building %s", last, state, version)
        else:
            log.info("removing the %s index version %s of an earlier attempt", state, last)
            fs.delete_tree(art.version_dir(plan.index_root, last))
            version = last
    manifest = run_build_index(snapshot_dir, plan.index_root, config, version=version)
    log.info("index %s: %s vectors, evaluation %s", manifest.version, manifest.num_vectors,
             manifest.evaluation)
    return manifest


def _adapter_source_id(folder: str | None) -> str | None:
    if folder is None:
        return None
    from pipelines.adapter import AdapterError, load_adapter
    try:
        return load_adapter(folder).id
    except AdapterError:
        return None


def snapshot_rows(snapshot_dir: str) -> int:
    """Rows in a snapshot's embeddings files (from Parquet footers; no data read)."""
    import pyarrow.parquet as pq

    from pipelines.core import filesystem as fs
    from pipelines.embed import snapshot
    total = 0
    for uri in snapshot.embedding_files(snapshot_dir):
        with fs.FileSystems.open(uri) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def _snapshot_dir(summary: SnapshotSummary) -> str:
    if not summary.snapshot:
        raise PermanentStepError(f"the embed summary of run {summary.run_id} names no snapshot "
                                 "folder (field 'snapshot')")
    return summary.snapshot


def reconcile(embed_summary: SnapshotSummary, index_manifest: IndexManifest) -> dict[str, int]:
    """Check the counts of a run: input = embedded + reused + dead-lettered, and the index holds
    exactly the snapshot's rows; returns the counts, raises PermanentStepError otherwise."""
    s = embed_summary
    snapshot_dir = _snapshot_dir(s)
    accounted = s.embedded + s.reused + s.dead_lettered
    if accounted != s.input_rows:
        raise PermanentStepError(
            f"snapshot {snapshot_dir}: {s.input_rows} input rows but {s.embedded} embedded "
            f"+ {s.reused} reused + {s.dead_lettered} dead-lettered = {accounted}")
    views = len(s.output_views)
    images = s.embedded + s.reused + s.carried_forward
    rows = snapshot_rows(snapshot_dir)
    if rows != images * views:
        raise PermanentStepError(
            f"snapshot {snapshot_dir} holds {rows} rows, expected {images} images x {views} "
            f"view(s) ({s.embedded} embedded + {s.reused} reused + "
            f"{s.carried_forward} carried forward)")
    num_vectors = index_manifest.num_vectors
    # rows of taken-down ids the build left out (pipelines/index/takedowns.py)
    removed = int((index_manifest.build.get("takedowns") or {}).get("rows_removed", 0))
    if num_vectors != rows - removed:
        raise PermanentStepError(f"index version {index_manifest.version} holds "
                                 f"{num_vectors} vectors but snapshot {snapshot_dir} has {rows} rows"
                                 f" ({removed} taken down)")
    return {"images": images, "rows": rows, "num_vectors": num_vectors}


#: The figures of a duplicates report that ride on the index Asset event.
DUPLICATES_FIGURES = ("version", "threshold", "groups", "images_in_groups",
                      "products_in_groups", "near_pairs", "exact_pairs", "reconciled")


def duplicates_enabled(plan: Mapping[str, Any]) -> bool:
    """Whether the run's config asks for the duplicates report (duplicates.in_refresh)."""
    return bool(RunPlan.from_dict(plan).config().duplicates.in_refresh)


def duplicates_dir(index_root: str, version: str) -> str:
    """Where a version's duplicates report is written: <index_root>/duplicates/<version>/."""
    from pipelines.core import filesystem as fs
    from pipelines.index.artifact import check_version_name
    return fs.join(index_root, "duplicates", check_version_name(version))


def duplicates_step(plan: RunPlan, version: str) -> dict[str, Any]:
    """The duplicates job on the run's published version; its figures (Asset event extra)."""
    from pipelines.duplicates.job import run_duplicates
    out = duplicates_dir(plan.index_root, version)
    summary = run_duplicates(plan.index_root, out, plan.config(), version=version)
    figures = {k: summary[k] for k in DUPLICATES_FIGURES}
    log.info("duplicates %s: %s", version, json.dumps(figures, sort_keys=True))
    return {"enabled": True, **figures, "report": f"{out}/report.html"}


def adapter_event(index_manifest: IndexManifest,
                  adapter_result: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The adapter part of the index Asset event: the version's adapter and its figures,
    and what this run's train_adapter did (trained, or kept the previous one and why)."""
    record = index_manifest.adapter
    if record is None and not adapter_result:
        return None
    validation = (record or {}).get("validation") or {}
    out: dict[str, Any] = {
        "id": (record or {}).get("id"), "dim": index_manifest.dim if record else None,
        "val_recall_at_1": (validation.get("with_adapter") or {}).get("recall@1"),
        "val_recall_at_1_identity": (validation.get("identity") or {}).get("recall@1")}
    if adapter_result:
        out.update(trained=bool(adapter_result.get("trained")),
                   reason=adapter_result.get("reason"))
    return out


def publish(plan: RunPlan, embed_summary: SnapshotSummary,
            index_manifest: IndexManifest,
            adapter_result: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Confirm the run's version is the published LATEST and its counts reconcile; returns
    the extra of the index Asset event (version, counts, recall, where things are, and
    `folded`: the previous version's delta log and how the new version holds it)."""
    from pipelines.orchestration.fold import fold_report
    version = index_manifest.version
    published = read_index_latest(plan.index_root)
    if published != version:
        raise PermanentStepError(f"index {plan.index_root}: LATEST names {published!r}, not this "
                                 f"run's version {version!r}; the version was not published")
    counts = reconcile(embed_summary, index_manifest)
    extra = {
        "version": version,
        "run_id": plan.run_id,
        "kind": plan.kind,
        "index_root": plan.index_root,
        "snapshot": embed_summary.snapshot,
        "num_vectors": counts["num_vectors"],
        "num_images": counts["images"],
        "num_shards": index_manifest.num_shards,
        "input_rows": embed_summary.input_rows,
        "embedded": embed_summary.embedded,
        "reused": embed_summary.reused,
        "dead_lettered": embed_summary.dead_lettered,
        "carried_forward": embed_summary.carried_forward,
        "replaced_existing": embed_summary.replaced_existing,
        "model_id": embed_summary.model_id,
        "recall_at_10": index_manifest.recall(10),
        "recall_at_1": index_manifest.recall(1),
        # a full build: a fresh delta log, and what it did with the previous version's
        "deltas": 0,
        "folded": fold_report(plan.index_root, version),
        "adapter": adapter_event(index_manifest, adapter_result),
    }
    log.info("published %s: %s", version, json.dumps(extra, sort_keys=True))
    return extra


def publish_results(plan: Mapping[str, Any], embed_summary: Mapping[str, Any],
                    index_manifest: Mapping[str, Any],
                    adapter_result: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`publish` on the JSON results of the earlier tasks (XCom): each parsed once into its
    contract (a malformed one is an OrchestrationError naming the field)."""
    from pipelines.embed.summary import SnapshotSummary, SummaryError
    from pipelines.index.manifest import IndexManifest, ManifestFormatError
    try:
        return publish(RunPlan.from_dict(plan),
                       SnapshotSummary.from_dict(embed_summary, "the embed task's result"),
                       IndexManifest.from_dict(index_manifest, "the build_index task's result"),
                       adapter_result)
    except (SummaryError, ManifestFormatError) as e:  # here a malformed record is bad input
        raise OrchestrationError(str(e)) from e
