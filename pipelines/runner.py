"""Beam runner selection and pipeline options, from `config.runner`.

DirectRunner: Beam's DirectRunner would first try the Prism runner, which downloads
a binary, and fall back when that fails. Locally we go straight to the engine the
DirectRunner falls back to for batch pipelines (the portable FnApiRunner), with
`direct_running_mode` and `direct_num_workers` from the config: quiet, offline and
the same on every run. Any other runner name is passed to Beam as is, with
`config.runner.options` as pipeline options.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shlex
import sys
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.beam_worker import LAUNCHER_PID_ENV
from pipelines.config import Config, ConfigError

log = logging.getLogger(__name__)


def _option_flags(options: dict[str, Any]) -> list[str]:
    flags = []
    for key, value in options.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"config key runner.options.{key}: not a pipeline option name")
        if isinstance(value, bool):
            if value:
                flags.append(f"--{key}")
        elif isinstance(value, (list, tuple)):
            flags.extend(f"--{key}={v}" for v in value)
        elif value is not None:
            flags.append(f"--{key}={value}")
    return flags


def pipeline_options(config: Config, job_name: str, extra: dict[str, Any] | None = None
                     ) -> PipelineOptions:
    """PipelineOptions for `config.runner` (direct_* options only for the DirectRunner)."""
    r = config.runner
    opts: dict[str, Any] = {"job_name": re.sub(r"[^a-z0-9-]", "-", job_name.lower())[:60]}
    if r.is_direct:
        opts.update(direct_num_workers=r.direct_num_workers,
                    direct_running_mode=r.direct_running_mode,
                    # Workers: our own progress logs, Beam/TF only when something is wrong.
                    default_sdk_harness_log_level="ERROR",
                    sdk_harness_log_level_overrides=json.dumps({"pipelines": "INFO"}))
    else:
        opts["runner"] = r.name
    opts.update(r.options)
    opts.update(extra or {})
    flags = _option_flags(opts)
    if not r.is_direct and r.name == "DataflowRunner":
        missing = [k for k in ("project", "region", "temp_location") if k not in opts]
        if missing:
            raise ConfigError("DataflowRunner needs runner.options " + ", ".join(missing))
    if not r.is_direct and r.name == "FlinkRunner" and "flink_master" not in opts:
        raise ConfigError("FlinkRunner needs runner.options.flink_master (host:port)")
    return PipelineOptions(flags)


def worker_command() -> str:
    """The command line of local SDK worker processes: pipelines.beam_worker, which exits
    when the launcher dies, then runs Beam's sdk_worker_main."""
    return f"{shlex.quote(sys.executable)} -m pipelines.beam_worker"


def _watched_runner_class():
    """FnApiRunner whose multi-processing workers start through `worker_command()`.

    FnApiRunner.run_pipeline sets its default environment to a SubprocessSDKEnvironment
    running `python -m apache_beam.runners.worker.sdk_worker_main`; this subclass turns
    that assignment into the same environment with our worker command.
    """
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.transforms import environments

    class WatchedFnApiRunner(fn_runner.FnApiRunner):
        @property
        def _default_environment(self):
            return self.__dict__.get("_watched_default_environment")

        @_default_environment.setter
        def _default_environment(self, env) -> None:
            if isinstance(env, environments.SubprocessSDKEnvironment):
                env = environments.SubprocessSDKEnvironment.from_command_string(
                    command_string=worker_command())
            self.__dict__["_watched_default_environment"] = env

    return WatchedFnApiRunner


def make_pipeline(config: Config, job_name: str, extra: dict[str, Any] | None = None
                  ) -> beam.Pipeline:
    """A Beam Pipeline on the configured runner."""
    options = pipeline_options(config, job_name, extra)
    if config.runner.is_direct:
        from apache_beam.portability.api import beam_provision_api_pb2
        from apache_beam.runners.portability.fn_api_runner import fn_runner
        from apache_beam.runners.portability.portable_runner import JobServiceHandle
        # Workers are subprocesses started by the FnApiRunner: they inherit the env.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        # Worker logs reach stderr directly; the job service would repeat each of them.
        logging.getLogger("apache_beam.runners.portability.local_job_service").setLevel(
            logging.ERROR)
        log.info("runner: DirectRunner engine (FnApiRunner), %s, %d workers",
                 config.runner.direct_running_mode, config.runner.direct_num_workers)
        # As DirectRunner does: hand the options to the workers (log levels among them).
        encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
        provision = fn_runner.ExtendedProvisionInfo(
            beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
        # Workers exit when this process dies (pipelines/beam_worker.py).
        os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
        return beam.Pipeline(runner=_watched_runner_class()(provision_info=provision),
                             options=options)
    log.info("runner: %s", config.runner.name)
    return beam.Pipeline(options=options)
