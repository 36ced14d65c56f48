"""The delta log (pipelines/index/deltas.py) and its serving merge (serving/delta_index.py)
on a real published index: upserted rows are found, deleted ids never come back for any
query kind, writes are atomic under SIGKILL, damaged deltas are refused by name while the
version keeps serving, and concurrent writers lose nothing."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow as pa
import pytest

from pipelines.core import filesystem as fs
from pipelines.embed import snapshot
from pipelines.index import deltas as dl
from pipelines.index import takedowns as td
from pipelines.index.delete import delete_ids
from serving.errors import QueryError
from serving.searcher import CatalogSearcher
from serving_fixtures import NUM_PRODUCTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snapshot(world):
    snap = snapshot.load(world.snapshot)
    return snap.table.to_pylist(), snap.vectors()


def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def _rows(entries):
    return pa.table({c: [e[c] for e in entries] for c in
                     ("image_id", "view", "product_id", "image_uri", "metadata")})


def _new_rows(world, n, prefix="NEW", seed=0):
    """n new images of n new products, vectors near existing ones (so they rank high)."""
    rows, vectors = _snapshot(world)
    rng = np.random.default_rng(seed)
    out, vecs = [], []
    for i in range(n):
        src = rows[i]
        out.append({"image_id": f"{prefix}-img-{i}", "view": src["view"],
                    "product_id": f"{prefix}-P{i}", "image_uri": src["image_uri"],
                    "metadata": json.dumps({"category": "delta-cat",
                                            "title": f"zebrafruit {prefix.lower()} {i}"})})
        vecs.append(_unit(vectors[i] + rng.normal(0, 0.02, vectors.shape[1])))
    return _rows(out), np.stack(vecs)


def test_upserted_rows_are_found_and_counts_reconcile(world, root):
    rows, vectors = _new_rows(world, 3)
    dm = dl.write_delta(root, rows=rows, vectors=vectors, source={"test": 1})
    assert dm.seq == 1 and dm.version == "v0001" and dm.num_rows == 3
    s = CatalogSearcher.open(root, config=world.config)
    idx = s.current
    for i in range(3):
        hits = s.search_vector(vectors[i], k=3).hits
        assert hits[0].product_id == f"NEW-P{i}" and hits[0].score == pytest.approx(1, abs=1e-4)
    # filtered on the delta's own metadata, text, similar-of-a-delta-product
    only = s.search_vector(vectors[0], k=10, filters={"category": "delta-cat"}).hits
    assert {h.product_id for h in only} == {"NEW-P0", "NEW-P1", "NEW-P2"}
    assert s.search_text("zebrafruit", k=10).hits[0].product_id.startswith("NEW-P")
    sim = s.similar_to(product_id="NEW-P1", k=NUM_PRODUCTS + 2).hits
    assert "NEW-P1" not in {h.product_id for h in sim} and len(sim) == NUM_PRODUCTS + 2
    info = idx.delta_info()
    assert info["rows_added"] == 3 and info["rows_removed"] == 0
    assert info["searchable_rows"] == info["base_rows"] + 3 == idx.describe()["num_vectors"]
    assert idx.num_products == NUM_PRODUCTS + 3


def test_upsert_replaces_an_existing_image(world, root):
    rows, vectors = _snapshot(world)
    target = rows[5]
    new_vec = _unit(np.random.default_rng(3).normal(size=vectors.shape[1]))
    dl.write_delta(root, rows=_rows([{**target, "metadata": json.dumps({"title": "moved"})}]),
                   vectors=new_vec[None])
    s = CatalogSearcher.open(root, config=world.config)
    assert len(s.current.image_rows(target["image_id"])) == 1
    hit = s.search_vector(new_vec, k=1, collapse=False).hits[0]
    assert hit.image_id == target["image_id"] and hit.metadata == {"title": "moved"}
    old = s.search_vector(vectors[5], k=20, collapse=False).hits
    assert all(h.score < 0.9999 or h.image_id != target["image_id"] for h in old)
    info = s.current.delta_info()
    assert info["searchable_rows"] == info["base_rows"] + 1 - 1


def test_deleted_ids_never_appear_for_any_query_kind(world, root):
    rows, vectors = _snapshot(world)
    victim = rows[0]
    product = victim["product_id"]
    category = json.loads(victim["metadata"])["category"]
    title = json.loads(victim["metadata"])["title"]
    image_bytes = fs.read_bytes(victim["image_uri"])
    s = CatalogSearcher.open(root, config=world.config)
    assert s.search_image(image_bytes, k=3).hits[0].product_id == product  # before
    other = next(r for r in rows if r["product_id"] != product)
    # one image of a second product deleted by image_id
    img_victim = other["image_id"]
    result = delete_ids(root, product_ids=[product], image_ids=[img_victim, "nope"])
    assert result["removed"] == {"image_ids": [img_victim], "product_ids": [product]}
    assert result["not_found"]["image_ids"] == ["nope"]
    outcome = s.reload()
    assert outcome.status == "deltas_applied", outcome
    every = NUM_PRODUCTS * 3

    def check(hits):
        assert product not in {h.product_id for h in hits}
        assert img_victim not in {h.image_id for h in hits}

    for collapse in (True, False):
        check(s.search_image(image_bytes, k=min(every, 100), collapse=collapse).hits)
        check(s.search_vector(vectors[0], k=min(every, 100), collapse=collapse).hits)
        check(s.search_vector(vectors[0], k=10, collapse=collapse,
                              filters={"category": category}).hits)
        check(s.search_vector(vectors[0], k=10, collapse=collapse,
                              filters={"product_id": product}).hits)
        check(s.search_vector(vectors[0], k=10, collapse=collapse, text=title).hits)
        check(s.search_image(image_bytes, k=10, collapse=collapse, text=title).hits)
    assert s.search_vector(vectors[0], k=10, filters={"product_id": product}).hits == []
    check(s.search_text(title, k=100).hits)
    check(s.search_text(product, k=100).hits)
    check(s.similar_to(product_id=other["product_id"], k=NUM_PRODUCTS).hits)
    check(s.similar_to(product_id=other["product_id"], k=NUM_PRODUCTS, text_weight=0.5).hits)
    with pytest.raises(QueryError) as e:
        s.similar_to(product_id=product)
    assert e.value.reason == "unknown_product"
    with pytest.raises(QueryError):
        s.similar_to(image_id=img_victim)
    assert not s.current.has_image(img_victim) and s.current.image_uri(victim["image_id"]) is None
    info = s.current.delta_info()
    assert info["searchable_rows"] == info["base_rows"] - info["rows_removed"]
    assert info["rows_removed"] == 3 + 1  # the product's 3 images + one image
    # a restart (a new searcher) keeps them out
    again = CatalogSearcher.open(root, config=world.config)
    check(again.search_vector(vectors[0], k=100).hits)


def test_delete_cli_is_durable_and_picked_up_by_polling(world, root):
    from serving.reload import IndexWatcher
    rows, vectors = _snapshot(world)
    product = rows[3]["product_id"]
    s = CatalogSearcher.open(root, config=world.config)
    watcher = IndexWatcher(s, interval_s=0.1).start()
    try:
        proc = subprocess.run([sys.executable, "-m", "catalog_search.cli", "delete",
                               "--index-root", root, "--product-id", product, "--json"],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["removed"]["product_ids"] == [product] and out["delta"] == 1
        deadline = time.time() + 10
        while time.time() < deadline and product in {
                h.product_id for h in s.search_vector(vectors[3], k=NUM_PRODUCTS).hits}:
            time.sleep(0.05)
        assert product not in {h.product_id for h in
                               s.search_vector(vectors[3], k=NUM_PRODUCTS).hits}
    finally:
        watcher.stop()
    assert product in td.read_takedowns(root).product_ids
    bad = subprocess.run([sys.executable, "-m", "catalog_search.cli", "delete",
                          "--index-root", root], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert bad.returncode == 2 and "--product-id" in bad.stderr


_KILL_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from pipelines.index import deltas
    real = os.rename
    def slow_rename(a, b):
        print("WRITING", flush=True)
        time.sleep(60)
        real(a, b)
    os.rename = slow_rename
    deltas.write_delta(sys.argv[1], delete_product_ids=["P0001"])
""")


