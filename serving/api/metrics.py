"""Prometheus metrics of the service (prometheus_client), one registry per app.

    catalog_search_requests_total{method, route, status}   counter
    catalog_search_errors_total{reason, route}             counter (answers >= 400)
    catalog_search_request_seconds{route}                  histogram (latency)
    catalog_search_index_info{version}                     gauge, 1 for the serving version
    catalog_search_index_vectors                           gauge (searchable rows)
    catalog_search_index_deltas, _delta_rows_added, _delta_rows_removed,
    catalog_search_index_delta_oldest_age_seconds          gauges (serving.delta_index)
    catalog_search_index_ready                             gauge, 1 once a version is loaded
    catalog_search_reloads_total{outcome}                  counter (loaded/unchanged/refused)
    catalog_search_decode_rejected_total                   counter (503 busy of the slots)

Routes are the matched route templates (`/v1/images/{image_id:path}`), so ids never
become labels; unmatched paths are `(unmatched)`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from serving.api.gate import QueryGate
    from serving.searcher import CatalogSearcher

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _IndexCollector(Collector):
    """The serving version, its size and the reload outcomes, read at scrape time."""

    def __init__(self, searcher: "CatalogSearcher", gate: "QueryGate"):
        self.searcher = searcher
        self.gate = gate

    def collect(self) -> Iterator[Metric]:
        idx = self.searcher.loaded
        info = GaugeMetricFamily("catalog_search_index_info",
                                 "The serving index version (value 1).", labels=["version"])
        if idx is not None:
            info.add_metric([idx.version], 1)
        yield info
        yield GaugeMetricFamily("catalog_search_index_vectors",
                                "Searchable vectors in the serving index (version + delta rows "
                                "added - rows deleted).",
                                value=getattr(idx, "searchable_rows", idx.num_vectors)
                                if idx is not None else 0)
        delta_info = getattr(idx, "delta_info", None)
        info_d = delta_info() if delta_info is not None else {}
        for name, key, text in (
                ("deltas", "deltas", "Deltas applied on top of the serving version."),
                ("delta_rows_added", "rows_added", "Rows the applied deltas added."),
                ("delta_rows_removed", "rows_removed",
                 "Rows of the version or its deltas that deletes and takedowns removed."),
                ("delta_oldest_age_seconds", "oldest_delta_age_s",
                 "Age of the oldest applied delta (0 when none).")):
            yield GaugeMetricFamily(f"catalog_search_index_{name}", text,
                                    value=info_d.get(key) or 0)
        yield GaugeMetricFamily("catalog_search_index_ready",
                                "1 when an index version is loaded.",
                                value=1 if idx is not None else 0)
        reloads = CounterMetricFamily("catalog_search_reloads", "Reload checks by outcome.",
                                      labels=["outcome"])
        for outcome, n in sorted(self.searcher.reload_counts.items()):
            reloads.add_metric([outcome], n)
        yield reloads
        yield CounterMetricFamily("catalog_search_decode_rejected",
                                  "Uploads answered 503 busy (every decode slot taken).",
                                  value=self.gate.rejected)


class ServingMetrics:
    """Request counters and latency histograms plus the index state, on its own registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, searcher: "CatalogSearcher", gate: "QueryGate"):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("catalog_search_requests",
                                "HTTP requests by route, method, status.",
                                ["route", "method", "status"], registry=self.registry)
        self.errors = Counter("catalog_search_errors",
                              "Requests answered with an error, by route and reason.",
                              ["route", "reason"], registry=self.registry)
        self.latency = Histogram("catalog_search_request_seconds", "Request latency.",
                                 ["route"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.registry.register(_IndexCollector(searcher, gate))

    def observe(self, route: str, method: str, status: int, seconds: float,
                reason: str | None = None) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status >= 400:
            self.errors.labels(route, reason or str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
