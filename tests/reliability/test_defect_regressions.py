"""Pipeline-side regression tests: run ids, the failure rate, zeroed vectors, fetch hangs,
file:// URIs and dead-letter reasons, index-info output types (docs/RELIABILITY.md lists
the defect each test pins).
"""
from __future__ import annotations

import dataclasses

import http.server
import json
import os
import shutil
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import image_factory as f
from pipelines.core import filesystem as fs
from pipelines.index import artifact as art
from pipelines.index import reader
from pipelines.embed import snapshot
from catalog_search.cli import main as cli_main
from pipelines.core.config import FetchConfig
from pipelines.embed.job import DeadLetterRateError, EmbedError, run_embed
from pipelines.embed.fetch import FetchError, fetch_bytes
from pipelines.embed.manifest import read_rows
from pipelines.core.names import InvalidNameError, check_segment
from pipelines.orchestration.errors import OrchestrationError
from pipelines.orchestration.plan import PLAN_FORMAT, RunPlan
from index_fixtures import clustered_vectors, make_config, write_snapshot
from pipelines.index.build import run_build_index


def _tree(path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, n), path)
                  for r, ds, fs_ in os.walk(path) for n in ds + fs_)


def _catalog(tmp_path, rows: int = 3, missing: int = 0) -> str:
    (tmp_path / "img").mkdir(exist_ok=True)
    lines = ["product_id,image_uri"]
    for i in range(rows):
        name = f"img/{i}.jpg"
        if i >= missing:
            (tmp_path / name).write_bytes(f.jpeg_bytes(color=(i * 40 % 255, 90, 10)))
        lines.append(f"p{i},{name}")
    path = tmp_path / "m.csv"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def built_index(tmp_path_factory) -> str:
    """A real published 2-shard index version "v0001" (brute-force shards)."""
    base = tmp_path_factory.mktemp("regress-index")
    snap = write_snapshot(str(base / "snap"), clustered_vectors(120, 16, seed=3))
    root = str(base / "index")
    run_build_index(snap, root, make_config(shards=2), version="v0001")
    return root


# ------------------------------------------------------------------ run ids


@pytest.mark.parametrize("bad", ["..", ".", "../x", "a/b", "", " r1", "x" * 200, "/abs", "r\n1"])
def test_bad_run_id_exits_2_and_touches_nothing(tmp_path, capsys, bad):
    root = tmp_path / "data"
    out = root / "emb"
    (out / "r1").mkdir(parents=True)
    (out / "r1" / "summary.json").write_text("{}")
    (out / "LATEST").write_text("r1\n")
    (root / "precious.txt").write_text("keep me")
    before = _tree(root)
    manifest = _catalog(tmp_path)
    assert cli_main(["embed", "--manifest", manifest, "--out", str(out), "--run-id", bad]) == 2
    assert "--run-id" in capsys.readouterr().err
    assert _tree(root) == before and (out / "LATEST").read_text() == "r1\n"
    with pytest.raises(EmbedError, match="run_id"):
        run_embed([manifest], str(out), None, run_id=bad)  # refused before the config is read
    assert _tree(root) == before


def test_one_name_rule_for_snapshots_versions_latest_and_plans(tmp_path):
    for bad in ("..", ".", "a/../b"):
        with pytest.raises(InvalidNameError):
            check_segment(bad)
        with pytest.raises(snapshot.SnapshotError):
            snapshot.snapshot_path(str(tmp_path), bad)
        with pytest.raises(snapshot.SnapshotError):
            snapshot.mark_latest(str(tmp_path), bad)
        with pytest.raises(art.IndexArtifactError):
            art.version_dir(str(tmp_path), bad)
        with pytest.raises(OrchestrationError):
            RunPlan.from_dict({"format": PLAN_FORMAT, "kind": "refresh", "run_id": bad,
                               "manifests": ["m.csv"],
                               "embeddings_root": "e", "index_root": "i", "config_file": None})
    assert not (tmp_path / "LATEST").exists()
    (tmp_path / "LATEST").write_text("..\n")
    with pytest.raises(snapshot.SnapshotError, match="corrupted"):
        snapshot.latest(str(tmp_path))


def test_build_index_bad_version_exits_2(built_index, tmp_path, capsys):
    root = shutil.copytree(built_index, str(tmp_path / "index"))
    before = _tree(root)
    snap = write_snapshot(str(tmp_path / "snap"), clustered_vectors(40, 16, seed=4))
    for bad in ("..", "../../x", "."):
        assert cli_main(["build-index", "--embeddings", snap, "--index-root", root,
                         "--version", bad]) == 2
        assert "--version" in capsys.readouterr().err
    assert _tree(root) == before


# ------------------------------------------------------------------ failure rate