def test_sigkill_while_writing_leaves_no_partial_delta(world, root):
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, root], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "WRITING"  # files written, not yet committed
    folder = fs.normalize(dl.log_dir(root, "v0001"))
    assert any(n.startswith(dl.TMP_PREFIX) for n in os.listdir(folder))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert dl.committed_seqs(root, "v0001") == []
    log = dl.read_log(root, "v0001")
    assert log.deltas == [] and log.error is None
    s = CatalogSearcher.open(root, config=world.config)
    assert s.current.num_products == NUM_PRODUCTS
    dm = dl.write_delta(root, delete_product_ids=["P0001"])  # the next write succeeds
    assert dm.seq == 1 and not any(n.startswith(dl.TMP_PREFIX) for n in os.listdir(folder))


def test_damaged_delta_is_refused_by_name_and_the_version_keeps_serving(world, root):
    rows, vectors = _new_rows(world, 2)
    dl.write_delta(root, rows=rows.slice(0, 1), vectors=vectors[:1])
    s = CatalogSearcher.open(root, config=world.config)
    dl.write_delta(root, rows=rows.slice(1, 1), vectors=vectors[1:])
    dl.write_delta(root, delete_product_ids=["NEW-P0"])
    vec_file = os.path.join(fs.normalize(dl.delta_dir(root, "v0001", 2)), dl.VECTORS_FILE)
    with open(vec_file, "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00" * 8)
    outcome = s.reload()
    assert outcome.status == "refused" and vec_file in outcome.reason
    assert "checksum" in outcome.reason
    # still serving the version with delta 1 (delta 2 refused, 3 after it not applied)
    assert s.search_vector(vectors[0], k=1).hits[0].product_id == "NEW-P0"
    assert s.version == "v0001" and s.current.delta_info()["deltas"] == 1
    assert s.reload().status == "unchanged"  # not refused again until the files change
    fresh = CatalogSearcher.open(root, config=world.config)  # a restart serves too
    assert fresh.current.delta_info()["error"] and fresh.current.delta_info()["deltas"] == 1
    assert "not_applied" in dl.summarize(dl.read_log(root, "v0001"))


