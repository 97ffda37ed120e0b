"""Prometheus metrics of the gRPC server, served on ``CRMSCORE_METRICS_PORT``.

Module-level collectors on the default registry, so several servers in one process
(tests, the benchmark) share them instead of registering them twice.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from crmscore.v1.scoring_pb2 import PipelineStatus

log = logging.getLogger(__name__)

REQUEST_SECONDS = Histogram(
    "crmscore_grpc_request_seconds",
    "Time to answer a gRPC call (streams: until the stream ends), by method and status",
    ["method", "code"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
IN_FLIGHT = Gauge("crmscore_grpc_in_flight", "gRPC calls being answered, by method", ["method"])
REDIS_ERRORS = Counter(
    "crmscore_redis_errors_total", "Redis calls that failed or timed out, by operation", ["op"]
)
WATCHERS = Gauge("crmscore_watchers", "Open WatchCustomer streams")
CACHE_LOOKUPS = Counter(
    "crmscore_score_cache_lookups_total",
    "GetScore / BatchGetScores lookups in the server's score cache, by result (hit, miss)",
    ["result"],
)
REDIS_UP = Gauge("crmscore_redis_up", "1 while the health checker's Redis PING answers")

# The scoring flow's pipeline status (GetPipelineStatus), sampled by the health checker:
# the flow runs no HTTP server of its own, and its status is in Redis anyway.
FLOW_STATUS_AGE = Gauge(
    "crmscore_flow_status_age_seconds",
    "Seconds since the scoring flow last wrote its pipeline status; a running flow writes "
    "it at least every 5 s, so a growing age means it is stopped or stalled (NaN: none)",
)
FLOW_INPUT_LAG = Gauge(
    "crmscore_flow_input_lag_seconds",
    "How far the flow's reading of a transactions partition trails its producers, as of "
    "its last status: 0 once read to the end, else the age of the newest message read",
    ["partition"],
)
FLOW_STREAM_CLOCK = Gauge(
    "crmscore_flow_stream_clock_seconds",
    "The flow's event-time stream clock, in Unix seconds (NaN before the first event)",
)


class _FlowEvents(Collector):
    """The flow's event counts, as of its newest status sampled: counters the flow keeps
    (in its recovery snapshots, so they resume after a restart) and this server reports.
    A collector, because a prometheus_client Counter only counts what its own process
    adds."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "crmscore_flow_events",
            "Transaction events the scoring flow has handled, by outcome: consumed (read "
            "from the topic), applied (distinct valid events), rejected (sent to the "
            "dead-letter topic), duplicate (repeats ignored); from its pipeline status",
            labels=["outcome"])
        for outcome, count in self.counts.items():
            family.add_metric([outcome], count)
        yield family


FLOW_EVENTS = _FlowEvents()
REGISTRY.register(FLOW_EVENTS)

_status_written_at = math.nan  # Unix seconds of the newest status sampled
_lag_partitions: set[str] = set()  # the partitions FLOW_INPUT_LAG has a gauge for
FLOW_STATUS_AGE.set_function(lambda: time.time() - _status_written_at)
FLOW_STREAM_CLOCK.set(math.nan)


def observe_pipeline_status(status: PipelineStatus | None) -> None:
    """Set the flow gauges from the newest status read (None: the flow wrote none)."""
    global _status_written_at
    if status is None:
        _status_written_at = math.nan
        FLOW_EVENTS.counts = {}
        FLOW_STREAM_CLOCK.set(math.nan)
        FLOW_INPUT_LAG.clear()
        _lag_partitions.clear()
        return
    _status_written_at = status.updated_at.ToMicroseconds() / 1e6
    FLOW_EVENTS.counts = {"consumed": status.events_consumed, "applied": status.events_applied,
                          "rejected": status.events_rejected,
                          "duplicate": status.events_duplicate}
    FLOW_STREAM_CLOCK.set(status.stream_clock.ToMicroseconds() / 1e6
                          if status.HasField("stream_clock") else math.nan)
    lags = {str(p): lag.ToMicroseconds() / 1e6 for p, lag in status.partition_lags.items()}
    for partition in _lag_partitions.difference(lags):  # no longer reported
        FLOW_INPUT_LAG.remove(partition)
    for partition, lag in lags.items():
        FLOW_INPUT_LAG.labels(partition).set(lag)
    _lag_partitions.clear()
    _lag_partitions.update(lags)


def serve_metrics(port: int, address: str = "0.0.0.0") -> bool:
    """Serve /metrics on ``port``; 0 turns it off. A busy port is logged, not fatal."""
    if port == 0:
        log.info("metrics off (metrics_port=0)")
        return False
    try:
        start_http_server(port, addr=address)
    except OSError as exc:
        log.error("metrics not served: cannot listen on port=%d: %s", port, exc)
        return False
    log.info("metrics serving port=%d path=/metrics", port)
    return True
