"""Embed from local files vs over HTTP with a first-byte latency, in one run (issue 20).

    python benchmarks/remote_fetch_bench.py --images ../shared/datasets/grocery-store/dataset/train \
        --limit 2000 --latency-ms 50,200 --hang-fraction 0.05 --concurrency 16,64 --rounds 2 \
        --out out/bench/remote_fetch.json

The same JPEGs are embedded (`run_embed`, the configured runner: DirectRunner with
`--workers` worker processes) first from local paths, then from a loopback HTTP/1.1 server
(keep-alive) that waits `--latency-ms` before every response (a CDN's or object store's
first-byte time), then at the first latency with `--hang-fraction` of the images hanging
until the client gives up (they must all be dead-lettered `fetch/timeout`) and
`--fail-fraction` answering 500 once before succeeding. Every run uses the same fetch
settings (`--deadline-s`); `--concurrency` may list several fetch.concurrency values: each
gets its HTTP runs (`1` = the one-at-a-time fetching of before), the local run and the
fault run use the last value. Rounds alternate (local, http..., faults) to spread drift.
Ratios within the run are what to compare: the machine is shared.

`--object-store` adds, per round and latency, a run reading `slowfs://` URIs: the same
local files through a Beam FileSystem (pipelines/core/slowfs.py) that waits the latency
before every request an object store answers over the network (the change-signal
metadata HEAD, the exists check, the GET), so the job reads them as it would from gs://
or s3:// (one image = three requests: 3x the latency if done one at a time).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import http.server
import json
import os
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from benchmarks.embed_throughput import find_images  # noqa: E402
from pipelines.core.config import load_config  # noqa: E402
from pipelines.embed import snapshot  # noqa: E402
from pipelines.embed.job import run_embed  # noqa: E402
from pipelines.core import filesystem as fs  # noqa: E402
from pipelines.core import slowfs  # noqa: E402


def _chosen(name: str, fraction: float, salt: str) -> bool:
    """A fixed pseudo-random `fraction` of the names (the same in every round)."""
    h = int(hashlib.sha256((salt + name).encode()).hexdigest()[:8], 16)
    return h < fraction * 0x100000000


class _Server:
    """Serves /<i>.jpg from `paths` after `latency_s`; hanging / failing-once images."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.latency_s = 0.0
        self.hang: set[int] = set()
        self.fail_once: set[int] = set()
        self.seen: set[int] = set()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True
            wbufsize = 1 << 16

            def log_message(self, *args):
                pass

            def handle(self):
                try:
                    super().handle()
                except (ConnectionResetError, BrokenPipeError):
                    pass

            def finish(self):
                try:
                    super().finish()
                except (ConnectionResetError, BrokenPipeError):
                    pass

            def do_GET(self):
                try:
                    i = int(self.path.strip("/").split(".")[0])
                    path = server.paths[i]
                except (ValueError, IndexError):
                    return self._send(404, b"no")
                time.sleep(server.latency_s)
                if i in server.hang:
                    server.stop.wait(600)  # until the client's deadline closes the socket
                    self.close_connection = True
                    return None
                with server.lock:
                    first = i not in server.seen
                    server.seen.add(i)
                if first and i in server.fail_once:
                    return self._send(500, b"try again")
                with open(path, "rb") as f:
                    return self._send(200, f.read())

            def _send(self, code, body):
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.request_queue_size = 256
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.stop.set()
        self.httpd.shutdown()


def _manifest(uris: list[str], path: str) -> str:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["product_id", "image_id", "image_uri"])
        w.writeheader()
        for i, uri in enumerate(uris):
            w.writerow({"product_id": f"P{i % 50}", "image_id": f"img{i:05d}", "image_uri": uri})
    return path


