"""The embed job end to end on the DirectRunner: bad input, reconciliation, incremental runs."""
from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest

import image_factory as f
from pipelines.embed import snapshot
from pipelines.embed.job import EmbedError, run_embed
from pipelines.embed.sample_catalog import write_catalog


def _write_manifest(path, rows, fields=("product_id", "image_id", "image_uri", "category")):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return str(path)


@pytest.fixture()
def bad_catalog(tmp_path):
    """A manifest with one row for every kind of bad (and awkward-but-valid) input."""
    img = tmp_path / "img"
    img.mkdir()
    files = {
        "good.jpg": f.jpeg_bytes(),
        "zero.jpg": b"",
        "text.jpg": b"plain text, not an image",
        "truncated.jpg": f.truncated_jpeg(),
        "bomb.png": f.decompression_bomb_png(),
        "cmyk.jpg": f.cmyk_jpeg(),
        "deep.png": f.png16_bytes(),
        "palette.png": f.palette_transparent_png(),
        "rotated.jpg": f.exif_rotated_jpeg(),
    }
    for name, data in files.items():
        (img / name).write_bytes(data)
    rows = [
        {"product_id": "p-good", "image_id": "good", "image_uri": "img/good.jpg", "category": "a"},
        {"product_id": "p-missing", "image_id": "missing", "image_uri": "img/nope.jpg"},
        {"product_id": "p-zero", "image_id": "zero", "image_uri": "img/zero.jpg"},
        {"product_id": "p-text", "image_id": "text", "image_uri": "img/text.jpg"},
        {"product_id": "p-trunc", "image_id": "trunc", "image_uri": "img/truncated.jpg"},
        {"product_id": "p-bomb", "image_id": "bomb", "image_uri": "img/bomb.png"},
        {"product_id": "p-cmyk", "image_id": "cmyk", "image_uri": "img/cmyk.jpg"},
        {"product_id": "p-deep", "image_id": "deep", "image_uri": "img/deep.png"},
        {"product_id": "p-pal", "image_id": "pal", "image_uri": "img/palette.png"},
        {"product_id": "p-rot", "image_id": "rot", "image_uri": "img/rotated.jpg"},
        # the same image_id twice: the later row wins, the earlier one is dead-lettered
        {"product_id": "p-dup-old", "image_id": "dup", "image_uri": "img/good.jpg"},
        {"product_id": "p-dup-new", "image_id": "dup", "image_uri": "img/cmyk.jpg"},
        {"product_id": "", "image_id": "orphan", "image_uri": "img/good.jpg"},
    ]
    return _write_manifest(tmp_path / "manifest.csv", rows)


def test_every_bad_row_is_dead_lettered_with_a_reason_and_counts_reconcile(
        bad_catalog, embed_config, tmp_path):
    out = str(tmp_path / "emb")
    # 7 of 13 rows are bad on purpose: above the default failure-rate guard (0.5).
    config = embed_config.replace(embed={"max_dead_letter_fraction": 0.6})
    s = run_embed([bad_catalog], out, config, run_id="r1")
    assert s.input_rows == 13
    assert s.embedded == 6  # good, cmyk, deep, pal, rot, dup (new)
    assert s.reused == 0
    assert s.dead_lettered == 7
    assert s.input_rows == s.embedded + s.reused + s.dead_lettered
    assert s.dead_letter_reasons == {
        "fetch/not_found": 1, "decode/empty": 1, "decode/not_an_image": 1,
        "decode/truncated": 1, "decode/too_many_pixels": 1,
        "manifest/duplicate_image_id": 1, "manifest/missing_product_id": 1}

    dead = {(d["image_id"], d["stage"], d["error"]) for d in snapshot.read_dead_letters(s.snapshot)}
    assert ("missing", "fetch", "not_found") in dead
    assert ("dup", "manifest", "duplicate_image_id") in dead
    assert ("orphan", "manifest", "missing_product_id") in dead
    for d in snapshot.read_dead_letters(s.snapshot):
        assert d["message"] and d["source"].endswith(tuple(f":{n}" for n in range(2, 15)))

    snap = snapshot.load(s.snapshot)
    rows = {r["image_id"]: r for r in snap.table.to_pylist()}
    assert set(rows) == {"good", "cmyk", "deep", "pal", "rot", "dup"}
    assert rows["dup"]["product_id"] == "p-dup-new"  # the later row won
    assert json.loads(rows["good"]["metadata"]) == {"category": "a"}
    v = snap.vectors()
    assert v.shape == (6, 48) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert s.model["dim"] == 48 and snapshot.latest(out) == s.snapshot
    assert json.load(open(os.path.join(s.snapshot, "summary.json")))["embedded"] == 6


