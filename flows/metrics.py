"""Prometheus metrics of the scoring flow, served by bytewax's Dataflow API.

``crmscore flow`` turns that API on (``CRMSCORE_FLOW_METRICS_PORT``; process ``i`` of a
cluster listens on the port + ``i``). Its ``/metrics`` holds bytewax's own figures per
step (items in and out, the time of each batch, wake-up and snapshot) and this process's
default prometheus_client registry: the collectors below, and the process's CPU, memory
and garbage collector. Counts are this process's since it started: messages read again
after a restart count again (the flow's Kafka output is at-least-once).

bytewax binds every interface and, on a busy port, panics the thread of its server (the
flow runs on without it), so :func:`serve` checks the port first and says why not. It
also writes the dataflow's graph (served at ``/dataflow``) to ``dataflow.json`` in the
directory given (the current one by default): the flow gives its state directory, the
parent of its recovery directory.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from prometheus_client import Counter, Gauge

log = logging.getLogger(__name__)

DEAD_LETTERS = Counter(
    "crmscore_flow_dead_letters",
    "Messages refused and sent to the dead-letter topic, by the reason's code",
    ["reason"],
)
ALERTS_PUBLISHED = Counter(
    "crmscore_flow_alerts_published", "Live alerts sent to the alerts topic, by kind", ["kind"]
)
SNAPSHOT_INTERVAL = Gauge(
    "crmscore_flow_snapshot_interval_seconds",
    "The bytewax epoch this run of the flow chose at start (flows/recovery_scan.py)",
)
RECOVERY_SCAN = Gauge(
    "crmscore_flow_recovery_scan_seconds",
    "bytewax's scan of the recovery store at the end of every epoch, as last timed "
    "(at start, then every 15 minutes): the part of each epoch's pause that grows with "
    "the population",
)
RECOVERY_KEYS = Gauge(
    "crmscore_flow_recovery_state_keys", "State keys the recovery store holds, as last timed"
)


def serve(port: int, process_id: int = 0, graph_dir: Path = Path(".")) -> int | None:
    """Turn bytewax's Dataflow API on, on ``port + process_id``, its graph written in
    ``graph_dir``; before the flow starts. Returns the port, or None when off (``port``
    0) or busy."""
    if port == 0:
        log.info("flow metrics off (CRMSCORE_FLOW_METRICS_PORT=0)")
        return None
    port += process_id
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as exc:
            log.error("flow metrics not served: cannot listen on port %d: %s", port, exc)
            return None
    graph_dir.mkdir(parents=True, exist_ok=True)
    os.environ["BYTEWAX_DATAFLOW_API_CACHE_PATH"] = str(graph_dir)
    os.environ["BYTEWAX_DATAFLOW_API_ENABLED"] = "1"
    os.environ["BYTEWAX_DATAFLOW_API_PORT"] = str(port)
    log.info("flow metrics serving port=%d path=/metrics", port)
    return port
