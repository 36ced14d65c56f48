"""`catalog-search train-adapter`: learn a linear adapter on a catalog snapshot (+ labelled
photos), gated on a seeded held-out split; written only when it beats the identity.

    catalog-search train-adapter --embeddings SNAPSHOT --out ADAPTER_DIR
        [--pairs SNAPSHOT ...] [--feedback ROOT] [--dim N] [--epochs N] [--seed N] [--json]

Exit 0: written (the folder's previous adapter, if any, replaced); 1: bad input (nothing
written); 2: bad arguments; 3: the gate refused it (validation recall@1 does not beat the
identity): ADAPTER_DIR keeps what it held.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from pipelines.adapter import data as adata
from pipelines.adapter.artifact import (Adapter, AdapterError, is_adapter, load_adapter,
                                        make_adapter, save_adapter)
from pipelines.core.command import Command, UsageError, check_uri_arg
from pipelines.core.config import Config
from pipelines.core.errors import RefusedError

log = logging.getLogger(__name__)


class AdapterGateError(RefusedError):
    """The trained adapter did not beat the identity on validation: nothing was written."""

    def __init__(self, result: "TrainResult"):
        self.result = result
        super().__init__(result.reason)


@dataclass
class TrainResult:
    passed: bool
    reason: str
    adapter: Adapter | None              # the written adapter (None when refused)
    kept: str | None                     # the id of the adapter ADAPTER_DIR kept (refused)
    figures: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reason": self.reason,
                "adapter_id": self.adapter.id if self.adapter else None,
                "kept_adapter_id": self.kept, **self.figures}


def feedback_pairs(embeddings: str, feedback: str) -> adata.LabelledVectors:
    """The feedback log under `feedback` as pairs, keeping only the records whose model_id
    is the catalog snapshot's: a log that outlived a model change holds vectors of another
    space, even when the dimension is the same (skipped, counted in the log)."""
    from pipelines.adapter.feedback import read_feedback_pairs, read_records
    from pipelines.embed import snapshot
    records = read_records(feedback)
    try:
        model_id = snapshot.read_summary(adata._resolve(embeddings, "--embeddings")).model_id
    except (AdapterError, snapshot.SnapshotError):
        return read_feedback_pairs(feedback, records=records)  # load_training_data says why
    same = [r for r in records if r.get("model_id") == model_id]
    if len(same) < len(records):
        log.warning("feedback %s: %d of %d records are of another model than the "
                    "snapshot's %s: skipped", feedback, len(records) - len(same), len(records),
                    model_id)
    return read_feedback_pairs(feedback, records=same)


def training_rows(data: adata.TrainingData, catalog_rows: np.ndarray, pair_rows: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(x, int labels) of the chosen catalog rows and pairs (boolean masks)."""
    x = np.concatenate([data.catalog.vectors[catalog_rows], data.pairs.vectors[pair_rows]])
    labels, _ = adata.product_labels(np.concatenate([data.catalog.products[catalog_rows],
                                                     data.pairs.products[pair_rows]]))
    return x, labels


def _refit(data: adata.TrainingData, params: Any
           ) -> tuple[np.ndarray, dict[str, np.ndarray] | None, dict[str, Any]]:
    """adapter.refit: the same training on every catalog row and pair (the held-out ones
    too), after the gate passed on the split: (weights, mlp arrays, what it trained on)."""
    from pipelines.adapter.train import train_adapter
    x, labels = training_rows(data, np.ones(len(data.catalog), bool),
                              np.ones(len(data.pairs), bool))
    arrays, info = train_adapter(x, labels, params)
    log.info("train-adapter: refit on all %d rows (%d products), %d steps, %.1f s",
             len(x), len(set(labels.tolist())), info["steps"], info["seconds"])
    record = {"rows": int(len(x)), "catalog_rows": len(data.catalog),
              "pairs": len(data.pairs), "products": len(set(labels.tolist())),
              "steps": info["steps"], "seconds": info["seconds"],
              "loss_last_epoch": info["loss_last_epoch"],
              "note": "the written adapter: trained on all rows with the gated parameters; "
                      "the validation figures are the split-trained adapter's"}
    weights = arrays.pop("weights")
    return weights, arrays or None, record


