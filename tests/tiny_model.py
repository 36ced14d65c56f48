"""A tiny real SavedModel for fast tests: random conv features, global pooling.

Not a stub: it is a TensorFlow SavedModel loaded by the same code path as any local
model handle (pipelines.model.resolve.resolve_model + Embedder), just small and fast.
"""
from __future__ import annotations

import json
import os

import numpy as np

TINY_INPUT_SIZE = 64
TINY_DIM = 48


def make_tiny_model(out_dir: str, seed: int = 0, input_size: int = TINY_INPUT_SIZE) -> str:
    """Write the SavedModel to out_dir/tiny_model (float images [N,S,S,3] -> 48-d)."""
    import tensorflow as tf

    class Tiny(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            rng = np.random.default_rng(seed)
            self.k1 = tf.Variable(rng.normal(0, 0.3, (5, 5, 3, 16)).astype(np.float32))
            self.k2 = tf.Variable(rng.normal(0, 0.2, (3, 3, 16, 24)).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, input_size, input_size, 3],
                                                    tf.float32)])
        def __call__(self, x):
            y = tf.nn.relu(tf.nn.conv2d(x, self.k1, strides=2, padding="SAME"))
            y = tf.nn.relu(tf.nn.conv2d(y, self.k2, strides=2, padding="SAME"))
            return tf.concat([tf.reduce_mean(y, axis=[1, 2]), tf.reduce_max(y, axis=[1, 2])], 1)

    path = os.path.join(out_dir, "tiny_model")
    tf.saved_model.save(Tiny(), path)
    os.makedirs(os.path.join(path, "assets"), exist_ok=True)
    with open(os.path.join(path, "assets", "catalog_search_model.json"), "w") as f:
        json.dump({"input_size": input_size, "mean": 127.5, "std": 64.0, "dim": TINY_DIM}, f)
    return path
