"""A partition read ahead of another does not time customers out (flows/watermark.py).

Against the real broker, the real flow process and a real Redis: customer Y's year goes
into partition 1 and is read in full, while customer X (partition 0) has bought once,
on day 0, and buys again on day 60, published only after Y's year was read. With the
clock at the newest event time read anywhere (day 200), X's churn label opened on day 0
matured as "no purchase" on day 90 before X's day-60 purchase was read. With the
watermark the clock waits for partition 0, and the label matures as it should: 0, on
day 60.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import orjson
import pytest
import redis

from crmscore.clients import ensure_topics, producer
from crmscore.settings import Settings
from models.transaction import format_time
from tests.pipeline import (
    FlowEnv,
    epoch,
    kill,
    status,
    wait_for_consumed,
    wait_until_settled,
)

pytestmark = [pytest.mark.e2e]

DAY0 = datetime(2024, 1, 1, 12, tzinfo=UTC)
IDLE_SECONDS = 20  # far longer than the test needs to publish X's second purchase


def purchase(customer: str, day: int) -> bytes:
    return orjson.dumps({
        "event_id": f"{customer}-{day}", "customer_id": customer, "type": "purchase",
        "occurred_at": (DAY0 + timedelta(days=day)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "amount": 25.0, "currency": "EUR",
    })


def at(day: int) -> str:
    return format_time(round((DAY0 + timedelta(days=day)).timestamp() * 1e6))


def test_a_partition_read_ahead_does_not_mature_labels_of_a_slower_one(
        broker, redis_url, unique, tmp_path):
    env = FlowEnv(broker.address, redis_url, unique, tmp_path / "recovery")
    settings = Settings.from_env(env.env(CRMSCORE_TOPIC_PARTITIONS="2"))
    ensure_topics(settings, [env.topic])
    kafka = producer(settings)

    def publish(customer: str, partition: int, days: list[int]) -> None:
        for day in days:
            kafka.produce(env.topic, purchase(customer, day), customer.encode(),
                          partition=partition)
        assert kafka.flush(30) == 0

    y_days = [0, 40, 80, 120, 160, 200]
    publish("x", 0, [0])
    publish("y", 1, y_days)
    conn = redis.Redis.from_url(redis_url)
    proc = env.start_flow(CRMSCORE_PARTITION_IDLE_SECONDS=str(IDLE_SECONDS),
                          CRMSCORE_MODEL_PUBLISH_SECONDS="0.5")
    try:
        st = wait_for_consumed(conn, env.layout, 1 + len(y_days), proc)
        read_at = time.monotonic()
        # Partition 0 holds the clock at X's day 0, although day 200 has been read.
        assert st["partition_clocks"] == {"0": at(0), "1": at(200)}
        assert st["stream_clock"] == at(0)
        publish("x", 0, [60])
        assert time.monotonic() - read_at < IDLE_SECONDS / 2, "too slow to show anything"
        st = wait_for_consumed(conn, env.layout, 2 + len(y_days), proc)
        # Both partitions go quiet: the clock moves on to everything read, day 200.
        deadline = time.monotonic() + IDLE_SECONDS + 60
        while (st or {}).get("stream_clock") != at(200) and time.monotonic() < deadline:
            time.sleep(0.2)
            st = status(conn, env.layout)
        assert st is not None and st["stream_clock"] == at(200)
        docs = wait_until_settled(conn, env)
        report = wait_for_labels(conn, env, 7)
    finally:
        kill(proc)

    x = docs["x"]
    assert x["purchase_count"] == 2
    assert epoch(x["as_of"]) > epoch(at(150))  # the clock passed X's second horizon
    # Y's five gaps of 40 days: five 0s. X: the day-0 prediction 0 (bought on day 60),
    # the day-60 one 1 (silent past day 150). The old clock gave X's day-0 prediction a 1.
    metrics = report["metrics"]
    assert metrics["churn_labels"] == 7
    assert metrics["churn_positive_rate"] == pytest.approx(1 / 7)


def wait_for_labels(conn: redis.Redis, env: FlowEnv, labels: int,
                    timeout: float = 60) -> dict:
    """The model report once it counts ``labels`` matured labels (published every 0.5 s)."""
    deadline = time.monotonic() + timeout
    report: dict = {}
    while time.monotonic() < deadline:
        raw = conn.hget(env.layout.model_report(), "doc")
        report = orjson.loads(raw) if raw else {}
        if report.get("metrics", {}).get("churn_labels", 0) >= labels:
            return report
        time.sleep(0.2)
    raise AssertionError(f"the model report never counted {labels} labels: {report}")


def test_a_stalled_read_does_not_let_the_clock_pass_unread_events(redis_url, unique, tmp_path):
    """A partition is caught up when read to its end, not when it stops delivering.

    Partition 1 holds customer Y's year (read in a moment); partition 0 a backlog of
    30,000 purchases of days 0-59, then X's purchase on day 60. The broker is frozen
    while partition 0 is being read: its consumer delivers what it had prefetched, then
    nothing. Two things used to let the clock run to Y's day 200 past partition 0's
    unread events: partition 1's counts arriving first, before partition 0 was heard
    from at all (at the start), and partition 0 silent for
    ``CRMSCORE_PARTITION_IDLE_SECONDS`` with events unread (the freeze; any stall did it:
    Redis frozen, a long pause of the worker). Both failed this test before the flow
    named its partitions and used their ends (flows/watermark.py). Meanwhile the status
    shows how far partition 0 trails (``partition_lag_seconds``).
    """
    from crmscore.embedded import start_broker

    private = start_broker()
    try:
        env = FlowEnv(private.address, redis_url, unique, tmp_path / "recovery")
        settings = Settings.from_env(env.env(CRMSCORE_TOPIC_PARTITIONS="2"))
        ensure_topics(settings, [env.topic])
        kafka = producer(settings)
        publishing = time.time()
        backlog = 30_000
        for i in range(backlog):
            kafka.produce(env.topic, purchase(f"b{i % 3000}", i * 60 // backlog), b"b",
                          partition=0)
            if i % 1000 == 0:
                kafka.poll(0)
        kafka.produce(env.topic, purchase("x", 60), b"x", partition=0)
        for day in (0, 40, 80, 120, 160, 200):
            kafka.produce(env.topic, purchase("y", day), b"y", partition=1)
        assert kafka.flush(30) == 0
        published = time.time()
        total = backlog + 7

        conn = redis.Redis.from_url(redis_url)
        proc = env.start_flow(CRMSCORE_PARTITION_IDLE_SECONDS="1.0",
                              CRMSCORE_MODEL_PUBLISH_SECONDS="0.5")
        try:
            st = wait_for_consumed(conn, env.layout, 2_000, proc)
            # Both partitions heard from (one consumer fetches for both: partition 1's
            # few events may come after thousands of partition 0's), so that the clock
            # has started before the freeze.
            deadline = time.monotonic() + 30
            while st["stream_clock"] is None and time.monotonic() < deadline:
                time.sleep(0.005)
                st = status(conn, env.layout) or st
            assert st["stream_clock"] is not None, st
            private.pause()
            clocks, lags = [], []
            try:
                deadline = time.monotonic() + 8  # the prefetched messages, then silence
                while time.monotonic() < deadline:
                    st = status(conn, env.layout) or st
                    clocks.append((st["events_consumed"], st["stream_clock"]))
                    lags.append((st["events_consumed"], epoch(st["updated_at"]),
                                 st["partition_lag_seconds"]))
                    time.sleep(0.1)
            finally:
                private.resume()
            st = wait_for_consumed(conn, env.layout, total, proc)
            # Read in full: the heartbeat (every 5 s) says that neither partition lags.
            deadline = time.monotonic() + 30
            while st["input_lag_seconds"] != 0 and time.monotonic() < deadline:
                time.sleep(0.2)
                st = status(conn, env.layout) or st
        finally:
            kill(proc)
    finally:
        private.stop()
    stalled = [(n, clock) for n, clock in clocks if n < total]
    assert stalled, "partition 0 was read in full before the broker froze: nothing shown"
    assert all(epoch(clock) <= epoch(at(60)) for _, clock in stalled), stalled[-3:]
    assert st["events_consumed"] == total
    # Partition 0 lags while it stalls, by the age of its newest message read when the
    # status was written (the broker's timestamp: published within [publishing,
    # published]); once read in full, and a heartbeat later, by nothing.
    stalled_lags = [(at, lag["0"]) for n, at, lag in lags if n < total]
    assert stalled_lags
    assert all(at - published - 0.01 <= lag <= at - publishing + 0.01
               for at, lag in stalled_lags), (publishing, published, stalled_lags[-3:])
    assert st["partition_lag_seconds"] == {"0": 0.0, "1": 0.0}, st
    assert st["input_lag_seconds"] == 0.0
