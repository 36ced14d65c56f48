"""What the Airflow DAGs (dags/) do, without Airflow: params -> plan -> Beam jobs -> asset event.

The DAG files only wire tasks together; every decision lives here so that it can be
tested and reused outside Airflow:

- `validate_params` turns DAG Params into a `RunPlan` (config overrides, run id, checked
  manifests), or refuses them with an `OrchestrationError` naming the param and the
  reason, before any Beam job starts.
- `launch_step` runs one Beam job ("embed" or "build_index") in a subprocess with the
  pipeline's interpreter (`python -m pipelines.orchestration.steps STEP ...`), streams its
  output into the task log and returns its JSON result. A step that fails for a reason
  a retry cannot fix (bad input, failed evaluation gate) exits with
  `PERMANENT_EXIT_CODE` and becomes a `PermanentStepError` (the DAGs' retry policy fails
  the task at once); any other failure is a `StepError` (retried with backoff).
- `publish` checks that the index LATEST names the run's version and that the counts
  reconcile, and returns the extra of the index Asset event.
- `hand_off` tells the search service that a new index version exists.

Run ids come from the DAG run's logical date, `<YYYYmmddTHHMMSSZ>-<kind>`, so they sort in
time order and re-running the same logical date replaces only that run's own snapshot
and index version.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Mapping, Sequence

from pipelines.core.config import Config, ConfigError, load_config

log = logging.getLogger(__name__)

REFRESH, BACKFILL = "refresh", "backfill"
KINDS = (REFRESH, BACKFILL)
EMBED_STEP, BUILD_INDEX_STEP = "embed", "build_index"
STEPS = (EMBED_STEP, BUILD_INDEX_STEP)
#: Index versions of a run rebuilt with other content: `<run_id>.r02`, `<run_id>.r03`, ...
REVISION_SEPARATOR = ".r"

#: Exit code of a step subprocess that failed for a reason a retry cannot fix.
PERMANENT_EXIT_CODE = 3
#: Environment variable naming the interpreter that runs the Beam jobs.
PIPELINE_PYTHON_ENV = "CATALOG_SEARCH_PYTHON"
#: Environment variable naming the folder the DAG params' default paths live in.
DATA_ROOT_ENV = "CATALOG_SEARCH_DATA"
#: Environment variable with the search service's base URL for the hand-off DAG.
SERVING_URL_ENV = "CATALOG_SEARCH_SERVING_URL"
#: Airflow connection (HTTP) of the search service for the hand-off DAG; e.g. from
#: AIRFLOW_CONN_CATALOG_SEARCH_API='http://127.0.0.1:8081' or the UI (Admin > Connections).
SERVING_CONN_ID = "catalog_search_api"
#: Environment variable overriding the DAG tasks' retry count (the demo sets 0: fail fast).
TASK_RETRIES_ENV = "CATALOG_SEARCH_TASK_RETRIES"

#: The Airflow Asset both refresh and backfill update (see dags/); consumers schedule on it.
INDEX_ASSET_NAME = "catalog_search_index"
INDEX_ASSET_URI = "catalog-search://index/latest"

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: Params every run DAG accepts, with what they mean (also the DAGs' Param descriptions).
PARAM_HELP = {
    "manifests": "catalog manifest URIs (CSV/JSONL/Parquet; local, gs://, s3://, http(s); globs ok)",
    "embeddings_root": "folder of embeddings snapshots (<root>/<run_id>/ and <root>/LATEST)",
    "index_root": "folder of index versions (<root>/versions/<v>/ and <root>/LATEST)",
    "config_file": "YAML deep-merged over configs/default.yaml, e.g. configs/dataflow.yaml",
    "runner": "Beam runner (DirectRunner, DataflowRunner, FlinkRunner, ...); null = config's",
    "runner_options": "extra Beam pipeline options, merged over the config's runner.options",
    "shards": "index shards; null = config's index.shards",
    "recall_threshold": "evaluation gate: recall@10 below this is not published; null = config's",
    "retention": "published index versions kept (LATEST is never pruned); null = config's",
    "model_handle": "embedding model handle; null = config's model.handle",
    "config_overrides": "any config keys, by section, e.g. {\"index\": {\"eval_queries\": 200}}",
}


class OrchestrationError(ValueError):
    """DAG params or the state of the roots do not allow the run (refused before Beam starts)."""


class StepError(RuntimeError):
    """A step subprocess failed unexpectedly (crash, lost worker, I/O error): worth a retry."""


class PermanentStepError(RuntimeError):
    """A step failed for a reason a retry cannot fix: bad input, a failed evaluation gate."""


# ---------------------------------------------------------------------------------------
# Params -> plan


def default_data_root() -> str:
    """Where the DAG params' default paths point: $CATALOG_SEARCH_DATA or $AIRFLOW_HOME/catalog-search."""
    root = os.environ.get(DATA_ROOT_ENV)
    if root:
        return root
    home = os.environ.get("AIRFLOW_HOME") or os.path.join(os.path.expanduser("~"), "airflow")
    return os.path.join(home, "catalog-search")


