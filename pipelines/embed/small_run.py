"""On the DirectRunner, a refresh with little to fetch runs in-process.

Starting the DirectRunner's worker processes, each importing TensorFlow and loading the
model, costs seconds: more than the work itself in a nightly refresh where 1% of the
catalog changed. Before a run whose previous snapshot is reusable (same embedding
fingerprint), the launcher counts the manifest rows that would be fetched: the rows whose
change signal (manifest columns, else file-system metadata: no image bytes are read) does
not match the previous snapshot, decided by the same `reuse_without_fetch` ResolveImage
uses. When that is at most `runner.direct_small_run_rows`, the job runs in the launcher
process (`direct_running_mode: in_memory`, TensorFlow on every core) instead of starting
workers. Counting stops as soon as the limit is passed, so a full re-embed pays for one
stat per row up to the limit; manifests over MAX_COUNTED_ROWS rows are not counted.
Cluster runners are never changed.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from typing import Any, Sequence

from pipelines.core import filesystem as fs
from pipelines.core.config import Config
from pipelines.embed import snapshot
from pipelines.embed.change_signal import SIGNAL_COLUMN, reuse_without_fetch, row_signal
from pipelines.embed.inflight import shared_executor
from pipelines.embed.manifest import read_rows

log = logging.getLogger(__name__)

#: Larger manifests are not counted: the count holds the previous snapshot's ids in the
#: launcher, and past this size the reused rows' own cost (about 0.16 ms each in one
#: process, docs/BENCHMARKS.md) dwarfs the few seconds of worker start-up saved.
MAX_COUNTED_ROWS = 200_000
_CHUNK_ROWS = 256


def _signals(rows: list[dict[str, Any]], concurrency: int) -> list[str | None]:
    """row_signal of each row; up to `concurrency` lookups (a stat / object HEAD) at once."""
    if concurrency <= 1 or len(rows) <= 1:
        return [row_signal(r) for r in rows]
    return list(shared_executor(concurrency).map(row_signal, rows))


def rows_to_fetch(manifests: Sequence[str], previous: str, output_views: Sequence[str],
                  limit: int, concurrency: int = 1) -> int:
    """Manifest rows a refresh against `previous` would fetch, counted up to limit + 1
    (change signals looked up `concurrency` at a time, in chunks of a few hundred rows)."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for uri in snapshot.embedding_files(previous):
        columns = [c for c in ("image_id", "view", SIGNAL_COLUMN)
                   if c in fs.parquet_column_names(uri)]
        for row in fs.read_parquet(uri, columns).to_pylist():
            by_id.setdefault(row["image_id"], []).append(row)
    count = 0
    for index, uri in enumerate(manifests):
        rows = (r for r in read_rows(index, uri) if not r["error"])  # errors: no fetch
        while chunk := list(itertools.islice(rows, _CHUNK_ROWS)):
            for row, signal in zip(chunk, _signals(chunk, concurrency)):
                if not reuse_without_fetch(signal, by_id.get(row["image_id"], []),
                                           output_views, verify_content=False):
                    count += 1
                    if count > limit:
                        return count
    return count


def choose_config(config: Config, manifests: Sequence[str], previous: str | None,
                  reusable: bool, verify_content: bool, output_views: Sequence[str],
                  input_rows: int) -> tuple[Config, dict[str, Any]]:
    """(the config to run with, what was decided: for the summary's timings)."""
    r = config.runner
    limit = r.direct_small_run_rows
    if (not r.is_direct or r.direct_running_mode == "in_memory" or limit <= 0
            or not previous or not reusable or verify_content
            or input_rows > MAX_COUNTED_ROWS):
        return config, {"running_mode": r.direct_running_mode if r.is_direct else r.name}
    planned = rows_to_fetch(manifests, previous, output_views, limit,
                            config.fetch.concurrency)
    if planned > limit:
        return config, {"running_mode": r.direct_running_mode,
                        "rows_to_fetch": f"more than {limit}"}
    log.info("embed: %d row(s) to fetch (at most runner.direct_small_run_rows = %d): running "
             "in-process instead of starting %d worker processes", planned, limit,
             r.direct_num_workers)
    runner = dataclasses.replace(r, direct_running_mode="in_memory", direct_num_workers=1,
                                 tf_threads=max(r.tf_threads, os.cpu_count() or 1))
    return (dataclasses.replace(config, runner=runner),
            {"running_mode": "in_memory", "rows_to_fetch": planned})
