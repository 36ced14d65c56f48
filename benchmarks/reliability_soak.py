"""Service reliability soak: hostile requests, decompression-bomb memory, hot swaps under load.

    python benchmarks/reliability_soak.py --workdir out/soak [--rounds 20] [--clients 8]
        [--swaps 40] [--legacy-limits]

Starts `catalog-search serve` in a subprocess (admin token set) on the test suite's tiny
generated index (tests/serving_fixtures.serving_world; no downloads) and measures:
1. hostile: every request kind of tests/reliability/hostile_http.py, --rounds times:
   answers by status; any 5xx is a failure.
2. bombs: the server's VmRSS before and VmHWM (peak) after --bombs concurrent uploads
   of a 6000x6000 1-bit PNG (4.4 KB each), then of a 3999x3999 one (just under
   serving.max_query_pixels: decoded, max_concurrent_queries at a time).
   --legacy-limits runs the server with the limits before issue 9 (query pixel limit =
   decode.max_pixels, no decode-slot bound) for the "before" figure.
3. hot swap under load: --clients concurrent clients (vector and image queries) while
   LATEST flips between two versions and POST /v1/reload (with the token) runs --swaps
   times; every non-200 answer or transport error is a failed request.
Writes workdir/reliability_soak.json and prints it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for extra in (HERE, os.path.join(REPO, "tests"), os.path.join(REPO, "tests", "reliability")):
    if extra not in sys.path:
        sys.path.insert(0, extra)

from serving_bench import _free_port, clone_version, run_load, wait_ready  # noqa: E402

SOAK_TOKEN = "soak-admin-token-0123456789abcdef"


def hot_swap_under_load(url: str, index_root: str, versions: tuple[str, str], swaps: int,
                        clients: int, vectors: list[list[float]], images: list[bytes],
                        token: str | None = None, pause_s: float = 0.0) -> dict[str, Any]:
    """Clients send vector and image queries while LATEST flips `swaps` times (POST reload).

    Returns run_load's figures plus the swap outcomes; `failed` counts every non-200
    answer or transport error seen by the clients.
    """
    import httpx

    from pipelines.index import artifact as art
    from pipelines.core.admin_token import bearer_header
    counter = iter(range(10**12))
    lock = threading.Lock()

    def request(c: Any) -> Any:
        with lock:
            i = next(counter)
        if i % 3 == 2 and images:
            return c.post("/v1/search", files={"image": ("q.jpg", images[i % len(images)],
                                                         "image/jpeg")}, data={"k": "5"})
        return c.post("/v1/search", json={"vector": vectors[i % len(vectors)], "k": 5})

    outcomes: list[dict[str, Any]] = []

    def do_swaps() -> None:
        with httpx.Client(base_url=url, timeout=600, headers=bearer_header(token)) as c:
            for i in range(swaps):
                target = versions[(i + 1) % 2]
                art.write_latest(index_root, target)
                t0 = time.perf_counter()
                r = c.post("/v1/reload")
                body = r.json()
                outcomes.append({"target": target, "http": r.status_code,
                                 "status": body.get("status"),
                                 "serving": body.get("serving_version"),
                                 "seconds": round(time.perf_counter() - t0, 3)})
                time.sleep(pause_s)

    report = run_load(url, request, clients, 0, 10**12, during=do_swaps)
    report["swaps"] = len(outcomes)
    report["swaps_loaded"] = sum(o["status"] == "loaded" and o["serving"] == o["target"]
                                 for o in outcomes)
    report["swap_failures"] = [o for o in outcomes if o["http"] != 200][:5]
    return report


def send_hostile(url: str, rounds: int, dim: int, good_image: bytes, image_id: str
                 ) -> dict[str, Any]:
    """Every hostile request kind, `rounds` times: counts by status and the 5xx kinds."""
    import httpx

    from hostile_http import hostile_cases
    cases = hostile_cases(dim, good_image, image_id)
    by_status: dict[int, int] = {}
    five_xx: list[str] = []
    sent = 0
    with httpx.Client(base_url=url, timeout=120) as c:
        for _ in range(rounds):
            for kind, method, path, kwargs in cases:
                status = c.request(method, path, **kwargs).status_code
                sent += 1
                by_status[status] = by_status.get(status, 0) + 1
                if status >= 500:
                    five_xx.append(f"{kind}: {status}")
    return {"kinds": len(cases), "requests": sent,
            "by_status": {str(k): v for k, v in sorted(by_status.items())},
            "5xx": len(five_xx), "5xx_kinds": sorted(set(five_xx))[:10]}


def _vm_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1])
    return out


def bomb_memory(url: str, pid: int, bombs: int, side: int = 6000) -> dict[str, Any]:
    """Server RSS before, and its peak after, `bombs` concurrent side x side PNG-bomb uploads."""
    import httpx

    from hostile_http import png_bomb
    bomb = png_bomb(side, side)
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
    except OSError:
        pass
    before = _vm_kib(pid)

    def send(_: int) -> int:
        with httpx.Client(base_url=url, timeout=300) as c:
            return c.post("/v1/search", files={"image": ("b.png", bomb, "image/png")}).status_code

    t0 = time.perf_counter()
    with ThreadPoolExecutor(bombs) as pool:
        statuses = list(pool.map(send, range(bombs)))
    after = _vm_kib(pid)
    return {"bombs": bombs, "side": side, "bomb_bytes": len(bomb),
            "seconds": round(time.perf_counter() - t0, 2),
            "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
            "rss_before_mb": round(before["VmRSS"] / 1024, 1),
            "peak_rss_after_mb": round(after["VmHWM"] / 1024, 1),
            "peak_growth_mb": round((after["VmHWM"] - before["VmRSS"]) / 1024, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="service reliability soak (hostile, bombs, swaps)")
    p.add_argument("--workdir", default="out/soak")
    p.add_argument("--rounds", type=int, default=20, help="passes over the hostile kinds")
    p.add_argument("--bombs", type=int, default=24)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--swaps", type=int, default=40)
    p.add_argument("--legacy-limits", action="store_true",
                   help="serve with the pre-issue-9 limits (for the 'before' bomb figure)")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import yaml

    from pipelines.core import filesystem as fs
    from serving.searcher import CatalogSearcher
    from serving_fixtures import copy_index, serving_world

    os.makedirs(args.workdir, exist_ok=True)
    world = serving_world()
    index_root = os.path.join(os.path.abspath(args.workdir), "index")
    if not os.path.isdir(index_root):
        copy_index(world, index_root)
    clone_version(index_root, "v0001", "v0002")
    overrides: dict[str, Any] = {"serving": {"max_upload_bytes": 2_000_000}}
    if args.legacy_limits:
        overrides["serving"].update(max_query_pixels=world.config.decode.max_pixels,
                                    max_concurrent_queries=1000, max_queued_queries=1000)
    config = world.config.replace(**overrides)
    config_path = os.path.join(args.workdir, "serve.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(config.to_dict(), f)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, CATALOG_SEARCH_ADMIN_TOKEN=SOAK_TOKEN, TF_ENABLE_ONEDNN_OPTS="0")
    log = open(os.path.join(args.workdir, "serve.log"), "w")
    server = subprocess.Popen([sys.executable, "-m", "catalog_search.cli", "--config", config_path,
                               "serve", "--index-root", index_root, "--port", str(port),
                               "--no-watch"], cwd=REPO, env=env, stdout=log, stderr=log)
    report: dict[str, Any] = {"legacy_limits": args.legacy_limits}
    try:
        wait_ready(url, server, 300, os.path.join(args.workdir, "serve.log"))
        rows = world.catalog_rows()
        images = [fs.read_bytes(r["image_uri"]) for r in rows[:6]]
        idx = CatalogSearcher.open(index_root, version="v0001", config=world.config,
                                   load_embedder=False).current
        vectors = [v.tolist() for v in idx.vectors_of(list(range(min(16, idx.num_vectors))))]
        report["bombs"] = bomb_memory(url, server.pid, args.bombs)
        print(json.dumps(report["bombs"]), flush=True)
        # Just under serving.max_query_pixels: decoded, but at most max_concurrent_queries
        # at a time (the rest wait or get 503 busy).
        report["bombs_under_limit"] = bomb_memory(url, server.pid, args.bombs, side=3999)
        print(json.dumps(report["bombs_under_limit"]), flush=True)
        if not args.legacy_limits:
            report["hostile"] = send_hostile(url, args.rounds, idx.dim, images[0],
                                             rows[0]["image_id"])
            print(json.dumps(report["hostile"]), flush=True)
            report["hot_swap_under_load"] = hot_swap_under_load(
                url, index_root, ("v0001", "v0002"), args.swaps, args.clients, vectors,
                images, token=SOAK_TOKEN)
            print(json.dumps(report["hot_swap_under_load"]), flush=True)
            report["server_rss_end_mb"] = round(_vm_kib(server.pid)["VmRSS"] / 1024, 1)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    out = os.path.join(args.workdir, "reliability_soak"
                       + ("_legacy" if args.legacy_limits else "") + ".json")
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
