"""`catalog-search query` (print results for image files) and `catalog-search serve` (HTTP)."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import errno
import json
import logging
import os
import socket
from typing import Any, Callable

from pipelines.core.command import Command, UsageError
from pipelines.core.config import Config

log = logging.getLogger(__name__)


def _parse_shards(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--shard-subset must be comma-separated shard numbers, got {text!r}"
                         ) from None
    if not ids or any(i < 0 for i in ids):
        raise UsageError(f"--shard-subset must list shard numbers >= 0, got {text!r}")
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
    p.add_argument("--shard-subset", metavar="IDS",
                   help="load only these shard numbers, e.g. 0,1 (default: all shards)")
    p.add_argument("--allow-model", action="append", default=[], metavar="HANDLE",
                   help="trust this model handle if an index names it (repeatable; adds to "
                        "serving.allowed_model_handles; model.handle and builtin:* are trusted)")


def with_allowed_models(args: argparse.Namespace, config: Config) -> Config:
    """`config` with the --allow-model handles added to serving.allowed_model_handles."""
    if not args.allow_model:
        return config
    handles = list(config.serving.allowed_model_handles) + list(args.allow_model)
    return config.replace(serving={"allowed_model_handles": handles})


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
    p.add_argument("--group-by", metavar="FIELD",
                   help="crowding: at most --max-per-group results per value of this metadata "
                        "field, e.g. brand or seller (product_id: images per product)")
    p.add_argument("--max-per-group", type=int, metavar="N",
                   help="crowding: results per --group-by value (default 1; alone: images per "
                        "product)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")


def _run_query(args: argparse.Namespace, config: Config) -> int:
    from pipelines.embed.fetch import FetchError, fetch_bytes
    from serving.errors import IndexLoadError, QueryError
    from serving.searcher import CatalogSearcher
    config = with_allowed_models(args, config)
    # every argument is checked before the index is loaded (which takes seconds)
    filters = _parse_filters(args.filters)
    shard_ids = _parse_shards(args.shard_subset)
    if args.k is not None and not 1 <= args.k <= config.serving.max_k:
        raise UsageError(f"-k must be between 1 and {config.serving.max_k} "
                         f"(serving.max_k), got {args.k}")
    if not args.images and args.text is None:
        raise UsageError("give query IMAGE files, --text WORDS, or both")
    if args.text is not None and not args.text.strip():
        raise UsageError("--text must not be empty")
    if args.text is not None and len(args.text.strip()) > config.fusion.max_text_chars:
        raise UsageError(f"--text has more than fusion.max_text_chars = "
                         f"{config.fusion.max_text_chars} characters")
    if args.text_weight is not None and not 0.0 <= args.text_weight <= 1.0:
        raise UsageError(f"--text-weight must be in [0, 1], got {args.text_weight}")
    if args.max_per_group is not None and not 1 <= args.max_per_group <= config.serving.max_k:
        raise UsageError(f"--max-per-group must be between 1 and {config.serving.max_k} "
                         f"(serving.max_k), got {args.max_per_group}")
    if args.group_by is not None and not args.group_by.strip():
        raise UsageError("--group-by must name a metadata field")
    from serving.cli_checks import check_index_root, check_query_image
    for uri in args.images:
        check_query_image(uri)
    check_index_root(args.index_root)
    fetch_cfg = dataclasses.replace(config.fetch, max_bytes=config.serving.max_upload_bytes)
    try:
        searcher = CatalogSearcher.open(args.index_root, version=args.version,
                                        shard_ids=shard_ids, config=config)
    except IndexLoadError as e:
        print(f"catalog-search query: cannot load the index: {e}")
        return 1
    crowding = {"group_by": args.group_by, "max_per_group": args.max_per_group}
    failures = 0
    for uri in args.images or [None]:
        try:
            if uri is None:  # text only
                uri = f"text: {args.text}"
                results = searcher.search_text(args.text, k=args.k, filters=filters,
                                               collapse=not args.by_image, **crowding)
            else:
                data = fetch_bytes(uri, fetch_cfg)
                results = searcher.search_image(data, k=args.k, filters=filters,
                                                collapse=not args.by_image, text=args.text,
                                                text_weight=args.text_weight, **crowding)
        except QueryError as e:
            if e.reason in ("bad_k", "bad_filter", "bad_text", "bad_text_weight",
                            "bad_group_by", "bad_max_per_group"):
                raise UsageError(str(e)) from None
            print(f"{uri}: {e.reason}: {e}")
            failures += 1
            continue
        except FetchError as e:  # unreadable, not a regular file, larger than max_upload_bytes
            print(f"{uri}: {e.reason}: {e}")
            failures += 1
            continue
        if args.json:
            print(json.dumps({"query": uri, **results.to_dict()}))
            continue
        print(f"\n{uri}  (index {results.version}, "
              f"{sum(results.timings_ms.values()):.1f} ms)")
        print(results_table(results.hits))
    return 1 if failures else 0


def results_table(hits: list) -> str:
    """The `query` table: rank, score, product_id, image_id, metadata; the id columns are
    as wide as their longest value (at least 20 / 24), so long ids stay aligned."""
    pw = max([20] + [len(h.product_id) for h in hits])
    iw = max([24] + [len(h.image_id) for h in hits])
    lines = [f"  {'rank':>4}  {'score':>6}  {'product_id':<{pw}} {'image_id':<{iw}} metadata"]
    for rank, hit in enumerate(hits, 1):
        meta = ", ".join(f"{k}={v}" for k, v in hit.metadata.items())
        lines.append(f"  {rank:>4}  {hit.score:6.3f}  {hit.product_id:<{pw}} "
                     f"{hit.image_id:<{iw}} {meta}".rstrip())
    return "\n".join(lines)


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--host", help="bind address (default serving.host)")
    p.add_argument("--port", type=int, help="port (default serving.port)")
    p.add_argument("--no-watch", action="store_true", help="do not hot-reload when LATEST changes")
    p.add_argument("--json", action="store_true",
                   help="once listening, print one JSON line on stdout (url, host, port, pid, "
                        "index_root, version, ready); all logs go to stderr")
    p.add_argument("--admin-token-file", metavar="PATH",
                   help="file holding the bearer token that POST /v1/reload requires (default: "
                        "$CATALOG_SEARCH_ADMIN_TOKEN or the file $CATALOG_SEARCH_ADMIN_TOKEN_FILE "
                        "names; none set = no auth)")


def _run_serve(args: argparse.Namespace, config: Config) -> int:
    from pipelines.core.admin_token import AdminTokenError, admin_token_from_env, read_token_file
    config = with_allowed_models(args, config)
    try:
        token = (read_token_file(args.admin_token_file) if args.admin_token_file
                 else admin_token_from_env())
    except AdminTokenError as e:
        raise UsageError(str(e)) from None
    host = args.host or config.serving.host
    port = config.serving.port if args.port is None else args.port
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {port}")
    shard_ids = _parse_shards(args.shard_subset)
    if "://" not in args.index_root and os.path.exists(args.index_root) \
            and not os.path.isdir(args.index_root):
        raise UsageError(f"--index-root {args.index_root} is not a directory")
    if args.no_watch and args.version is None and "://" not in args.index_root \
            and not os.path.isdir(args.index_root):
        raise UsageError(f"--index-root {args.index_root} does not exist (and --no-watch "
                         "would never pick up a first version)")
    from serving.cli_checks import check_index_root
    check_index_root(args.index_root, must_exist=False)  # an embeddings folder, say
    # The port is bound before the index loads (seconds): a busy port fails at once.
    sock = bind_socket(host, port)
    if "://" not in args.index_root and not os.path.isdir(args.index_root):
        # Before the first refresh: serve, not ready (/readyz 503), until a version is
        # published there (the watcher polls LATEST; POST /v1/reload loads it at once).
        log.warning("index root %s does not exist yet: not ready until a version is "
                    "published there", args.index_root)
    if token is None and host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("serving on %s without an admin token: anyone who can reach the port can "
                    "POST /v1/reload (set CATALOG_SEARCH_ADMIN_TOKEN_FILE or --admin-token-file)",
                    host)
    try:
        import uvicorn  # imported after the checks: fastapi and uvicorn take a second

        from serving.app import create_app
        from serving.http_limits import uvicorn_config
        app = create_app(args.index_root, config, version=args.version,
                         shard_ids=shard_ids, watch=not args.no_watch, admin_token=token)
        log.info("serving %s on http://%s:%d", args.index_root, host, sock.getsockname()[1])
        log_config: dict[str, Any] = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
        if args.json:  # uvicorn's access log goes to stdout by default: stdout is for the JSON
            log_config["handlers"]["access"]["stream"] = "ext://sys.stderr"
        server = _listening_server(
            uvicorn_config(app, config, host=host, port=port, log_level="info",
                           log_config=log_config),
            (lambda bound: _print_started(app, args.index_root, bound)) if args.json else None)
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port and listening; UsageError naming the address when
    it cannot be (the port is in use, the host is not an address of this machine)."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: cannot resolve it: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} is already in use (cannot listen on {where}); "
                             "stop what uses it or pass --port") from None
        raise UsageError(f"cannot listen on {where}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _listening_server(config: Any, on_started: Callable[[tuple], None] | None) -> Any:
    """A uvicorn.Server that calls `on_started(sockname)` once it is listening."""
    import uvicorn

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and sockets is not None:  # uvicorn logs this only without sockets
                self._log_started_message(sockets)
            if self.started and on_started is not None and self.servers:
                on_started(self.servers[0].sockets[0].getsockname())

    return _Server(config)


def _print_started(app: Any, index_root: str, bound: tuple) -> None:
    """The `serve --json` startup line (the bound port, also when --port 0)."""
    host, port = bound[0], bound[1]
    loaded = app.state.serving.searcher.loaded
    url = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
    print(json.dumps({"event": "listening", "url": url, "host": host, "port": port,
                      "pid": os.getpid(), "index_root": index_root,
                      "version": loaded.version if loaded is not None else None,
                      "ready": loaded is not None}, sort_keys=True), flush=True)


COMMANDS = {
    "query": Command(help="search the published index with image files and print the results",
                     add_arguments=_query_arguments, run=_run_query),
    "serve": Command(help="HTTP search API + results page, hot-reloading LATEST",
                     add_arguments=_serve_arguments, run=_run_serve),
}
