"""Synthetic benchmark vectors drawn from a distribution fitted to real embeddings.

    # fit mean + PCA spectrum to a snapshot (e.g. the grocery photos embedded with views)
    .venv/bin/python benchmarks/fitted_vectors.py fit --snapshot SNAPSHOT --out fit.npz
    # does recall-vs-leaves on synthetic vectors track the real ones at the real size?
    .venv/bin/python benchmarks/fitted_vectors.py check --snapshot SNAPSHOT --fit fit.npz \
        --out benchmarks/results/fitted_check.json

The model has two levels. The real vectors are grouped by spherical k-means into groups
of about --cluster-size (a product's photos and their augmentation views are near each
other); centres are drawn around the global mean with the PCA spectrum of the real
cluster centres, and points around their centre with the spectrum of the real
within-cluster residuals, then L2-normalised. This keeps the real embeddings' offset
from the origin (pooled CNN features share a large mean), how fast variance decays over
directions, and the near-duplicate structure -- what makes tree partitioning and
asymmetric hashing easy or hard. --cluster-size 0 is one Gaussian (mean + global
spectrum). Queries are drawn with another seed around the same centres. `check`
compares recall@10 vs leaves searched on the real set and a synthetic set of the same
size. `draw` is chunked: 1M x 1280-d costs the output array plus one chunk.
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


def real_vectors(snapshot_path: str) -> np.ndarray:
    """All vectors of an embeddings snapshot (benchmark helper; loads them in memory)."""
    from pipelines.embed import snapshot
    return snapshot.load(snapshot_path).vectors()


def _spectrum(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvectors [dim, r] as columns, eigenvalues [r]) of the covariance, descending."""
    cov = np.cov(np.asarray(x, np.float64), rowvar=False)
    w, v = np.linalg.eigh(cov)
    order = np.argsort(w)[::-1]
    w = np.clip(w[order], 0, None)
    keep = w > w[0] * 1e-9
    return v[:, order][:, keep].astype(np.float32), w[keep].astype(np.float32)


def kmeans(x: np.ndarray, clusters: int, iterations: int = 12, seed: int = 0) -> np.ndarray:
    """Cluster index of every row (spherical k-means on unit vectors, numpy)."""
    rng = np.random.default_rng(seed)
    centres = x[rng.choice(len(x), clusters, replace=False)].copy()
    for _ in range(iterations):
        assign = np.argmax(x @ centres.T, axis=1)
        for c in range(clusters):
            members = x[assign == c]
            if len(members):
                m = members.mean(axis=0)
                centres[c] = m / max(float(np.linalg.norm(m)), 1e-12)
    return np.argmax(x @ centres.T, axis=1)


@dataclass
class Fit:
    """A two-level Gaussian model of embeddings: cluster centres around the global mean
    (between-cluster PCA spectrum), points around their centre (within-cluster spectrum).
    cluster_size = 0 is the one-level model (mean + the global spectrum)."""
    mean: np.ndarray                 # [dim]
    between: tuple[np.ndarray, np.ndarray]   # (components [dim, r], variances [r])
    within: tuple[np.ndarray, np.ndarray]
    cluster_size: float              # mean real points per cluster (0: no clusters)
    source: str
    num_vectors: int

    def save(self, path: str) -> None:
        np.savez(path, mean=self.mean, between_c=self.between[0], between_v=self.between[1],
                 within_c=self.within[0], within_v=self.within[1],
                 cluster_size=self.cluster_size, source=self.source,
                 num_vectors=self.num_vectors)

    @classmethod
    def load(cls, path: str) -> "Fit":
        z = np.load(path)
        return cls(z["mean"], (z["between_c"], z["between_v"]), (z["within_c"], z["within_v"]),
                   float(z["cluster_size"]), str(z["source"]), int(z["num_vectors"]))

    def summary(self) -> dict:
        def share(v: np.ndarray) -> list[int]:
            c = np.cumsum(v) / max(float(v.sum()), 1e-30)
            return [int(np.searchsorted(c, q)) + 1 for q in (0.5, 0.9, 0.99)]
        return {"source": self.source, "num_vectors": self.num_vectors,
                "dim": int(len(self.mean)), "mean_norm": round(float(np.linalg.norm(self.mean)), 4),
                "cluster_size": round(self.cluster_size, 2),
                "between_variance": round(float(self.between[1].sum()), 5),
                "within_variance": round(float(self.within[1].sum()), 5),
                "components_for_50_90_99_percent": {"between": share(self.between[1]),
                                                    "within": share(self.within[1])}}


