"""`catalog-search embed`: catalog manifest(s) -> embeddings snapshot (pipelines/embed/job.py).

    catalog-search embed --manifest M --out ROOT [--previous SNAPSHOT|latest] [--run-id ID]

Exit codes: 0 done, 1 bad input (nothing written), 2 bad arguments, 3 too many rows
dead-lettered (the run failed, LATEST unchanged).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from pipelines.core.command import Command, UsageError, check_name_arg, check_uri_arg
from pipelines.core.config import Config
from pipelines.embed import snapshot
from pipelines.embed.job import DeadLetterRateError, EmbedError, run_embed
from pipelines.embed.summary import SnapshotSummary
from pipelines.embed.transforms import CARRIED, DROPPED, REPLACED

log = logging.getLogger(__name__)
PERMANENT_FAILURE_EXIT_CODE = 3  # as pipelines.orchestration.launcher: a retry cannot fix it


def format_summary(s: SnapshotSummary, ok: bool = True) -> str:
    """The human-readable report of a run (ok=False: a run the failure-rate guard failed)."""
    lines = [
        f"snapshot     {s.snapshot}",
        f"model        {s.model_id}  ({s.dim}-d, views {'+'.join(s.augment['views'])}"
        f", {s.augment['mode']})",
        f"input rows   {s.input_rows}",
        f"  embedded   {s.embedded}",
        f"  reused     {s.reused}",
        f"  dead       {s.dead_lettered}",
    ]
    for reason, n in s.dead_letter_reasons.items():
        lines.append(f"    {reason:<28} {n}")
    for key in (CARRIED, REPLACED, DROPPED):
        if getattr(s, key):
            lines.append(f"{key.replace('_', ' '):<13}{getattr(s, key)}")
    t = s.timings
    lines.append(f"time         {t['total_s']:.1f}s total, {t['pipeline_s']:.1f}s pipeline"
                 + (f", {t['embedded_per_s']:.1f} embedded images/s" if t["embedded_per_s"] else ""))
    lines.append(f"check        {s.input_rows} = {s.embedded} + {s.reused} + {s.dead_lettered}  ok")
    if not ok:
        lines.append(f"status       FAILED: {s.failure or 'too many rows dead-lettered'}")
    return "\n".join(lines)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", action="append", required=True, metavar="URI",
                   help="catalog manifest (CSV, JSONL or Parquet; globs allowed); repeatable")
    p.add_argument("--out", required=True, metavar="ROOT",
                   help="embeddings root; the snapshot goes to ROOT/RUN_ID/")
    p.add_argument("--previous", metavar="SNAPSHOT",
                   help="reuse unchanged vectors from this snapshot; 'latest' = ROOT/LATEST")
    p.add_argument("--merge-previous", action="store_true",
                   help="keep previous rows not in the manifest (catalog-drop backfill)")
    p.add_argument("--verify-content", action="store_true",
                   help="fetch and hash every image even when its change signal (manifest "
                        "updated_at/etag/size or file size + mtime) is unchanged")
    p.add_argument("--run-id", help="snapshot name (default: UTC timestamp); letters, digits, "
                                    "'.', '_', '-', starting with a letter or digit")
    p.add_argument("--max-dead-letter-fraction", type=float, metavar="F",
                   help="override embed.max_dead_letter_fraction: a run dead-lettering more "
                        "than this fraction of its rows fails with exit 3, LATEST unchanged")
    p.add_argument("--model", help="override model.handle")
    p.add_argument("--runner", help="override runner.name (e.g. DataflowRunner)")
    p.add_argument("--workers", type=int, help="override runner.direct_num_workers")
    p.add_argument("--json", action="store_true",
                   help="print the run summary (summary.json) as one JSON object")


def _run(args: argparse.Namespace, config: Config) -> int:
    overrides: dict[str, dict[str, Any]] = {}
    if args.model:
        overrides["model"] = {"handle": args.model}
    if args.runner:
        overrides.setdefault("runner", {})["name"] = args.runner
    if args.workers is not None:
        if args.workers < 1:
            raise UsageError("--workers must be >= 1")
        overrides.setdefault("runner", {})["direct_num_workers"] = args.workers
    if args.max_dead_letter_fraction is not None:
        if not 0 <= args.max_dead_letter_fraction <= 1:
            raise UsageError(f"--max-dead-letter-fraction must be in [0, 1], got "
                             f"{args.max_dead_letter_fraction}")
        overrides["embed"] = {"max_dead_letter_fraction": args.max_dead_letter_fraction}
    if overrides:
        config = config.replace(**overrides)
    check_name_arg("--run-id", args.run_id)
    roots = [("--out", args.out)]
    if args.previous not in (None, "latest"):
        roots.append(("--previous", args.previous))
    for what, uri in roots:
        check_uri_arg(what, uri)
    previous = args.previous
    try:
        if previous == "latest":
            previous = snapshot.latest(args.out)
            if previous is None:
                log.info("no LATEST snapshot under %s yet: embedding everything", args.out)
        summary = run_embed(args.manifest, args.out, config, run_id=args.run_id,
                            previous=previous, merge_previous=args.merge_previous,
                            verify_content=args.verify_content)
    except DeadLetterRateError as e:
        print(format_summary(e.summary, ok=False))
        print(f"catalog-search embed: {e}", file=sys.stderr)
        return PERMANENT_FAILURE_EXIT_CODE
    except (EmbedError, snapshot.SnapshotError) as e:
        print(f"catalog-search embed: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary.to_dict(), sort_keys=True, default=str) if args.json
          else format_summary(summary))
    return 0


COMMANDS = {"embed": Command(help="catalog manifest(s) -> embeddings snapshot (Beam RunInference)",
                             add_arguments=_add_arguments, run=_run)}
