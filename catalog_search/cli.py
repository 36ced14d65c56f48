"""`catalog-search`: one subcommand per job.

Each stage module declares its subcommands in a module-level `COMMANDS` dict:
    COMMANDS = {"name": Command(help=..., add_arguments=fn(parser), run=fn(args, config) -> int)}
and is listed in `_COMMAND_MODULES` below; modules are imported only when needed, so
`catalog-search --help` stays fast and `serve` does not import Beam's runners.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from pipelines.core.beam_worker import DropKnownNoise
from pipelines.core.command import Command, UsageError
from pipelines.core.config import ConfigError, load_config
from pipelines.core.storage_errors import DropStorageTracebacks, describe, storage_failure

# subcommand -> module that implements it (see each module's COMMANDS).
_COMMAND_MODULES = {
    "embed": "pipelines.embed.commands",
    "train-adapter": "pipelines.adapter.commands",
    "build-index": "pipelines.index.commands",
    "index-info": "pipelines.index.commands",
    "delete": "pipelines.index.commands",
    "duplicates": "pipelines.duplicates.commands",
    "query": "serving.cli",
    "serve": "serving.cli",
    "evaluate": "serving.evaluate",
    "model": "pipelines.model.commands",
    "sample-catalog": "pipelines.embed.sample_catalog",
}


def _configure_logging(verbose: bool) -> None:
    """Before any library import: our format, and Beam/TF only when something is wrong."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(DropKnownNoise())  # Beam's "apitools not found" and the like
        handler.addFilter(DropStorageTracebacks())  # a full disk: main() says it in one line
    for noisy in ("apache_beam", "absl", "tensorflow", "h5py", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build_parser(only: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    parser = argparse.ArgumentParser(
        prog="catalog-search",
        description="Catalog visual search: embed a catalog with Beam, build and publish a "
                    "sharded ScaNN index, search it.")
    parser.add_argument("--config", help="YAML file deep-merged over configs/default.yaml")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=_version_text())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands: dict[str, Command] = {}
    for name, module_name in _COMMAND_MODULES.items():
        if only is not None and name != only:
            sub.add_parser(name, help=f"(see catalog-search {name} --help)", add_help=False)
            continue
        module = importlib.import_module(module_name)
        cmd = module.COMMANDS[name]
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        p.add_argument("--config", default=argparse.SUPPRESS,
                       help="YAML file deep-merged over configs/default.yaml")
        cmd.add_arguments(p)
        commands[name] = cmd
    return parser, commands


_HELP_LINES = {
    "embed": "catalog manifest(s) -> embeddings snapshot (Beam RunInference)",
    "train-adapter": "catalog snapshot (+ labelled photos) -> gated linear embedding adapter",
    "build-index": "embeddings snapshot -> sharded ScaNN index version, gated and published",
    "index-info": "versions, LATEST, counts and recall of an index root",
    "delete": "take products / images down now (durable delete delta + takedown list)",
    "duplicates": "near-duplicate images across products of the published index + report",
    "query": "search the published index with image files",
    "serve": "HTTP search API + results page with hot reload",
    "evaluate": "recall/precision/mAP report of an index on labelled queries",
    "model": "convert/inspect the builtin model",
    "sample-catalog": "write the bundled sample catalog (generated images + manifest)",
}


def _version_text() -> str:
    """`catalog-search X.Y.Z` from the installed distribution (or the source tree's setup.py)."""
    from importlib import metadata
    try:
        return f"catalog-search {metadata.version('catalog-visual-search')}"
    except metadata.PackageNotFoundError:
        return "catalog-search (not installed: source tree)"


def _check_dependencies(args: argparse.Namespace, config) -> None:
    """One line naming the pip extra, before any work, when the runner or a gs:// / s3://
    argument needs an optional Beam dependency that is not installed."""
    uris = []
    for value in vars(args).values():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and "://" in v:
                uris.append(v)
    runner = getattr(args, "runner", None)
    if not uris and not runner and config.runner.is_direct:
        return
    from pipelines.core.runner import check_runner_dependencies
    if runner:
        config = config.replace(runner={"name": runner})
    check_runner_dependencies(config, uris)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _configure_logging("-v" in argv or "--verbose" in argv)
    chosen = next((a for a in argv if a in _COMMAND_MODULES), None)
    if chosen is None:
        top = argparse.ArgumentParser(
            prog="catalog-search",
            description="Catalog visual search: embed a catalog with Beam, build and publish a "
                        "sharded ScaNN index, search it.",
            epilog="commands:\n" + "\n".join(f"  {k:<15} {v}" for k, v in _HELP_LINES.items())
                   + "\n\nRun `catalog-search COMMAND --help` for a command's options.",
            formatter_class=argparse.RawDescriptionHelpFormatter)
        top.add_argument("--config", help="YAML file deep-merged over configs/default.yaml")
        top.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        top.add_argument("--version", action="version", version=_version_text())
        top.add_argument("command", nargs="?", help="one of: " + ", ".join(_COMMAND_MODULES))
        args, _ = top.parse_known_args(argv)
        if args.command and args.command not in _COMMAND_MODULES:
            top.error(f"unknown command {args.command!r}; choose from "
                      + ", ".join(_COMMAND_MODULES))
        top.print_help()
        return 2
    parser, commands = build_parser(only=chosen)
    args = parser.parse_args(argv)
    try:
        config = load_config(getattr(args, "config", None))
        _check_dependencies(args, config)
        return int(commands[args.command].run(args, config) or 0)
    except ConfigError as e:
        print(f"catalog-search {args.command}: configuration error: {e}", file=sys.stderr)
        return 2
    except UsageError as e:
        print(f"catalog-search {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a full disk / read-only root anywhere: one line, exit 1
        failure = storage_failure(e)
        if failure is None:
            raise
        print(f"catalog-search {args.command}: {describe(failure)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
