"""The steps of a DAG run: embed, build_index (run in the pipeline interpreter by
pipelines.orchestration.launcher) and publish (checks LATEST and the counts; the extra of
the index Asset event)."""
from __future__ import annotations

import json
import logging
from typing import Any, Mapping

from pipelines.orchestration.errors import OrchestrationError, PermanentStepError
from pipelines.orchestration.plan import (BACKFILL, REVISION_SEPARATOR, RunPlan,
                                          _read_index_latest, previous_snapshot)

log = logging.getLogger(__name__)


def embed_step(plan: RunPlan) -> dict[str, Any]:
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
             plan.run_id, summary["input_rows"], summary["embedded"], summary["reused"],
             summary["dead_lettered"], summary.get("dead_letter_reasons") or "")
    if merge:
        log.info("backfill %s: %d rows carried forward from %s; %d image_ids of the drop "
                 "replaced existing rows (the drop wins)", plan.run_id,
                 summary.get("carried_forward", 0), previous, summary.get("replaced_existing", 0))
    return summary


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


def index_matches_snapshot(index_root: str, version: str, snapshot_dir: str,
                           atol: float = 1e-4) -> tuple[bool, str]:
    """Does an index version hold exactly a snapshot's rows (same ids, metadata, model and,
    within `atol`, the same vectors)? (answer, reason when not)."""
    import io

    import numpy as np
    import pyarrow.parquet as pq

    from pipelines.core import filesystem as fs
    from pipelines.index import artifact as art
    from pipelines.embed import snapshot

    manifest = art.read_manifest(index_root, version)
    snap = snapshot.load(snapshot_dir)
    model_id = (manifest.get("model") or {}).get("model_id")
    if model_id != snap.summary.get("model_id"):
        return False, f"model {model_id} != snapshot model {snap.summary.get('model_id')}"
    if int(manifest.get("num_vectors", -1)) != snap.table.num_rows:
        return False, (f"{manifest.get('num_vectors')} vectors != {snap.table.num_rows} "
                       "snapshot rows")
    table = snap.table.select(["image_id", "view", "product_id", "image_uri", "metadata"])
    vectors = snap.vectors()
    expected = {(r["image_id"], r["view"]): (r, i) for i, r in enumerate(table.to_pylist())}
    base = art.version_dir(index_root, version)
    for entry in manifest.get("shards") or []:
        if not entry.get("num_vectors"):
            continue
        shard_dir = fs.join(base, entry["path"])
        rows = pq.read_table(io.BytesIO(fs.read_bytes(fs.join(shard_dir, art.ROWS_FILE))))
        try:
            shard_vectors = np.load(io.BytesIO(fs.read_bytes(fs.join(shard_dir, "dataset.npy"))))
        except (OSError, ValueError) as e:
            return False, f"shard {entry.get('shard')} vectors unreadable: {e}"
        for j, row in enumerate(rows.to_pylist()):
            found = expected.get((row["image_id"], row["view"]))
            if found is None:
                return False, f"image {row['image_id']!r} is not in the snapshot"
            want, i = found
            if any(row.get(k) != want[k] for k in ("product_id", "image_uri", "metadata")):
                return False, f"image {row['image_id']!r} has other product/uri/metadata"
            if not np.allclose(shard_vectors[j], vectors[i], atol=atol):
                return False, f"image {row['image_id']!r} has another vector"
    return True, ""


