"""The index commands: `catalog-search build-index` (pipelines/index/build.py) and
`catalog-search index-info` (what an index root holds, optionally verified).

    catalog-search build-index --embeddings SNAPSHOT_OR_ROOT --index-root ROOT [--shards N]
    catalog-search index-info --index-root ROOT [--verify] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pipelines.core.command import Command, UsageError, check_uri_arg
from pipelines.core.config import Config
from pipelines.core.names import InvalidNameError, check_segment
from pipelines.index import artifact as art
from pipelines.index.build import IndexBuildError, RecallGateError, run_build_index


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embeddings", required=True,
                   help="embeddings snapshot folder, or an embeddings root (its LATEST)")
    p.add_argument("--index-root", required=True, help="index root (local path or gs://, s3://)")
    p.add_argument("--shards", type=int, help="number of shards (default: config index.shards)")
    p.add_argument("--version", help="version name (default: UTC time + short hash)")
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON object instead of text")
    p.add_argument("--recall-threshold", type=float,
                   help="override index.recall_threshold (recall@k below it: not published)")


def _run(args: argparse.Namespace, config: Config) -> int:
    overrides: dict[str, Any] = {}
    if args.shards is not None:
        if args.shards < 1:
            raise UsageError(f"--shards must be >= 1, got {args.shards}")
        overrides["shards"] = args.shards
    if args.recall_threshold is not None:
        if not 0 <= args.recall_threshold <= 1:
            raise UsageError(f"--recall-threshold must be in [0, 1], got {args.recall_threshold}")
        overrides["recall_threshold"] = args.recall_threshold
    if overrides:
        config = config.replace(index=overrides)
    if args.version is not None:
        try:
            check_segment(args.version, "--version")
        except InvalidNameError as e:
            raise UsageError(str(e)) from e
    for what, uri in (("--embeddings", args.embeddings), ("--index-root", args.index_root)):
        check_uri_arg(what, uri)
    try:
        manifest = run_build_index(args.embeddings, args.index_root, config,
                                   version=args.version)
    except IndexBuildError as e:
        print(f"catalog-search build-index: bad input, nothing published: {e}", file=sys.stderr)
        return 1
    except RecallGateError as e:
        print(f"catalog-search build-index: {e}", file=sys.stderr)
        return 3
    ev = manifest["evaluation"]
    result = {"version": manifest["version"], "latest": art.read_latest(args.index_root),
              "num_vectors": manifest["num_vectors"], "shards": len(manifest["shards"]),
              ev["metric"]: ev[ev["metric"]], "recall@1": ev["recall@1"],
              "threshold": ev["threshold"]}
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return 0
    print(f"version      {result['version']}  "
          f"({'published as LATEST' if result['latest'] == result['version'] else 'passed; LATEST is ' + str(result['latest'])})\n"
          f"vectors      {result['num_vectors']} in {result['shards']} shard(s)\n"
          f"evaluation   {ev['metric']} {ev[ev['metric']]:.4f}, recall@1 {ev['recall@1']:.4f} "
          f"(threshold {ev['threshold']:.2f})\n"
          f"index root   {args.index_root}")
    return 0


COMMANDS = {
    "build-index": Command(
        help="embeddings snapshot -> sharded ScaNN index version, gated and published "
             "(exit 1: bad input, 3: recall gate failed)",
        add_arguments=_add_arguments, run=_run),
}
