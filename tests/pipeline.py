"""Helpers for end-to-end tests: run the real flow as a process, read what it wrote."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import redis
from confluent_kafka import Consumer, KafkaError, TopicPartition

from crmscore.doc_codec import load
from crmscore.layout import RedisLayout

if TYPE_CHECKING:
    from serving.client import ScoringClient
    from tests.reference import Expected

PARTITIONS = 4  # of the transactions topic the end-to-end tests publish to


@dataclass
class FlowEnv:
    bootstrap: str
    redis_url: str
    token: str
    recovery_dir: Path
    redis_cluster: bool = False  # redis_url names a node of a Redis Cluster

    @property
    def topic(self) -> str:
        return f"tx-{self.token}"

    @property
    def dlq(self) -> str:
        return f"dlq-{self.token}"

    @property
    def alerts(self) -> str:
        return f"alerts-{self.token}"

    @property
    def layout(self) -> RedisLayout:
        return RedisLayout(f"t{self.token}:")

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "CRMSCORE_KAFKA_BOOTSTRAP": self.bootstrap,
            "CRMSCORE_REDIS_URL": self.redis_url,
            "CRMSCORE_REDIS_CLUSTER": "on" if self.redis_cluster else "off",
            "CRMSCORE_TRANSACTIONS_TOPIC": self.topic,
            "CRMSCORE_DLQ_TOPIC": self.dlq,
            "CRMSCORE_TIMERS_TOPIC": f"timers-{self.token}",
            "CRMSCORE_ALERTS_TOPIC": self.alerts,
            "CRMSCORE_REDIS_PREFIX": self.layout.prefix,
            "CRMSCORE_RECOVERY_DIR": str(self.recovery_dir),
            "CRMSCORE_SNAPSHOT_INTERVAL": "0.25",
            "CRMSCORE_FLOW_METRICS_PORT": "0",  # flows of a test may run side by side
            # Tests wait for the documents to settle: a change of the served model rescores
            # at once, not at the default 100 customers a second.
            "CRMSCORE_RESCORE_RATE": "0",
            **extra,
        }

    def start_flow(self, *args: str, **extra_env: str) -> subprocess.Popen[bytes]:
        path = self.recovery_dir.parent / f"flow-{time.monotonic_ns()}.log"
        with open(path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "crmscore.cli", "flow", *args],
                env=self.env(**extra_env), stdout=log, stderr=subprocess.STDOUT,
            )
        STARTED.append(proc)
        LOGS[proc.pid] = path
        return proc


# Every flow a test started; tests/conftest.py kills the ones a failed test left running.
STARTED: list[subprocess.Popen[bytes]] = []
# Where each flow's output went, by process id.
LOGS: dict[int, Path] = {}


def log_tail(proc: subprocess.Popen[bytes], lines: int = 40) -> str:
    """The last lines a flow printed: why it exited, when it did."""
    path = LOGS.get(proc.pid)
    if path is None or not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def kill_leftovers() -> None:
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def status(conn: redis.Redis, layout: RedisLayout) -> dict[str, Any] | None:
    raw = conn.hget(layout.status(), "doc")
    return None if raw is None else orjson.loads(raw)


def wait_for_consumed(conn: redis.Redis, layout: RedisLayout, at_least: int,
                      proc: subprocess.Popen[bytes] | None = None, timeout: float = 180,
                      since: float | None = None) -> dict[str, Any]:
    """Wait until the status shows ``at_least`` consumed events, written after ``since``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = status(conn, layout)
        fresh = since is None or (st is not None and epoch(st["updated_at"]) >= since)
        if st is not None and st["events_consumed"] >= at_least and fresh:
            return st
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"flow exited with {proc.returncode} before consuming "
                                 f"{at_least} events (status {st}); it printed:\n"
                                 f"{log_tail(proc)}")
        time.sleep(0.005)
    raise AssertionError(f"flow did not consume {at_least} events in {timeout} s: {st}")


