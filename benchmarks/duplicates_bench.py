"""The duplicates job on the grocery catalog with planted copies (issue 21).

    python benchmarks/duplicates_bench.py plant --catalog out/grocery/catalog.csv \
        --out out/dupbench [--copies 300] [--seed 0]
    python benchmarks/duplicates_bench.py sweep --index-root out/dupbench/index \
        --truth out/dupbench/truth.csv --out benchmarks/results/duplicates_grocery.json
    python benchmarks/duplicates_bench.py score --truth out/dupbench/truth.csv \
        --duplicates out/dupbench/report/duplicates.parquet

plant: copies of random catalog images under new product ids (RELIST-xxxx), a third each
re-encoded (JPEG quality 35-70), resized (40-80 %) and cropped (80-95 % of each side at a
random offset), appended to the catalog (catalog.csv) with the truth (truth.csv: copy
image_id, source image_id, how).

sweep: the index version's stored vectors (read through the index reader), exact
similarities: (1) threshold guidance: similarity of re-shot photos of one product (two
store photos of the same fine class), of distinct look-alike products (photos of two fine
classes of the same coarse class) and of the planted copies to their source;
(2) every pair of images of different products at or above the lowest candidate
threshold, its pixel similarity (pipelines.duplicates.pairs), and pair-level precision and
recall of the planted copies for a grid of (threshold, pixel threshold) decisions.

score: precision / recall of a duplicates job's own output against the truth (pairs
within the reported groups, and groups that hold nothing but one planted family).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def plant(args: argparse.Namespace) -> None:
    from PIL import Image
    with open(args.catalog, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rng = random.Random(args.seed)
    sources = rng.sample(rows, args.copies)
    os.makedirs(os.path.join(args.out, "planted"), exist_ok=True)
    truth, added = [], []
    for i, src in enumerate(sources):
        how = ("reencoded", "resized", "cropped")[i % 3]
        img = Image.open(src["image_uri"]).convert("RGB")
        w, h = img.size
        quality = 85
        if how == "reencoded":
            quality = rng.randint(35, 70)
        elif how == "resized":
            s = rng.uniform(0.4, 0.8)
            img = img.resize((max(8, int(w * s)), max(8, int(h * s))), Image.Resampling.LANCZOS)
        else:
            fw, fh = rng.uniform(0.80, 0.95), rng.uniform(0.80, 0.95)
            cw, ch = int(w * fw), int(h * fh)
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            img = img.crop((left, top, left + cw, top + ch))
        pid = f"RELIST-{i:04d}"
        path = os.path.abspath(os.path.join(args.out, "planted", f"{pid}.jpg"))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        with open(path, "wb") as f:
            f.write(buf.getvalue())
        added.append({**src, "product_id": pid, "image_id": f"{pid}-0", "image_uri": path,
                      "title": f"relisted {src.get('title', '')}".strip()})
        truth.append({"image_id": f"{pid}-0", "source_image_id": src["image_id"],
                      "source_product_id": src["product_id"], "how": how})
    with open(os.path.join(args.out, "catalog.csv"), "w", newline="", encoding="utf-8") as f:
        out = csv.DictWriter(f, fieldnames=list(rows[0]))
        out.writeheader()
        out.writerows(rows + added)
    with open(os.path.join(args.out, "truth.csv"), "w", newline="", encoding="utf-8") as f:
        tw = csv.DictWriter(f, fieldnames=["image_id", "source_image_id", "source_product_id",
                                            "how"])
        tw.writeheader()
        tw.writerows(truth)
    print(json.dumps({"catalog_rows": len(rows), "planted": len(added)}))


def _load_index(index_root: str):
    """(vectors [N, D] from the loader, image ids, product ids, uris, categories)."""
    from pipelines.index.reader import open_index
    from pipelines.index.sharded_search import parse_metadata
    version = open_index(index_root, verify=True)
    vecs, ids, pids, uris, cats = [], [], [], [], []
    for shard in version.load_shards():
        vecs.append(np.asarray(shard.vectors(), np.float32))
        ids += shard.rows.column("image_id").to_pylist()
        pids += shard.rows.column("product_id").to_pylist()
        uris += shard.rows.column("image_uri").to_pylist()
        cats += [parse_metadata(m).get("category") for m in shard.rows.column("metadata")
                 .to_pylist()]
    return version.version, np.concatenate(vecs), ids, pids, uris, cats


def _percentiles(x: np.ndarray) -> dict[str, float]:
    if not len(x):
        return {}
    q = np.percentile(x, [1, 5, 50, 95, 99])
    return {"n": int(len(x)), "p1": round(float(q[0]), 4), "p5": round(float(q[1]), 4),
            "p50": round(float(q[2]), 4), "p95": round(float(q[3]), 4),
            "p99": round(float(q[4]), 4), "max": round(float(x.max()), 4),
            "min": round(float(x.min()), 4)}


def sweep(args: argparse.Namespace) -> None:
    from pipelines.core import filesystem as fs
    from pipelines.duplicates.pixels import pixel_signature, pixel_similarity
    started = time.time()
    version, vecs, ids, pids, uris, cats = _load_index(args.index_root)
    truth = {r["image_id"]: r for r in csv.DictReader(open(args.truth, newline=""))}
    pos = {iid: i for i, iid in enumerate(ids)}
    planted = np.asarray([iid in truth for iid in ids])
    sims = vecs @ vecs.T
    n = len(ids)
    iu = np.triu_indices(n, 1)
    pa, pb = np.asarray(pids, dtype=object), np.asarray(cats, dtype=object)
    same_product = pa[iu[0]] == pa[iu[1]]
    same_cat = pb[iu[0]] == pb[iu[1]]
    either_planted = planted[iu[0]] | planted[iu[1]]
    s = sims[iu]
    store = np.asarray([("iconic" not in iid) for iid in ids])
    both_store = store[iu[0]] & store[iu[1]]
    guidance = {
        "reshot_same_product": _percentiles(s[same_product & ~either_planted & both_store]),
        "lookalike_other_product_same_category": _percentiles(
            s[~same_product & same_cat & ~either_planted]),
        "other_category": _percentiles(s[~same_product & ~same_cat & ~either_planted]),
    }
    by_how: dict[str, list[float]] = {}
    for iid, t in truth.items():
        by_how.setdefault(t["how"], []).append(float(sims[pos[iid], pos[t["source_image_id"]]]))
    for how, v in sorted(by_how.items()):
        guidance[f"planted_{how}"] = _percentiles(np.asarray(v))
    # candidate pairs of different products at or above the lowest candidate threshold
    low = min(args.candidates)
    mask = ~same_product & (s >= low)
    cand = [(int(a), int(b), float(x)) for a, b, x in zip(iu[0][mask], iu[1][mask], s[mask])]
    true_pairs = {frozenset((pos[i], pos[t["source_image_id"]])) for i, t in truth.items()}
    sig_cache: dict[int, np.ndarray] = {}

    def sig(i: int) -> np.ndarray:
        if i not in sig_cache:
            sig_cache[i] = pixel_signature(fs.read_bytes(uris[i]), 40_000_000)
        return sig_cache[i]

    t0 = time.time()
    pixel = [pixel_similarity(sig(a), sig(b)) for a, b, _ in cand]
    pixel_s = time.time() - t0
    is_true = [frozenset((a, b)) in true_pairs for a, b, _ in cand]
    grid = []
    for cthr in args.candidates:
        for thr in args.thresholds:
            for pthr in [None, *args.pixel_thresholds]:
                if thr < cthr:
                    continue
                acc = [(x >= thr) or (pthr is not None and x >= cthr and p >= pthr)
                       for (_, _, x), p in zip(cand, pixel)]
                tp = sum(1 for a, t in zip(acc, is_true) if a and t)
                fp = sum(1 for a, t in zip(acc, is_true) if a and not t)
                grid.append({"candidate_threshold": cthr, "threshold": thr,
                             "pixel_threshold": pthr, "true_pairs": tp, "false_pairs": fp,
                             "precision": round(tp / max(1, tp + fp), 4),
                             "recall": round(tp / len(true_pairs), 4)})
    fps = sorted(((x, p, ids[a], ids[b]) for (a, b, x), p, t in zip(cand, pixel, is_true)
                  if not t), key=lambda r: -max(r[0], r[1]))[:15]
    missed = sorted(((x, p, ids[a], ids[b], truth.get(ids[a], truth.get(ids[b], {})).get("how"))
                     for (a, b, x), p, t in zip(cand, pixel, is_true) if t),
                    key=lambda r: r[1])[:10]
    out = {"version": version, "num_vectors": n, "planted": len(truth),
           "candidate_pairs": len(cand), "pixel_seconds": round(pixel_s, 2),
           "guidance": guidance, "grid": grid,
           "hardest_false_pairs": [{"similarity": round(x, 4), "pixel": round(p, 4),
                                    "a": a, "b": b} for x, p, a, b in fps],
           "lowest_pixel_true_pairs": [{"similarity": round(x, 4), "pixel": round(p, 4),
                                        "a": a, "b": b, "how": h} for x, p, a, b, h in missed],
           "seconds": round(time.time() - started, 1)}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({"guidance": guidance, "candidate_pairs": len(cand)}, indent=1))
    for g in grid:
        if g["recall"] >= 0.9:
            print(g)


def score_groups(truth: dict[str, dict[str, str]], table: list[dict]) -> dict[str, float]:
    """Precision / recall of reported groups against the planted truth, at two levels.

    image level: a group is correct when it holds one planted copy's family only (the
    copy and its source image); a copy is found when its group holds its source image.
    product level: a relisting (planted copy) stands for its source product; a group is
    correct when every member's product is one product (the relisting(s) and images of
    the product they copy); a copy is found when its group holds any image of its
    source product. Groups the catalog's own images form (two original products) are
    wrong at both levels.
    """
    groups: dict[int, list[dict]] = {}
    for r in table:
        groups.setdefault(r["group_id"], []).append(r)
    family = {}  # image -> the source it is (or is a copy of)
    for iid, t in truth.items():
        family[iid] = t["source_image_id"]
        family[t["source_image_id"]] = t["source_image_id"]
    relist = {iid: t["source_product_id"] for iid, t in truth.items()}

    def product(r: dict) -> str:
        return relist.get(r["image_id"], r["product_id"])

    img_ok = prod_ok = with_copy = 0
    found_img = found_prod = 0
    for g in groups.values():
        ids = [r["image_id"] for r in g]
        img_ok += all(m in family for m in ids) and len({family[m] for m in ids}) == 1
        prod_ok += len({product(r) for r in g}) == 1
        with_copy += any(m in truth for m in ids)
        for r in g:
            if r["image_id"] not in truth:
                continue
            t = truth[r["image_id"]]
            found_img += t["source_image_id"] in ids
            found_prod += any(o["image_id"] not in truth
                              and o["product_id"] == t["source_product_id"] for o in g)
    n = max(1, len(groups))
    return {"groups": len(groups), "images_in_groups": len(table),
            "groups_with_a_planted_copy": with_copy,
            "groups_without_a_planted_copy": len(groups) - with_copy,
            "image_precision": round(img_ok / n, 4),
            "image_recall": round(found_img / max(1, len(truth)), 4),
            "product_precision": round(prod_ok / n, 4),
            "product_recall": round(found_prod / max(1, len(truth)), 4),
            "planted": len(truth)}


def score(args: argparse.Namespace) -> None:
    import pyarrow.parquet as pq
    truth = {r["image_id"]: r for r in csv.DictReader(open(args.truth, newline=""))}
    table = pq.read_table(args.duplicates).to_pylist()
    out = score_groups(truth, table)
    summary = os.path.join(os.path.dirname(args.duplicates), "summary.json")
    if os.path.exists(summary):
        with open(summary, encoding="utf-8") as f:
            s = json.load(f)
        out.update({k: s.get(k) for k in ("threshold", "candidate_threshold",
                                           "pixel_threshold", "near_pairs", "exact_pairs",
                                           "candidate_pairs", "rejected_pairs", "seconds")})
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("plant")
    a.add_argument("--catalog", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--copies", type=int, default=300)
    a.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("sweep")
    b.add_argument("--index-root", required=True)
    b.add_argument("--truth", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--candidates", type=float, nargs="+", default=[0.8, 0.85])
    b.add_argument("--thresholds", type=float, nargs="+",
                   default=[0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99])
    b.add_argument("--pixel-thresholds", type=float, nargs="+",
                   default=[0.85, 0.9, 0.93, 0.95, 0.97])
    c = sub.add_parser("score")
    c.add_argument("--truth", required=True)
    c.add_argument("--duplicates", required=True)
    args = p.parse_args()
    {"plant": plant, "sweep": sweep, "score": score}[args.cmd](args)


if __name__ == "__main__":
    main()
