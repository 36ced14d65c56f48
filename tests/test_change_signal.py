"""Nightly change detection: an unchanged change signal reuses the vector without a fetch.

Real embed runs (DirectRunner, tiny SavedModel) against a real HTTP server on loopback
that counts the GET requests it serves, and against local files (file-system metadata).
"""
from __future__ import annotations

import csv
import http.server
import os
import threading
from collections import Counter

import pytest

import image_factory as f
from pipelines.embed import snapshot
from pipelines.embed.change_signal import SIGNAL_COLUMN, filesystem_signal, manifest_signal
from pipelines.embed.job import run_embed


class _Images(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    gets: Counter = Counter()

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).gets[self.path] += 1
        body = self.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")


@pytest.fixture()
def image_server():
    _Images.files = {f"/img/{i}.jpg": f.jpeg_bytes(color=(40 * i, 90, 200 - 30 * i))
                     for i in range(6)}
    _Images.gets = Counter()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _manifest(path, rows, fields):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return str(path)


def _local_catalog(tmp_path, n: int, green: int):
    """n local JPEGs under tmp_path/img and a manifest naming them: (manifest, img dir)."""
    img = tmp_path / "img"
    img.mkdir()
    for i in range(n):
        (img / f"{i}.jpg").write_bytes(f.jpeg_bytes(color=(60 * i, green, 30)))
    rows = [{"product_id": f"P{i}", "image_id": f"img{i}", "image_uri": f"img/{i}.jpg"}
            for i in range(n)]
    return _manifest(tmp_path / "m.csv", rows, ["product_id", "image_id", "image_uri"]), img


def _reconciles(s):
    return s.input_rows == s.embedded + s.reused + s.dead_lettered


@pytest.mark.heavy
def test_unchanged_updated_at_is_not_fetched_changed_or_verify_content_is(
        image_server, embed_config, tmp_path):
    rows = [{"product_id": f"P{i}", "image_id": f"img{i}",
             "image_uri": f"{image_server}/img/{i}.jpg", "updated_at": "2026-11-01T00:00:00Z"}
            for i in range(6)]
    fields = ["product_id", "image_id", "image_uri", "updated_at"]
    manifest = _manifest(tmp_path / "m.csv", rows, fields)
    out = str(tmp_path / "emb")

    s1 = run_embed([manifest], out, embed_config, run_id="r1")
    assert s1.embedded == 6 and s1.fetched == 6 and sum(_Images.gets.values()) == 6
    stored = snapshot.read_table(s1.snapshot).column(SIGNAL_COLUMN).to_pylist()
    assert all(x and x.startswith("manifest:") for x in stored)

    _Images.gets.clear()
    s2 = run_embed([manifest], out, embed_config, run_id="r2", previous=s1.snapshot)
    assert sum(_Images.gets.values()) == 0  # not one byte read
    assert s2.reused == 6 and s2.reused_without_fetch == 6 and s2.fetched == 0
    assert _reconciles(s2)
    before = {r["image_id"]: r["embedding"] for r in snapshot.read_table(s1.snapshot).to_pylist()}
    after = {r["image_id"]: r["embedding"] for r in snapshot.read_table(s2.snapshot).to_pylist()}
    assert before == after

    # one image changes: new bytes and a new updated_at -> only it is fetched and embedded
    _Images.files["/img/2.jpg"] = f.jpeg_bytes(color=(250, 10, 10))
    rows[2]["updated_at"] = "2026-11-02T00:00:00Z"
    manifest = _manifest(tmp_path / "m.csv", rows, fields)
    _Images.gets.clear()
    s3 = run_embed([manifest], out, embed_config, run_id="r3", previous=s2.snapshot)
    assert dict(_Images.gets) == {"/img/2.jpg": 1}
    assert s3.embedded == 1 and s3.reused_without_fetch == 5 and _reconciles(s3)
    changed = {r["image_id"]: r["embedding"] for r in snapshot.read_table(s3.snapshot).to_pylist()}
    assert changed["img2"] != after["img2"] and changed["img0"] == after["img0"]

    # audit: --verify-content fetches and hashes everything; unchanged bytes are reused
    _Images.gets.clear()
    s4 = run_embed([manifest], out, embed_config, run_id="r4", previous=s3.snapshot,
                   verify_content=True)
    assert sorted(_Images.gets) == [f"/img/{i}.jpg" for i in range(6)]
    assert s4.fetched == 6 and s4.reused_after_hash == 6 and s4.reused_without_fetch == 0
    assert _reconciles(s4)


