"""build_index, steps 2-4 wired as one Beam job (see pipelines/index/build.py's docstring)."""
from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.core import filesystem as fs
from pipelines.core.config import Config

from pipelines.index.build_plan import BuildSpec, Split
from pipelines.index.build_rows import (merge_error_summaries, duplicate_ids, read_split,
                                        routing_sample)
from pipelines.index.build_routing import (budget_step, gate_routes_step, projection_step,
                                           train_step)
from pipelines.index.build_shard import merge_top_scores, build_shard, shard_exact_scores
from pipelines.index.recall_gate import gate_shard


def run_build_pipeline(config: Config, spec: BuildSpec, splits: list[Split]) -> None:
    """The whole build as one Beam job (pipelines/index/build.py's docstring, steps 2-4):
    what it finds is written under spec.staging (stats_uri, result_uri, gate_uri)."""
    import apache_beam as beam
    from apache_beam import pvalue
    from pipelines.core.runner import make_pipeline

    with make_pipeline(config, "build-index") as p:
        partitions, projection = _sampled(p, spec, splits)
        part_side = pvalue.AsSingleton(partitions)
        read = (p
                | "Splits" >> beam.Create(splits)
                | "SpreadSplits" >> beam.Reshuffle()
                | "ReadSplit" >> beam.FlatMap(read_split, spec, part_side).with_outputs(
                    "part", "errors", "gate", "tune", "views", "products", "ids"))
        row_errors = read.errors
        if spec.partitioned:  # the views of an image may lie in several shards
            dups = (read.ids
                    | "GroupIds" >> beam.GroupByKey()
                    | "CheckDuplicates" >> beam.MapTuple(duplicate_ids))
            row_errors = (read.errors, dups) | "AllErrors" >> beam.Flatten()
        errors = (row_errors
                  | "MergeErrors" >> beam.CombineGlobally(merge_error_summaries))
        _ = errors | "WriteErrors" >> beam.Map(_writer(spec, "errors"))
        gate_q = read.gate | "GateSample" >> beam.combiners.Top.Smallest(spec.eval_queries)
        tune_q = read.tune | "TuneSample" >> beam.combiners.Top.Smallest(spec.eval_queries)
        _ = gate_q | "WriteGateIds" >> beam.Map(
            lambda s: fs.write_json(spec.stats_uri("gate_sample"),
                                    [f"{x[1]}\0{x[2]}" for x in s]))
        shard_ids = p | "ShardIds" >> beam.Create([(s, None) for s in range(spec.num_shards)])
        shards = (({"part": read.part, "id": shard_ids})
                  | "GroupParts" >> beam.CoGroupByKey()
                  | "PartsOfShard" >> beam.MapTuple(
                      lambda s, g: (s, sorted(g["part"], key=lambda x: x["uri"])))
                  | "SpreadShards" >> beam.Reshuffle())
        tune_side = pvalue.AsSingleton(tune_q)
        if spec.partitioned:
            _ = gate_q | "GateRoutes" >> beam.Map(gate_routes_step, spec, part_side)
        kth_side, routed = _search_budget(p, spec, shards, tune_side, part_side)
        reports = shards | "BuildShard" >> beam.Map(
            build_shard, spec, tune_side, kth_side, pvalue.AsSingleton(errors),
            pvalue.AsSingleton(routed), pvalue.AsSingleton(projection))
        _ = (reports
             | "BuiltOnly" >> beam.Filter(lambda r: "files" in r)
             | "SpreadGate" >> beam.Reshuffle()
             | "GateShard" >> beam.Map(gate_shard, spec, pvalue.AsSingleton(gate_q)))
        _write_counts(spec, read)


def _writer(spec: BuildSpec, name: str):
    return lambda value: fs.write_json(spec.stats_uri(name), value)


def _sampled(p: Any, spec: BuildSpec, splits: list[Split]) -> tuple[Any, Any]:
    """What the seeded row sample trains (one element each): the routing partitions
    (centroids, or None for hash shards) and the shared projection (or None)."""
    import apache_beam as beam

    if not (spec.partitioned or spec.shared_projection_dim):
        return (p | "NoPartitions" >> beam.Create([None]),
                p | "NoProjection" >> beam.Create([None]))
    sample = (p
              | "RoutingSplits" >> beam.Create(splits)
              | "SpreadRoutingSplits" >> beam.Reshuffle()
              | "SampleSplit" >> beam.FlatMap(routing_sample, spec)
              | "RoutingSample" >> beam.combiners.Top.Smallest(spec.params.routing_sample))
    # centroids first: rows go to their nearest centroid's shard
    partitions = (sample | "TrainPartitions" >> beam.Map(train_step, spec) if spec.partitioned
                  else p | "NoPartitions" >> beam.Create([None]))
    projection = (sample | "TrainProjection" >> beam.Map(projection_step, spec)
                  if spec.shared_projection_dim else p | "NoProjection" >> beam.Create([None]))
    return partitions, projection


def _search_budget(p: Any, spec: BuildSpec, shards: Any, tune_side: Any, part_side: Any
                   ) -> tuple[Any, Any]:
    """(side input of the tuning queries' global k-th exact scores or None, the routing
    budget's per-shard queries or None): what BuildShard tunes each shard against."""
    import apache_beam as beam
    from apache_beam import pvalue

    if not (spec.params.tune_recall_target is not None and spec.num_shards > 1
            or spec.partitioned):
        kth_side = pvalue.AsSingleton(p | "NoGlobalKth" >> beam.Create([None]))
        return kth_side, p | "NoRouting" >> beam.Create([None])
    exact = shards | "TuneExact" >> beam.Map(
        lambda item, t: (item[0], shard_exact_scores(item, spec, t)), tune_side)
    if spec.partitioned:  # the budget, and which tuning queries reach each shard
        routed = (exact
                  | "AllShardExact" >> beam.combiners.ToList()
                  | "RoutingBudget" >> beam.Map(budget_step, spec, tune_side, part_side))
    else:
        routed = p | "NoRouting" >> beam.Create([None])
    global_kth = (exact
                  | "ExactScores" >> beam.Map(lambda x: x[1])
                  | "GlobalTopK" >> beam.CombineGlobally(merge_top_scores)
                  | "KthScore" >> beam.Map(lambda a: None if a is None else a[:, -1].copy()))
    return pvalue.AsSingleton(global_kth), routed


def _write_counts(spec: BuildSpec, read: Any) -> None:
    """The snapshot's views and its number of distinct products, to the build's stats."""
    import apache_beam as beam

    _ = (read.views
         | "Views" >> beam.CombineGlobally(lambda vs: sorted(set().union(*map(set, vs))))
         | "WriteViews" >> beam.Map(_writer(spec, "views")))
    _ = (read.products
         | "GroupProducts" >> beam.GroupByKey()
         | "CountProducts" >> beam.MapTuple(
             lambda b, uris: len(pc.unique(pa.concat_tables(
                 [fs.read_parquet(u) for u in uris]).column("product_id"))))
         | "SumProducts" >> beam.CombineGlobally(sum)
         | "WriteProducts" >> beam.Map(_writer(spec, "products")))