def default_params(kind: str) -> dict[str, Any]:
    """Default values of the run DAGs' Params (backfill has no default drop)."""
    if kind not in KINDS:
        raise ValueError(f"unknown run kind {kind!r}; choose from {', '.join(KINDS)}")
    root = default_data_root()
    return {
        "manifests": [os.path.join(root, "catalog", "manifest.csv")] if kind == REFRESH else None,
        "embeddings_root": os.path.join(root, "embeddings"),
        "index_root": os.path.join(root, "index"),
        "config_file": None,
        "runner": None,
        "runner_options": {},
        "shards": None,
        "recall_threshold": None,
        "retention": None,
        "model_handle": None,
        "config_overrides": {},
    }


def pipeline_python() -> str:
    """The interpreter that runs the Beam jobs: $CATALOG_SEARCH_PYTHON or this one."""
    return os.environ.get(PIPELINE_PYTHON_ENV) or sys.executable


def run_id_for(kind: str, run_date: datetime) -> str:
    """Snapshot name and index version of a DAG run: `<UTC timestamp>-<kind>`, sortable in time."""
    if kind not in KINDS:
        raise ValueError(f"unknown run kind {kind!r}; choose from {', '.join(KINDS)}")
    if run_date.tzinfo is None:
        run_date = run_date.replace(tzinfo=timezone.utc)
    return check_run_id(f"{run_date.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}-{kind}")


def check_run_id(run_id: Any, what: str = "run_id") -> str:
    """`run_id` when it is a safe snapshot / version name (pipelines.core.names), else
    OrchestrationError: a run plan from XCom or a param never names a path."""
    from pipelines.core.names import InvalidNameError, check_segment
    try:
        return check_segment(run_id, what)
    except InvalidNameError as e:
        raise OrchestrationError(str(e)) from e


@dataclass(frozen=True)
class RunPlan:
    """Everything the steps of one DAG run need; JSON round-trips through XCom."""
    kind: str
    run_id: str
    manifests: tuple[str, ...]
    embeddings_root: str
    index_root: str
    config_file: str | None
    config_overrides: dict[str, Any] = field(default_factory=dict)
    input_rows: int = 0
    beam_options: dict[str, Any] = field(default_factory=dict)

    def config(self) -> Config:
        """The run's Config: configs/default.yaml < config_file < overrides from the params."""
        return load_config(self.config_file, self.config_overrides)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "run_id": self.run_id, "manifests": list(self.manifests),
                "embeddings_root": self.embeddings_root, "index_root": self.index_root,
                "config_file": self.config_file, "config_overrides": self.config_overrides,
                "input_rows": self.input_rows, "beam_options": self.beam_options}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunPlan":
        """The plan from its JSON form; OrchestrationError when malformed or when its run_id
        is not a safe name (checked before any step deletes or writes)."""
        if isinstance(d, Mapping) and "run_id" in d:
            check_run_id(d["run_id"], "run plan run_id")
        try:
            return cls(kind=d["kind"], run_id=d["run_id"], manifests=tuple(d["manifests"]),
                       embeddings_root=d["embeddings_root"], index_root=d["index_root"],
                       config_file=d.get("config_file"),
                       config_overrides=dict(d.get("config_overrides") or {}),
                       input_rows=int(d.get("input_rows") or 0),
                       beam_options=dict(d.get("beam_options") or {}))
        except (KeyError, TypeError) as e:
            raise OrchestrationError(f"malformed run plan (key {e}): {dict(d)!r}") from e


