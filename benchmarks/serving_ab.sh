#!/bin/bash
# Serving before/after a code change: benchmarks/serving_bench.py (small size) on an older
# revision and on this checkout, alternating, two rounds, one JSON per run.
#   bash benchmarks/serving_ab.sh OLD_REV QUERIES_CSV OUT_DIR
# QUERIES_CSV: a query manifest with absolute image paths (an older serving_bench opened
# them against the working directory). The old revision is checked out as a detached git
# worktree next to this one and run with this checkout's venv (PYTHONPATH picks its code).
set -euo pipefail
if [ $# -ne 3 ]; then
  echo "usage: bash benchmarks/serving_ab.sh OLD_REV QUERIES_CSV OUT_DIR" >&2; exit 2
fi
old_rev=$1; queries=$(realpath "$2"); out=$(realpath -m "$3")
here=$(git rev-parse --show-toplevel); py=$here/.venv/bin/python
old=$(mktemp -d)/old
git -C "$here" worktree add -q --detach "$old" "$old_rev"
trap 'git -C "$here" worktree remove --force "$old"' EXIT
mkdir -p "$out"
for round in 1 2; do
  for tree in old new; do
    dir=$here; [ "$tree" = old ] && dir=$old
    (cd "$dir" && PYTHONPATH=$dir "$py" benchmarks/serving_bench.py --num-vectors 20000 \
       --shards 2 --queries "$queries" --workdir "$out/work-$tree" --latency-queries 200 \
       --clients 4 --load-seconds 6 --swaps 2 > "$out/serving_bench-20k-$tree-$round.json")
    echo "$tree round $round: $out/serving_bench-20k-$tree-$round.json"
  done
done
