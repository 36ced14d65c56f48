"""`catalog-search query` (print results for image files) and `catalog-search serve` (HTTP)."""
from __future__ import annotations

import argparse
import json
import logging
import os

from pipelines.command import Command, UsageError
from pipelines.config import Config

log = logging.getLogger(__name__)


def _parse_shards(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--shards must be comma-separated shard numbers, got {text!r}") from None
    if not ids or any(i < 0 for i in ids):
        raise UsageError(f"--shards must list shard numbers >= 0, got {text!r}")
    return ids


def _parse_filters(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UsageError(f"--filters must be a JSON object, e.g. '{{\"category\": \"dairy\"}}': "
                         f"{e}") from None
    if not isinstance(value, dict):
        raise UsageError("--filters must be a JSON object of key -> value(s)")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index-root", required=True, help="index root (local path or gs://, s3://)")
    p.add_argument("--version", help="index version to load (default: what LATEST names)")
    p.add_argument("--shards", help="load only these shards, e.g. 0,1 (default: all)")


def _query_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("images", nargs="*", metavar="IMAGE",
                   help="query image files or URIs (none: a text-only query with --text)")
    p.add_argument("--text", help='query words, e.g. "organic": fused with each photo, or '
                                  "searched alone over product titles/categories/descriptions")
    p.add_argument("--text-weight", type=float, metavar="W",
                   help="weight of the text score in photo + text queries, 0..1 "
                        "(default fusion.text_weight)")
    p.add_argument("-k", type=int, default=None, help="results per image (default serving.default_k)")
    p.add_argument("--filters", help='metadata filter, JSON, e.g. {"category": "dairy"}')
    p.add_argument("--images", dest="by_image", action="store_true",
                   help="list images instead of collapsing to products")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")


def _run_query(args: argparse.Namespace, config: Config) -> int:
    from pipelines import filesystem as fs
    from serving.searcher import CatalogSearcher, IndexLoadError, QueryError
    filters = _parse_filters(args.filters)
    if not args.images and args.text is None:
        raise UsageError("give query IMAGE files, --text WORDS, or both")
    if args.text is not None and not args.text.strip():
        raise UsageError("--text must not be empty")
    if args.text is not None and len(args.text.strip()) > config.fusion.max_text_chars:
        raise UsageError(f"--text has more than fusion.max_text_chars = "
                         f"{config.fusion.max_text_chars} characters")
    if args.text_weight is not None and not 0.0 <= args.text_weight <= 1.0:
        raise UsageError(f"--text-weight must be in [0, 1], got {args.text_weight}")
    for uri in args.images:
        if not fs.exists(uri):
            raise UsageError(f"query image {uri} does not exist")
    try:
        searcher = CatalogSearcher.open(args.index_root, version=args.version,
                                        shard_ids=_parse_shards(args.shards), config=config)
    except IndexLoadError as e:
        print(f"catalog-search query: cannot load the index: {e}")
        return 1
    failures = 0
    for uri in args.images or [None]:
        try:
            if uri is None:  # text only
                uri = f"text: {args.text}"
                results = searcher.search_text(args.text, k=args.k, filters=filters,
                                               collapse=not args.by_image)
            else:
                data = fs.read_bytes(uri, max_bytes=config.serving.max_upload_bytes)
                results = searcher.search_image(data, k=args.k, filters=filters,
                                                collapse=not args.by_image, text=args.text,
                                                text_weight=args.text_weight)
        except QueryError as e:
            if e.reason in ("bad_k", "bad_filter", "bad_text", "bad_text_weight"):
                raise UsageError(str(e)) from None
            print(f"{uri}: {e.reason}: {e}")
            failures += 1
            continue
        except ValueError as e:  # larger than serving.max_upload_bytes
            print(f"{uri}: too_large: {e}")
            failures += 1
            continue
        if args.json:
            print(json.dumps({"query": uri, **results.to_dict()}))
            continue
        print(f"\n{uri}  (index {results.version}, "
              f"{sum(results.timings_ms.values()):.1f} ms)")
        print(f"  {'rank':>4}  {'score':>6}  {'product_id':<20} {'image_id':<24} metadata")
        for rank, hit in enumerate(results.hits, 1):
            meta = ", ".join(f"{k}={v}" for k, v in hit.metadata.items())
            print(f"  {rank:>4}  {hit.score:6.3f}  {hit.product_id:<20} {hit.image_id:<24} {meta}")
    return 1 if failures else 0


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--host", help="bind address (default serving.host)")
    p.add_argument("--port", type=int, help="port (default serving.port)")
    p.add_argument("--no-watch", action="store_true", help="do not hot-reload when LATEST changes")


def _run_serve(args: argparse.Namespace, config: Config) -> int:
    import uvicorn

    from serving.app import create_app
    host = args.host or config.serving.host
    port = config.serving.port if args.port is None else args.port
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {port}")
    if "://" not in args.index_root and not os.path.isdir(args.index_root):
        raise UsageError(f"--index-root {args.index_root} is not a directory")
    app = create_app(args.index_root, config, version=args.version,
                     shard_ids=_parse_shards(args.shards), watch=not args.no_watch)
    log.info("serving %s on http://%s:%d", args.index_root, host, port)
    uvicorn.run(app, host=host, port=port, log_level="info")
    return 0


COMMANDS = {
    "query": Command(help="search the published index with image files and print the results",
                     add_arguments=_query_arguments, run=_run_query),
    "serve": Command(help="HTTP search API + results page, hot-reloading LATEST",
                     add_arguments=_serve_arguments, run=_run_serve),
}