def _optional(params: Mapping[str, Any], key: str, kinds: tuple[type, ...],
              what: str) -> Any:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise OrchestrationError(f"param {key} must be {what} or null, got {value!r}")
    return value


def config_overrides(params: Mapping[str, Any]) -> dict[str, Any]:
    """Config overrides from the params: config_overrides, then the named shortcuts over it."""
    raw = params.get("config_overrides") or {}
    if not isinstance(raw, Mapping):
        raise OrchestrationError(f"param config_overrides must be an object of config "
                                 f"sections, got {raw!r}")
    overrides: dict[str, Any] = json.loads(json.dumps(raw))  # a deep, JSON-safe copy

    def put(section: str, key: str, value: Any) -> None:
        target = overrides.setdefault(section, {})
        if not isinstance(target, dict):
            raise OrchestrationError(f"param config_overrides.{section} must be an object, "
                                     f"got {target!r}")
        target[key] = value

    runner = _optional(params, "runner", (str,), "a Beam runner name")
    if runner is not None:
        if not runner.strip():
            raise OrchestrationError("param runner must not be empty")
        put("runner", "name", runner.strip())
    options = params.get("runner_options")
    if options:
        if not isinstance(options, Mapping):
            raise OrchestrationError(f"param runner_options must be an object of Beam pipeline "
                                     f"options, got {options!r}")
        put("runner", "options", {**overrides.get("runner", {}).get("options", {}), **options})
    for key, section, name, kinds, what in (
            ("shards", "index", "shards", (int,), "an integer >= 1"),
            ("recall_threshold", "index", "recall_threshold", (int, float), "a number in [0, 1]"),
            ("retention", "index", "retention", (int,), "an integer >= 1"),
            ("model_handle", "model", "handle", (str,), "a model handle")):
        value = _optional(params, key, kinds, what)
        if value is not None:
            put(section, name, value)
    return overrides


def _load_run_config(config_file: str | None, overrides: dict[str, Any]) -> Config:
    """The run's config; when a config file layers runner options, the params' options merge in."""
    try:
        if config_file is not None:
            from pipelines.core.config import read_yaml
            file_options = (read_yaml(config_file).get("runner") or {}).get("options") or {}
            param_options = overrides.get("runner", {}).get("options")
            if file_options and param_options is not None:
                overrides["runner"]["options"] = {**file_options, **param_options}
        return load_config(config_file, overrides)
    except ConfigError as e:
        raise OrchestrationError(f"params give an invalid configuration: {e}") from e


def _check_model_handle(handle: str) -> None:
    if handle.startswith(("builtin:", "http://", "https://")):
        return
    path = os.path.abspath(os.path.expanduser(handle))
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise OrchestrationError(f"model handle {handle!r} is not a builtin:NAME, an http(s) URL "
                                 f"or a local SavedModel directory (no saved_model.pb in {path})")


def _count_manifest_rows(manifests: Sequence[str], kind: str) -> tuple[list[str], int]:
    from pipelines.embed.manifest import ManifestError, check_manifest, expand_manifests
    try:
        uris = expand_manifests(list(manifests))
        counts = {uri: check_manifest(uri) for uri in uris}
    except ManifestError as e:
        raise OrchestrationError(f"param manifests: {e}") from e
    empty = [uri for uri, n in counts.items() if n == 0]
    if empty:
        what = "catalog drop" if kind == BACKFILL else "catalog manifest"
        raise OrchestrationError(f"param manifests: {what} {', '.join(empty)} holds no rows "
                                 "(nothing to embed)")
    return uris, sum(counts.values())


