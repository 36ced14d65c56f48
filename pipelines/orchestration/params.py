"""What the DAG files declare: typed Airflow Params, task defaults (retry policy), the Asset."""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from pipelines.core.errors import BadInputError, RefusedError
from pipelines.orchestration.errors import OrchestrationError, PermanentStepError
from pipelines.orchestration.plan import PARAM_HELP, default_params

#: Environment variable overriding the DAG tasks' retry count (the demo sets 0: fail fast).
TASK_RETRIES_ENV = "CATALOG_SEARCH_TASK_RETRIES"

#: The Airflow Asset both refresh and backfill update (see dags/); consumers schedule on it.
INDEX_ASSET_NAME = "catalog_search_index"
INDEX_ASSET_URI = "catalog-search://index/latest"


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
    # The permanent kinds (pipelines/core/errors.py): a step subprocess's permanent error
    # arrives as PermanentStepError; bad params and XCom results raised here are bad input.
    policy = ExceptionRetryPolicy(rules=[RetryRule(
        exception=[PermanentStepError, BadInputError, RefusedError], action=RetryAction.FAIL,
        reason="bad params, bad input or a failed evaluation gate: a retry cannot fix it")])
    return {"owner": "catalog-search", "retries": retries, "retry_delay": retry_delay,
            "retry_exponential_backoff": 2.0, "max_retry_delay": timedelta(minutes=30),
            "retry_policy": policy}


def dag_params(kind: str) -> dict[str, Any]:
    """The typed Airflow Params of a run DAG (JSON-schema checked when a run is triggered)."""
    from airflow.sdk import Param
    defaults = default_params(kind)
    nullable = {"config_file": "string", "runner": "string", "shards": "integer",
                "recall_threshold": "number", "retention": "integer", "model_handle": "string",
                "train_adapter": "boolean"}
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
