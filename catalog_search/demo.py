"""`make demo`: the catalog_refresh DAG end to end, offline, on a throw-away Airflow.

    python -m catalog_search.demo --workdir out/demo [--products 20 --images-per-product 3]

1. writes the bundled sample catalog (generated product images + labelled query photos);
2. points Airflow at a fresh SQLite AIRFLOW_HOME under the workdir (dags/ as DAGs folder)
   and creates its database;
3. runs catalog_refresh with `dag.test()` (embed -> build index + gate -> publish LATEST
   -> index Asset event), then index_handoff, which records the new version;
4. looks up the query photos in the published index and prints a table, and writes the
   HTML results page of `serving.evaluate`.

`python -m catalog_search.demo run-dag DAG_ID --airflow-home DIR [--conf JSON] [--logical-date
ISO]` runs any of the DAGs once the same way and prints a JSON report (the DAG tests use it).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

from pipelines.orchestration.airflow_local import ignore_known_warnings, write_local_settings
from pipelines.core.errors import UnavailableError

log = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAGS_FOLDER = os.path.join(REPO_ROOT, "dags")


class DemoError(UnavailableError):
    """The local Airflow cannot run a DAG (import errors, unknown DAG, Airflow imported early)."""


def use_airflow_home(home: str, dags_folder: str = DAGS_FOLDER) -> None:
    """Point this process at a SQLite Airflow home with our DAGs, and create its database.

    Must run before anything imports airflow: Airflow reads its configuration once, at
    import time.
    """
    home = os.path.abspath(home)
    ignore_known_warnings()  # Starlette's TestClient notice, raised in dag.test()
    if "airflow" in sys.modules and os.environ.get("AIRFLOW_HOME") != home:
        raise DemoError("airflow was imported before use_airflow_home(); its configuration "
                        f"already points at {os.environ.get('AIRFLOW_HOME') or '~/airflow'}")
    os.makedirs(home, exist_ok=True)
    write_local_settings(home)  # the same filters in Airflow processes run on this home
    os.environ.update({
        "AIRFLOW_HOME": home,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": os.path.abspath(dags_folder),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{os.path.join(home, 'airflow.db')}",
    })
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from airflow.utils import db
    db.upgradedb()  # what `airflow db migrate` runs


def run_dag(dag_id: str, run_conf: Mapping[str, Any] | None = None,
            logical_date: datetime | None = None) -> dict[str, Any]:
    """Run one DAG with dag.test() in this process; a report of the run.

    Report: dag_id, run_id, state, seconds, tasks {task_id: state}, asset_events [extra].
    """
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    bag = DagBag(dag_folder=os.environ.get("AIRFLOW__CORE__DAGS_FOLDER", DAGS_FOLDER))
    if bag.import_errors:
        raise DemoError("DAG import errors: " + json.dumps(bag.import_errors, indent=2))
    dag = bag.get_dag(dag_id)
    if dag is None:
        raise DemoError(f"no DAG {dag_id!r} in {bag.dag_folder}; found {sorted(bag.dag_ids)}")
    started = time.time()
    dag_run = dag.test(logical_date=logical_date, run_conf=dict(run_conf or {}))
    seconds = time.time() - started
    with create_session() as session:
        tasks = {ti.task_id: str(ti.state.value if hasattr(ti.state, "value") else ti.state)
                 for ti in dag_run.get_task_instances(session=session)}
        events = (session.query(AssetEvent)
                  .filter(AssetEvent.source_dag_id == dag_id,
                          AssetEvent.source_run_id == dag_run.run_id)
                  .order_by(AssetEvent.id).all())
        extras = [dict(e.extra or {}) for e in events]
    state = dag_run.state.value if hasattr(dag_run.state, "value") else str(dag_run.state)
    return {"dag_id": dag_id, "run_id": dag_run.run_id, "state": state,
            "seconds": round(seconds, 1), "tasks": tasks, "asset_events": extras}


def _titles(manifest: str) -> dict[str, str]:
    with open(manifest, newline="", encoding="utf-8") as f:
        return {r["product_id"]: r.get("title", "") for r in csv.DictReader(f)}


def lookup_table(report: Mapping[str, Any], titles: Mapping[str, str], rows: int = 12) -> str:
    """The first `rows` query photos of an evaluate() report and their top results, as text."""
    lines = [f"{'query photo':<16} {'product':<30} {'top 3 results (product, score)':<52} top-1"]
    for q in report["per_query"][:rows]:
        results = ", ".join(f"{r['product_id']} {r['score']:.2f}" for r in q["results"][:3])
        hit = "yes" if q["results"] and q["results"][0]["hit"] else "no"
        title = f"{q['product_id']} {titles.get(q['product_id'], '')}"[:30]
        lines.append(f"{os.path.basename(q['image_uri']):<16} {title:<30} {results:<52} {hit}")
    lines.append('top-1 "no": the first result is another product. Misses are expected on '
                 "this synthetic catalog (generated products of one category share a shape; "
                 "query photos add clutter); recall@5 below counts a hit in the top 5.")
    return "\n".join(lines)


def run_demo(workdir: str, products: int = 20, images_per_product: int = 3, size: int = 320,
             model_handle: str | None = None, shards: int = 2,
             config_file: str | None = None) -> dict[str, Any]:
    """The whole demo (see the module docstring); returns the refresh run's report."""
    from pipelines.embed.sample_catalog import write_catalog

    workdir = os.path.abspath(workdir)
    for sub in ("airflow", "embeddings", "index", "report"):
        shutil.rmtree(os.path.join(workdir, sub), ignore_errors=True)
    catalog_dir = os.path.join(workdir, "catalog")
    print(f"writing the sample catalog ({products} products x {images_per_product} images, "
          f"{products * 2} query photos) to {catalog_dir}")
    manifest = write_catalog(catalog_dir, num_products=products,
                             images_per_product=images_per_product, size=size, seed=0,
                             queries_per_product=2, relative_uris=True)
    queries = os.path.join(catalog_dir, "queries.csv")
    print(f"Airflow home (SQLite): {os.path.join(workdir, 'airflow')}")
    use_airflow_home(os.path.join(workdir, "airflow"))

    index_root = os.path.join(workdir, "index")
    conf: dict[str, Any] = {"manifests": [manifest],
                            "embeddings_root": os.path.join(workdir, "embeddings"),
                            "index_root": index_root, "shards": shards}
    if model_handle:
        conf["model_handle"] = model_handle
    if config_file:
        conf["config_file"] = os.path.abspath(config_file)
    print("running catalog_refresh with dag.test(), conf:", json.dumps(conf))
    errors = _ErrorLines()
    logging.getLogger("pipelines").addHandler(errors)
    try:
        report = run_dag("catalog_refresh", conf)
    finally:
        logging.getLogger("pipelines").removeHandler(errors)
    _print_run(report)
    if report["state"] != "success":
        failed = [t for t, state in report["tasks"].items() if state == "failed"]
        raise DemoError(f"catalog_refresh ended {report['state']} (failed: "
                        f"{', '.join(failed) or 'none'}): "
                        + (errors.lines[-1] if errors.lines else "see the task log above"))
    handoff = run_dag("index_handoff", {"index_root": index_root})
    _print_run(handoff)

    from pipelines.core.config import load_config
    from serving.evaluate import evaluate
    config = load_config(config_file,
                         overrides={"model": {"handle": model_handle}} if model_handle else None)
    out_dir = os.path.join(workdir, "report")
    result = evaluate(index_root, queries, out_dir, config)
    print()
    print(f"sample lookups in index version {result['version']} "
          f"({result['num_vectors']} vectors, {result['num_products']} products):")
    print(lookup_table(result, _titles(manifest)))
    overall = result["overall"]["index"]
    print(f"\n{result['queries']} query photos: recall@1 {overall['recall@1']:.3f}, "
          f"recall@5 {overall['recall@5']:.3f}, mAP@10 {overall['mAP@10']:.3f}")
    print(f"results page: {os.path.join(out_dir, 'report.html')}")
    return report


