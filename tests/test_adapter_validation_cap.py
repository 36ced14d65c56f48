"""The adapter's training cost at catalog scale (issue 17, docs/SCALE.md): the gate's
validation queries are a seeded sample of at most `adapter.val_max_queries` held-out
queries (exact search is O(queries x N), not O(N^2)), and the initialisation is computed
on at most `adapter.init_sample` rows.

Real snapshots of generated vectors (tests/adapter_fixtures.py), the real split and the
real `run_train_adapter` (TensorFlow on CPU).
"""
from __future__ import annotations

import numpy as np
import pytest

from adapter_fixtures import adapter_config, confused_snapshots
from pipelines.adapter import data as adata
from pipelines.adapter.commands import run_train_adapter
from pipelines.adapter.train import initial_weights
from pipelines.core.config import ConfigError, load_config

PRODUCTS = range(20)


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    return confused_snapshots(tmp_path_factory.mktemp("cap"), PRODUCTS)


def test_split_caps_validation_queries_with_a_seeded_sample(snapshots):
    data = adata.load_training_data(snapshots["catalog"], [snapshots["pairs"]])
    full = adata.split(data, 0.2, 0.2, seed=0)
    n_full = int(full.pairs_val.sum() + full.catalog_val_queries.sum())
    assert n_full > 10 and full.candidate_queries == n_full
    capped = adata.split(data, 0.2, 0.2, seed=0, max_queries=10)
    assert int(capped.pairs_val.sum() + capped.catalog_val_queries.sum()) == 10
    assert capped.candidate_queries == n_full and capped.max_queries == 10
    # a sample of the same held-out queries; training rows are unchanged (held-out rows
    # that are not sampled still never train)
    assert not (capped.pairs_val & ~full.pairs_val).any()
    assert not (capped.catalog_val_queries & ~full.catalog_val_queries).any()
    np.testing.assert_array_equal(capped.pairs_train, full.pairs_train)
    np.testing.assert_array_equal(capped.catalog_train, full.catalog_train)
    assert capped.val_products == full.val_products
    # seeded: the same sample again, another with another seed's split
    again = adata.split(data, 0.2, 0.2, seed=0, max_queries=10)
    np.testing.assert_array_equal(again.pairs_val, capped.pairs_val)
    np.testing.assert_array_equal(again.catalog_val_queries, capped.catalog_val_queries)
    # a cap above the count changes nothing
    loose = adata.split(data, 0.2, 0.2, seed=0, max_queries=10 * n_full)
    np.testing.assert_array_equal(loose.pairs_val, full.pairs_val)
    sizes = capped.sizes(data)["validation"]
    assert sizes["candidate_queries"] == n_full and sizes["max_queries"] == 10
    assert sizes["pair_queries"] + sizes["catalog_queries"] == 10


def test_train_adapter_records_the_capped_validation(snapshots):
    out = str(snapshots["root"] / "adapter")
    result = run_train_adapter(snapshots["catalog"], out, adapter_config(val_max_queries=12),
                               [snapshots["pairs"]])
    val = result.adapter.validation
    assert val["queries"] == 12 and val["max_queries"] == 12
    assert val["candidate_queries"] > 12
    assert result.adapter.training["validation"]["candidate_queries"] == val["candidate_queries"]


def test_initialisation_on_a_seeded_sample_spans_the_top_singular_vectors():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((500, 12)) * np.linspace(3, 0.1, 12)).astype(np.float32)
    w = initial_weights(x, 4)
    _, _, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    # the same subspace (and column, up to sign) as the SVD of all rows
    np.testing.assert_allclose(np.abs(w.T @ vt[:4].T), np.eye(4), atol=1e-4)
    sampled = initial_weights(x, 4, sample=100, seed=5)
    assert np.array_equal(sampled, initial_weights(x, 4, sample=100, seed=5))
    rows = np.sort(np.random.default_rng(5).choice(500, size=100, replace=False))
    np.testing.assert_allclose(sampled, initial_weights(x[rows], 4), atol=1e-5)
    # more outputs than the data spans: padded with orthonormal axes
    wide = initial_weights(x[:3], 6)
    np.testing.assert_allclose(wide.T @ wide, np.eye(6), atol=1e-5)


def test_config_refuses_bad_caps():
    for key, value in (("val_max_queries", 0), ("init_sample", 0), ("hidden", -1)):
        with pytest.raises(ConfigError, match=f"adapter.{key}"):
            load_config(overrides={"adapter": {key: value}})