def run_train_adapter(embeddings: str, out_dir: str, config: Config,
                      pairs: Sequence[str] = (), feedback: str | None = None) -> TrainResult:
    """Train, validate, gate, write. Raises AdapterError for bad input and AdapterGateError
    when the gate refuses (out_dir untouched)."""
    from pipelines.adapter.train import TrainParams, train_adapter
    cfg = config.adapter
    started = time.time()
    extra, extra_source = None, None
    if feedback is not None:
        extra = feedback_pairs(embeddings, feedback)
        extra_source = f"feedback {feedback}"
    data = adata.load_training_data(embeddings, pairs, extra, extra_source)
    sp = adata.split(data, cfg.val_products, cfg.val_pairs, cfg.seed, cfg.val_max_queries)
    x, labels = training_rows(data, sp.catalog_train, sp.pairs_train)
    identity = adata.validation_figures(data, sp)
    params = TrainParams.from_config(cfg)
    log.info("train-adapter: %d training rows (%d products), %d validation queries; "
             "identity recall@1 %.4f", len(x), len(set(labels.tolist())), identity["queries"],
             identity["recall@1"])
    arrays, info = train_adapter(x, labels, params)
    del x
    weights = arrays.pop("weights")
    mlp_arrays = arrays or None  # kind "mlp": the hidden layer's arrays
    base = data.base_model
    probe = make_adapter(weights, base, extra=mlp_arrays)
    adapted = adata.validation_figures(data, sp, probe.apply)
    gain = round(adapted["recall@1"] - identity["recall@1"], 4)
    passed = gain > cfg.min_gain
    validation = {"split_seed": cfg.seed, "val_products": cfg.val_products,
                  "val_pairs": cfg.val_pairs, "queries": identity["queries"],
                  "candidate_queries": sp.candidate_queries,
                  "max_queries": cfg.val_max_queries,
                  "with_adapter": adapted, "identity": identity,
                  "gain_recall@1": gain, "min_gain": cfg.min_gain, "passed": passed}
    training = {**info, **sp.sizes(data), "sources": data.sources, "seed": cfg.seed,
                "in_dim": data.dim, "out_dim": params.out_dim,
                "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    if passed and cfg.refit:
        weights, mlp_arrays, training["refit"] = _refit(data, params)
    figures: dict[str, Any] = {
        "validation": validation,
        "training": {k: v for k, v in training.items() if k != "loss_by_epoch"},
        "seconds": round(time.time() - started, 2)}
    previous = None
    if is_adapter(out_dir):
        try:
            previous = load_adapter(out_dir).id
        except AdapterError as e:
            log.warning("train-adapter: %s holds a damaged adapter: %s", out_dir, e)
    if not passed:
        reason = (f"gate refused the adapter: validation recall@1 {adapted['recall@1']:.4f} "
                  f"with it vs {identity['recall@1']:.4f} without (gain {gain:+.4f}, must "
                  f"exceed {cfg.min_gain}); {out_dir} keeps "
                  + (f"adapter {previous}" if previous else "what it held (no adapter)"))
        raise AdapterGateError(TrainResult(False, reason, None, previous, figures))
    adapter = save_adapter(make_adapter(weights, base, training, validation, extra=mlp_arrays),
                           out_dir)
    reason = (f"validation recall@1 {adapted['recall@1']:.4f} with the adapter vs "
              f"{identity['recall@1']:.4f} without (gain {gain:+.4f})")
    log.info("train-adapter: wrote %s to %s: %s", adapter.id, out_dir, reason)
    return TrainResult(True, reason, adapter, previous, figures)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embeddings", required=True,
                   help="catalog embeddings snapshot (or root: its LATEST); images sharing a "
                        "product_id are positives")
    p.add_argument("--out", required=True, help="adapter folder to write (local)")
    p.add_argument("--pairs", action="append", default=[], metavar="SNAPSHOT",
                   help="labelled photos: an embeddings snapshot whose product_id names the "
                        "product each photo shows (repeatable)")
    p.add_argument("--feedback", metavar="ROOT",
                   help="feedback log root (POST /v1/feedback): chosen products as pairs")
    p.add_argument("--dim", type=int, help="output dimension (default: config adapter.dim)")
    p.add_argument("--epochs", type=int, help="default: config adapter.epochs")
    p.add_argument("--hidden", type=int, metavar="DIM",
                   help="add a ReLU hidden layer of DIM units beside the linear map (kind "
                        "mlp; 0 = linear; default: config adapter.hidden)")
    p.add_argument("--seed", type=int, help="split/batch/initialisation seed (adapter.seed)")
    p.add_argument("--refit", action="store_true", default=None,
                   help="gate passed: write the same training on every row, held-out ones "
                        "too (adapter.refit; the gate's figures stay the split's)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _run(args: argparse.Namespace, config: Config) -> int:
    overrides: dict[str, Any] = {}
    for name in ("dim", "epochs", "seed", "hidden", "refit"):
        value = getattr(args, name)
        if value is not None:
            if name == "hidden" and value < 0:
                raise UsageError(f"--hidden must be >= 0, got {value}")
            if name in ("dim", "epochs") and value < 1:
                raise UsageError(f"--{name} must be >= 1, got {value}")
            overrides[name] = value
    if overrides:
        config = config.replace(adapter=overrides)
    check_uri_arg("--embeddings", args.embeddings)
    for p in args.pairs:
        check_uri_arg("--pairs", p)
    out = check_uri_arg("--out", args.out)
    from pipelines.core import filesystem as fs
    if not fs.is_local(out):
        raise UsageError(f"--out must be a local folder, got {args.out}")
    if args.feedback is not None:
        check_uri_arg("--feedback", args.feedback)
    try:
        result = run_train_adapter(args.embeddings, out, config, args.pairs, args.feedback)
        rc = 0
    except AdapterError as e:
        print(f"catalog-search train-adapter: bad input, nothing written: {e}", file=sys.stderr)
        return 1
    except AdapterGateError as e:
        result, rc = e.result, 3
        print(f"catalog-search train-adapter: {e}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_dict(), sort_keys=True, default=str))
        return rc
    v = result.figures["validation"]
    t = result.figures["training"]
    print(f"adapter      {result.adapter.id if result.adapter else '(not written)'}"
          f"{'  -> ' + out if result.adapter else ''}\n"
          f"training     {t['train']['catalog_rows']} catalog rows + {t['train']['pairs']} pairs, "
          f"{t['train']['products']} products, {t['steps']} steps, {t['seconds']} s "
          f"({t['loss']} loss {t['loss_first_epoch']} -> {t['loss_last_epoch']})\n"
          f"validation   {v['queries']} queries: recall@1 {v['with_adapter']['recall@1']:.4f} "
          f"with, {v['identity']['recall@1']:.4f} without; recall@5 "
          f"{v['with_adapter']['recall@5']:.4f} / {v['identity']['recall@5']:.4f}\n"
          f"gate         {'passed' if result.passed else 'REFUSED'}: {result.reason}"
          + (f"\nrefit        written adapter trained on all {t['refit']['rows']} rows "
             f"({t['refit']['products']} products), {t['refit']['seconds']} s"
             if "refit" in t else ""))
    return rc


COMMANDS = {
    "train-adapter": Command(
        help="learn a linear embedding adapter from product groups and labelled photos "
             "(exit 1: bad input, 3: gate refused, previous adapter kept)",
        add_arguments=_add_arguments, run=_run),
}
