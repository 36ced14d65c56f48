"""The MLP adapter option (`train-adapter --hidden DIM`, kind "mlp"): trained, saved as plain
arrays (npy + checksums + format version, no pickle), refused when damaged, and applied the
same in the index build and in serving (results equal a projection done by hand here, from
the arrays, with numpy).

Real TensorFlow training on generated vectors, real build_index (Beam DirectRunner) and the
tiny real SavedModel of the serving tests.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil

import numpy as np
import pytest

from adapter_fixtures import adapter_config, confused_snapshots, confusing_vectors, edit_manifest
from catalog_search.cli import main as cli_main
from pipelines.adapter import AdapterError, load_adapter
from pipelines.adapter.artifact import (MANIFEST_FILE, MLP_FILES, base_model_record,
                                        make_adapter, save_adapter)
from pipelines.adapter.commands import run_train_adapter
from pipelines.adapter.data import recall_at
from pipelines.core import filesystem as fs
from pipelines.embed import snapshot as snap
from serving.searcher import CatalogSearcher
from serving_fixtures import serving_world

PRODUCTS = range(20)


def by_hand(arrays: dict[str, np.ndarray], raw: np.ndarray) -> np.ndarray:
    """x W + relu(x W1 + b1) W2, L2-normalised: the mlp projection written out here."""
    x = np.atleast_2d(np.asarray(raw, np.float64))
    y = x @ arrays["weights"] + np.maximum(
        x @ arrays["hidden_weights"] + arrays["hidden_bias"], 0) @ arrays["output_weights"]
    return (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    world = confused_snapshots(tmp_path_factory.mktemp("mlp"), PRODUCTS)
    out = str(world["root"] / "adapter")
    result = run_train_adapter(world["catalog"], out, adapter_config(hidden=24), [world["pairs"]])
    return {**world, "out": out, "result": result}


def _arrays(d: str) -> dict[str, np.ndarray]:
    return {name[:-4]: np.load(os.path.join(d, name), allow_pickle=False) for name in MLP_FILES}


def test_mlp_adapter_trains_saves_plain_arrays_and_loads(trained):
    adapter = load_adapter(trained["out"])
    assert trained["result"].passed and adapter.id == trained["result"].adapter.id
    assert adapter.kind == "mlp" and adapter.id.startswith("mlp16@") and adapter.hidden == 24
    meta = json.loads(open(os.path.join(trained["out"], MANIFEST_FILE)).read())
    assert meta["format"] == "catalog-search-adapter/1" and meta["kind"] == "mlp"
    assert meta["hidden"] == 24 and meta["training"]["params"]["hidden"] == 24
    assert [f["name"] for f in meta["files"]] == list(MLP_FILES)
    assert sorted(os.listdir(trained["out"])) == sorted([MANIFEST_FILE, *MLP_FILES])
    for f in meta["files"]:  # each file's sha256 and size are recorded
        data = open(os.path.join(trained["out"], f["name"]), "rb").read()
        assert f["sha256"] == hashlib.sha256(data).hexdigest() and f["bytes"] == len(data)
    arrays = _arrays(trained["out"])
    assert arrays["hidden_weights"].shape == (32, 24) and arrays["output_weights"].shape == (24, 16)
    assert np.abs(arrays["output_weights"]).max() > 0  # the hidden layer was trained
    # apply = the formula, from the files alone
    t, tp = confusing_vectors(PRODUCTS, 5, seed=2)
    np.testing.assert_allclose(adapter.apply(t), by_hand(arrays, t), atol=1e-5)
    np.testing.assert_allclose(adapter.apply(t[0]), by_hand(arrays, t[0])[0], atol=1e-5)
    # and it still separates the products the raw features confuse (fresh photos)
    tp = np.asarray(tp, object)
    adapted = recall_at(adapter.apply(t), tp, adapter.apply(trained["vectors"]),
                        trained["products"])
    assert adapted["recall@1"] >= 0.95, adapted
    # the id covers every array: changing the hidden layer alone changes it
    other = make_adapter(adapter.weights, adapter.base_model,
                         extra={**adapter.extra, "hidden_bias": adapter.extra["hidden_bias"] + 1})
    assert other.id != adapter.id
    # a copy saved elsewhere reads back identical
    again = save_adapter(adapter, str(trained["root"] / "copy"))
    assert again.id == adapter.id and again.kind == "mlp"


def test_cli_hidden_option(trained, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"adapter": {
        "dim": 16, "epochs": 40, "learning_rate": 0.01, "products_per_batch": 8,
        "samples_per_product": 4, "val_products": 0.2, "val_pairs": 0.2}}))
    out = str(tmp_path / "a")
    rc = cli_main(["--config", str(cfg), "train-adapter", "--embeddings", trained["catalog"],
                   "--pairs", trained["pairs"], "--out", out, "--hidden", "8", "--json"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["adapter_id"].startswith("mlp16@")
    assert load_adapter(out).hidden == 8
    assert cli_main(["train-adapter", "--embeddings", trained["catalog"], "--out", out,
                     "--hidden", "-1"]) == 2
    assert "--hidden must be >= 0" in capsys.readouterr().err


def test_damaged_mlp_adapters_are_refused_naming_the_file(trained, tmp_path):
    good = trained["out"]

    def broken(name: str, edit) -> str:
        d = str(tmp_path / name)
        shutil.copytree(good, d)
        edit(d)
        return d

    def flip(fname):
        def edit(d):
            path = os.path.join(d, fname)
            data = bytearray(open(path, "rb").read())
            data[-2] ^= 0x20
            open(path, "wb").write(bytes(data))
        return edit

    edit_meta = edit_manifest

    def pickled(d):  # an object array in the bias file, checksums updated to match
        buf = io.BytesIO()
        np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        open(os.path.join(d, "hidden_bias.npy"), "wb").write(buf.getvalue())
        edit_meta(lambda m: m["files"][2].update(
            sha256=hashlib.sha256(buf.getvalue()).hexdigest(), bytes=len(buf.getvalue())))(d)

    def swapped_shape(d):  # a bias of another width, checksums updated: shapes are checked
        buf = io.BytesIO()
        np.save(buf, np.zeros(7, "<f4"), allow_pickle=False)
        open(os.path.join(d, "hidden_bias.npy"), "wb").write(buf.getvalue())
        edit_meta(lambda m: m["files"][2].update(
            sha256=hashlib.sha256(buf.getvalue()).hexdigest(), bytes=len(buf.getvalue())))(d)

    cases = {
        "flip-hidden": (flip("hidden_weights.npy"), "hidden_weights.npy: damaged"),
        "flip-output": (flip("output_weights.npy"), "output_weights.npy: damaged"),
        "missing-bias": (lambda d: os.unlink(os.path.join(d, "hidden_bias.npy")),
                         "hidden_bias.npy: missing"),
        "dropped-file": (edit_meta(lambda m: m["files"].pop()), "an adapter holds exactly"),
        "as-linear": (edit_meta(lambda m: m.update(kind="linear")), "an adapter holds exactly"),
        "hidden": (edit_meta(lambda m: m.update(hidden=25)),
                   "hidden_weights.npy: holds float32 [32, 24]"),
        "no-hidden": (edit_meta(lambda m: m.pop("hidden")), "field 'hidden' is missing"),
        "pickle": (pickled, "hidden_bias.npy: not a numpy array file"),
        "shape": (swapped_shape, "hidden_bias.npy: holds float32 [7]"),
        "id": (edit_meta(lambda m: m.update(id="mlp16@000000000000")),
               "does not match its weights"),
    }
    for name, (edit, message) in cases.items():
        d = broken(name, edit)
        with pytest.raises(AdapterError) as e:
            load_adapter(d)
        assert message in str(e.value) and d in str(e.value), (name, str(e.value))


def test_index_and_serving_apply_the_mlp_projection(tmp_path):
    """build-index --adapter with an mlp adapter: stored vectors and photo / vector query
    results equal the projection computed here from the arrays."""
    world = serving_world()
    s = snap.load(world.snapshot)
    rng = np.random.default_rng(11)
    hidden, out_dim = 6, 8
    arrays = {"weights": np.linalg.qr(rng.standard_normal((s.dim, out_dim)))[0],
              "hidden_weights": rng.standard_normal((s.dim, hidden)),
              "hidden_bias": rng.standard_normal(hidden) * 0.1,
              "output_weights": rng.standard_normal((hidden, out_dim))}
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    adapter = save_adapter(make_adapter(arrays["weights"], base_model_record(s.summary.model,
                                                                             None),
                                        extra={k: v for k, v in arrays.items()
                                               if k != "weights"}),
                           str(tmp_path / "adapter"))
    assert adapter.kind == "mlp"
    cfg = world.config.to_dict()
    keep = {k: cfg[k] for k in ("model", "runner", "index", "serving")}
    keep["index"] = {**keep["index"], "adapter": None}
    (tmp_path / "config.yaml").write_text(json.dumps(keep))
    index_root = str(tmp_path / "index")
    assert cli_main(["--config", str(tmp_path / "config.yaml"), "build-index",
                     "--embeddings", world.snapshot, "--index-root", index_root,
                     "--adapter", adapter.path, "--version", "v-mlp", "--shards", "2"]) == 0
    gallery = by_hand(arrays, s.vectors())
    products = s.table.column("product_id").to_pylist()

    def expect(q: np.ndarray, k: int) -> list[str]:
        best: dict[str, float] = {}
        for p, sc in zip(products, gallery @ q):
            best[p] = max(best.get(p, -9.0), float(sc))
        return [p for p, _ in sorted(best.items(), key=lambda kv: -kv[1])[:k]]

    searcher = CatalogSearcher.open(index_root, config=world.config)
    idx = searcher.current
    assert idx.adapter.id == adapter.id and idx.adapter.kind == "mlp" and idx.dim == out_dim
    for row in world.catalog_rows()[::11]:
        data = fs.read_bytes(row["image_uri"])
        raw = idx.embedder.embed_bytes(data)
        got = searcher.search_image(data, k=5).hits
        assert [h.product_id for h in got] == expect(by_hand(arrays, raw)[0], 5)
    raw = s.vectors()[3] + rng.normal(0, 0.05, s.dim).astype(np.float32)
    raw = raw / np.linalg.norm(raw)
    q = by_hand(arrays, raw)[0]
    got = searcher.search_vector(raw.tolist(), k=6).hits
    assert [h.product_id for h in got] == expect(q, 6)
    np.testing.assert_allclose(got[0].score, float((gallery @ q).max()), atol=1e-4)


def test_a_linear_adapter_written_before_the_mlp_option_still_loads(tmp_path):
    """adapter.json of the original layout (kind linear, weights.npy only, no `hidden`),
    its id computed by the original formula: loads unchanged, and applies x W."""
    rng = np.random.default_rng(4)
    w = np.linalg.qr(rng.standard_normal((32, 8)))[0].astype("<f4")
    base = {"fingerprint": "ab" * 24, "model_id": "m@1", "dim": 32, "handle": "t",
            "embedding_fingerprint": None}
    h = hashlib.sha256(json.dumps({"kind": "linear", "shape": [32, 8],
                                   "base": base["fingerprint"]}, sort_keys=True).encode())
    h.update(w.tobytes())
    buf = io.BytesIO()
    np.save(buf, w, allow_pickle=False)
    d = tmp_path / "old"
    d.mkdir()
    (d / "weights.npy").write_bytes(buf.getvalue())
    (d / MANIFEST_FILE).write_text(json.dumps({
        "format": "catalog-search-adapter/1", "id": f"linear8@{h.hexdigest()[:12]}",
        "kind": "linear", "in_dim": 32, "out_dim": 8, "normalize": True,
        "files": [{"name": "weights.npy", "sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
                   "bytes": len(buf.getvalue()), "shape": [32, 8], "dtype": "float32"}],
        "base_model": base, "training": {}, "validation": {}}))
    adapter = load_adapter(str(d))
    assert adapter.kind == "linear" and adapter.hidden == 0 and adapter.extra == {}
    assert adapter.id == f"linear8@{h.hexdigest()[:12]}" and "hidden" not in adapter.record()
    x = rng.standard_normal((5, 32)).astype(np.float32)
    y = x @ w
    np.testing.assert_allclose(adapter.apply(x), y / np.linalg.norm(y, axis=1, keepdims=True),
                               atol=1e-5)