def test_catalog_where_every_row_fails_exits_3_and_moves_nothing(
        embed_config, tmp_path, capsys):
    manifest = _catalog(tmp_path, rows=4, missing=4)
    out = tmp_path / "emb"
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{handle: {embed_config.model.handle}, "
                      f"cache_dir: {tmp_path / 'cache'}}}\n"
                      "runner: {direct_running_mode: in_memory, direct_num_workers: 1}\n"
                      "embed: {max_dead_letter_fraction: 1.0}\n")  # even at 1.0: nothing embedded
    rc = cli_main(["--config", str(config), "embed", "--manifest", manifest, "--out", str(out),
                   "--run-id", "r1"])
    captured = capsys.readouterr()
    assert rc == 3, captured.err
    assert "no row was embedded" in captured.err and "fetch/not_found 4" in captured.err
    assert not (out / "LATEST").exists() and not (out / "r1" / "summary.json").exists()
    failed = json.loads((out / "r1" / "failed_summary.json").read_text())
    assert failed["dead_lettered"] == 4 and failed["status"] == "failed"


def test_fraction_above_threshold_fails_and_keeps_latest(embed_config, tmp_path):
    manifest = _catalog(tmp_path, rows=4, missing=3)
    out = str(tmp_path / "emb")
    ok = run_embed([manifest], out,
                   embed_config.replace(embed={"max_dead_letter_fraction": 0.8}), run_id="r1")
    assert ok.embedded == 1
    with pytest.raises(DeadLetterRateError, match=r"0\.750 is above the maximum 0\.5.*"
                                                   r"fetch/not_found 3"):
        run_embed([manifest], out, embed_config, run_id="r2")
    assert snapshot.latest_run_id(out) == "r1"
    assert not snapshot.is_complete(snapshot.snapshot_path(out, "r2"))


def test_threshold_flag_is_checked(tmp_path, capsys):
    assert cli_main(["embed", "--manifest", "m.csv", "--out", str(tmp_path),
                     "--max-dead-letter-fraction", "1.5"]) == 2
    assert "--max-dead-letter-fraction" in capsys.readouterr().err


# ------------------------------------------------------------------ zeroed vectors


def _rechecksum(root: str, version: str) -> None:
    """Recompute every checksum of a version after tampering (what an attacker would do)."""
    manifest = art.read_manifest(root, version)
    shards = [dataclasses.replace(entry, files=[art.ShardFile(**f) for f in art.local_dir_checksums(
        os.path.join(art.version_dir(root, version), entry.path))]) for entry in manifest.shards]
    art.write_manifest(root, version, dataclasses.replace(manifest, shards=shards))


def test_zeroed_vectors_with_recomputed_checksums_are_refused(built_index, tmp_path):
    root = shutil.copytree(built_index, str(tmp_path / "index"))
    path = os.path.join(art.version_dir(root, "v0001"), "shards", art.shard_name(1, 2),
                        "dataset.npy")
    vectors = np.load(path)
    np.save(path, np.zeros_like(vectors))
    _rechecksum(root, "v0001")
    with pytest.raises(art.IndexIntegrityError, match="not unit length"):
        reader.open_index(root).load_shards()


def test_row_count_mismatch_is_refused(built_index, tmp_path):
    root = shutil.copytree(built_index, str(tmp_path / "index"))
    manifest = art.read_manifest(root, "v0001")
    art.write_manifest(root, "v0001",
                       dataclasses.replace(manifest, num_vectors=manifest.num_vectors + 5))
    with pytest.raises(art.IndexIntegrityError, match="num_vectors"):
        reader.open_index(root)


# ------------------------------------------------------------------ fetch hangs


