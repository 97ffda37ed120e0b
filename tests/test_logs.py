"""CRMSCORE_LOG_FORMAT: every command logs readable lines, or one JSON object a line."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson


def run_topics(broker_address: str, unique: str,
               log_format: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CRMSCORE_KAFKA_BOOTSTRAP": broker_address,
           "CRMSCORE_TRANSACTIONS_TOPIC": f"{unique}-tx", "CRMSCORE_DLQ_TOPIC": f"{unique}-dlq",
           "CRMSCORE_ALERTS_TOPIC": f"{unique}-alerts", "CRMSCORE_TIMERS_TOPIC": f"{unique}-t",
           "CRMSCORE_LOG_FORMAT": log_format}
    return subprocess.run([sys.executable, "-m", "crmscore.cli", "topics"], env=env,
                          capture_output=True, text=True, timeout=60)


def test_json_logs_are_one_object_a_line(broker, unique):
    done = run_topics(broker.address, unique, "json")
    assert done.returncode == 0, done.stderr
    entries = [orjson.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    created = [e for e in entries if e["message"].startswith(f"created topic {unique}-tx")]
    assert created, done.stderr
    assert created[0]["level"] == "INFO" and created[0]["logger"] == "crmscore.clients"
    assert created[0]["time"].endswith("Z")
    # Every line the service logged is JSON (librdkafka's own lines start with %).
    assert all(line.startswith(("{", "%")) for line in done.stderr.splitlines()), done.stderr


def test_an_unknown_log_format_is_refused_with_its_name(broker, unique):
    done = run_topics(broker.address, unique, "xml")
    assert done.returncode == 2
    assert "CRMSCORE_LOG_FORMAT: expected 'text' or 'json', got 'xml'" in done.stderr