def wait_until_settled(conn: redis.Redis, env: FlowEnv, quiet_s: float = 4.0,
                       timeout: float = 120.0) -> dict[str, dict[str, Any]]:
    """Score documents once no version has changed for ``quiet_s`` (wake-ups done), nor
    the served model (a change rescores the waiting customers after it)."""
    deadline = time.monotonic() + timeout
    last: tuple[dict[str, int], bytes | None] = ({}, None)
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        docs = score_documents(conn, env.layout)
        versions = ({cid: d["version"] for cid, d in docs.items()},
                    conn.hget(env.layout.model_bundle(), "v"))
        if versions != last:
            last, stable_since = versions, time.monotonic()
        elif time.monotonic() - stable_since >= quiet_s:
            return docs
        time.sleep(0.5)
    raise AssertionError("score documents kept changing")


def epoch(text: str) -> float:
    """Seconds since the epoch of an RFC 3339 time."""
    from datetime import datetime

    return datetime.fromisoformat(text).timestamp()


def kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> int:
    proc.send_signal(sig)
    return proc.wait(30)


def score_documents(conn: redis.Redis, layout: RedisLayout) -> dict[str, dict[str, Any]]:
    keys = list(conn.scan_iter(match=layout.score_pattern(), count=1000))
    pipe = conn.pipeline(transaction=False)
    for key in keys:
        pipe.hget(key, "doc")
    docs = pipe.execute()
    return {layout.customer_id(k): load(d)
            for k, d in zip(keys, docs, strict=True)}