def validate_params(params: Mapping[str, Any], kind: str, run_date: datetime) -> RunPlan:
    """Check a DAG run's params and the roots; the plan of the run, or OrchestrationError.

    Refuses: unknown params, manifests that are missing, unreadable or empty, an invalid
    configuration (including runner options a runner needs), a backfill with no snapshot
    to merge into, and a run whose version is older than the published one (re-running
    an old date would move LATEST backwards).
    """
    if kind not in KINDS:
        raise OrchestrationError(f"unknown run kind {kind!r}; choose from {', '.join(KINDS)}")
    params = dict(params)
    unknown = sorted(set(params) - set(PARAM_HELP))
    if unknown:
        raise OrchestrationError(f"unknown param(s) {', '.join(unknown)}; known: "
                                 + ", ".join(PARAM_HELP))
    manifests = params.get("manifests")
    if isinstance(manifests, str):
        raise OrchestrationError(f"param manifests must be a list of URIs, got the string "
                                 f"{manifests!r} (write [{manifests!r}])")
    if not isinstance(manifests, (list, tuple)) or not manifests:
        raise OrchestrationError(f"param manifests must be a non-empty list of manifest URIs, "
                                 f"got {manifests!r}")
    bad = [m for m in manifests if not isinstance(m, str) or not m.strip()]
    if bad:
        raise OrchestrationError(f"param manifests: entries must be non-empty strings, got {bad!r}")
    roots = {}
    for key in ("embeddings_root", "index_root"):
        value = params.get(key)
        if not isinstance(value, str) or not value.strip():
            raise OrchestrationError(f"param {key} must be a non-empty path or URI, got {value!r}")
        roots[key] = value.strip()
    from pipelines.core import filesystem as fs
    if fs.join(roots["embeddings_root"], "") == fs.join(roots["index_root"], ""):
        raise OrchestrationError("params embeddings_root and index_root must be different folders")
    config_file = _optional(params, "config_file", (str,), "a YAML file path")

    overrides = config_overrides(params)
    config = _load_run_config(config_file, overrides)
    run_id = run_id_for(kind, run_date)
    from pipelines.core.runner import pipeline_options
    try:
        # (Beam's optional dependencies are checked by the step, in the pipeline interpreter)
        options = pipeline_options(config, f"catalog-{kind}-{run_id}")
    except ConfigError as e:
        raise OrchestrationError(f"params give an invalid runner configuration: {e}") from e
    _check_model_handle(config.model.handle)

    uris, input_rows = _count_manifest_rows([m.strip() for m in manifests], kind)
    if kind == BACKFILL and previous_snapshot(roots["embeddings_root"], run_id) is None:
        raise OrchestrationError(
            f"a backfill merges the drop into the latest snapshot, but "
            f"{roots['embeddings_root']} has no complete snapshot; run catalog_refresh first")
    published = _read_index_latest(roots["index_root"])
    if published is not None and run_id_of_version(published) > run_id:
        raise OrchestrationError(
            f"index {roots['index_root']} already publishes {published}, newer than this run's "
            f"{run_id}; re-running an older date would move LATEST backwards")
    python = pipeline_python()
    if not os.path.isfile(python):
        raise OrchestrationError(f"the pipeline interpreter {python} (${PIPELINE_PYTHON_ENV}) "
                                 "does not exist")
    plan = RunPlan(kind=kind, run_id=run_id, manifests=tuple(uris),
                   embeddings_root=roots["embeddings_root"], index_root=roots["index_root"],
                   config_file=config_file, config_overrides=overrides, input_rows=input_rows,
                   beam_options=options.get_all_options(drop_default=True))
    log.info("plan %s: %d rows from %d manifest(s); runner %s %s; model %s",
             run_id, input_rows, len(uris), config.runner.name,
             json.dumps(plan.beam_options, sort_keys=True, default=str), config.model.handle)
    return plan


def _read_index_latest(index_root: str) -> str | None:
    from pipelines.index.artifact import read_latest
    return read_latest(index_root)


