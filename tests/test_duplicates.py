"""`catalog-search duplicates` on a real published index (real Beam job on the
DirectRunner, real ScaNN shards): planted exact and near copies under new product ids
are grouped with their originals, distinct look-alike products (same shape and category)
are not, the counts reconcile, and the report renders in a real browser."""
from __future__ import annotations

import asyncio
import csv
import json
import os
import shutil
import tempfile

import pyarrow.parquet as pq
import pytest

from catalog_search.cli import main
from duplicates_world import PLANTED, write_planted_catalog
from pipelines.core.config import load_config
from pipelines.duplicates.groups import UnionFind, build_groups
from pipelines.duplicates.job import (OUTPUT_FILES, DuplicatesError, make_spec, plan_units,
                                      run_duplicates, unit_rows)
from pipelines.duplicates.pairs import FindPairs, bucket_of, exact_pairs
from pipelines.duplicates.pixels import pixel_signature, pixel_similarity
from serving_fixtures import build_index, write_snapshot
from tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def world():
    root = tempfile.mkdtemp(prefix="duplicates-tests-")
    model_dir = make_tiny_model(root)
    # The tiny random test model does not tell look-alikes from copies (every image of the
    # catalog scores > 0.98 against every other): its threshold accepts only identical
    # vectors, and the pixel check at the documented duplicates.pixel_threshold decides.
    config = load_config(overrides={
        "model": {"handle": model_dir, "cache_dir": os.path.join(root, "cache"),
                  "batch_size": 16},
        "runner": {"direct_running_mode": "in_memory", "direct_num_workers": 1},
        "index": {"shards": 2, "eval_queries": 20, "recall_threshold": 0.5},
        "duplicates": {"threshold": 0.9999, "candidate_threshold": 0.9, "block_rows": 7}})
    manifest = write_planted_catalog(root)
    snap = write_snapshot(manifest, os.path.join(root, "embeddings", "run-1"), config)
    index_root = os.path.join(root, "index")
    build_index(snap, index_root, config, version="v0001")
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    yield {"root": root, "config": config, "index_root": index_root, "rows": rows,
           "snapshot": snap}
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def result(world):
    out = os.path.join(world["root"], "dups")
    summary = run_duplicates(world["index_root"], out, world["config"])
    return {"out": out, "summary": summary,
            "table": pq.read_table(os.path.join(out, "duplicates.parquet")).to_pylist()}


def test_planted_copies_are_grouped_with_their_originals_and_nothing_else(world, result):
    by_group: dict[int, set[str]] = {}
    for r in result["table"]:
        by_group.setdefault(r["group_id"], set()).add(r["image_id"])
    expected = [{f"{pid}-0", source} for pid, (_, source) in PLANTED.items()]
    assert sorted(map(sorted, by_group.values())) == sorted(map(sorted, expected))
    match = {r["image_id"]: r["match"] for r in result["table"]}
    assert match["DUP-EXACT-0"] == match["P0001-0"] == "exact"
    for pid in ("DUP-REENC", "DUP-RESIZE", "DUP-CROP"):
        assert match[f"{pid}-0"] == "near"
    for r in result["table"]:
        assert 0.9 <= r["similarity"] <= 1.0
        assert r["group_size"] == 2 and r["group_products"] == 2
        assert r["image_uri"] and os.path.exists(r["image_uri"])