class _ErrorLines(logging.Handler):
    """Keeps the ERROR messages of our loggers (a failed step's reason) for the final line."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage().split("\n", 1)[0])


def _print_run(report: Mapping[str, Any]) -> None:
    print(f"\n{report['dag_id']} {report['run_id']}: {report['state']} in "
          f"{report['seconds']:.1f}s")
    for task_id, state in report["tasks"].items():
        print(f"  {task_id:<24} {state}")
    for extra in report["asset_events"]:
        print(f"  asset event {json.dumps(extra, sort_keys=True)}")


def _parse_date(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--logical-date {text!r} is not an ISO date: {e}") from e
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _run_dag_cli(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m catalog_search.demo run-dag",
                                description="Run one DAG once with dag.test() on a SQLite "
                                            "Airflow home; prints a JSON report.")
    p.add_argument("dag_id")
    p.add_argument("--airflow-home", required=True, help="Airflow home (created if missing)")
    p.add_argument("--conf", default="{}", help="run conf (JSON object): the DAG's Params")
    p.add_argument("--logical-date", type=_parse_date, help="ISO date (default: now)")
    p.add_argument("--report", help="also write the JSON report to this file")
    args = p.parse_args(argv)
    try:
        conf = json.loads(args.conf)
    except json.JSONDecodeError as e:
        p.error(f"--conf is not JSON: {e}")
    if not isinstance(conf, dict):
        p.error(f"--conf must be a JSON object, got {args.conf!r}")
    use_airflow_home(args.airflow_home)
    try:
        report = run_dag(args.dag_id, conf, args.logical_date)
    except Exception as e:  # Param validation, import errors: report them, not a traceback
        report = {"dag_id": args.dag_id, "state": "refused", "error": f"{type(e).__name__}: {e}",
                  "tasks": {}, "asset_events": []}
    text = json.dumps(report, sort_keys=True)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            f.write(text)
    print("DAG_RUN_REPORT " + text)
    return 0 if report["state"] == "success" else 1


#: Set in the demo's own child process (the parent only supervises it).
_CHILD_ENV = "CATALOG_SEARCH_DEMO_CHILD"


class DropSettlingPass(logging.Filter):
    """Drops dag.test()'s "No tasks to run" warning for a pass in which the unrunnable tasks
    only await being marked upstream_failed (a failed step's indirect downstream tasks, e.g.
    duplicates behind build_index: Airflow marks them one scheduling pass later). The warning
    stays when any of them waits to be retried or rescheduled (a retry wait loop)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("No tasks to run") or not record.args:
            return True
        unrunnable = record.args[0] if isinstance(record.args, tuple) else record.args
        if not isinstance(unrunnable, (set, frozenset, list)):
            return True
        return any(getattr(ti, "state", None) is not None for ti in unrunnable)