def _write_many(root, worker, n):
    for i in range(n):
        dl.write_delta(root, delete_image_ids=[f"w{worker}-{i}"])


def test_concurrent_writers_lose_nothing(world, root):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(root, w, 8)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    log = dl.read_log(root, "v0001")
    assert [d.seq for d in log.deltas] == list(range(1, 25))
    ids = {i for d in log.deltas for i in d.delete_image_ids}
    assert ids == {f"w{w}-{i}" for w in range(3) for i in range(8)}


def _take_down_many(root, worker, n):
    for i in range(n):
        delete_ids(root, product_ids=[f"T{worker}-{i}"], reason=f"worker {worker}")


def _upsert_many(root, rows, vectors):
    for i in range(rows.num_rows):
        dl.write_delta(root, rows=rows.slice(i, 1), vectors=vectors[i:i + 1])


def test_concurrent_takedowns_and_upserts_lose_nothing(world, root):
    """Takedowns (the list is read, changed and replaced) from two processes while a third
    writes upserts: every takedown is on the list and has its delete delta, every upsert
    is served."""
    rows, vectors = _new_rows(world, 6, prefix="CC")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_take_down_many, args=(root, w, 6)) for w in range(2)]
    procs.append(ctx.Process(target=_upsert_many, args=(root, rows, vectors)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
        assert p.exitcode == 0
    want = {f"T{w}-{i}" for w in range(2) for i in range(6)}
    assert set(td.read_takedowns(root).product_ids) == want
    log = dl.read_log(root, "v0001")
    assert [d.seq for d in log.deltas] == list(range(1, 19)) and log.error is None
    assert {p for d in log.deltas for p in d.delete_product_ids} == want
    s = CatalogSearcher.open(root, config=world.config)
    assert s.current.delta_info()["rows_added"] == 6
    for i in range(6):
        assert s.search_vector(vectors[i], k=1).hits[0].product_id == f"CC-P{i}"


def test_refused_writes(world, root):
    rows, vectors = _new_rows(world, 1)
    with pytest.raises(dl.DeltaError, match="fingerprint"):
        dl.write_delta(root, rows=rows, vectors=vectors, model_fingerprint="other")
    with pytest.raises(dl.DeltaError, match="dim"):
        dl.write_delta(root, rows=rows, vectors=vectors, dim=vectors.shape[1] + 1)
    with pytest.raises(dl.DeltaError, match="shape"):
        dl.write_delta(root, rows=rows, vectors=np.ones((1, 3), np.float32))
    with pytest.raises(dl.DeltaIntegrityError, match="unit length"):
        dl.write_delta(root, rows=rows, vectors=vectors * 2)
    with pytest.raises(dl.DeltaError, match="empty delta"):
        dl.write_delta(root)
    from pipelines.index import artifact as art
    manifest = art.read_manifest(root, "v0001")
    import dataclasses
    art.write_manifest(root, "v0001", dataclasses.replace(
        manifest, extra={**manifest.extra, "adapter": {"id": "adapter-1", "path": "elsewhere"}}))
    with pytest.raises(dl.DeltaError, match="adapter"):
        dl.write_delta(root, rows=rows, vectors=vectors)
    with pytest.raises(dl.DeltaError, match="adapter"):
        dl.write_delta(root, rows=rows, vectors=vectors, model_space=True)
    assert dl.committed_seqs(root, "v0001") == []


def test_model_space_vectors_are_projected_with_the_versions_adapter(world, root):
    import dataclasses

    from pipelines.adapter.artifact import copy_into_version, make_adapter
    from pipelines.index import artifact as art
    manifest = art.read_manifest(root, "v0001")
    dim = manifest.dim
    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))  # a rotation: dim stays the same
    adapter = make_adapter(q.astype(np.float32), manifest.model)
    copy_into_version(adapter, art.version_dir(root, "v0001"))
    art.write_manifest(root, "v0001", dataclasses.replace(
        manifest, extra={**manifest.extra, "adapter": adapter.record()}))
    rows, raw = _new_rows(world, 2)
    dm = dl.write_delta(root, rows=rows, vectors=raw, model_space=True)
    assert dm.adapter == adapter.id
    stored = dl.read_delta(root, "v0001", 1, dim, adapter.id).vectors
    np.testing.assert_allclose(stored, adapter.apply(raw), atol=1e-6)
    with pytest.raises(dl.DeltaIntegrityError, match="adapter"):
        dl.read_delta(root, "v0001", 1, dim, None)
    # index-space vectors naming the version's adapter are taken as they are
    dl.write_delta(root, rows=rows, vectors=stored, adapter=adapter.id)
    with pytest.raises(dl.DeltaError, match="adapter"):
        dl.write_delta(root, rows=rows, vectors=stored, adapter="linear48@other")