def previous_snapshot(embeddings_root: str, run_id: str) -> str | None:
    """The snapshot a run builds on: LATEST, or when LATEST is this run's own (a re-run of the
    same date) the newest complete snapshot before it; None when there is none."""
    from pipelines.core import filesystem as fs
    from pipelines.embed import snapshot
    current = snapshot.latest_run_id(embeddings_root)
    if current is not None and current != run_id:
        return snapshot.latest(embeddings_root)
    older = [name for name in fs.list_children(embeddings_root)
             if name < run_id and not name.startswith(".")
             and snapshot.is_complete(snapshot.snapshot_path(embeddings_root, name))]
    return snapshot.snapshot_path(embeddings_root, max(older)) if older else None


# ---------------------------------------------------------------------------------------
# Steps (run in the pipeline interpreter by `python -m pipelines.orchestration.steps STEP`)


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


def run_id_of_version(version: str) -> str:
    """The run id an index version belongs to (its name without a `.rNN` revision)."""
    return version.split(REVISION_SEPARATOR, 1)[0]


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


def _permanent_errors() -> tuple[type[BaseException], ...]:
    """Exceptions of the steps that a retry cannot fix."""
    from pipelines.embed import snapshot
    from pipelines.embed.manifest import ManifestError
    from pipelines.model.resolve import ModelError
    errors: list[type[BaseException]] = [OrchestrationError, ConfigError, ManifestError,
                                         ModelError, snapshot.SnapshotError]
    try:
        from pipelines.embed.job import EmbedError
        errors.append(EmbedError)
    except ImportError:
        pass
    try:
        from pipelines.index.build import IndexBuildError, RecallGateError
        errors.extend([IndexBuildError, RecallGateError])
    except ImportError:
        pass
    return tuple(errors)


