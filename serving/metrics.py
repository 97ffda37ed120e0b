"""Prometheus metrics of the gRPC server, served on ``CRMSCORE_METRICS_PORT``.

Module-level collectors on the default registry, so several servers in one process
(tests, the benchmark) share them instead of registering them twice.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

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
