"""Trained embedding adapters (issue 17): training, the gate, the artifact's integrity.

Real TensorFlow training on generated vectors whose raw features confuse products
(tests/adapter_fixtures.py), the real `catalog-search train-adapter` CLI, real files.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from adapter_fixtures import (FINGERPRINT, adapter_config, confused_snapshots, confusing_vectors,
                              edit_manifest, write_snapshot)
from catalog_search.cli import main as cli_main
from pipelines.adapter import AdapterError, apply_adapter, load_adapter
from pipelines.adapter.artifact import MANIFEST_FILE, WEIGHTS_FILE, make_adapter, save_adapter
from pipelines.adapter.commands import AdapterGateError, run_train_adapter
from pipelines.adapter.data import recall_at

PRODUCTS = range(20)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A catalog (4 images per product), labelled query photos as pairs, a trained adapter."""
    world = confused_snapshots(tmp_path_factory.mktemp("adapter"), PRODUCTS)
    out = str(world["root"] / "adapter")
    result = run_train_adapter(world["catalog"], out, adapter_config(), [world["pairs"]])
    return {**world, "out": out, "result": result}


def test_adapter_fixes_products_the_raw_features_confuse(trained):
    adapter = load_adapter(trained["out"])
    assert trained["result"].passed and adapter.id == trained["result"].adapter.id
    assert (adapter.in_dim, adapter.out_dim) == (32, 16)
    # fresh photos (never in training or validation), searched against the catalog
    t, tp = confusing_vectors(PRODUCTS, 5, seed=2)
    tp = np.asarray(tp, object)
    raw = recall_at(t, tp, trained["vectors"], trained["products"])
    adapted = recall_at(adapter.apply(t), tp, adapter.apply(trained["vectors"]),
                        trained["products"])
    assert raw["recall@1"] < 0.7, raw          # the raw features confuse the products
    assert adapted["recall@1"] >= 0.95, adapted
    out = adapter.apply(t)
    assert out.shape == (len(t), 16) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(apply_adapter(adapter, t[0]), out[0], atol=1e-6)
    assert apply_adapter(None, t) is not None and np.array_equal(apply_adapter(None, t), t)


def test_adapter_manifest_records_sizes_loss_figures_seed_and_base_model(trained):
    meta = json.loads(open(os.path.join(trained["out"], MANIFEST_FILE)).read())
    assert meta["format"] == "catalog-search-adapter/1" and meta["kind"] == "linear"
    assert meta["base_model"]["fingerprint"] == FINGERPRINT
    assert meta["base_model"]["dim"] == 32
    tr, val = meta["training"], meta["validation"]
    assert tr["loss"] == "supervised_contrastive" and tr["seed"] == 0
    assert tr["loss_last_epoch"] < tr["loss_first_epoch"]
    assert tr["train"]["products"] == 16 and tr["validation"]["products_held_out"] == 4
    # held-out products: all their images and pairs are out of training
    assert tr["train"]["catalog_rows"] == 16 * 4
    assert tr["validation"]["pair_queries"] >= 4 * 5
    assert val["passed"] and val["with_adapter"]["recall@1"] > val["identity"]["recall@1"]
    assert set(val["with_adapter"]["by_kind"]) == {"pairs", "held_out_products"}
    assert [f["name"] for f in meta["files"]] == [WEIGHTS_FILE]


def test_training_is_seeded(trained, tmp_path):
    again = run_train_adapter(trained["catalog"], str(tmp_path / "a2"), adapter_config(),
                              [trained["pairs"]])
    assert again.adapter.id == trained["result"].adapter.id
    np.testing.assert_array_equal(again.adapter.weights, trained["result"].adapter.weights)


def test_gate_refuses_an_adapter_that_does_not_beat_identity_and_keeps_the_old_one(
        trained, tmp_path, capsys):
    out = str(tmp_path / "adapter")
    first = save_adapter(load_adapter(trained["out"]), out)
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    # well-separated products: the identity is already perfect, nothing can beat it
    v, p = confusing_vectors(PRODUCTS, 4, seed=0, product_weight=8.0, noise=0.01)
    easy = write_snapshot(str(tmp_path / "easy"), v, p)
    with pytest.raises(AdapterGateError) as e:
        run_train_adapter(easy, out, adapter_config(epochs=2))
    assert "gate refused" in str(e.value) and first.id in str(e.value)
    assert e.value.result.figures["validation"]["identity"]["recall@1"] == 1.0
    after = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    assert after == before and load_adapter(out).id == first.id
    # the CLI: exit 3, one line saying why, the folder unchanged
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"adapter": {"dim": 16, "epochs": 2}}))
    rc = cli_main(["--config", str(cfg), "train-adapter", "--embeddings", easy, "--out", out,
                   "--json"])
    captured = capsys.readouterr()
    assert rc == 3 and "gate refused" in captured.err
    assert json.loads(captured.out)["kept_adapter_id"] == first.id
    assert load_adapter(out).id == first.id


