#!/usr/bin/env bash
# The vectors the index, scale, delta and duplicates benchmarks draw from: the builtin
# model's embeddings of the grocery catalog (original + hflip views), fitted once.
# Usage: bash docs/examples/grocery_fit.sh DATASET   (the grocery dataset's dataset/ folder)
# Writes /tmp/groc (manifests, embeddings /tmp/groc/fitemb/full), /tmp/grocery-fit.npz and
# /tmp/check-12.json (the fit's recall curve against the real one).
set -euo pipefail
DATASET=$1
.venv/bin/python benchmarks/grocery_manifests.py $DATASET --out /tmp/groc
.venv/bin/catalog-search embed --config docs/examples/fit-views.yaml \
    --manifest /tmp/groc/catalog.csv --out /tmp/groc/fitemb --run-id full
.venv/bin/python benchmarks/fitted_vectors.py fit --snapshot /tmp/groc/fitemb/full \
    --out /tmp/grocery-fit.npz
.venv/bin/python benchmarks/fitted_vectors.py check --snapshot /tmp/groc/fitemb/full \
    --cluster-size 12 --out /tmp/check-12.json
