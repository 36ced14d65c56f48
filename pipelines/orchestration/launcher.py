"""Runs one Beam step of a DAG run in a subprocess with the pipeline's interpreter.

`launch_step` (in the Airflow worker) runs `python -m pipelines.orchestration.launcher STEP
--input payload.json --output result.json` with the pipeline's interpreter, streams its
output into the task log and returns its JSON result. `main` is that subprocess: it reads
the payload ({"plan": RunPlan, "embed_summary": ...}), runs the step
(pipelines.orchestration.steps) and writes {"ok": true, "result": ...}. A step that fails
for a reason a retry cannot fix (a `CatalogSearchError` whose `permanent` is true:
bad input, a failed evaluation gate; pipelines/core/errors.py) exits with
`PERMANENT_EXIT_CODE` and becomes a `PermanentStepError` (the DAGs' retry policy fails
the task at once); any other failure is a `StepError` (retried with backoff).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections import deque
from typing import Any, Callable, Mapping, Sequence

from pipelines.core.errors import CatalogSearchError
from pipelines.orchestration.errors import OrchestrationError, PermanentStepError, StepError
from pipelines.orchestration.plan import RunPlan, pipeline_python

log = logging.getLogger(__name__)

EMBED_STEP, BUILD_INDEX_STEP = "embed", "build_index"
TRAIN_ADAPTER_STEP, DUPLICATES_STEP = "train_adapter", "duplicates"
# catalog_backfill: the drop as a delta of LATEST, or a full build (delta_step.py)
BACKFILL_INDEX_STEP = "backfill_index"
STEPS = (EMBED_STEP, TRAIN_ADAPTER_STEP, BUILD_INDEX_STEP, DUPLICATES_STEP, BACKFILL_INDEX_STEP)
#: Exit code of a step subprocess that failed for a reason a retry cannot fix.
PERMANENT_EXIT_CODE = 3
#: The module a step subprocess runs (`python -m STEP_MODULE STEP --input .. --output ..`).
STEP_MODULE = "pipelines.orchestration.launcher"

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_step(step: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    plan = RunPlan.from_dict(payload["plan"])
    from pipelines.core.runner import check_runner_dependencies
    check_runner_dependencies(plan.config(), [*plan.manifests, plan.embeddings_root,
                                              plan.index_root])
    from pipelines.orchestration.steps import (build_index_step, duplicates_step, embed_step,
                                               train_adapter_step)
    if step == EMBED_STEP:
        return embed_step(plan).to_dict()
    if step == DUPLICATES_STEP:
        version = (payload.get("index_manifest") or {}).get("version")
        if not isinstance(version, str):
            raise OrchestrationError(f"{step} payload: index_manifest.version is missing")
        return duplicates_step(plan, version)
    if step in (BUILD_INDEX_STEP, BACKFILL_INDEX_STEP, TRAIN_ADAPTER_STEP):
        from pipelines.embed.summary import SnapshotSummary
        summary = SnapshotSummary.from_dict(payload.get("embed_summary"),
                                            f"{step} payload embed_summary")
        if step == BACKFILL_INDEX_STEP:
            from pipelines.orchestration.delta_step import backfill_index_step
            return backfill_index_step(plan, summary)
        if step == TRAIN_ADAPTER_STEP:
            return train_adapter_step(plan, summary)
        adapter_result = payload.get("adapter_result")
        if adapter_result is not None and not isinstance(adapter_result, dict):
            raise OrchestrationError(f"{step} payload adapter_result must be an object")
        return build_index_step(plan, summary, adapter_result).to_dict()
    raise OrchestrationError(f"unknown step {step!r}; choose from {', '.join(STEPS)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of a step subprocess: read the payload, run the step, write the result."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {STEP_MODULE}",
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
    try:
        result = _run_step(args.step, payload)
    except CatalogSearchError as e:
        if not e.permanent:
            raise
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
        cmd = [python, "-m", STEP_MODULE, step, "--input", in_path,
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


if __name__ == "__main__":
    sys.exit(main())
