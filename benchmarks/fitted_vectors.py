"""Synthetic benchmark vectors drawn from a distribution fitted to real embeddings.

    # fit mean + PCA spectrum to a snapshot (e.g. the grocery photos embedded with views)
    .venv/bin/python benchmarks/fitted_vectors.py fit --snapshot SNAPSHOT --out fit.npz
    # does recall-vs-leaves on synthetic vectors track the real ones at the real size?
    .venv/bin/python benchmarks/fitted_vectors.py check --snapshot SNAPSHOT --fit fit.npz \
        --out benchmarks/results/fitted_check.json

The model: x = mean + sum_i sqrt(lambda_i) z_i v_i (z ~ N(0, 1)), L2-normalised, where
(lambda_i, v_i) are the eigenpairs of the real vectors' covariance. It keeps the real
embeddings' offset from the origin (all-positive pooled CNN features share a large mean)
and their spectrum (how fast variance decays over directions), which decide how hard
tree partitioning and asymmetric hashing are; it does not keep product clusters, so
near-duplicate structure (several photos of one product) is under-represented. `draw`
is chunked: 1M x 1280-d costs the output array plus one chunk.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Fit:
    """Mean and PCA spectrum of a set of embeddings."""
    mean: np.ndarray         # [dim]
    components: np.ndarray   # [dim, r] eigenvectors (columns), variance descending
    variances: np.ndarray    # [r] eigenvalues
    source: str
    num_vectors: int

    def save(self, path: str) -> None:
        np.savez(path, mean=self.mean, components=self.components, variances=self.variances,
                 source=self.source, num_vectors=self.num_vectors)

    @classmethod
    def load(cls, path: str) -> "Fit":
        z = np.load(path)
        return cls(z["mean"], z["components"], z["variances"], str(z["source"]),
                   int(z["num_vectors"]))

    def summary(self) -> dict:
        v = self.variances
        share = np.cumsum(v) / v.sum()
        return {"source": self.source, "num_vectors": self.num_vectors,
                "dim": int(len(self.mean)), "mean_norm": round(float(np.linalg.norm(self.mean)), 4),
                "total_variance": round(float(v.sum()), 5),
                "components_for_50_90_99_percent": [int(np.searchsorted(share, q)) + 1
                                                    for q in (0.5, 0.9, 0.99)]}


def real_vectors(snapshot_path: str) -> np.ndarray:
    """All vectors of an embeddings snapshot (benchmark helper; loads them in memory)."""
    from pipelines import snapshot
    return snapshot.load(snapshot_path).vectors()


def fit(vectors: np.ndarray, source: str = "") -> Fit:
    """Mean + eigen-decomposition of the covariance (float64)."""
    x = np.asarray(vectors, np.float64)
    mean = x.mean(axis=0)
    cov = np.cov(x - mean, rowvar=False)
    w, v = np.linalg.eigh(cov)
    order = np.argsort(w)[::-1]
    w = np.clip(w[order], 0, None)
    keep = w > w[0] * 1e-9
    return Fit(mean.astype(np.float32), v[:, order][:, keep].astype(np.float32),
               w[keep].astype(np.float32), source, len(x))


def draw(f: Fit, n: int, seed: int = 0, chunk: int = 65536) -> np.ndarray:
    """n unit vectors from the fitted Gaussian, float32 [n, dim]."""
    rng = np.random.default_rng(seed)
    dim, r = f.components.shape
    scale = np.sqrt(f.variances)[None, :]
    basis = f.components.T  # [r, dim]
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        z = rng.standard_normal((m, r), dtype=np.float32) * scale
        x = f.mean[None, :] + z @ basis
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def recall_curve(vectors: np.ndarray, queries: np.ndarray, k: int = 10,
                 fractions=(0.01, 0.02, 0.05, 0.1, 0.2, 0.4)) -> list[dict]:
    """recall@k of one tree + AH + reorder ScaNN index vs leaves_to_search / num_leaves."""
    from scann.scann_ops.py import scann_ops_pybind
    from pipelines.sharded_search import search_exact

    n = len(vectors)
    leaves = max(2, int(round(math.sqrt(n))))
    searcher = (scann_ops_pybind.builder(vectors, k, "dot_product")
                .tree(num_leaves=leaves, num_leaves_to_search=1, training_sample_size=n)
                .score_ah(2, anisotropic_quantization_threshold=0.2)
                .reorder(k * 10).build())
    _, exact = search_exact(vectors, queries, k)
    out = []
    for fr in fractions:
        nl = max(1, int(round(fr * leaves)))
        idx, _ = searcher.search_batched(queries, k, k * 10, nl)
        r = np.mean([len(set(a) & set(b)) / k for a, b in zip(np.asarray(idx), exact)])
        out.append({"leaves_fraction": fr, "leaves": nl, "num_leaves": leaves,
                    "recall@10": round(float(r), 4)})
    return out


def _cmd_fit(args: argparse.Namespace) -> int:
    t = time.time()
    f = fit(real_vectors(args.snapshot), source=args.snapshot)
    f.save(args.out)
    print(json.dumps({**f.summary(), "seconds": round(time.time() - t, 1)}))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    """Real vs synthetic recall curves at the real set's size (held-out queries)."""
    real = real_vectors(args.snapshot)
    f = Fit.load(args.fit) if args.fit else fit(real, args.snapshot)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(real))
    nq = min(args.queries, len(real) // 5)
    real_q, real_db = real[perm[:nq]], real[perm[nq:]]
    synth = draw(f, len(real_db) + nq, seed=1)
    result = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "fit": f.summary(), "database": len(real_db), "queries": nq,
              "real": recall_curve(real_db, real_q),
              "synthetic": recall_curve(synth[nq:], synth[:nq])}
    result["max_abs_recall_gap"] = round(max(abs(a["recall@10"] - b["recall@10"]) for a, b in
                                             zip(result["real"], result["synthetic"])), 4)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("fit", help="fit mean + PCA spectrum to a snapshot")
    p.add_argument("--snapshot", required=True)
    p.add_argument("--out", required=True, help=".npz to write")
    p = sub.add_parser("check", help="recall vs leaves: real vs synthetic at the real size")
    p.add_argument("--snapshot", required=True)
    p.add_argument("--fit", help=".npz from `fit` (default: fit the snapshot now)")
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--out")
    args = ap.parse_args()
    return _cmd_fit(args) if args.cmd == "fit" else _cmd_check(args)


if __name__ == "__main__":
    sys.exit(main())
