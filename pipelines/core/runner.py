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
from typing import Any, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.core.beam_worker import LAUNCHER_PID_ENV
from pipelines.core.config import Config, ConfigError

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


#: The repository (or source tree) root: where setup.py lives in a checkout.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: Example values of configs/dataflow.yaml and configs/flink.yaml that must be replaced.
PLACEHOLDERS = ("my-gcp-project", "my-bucket", "my-registry", "REPLACE_ME")

#: (module that must import, pip extra that provides it) per runner / URI scheme.
_RUNNER_NEEDS = {"DataflowRunner": ("apitools", "apache-beam[gcp]")}
_SCHEME_NEEDS = {"gs": ("google.cloud.storage", "apache-beam[gcp]"),
                 "s3": ("boto3", "apache-beam[aws]")}


def _installed(module: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_runner_dependencies(config: Config, uris: Sequence[str] = ()) -> None:
    """ConfigError (one line, naming the pip extra) when the runner or a URI scheme needs an
    optional dependency of Beam that is not installed; checked before any job starts."""
    beam_version = beam.__version__
    needs = []
    if config.runner.name in _RUNNER_NEEDS:
        needs.append((f"runner {config.runner.name}", *_RUNNER_NEEDS[config.runner.name]))
    values = list(uris) + [v for v in config.runner.options.values() if isinstance(v, str)]
    for uri in values:
        scheme = uri.split("://", 1)[0] if "://" in uri else ""
        if scheme in _SCHEME_NEEDS:
            needs.append((f"{scheme}:// paths", *_SCHEME_NEEDS[scheme]))
    for what, module, extra in needs:
        if not _installed(module):
            raise ConfigError(f"{what} need(s) Beam's optional dependencies, which are not "
                              f"installed: pip install '{extra}=={beam_version}'")


def _check_placeholders(options: dict[str, Any]) -> None:
    for key, value in options.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, str) and any(p in v for p in PLACEHOLDERS):
                raise ConfigError(
                    f"config key runner.options.{key}: {v!r} is an example value of the "
                    f"shipped config; set your own (in the config file, or runner_options "
                    f"in the DAG params)")


def _resolve_setup_file(options: dict[str, Any]) -> None:
    """A relative setup_file is relative to the repository root (where setup.py lives), not
    to the working directory; it must exist."""
    setup_file = options.get("setup_file")
    if not setup_file or "://" in str(setup_file):
        return
    path = os.path.expanduser(str(setup_file))
    if not os.path.isabs(path):
        path = os.path.normpath(os.path.join(REPO_ROOT, path))
    if not os.path.isfile(path):
        raise ConfigError(f"config key runner.options.setup_file: {path} does not exist (a "
                          f"relative path is resolved against {REPO_ROOT}); or use "
                          f"sdk_container_image (docker/worker.Dockerfile) instead")
    options["setup_file"] = path


def pipeline_options(config: Config, job_name: str, extra: dict[str, Any] | None = None
                     ) -> PipelineOptions:
    """PipelineOptions for `config.runner` (direct_* options only for the DirectRunner).

    For a cluster runner: example values of the shipped configs are refused, a relative
    `setup_file` is resolved against the repository root, and the options a runner needs
    must be present (ConfigError naming the key otherwise).
    """
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
    if not r.is_direct:
        _check_placeholders(opts)
        _resolve_setup_file(opts)
    flags = _option_flags(opts)
    if not r.is_direct and r.name == "DataflowRunner":
        missing = [k for k in ("project", "region", "temp_location") if k not in opts]
        if missing:
            raise ConfigError("DataflowRunner needs runner.options " + ", ".join(missing))
    if not r.is_direct and r.name == "FlinkRunner" and "flink_master" not in opts:
        raise ConfigError("FlinkRunner needs runner.options.flink_master (host:port)")
    return PipelineOptions(flags)


def worker_command() -> str:
    """The command line of local SDK worker processes: pipelines.core.beam_worker, which exits
    when the launcher dies, then runs Beam's sdk_worker_main."""
    return f"{shlex.quote(sys.executable)} -m pipelines.core.beam_worker"


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
        environment = None
        if config.runner.direct_running_mode == "multi_processing":
            # Beam's own worker command, through pipelines.core.beam_worker: workers exit when
            # this process dies, and known noise such as "apitools not found" is dropped.
            # The FnApiRunner only uses a given environment in its in_memory mode; the
            # worker count still comes from direct_num_workers.
            from apache_beam.transforms import environments
            environment = environments.SubprocessSDKEnvironment.from_command_string(
                worker_command())
            from apache_beam.options.pipeline_options import DirectOptions
            options.view_as(DirectOptions).direct_running_mode = "in_memory"
            logging.getLogger("apache_beam.runners.portability.fn_api_runner.fn_runner"
                              ).setLevel(logging.ERROR)  # "in_memory with N workers" warning
            os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
        return beam.Pipeline(runner=fn_runner.FnApiRunner(provision_info=provision,
                                                          default_environment=environment),
                             options=options)
    log.info("runner: %s", config.runner.name)
    return beam.Pipeline(options=options)