def _run(name: str, manifest: str, out: str, config, expect_hung: set[str],
         concurrency: int) -> dict:
    started = time.monotonic()
    s = run_embed([manifest], os.path.join(out, name), config, run_id="r")
    wall = time.monotonic() - started
    assert s.snapshot is not None
    dead = snapshot.read_dead_letters(s.snapshot)
    hung_dead = {d["image_id"] for d in dead if (d["stage"], d["error"]) == ("fetch", "timeout")}
    result = {"run": name, "concurrency": concurrency, "wall_s": round(wall, 2),
              "pipeline_s": s.timings.get("pipeline_s"), "embedded": s.embedded,
              "dead_lettered": s.dead_lettered, "dead_letter_reasons": s.dead_letter_reasons,
              "hung": len(expect_hung), "hung_dead_lettered_as_timeout":
                  len(hung_dead & expect_hung) == len(expect_hung) and hung_dead <= expect_hung}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", required=True, help="a folder with JPEGs (searched recursively)")
    ap.add_argument("--limit", type=int, default=600, help="images to embed (default 600)")
    ap.add_argument("--latency-ms", default="50,200",
                    help="comma-separated first-byte latencies (default 50,200)")
    ap.add_argument("--hang-fraction", type=float, default=0.05,
                    help="images that hang until the deadline in the last run (default 0.05)")
    ap.add_argument("--fail-fraction", type=float, default=0.0,
                    help="images answering 500 once before succeeding (default 0)")
    ap.add_argument("--concurrency", default=None,
                    help="fetch.concurrency, or a comma-separated list of values to compare "
                         "(default: configs/default.yaml)")
    ap.add_argument("--per-host", type=int, default=None,
                    help="fetch.per_host_concurrency (default: configs/default.yaml)")
    ap.add_argument("--deadline-s", type=float, default=5.0,
                    help="fetch.deadline_s for every run (default 5)")
    ap.add_argument("--workers", type=int, default=2, help="DirectRunner worker processes")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds (default 1)")
    ap.add_argument("--object-store", action="store_true",
                    help="also read slowfs:// URIs (a FileSystem with the latency per request)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.object_store:  # the workers import it too (they inherit the environment)
        os.environ[fs.PLUGINS_ENV] = ",".join(
            [m for m in os.environ.get(fs.PLUGINS_ENV, "").split(",") if m] + [slowfs.__name__])
    latencies = [float(x) / 1000 for x in args.latency_ms.split(",") if x.strip()]

    paths = find_images(args.images, args.limit)
    work = tempfile.mkdtemp(prefix="remote-fetch-")
    server = _Server(paths)
    fetch = {"deadline_s": args.deadline_s, "timeout_s": args.deadline_s}
    if args.per_host:
        fetch["per_host_concurrency"] = args.per_host
    mode = "in_memory" if args.workers <= 1 else "multi_processing"

    def config_for(concurrency: int | None):
        return load_config(overrides={
            "fetch": dict(fetch, **({"concurrency": concurrency} if concurrency else {})),
            "embed": {"max_dead_letter_fraction": 0.5},
            "runner": {"direct_running_mode": mode, "direct_num_workers": max(args.workers, 1)}})

    asked: list[int | None] = ([int(x) for x in args.concurrency.split(",")]
                               if args.concurrency else [None])  # None: the configured default
    configs = {cfg.fetch.concurrency: cfg for cfg in map(config_for, asked)}
    values = list(configs)
    config = configs[values[-1]]
    local = _manifest(paths, os.path.join(work, "local.csv"))
    http = _manifest([f"{server.base}/{i}.jpg" for i in range(len(paths))],
                     os.path.join(work, "http.csv"))
    store = _manifest([slowfs.uri_of(p) for p in paths], os.path.join(work, "store.csv"))
    names = [f"img{i:05d}" for i in range(len(paths))]
    hang = {i for i, n in enumerate(names) if _chosen(n, args.hang_fraction, "hang")}
    fail = {i for i, n in enumerate(names) if _chosen(n, args.fail_fraction, "fail")} - hang
    results = []
    try:
        for r in range(args.rounds):
            server.latency_s, server.hang, server.fail_once = 0.0, set(), set()
            results.append(dict(_run(f"local-{r}", local, work, config, set(), values[-1]),
                                round=r))
            for c in values:
                for lat in latencies:
                    server.latency_s, server.seen = lat, set()
                    results.append(dict(_run(f"http-{int(lat * 1000)}ms-c{c}-{r}", http, work,
                                             configs[c], set(), c),
                                        round=r, latency_ms=lat * 1000))
            for lat in latencies if args.object_store else []:
                os.environ[slowfs.LATENCY_ENV] = str(lat * 1000)
                results.append(dict(_run(f"store-{int(lat * 1000)}ms-c{values[-1]}-{r}", store,
                                         work, config, set(), values[-1]),
                                    round=r, latency_ms=lat * 1000))
                os.environ[slowfs.LATENCY_ENV] = "0"
            if args.hang_fraction > 0 or args.fail_fraction > 0:
                server.latency_s, server.hang, server.fail_once = latencies[0], hang, fail
                server.seen = set()
                results.append(dict(_run(f"http-{int(latencies[0] * 1000)}ms-c{values[-1]}"
                                         f"-faults-{r}", http, work, config,
                                         {names[i] for i in hang}, values[-1]),
                                    round=r, latency_ms=latencies[0] * 1000))
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)

    def mean_wall(prefix: str) -> float:
        walls = [x["wall_s"] for x in results if x["run"].rsplit("-", 1)[0] == prefix]
        return sum(walls) / len(walls)

    ratios = {f"http_{int(lat * 1000)}ms_c{c}_vs_local":
              round(mean_wall(f"http-{int(lat * 1000)}ms-c{c}") / mean_wall("local"), 3)
              for c in values for lat in latencies}
    if args.object_store:
        ratios.update({f"store_{int(lat * 1000)}ms_c{values[-1]}_vs_local": round(
            mean_wall(f"store-{int(lat * 1000)}ms-c{values[-1]}") / mean_wall("local"), 3)
            for lat in latencies})
    if args.hang_fraction > 0 or args.fail_fraction > 0:
        first, c = int(latencies[0] * 1000), values[-1]
        ratios[f"faults_vs_clean_http_{first}ms_c{c}"] = round(
            mean_wall(f"http-{first}ms-c{c}-faults") / mean_wall(f"http-{first}ms-c{c}"), 3)
    report = {"images": len(paths), "workers": args.workers, "concurrency": values,
              "fetch": {k: getattr(config.fetch, k) for k in
                        ("concurrency", "per_host_concurrency", "deadline_s", "timeout_s")},
              "hang_fraction": args.hang_fraction, "hung_images": len(hang),
              "fail_fraction": args.fail_fraction, "fail_once_images": len(fail),
              "runs": results, "ratios": ratios}
    print(json.dumps({"ratios": ratios}))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2, sort_keys=True)


if __name__ == "__main__":
    main()