def test_cli_writes_an_adapter_and_fails_fast_on_bad_arguments(trained, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"adapter": {"dim": 16, "epochs": 40, "learning_rate": 0.01,
                                           "products_per_batch": 8, "samples_per_product": 4,
                                           "val_products": 0.2, "val_pairs": 0.2}}))
    out = str(tmp_path / "cli-adapter")
    rc = cli_main(["--config", str(cfg), "train-adapter", "--embeddings", trained["catalog"],
                   "--pairs", trained["pairs"], "--out", out])
    text = capsys.readouterr().out
    assert rc == 0 and "gate         passed" in text and load_adapter(out).out_dim == 16
    assert cli_main(["train-adapter", "--embeddings", trained["catalog"], "--out", out,
                     "--dim", "0"]) == 2
    assert "--dim must be >= 1" in capsys.readouterr().err
    assert cli_main(["train-adapter", "--embeddings", str(tmp_path / "nope"),
                     "--out", out]) == 1
    assert "nothing written" in capsys.readouterr().err
    # pairs from another model are refused, naming the snapshot
    q, qp = confusing_vectors(PRODUCTS, 2, seed=3)
    other = write_snapshot(str(tmp_path / "other"), q, qp, prefix="o", fingerprint="f" * 48)
    assert cli_main(["--config", str(cfg), "train-adapter", "--embeddings", trained["catalog"],
                     "--pairs", other, "--out", out]) == 1
    err = capsys.readouterr().err
    assert "--pairs" in err and "other" in err and "not the same vector space" in err


# --------------------------------------------------------------------------- integrity

def _copy(src: str, dest: str) -> str:
    os.makedirs(dest)
    for n in os.listdir(src):
        with open(os.path.join(src, n), "rb") as f, open(os.path.join(dest, n), "wb") as g:
            g.write(f.read())
    return dest


def test_damaged_adapters_are_refused_naming_the_file(trained, tmp_path):
    good = trained["out"]

    def broken(name: str, edit) -> str:
        d = _copy(good, str(tmp_path / name))
        edit(d)
        return d

    def flip_byte(d):
        path = os.path.join(d, WEIGHTS_FILE)
        data = bytearray(open(path, "rb").read())
        data[-3] ^= 0x40
        open(path, "wb").write(bytes(data))

    edit_meta = edit_manifest

    def pickled(d):  # an object array: readable only with pickle, which is never allowed
        import hashlib
        import io
        buf = io.BytesIO()
        np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        open(os.path.join(d, WEIGHTS_FILE), "wb").write(buf.getvalue())
        edit_meta(lambda m: m["files"][0].update(
            sha256=hashlib.sha256(buf.getvalue()).hexdigest(), bytes=len(buf.getvalue())))(d)

    cases = {
        "flipped": (flip_byte, "weights.npy: damaged"),
        "missing": (lambda d: os.unlink(os.path.join(d, WEIGHTS_FILE)), "weights.npy: missing"),
        "format": (edit_meta(lambda m: m.update(format="catalog-search-adapter/9")),
                   "not an adapter of format"),
        "id": (edit_meta(lambda m: m.update(id="linear16@000000000000")),
               "does not match its weights"),
        "dims": (edit_meta(lambda m: m.update(in_dim=64)), "weights.npy: holds float32 [32, 16]"),
        "files": (edit_meta(lambda m: m["files"].append({"name": "code.py"})),
                  "an adapter holds exactly"),
        "kind": (edit_meta(lambda m: m.update(kind="python")), "unknown adapter kind"),
        "json": (lambda d: open(os.path.join(d, MANIFEST_FILE), "w").write("{"),
                 "adapter.json: not valid JSON"),
        "pickle": (pickled, "weights.npy: not a numpy array file"),
    }
    for name, (edit, message) in cases.items():
        d = broken(name, edit)
        with pytest.raises(AdapterError) as e:
            load_adapter(d)
        assert message in str(e.value) and d in str(e.value), (name, str(e.value))
    with pytest.raises(AdapterError, match="not an adapter folder"):
        load_adapter(str(tmp_path))


def test_mismatched_adapters_are_refused(trained):
    adapter = load_adapter(trained["out"])
    adapter.check_base({"fingerprint": FINGERPRINT, "model_id": "m"}, 32, "the snapshot")
    with pytest.raises(AdapterError, match=r"adapter.json: takes 32-d vectors, but the "
                                           r"snapshot has 64-d"):
        adapter.check_base({"fingerprint": FINGERPRINT}, 64, "the snapshot")
    with pytest.raises(AdapterError, match="trained on model .* but the snapshot was "
                                           "embedded with other"):
        adapter.check_base({"fingerprint": "f" * 48, "model_id": "other"}, 32, "the snapshot")
    with pytest.raises(AdapterError, match="takes 32-d model vectors"):
        adapter.apply(np.ones((2, 31), np.float32))
    # a record from an index manifest that names another adapter
    with pytest.raises(AdapterError, match="does not match the one the index manifest"):
        load_adapter(trained["out"], expected={**adapter.record(), "id": "linear16@ffffffffffff"})
    other = make_adapter(np.eye(32, 16, dtype=np.float32), adapter.base_model)
    assert other.id != adapter.id