def fit(vectors: np.ndarray, source: str = "", cluster_size: float = 0) -> Fit:
    """Fit the model; cluster_size > 0 clusters the real vectors into n / cluster_size groups."""
    x = np.asarray(vectors, np.float32)
    mean = x.mean(axis=0)
    if cluster_size <= 0:
        spec = _spectrum(x - mean)
        empty = (np.zeros((x.shape[1], 0), np.float32), np.zeros(0, np.float32))
        return Fit(mean, empty, spec, 0.0, source, len(x))
    clusters = max(2, int(round(len(x) / cluster_size)))
    assign = kmeans(x, clusters)
    centres = np.stack([x[assign == c].mean(axis=0) for c in range(clusters)
                        if (assign == c).any()])
    residual = x - centres[np.searchsorted(np.unique(assign), assign)]
    return Fit(mean, _spectrum(centres - mean), _spectrum(residual),
               len(x) / len(centres), source, len(x))


def _gaussian(rng: np.random.Generator, m: int, spec: tuple[np.ndarray, np.ndarray]
              ) -> np.ndarray:
    comps, var = spec
    if not len(var):
        return np.zeros((m, comps.shape[0]), np.float32)
    z = rng.standard_normal((m, len(var)), dtype=np.float32) * np.sqrt(var)[None, :]
    return z @ comps.T


def draw(f: Fit, n: int, seed: int = 0, chunk: int = 65536) -> np.ndarray:
    """n unit vectors from the fitted model, float32 [n, dim] (queries: another seed)."""
    rng = np.random.default_rng(seed)
    dim = len(f.mean)
    out = np.empty((n, dim), np.float32)
    centres = None
    if f.cluster_size > 0:
        # the same centres for every seed: a query set shares the database's "products"
        crng = np.random.default_rng(12345)
        n_centres = max(2, int(round(max(n, 1) / f.cluster_size)))
        centres = f.mean[None, :] + _gaussian(crng, n_centres, f.between)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = _gaussian(rng, m, f.within)
        x += f.mean[None, :] if centres is None else centres[rng.integers(0, len(centres), m)]
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def recall_curve(vectors: np.ndarray, queries: np.ndarray, k: int = 10,
                 fractions=(0.01, 0.02, 0.05, 0.1, 0.2, 0.4)) -> list[dict]:
    """recall@k of one tree + AH + reorder ScaNN index vs leaves_to_search / num_leaves."""
    from scann.scann_ops.py import scann_ops_pybind
    from pipelines.index.sharded_search import search_exact

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
    f = fit(real_vectors(args.snapshot), source=args.snapshot, cluster_size=args.cluster_size)
    f.save(args.out)
    print(json.dumps({**f.summary(), "seconds": round(time.time() - t, 1)}))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    """Real vs synthetic recall curves at the real set's size (held-out queries)."""
    real = real_vectors(args.snapshot)
    f = Fit.load(args.fit) if args.fit else fit(real, args.snapshot, args.cluster_size)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(real))
    nq = min(args.queries, len(real) // 5)
    real_q, real_db = real[perm[:nq]], real[perm[nq:]]
    synth_db, synth_q = draw(f, len(real_db), seed=1), draw(f, nq, seed=2)
    result = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "fit": f.summary(), "database": len(real_db), "queries": nq,
              "real": recall_curve(real_db, real_q),
              "synthetic": recall_curve(synth_db, synth_q)}
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
    p.add_argument("--cluster-size", type=float, default=12.0,
                   help="real vectors per k-means cluster (0: one Gaussian, no clusters)")
    p = sub.add_parser("check", help="recall vs leaves: real vs synthetic at the real size")
    p.add_argument("--snapshot", required=True)
    p.add_argument("--fit", help=".npz from `fit` (default: fit the snapshot now)")
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--cluster-size", type=float, default=12.0)
    p.add_argument("--out")
    args = ap.parse_args()
    return _cmd_fit(args) if args.cmd == "fit" else _cmd_check(args)


if __name__ == "__main__":
    sys.exit(main())
