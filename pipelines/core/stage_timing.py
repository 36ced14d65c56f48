"""Where an embed run spends its time: per-stage wall / CPU time as Beam metrics.

Each stage of the job records, per element (or per batch for the model), three Beam
distributions in the job's metrics namespace:

    stage_<name>_wall_us   wall time of the call
    stage_<name>_cpu_us    CPU time of the calling thread (TensorFlow's own intra-op
                           threads are not in it: for `embed` read the wall time)
    stage_<name>_at_ms     when the call ended (ms since the epoch): min / max are the
                           stage's first and last element on any worker
    stage_<name>_size      items per call (images per model batch), where it applies

Stages: `resolve` (change-signal lookup, fetch, sha256: on the fetch threads, reported
when the element is emitted), `decode` (JPEG decode, resize, views), `load_model`,
`embed` (one model call on a RunInference batch), `assemble` (a row from its views).
The launcher reads them once the run is done (`collect`) and the summary's
`timings.stages` holds them; `benchmarks/embed_throughput.py` prints them. Distributions
cost a few microseconds per element, and the DirectRunner and the cluster runners
aggregate them the same way.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

from apache_beam.metrics import Metrics

STAGES = ("resolve", "decode", "load_model", "embed", "assemble")
_SUFFIXES = ("wall_us", "cpu_us", "at_ms", "size")


class Timer:
    """Wall and thread-CPU time of a block (for code that cannot touch Beam metrics,
    such as the fetch threads: report the result later with `record`)."""

    def __init__(self) -> None:
        self.wall_us = 0
        self.cpu_us = 0
        self.ended_ms = 0
        self._wall = time.perf_counter()
        self._cpu = time.thread_time()

    def stop(self) -> "Timer":
        self.wall_us = int((time.perf_counter() - self._wall) * 1e6)
        self.cpu_us = int((time.thread_time() - self._cpu) * 1e6)
        self.ended_ms = int(time.time() * 1000)
        return self


def record(namespace: str, stage: str, timer: Timer, size: int | None = None) -> None:
    """Report one call of `stage` (in a thread that has a Beam metrics context)."""
    Metrics.distribution(namespace, f"stage_{stage}_wall_us").update(timer.wall_us)
    Metrics.distribution(namespace, f"stage_{stage}_cpu_us").update(timer.cpu_us)
    Metrics.distribution(namespace, f"stage_{stage}_at_ms").update(timer.ended_ms)
    if size is not None:
        Metrics.distribution(namespace, f"stage_{stage}_size").update(size)


@contextlib.contextmanager
def timed(namespace: str, stage: str, size: int | None = None) -> Iterator[Timer]:
    """Time the block as one call of `stage` (recorded even when it raises)."""
    timer = Timer()
    try:
        yield timer
    finally:
        record(namespace, stage, timer.stop(), size)


def collect(result: Any, namespace: str, started_s: float) -> dict[str, dict[str, Any]]:
    """Per stage: calls, total / mean wall ms, total CPU s, first / last end (seconds after
    `started_s`, a time.time()), items per call; {} when the runner gives no metrics."""
    try:
        found = result.metrics().query()["distributions"]
    except Exception:  # a runner without metrics support: timings are optional
        return {}
    values: dict[tuple[str, str], Any] = {}
    for d in found:
        name = d.key.metric.name
        if d.key.metric.namespace != namespace or not name.startswith("stage_"):
            continue
        suffix = next((s for s in _SUFFIXES if name.endswith("_" + s)), None)
        if suffix is None:
            continue
        stage = name[len("stage_"):-len(suffix) - 1]
        data = d.committed if d.committed is not None else d.attempted
        if data is None or not data.count:
            continue
        values[(stage, suffix)] = data
    out: dict[str, dict[str, Any]] = {}
    order = {s: i for i, s in enumerate(STAGES)}
    for stage in sorted({s for s, _ in values}, key=lambda s: (order.get(s, len(order)), s)):
        wall, cpu = values.get((stage, "wall_us")), values.get((stage, "cpu_us"))
        at, size = values.get((stage, "at_ms")), values.get((stage, "size"))
        row: dict[str, Any] = {}
        if wall is not None:
            row.update(calls=wall.count, wall_s=round(wall.sum / 1e6, 3),
                       mean_ms=round(wall.sum / wall.count / 1e3, 3),
                       max_ms=round(wall.max / 1e3, 3))
        if cpu is not None:
            row["cpu_s"] = round(cpu.sum / 1e6, 3)
        if at is not None:
            row["first_end_s"] = round(at.min / 1e3 - started_s, 3)
            row["last_end_s"] = round(at.max / 1e3 - started_s, 3)
        if size is not None:
            row.update(items=size.sum, mean_size=round(size.sum / size.count, 2),
                       min_size=size.min, max_size=size.max)
        out[stage] = row
    return out