def test_backfill_decision_refuses_another_model_and_respects_the_threshold(world, root):
    import dataclasses

    from pipelines.orchestration.delta_step import decide
    from pipelines.orchestration.errors import PermanentStepError
    summary = snapshot.read_summary(world.snapshot)
    other = dataclasses.replace(summary, model={**summary.model, "fingerprint": "f" * 64})
    with pytest.raises(PermanentStepError, match="fingerprint"):
        decide(root, other, [world.manifest], 1000)
    with pytest.raises(PermanentStepError, match="dim"):
        decide(root, dataclasses.replace(summary, dim=summary.dim + 1), [world.manifest], 1000)
    assert decide(root, summary, [world.manifest], 0)["mode"] == "full"
    big = decide(root, summary, [world.manifest], 10)  # 36 rows > 10
    assert big["mode"] == "full" and "exceed index.delta_max_rows 10" in big["reason"]
    fits = decide(root, summary, [world.manifest], 1000)
    assert fits["mode"] == "delta" and fits["rows"].num_rows == NUM_PRODUCTS * 3


def test_index_info_reports_the_deltas_and_the_counts_reconcile(world, root):
    from pipelines.index.commands import info_report
    rows, vectors = _new_rows(world, 2)
    dl.write_delta(root, rows=rows, vectors=vectors)
    delete_ids(root, product_ids=["P0003"], image_ids=["NEW-img-0"])
    report = info_report(root)
    [entry] = [v for v in report["versions"] if v["latest"]]
    d = entry["deltas"]
    assert d["deltas"] == 2 and d["rows_upserted"] == 2
    assert d["image_ids_deleted"] == 1 and d["product_ids_deleted"] == 1
    assert d["takedowns"] == {"image_ids": 1, "product_ids": 1}
    assert d["oldest_age_s"] >= 0 and d["error"] is None
    assert d["searchable_rows"] == d["base_rows"] + d["rows_added"] - d["rows_removed"]
    s = CatalogSearcher.open(root, config=world.config)
    info = s.current.delta_info()  # serving counts the same
    idx = s.current  # and an exact search over everything returns exactly that many rows
    _, found = idx.search(vectors[:1], idx.num_vectors, exact=True)
    live = {int(r) for r in found[0] if r >= 0}
    assert len(live) == d["searchable_rows"] == len(
        dl.served_rows(root, "v0001", None, ["NEW-img-0"], ["P0003"])["live"])
    assert not any(idx.product_id(r) == "P0003" or idx.image_id(r) == "NEW-img-0"
                   for r in live)
    assert (info["base_rows"], info["rows_added"], info["rows_removed"],
            info["searchable_rows"]) == (d["base_rows"], d["rows_added"], d["rows_removed"],
                                         d["searchable_rows"])
    proc = subprocess.run([sys.executable, "-m", "catalog_search.cli", "index-info",
                           "--index-root", root], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"serving {d['searchable_rows']} rows = {d['base_rows']} + 2 added" in proc.stdout


def test_backfill_step_of_another_model_fails_permanently_with_the_reason(world, root, tmp_path):
    """Through the launcher (a step subprocess, as the DAG task runs it): a drop embedded
    with another model is a PermanentStepError naming the fingerprints; nothing is written."""
    import dataclasses
    from datetime import datetime, timezone

    from pipelines.orchestration import launcher
    from pipelines.orchestration import plan as orch_plan
    from pipelines.orchestration.errors import PermanentStepError
    params = {**orch_plan.default_params(orch_plan.REFRESH), "manifests": [world.manifest],
              "embeddings_root": str(tmp_path / "emb"), "index_root": str(tmp_path / "new")}
    plan = orch_plan.validate_params(params, orch_plan.REFRESH,
                                     datetime(2025, 3, 1, tzinfo=timezone.utc)).to_dict()
    plan["index_root"] = root  # the published test index (its version is not a run id)
    summary = snapshot.read_summary(world.snapshot)
    other = dataclasses.replace(summary, model={**summary.model, "fingerprint": "e" * 64})
    lines: list[str] = []
    with pytest.raises(PermanentStepError, match="fingerprint 'e{20}"):
        launcher.launch_step(launcher.BACKFILL_INDEX_STEP,
                             {"plan": plan, "embed_summary": other.to_dict()},
                             echo=lines.append)
    assert dl.committed_seqs(root, "v0001") == []
