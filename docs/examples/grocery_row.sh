#!/usr/bin/env bash
# One grocery evaluation row: the catalog embedded in full and packshots-only (the second
# run reuses the first one's vectors), an index of each, both evaluated on the test photos.
# Usage: bash docs/examples/grocery_row.sh CONFIG ROW MANIFESTS [evaluate flags...]
#   CONFIG: the row's config file; ROW: its output folder; MANIFESTS: the folder holding
#   grocery/ and grocery-iconic/ (benchmarks/grocery_manifests.py --out MANIFESTS/grocery ...)
set -euo pipefail
CONFIG=$1 ROW=$2 M=$3
shift 3
CS=".venv/bin/catalog-search --config $CONFIG"
$CS embed --manifest $M/grocery/catalog.csv --out $ROW/emb-full --run-id full
$CS embed --manifest $M/grocery-iconic/catalog.csv --out $ROW/emb-iconic --run-id iconic \
    --previous $ROW/emb-full/full
$CS build-index --embeddings $ROW/emb-full/full --index-root $ROW/index-full --shards 2
$CS build-index --embeddings $ROW/emb-iconic/iconic --index-root $ROW/index-iconic --shards 1
$CS evaluate --index-root $ROW/index-full --queries $M/grocery/queries.csv \
    --out $ROW/eval-full --vector-cache $ROW/vector-cache "$@"
$CS evaluate --index-root $ROW/index-iconic --queries $M/grocery/queries.csv \
    --out $ROW/eval-iconic --vector-cache $ROW/vector-cache "$@"
