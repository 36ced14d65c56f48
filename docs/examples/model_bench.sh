#!/usr/bin/env bash
# Model-only cost per image of builtin models, one JSON line per model, on one thread.
# Usage: bash docs/examples/model_bench.sh MODEL... >> OUT.jsonl   (MODEL: lite0, lite1, lite2)
set -euo pipefail
for m in "$@"; do
  .venv/bin/catalog-search model bench --handle builtin:efficientnet_$m --threads 1 --json
done
