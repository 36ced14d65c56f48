"""Adapter variants on the grocery test photos (docs/EVALUATION.md "Adapters", issue 17).

    .venv/bin/python benchmarks/adapter_grocery_grid.py \
        --catalog out/grocery/embeddings/grocery-v1 --pairs out/grocery/pairs/train-v1 \
        --extra-pairs out/grocery/valpairs/val-v1 \
        --queries out/grocery/testq/test-v1 --work out/adapter-grid \
        --rows none,linear256,t0.05,mlp1024,linear256+val \
        --out benchmarks/results/adapter_grocery_grid.json

Each row trains with the real command's code (`run_train_adapter`: the seeded held-out
split, the gate, the artifact written and read back) under the row's `adapter.*`
overrides, then scores the **test photos** (--queries: an embeddings snapshot of them,
labelled; never in training or validation) against the adapted catalog by exact search,
product recall@k (each product scored by its best image). That is the published index's
answer for these catalogs (shards under index.brute_force_below are exact; `evaluate`
through the index is run for the rows docs/EVALUATION.md reports). `--extra-pairs`
snapshots are used only by rows whose name ends in `+val`.

Rows already in --out are skipped (rerun after an interruption); --out is read once at
the start and rewritten after each row, so run one instance per --out at a time.
`none` is the raw catalog (no adapter). A row the gate refuses is trained again by the
same code outside the gate (same data, split, seed) to record its test figure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

#: name -> adapter.* overrides (on top of configs/default.yaml)
ROWS: dict[str, dict[str, Any]] = {
    "none": {},
    "linear256": {},
    "linear256-e200": {"epochs": 200},
    "linear256-lr1e-3": {"learning_rate": 1e-3},
    "t0.05": {"temperature": 0.05},
    "t0.2": {"temperature": 0.2},
    "t0.05-lr1e-3": {"temperature": 0.05, "learning_rate": 1e-3},
    "dim512": {"dim": 512},
    "dim128": {"dim": 128},
    "m16": {"samples_per_product": 16, "products_per_batch": 16},
    "p64": {"products_per_batch": 64},
    "mlp512": {"hidden": 512},
    "mlp1024": {"hidden": 1024},
    "mlp1024-lr1e-3": {"hidden": 1024, "learning_rate": 1e-3},
    "valp0.05": {"val_products": 0.05},
    "linear256+val": {},
    "refit": {"refit": True},
    "refit+val": {"refit": True},
    "mlp1024+val": {"hidden": 1024},
}


def parse_row(name: str) -> dict[str, Any]:
    """A named row, or ad hoc `key=value;key=value` adapter overrides (name kept)."""
    base = name[:-4] if name.endswith("+val") else name
    if base in ROWS:
        return dict(ROWS[base])
    out: dict[str, Any] = {}
    for part in base.split(";"):
        key, _, value = part.partition("=")
        if not value:
            raise SystemExit(f"unknown row {name!r}: one of {sorted(ROWS)} or key=value;...")
        if value in ("true", "false"):
            out[key] = value == "true"
        else:
            out[key] = float(value) if "." in value or "e-" in value else int(value)
    return out


def load(path: str) -> tuple[np.ndarray, np.ndarray]:
    from pipelines.adapter.data import _read
    v, _ = _read(path, "--queries")
    return v.vectors, v.products


def refused_adapter(catalog: str, pairs: list[str], cfg: Any) -> Any:
    """The adapter run_train_adapter trained and the gate refused (same data, split, seed)."""
    from pipelines.adapter import data as adata
    from pipelines.adapter.artifact import make_adapter
    from pipelines.adapter.train import TrainParams, train_adapter
    c = cfg.adapter
    data = adata.load_training_data(catalog, pairs)
    sp = adata.split(data, c.val_products, c.val_pairs, c.seed, c.val_max_queries)
    x = np.concatenate([data.catalog.vectors[sp.catalog_train],
                        data.pairs.vectors[sp.pairs_train]])
    labels, _ = adata.product_labels(np.concatenate([data.catalog.products[sp.catalog_train],
                                                     data.pairs.products[sp.pairs_train]]))
    arrays, _ = train_adapter(x, labels, TrainParams.from_config(c))
    w = arrays.pop("weights")
    return make_adapter(w, data.base_model, extra=arrays or None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--catalog", required=True, help="catalog embeddings snapshot")
    ap.add_argument("--pairs", action="append", default=[], help="labelled photos (train split)")
    ap.add_argument("--extra-pairs", action="append", default=[],
                    help="more labelled photos (e.g. the val split) for rows ending in +val")
    ap.add_argument("--queries", required=True, help="embeddings snapshot of the test photos")
    ap.add_argument("--rows", required=True, help="comma-separated row names")
    ap.add_argument("--config", help="a config file under the overrides (features etc.)")
    ap.add_argument("--label", default="", help="a tag stored with each row (e.g. 'zoom')")
    ap.add_argument("--work", required=True, help="folder for the adapters")
    ap.add_argument("--out", required=True, help="JSON results (appended to, by row key)")
    args = ap.parse_args()

    import logging
    logging.basicConfig(level=logging.WARNING)
    from pipelines.adapter.commands import AdapterGateError, run_train_adapter
    from pipelines.adapter.data import recall_at
    from pipelines.core.config import load_config

    results: dict[str, Any] = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    results.setdefault("benchmark", "adapter_grocery_grid")
    results.setdefault("note", "shared 2-core machine; exact search = the published index "
                               "for these small catalogs; recall over the test photos")
    rows = results.setdefault("rows", {})
    catalog, cp = load(args.catalog)
    q, qp = load(args.queries)
    for name in [r for r in args.rows.split(",") if r]:
        key = f"{args.label}:{name}" if args.label else name
        if key in rows:
            print(f"{key}: already in {args.out}, skipped")
            continue
        started = time.time()
        row: dict[str, Any] = {"row": name, "label": args.label, "catalog": args.catalog,
                               "queries": args.queries, "queries_n": int(len(q))}
        if name == "none":
            row["test"] = recall_at(q, qp, catalog, cp)
        else:
            overrides = parse_row(name)
            pairs = list(args.pairs) + (list(args.extra_pairs) if name.endswith("+val") else [])
            cfg = load_config(args.config, overrides={"adapter": overrides})
            out_dir = os.path.join(args.work, key.replace(":", "_").replace(";", "_"))
            row.update(overrides=overrides, pairs=pairs)
            try:
                res = run_train_adapter(args.catalog, out_dir, cfg, pairs)
                adapter = res.adapter
                fig = res.figures
            except AdapterGateError as e:
                # refused (nothing written): the same training again, by its parts, so
                # the row still says what the refused adapter would have scored on test
                row["gate"] = "refused"
                fig = e.result.figures
                adapter = refused_adapter(args.catalog, pairs, cfg)
            assert adapter is not None
            row["adapter_id"] = adapter.id
            row["test"] = recall_at(adapter.apply(q), qp, adapter.apply(catalog), cp)
            v = fig["validation"]
            row["validation"] = {"with": v["with_adapter"]["recall@1"],
                                 "identity": v["identity"]["recall@1"],
                                 "queries": v["queries"]}
            t = fig["training"]
            row["training"] = {"rows": t["train"], "steps": t["steps"],
                               "fit_s": t["seconds"], "loss_last": t["loss_last_epoch"]}
        row["seconds"] = round(time.time() - started, 1)
        rows[key] = row
        print(json.dumps({"row": key, "test": row.get("test"),
                          "validation": row.get("validation"), "s": row["seconds"]}),
              flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