def test_incremental_run_reuses_unchanged_reembeds_changed_drops_removed(embed_config, tmp_path):
    cat = tmp_path / "cat"
    manifest = write_catalog(str(cat), num_products=6, images_per_product=2, size=96)
    out = str(tmp_path / "emb")
    first = run_embed([manifest], out, embed_config, run_id="r1")
    assert first.embedded == 12

    # Change one image's bytes, remove one row, add one new row.
    with open(manifest) as fh:
        rows = list(csv.DictReader(fh))
    shutil.copy(rows[3]["image_uri"], rows[2]["image_uri"])  # P0001-0 now shows P0001-1
    removed = rows.pop(0)
    new_img = cat / "new.jpg"
    new_img.write_bytes(f.jpeg_bytes())
    rows.append({"product_id": "P9999", "image_id": "P9999-0", "image_uri": str(new_img),
                 "title": "new", "category": "x"})
    m2 = _write_manifest(tmp_path / "m2.csv", rows,
                         fields=("product_id", "image_id", "image_uri", "title", "category"))
    second = run_embed([m2], out, embed_config, run_id="r2", previous=first.snapshot)
    assert (second.input_rows, second.embedded, second.reused) == (12, 2, 10)
    assert second.dropped_from_previous == 1
    t1 = {r["image_id"]: r for r in snapshot.load(first.snapshot).table.to_pylist()}
    t2 = {r["image_id"]: r for r in snapshot.load(second.snapshot).table.to_pylist()}
    assert removed["image_id"] not in t2 and "P9999-0" in t2
    assert t2["P0001-0"]["content_sha256"] == t1["P0001-1"]["content_sha256"]
    assert np.allclose(t2["P0001-0"]["embedding"], t1["P0001-1"]["embedding"], atol=1e-5)
    assert t2["P0002-0"]["embedding"] == t1["P0002-0"]["embedding"]  # reused as is
    assert snapshot.latest(out) == second.snapshot


@pytest.mark.heavy
def test_rerun_of_a_run_id_replaces_only_that_snapshot(embed_config, tmp_path, caplog):
    manifest = write_catalog(str(tmp_path / "cat"), num_products=2, images_per_product=2, size=96)
    out = str(tmp_path / "emb")
    a = run_embed([manifest], out, embed_config, run_id="r1")
    b = run_embed([manifest], out, embed_config, run_id="r2")
    before = sorted(os.listdir(a.snapshot))
    (tmp_path / "emb" / "r2" / "stray.txt").write_text("left over from a crash")
    again = run_embed([manifest], out, embed_config, run_id="r2")
    assert sorted(os.listdir(a.snapshot)) == before
    assert not os.path.exists(os.path.join(b.snapshot, "stray.txt"))
    assert again.embedded == 4
    # Re-running an older run_id does not move LATEST backwards, and says so.
    with caplog.at_level("WARNING", logger="pipelines.embed.job"):
        run_embed([manifest], out, embed_config, run_id="r1")
    assert snapshot.latest(out) == b.snapshot
    assert "the embeddings LATEST stays at r2" in caplog.text


def test_separate_views_and_merge_previous(embed_config, tmp_path):
    cfg = embed_config.replace(augment={"views": ["original", "hflip"], "mode": "separate"})
    manifest = write_catalog(str(tmp_path / "cat"), num_products=3, images_per_product=1, size=96)
    out = str(tmp_path / "emb")
    base = run_embed([manifest], out, cfg, run_id="r1")
    assert base.embedded == 3
    table = snapshot.load(base.snapshot).table
    assert len(table) == 6 and set(table.column("view").to_pylist()) == {"original", "hflip"}

    drop_img = tmp_path / "drop.jpg"
    drop_img.write_bytes(f.jpeg_bytes(color=(10, 200, 10)))
    drop = _write_manifest(tmp_path / "drop.csv", [
        {"product_id": "D1", "image_id": "D1-0", "image_uri": str(drop_img)},
        {"product_id": "P0000-v2", "image_id": "P0000-0", "image_uri": str(drop_img)}])
    merged = run_embed([drop], out, cfg, run_id="r2", previous=base.snapshot,
                       merge_previous=True)
    assert (merged.input_rows, merged.embedded, merged.reused) == (2, 2, 0)
    assert merged.carried_forward == 2 and merged.replaced_existing == 1
    rows = snapshot.load(merged.snapshot).table.to_pylist()
    assert len(rows) == 8  # 4 images x 2 views
    assert {r["product_id"] for r in rows if r["image_id"] == "P0000-0"} == {"P0000-v2"}


