"""The serving commands as a user runs them: ``keys new``, ``score``, ``serve``."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis

from crmscore.embedded import free_port
from crmscore.layout import RedisLayout
from models.transaction import format_time
from serving.auth import ApiKeys
from serving.client import ScoringClient
from tests.test_serving import (
    ADMIN_KEY,
    READER_KEY,
    Running,
    score_doc,
    serving_settings,
    start,
    wait_for,
    write_score,
)

ROOT = Path(__file__).resolve().parents[1]


def crmscore(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "crmscore.cli", *args], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
        **kwargs,
    )


@pytest.fixture(scope="module")
def api(redis_url: str) -> Iterator[Running]:
    running = start(serving_settings(redis_url, f"cli-{uuid.uuid4().hex[:6]}:"))
    yield running
    running.server.stop(0)


@pytest.fixture(scope="module")
def conn(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.mark.parametrize("role", ["reader", "admin"])
def test_keys_new_prints_a_key_and_its_config_entry(role: str) -> None:
    out, err = crmscore("keys", "new", "--role", role).communicate(timeout=30)
    key = re.search(r"^\s+(crm_\S+)$", out, re.MULTILINE).group(1)
    config = re.search(rf"^\s+({role}:[0-9a-f]{{64}})$", out, re.MULTILINE).group(1)
    assert config == f"{role}:{hashlib.sha256(key.encode()).hexdigest()}"
    assert ApiKeys.parse(config).role_of(key) == role


def test_score_prints_a_readable_card(api, conn) -> None:
    write_score(conn, api.layout, score_doc("card-1", version=3, lifecycle_stage="active"))
    proc = crmscore("score", "card-1", "--grpc-address", api.address,
                    env={"CRMSCORE_API_KEY": READER_KEY})
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Customer card-1" in out and "version 3" in out
    assert "frequency 5 · monetary 123.45 EUR" in out
    assert "lifecycle active" in out and "Strategy   -" in out
    assert READER_KEY not in out + err


def test_score_of_an_unknown_customer_says_not_found(api) -> None:
    proc = crmscore("score", "card-none", "--grpc-address", api.address,
                    env={"CRMSCORE_API_KEY": READER_KEY})
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "NOT_FOUND" in err and "card-none" in err


def test_score_watch_prints_each_change_and_stops_on_ctrl_c(api, conn) -> None:
    write_score(conn, api.layout, score_doc("card-w", version=1))
    proc = crmscore("score", "card-w", "--watch", "--grpc-address", api.address,
                    env={"CRMSCORE_API_KEY": READER_KEY, "PYTHONUNBUFFERED": "1"})
    try:
        assert "version 1" in proc.stdout.readline()
        wait_for(lambda: api.server.hub._count == 1, what="the watcher")
        write_score(conn, api.layout, score_doc("card-w", version=2), publish=True)
        lines = [proc.stdout.readline() for _ in range(12)]
        assert any("version 2" in line for line in lines), lines
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def scrape(metrics_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        return r.read().decode()


def test_serve_runs_until_sigterm_with_health_and_metrics(redis_url, conn) -> None:
    port, metrics_port = free_port(), free_port()
    prefix = f"serve-{uuid.uuid4().hex[:6]}:"
    env = {
        "CRMSCORE_REDIS_URL": redis_url, "CRMSCORE_REDIS_PREFIX": prefix,
        "CRMSCORE_API_KEYS": serving_settings(redis_url, prefix).api_keys,
        "CRMSCORE_GRPC_ADDRESS": f"127.0.0.1:{port}",
        "CRMSCORE_METRICS_PORT": str(metrics_port),
    }
    proc = crmscore("serve", env=env)
    try:
        with ScoringClient(f"127.0.0.1:{port}", ADMIN_KEY) as client:
            client.wait_ready(20)
            wait_for(lambda: client.health() == "SERVING", timeout=10, what="SERVING")
            write_score(conn, RedisLayout(prefix), score_doc("srv-1"))
            assert client.get_score("srv-1").customer_id == "srv-1"
        metrics = scrape(metrics_port)
        assert 'crmscore_grpc_request_seconds_count{code="OK",method="GetScore"} 1.0' in metrics
        assert "crmscore_redis_up 1.0" in metrics
        assert "crmscore_flow_status_age_seconds NaN" in metrics  # no flow has run
        assert "crmscore_flow_events_total{" not in metrics
        # The flow's status, 30 s old, with partition 2 behind: the health checker's next
        # sample (every second) puts it in the flow gauges.
        written = time.time() - 30
        conn.hset(RedisLayout(prefix).status(), mapping={"v": 1, "doc": orjson.dumps({
            "events_consumed": 7, "events_applied": 4, "events_rejected": 2,
            "events_duplicate": 1, "stream_clock": "2026-01-02T03:04:05.000000Z",
            "updated_at": format_time(round(written * 1e6)), "input_lag_seconds": 4.5,
            "partition_lag_seconds": {"0": 0.0, "2": 4.5}})})
        wait_for(lambda: 'crmscore_flow_input_lag_seconds{partition="2"} 4.5'
                 in scrape(metrics_port), timeout=10, what="the flow gauges")
        metrics = scrape(metrics_port)
        assert 'crmscore_flow_input_lag_seconds{partition="0"} 0.0' in metrics
        assert "crmscore_flow_stream_clock_seconds 1.767323045e+09" in metrics
        (age,) = re.findall(r"^crmscore_flow_status_age_seconds (\S+)$", metrics, re.M)
        assert 30 <= float(age) < 60
        events = dict(re.findall(r'^crmscore_flow_events_total\{outcome="(\w+)"\} (\S+)$',
                                 metrics, re.M))
        assert events == {"consumed": "7.0", "applied": "4.0", "rejected": "2.0",
                          "duplicate": "1.0"}
        # A flow restarted on fewer partitions: the gauge of partition 2 goes.
        conn.hset(RedisLayout(prefix).status(), mapping={"v": 2, "doc": orjson.dumps({
            "events_consumed": 3, "updated_at": format_time(round(time.time() * 1e6)),
            "partition_lag_seconds": {"0": 0.0}})})
        wait_for(lambda: 'partition="2"' not in scrape(metrics_port), timeout=10,
                 what="partition 2's gauge to go")
        metrics = scrape(metrics_port)
        assert "crmscore_flow_stream_clock_seconds NaN" in metrics
        assert 'crmscore_flow_events_total{outcome="consumed"} 3.0' in metrics
        assert 'crmscore_flow_events_total{outcome="applied"} 0.0' in metrics  # not said
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert time.monotonic() - started < 10
        assert "stopping signal=SIGTERM" in err and "stopped" in err
        for secret in (READER_KEY, ADMIN_KEY, env["CRMSCORE_API_KEYS"].split(",")[0]):
            assert secret not in out + err
    finally:
        if proc.poll() is None:
            proc.kill()
