"""pipelines/core/slowfs.py: local files behind an object store's latency, read by the embed
job through Beam FileSystems (what benchmarks/remote_fetch_bench.py's object-store case uses)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from pipelines.core import filesystem as fs
from pipelines.core.config import FetchConfig
from pipelines.core import slowfs
from pipelines.core.slowfs import LATENCY_ENV, SlowFileSystem
from pipelines.embed import snapshot
from pipelines.embed.fetch import FetchError, fetch_bytes
from pipelines.embed.job import run_embed
from pipelines.embed.sample_catalog import write_catalog


@pytest.fixture()
def latency(monkeypatch):
    def set_ms(ms: float) -> None:
        monkeypatch.setenv(LATENCY_ENV, str(ms))
        SlowFileSystem.reset_stats()
    return set_ms


def test_slowfs_serves_local_files_with_the_latency(tmp_path, latency):
    path = tmp_path / "a.bin"
    path.write_bytes(b"hello")
    uri = slowfs.uri_of(str(path))
    assert uri == f"slowfs://{path}"
    latency(100)
    start = time.monotonic()
    assert fs.read_bytes(uri) == b"hello"
    assert time.monotonic() - start >= 0.1
    assert fs.exists(uri) and not fs.exists(uri + ".missing")
    meta = fs.FileSystems.get_filesystem(uri).metadata(uri)
    assert meta.size_in_bytes == 5 and meta.path == uri
    assert SlowFileSystem.stats()["opens"] == 1 and SlowFileSystem.stats()["requests"] >= 4


def test_an_object_store_fetch_is_one_request_and_keeps_its_dead_letter_reasons(tmp_path,
                                                                                 latency):
    """A found object costs one GET (no `exists` before it); `exists` is asked only after a
    failed read, so a missing object is still `not_found` and an oversize one `too_large`."""
    path = tmp_path / "a.jpg"
    path.write_bytes(b"x" * 500)
    latency(0)
    assert fetch_bytes(slowfs.uri_of(str(path)), FetchConfig()) == b"x" * 500
    assert SlowFileSystem.stats()["requests"] == 1
    with pytest.raises(FetchError) as e:
        fetch_bytes(slowfs.uri_of(str(tmp_path / "missing.jpg")), FetchConfig())
    assert e.value.reason == "not_found"
    with pytest.raises(FetchError) as e:
        fetch_bytes(slowfs.uri_of(str(path)), FetchConfig(max_bytes=100))
    assert e.value.reason == "too_large"


def _slow_manifest(manifest: str, out: str) -> str:
    """The same catalog with every image_uri as a slowfs:// URI."""
    lines = open(manifest).read().splitlines()
    header, rows = lines[0].split(","), [line.split(",") for line in lines[1:]]
    col = header.index("image_uri")
    for row in rows:
        row[col] = slowfs.uri_of(row[col])
    with open(out, "w") as f:
        f.write("\n".join(",".join(r) for r in [header] + rows) + "\n")
    return out


def test_the_embed_job_reads_through_slowfs_with_overlapping_reads(embed_config, tmp_path,
                                                                  latency):
    manifest = write_catalog(str(tmp_path / "cat"), num_products=4, images_per_product=4, size=96)
    slow = _slow_manifest(manifest, str(tmp_path / "slow.csv"))
    latency(0)
    local = run_embed([manifest], str(tmp_path / "local"), embed_config)
    latency(150)  # per request; each image costs a HEAD (change signal) and a GET
    start = time.monotonic()
    remote = run_embed([slow], str(tmp_path / "slow"), embed_config)
    wall = time.monotonic() - start
    stats = SlowFileSystem.stats()
    assert (remote.input_rows, remote.embedded, remote.dead_lettered) == (16, 16, 0)
    assert stats["opens"] == 16 and stats["requests"] >= 2 * 16
    assert stats["max_in_flight"] > 4  # reads overlap (fetch.concurrency 64)
    assert wall < local.timings["total_s"] + 16 * 2 * 0.15 / 2, wall  # not one at a time
    a = {r["image_id"]: r for r in snapshot.load(local.snapshot).table.to_pylist()}
    b = {r["image_id"]: r for r in snapshot.load(remote.snapshot).table.to_pylist()}
    assert a.keys() == b.keys()
    for k in a:
        assert a[k]["content_sha256"] == b[k]["content_sha256"]
        assert b[k]["image_uri"].startswith("slowfs://")
        assert np.allclose(a[k]["embedding"], b[k]["embedding"], atol=1e-6)


def test_the_env_var_registers_slowfs_in_a_fresh_process(tmp_path):
    """What the DirectRunner's worker processes rely on: they import pipelines.core.filesystem
    with the launcher's environment."""
    (tmp_path / "x").write_bytes(b"abc")
    code = ("from pipelines.core import filesystem as fs; "
            f"print(fs.read_bytes('slowfs://{tmp_path}/x').decode())")
    env = dict(os.environ, **{fs.PLUGINS_ENV: "pipelines.core.slowfs"})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0 and out.stdout.strip() == "abc", out.stderr[-2000:]
    env.pop(fs.PLUGINS_ENV)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode != 0  # without it, no filesystem serves slowfs://
