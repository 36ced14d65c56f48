"""DAG Params -> RunPlan: the checked, serializable plan of one DAG run.

- `validate_params` turns DAG Params into a `RunPlan` (config overrides, run id, checked
  manifests), or refuses them with an `OrchestrationError` naming the param and the
  reason, before any Beam job starts.
- `RunPlan` travels between the DAG tasks (XCom) and into the step subprocesses as JSON,
  with a format version (`RunPlan.to_dict` / `RunPlan.from_dict`).

Run ids come from the DAG run's logical date, `<YYYYmmddTHHMMSSZ>-<kind>`, so they sort in
time order and re-running the same logical date replaces only that run's own snapshot
and index version.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, Mapping, Sequence, cast, get_args

from pipelines.core.config import Config, ConfigError, load_config
from pipelines.core.contract import FORMAT_KEY, Int, Str, check_format, read
from pipelines.orchestration.errors import OrchestrationError

log = logging.getLogger(__name__)

REFRESH, BACKFILL = "refresh", "backfill"
Kind = Literal["refresh", "backfill"]
KINDS: tuple[str, ...] = get_args(Kind)
#: Index versions of a run rebuilt with other content: `<run_id>.r02`, `<run_id>.r03`, ...
REVISION_SEPARATOR = ".r"
#: Environment variable naming the interpreter that runs the Beam jobs.
PIPELINE_PYTHON_ENV = "CATALOG_SEARCH_PYTHON"
#: Environment variable naming the folder the DAG params' default paths live in.
DATA_ROOT_ENV = "CATALOG_SEARCH_DATA"

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
    "train_adapter": "run the train_adapter task (a gated embedding adapter for the index); "
                     "null = config's adapter.enabled",
}



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
        "train_adapter": None,
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




#: Format of a RunPlan's JSON form (the key "format"). Decision on payloads without it: a
#: plan lives only between the tasks of one DAG run, so one without a format (written by the
#: code before the key existed, i.e. a run in flight across an upgrade) is refused with a
#: PlanFormatError naming the field; re-trigger the run.
PLAN_FORMAT = "catalog-search-run-plan/1"


class PlanFormatError(OrchestrationError):
    """A run plan payload does not follow the RunPlan contract (names the field)."""


@dataclass(frozen=True)
class RunPlan:
    """Everything the steps of one DAG run need; JSON round-trips through XCom and into the
    step subprocesses (`to_dict` / `from_dict`, format `PLAN_FORMAT`)."""
    kind: Kind
    run_id: Str
    manifests: tuple[Str, ...]
    embeddings_root: Str
    index_root: Str
    config_file: Str | None
    config_overrides: dict[str, Any] = field(default_factory=dict)
    input_rows: Int = 0
    beam_options: dict[str, Any] = field(default_factory=dict)

    def config(self) -> Config:
        """The run's Config: configs/default.yaml < config_file < overrides from the params."""
        return load_config(self.config_file, self.config_overrides)

    def to_dict(self) -> dict[str, Any]:
        return {FORMAT_KEY: PLAN_FORMAT, "kind": self.kind, "run_id": self.run_id,
                "manifests": list(self.manifests),
                "embeddings_root": self.embeddings_root, "index_root": self.index_root,
                "config_file": self.config_file, "config_overrides": self.config_overrides,
                "input_rows": self.input_rows, "beam_options": self.beam_options}

    @classmethod
    def from_dict(cls, d: Any, source: str = "run plan") -> "RunPlan":
        """The plan from its JSON form; OrchestrationError (PlanFormatError, naming the field)
        when malformed, and when its run_id is not a safe name (checked first, before any
        step deletes or writes)."""
        if isinstance(d, Mapping) and "run_id" in d:
            check_run_id(d["run_id"], "run plan run_id")
        check_format(d, PLAN_FORMAT, source, error=PlanFormatError)

        return read(cls, {"config_file": None, **d}, source, PlanFormatError)


def _optional(params: Mapping[str, Any], key: str, kinds: tuple[type, ...],
              what: str) -> Any:
    value = params.get(key)
    if value is None:
        return None
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
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
            ("model_handle", "model", "handle", (str,), "a model handle"),
            ("train_adapter", "adapter", "enabled", (bool,), "true or false")):
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
    published = read_index_latest(roots["index_root"])
    if published is not None and run_id_of_version(published) > run_id:
        raise OrchestrationError(
            f"index {roots['index_root']} already publishes {published}, newer than this run's "
            f"{run_id}; re-running an older date would move LATEST backwards")
    python = pipeline_python()
    if not os.path.isfile(python):
        raise OrchestrationError(f"the pipeline interpreter {python} (${PIPELINE_PYTHON_ENV}) "
                                 "does not exist")
    plan = RunPlan(kind=cast(Kind, kind), run_id=run_id, manifests=tuple(uris),
                   embeddings_root=roots["embeddings_root"], index_root=roots["index_root"],
                   config_file=config_file, config_overrides=overrides, input_rows=input_rows,
                   beam_options=options.get_all_options(drop_default=True))
    log.info("plan %s: %d rows from %d manifest(s); runner %s %s; model %s",
             run_id, input_rows, len(uris), config.runner.name,
             json.dumps(plan.beam_options, sort_keys=True, default=str), config.model.handle)
    return plan


def read_index_latest(index_root: str) -> str | None:
    """The version the index LATEST names (None: nothing published); shared by steps and hand-off."""
    from pipelines.index.artifact import read_latest
    return read_latest(index_root)


def previous_snapshot(embeddings_root: str, run_id: str) -> str | None:
    """The snapshot a run builds on: LATEST, or when LATEST is this run's own (a re-run of the
    same date) the newest complete snapshot before it; None when there is none.

    LATEST can name an incomplete snapshot: a re-run of the date LATEST names replaces that
    snapshot, and if the re-run then fails its folder is left without a summary. The next
    run then builds on the newest complete snapshot before its own date instead (logged),
    so one failed re-run does not fail every later refresh."""
    from pipelines.core import filesystem as fs
    from pipelines.embed import snapshot
    current = snapshot.latest_run_id(embeddings_root)
    if current is not None and current != run_id:
        path = snapshot.snapshot_path(embeddings_root, current)
        if snapshot.is_complete(path):
            return path
        log.warning("embeddings LATEST names %s, which is not a complete snapshot (a failed "
                    "re-run of that date?): building on the newest complete one before %s",
                    current, run_id)
    older = [name for name in fs.list_children(embeddings_root)
             if name < run_id and not name.startswith(".")
             and snapshot.is_complete(snapshot.snapshot_path(embeddings_root, name))]
    return snapshot.snapshot_path(embeddings_root, max(older)) if older else None


def run_id_of_version(version: str) -> str:
    """The run id an index version belongs to (its name without a `.rNN` revision)."""
    return version.split(REVISION_SEPARATOR, 1)[0]