def read_topic(bootstrap: str, topic: str, partitions: int, timeout: float = 30
               ) -> list[tuple[int, int, bytes | None, bytes | None]]:
    """Every message of ``topic`` as (partition, offset, key, value), read to the end."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"reader-{time.monotonic_ns()}",
        "enable.partition.eof": True, "auto.offset.reset": "earliest",
        "enable.auto.commit": False, "fetch.wait.max.ms": 10,
    })
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    done: set[int] = set()
    out = []
    deadline = time.monotonic() + timeout
    while len(done) < partitions and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        if msg.error():
            if msg.error().code() == KafkaError._PARTITION_EOF:
                done.add(msg.partition())
                continue
            raise AssertionError(f"reading {topic}: {msg.error()}")
        out.append((msg.partition(), msg.offset(), msg.key(), msg.value()))
    consumer.close()
    assert len(done) == partitions, f"did not reach the end of {topic} in {timeout} s"
    return out


@contextmanager
def admin_client(env: FlowEnv) -> Iterator[ScoringClient]:
    """A real gRPC server on a free port over the flow's Redis, and an admin client of it
    (TCP, a fresh API key)."""
    import hashlib
    import secrets

    from crmscore.settings import Settings
    from serving.client import ScoringClient
    from serving.server import create_server

    key = secrets.token_urlsafe(24)
    settings = Settings.from_env(env.env(
        CRMSCORE_API_KEYS=f"admin:{hashlib.sha256(key.encode()).hexdigest()}",
        CRMSCORE_METRICS_PORT="0",
    ))
    server, port = create_server(settings, "127.0.0.1:0")
    server.start()
    try:
        with ScoringClient(f"127.0.0.1:{port}", key) as client:
            yield client
    finally:
        server.stop(0)


def resumes_after(conn: redis.Redis, layout: RedisLayout, fault_ended: float,
                  timeout: float = 120) -> float:
    """Seconds from the end of a fault (``time.monotonic()``) until the flow counts a newly
    consumed event: its recovery time. Call it right after the fault ends."""
    before = _consumed(conn, layout)
    deadline = fault_ended + timeout
    while time.monotonic() < deadline:
        if _consumed(conn, layout) > before:
            return time.monotonic() - fault_ended
        time.sleep(0.01)
    raise AssertionError(f"the flow consumed nothing for {timeout} s after the fault")


def _consumed(conn: redis.Redis, layout: RedisLayout) -> int:
    try:
        st = status(conn, layout)
    except redis.ConnectionError:
        return -1
    return -1 if st is None else int(st["events_consumed"])


def report_fault(fault: str, injected: int, st: dict[str, Any] | None, mismatches: int,
                 recovery_s: list[float]) -> None:
    """One row of the fault suite's table (scripts/faults): printed, and appended to the
    file named by CRMSCORE_FAULT_REPORT when set."""
    assert st is not None
    recovery = ", ".join(f"{s:.1f}" for s in recovery_s) or "-"
    row = (f"| {fault} | {injected} | {st['events_consumed']} | {st['events_applied']} | "
           f"{st['events_rejected']} | {st['events_duplicate']} | {mismatches} | {recovery} |")
    print(row)
    path = os.environ.get("CRMSCORE_FAULT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(row + "\n")


def publish(env: FlowEnv, lines: list[bytes] | Iterator[bytes], rate: float | None = None,
            count: int | None = None) -> None:
    """Publish ``lines`` (``count`` of them, if an iterator) to the env's topic (PARTITIONS
    partitions), keyed by customer."""
    from crmscore.replay import publish_lines
    from crmscore.settings import Settings

    settings = Settings.from_env(env.env(CRMSCORE_TOPIC_PARTITIONS=str(PARTITIONS)))
    published = publish_lines(settings, lines, rate=rate)
    assert published == (count if count is not None else len(lines))  # type: ignore[arg-type]


def check_final_state(env: FlowEnv, conn: redis.Redis, expected: Expected, n_lines: int) -> None:
    """Counts, every score document's aggregates and the dead letters are what the batch
    recomputation of the published lines says."""
    from tests.reference import mismatches

    st = status(conn, env.layout)
    assert st is not None
    assert st["events_consumed"] == n_lines
    assert st["events_applied"] == expected.applied
    assert st["events_duplicate"] == expected.duplicate
    assert st["events_rejected"] == expected.rejected
    assert st["events_consumed"] == (
        st["events_applied"] + st["events_rejected"] + st["events_duplicate"])

    docs = score_documents(conn, env.layout)
    assert set(docs) == set(expected.customers)
    problems = {cid: p for cid in docs
                if (p := mismatches(docs[cid], expected.customers[cid], expected.clock))}
    assert problems == {}, f"{len(problems)} customers differ, e.g. {next(iter(problems.items()))}"

    letters = read_topic(env.bootstrap, env.dlq, PARTITIONS)
    by_source = {}
    for _, _, _, value in letters:
        letter = orjson.loads(value)
        source = letter["source"]
        by_source[(source["partition"], source["offset"])] = letter
    assert all(letter["reason"]["code"] and letter["reason"]["message"]
               for letter in by_source.values())
    assert sorted(_payload(letter) for letter in by_source.values()) == sorted(
        expected.rejected_lines)


def _payload(letter: dict) -> bytes:
    import base64

    if letter["payload_encoding"] == "base64":
        return base64.b64decode(letter["payload"])
    return letter["payload"].encode()


def generated_stream(out: Path, customers: int, seed: int) -> tuple[list[bytes], set[int]]:
    """A stream from ``crmscore generate`` (duplicates, refunds, disorder and malformed
    events at its default rates) written to ``out``: its lines, and the indexes of the
    malformed ones (from the generator's ground truth)."""
    subprocess.run(
        [sys.executable, "-m", "crmscore.cli", "generate", "--customers", str(customers),
         "--seed", str(seed), "--out", str(out)],
        check=True, stdout=subprocess.DEVNULL,
    )
    truth = [orjson.loads(t) for t in Path(f"{out.with_suffix('')}.truth.jsonl").read_bytes()
             .splitlines()]
    return out.read_bytes().splitlines(), {t["malformed"]["line"] for t in truth
                                           if "malformed" in t}