def test_mean_of_views_is_one_unit_vector_per_image(embed_config, tmp_path):
    cfg = embed_config.replace(augment={"views": ["original", "hflip", "crop"], "mode": "mean"})
    manifest = write_catalog(str(tmp_path / "cat"), num_products=2, images_per_product=1, size=96)
    s = run_embed([manifest], str(tmp_path / "emb"), cfg)
    snap = snapshot.load(s.snapshot)
    assert len(snap.table) == 2
    assert set(snap.table.column("view").to_pylist()) == {"mean(original+hflip+crop)"}
    assert np.allclose(np.linalg.norm(snap.vectors(), axis=1), 1.0, atol=1e-5)


@pytest.mark.slow  # the multi-process variant of the in-memory runs above
def test_multi_process_direct_runner(embed_config, tmp_path):
    cfg = embed_config.replace(runner={"direct_running_mode": "multi_processing",
                                       "direct_num_workers": 2})
    manifest = write_catalog(str(tmp_path / "cat"), num_products=8, images_per_product=3, size=96)
    s = run_embed([manifest], str(tmp_path / "emb"), cfg)
    assert (s.input_rows, s.embedded, s.dead_lettered) == (24, 24, 0)
    in_proc = run_embed([manifest], str(tmp_path / "emb2"), embed_config)
    a = {r["image_id"]: r["embedding"] for r in snapshot.load(s.snapshot).table.to_pylist()}
    b = {r["image_id"]: r["embedding"] for r in snapshot.load(in_proc.snapshot).table.to_pylist()}
    assert a.keys() == b.keys()
    assert all(np.allclose(a[k], b[k], atol=1e-5) for k in a)  # same vectors either way


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"),
    ("", "empty CSV"),
    ("product_id,title\n1,x\n", "lacks required column"),
    ("product_id,image_uri\n", "hold no rows"),
])
def test_bad_manifests_fail_before_the_job_starts(embed_config, tmp_path, content, message):
    path = tmp_path / "m.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(EmbedError, match=message):
        run_embed([str(path)], str(tmp_path / "emb"), embed_config)
    assert not (tmp_path / "emb").exists()


def test_jsonl_and_parquet_manifests(embed_config, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    img = tmp_path / "a.jpg"
    img.write_bytes(f.jpeg_bytes())
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"product_id": "A", "image_uri": str(img), "tags": ["x"]}) + "\n"
        + "{not json\n")
    pq.write_table(pa.table({"product_id": ["B"], "image_uri": [str(img)],
                             "image_id": ["B-1"], "price": [3.5]}), tmp_path / "m.parquet")
    s = run_embed([str(tmp_path / "m.jsonl"), str(tmp_path / "m.parquet")],
                  str(tmp_path / "emb"), embed_config)
    assert (s.input_rows, s.embedded, s.dead_lettered) == (3, 2, 1)
    assert s.dead_letter_reasons == {"manifest/invalid_row": 1}
    rows = {r["image_id"]: r for r in snapshot.load(s.snapshot).table.to_pylist()}
    assert json.loads(rows["A"]["metadata"]) == {"tags": ["x"]}  # image_id defaults to product_id
    assert json.loads(rows["B-1"]["metadata"]) == {"price": 3.5}


def test_summary_times_each_stage_and_the_model_sees_full_batches(embed_config, tmp_path):
    """timings.stages (pipelines/core/stage_timing.py): every stage counted once per element,
    and RunInference batches are full (model.batch_size 8) but for one short one per bundle."""
    manifest = write_catalog(str(tmp_path / "cat"), num_products=5, images_per_product=4, size=96)
    s = run_embed([manifest], str(tmp_path / "emb"), embed_config)
    stages = s.timings["stages"]
    assert [k for k in stages] == ["resolve", "decode", "load_model", "embed", "assemble"]
    assert stages["resolve"]["calls"] == stages["decode"]["calls"] == 20
    assert stages["assemble"]["calls"] == 20 and stages["load_model"]["calls"] == 1
    embed = stages["embed"]
    assert embed["items"] == 20 and embed["max_size"] == 8
    assert embed["calls"] <= 3 + 1  # 20 / 8 -> 8, 8, 4 in one bundle (or one more split)
    for row in stages.values():
        assert row["wall_s"] >= 0 and row["cpu_s"] >= 0
        assert 0 <= row["first_end_s"] <= row["last_end_s"] <= s.timings["pipeline_s"] + 1
    on_disk = json.load(open(os.path.join(s.snapshot, "summary.json")))
    assert on_disk["timings"]["stages"]["embed"]["items"] == 20
