"""Load plus hot swap over real HTTP: concurrent clients query while the index version is
swapped several times (POST /v1/reload with the admin token): 0 failed requests.

Short in the default run; the long variant is marked slow (`pytest -m slow`); the soak
benchmark (benchmarks/reliability_soak.py) runs the same function for longer.
"""
from __future__ import annotations

import os
import sys

import pytest

from pipelines.core import filesystem as fs
from serving.app import create_app
from serving.searcher import CatalogSearcher
from serving_fixtures import LiveServer, copy_index, serving_world

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from reliability_soak import hot_swap_under_load  # noqa: E402
from serving_bench import clone_version  # noqa: E402

SWAP_TOKEN = "hot-swap-token-0123456789abcdef"


def _hot_swap(tmp_path, swaps: int, clients: int) -> dict:
    world = serving_world()
    root = copy_index(world, str(tmp_path / "index"))
    clone_version(root, "v0001", "v0002")
    idx = CatalogSearcher.open(root, version="v0001", config=world.config,
                               load_embedder=False).current
    vectors = [v.tolist() for v in idx.vectors_of(list(range(12)))]
    images = [fs.read_bytes(r["image_uri"]) for r in world.catalog_rows()[:4]]
    app = create_app(root, world.config, watch=False, admin_token=SWAP_TOKEN)
    with LiveServer(app) as live:
        report = hot_swap_under_load(live.url, root, ("v0001", "v0002"), swaps, clients,
                                     vectors, images, token=SWAP_TOKEN)
    print(f"hot swap under load: {report['requests']} requests, {report['failed']} failed, "
          f"{report['swaps_loaded']}/{report['swaps']} swaps loaded")
    return report


def _check(report: dict, swaps: int) -> None:
    assert report["failed"] == 0, report["failures_sample"]
    assert report["swaps"] == swaps and report["swaps_loaded"] == swaps, report["swap_failures"]
    assert report["requests"] >= swaps


def test_hot_swap_under_load_short(tmp_path):
    _check(_hot_swap(tmp_path, swaps=6, clients=4), 6)


@pytest.mark.slow
def test_hot_swap_under_load_long(tmp_path):
    _check(_hot_swap(tmp_path, swaps=60, clients=8), 60)
