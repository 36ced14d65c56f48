"""adapter.refit (issue 17): after the gate passes on the seeded split, the written adapter
is the same training on every row (held-out products and pairs too); the manifest keeps the
split's validation figures and says what the written adapter trained on."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from adapter_fixtures import (adapter_config, confused_snapshots, confusing_vectors,
                              write_snapshot)
from pipelines.adapter import load_adapter
from pipelines.adapter.artifact import MANIFEST_FILE
from pipelines.adapter.commands import AdapterGateError, run_train_adapter
from pipelines.adapter.data import load_training_data, recall_at, split
from pipelines.adapter.train import TrainParams, train_adapter

PRODUCTS = range(20)


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    world = confused_snapshots(tmp_path_factory.mktemp("refit"), PRODUCTS)
    split_out, refit_out = str(world["root"] / "split"), str(world["root"] / "refit")
    split = run_train_adapter(world["catalog"], split_out, adapter_config(), [world["pairs"]])
    refit = run_train_adapter(world["catalog"], refit_out, adapter_config(refit=True),
                              [world["pairs"]])
    return {**world, "split": split, "refit": refit, "refit_out": refit_out}


def test_refit_trains_on_every_row_and_keeps_the_split_gate(both):
    split, refit = both["split"], both["refit"]
    assert refit.passed
    # the gate is the split's: the same validation figures with and without refit
    assert refit.figures["validation"] == split.figures["validation"]
    meta = json.loads(open(os.path.join(both["refit_out"], MANIFEST_FILE)).read())
    r = meta["training"]["refit"]
    assert (r["catalog_rows"], r["pairs"], r["rows"], r["products"]) == (80, 100, 180, 20)
    assert meta["training"]["train"]["products"] == 16  # the split's sizes stay recorded
    # the written adapter is the all-rows training, exactly (seeded), not the split's
    data = load_training_data(both["catalog"], [both["pairs"]])
    x = np.concatenate([data.catalog.vectors, data.pairs.vectors])
    _, labels = np.unique(np.concatenate([data.catalog.products, data.pairs.products]
                                         ).astype(str), return_inverse=True)
    by_hand, _ = train_adapter(x, labels, TrainParams.from_config(adapter_config().adapter))
    written = load_adapter(both["refit_out"])
    np.testing.assert_array_equal(written.weights, by_hand["weights"])
    assert not np.array_equal(written.weights, split.adapter.weights)


def test_refit_adapter_serves_the_held_out_products_at_least_as_well(both):
    cfg = adapter_config().adapter
    data = load_training_data(both["catalog"], [both["pairs"]])
    held = split(data, cfg.val_products, cfg.val_pairs, cfg.seed, cfg.val_max_queries
                 ).val_products
    assert len(held) == 4
    t, tp = confusing_vectors(PRODUCTS, 6, seed=7)  # fresh photos, never trained on
    tp = np.asarray(tp, object)
    mask = np.array([p in held for p in tp.tolist()], bool)
    t, tp = t[mask], tp[mask]
    raw = recall_at(t, tp, both["vectors"], both["products"])
    figures = []
    for adapter in (both["split"].adapter, load_adapter(both["refit_out"])):
        figures.append(recall_at(adapter.apply(t), tp, adapter.apply(both["vectors"]),
                                 both["products"])["recall@1"])
    assert raw["recall@1"] < 0.7 and figures[1] >= figures[0] and figures[1] >= 0.9, (
        raw, figures)


def test_a_refused_adapter_is_not_refit_and_nothing_is_written(tmp_path):
    v, p = confusing_vectors(PRODUCTS, 4, seed=0, product_weight=8.0, noise=0.01)
    easy = write_snapshot(str(tmp_path / "easy"), v, p)
    out = str(tmp_path / "adapter")
    with pytest.raises(AdapterGateError) as e:
        run_train_adapter(easy, out, adapter_config(epochs=2, refit=True))
    assert "refit" not in e.value.result.figures["training"]
    assert not os.path.exists(out) or not os.listdir(out)


def test_config_refuses_a_non_boolean_refit():
    from pipelines.core.config import ConfigError
    with pytest.raises(ConfigError, match="adapter.refit"):
        adapter_config(refit="yes")


def test_cli_refit_flag_writes_the_all_rows_adapter(both, tmp_path, capsys):
    from catalog_search.cli import main as cli_main
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"adapter": {"dim": 16, "epochs": 40, "learning_rate": 0.01,
                                           "products_per_batch": 8, "samples_per_product": 4,
                                           "val_products": 0.2, "val_pairs": 0.2}}))
    out = str(tmp_path / "cli")
    rc = cli_main(["--config", str(cfg), "train-adapter", "--embeddings", both["catalog"],
                   "--pairs", both["pairs"], "--out", out, "--refit"])
    text = capsys.readouterr().out
    assert rc == 0 and "refit        written adapter trained on all 180 rows" in text, text
    assert load_adapter(out).id == load_adapter(both["refit_out"]).id


def test_grocery_zoom_config_is_the_documented_zoom():
    from pipelines.core.config import load_config
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    f = load_config(os.path.join(root, "configs", "grocery-zoom.yaml")).features
    assert (tuple(f.scales), tuple(f.query_scales)) == ((1.3,), (1.6,))