def _run_step(step: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    plan = RunPlan.from_dict(payload["plan"])
    from pipelines.core.runner import check_runner_dependencies
    check_runner_dependencies(plan.config(), [*plan.manifests, plan.embeddings_root,
                                              plan.index_root])
    if step == EMBED_STEP:
        return embed_step(plan)
    if step == BUILD_INDEX_STEP:
        return build_index_step(plan, payload["embed_summary"])
    raise OrchestrationError(f"unknown step {step!r}; choose from {', '.join(STEPS)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of a step subprocess: read the payload, run the step, write the result."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.orchestration.steps",
        description="Run one step of an Airflow DAG run (launched by the DAG tasks).")
    parser.add_argument("step", choices=STEPS)
    parser.add_argument("--input", required=True, help="JSON payload: {plan, ...}")
    parser.add_argument("--output", required=True, help="JSON result file to write")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("apache_beam", "absl", "tensorflow", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from pipelines.core.beam_worker import DropKnownNoise
    logging.getLogger().addFilter(DropKnownNoise())
    with open(args.input, encoding="utf-8") as f:
        payload = json.load(f)
    permanent = _permanent_errors()
    try:
        result = _run_step(args.step, payload)
    except permanent as e:
        log.error("%s failed (%s): %s", args.step, type(e).__name__, e)
        _write_result(args.output, {"ok": False, "error": str(e),
                                    "error_type": type(e).__name__})
        return PERMANENT_EXIT_CODE
    _write_result(args.output, {"ok": True, "result": result})
    return 0


def _write_result(path: str, obj: Mapping[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, sort_keys=True, default=str)


def launch_step(step: str, payload: Mapping[str, Any], python: str | None = None,
                echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run a step in a subprocess with the pipeline interpreter; its result, or an error.

    Every line the step prints goes to `echo` (default: this module's logger, i.e. the
    Airflow task log). Raises PermanentStepError (with the step's reason) when the step
    exits with PERMANENT_EXIT_CODE, StepError for any other failure.
    """
    if step not in STEPS:
        raise OrchestrationError(f"unknown step {step!r}; choose from {', '.join(STEPS)}")
    python = python or pipeline_python()
    echo = echo or (lambda line: log.info("%s | %s", step, line))
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix=f"catalog-{step}-") as tmp:
        in_path, out_path = os.path.join(tmp, "input.json"), os.path.join(tmp, "output.json")
        with open(in_path, "w", encoding="utf-8") as f:
            json.dump(payload, f, default=str)
        cmd = [python, "-m", "pipelines.orchestration.steps", step, "--input", in_path,
               "--output", out_path]
        log.info("launching %s: %s", step, " ".join(cmd))
        tail: deque[str] = deque(maxlen=20)
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env, cwd=tmp) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                echo(line)
            rc = proc.wait()
        result = None
        if os.path.exists(out_path):
            with open(out_path, encoding="utf-8") as f:
                result = json.load(f)
    if rc == 0 and result and result.get("ok"):
        return result["result"]
    if rc == PERMANENT_EXIT_CODE and result:
        error: Exception = PermanentStepError(
            f"{step} failed ({result.get('error_type')}): {result['error']}")
    else:
        last = next((line.strip() for line in reversed(tail) if line.strip()), "no output")
        error = StepError(f"{step} exited with status {rc}: {last}\nlast output:\n"
                          + "\n".join(tail))
    log.error("%s", str(error).split("\n", 1)[0])
    raise error


# ---------------------------------------------------------------------------------------
# Publish and hand-off


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
    version = (event_extra or {}).get("version") or _read_index_latest(index_root)
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


def task_defaults(retries: int = 2, retry_delay: timedelta = timedelta(minutes=2)
                  ) -> dict[str, Any]:
    """default_args of the DAGs: retries with exponential backoff, except for failures a retry
    cannot fix (bad params, bad input, failed evaluation gate), which fail the task at once.
    $CATALOG_SEARCH_TASK_RETRIES overrides `retries` (the demo runs with 0)."""
    from airflow.sdk import ExceptionRetryPolicy, RetryAction, RetryRule
    override = os.environ.get(TASK_RETRIES_ENV)
    if override is not None and override.strip():
        try:
            retries = int(override)
        except ValueError:
            raise OrchestrationError(f"${TASK_RETRIES_ENV} must be an integer >= 0, "
                                     f"got {override!r}") from None
        if retries < 0:
            raise OrchestrationError(f"${TASK_RETRIES_ENV} must be >= 0, got {retries}")
    policy = ExceptionRetryPolicy(rules=[RetryRule(
        exception=[PermanentStepError, OrchestrationError], action=RetryAction.FAIL,
        reason="bad params, bad input or a failed evaluation gate: a retry cannot fix it")])
    return {"owner": "catalog-search", "retries": retries, "retry_delay": retry_delay,
            "retry_exponential_backoff": 2.0, "max_retry_delay": timedelta(minutes=30),
            "retry_policy": policy}


if __name__ == "__main__":
    sys.exit(main())


def dag_params(kind: str) -> dict[str, Any]:
    """The typed Airflow Params of a run DAG (JSON-schema checked when a run is triggered)."""
    from airflow.sdk import Param
    defaults = default_params(kind)
    nullable = {"config_file": "string", "runner": "string", "shards": "integer",
                "recall_threshold": "number", "retention": "integer", "model_handle": "string"}
    params: dict[str, Any] = {}
    for key, help_text in PARAM_HELP.items():
        if key == "manifests":
            schema: dict[str, Any] = {"type": "array", "minItems": 1,
                                      "items": {"type": "string", "minLength": 1}}
            if defaults[key] is None:  # backfill: the drop must be named at trigger time
                params[key] = Param(description=help_text, **schema)
                continue
        elif key in ("embeddings_root", "index_root"):
            schema = {"type": "string", "minLength": 1}
        elif key in ("runner_options", "config_overrides"):
            schema = {"type": "object"}
        else:
            schema = {"type": ["null", nullable[key]]}
            if key in ("shards", "retention"):
                schema["minimum"] = 1
            if key == "recall_threshold":
                schema.update(minimum=0, maximum=1)
        params[key] = Param(defaults[key], description=help_text, **schema)
    return params
