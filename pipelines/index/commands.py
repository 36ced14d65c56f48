"""The index commands: `catalog-search build-index` (pipelines/index/build.py) and
`catalog-search index-info` (what an index root holds, optionally verified).

    catalog-search build-index --embeddings SNAPSHOT_OR_ROOT --index-root ROOT [--shards N]
    catalog-search index-info --index-root ROOT [--verify] [--json]
    catalog-search delete --index-root ROOT --product-id P ... [--image-id I ...] [--restore]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from pipelines.core import filesystem as fs
from pipelines.core.command import Command, UsageError, check_name_arg, check_uri_arg
from pipelines.core.config import Config
from pipelines.core.names import is_safe_segment
from pipelines.index import artifact as art
from pipelines.index.artifact import (STATUS_INCOMPLETE, STATUS_PASSED, STATUS_REJECTED,
                                      IndexArtifactError, VersionInfo, manifest_uri,
                                      read_latest, read_manifest, versions_dir)
from pipelines.index.build import IndexBuildError, RecallGateError, run_build_index
from pipelines.index.reader import verify_version


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embeddings", required=True,
                   help="embeddings snapshot folder, or an embeddings root (its LATEST)")
    p.add_argument("--index-root", required=True, help="index root (local path or gs://, s3://)")
    p.add_argument("--shards", type=int, help="number of shards (default: config index.shards)")
    p.add_argument("--version", help="version name (default: UTC time + short hash)")
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON object instead of text")
    p.add_argument("--adapter", metavar="ADAPTER_DIR",
                   help="build over adapter(raw) vectors (catalog-search train-adapter; "
                        "default: config index.adapter); the version carries the adapter")
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
    if args.adapter is not None:
        overrides["adapter"] = check_uri_arg("--adapter", args.adapter)
    if overrides:
        config = config.replace(index=overrides)
    check_name_arg("--version", args.version)
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
    ev = manifest.evaluation
    result = {"version": manifest.version, "latest": art.read_latest(args.index_root),
              "num_vectors": manifest.num_vectors, "shards": manifest.num_shards,
              ev["metric"]: ev[ev["metric"]], "recall@1": ev["recall@1"],
              "threshold": ev["threshold"], "dim": manifest.dim,
              "adapter": (manifest.adapter or {}).get("id")}
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return 0
    print(f"version      {result['version']}  "
          f"({'published as LATEST' if result['latest'] == result['version'] else 'passed; LATEST is ' + str(result['latest'])})\n"
          f"vectors      {result['num_vectors']} x {manifest.dim}-d in {result['shards']} "
          f"shard(s)" + (f", adapter {result['adapter']}" if result['adapter'] else "") + "\n"
          f"evaluation   {ev['metric']} {ev[ev['metric']]:.4f}, recall@1 {ev['recall@1']:.4f} "
          f"(threshold {ev['threshold']:.2f})\n"
          f"index root   {args.index_root}")
    return 0


# --------------------------------------------------------------------------- index-info

def _add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index-root", required=True,
                   help="index root (local path, file://, gs://, s3://)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--verify", action="store_true",
                   help="verify every version with a manifest (checksums, row counts, vector "
                        "norms, searchers load); corrupted ones are reported as such; exit 1 "
                        "when any is corrupted")


STATUS_CORRUPTED = "corrupted"


def info_report(index_root: str, verify: bool = False) -> dict[str, Any]:
    """What `index-info` prints: LATEST, and each version's state and summary.

    Never raises for a damaged root: a LATEST that holds garbage is reported under
    `latest_error`; with `verify`, a version that fails verification gets state
    "corrupted" and its reason under `error` (a passed version is only reported passed
    when it verifies).
    """
    report: dict[str, Any] = {"index_root": index_root, "latest": None, "latest_error": None,
                              "verified": verify, "versions": []}
    try:
        report["latest"] = read_latest(index_root)
    except IndexArtifactError as e:
        report["latest_error"] = str(e)
    names = fs.list_children(versions_dir(index_root))
    for name in names:
        if not is_safe_segment(name):
            continue
        entry: dict[str, Any] = {"version": name, "state": STATUS_INCOMPLETE,
                                 "latest": name == report["latest"], "error": None}
        if not fs.exists(manifest_uri(index_root, name)):
            entry["building"] = art.is_being_built(index_root, name)
            entry["error"] = (
                "no manifest.json: a build is writing it" if entry["building"] else
                "no manifest.json: an interrupted build, never published (re-run build-index "
                "--version with this name to replace it; retention removes it later)")
            if verify:
                entry["verified"] = False
        manifest = None
        if fs.exists(manifest_uri(index_root, name)):
            try:
                manifest = read_manifest(index_root, name)
            except IndexArtifactError as e:
                entry.update(state=STATUS_CORRUPTED, error=str(e))
        if manifest is not None:
            info = VersionInfo(name, STATUS_PASSED if manifest.passed else STATUS_REJECTED,
                               entry["latest"], manifest)
            entry.update(info.summary())
            entry["error"] = None
            if verify:
                try:
                    verify_version(index_root, name)
                    entry["verified"] = True
                except Exception as e:  # any failure to load is a corrupted version
                    entry.update(state=STATUS_CORRUPTED, verified=False,
                                 error=f"{type(e).__name__}: {e}"
                                 if not isinstance(e, IndexArtifactError) else str(e))
        if manifest is not None:
            entry["deltas"] = _delta_report(index_root, manifest, entry["latest"])
        report["versions"].append(entry)
    if report["latest"] and report["latest"] not in names:
        report["latest_error"] = (f"LATEST names {report['latest']}, which does not exist "
                                  f"under {versions_dir(index_root)}")
    return report


def _delta_report(index_root: str, manifest: Any, latest: bool) -> dict[str, Any] | None:
    """A version's delta log (pipelines/index/deltas.py): deltas, rows added, ids deleted,
    age; for LATEST also what serving holds (base + added - removed = searchable rows,
    with the takedown list)."""
    from pipelines.index import deltas as dl
    from pipelines.index import takedowns as td
    try:
        log_ = dl.read_log(index_root, manifest.version, manifest.dim,
                           adapter=dl.version_adapter(manifest))
        out = dl.summarize(log_)
        if not latest:
            return out if out["deltas"] or out["error"] else None
        try:
            listed = td.read_takedowns(index_root)
            out["takedowns"] = {"image_ids": len(listed.image_ids),
                                "product_ids": len(listed.product_ids)}
        except td.TakedownError as e:
            listed, out["takedowns_error"] = td.Takedowns(), str(e)
        served = dl.served_rows(index_root, manifest.version, log_, listed.image_ids,
                                listed.product_ids)
        out.update({k: served[k] for k in ("base_rows", "rows_added", "rows_removed",
                                           "searchable_rows")})
        return out
    except (IndexArtifactError, OSError) as e:
        return {"error": str(e)}


def _run_info(args: argparse.Namespace, config: Config) -> int:
    root = check_uri_arg("--index-root", args.index_root)
    if fs.is_local(root) and not os.path.isdir(root):
        print(f"catalog-search index-info: error: --index-root {args.index_root} is not a "
              "folder", file=sys.stderr)
        return 1
    try:
        report = info_report(root, verify=args.verify)
    except (IndexArtifactError, OSError) as e:
        print(f"catalog-search index-info: error: {e}", file=sys.stderr)
        return 1
    corrupted = [v["version"] for v in report["versions"] if v["state"] == STATUS_CORRUPTED]
    rc = 1 if corrupted or report["latest_error"] else 0
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return rc
    print(f"index root: {args.index_root}")
    if report["latest_error"]:
        print(f"LATEST:     ERROR: {report['latest_error']}")
    else:
        print(f"LATEST:     {report['latest'] or '(none published)'}")
    if not report["versions"]:
        print("no versions")
        return rc
    print(f"{'':2}{'version':<32} {'state':<10} {'vectors':>9} {'shards':>6} {'recall':<24} "
          f"created_at")
    for v in report["versions"]:
        recall = " ".join(f"{k}={val:.4f}" for k, val in sorted((v.get("recall") or {}).items())
                          if isinstance(val, (int, float)))
        nv = v.get("num_vectors")
        print(f"{'*' if v['latest'] else ' ':2}{v['version']:<32} {v['state']:<10} "
              f"{nv if nv is not None else '-':>9} "
              f"{v.get('num_shards') or '-':>6} {recall or '-':<24} {v.get('created_at') or '-'}")
        if v.get("error"):
            print(f"{'':4}{v['error']}")
        d = v.get("deltas")
        if d:
            age = d.get("oldest_age_s")
            line = (f"{'':4}deltas: {d.get('deltas', 0)} ({d.get('rows_upserted', 0)} rows "
                    f"upserted, {d.get('image_ids_deleted', 0)} image_ids + "
                    f"{d.get('product_ids_deleted', 0)} product_ids deleted"
                    + (f", oldest {age:.0f}s ago" if age is not None else "") + ")")
            if "searchable_rows" in d:
                line += (f"; serving {d['searchable_rows']} rows = {d['base_rows']} + "
                         f"{d['rows_added']} added - {d['rows_removed']} removed")
            print(line)
            if d.get("error"):
                print(f"{'':4}delta refused: {d['error']}")
    if args.verify:
        incomplete = [v["version"] for v in report["versions"]
                      if v["state"] == STATUS_INCOMPLETE]
        ok = len(report["versions"]) - len(corrupted) - len(incomplete)
        print(f"verified: {ok} ok, {len(corrupted)} corrupted"
              + (f" ({', '.join(corrupted)})" if corrupted else "")
              + f", {len(incomplete)} incomplete"
              + (f" ({', '.join(incomplete)})" if incomplete else ""))
    return rc


# --------------------------------------------------------------------------- delete

def _add_delete_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index-root", required=True, help="local index root")
    p.add_argument("--product-id", action="append", default=[], metavar="P",
                   help="a product to take down (repeat for more)")
    p.add_argument("--image-id", action="append", default=[], metavar="I",
                   help="an image to take down (repeat for more)")
    p.add_argument("--reason", default="takedown", help="recorded with the takedown")
    p.add_argument("--restore", action="store_true",
                   help="lift the takedowns of these ids instead (they return with the next "
                        "build, or a delta that upserts them)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _run_delete(args: argparse.Namespace, config: Config) -> int:
    from pipelines.index import delete
    from pipelines.index.deltas import DeltaError
    root = check_uri_arg("--index-root", args.index_root)
    if not fs.is_local(root):
        raise UsageError(f"--index-root {args.index_root}: takedowns are written to local "
                         "index roots only")
    if not os.path.isdir(root):
        raise UsageError(f"--index-root {args.index_root} is not a folder")
    if not args.product_id and not args.image_id:
        raise UsageError("give at least one --product-id or --image-id")
    try:
        delete.check_ids(args.image_id, args.product_id)
    except DeltaError as e:
        raise UsageError(str(e)) from e
    try:
        if args.restore:
            result = delete.restore_ids(root, args.image_id, args.product_id)
        else:
            result = delete.delete_ids(root, args.image_id, args.product_id, args.reason,
                                       source={"by": "catalog-search delete"})
    except (IndexArtifactError, OSError) as e:
        print(f"catalog-search delete: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, sort_keys=True))
    elif args.restore:
        print(f"lifted: {result['lifted']}; not listed: {result['not_listed']}")
    else:
        print(f"version {result['version']} delta {result['delta']} (durable): removed "
              f"{result['removed']}; not found (kept on the takedown list) "
              f"{result['not_found']}")
    return 0


COMMANDS = {
    "delete": Command(help="take products / images down now: a durable delete delta + the "
                           "takedown list (builds leave them out); --restore lifts it",
                      add_arguments=_add_delete_arguments, run=_run_delete),
    "build-index": Command(
        help="embeddings snapshot -> sharded ScaNN index version, gated and published "
             "(exit 1: bad input, 3: recall gate failed)",
        add_arguments=_add_arguments, run=_run),
    "index-info": Command(help="versions, LATEST, counts and recall of an index root",
                          add_arguments=_add_info_arguments, run=_run_info),
}
