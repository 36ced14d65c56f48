#!/usr/bin/env bash
# The planted near-duplicates benchmark (docs/EVALUATION.md): re-encoded, resized and
# cropped copies of catalog images under new product ids mixed into the catalog, embedded
# and indexed; the threshold sweep, then the duplicates job's own output scored against
# the planted truth.
# Usage: bash docs/examples/grocery_duplicates.sh CATALOG OUT COPIES SWEEP_JSON [CONFIG]
#   CATALOG: a catalog manifest (benchmarks/grocery_manifests.py writes one); OUT: the
#   work folder; COPIES: images planted; SWEEP_JSON: where the sweep's figures go.
set -euo pipefail
CATALOG=$1 OUT=$2 COPIES=$3 SWEEP=$4
CS=".venv/bin/catalog-search${5:+ --config $5}"
.venv/bin/python benchmarks/duplicates_bench.py plant --catalog $CATALOG --out $OUT \
    --copies $COPIES --seed 0
$CS embed --manifest $OUT/catalog.csv --out $OUT/emb --run-id dup-v1
$CS build-index --embeddings $OUT/emb/dup-v1 --index-root $OUT/index --shards 2
.venv/bin/python benchmarks/duplicates_bench.py sweep --index-root $OUT/index \
    --truth $OUT/truth.csv --out $SWEEP
$CS duplicates --index-root $OUT/index --out $OUT/report
.venv/bin/python benchmarks/duplicates_bench.py score --truth $OUT/truth.csv \
    --duplicates $OUT/report/duplicates.parquet
