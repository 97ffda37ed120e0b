"""The flow's own Prometheus metrics (flows/metrics.py), scraped from a running flow.

A tail-mode flow on the real broker and Redis reads a customer's purchases, one of them
large enough for a ``purchase.large`` alert, and events it must refuse; its ``/metrics``
must count the dead letters by reason and the alerts by kind exactly as the topics hold
them, beside bytewax's own figures per step.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
import redis

from crmscore.embedded import free_port
from flows import metrics
from tests.pipeline import PARTITIONS, FlowEnv, kill, publish, read_topic, wait_for_consumed


def _purchase(n: int, days_ago: float, amount: float) -> bytes:
    at = datetime.now(UTC) - timedelta(days=days_ago)
    return orjson.dumps({
        "event_id": f"m-{n}", "customer_id": "metrics-1", "type": "purchase",
        "occurred_at": at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "amount": amount,
        "currency": "EUR", "channel": "web",
    })


def _topic_counts(env: FlowEnv, topic: str, field: Callable[[Any], str]
                  ) -> dict[str, float]:
    """The topic's messages by ``field`` (a dead letter's reason code, an alert's kind)."""
    found = Counter(field(orjson.loads(value))
                    for *_, value in read_topic(env.bootstrap, topic, PARTITIONS))
    return {label: float(n) for label, n in found.items()}


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def _by_label(text: str, metric: str) -> dict[str, float]:
    return {label: float(value) for label, value in
            re.findall(rf'^{metric}\{{\w+="([^"]+)"\}} (\S+)$', text, re.MULTILINE)}


@pytest.mark.e2e
def test_flow_metrics_count_what_the_topics_hold(broker, redis_url, unique, tmp_path):
    env = FlowEnv(broker.address, redis_url, unique, tmp_path / "recovery")
    good = [_purchase(i, 40 - 10 * i, 20.0) for i in range(3)] + [_purchase(3, 5, 400.0)]
    bad = [b"{not json", orjson.dumps({"event_id": "x", "customer_id": "metrics-2"}),
           _purchase(4, 1, -5.0)]
    publish(env, good + bad)
    port = free_port()
    proc = env.start_flow(CRMSCORE_FLOW_METRICS_PORT=str(port))
    conn = redis.Redis.from_url(redis_url)
    wait_for_consumed(conn, env.layout, len(good) + len(bad), proc, timeout=120)

    # The counters count before the epoch that writes to Kafka ends: compare until the
    # topics have caught up with them.
    deadline = time.monotonic() + 60
    while True:
        text = _scrape(port)
        letters = _topic_counts(env, env.dlq, lambda m: m["reason"]["code"])
        alerts = _topic_counts(env, env.alerts, lambda m: m["kind"])
        counted = (_by_label(text, "crmscore_flow_dead_letters_total"),
                   _by_label(text, "crmscore_flow_alerts_published_total"))
        caught_up = sum(letters.values()) == len(bad) and "purchase.large" in alerts
        if (caught_up and counted == (letters, alerts)) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    kill(proc, signal.SIGTERM)
    assert counted == (letters, alerts)
    assert sum(letters.values()) == len(bad)
    assert alerts["purchase.large"] == 1.0
    assert "crmscore_flow_snapshot_interval_seconds 0.25" in text
    assert re.search(r"^crmscore_flow_recovery_state_keys \d", text, re.MULTILINE)
    # bytewax's own figures per step: every message parsed, the valid ones (and any
    # wake-ups) taken by the customers step
    taken = {step: float(n) for step, n in re.findall(
        r'^bytewax_item_inp_count_total\{step_id="crmscore\.(parse\.flat_map_batch|customers)"'
        r'[^}]*\} (\S+)$', text, re.MULTILINE)}
    assert taken["parse.flat_map_batch"] >= len(good) + len(bad)
    assert taken["customers"] >= len(good)
    assert re.search(r"^process_resident_memory_bytes \d", text, re.MULTILINE)
    # the dataflow's graph, beside the recovery directory rather than wherever it ran
    assert orjson.loads((env.recovery_dir.parent / "dataflow.json").read_bytes())["flow_id"]


def test_metrics_are_served_on_a_free_port_only(monkeypatch, tmp_path):
    environ: dict[str, str] = {}  # what bytewax's server reads
    monkeypatch.setattr(os, "environ", environ)
    assert metrics.serve(0) is None
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        assert metrics.serve(taken.getsockname()[1]) is None
    assert environ == {}
    port = free_port()
    assert metrics.serve(port - 2, process_id=2, graph_dir=tmp_path / "state") == port
    assert environ == {"BYTEWAX_DATAFLOW_API_ENABLED": "1",
                       "BYTEWAX_DATAFLOW_API_PORT": str(port),  # process i: the port + i
                       "BYTEWAX_DATAFLOW_API_CACHE_PATH": str(tmp_path / "state")}
    assert (tmp_path / "state").is_dir()
