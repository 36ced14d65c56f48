"""build_index, steps 2-4 wired as one Beam job (see pipelines/index/build.py's docstring)."""
from __future__ import annotations


import pyarrow as pa
import pyarrow.compute as pc

from pipelines.core import filesystem as fs
from pipelines.core.config import Config

from pipelines.index.build_plan import BuildSpec, Split
from pipelines.index.build_rows import (_merge_error_summaries, duplicate_ids, read_split,
                                        routing_sample)
from pipelines.index.build_routing import budget_step, gate_routes_step, train_step
from pipelines.index.build_shard import _merge_top_scores, build_shard, shard_exact_scores
from pipelines.index.recall_gate import gate_shard


def _run_build_pipeline(config: Config, spec: BuildSpec, splits: list[Split]) -> None:
    """The whole build as one Beam job (see the module docstring, steps 2-4)."""
    import apache_beam as beam
    from apache_beam import pvalue
    from pipelines.core.runner import make_pipeline

    def write(name: str):
        return lambda value: fs.write_json(spec.stats_uri(name), value)

    with make_pipeline(config, "build-index") as p:
        if spec.partitioned:  # centroids first: rows go to their nearest centroid's shard
            partitions = (p
                          | "RoutingSplits" >> beam.Create(splits)
                          | "SpreadRoutingSplits" >> beam.Reshuffle()
                          | "SampleSplit" >> beam.FlatMap(routing_sample, spec)
                          | "RoutingSample" >> beam.combiners.Top.Smallest(
                              spec.params.routing_sample)
                          | "TrainPartitions" >> beam.Map(train_step, spec))
        else:
            partitions = p | "NoPartitions" >> beam.Create([None])
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
                  | "MergeErrors" >> beam.CombineGlobally(_merge_error_summaries))
        _ = errors | "WriteErrors" >> beam.Map(write("errors"))
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
        if (spec.params.tune_recall_target is not None and spec.num_shards > 1
                or spec.partitioned):
            exact = shards | "TuneExact" >> beam.Map(
                lambda item, t: (item[0], shard_exact_scores(item, spec, t)), tune_side)
            if spec.partitioned:  # the budget, and which tuning queries reach each shard
                routed = (exact
                          | "AllShardExact" >> beam.combiners.ToList()
                          | "RoutingBudget" >> beam.Map(budget_step, spec, tune_side,
                                                        part_side))
            else:
                routed = p | "NoRouting" >> beam.Create([None])
            global_kth = (exact
                          | "ExactScores" >> beam.Map(lambda x: x[1])
                          | "GlobalTopK" >> beam.CombineGlobally(_merge_top_scores)
                          | "KthScore" >> beam.Map(
                              lambda a: None if a is None else a[:, -1].copy()))
            kth_side = pvalue.AsSingleton(global_kth)
        else:
            kth_side = pvalue.AsSingleton(
                p | "NoGlobalKth" >> beam.Create([None]))
            routed = p | "NoRouting" >> beam.Create([None])
        reports = shards | "BuildShard" >> beam.Map(
            build_shard, spec, tune_side, kth_side, pvalue.AsSingleton(errors),
            pvalue.AsSingleton(routed))
        _ = (reports
             | "BuiltOnly" >> beam.Filter(lambda r: "files" in r)
             | "SpreadGate" >> beam.Reshuffle()
             | "GateShard" >> beam.Map(gate_shard, spec, pvalue.AsSingleton(gate_q)))
        _ = (read.views
             | "Views" >> beam.CombineGlobally(lambda vs: sorted(set().union(*map(set, vs))))
             | "WriteViews" >> beam.Map(write("views")))
        _ = (read.products
             | "GroupProducts" >> beam.GroupByKey()
             | "CountProducts" >> beam.MapTuple(
                 lambda b, uris: len(pc.unique(pa.concat_tables(
                     [fs.read_parquet(u) for u in uris]).column("product_id"))))
             | "SumProducts" >> beam.CombineGlobally(sum)
             | "WriteProducts" >> beam.Map(write("products")))