@pytest.mark.heavy
def test_file_metadata_signal_skips_unchanged_local_files(embed_config, tmp_path):
    manifest, img = _local_catalog(tmp_path, 4, green=120)
    out = str(tmp_path / "emb")
    s1 = run_embed([manifest], out, embed_config, run_id="r1")
    assert s1.fetched == 4
    s2 = run_embed([manifest], out, embed_config, run_id="r2", previous=s1.snapshot)
    assert s2.fetched == 0 and s2.reused_without_fetch == 4 and _reconciles(s2)

    path = img / "1.jpg"
    old = os.stat(path)
    path.write_bytes(f.jpeg_bytes(color=(5, 250, 5)))
    os.utime(path, (old.st_atime + 10, old.st_mtime + 10))
    s3 = run_embed([manifest], out, embed_config, run_id="r3", previous=s2.snapshot)
    assert s3.fetched == 1 and s3.embedded == 1 and s3.reused_without_fetch == 3
    assert _reconciles(s3)


@pytest.mark.heavy
def test_reused_and_carried_rows_are_copied_file_by_file(embed_config, tmp_path, monkeypatch):
    """Reused vectors are copied in Arrow from the previous snapshot's files (one
    embeddings-reused-* file per previous file), bit for bit, with the current manifest's
    catalog fields; a backfill's carried-forward rows go the same way."""
    import glob

    import numpy as np
    img = tmp_path / "img"
    img.mkdir()
    for i in range(5):
        (img / f"{i}.jpg").write_bytes(f.jpeg_bytes(color=(50 * i, 100, 30)))
    fields = ["product_id", "image_id", "image_uri", "title"]
    rows = [{"product_id": f"P{i}", "image_id": f"img{i}", "image_uri": f"img/{i}.jpg",
             "title": f"old {i}"} for i in range(4)]
    out = str(tmp_path / "emb")
    s1 = run_embed([_manifest(tmp_path / "m1.csv", rows, fields)], out, embed_config,
                   run_id="r1")
    before = snapshot.read_table(s1.snapshot)

    from pipelines.embed import reuse
    monkeypatch.setattr(reuse, "REUSED_ROW_GROUP_ROWS", 2)
    rows[0]["product_id"], rows[0]["title"] = "P0-moved", "new 0"  # catalog fields change
    s2 = run_embed([_manifest(tmp_path / "m2.csv", rows, fields)], out, embed_config,
                   run_id="r2", previous=s1.snapshot)
    assert s2.reused_without_fetch == 4 and s2.embedded == 0 and _reconciles(s2)
    reused_files = glob.glob(os.path.join(s2.snapshot, "embeddings-reused-*.parquet"))
    assert len(reused_files) == len(snapshot.embedding_files(s1.snapshot)) == 1
    after = snapshot.read_table(s2.snapshot)
    assert sorted(after.column("image_id").to_pylist()) == [f"img{i}" for i in range(4)]
    by_id = {r["image_id"]: r for r in after.to_pylist()}
    for r in before.to_pylist():
        assert np.array_equal(np.float32(by_id[r["image_id"]]["embedding"]),
                              np.float32(r["embedding"]))
        assert by_id[r["image_id"]][SIGNAL_COLUMN] == r[SIGNAL_COLUMN]
    assert by_id["img0"]["product_id"] == "P0-moved" and "new 0" in by_id["img0"]["metadata"]
    import pyarrow.parquet as pq
    # row groups of REUSED_ROW_GROUP_ROWS (2 here): build_index's parallel splits
    assert pq.read_metadata(reused_files[0]).num_row_groups == 2
    assert by_id["img1"]["product_id"] == "P1" and "old 1" in by_id["img1"]["metadata"]

    drop = [{"product_id": "P4", "image_id": "img4", "image_uri": "img/4.jpg", "title": "t"}]
    s3 = run_embed([_manifest(tmp_path / "drop.csv", drop, fields)], out, embed_config,
                   run_id="r3", previous=s2.snapshot, merge_previous=True)
    assert s3.embedded == 1 and s3.carried_forward == 4 and _reconciles(s3)
    merged = {r["image_id"]: r for r in snapshot.read_table(s3.snapshot).to_pylist()}
    assert sorted(merged) == [f"img{i}" for i in range(5)]
    assert merged["img0"]["product_id"] == "P0-moved"
    assert merged["img2"]["embedding"] == by_id["img2"]["embedding"]


