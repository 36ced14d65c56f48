"""Shared set-up for the serving tests (imported by tests/test_serving_*.py; holds no tests).

Builds, once per test session, real artifacts the serving code reads:
- a tiny local SavedModel (random conv + global pooling, 64x64 input) used as a model handle;
- a generated catalog (pipelines.embed.sample_catalog) embedded with that model into a snapshot;
- a published index built from the snapshot by the real build_index job.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
from dataclasses import dataclass

import numpy as np

from tiny_model import TINY_INPUT_SIZE, make_tiny_model  # noqa: F401 (re-exported)

NUM_PRODUCTS = 12
IMAGES_PER_PRODUCT = 3


def write_snapshot(manifest_csv: str, out_path: str, config) -> str:
    """Embed every image of a catalog manifest with the configured model into a snapshot.

    Uses the same decode/preprocess code and Embedder as the embed job; written directly
    with the snapshot contract helpers so these tests do not depend on the Beam embed job.
    """
    import csv
    import hashlib

    import pyarrow as pa

    from pipelines.core import filesystem as fs
    from pipelines.embed import snapshot
    from pipelines.model.image_decode import load_and_preprocess
    from pipelines.model.resolve import Embedder, resolve_model

    spec = resolve_model(config.model.handle, config.model.resolved_cache_dir(),
                         config.model.input_size)
    with open(manifest_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    images, datas = [], []
    for row in rows:
        data = fs.read_bytes(row["image_uri"])
        datas.append(data)
        images.append(load_and_preprocess(data, spec.input_size, config))
    vectors = Embedder(spec).embed(np.stack(images))
    dim = vectors.shape[1]
    meta = [json.dumps({k: v for k, v in r.items()
                        if k not in ("product_id", "image_id", "image_uri")}) for r in rows]
    table = pa.table({
        "image_id": [r["image_id"] for r in rows],
        "product_id": [r["product_id"] for r in rows],
        "image_uri": [r["image_uri"] for r in rows],
        "content_sha256": [hashlib.sha256(d).hexdigest() for d in datas],
        "model_id": [spec.model_id] * len(rows),
        "view": ["original"] * len(rows),
        "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.reshape(-1), pa.float32()), dim),
        "metadata": meta,
    }, schema=snapshot.embeddings_schema(dim))
    snapshot.write_table(out_path, table)
    from pipelines.embed.summary import SnapshotSummary
    snapshot.write_summary(out_path, SnapshotSummary(
        input_rows=len(rows), embedded=len(rows), reused=0, dead_lettered=0,
        run_id=os.path.basename(out_path), snapshot=out_path, model_id=spec.model_id,
        model=spec.to_dict(), dim=dim))
    return out_path


@dataclass(frozen=True)
class ServingWorld:
    """Everything a serving test needs: paths and a Config pointing at the tiny model."""
    root: str
    catalog_dir: str
    manifest: str
    queries: str
    snapshot: str
    index_root: str
    config: object  # pipelines.core.config.Config

    def catalog_rows(self) -> list[dict[str, str]]:
        import csv
        with open(self.manifest, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))


def build_index(world_snapshot: str, index_root: str, config, version: str | None = None
                ) -> dict:
    """Publish an index version with the real build_index job."""
    from pipelines.index.build import run_build_index
    return run_build_index(world_snapshot, index_root, config, version=version)


@functools.lru_cache(maxsize=1)
def serving_world() -> ServingWorld:
    """The session's shared artifacts (built on first use, reused by every serving test)."""
    from pipelines.core.config import load_config
    from pipelines.embed.sample_catalog import write_catalog

    root = tempfile.mkdtemp(prefix="serving-tests-")
    model_dir = make_tiny_model(root)
    config = load_config(overrides={
        "model": {"handle": model_dir, "cache_dir": os.path.join(root, "cache"), "batch_size": 16},
        "runner": {"direct_running_mode": "in_memory", "direct_num_workers": 1},
        "index": {"shards": 2, "eval_queries": 20, "recall_threshold": 0.5},
        "serving": {"max_upload_bytes": 200_000, "reload_interval_s": 0.2},
    })
    catalog_dir = os.path.join(root, "catalog")
    manifest = write_catalog(catalog_dir, num_products=NUM_PRODUCTS,
                             images_per_product=IMAGES_PER_PRODUCT, size=128, seed=3,
                             queries_per_product=1)
    snap = write_snapshot(manifest, os.path.join(root, "embeddings", "run-1"), config)
    index_root = os.path.join(root, "index")
    build_index(snap, index_root, config, version="v0001")
    return ServingWorld(root=root, catalog_dir=catalog_dir, manifest=manifest,
                        queries=os.path.join(catalog_dir, "queries.csv"), snapshot=snap,
                        index_root=index_root, config=config)


def jpeg_bytes(color: tuple[int, int, int] = (200, 30, 30), size: int = 96) -> bytes:
    """A small solid-colour JPEG with a square (a valid image that is in no catalog)."""
    import io

    from PIL import Image, ImageDraw
    img = Image.new("RGB", (size, size), color)
    ImageDraw.Draw(img).rectangle([size // 4, size // 4, size * 3 // 4, size * 3 // 4],
                                  fill=(20, 20, 220))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


class LiveServer:
    """A real uvicorn server on a free loopback port, run in a background thread."""

    def __init__(self, app) -> None:
        import uvicorn
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                                     log_level="warning", lifespan="on"))
        self._thread = None
        self.url = ""

    def __enter__(self) -> "LiveServer":
        import threading
        import time
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.time() + 60
        while not self._server.started:
            if time.time() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(30)


def copy_index(world: ServingWorld, dest: str) -> str:
    """A private copy of the shared index root (for tests that publish or break versions)."""
    import shutil
    shutil.copytree(world.index_root, dest)
    return dest


def snapshot_subset(world: ServingWorld, dest: str, drop_products: set[str]) -> str:
    """A snapshot with some products' rows removed (a catalog change between versions)."""
    import pyarrow.compute as pc

    from pipelines.embed import snapshot
    snap = snapshot.load(world.snapshot)
    keep = pc.invert(pc.is_in(snap.table.column("product_id"),
                              value_set=__import__("pyarrow").array(sorted(drop_products))))
    table = snap.table.filter(keep)
    snapshot.write_table(dest, table)
    import dataclasses
    summary = dataclasses.replace(snap.summary, input_rows=len(table), embedded=len(table),
                                  run_id=os.path.basename(dest), snapshot=dest)
    snapshot.write_summary(dest, summary)
    return dest


def register_object_store_stand_in() -> str:
    """Register `servingtestfs://<abs path>` (an object-store stand-in); returns the scheme."""
    from object_store_stand_in import register_prefixed_filesystem
    register_prefixed_filesystem("servingtestfs")
    return "servingtestfs"