def build_index_step(plan: RunPlan, embed_summary: Mapping[str, Any]) -> dict[str, Any]:
    """Build the run's index version from its snapshot, gate it on recall and publish LATEST.

    Index versions are immutable, so a re-run of the same date (or a retried task):
    - keeps a passed version of this run that holds exactly the snapshot (re-publishing it,
      a no-op when it is LATEST) instead of rebuilding it;
    - replaces a rejected or incomplete version of an earlier attempt;
    - builds a new revision `<run_id>.rNN` when a passed version holds other content.
    """
    from pipelines.core import filesystem as fs
    from pipelines.index import artifact as art
    from pipelines.index.build import run_build_index

    config = plan.config()
    snapshot_dir = embed_summary["snapshot"]
    existing = run_versions(plan.index_root, plan.run_id)
    version = plan.run_id
    if existing:
        last = existing[-1]
        state = art.version_state(plan.index_root, last)
        if state == art.STATUS_PASSED:
            same, why = index_matches_snapshot(plan.index_root, last, snapshot_dir)
            if same:
                log.info("index version %s already holds exactly snapshot %s: kept, not rebuilt",
                         last, snapshot_dir)
                art.publish_version(plan.index_root, last, retention=config.index.retention)
                return art.read_manifest(plan.index_root, last)
            revision = int(last.split(REVISION_SEPARATOR, 1)[1]) + 1 \
                if REVISION_SEPARATOR in last else 2
            version = _revision_name(plan.run_id, revision)
            log.info("index version %s holds other content (%s): building %s", last, why, version)
        else:
            log.info("removing the %s index version %s of an earlier attempt", state, last)
            fs.delete_tree(art.version_dir(plan.index_root, last))
            version = last
    manifest = run_build_index(snapshot_dir, plan.index_root, config, version=version)
    log.info("index %s: %s vectors, evaluation %s", manifest.get("version"),
             manifest.get("num_vectors"), manifest.get("evaluation"))
    return manifest


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


def reconcile(embed_summary: Mapping[str, Any], index_manifest: Mapping[str, Any]) -> dict[str, int]:
    """Check the counts of a run: input = embedded + reused + dead-lettered, and the index holds
    exactly the snapshot's rows; returns the counts, raises PermanentStepError otherwise."""
    s = embed_summary
    accounted = s["embedded"] + s["reused"] + s["dead_lettered"]
    if accounted != s["input_rows"]:
        raise PermanentStepError(
            f"snapshot {s['snapshot']}: {s['input_rows']} input rows but {s['embedded']} embedded "
            f"+ {s['reused']} reused + {s['dead_lettered']} dead-lettered = {accounted}")
    views = len((s.get("augment") or {}).get("output_views") or ["original"])
    images = s["embedded"] + s["reused"] + s.get("carried_forward", 0)
    rows = snapshot_rows(s["snapshot"])
    if rows != images * views:
        raise PermanentStepError(
            f"snapshot {s['snapshot']} holds {rows} rows, expected {images} images x {views} "
            f"view(s) ({s['embedded']} embedded + {s['reused']} reused + "
            f"{s.get('carried_forward', 0)} carried forward)")
    num_vectors = int(index_manifest["num_vectors"])
    if num_vectors != rows:
        raise PermanentStepError(f"index version {index_manifest.get('version')} holds "
                                 f"{num_vectors} vectors but snapshot {s['snapshot']} has {rows} rows")
    return {"images": images, "rows": rows, "num_vectors": num_vectors}


def publish(plan: RunPlan, embed_summary: Mapping[str, Any],
            index_manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Confirm the run's version is the published LATEST and its counts reconcile; returns
    the extra of the index Asset event (version, counts, recall, where things are)."""
    version = index_manifest.get("version")
    published = _read_index_latest(plan.index_root)
    if published != version:
        raise PermanentStepError(f"index {plan.index_root}: LATEST names {published!r}, not this "
                                 f"run's version {version!r}; the version was not published")
    counts = reconcile(embed_summary, index_manifest)
    evaluation = index_manifest.get("evaluation") or {}
    extra = {
        "version": version,
        "run_id": plan.run_id,
        "kind": plan.kind,
        "index_root": plan.index_root,
        "snapshot": embed_summary["snapshot"],
        "num_vectors": counts["num_vectors"],
        "num_images": counts["images"],
        "num_shards": len(index_manifest.get("shards") or []),
        "input_rows": embed_summary["input_rows"],
        "embedded": embed_summary["embedded"],
        "reused": embed_summary["reused"],
        "dead_lettered": embed_summary["dead_lettered"],
        "carried_forward": embed_summary.get("carried_forward", 0),
        "replaced_existing": embed_summary.get("replaced_existing", 0),
        "model_id": embed_summary.get("model_id"),
        "recall_at_10": evaluation.get("recall@10"),
        "recall_at_1": evaluation.get("recall@1"),
    }
    log.info("published %s: %s", version, json.dumps(extra, sort_keys=True))
    return extra