def test_signals(tmp_path):
    row = {"image_uri": "http://x/a.jpg", "metadata": {"etag": "abc"}}
    assert manifest_signal(row) != manifest_signal({**row, "metadata": {"etag": "abd"}})
    assert manifest_signal({**row, "metadata": {"title": "t"}}) is None
    assert filesystem_signal("http://x/a.jpg") is None
    assert filesystem_signal(str(tmp_path / "missing.jpg")) is None
    p = tmp_path / "a.jpg"
    p.write_bytes(b"1")
    first = filesystem_signal(str(p))
    p.write_bytes(b"12")
    assert first and filesystem_signal(str(p)) != first
    # a file:// URI is stat'ed too (the digest includes the URI as written)
    assert filesystem_signal(p.as_uri()) and filesystem_signal(p.as_uri()) != first
    # a path with glob characters is one file, not a pattern
    q = tmp_path / "b[1].jpg"
    q.write_bytes(b"1")
    assert filesystem_signal(str(q))


@pytest.mark.heavy
def test_small_refresh_runs_in_process_on_the_direct_runner(embed_config, tmp_path):
    """A refresh with at most runner.direct_small_run_rows rows to fetch runs in the
    launcher (no worker processes); more, --verify-content, 0 or a cluster runner: as
    configured. The count uses the change signals only (no fetch)."""
    import dataclasses

    from pipelines.embed import small_run
    manifest, img = _local_catalog(tmp_path, 4, green=20)
    out = str(tmp_path / "emb")
    s1 = run_embed([manifest], out, embed_config, run_id="r1")
    assert s1.timings["running_mode"] == "in_memory"  # the fixture's own mode, untouched

    workers = dataclasses.replace(embed_config, runner=dataclasses.replace(
        embed_config.runner, direct_running_mode="multi_processing", direct_num_workers=2,
        direct_small_run_rows=1))
    views = ["original"]

    def choose(config, **kw):
        args = dict(manifests=[manifest], previous=s1.snapshot, reusable=True,
                    verify_content=False, output_views=views, input_rows=4)
        args.update(kw)
        return small_run.choose_config(config, **args)

    cfg, note = choose(workers)
    assert note == {"running_mode": "in_memory", "rows_to_fetch": 0}
    assert cfg.runner.direct_running_mode == "in_memory" and cfg.runner.direct_num_workers == 1
    path = img / "1.jpg"
    old = os.stat(path)
    path.write_bytes(f.jpeg_bytes(color=(5, 250, 5)))
    os.utime(path, (old.st_atime + 10, old.st_mtime + 10))
    assert choose(workers)[1] == {"running_mode": "in_memory", "rows_to_fetch": 1}
    path2 = img / "2.jpg"
    old2 = os.stat(path2)
    os.utime(path2, (old2.st_atime + 20, old2.st_mtime + 20))
    cfg, note = choose(workers)
    assert note == {"running_mode": "multi_processing", "rows_to_fetch": "more than 1"}
    assert cfg is workers
    for kw in ({"verify_content": True}, {"reusable": False}, {"previous": None},
               {"input_rows": small_run.MAX_COUNTED_ROWS + 1}):
        assert choose(workers, **kw)[0] is workers
    never = dataclasses.replace(workers, runner=dataclasses.replace(
        workers.runner, direct_small_run_rows=0))
    assert choose(never)[0] is never
    cluster = dataclasses.replace(workers, runner=dataclasses.replace(
        workers.runner, name="DataflowRunner"))
    assert choose(cluster)[0] is cluster

    os.utime(path2, ns=(old2.st_atime_ns, old2.st_mtime_ns))  # as r1 saw it: 1 to fetch
    s2 = run_embed([manifest], out, workers, run_id="r2", previous=s1.snapshot)
    assert s2.timings["running_mode"] == "in_memory" and s2.timings["rows_to_fetch"] == 1
    assert s2.embedded == 1 and s2.reused_without_fetch == 3 and _reconciles(s2)