class _Trickle(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(1000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError):
            pass


def _in_thread(fn, limit_s: float):
    """Run fn in a daemon thread; (finished, result or exception)."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["value"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit_s)
    return not t.is_alive(), box.get("value")


def test_trickled_body_fails_at_the_total_deadline():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        cfg = FetchConfig(timeout_s=1.0, retries=0, deadline_s=1.5)
        started = time.monotonic()
        done, value = _in_thread(
            lambda: fetch_bytes(f"http://127.0.0.1:{httpd.server_address[1]}/x.jpg", cfg), 8)
        assert done, "the fetch did not stop at its deadline"
        assert isinstance(value, FetchError) and value.reason == "timeout", value
        assert time.monotonic() - started < 3.5
        assert "deadline" in str(value)
    finally:
        httpd.shutdown()


def test_fifo_and_device_are_refused_not_read(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    for uri in (str(fifo), "/dev/zero", str(tmp_path)):
        done, value = _in_thread(lambda uri=uri: fetch_bytes(uri, FetchConfig()), 5)
        assert done, f"fetching {uri} blocked"
        assert isinstance(value, FetchError) and value.reason == "not_regular_file", value


# ------------------------------------------------------------------ file:// and reasons


def test_file_uris_and_real_reasons(tmp_path):
    image = tmp_path / "a b.jpg"
    image.write_bytes(f.jpeg_bytes())
    assert fetch_bytes("file://" + str(image), FetchConfig()) == image.read_bytes()
    assert fetch_bytes("file://" + str(image).replace(" ", "%20"), FetchConfig()) \
        == image.read_bytes()
    cases = {"file://" + str(tmp_path / "nope.jpg"): "not_found",
             str(tmp_path / "nope.jpg"): "not_found",
             "ftp://example.invalid/x.jpg": "unsupported_scheme",
             "nosuch://x/y.jpg": "unsupported_scheme"}
    for uri, reason in cases.items():
        with pytest.raises(FetchError) as e:
            fetch_bytes(uri, FetchConfig())
        assert e.value.reason == reason, (uri, e.value.reason, str(e.value))


def test_gs_without_the_extra_names_the_pip_extra():
    try:
        fs.check_supported("gs://b/x")
        pytest.skip("apache-beam[gcp] is installed here")
    except fs.UnsupportedUriError:
        pass
    with pytest.raises(FetchError) as e:
        fetch_bytes("gs://bucket/x.jpg", FetchConfig())
    assert e.value.reason == "filesystem_unavailable" and "apache-beam[gcp]" in str(e.value)


def test_file_uri_roots_for_index_and_embeddings(built_index, tmp_path, capsys):
    root = shutil.copytree(built_index, str(tmp_path / "index"))
    opened = reader.open_index("file://" + root)
    assert sum(s.num_vectors for s in opened.load_shards()) == 120
    assert cli_main(["index-info", "--index-root", "file://" + root, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["latest"] == "v0001"
    snap = write_snapshot(str(tmp_path / "snap"), clustered_vectors(40, 16, seed=5))
    manifest = run_build_index("file://" + snap, "file://" + root, make_config(shards=1),
                               version="v0002")
    assert manifest.num_vectors == 40 and art.read_latest(root) == "v0002"


# ------------------------------------------------------------------ index-info, types


def test_index_info_survives_a_garbage_latest(built_index, tmp_path, capsys):
    root = shutil.copytree(built_index, str(tmp_path / "index"))
    for garbage in (b"\xff\xfe\x00garbage", b"../../etc", b"x" * 10_000):
        with open(os.path.join(root, "LATEST"), "wb") as fh:
            fh.write(garbage)
        assert cli_main(["index-info", "--index-root", root]) == 1
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err + captured.out
        assert "LATEST:     ERROR" in captured.out and "v0001" in captured.out


def test_index_info_verify_reports_corrupted_versions(built_index, tmp_path, capsys):
    root = shutil.copytree(built_index, str(tmp_path / "index"))
    shutil.copytree(art.version_dir(root, "v0001"), art.version_dir(root, "v0002"))
    manifest = art.read_manifest(root, "v0001")
    art.write_manifest(root, "v0002", dataclasses.replace(manifest, version="v0002"))
    rows = os.path.join(art.version_dir(root, "v0002"), "shards", art.shard_name(0, 2),
                        "rows.parquet")
    with open(rows, "r+b") as fh:
        fh.seek(10)
        fh.write(b"\x00" * 8)
    assert cli_main(["index-info", "--index-root", root, "--json"]) == 0
    states = {v["version"]: v["state"] for v in json.loads(capsys.readouterr().out)["versions"]}
    assert states == {"v0001": "passed", "v0002": "passed"}  # without --verify: manifests only
    assert cli_main(["index-info", "--index-root", root, "--verify", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    states = {v["version"]: (v["state"], v["error"]) for v in report["versions"]}
    assert states["v0001"] == ("passed", None)
    assert states["v0002"][0] == "corrupted" and "checksum mismatch" in states["v0002"][1]


def test_wrong_typed_columns_are_dead_lettered_not_stringified(tmp_path):
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [
        {"product_id": {"a": 1}, "image_uri": "x.jpg"},
        {"product_id": "p", "image_uri": ["x.jpg"]},
        {"product_id": "p", "image_uri": "x.jpg", "title": {"t": 1}},
        {"product_id": 7, "image_uri": "x.jpg"}]) + "\n")
    rows = list(read_rows(0, str(jsonl)))
    assert [r["error"][0] if r["error"] else None for r in rows] == [
        "wrong_type", "wrong_type", "wrong_type", None]
    assert rows[3]["product_id"] == "7"
    parquet = tmp_path / "m.parquet"
    pq.write_table(pa.table({"product_id": pa.array([b"p1"], pa.binary()),
                             "image_uri": ["x.jpg"]}), parquet)
    (row,) = read_rows(0, str(parquet))
    assert row["error"][0] == "wrong_type" and "bytes" in row["error"][1]
    assert "b'" not in row["product_id"]
