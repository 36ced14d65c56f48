"""`catalog-search duplicates`: near-duplicate images across products of the published
index version (pipelines/duplicates/job.py).

    catalog-search duplicates --index-root ROOT [--threshold 0.97] --out DIR [--json]
"""
from __future__ import annotations

import argparse
import json
import sys

from pipelines.core.command import Command, UsageError, check_name_arg, check_uri_arg
from pipelines.core.config import Config


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index-root", required=True, help="index root (local path or gs://, s3://)")
    p.add_argument("--out", required=True,
                   help="folder for duplicates.parquet, duplicates.csv, report.html and "
                        "summary.json")
    p.add_argument("--threshold", type=float,
                   help="cosine similarity at or above which two images of different "
                        "products are near duplicates (default duplicates.threshold)")
    p.add_argument("--version", help="index version (default: what LATEST names)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def _run(args: argparse.Namespace, config: Config) -> int:
    from pipelines.duplicates.job import DuplicatesError, run_duplicates
    if args.threshold is not None:
        if not 0 < args.threshold <= 1:
            raise UsageError(f"--threshold must be in (0, 1], got {args.threshold}")
        if args.threshold < config.duplicates.candidate_threshold:
            config = config.replace(duplicates={"candidate_threshold": args.threshold})
    check_name_arg("--version", args.version)
    for what, uri in (("--index-root", args.index_root), ("--out", args.out)):
        check_uri_arg(what, uri)
    try:
        summary = run_duplicates(args.index_root, args.out, config, threshold=args.threshold,
                                 version=args.version)
    except DuplicatesError as e:
        print(f"catalog-search duplicates: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary, sort_keys=True))
        return 0
    print(f"version      {summary['version']} ({summary['images_scanned']} images searched)\n"
          f"threshold    {summary['threshold']} (candidates >= "
          f"{summary['candidate_threshold']}, pixel check {summary['pixel_threshold']})\n"
          f"pairs        {summary['near_pairs']} near, {summary['exact_pairs']} exact "
          f"({summary['rejected_pairs']} candidates rejected)\n"
          f"groups       {summary['groups']} ({summary['images_in_groups']} images, "
          f"{summary['products_in_groups']} products)\n"
          f"report       {args.out.rstrip('/')}/report.html")
    return 0


COMMANDS = {
    "duplicates": Command(help="near-duplicate images across products of the published index "
                               "(Beam job): duplicates.parquet/.csv + an HTML report",
                          add_arguments=_add_arguments, run=_run),
}