def test_counts_reconcile(world, result):
    s = result["summary"]
    assert s["reconciled"] is True and all(s["checks"].values())
    assert s["version"] == "v0001"
    assert s["images_scanned"] == s["num_images"] == len(world["rows"])
    assert s["candidate_pairs"] == s["near_pairs"] + s["rejected_pairs"]
    assert s["rejected_pairs"] > 0  # look-alikes were candidates, and were turned down
    assert s["exact_pairs"] == 1 and s["exact_checked"] is True
    assert s["groups"] == len(PLANTED) and s["images_in_groups"] == 2 * len(PLANTED)
    assert s["groups_by_kind"] == {"exact": 1, "near": 3, "mixed": 0}
    with open(os.path.join(result["out"], "duplicates.csv"), newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(result["table"]) == s["images_in_groups"]
    assert set(csv_rows[0]) == {"group_id", "group_size", "group_products", "image_id",
                                "product_id", "image_uri", "similarity", "match",
                                "matched_image_id"}
    assert json.load(open(os.path.join(result["out"], "summary.json"))) == s


def test_a_lower_threshold_groups_more_and_a_cli_run_matches(world, result, tmp_path, capsys):
    """The CLI, with the pixel check off and a threshold every look-alike passes: one big
    group per connected set of products, counts still reconciling."""
    cfg = tmp_path / "nopixel.yaml"
    cfg.write_text("duplicates:\n  pixel_threshold: null\n  candidate_threshold: 0.9\n"
                   "runner:\n  direct_running_mode: in_memory\n  direct_num_workers: 1\n")
    code = main(["--config", str(cfg), "duplicates", "--index-root", world["index_root"],
                 "--threshold", "0.9", "--out", str(tmp_path / "loose"), "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    loose = json.loads(out.strip().splitlines()[-1])
    assert loose["reconciled"] and loose["threshold"] == 0.9
    assert loose["images_in_groups"] > result["summary"]["images_in_groups"]
    assert loose["largest_group"] > 2


def test_the_job_logs_its_progress_against_the_units(world, tmp_path, caplog, monkeypatch):
    import logging
    import re

    from pipelines.core import progress
    monkeypatch.setenv(progress.PROGRESS_INTERVAL_ENV, "0.2")
    caplog.set_level(logging.INFO, logger=progress.__name__)
    config = world["config"].replace(duplicates={"pixel_threshold": None})
    spec, units, _ = make_spec(world["index_root"], str(tmp_path / "p"), config)
    assert len(units) > 1
    run_duplicates(world["index_root"], str(tmp_path / "p"), config)
    lines = [r.getMessage() for r in caplog.records if r.name == progress.__name__]
    assert lines, "no progress line"
    assert re.match(rf"duplicates progress: {len(units)}/{len(units)} units \(100%\), done",
                    lines[-1]), lines


def test_without_the_pixel_check_only_pairs_at_the_threshold_are_candidates(world, tmp_path):
    # a pair below the threshold can only be accepted by the pixel check; with it off the
    # job does not gather such pairs (same groups, fewer candidates, counts reconcile)
    config = world["config"].replace(duplicates={"pixel_threshold": None,
                                                 "threshold": 0.95, "candidate_threshold": 0.5})
    spec, _, _ = make_spec(world["index_root"], str(tmp_path / "s"), config)
    assert spec.candidate_threshold == spec.threshold == 0.95
    with_pixels = make_spec(world["index_root"], str(tmp_path / "t"),
                            world["config"].replace(duplicates={"candidate_threshold": 0.5,
                                                                "threshold": 0.95}))[0]
    assert with_pixels.candidate_threshold == 0.5
    summary = run_duplicates(world["index_root"], str(tmp_path / "s"), config)
    assert summary["candidate_threshold"] == 0.95 and summary["reconciled"]
    assert summary["candidate_pairs"] == summary["near_pairs"] and summary["rejected_pairs"] == 0


def test_cli_refuses_bad_arguments(world, tmp_path, capsys):
    assert main(["duplicates", "--index-root", world["index_root"], "--threshold", "1.5",
                 "--out", str(tmp_path / "x")]) == 2
    assert main(["duplicates", "--index-root", world["index_root"], "--threshold", "0",
                 "--out", str(tmp_path / "x")]) == 2
    assert main(["duplicates", "--index-root", world["index_root"], "--version", "../up",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--threshold must be in (0, 1]" in capsys.readouterr().err
    assert main(["duplicates", "--index-root", str(tmp_path / "none"),
                 "--out", str(tmp_path / "x")]) == 1
    assert "no published index version" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")
    with pytest.raises(DuplicatesError):
        run_duplicates(str(tmp_path / "none"), str(tmp_path / "y"), world["config"])


def test_union_find_groups_and_exact_pairs():
    uf = UnionFind()
    for a, b in [("a", "b"), ("c", "d"), ("b", "c"), ("x", "y")]:
        uf.union(a, b)
    assert sorted(uf.groups()) == [["a", "b", "c", "d"], ["x", "y"]]
    pairs = list(exact_pairs("h", [("i1", "P1", "u1"), ("i2", "P1", "u2"), ("i3", "P2", "u3")]))
    table, groups = build_groups(pairs, {})
    assert groups[0]["images"] == ["i1", "i2", "i3"] and groups[0]["kind"] == "exact"
    assert list(exact_pairs("h", [("i1", "P1", ""), ("i2", "P1", "")])) == []  # one product
    assert plan_units([5, 0, 3], 2) == [(0, 0, 2), (0, 2, 4), (0, 4, 5), (2, 0, 2), (2, 2, 3)]


def test_pixel_check_separates_copies_from_look_alikes(world):
    """The signature correlation of each planted copy with its original is above the
    documented pixel threshold; no other pair of different products reaches it."""
    threshold = load_config().duplicates.pixel_threshold
    rows = {r["image_id"]: r for r in world["rows"]}
    sigs = {i: pixel_signature(open(r["image_uri"], "rb").read(), 10 ** 8)
            for i, r in rows.items()}
    planted = {frozenset((f"{pid}-0", src)) for pid, (_, src) in PLANTED.items()}
    ids = sorted(rows)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            if rows[a]["product_id"] == rows[b]["product_id"]:
                continue
            s = pixel_similarity(sigs[a], sigs[b])
            if frozenset((a, b)) in planted:
                assert s >= threshold, (a, b, s)
            else:
                assert s < threshold, (a, b, s)


@pytest.mark.heavy
def test_report_renders_in_a_real_browser(result):
    from test_serving_page import Browser, Cdp, _find_chromium
    chromium = _find_chromium()
    page = "file://" + os.path.join(result["out"], "report.html")
    html = open(os.path.join(result["out"], "report.html"), encoding="utf-8").read()
    assert "<script" not in html and "http" not in html.split("<body>")[1]

    async def drive(ws_url: str) -> dict:
        import websockets
        async with websockets.connect(ws_url, max_size=None) as ws:
            cdp = Cdp(ws)
            await cdp.send("Page.enable")
            await cdp.send("Runtime.enable")
            await cdp.send("Page.navigate", url=page)
            await cdp.wait_for("document.readyState === 'complete'")
            await cdp.wait_for("[...document.images].length > 0 && [...document.images]"
                               ".every(i => i.complete && i.naturalWidth > 0)")
            return await cdp.evaluate("""({
                title: document.title,
                groups: [...document.querySelectorAll('section.group')].map(s => ({
                    size: +s.dataset.size, kind: s.dataset.kind,
                    images: [...s.querySelectorAll('li[data-image-id]')].map(
                        li => li.dataset.imageId)})),
                thumbs: document.images.length})""")

    browser = Browser(chromium)
    try:
        seen = asyncio.run(drive(browser.page_ws_url()))
    finally:
        browser.close()
    assert seen["title"] == "Duplicate listings report"
    assert len(seen["groups"]) == len(PLANTED) and seen["thumbs"] == 2 * len(PLANTED)
    assert all(g["size"] == 2 for g in seen["groups"])
    assert {frozenset(g["images"]) for g in seen["groups"]} == {
        frozenset((f"{pid}-0", src)) for pid, (_, src) in PLANTED.items()}
    assert [g["kind"] for g in seen["groups"]].count("exact") == 1


def _reference(world: dict, out: str) -> dict:
    """The job's result computed the plain way, in process: every image searched exactly
    against every vector (brute force; the world's shards are brute force too), each pair
    of different products at or above the candidate threshold kept once at its best score,
    decided by VerifyPairs, exact pairs from the snapshot's hashes, union-find."""
    import numpy as np

    from pipelines.duplicates.pairs import VerifyPairs, pair_key, read_hashes
    from pipelines.embed import snapshot as snap
    from pipelines.index.reader import open_index
    from pipelines.index.sharded_search import ShardedSearcher
    spec, _, _ = make_spec(world["index_root"], out, world["config"])
    index = ShardedSearcher(open_index(world["index_root"], spec.version).load_shards())
    vectors = index.vectors(np.arange(index.num_vectors))
    _, found = index.search_exact(vectors, min(index.num_vectors, spec.neighbours + 1))
    best: dict[tuple[str, str], dict] = {}
    for q, row in enumerate(found):
        for nb in row.tolist():
            a, b = index.image_ids[q], index.image_ids[nb]
            if nb < 0 or a == b or index.product_ids[q] == index.product_ids[nb]:
                continue
            score = float(vectors[q] @ vectors[nb])
            key = pair_key(a, b)
            if score >= spec.candidate_threshold and score > best.get(key, {"score": -2})["score"]:
                best[key] = {"score": min(1.0, score),
                             "uri": {a: index.image_uris[q], b: index.image_uris[nb]},
                             "product": {a: index.product_ids[q], b: index.product_ids[nb]}}
    verify = VerifyPairs(spec)
    near = [v for key in sorted(best) for tag, v in verify.process((key, best[key]))
            if tag == "accepted"]
    hashes: dict[str, list] = {}
    for f in snap.embedding_files(spec.snapshot):
        for sha, member in read_hashes(f):
            hashes.setdefault(sha, []).append(member)
    exact = [p for sha in sorted(hashes) for p in exact_pairs(sha, hashes[sha])]
    uris = {p[side]: p[f"uri_{side}"] for p in [*exact, *near] for side in ("a", "b")}
    table, _ = build_groups([*exact, *near], uris)
    return {"candidates": len(best), "near": len(near), "exact": len(exact),
            "table": table.to_pylist()}


def _groups_of(table: list[dict]) -> set[frozenset]:
    by_group: dict[int, set[str]] = {}
    for r in table:
        by_group.setdefault(r["group_id"], set()).add(r["image_id"])
    return {frozenset(g) for g in by_group.values()}


def test_groups_are_unchanged_by_the_partitioning_and_match_a_plain_computation(
        world, result, tmp_path):
    """The batched, bucketed job (part files between steps) finds what the plain all-pairs
    computation finds on the planted set, whatever its buckets and units: the same groups,
    similarities, match kinds and counts; its intermediate files are gone afterwards."""
    ref = _reference(world, str(tmp_path / "ref"))
    assert _groups_of(ref["table"]) == _groups_of(result["table"])
    assert len(_groups_of(ref["table"])) == len(PLANTED)
    s = result["summary"]
    assert (s["candidate_pairs"], s["near_pairs"], s["exact_pairs"]) == (
        ref["candidates"], ref["near"], ref["exact"])
    assert s["candidate_pairs"] == s["near_pairs"] + s["rejected_pairs"]
    by_image = {r["image_id"]: r for r in result["table"]}
    for r in ref["table"]:
        got = by_image[r["image_id"]]
        assert got["match"] == r["match"] and got["product_id"] == r["product_id"]
        assert got["similarity"] == pytest.approx(r["similarity"], abs=1e-5)
    assert not [n for n in os.listdir(result["out"]) if n.startswith("_work")]
    one = run_duplicates(world["index_root"], str(tmp_path / "one"), world["config"],
                         buckets=1, max_units=1)
    many = run_duplicates(world["index_root"], str(tmp_path / "many"), world["config"],
                          buckets=13, max_units=1000)
    for other, out in ((one, "one"), (many, "many")):
        table = pq.read_table(str(tmp_path / out / "duplicates.parquet")).to_pylist()
        assert _groups_of(table) == _groups_of(result["table"])
        assert sorted((r["image_id"], r["similarity"], r["match"]) for r in table) == sorted(
            (r["image_id"], r["similarity"], r["match"]) for r in result["table"])
        for key in ("candidate_pairs", "rejected_pairs", "near_pairs", "exact_pairs",
                    "images_scanned", "groups"):
            assert other[key] == s[key], key
        assert other["reconciled"] is True
        assert sorted(os.listdir(tmp_path / out)) == sorted(OUTPUT_FILES)


def test_find_pairs_passes_only_paths_and_counts(world, tmp_path):
    """What a FindPairs unit hands to the runner (which, with the DirectRunner, is the
    launcher process): its count of query images and (bucket, part file) pairs, no pair
    records; the part files of every unit hold each candidate found from each side."""
    spec, units, _ = make_spec(world["index_root"], str(tmp_path / "o"), world["config"],
                               buckets=3)
    step = FindPairs(spec)
    scanned, parts = 0, []
    for unit in units:
        for tag, value in step.process(unit):
            assert tag in ("scanned", "part")
            if tag == "scanned":
                assert isinstance(value, int)
                scanned += value
            else:
                bucket, path = value
                assert isinstance(bucket, int) and 0 <= bucket < 3 and isinstance(path, str)
                parts.append(value)
    assert scanned == len(world["rows"])
    rows = [r for _, path in parts for r in pq.read_table(path).to_pylist()]
    assert rows and all(r["a"] < r["b"] and r["product_a"] != r["product_b"] for r in rows)
    assert all(r["score"] >= spec.candidate_threshold for r in rows)
    assert all(bucket_of(f"{r['a']}\0{r['b']}", 3) == b
               for b, path in parts for r in pq.read_table(path).to_pylist())
    # the unit plan covers every row once, in whole search blocks
    assert unit_rows(200_000, 2048, 64) == 2 * 2048 and unit_rows(10, 7, 64) == 7


def test_the_all_vs_all_search_uses_its_share_of_each_tree_shards_leaves(tmp_path):
    # duplicates.leaves_fraction scales every tree shard's tuned leaves_to_search (at least
    # 1); brute-force shards (-1) are left alone; 0 or above 1 is refused with the key named
    from index_fixtures import clustered_vectors, make_config
    from index_fixtures import write_snapshot as write_vectors

    from pipelines.core.config import ConfigError
    from pipelines.index.build import run_build_index
    from pipelines.index.reader import open_index
    snap = write_vectors(str(tmp_path / "snap"), clustered_vectors(3000, 24, seed=41))
    root = str(tmp_path / "index")
    config = make_config(shards=2, brute_force_below=0)
    run_build_index(snap, root, config)
    tuned = [s.leaves_to_search for s in open_index(root).load_shards()]
    assert all(t > 1 for t in tuned)
    for fraction in (1.0, 0.5, 0.01):
        cfg = config.replace(duplicates={"leaves_fraction": fraction})
        spec, _, _ = make_spec(root, str(tmp_path / f"out{fraction}"), cfg)
        got = [s.leaves_to_search for s in FindPairs(spec).load().shards]
        assert got == [max(1, round(t * fraction)) for t in tuned], (fraction, got)
    for bad in (0, 1.5):
        with pytest.raises(ConfigError, match="duplicates.leaves_fraction"):
            config.replace(duplicates={"leaves_fraction": bad})
