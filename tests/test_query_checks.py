"""serving.query.check_vector: the one-dot-product fast path gives the same unit vector as
the full checks, and every bad vector is still refused with its reason."""
from __future__ import annotations

import numpy as np
import pytest

from serving.errors import QueryError
from serving.query import check_vector, normalise


@pytest.mark.parametrize("scale", [1e-12, 1e-3, 1.0, 7.5, 1e15])
def test_a_good_vector_is_normalised_as_before(scale):
    v = (np.random.default_rng(0).standard_normal(64) * scale).astype(np.float32)
    got = check_vector(v.tolist(), 64)
    assert got.dtype == np.float32 and got.shape == (64,)
    np.testing.assert_array_equal(got, normalise(v))
    assert abs(float(np.linalg.norm(got)) - 1.0) < 1e-5


@pytest.mark.parametrize("vector,reason", [
    ([0.0] * 8, "all zeros"), ([1.0] * 7 + [float("nan")], "NaN or infinite"),
    ([1.0] * 7 + [float("inf")], "NaN or infinite"), ([1e39] + [0.0] * 7, "NaN or infinite"),
    ([1.0] * 7, "must have 8 numbers")])
def test_bad_vectors_are_refused_with_their_reason(vector, reason):
    with pytest.raises(QueryError, match=reason) as e:
        check_vector(vector, 8)
    assert e.value.reason == "bad_vector"