def _quiet_airflow() -> None:
    """Hide Airflow's internals (DAG parsing, scheduling loop, task runner) unless -v.

    Task logs (our steps' output, progress lines, errors) still show: the `pipelines`
    loggers write to stdout themselves.
    """
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("AIRFLOW__LOGGING__FAB_LOGGING_LEVEL", "WARNING")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ours = logging.getLogger("pipelines")
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run-dag":
        return _run_dag_cli(argv[1:])
    p = argparse.ArgumentParser(prog="python -m catalog_search.demo",
                                description="Run catalog_refresh end to end with dag.test() on "
                                            "the sample catalog, then show sample lookups. "
                                            "Tasks are not retried: a failing step ends the "
                                            "demo with its error (exit 1); Ctrl-C stops it and "
                                            "every process it started.")
    p.add_argument("--workdir", default="out/demo", help="everything goes here (default out/demo)")
    p.add_argument("--products", type=int, default=20, help="sample catalog products (default 20)")
    p.add_argument("--images-per-product", type=int, default=3,
                   help="catalog images per product (default 3)")
    p.add_argument("--size", type=int, default=320, help="image side in pixels")
    p.add_argument("--model", help="model handle (default: the config's, builtin efficientnet)")
    p.add_argument("--shards", type=int, default=2, help="index shards (default 2)")
    p.add_argument("--config", help="YAML config file for the run (the DAG's config_file param)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show Airflow's own logs (DAG parsing, scheduling, task runner)")
    args = p.parse_args(argv)
    if args.products < 2 or args.images_per_product < 1 or args.size < 64 or args.shards < 1:
        p.error("--products must be >= 2, --images-per-product >= 1, --size >= 64, --shards >= 1")
    if args.config and not os.path.isfile(args.config):
        p.error(f"--config {args.config}: no such file")
    if os.environ.get(_CHILD_ENV) != "1":
        # Supervise: the demo runs in its own process group, so Ctrl-C / SIGTERM stop it,
        # its Beam step subprocesses and their workers (dag.test itself ignores SIGTERM).
        from pipelines.core.procgroup import run_supervised
        env = dict(os.environ, **{_CHILD_ENV: "1"})
        rc = run_supervised([sys.executable, "-m", "catalog_search.demo", *argv], env=env)
        if rc > 128:
            print(f"demo: stopped by signal {rc - 128}", file=sys.stderr)
        return rc
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pipelines.orchestration.params import TASK_RETRIES_ENV
    os.environ[TASK_RETRIES_ENV] = "0"  # fail fast: a demo step is not retried
    from pipelines.core.beam_worker import DropKnownNoise
    logging.getLogger().addFilter(DropKnownNoise())
    logging.getLogger("airflow.sdk.definitions.dag").addFilter(DropSettlingPass())
    if args.verbose:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    else:
        _quiet_airflow()
    try:
        report = run_demo(args.workdir, args.products, args.images_per_product, args.size,
                          args.model, args.shards, args.config)
    except DemoError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 1
    return 0 if report["state"] == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
