"""The pipeline end to end: generated stream -> real broker -> real flow -> real Redis.

A ~20k-event stream with duplicates, refunds, disorder and ~2% malformed events
is replayed; the flow's score documents must equal a batch recomputation from
the file for every customer, the DLQ must hold exactly the malformed events, and
the status counts must add up. Then the same with the flow SIGKILLed mid-stream.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Iterator

import orjson
import pytest
import redis

from crmscore.doc_codec import ZSTD_MAGIC
from crmscore.embedded import Server
from crmscore.replay import TokenBucket
from tests.pipeline import (
    PARTITIONS,
    FlowEnv,
    admin_client,
    check_final_state,
    generated_stream,
    kill,
    publish,
    read_topic,
    report_fault,
    resumes_after,
    score_documents,
    status,
    wait_for_consumed,
    wait_until_settled,
)
from tests.reference import Expected, recompute

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[bytes], Expected]:
    lines, malformed = generated_stream(tmp_path_factory.mktemp("data") / "events.jsonl",
                                        customers=1800, seed=11)
    assert 15_000 <= len(lines) <= 40_000, len(lines)
    assert len(malformed) >= 0.01 * len(lines)
    return lines, recompute(lines, malformed)


def test_flow_matches_recomputation(broker, redis_url, unique, tmp_path, dataset):
    lines, expected = dataset
    env = FlowEnv(broker.address, redis_url, unique, tmp_path / "recovery")
    publish(env, lines)
    proc = env.start_flow("--until-end")
    assert proc.wait(300) == 0
    conn = redis.Redis.from_url(redis_url)
    check_final_state(env, conn, expected, len(lines))
    stored = stored_documents(conn, env)
    assert stored and all(raw.startswith(ZSTD_MAGIC) for raw in stored.values())
    letters = read_topic(env.bootstrap, env.dlq, PARTITIONS)
    assert len(letters) == expected.rejected  # uninterrupted: no re-delivered letters
    assert {orjson.loads(v)["reason"]["code"] for *_, v in letters} >= {
        "not_json", "not_object", "schema_violation", "amount_not_finite", "future_event",
        "conflicting_duplicate"}
    check_grpc_serves_the_same(env, expected)


def stored_documents(conn: redis.Redis, env: FlowEnv) -> dict[bytes, bytes]:
    """Every score document as stored (crmscore/doc_codec.py), by key."""
    keys = list(conn.scan_iter(match=env.layout.score_pattern(), count=1000))
    return dict(zip(keys, (conn.hget(k, "doc") for k in keys), strict=True))


def check_grpc_serves_the_same(env: FlowEnv, expected: Expected) -> None:
    """GetScore over real gRPC (TCP, API key) returns what the recomputation says."""
    import grpc

    with admin_client(env) as client:
        for customer_id, want in expected.customers.items():
            score = client.get_score(customer_id)
            assert score.customer_id == customer_id
            assert score.rfm.frequency == want["purchase_count"]
            assert abs(score.rfm.monetary - want["net_monetary"]) < 1e-6
            assert score.as_of.ToMicroseconds() / 1e6 >= want["as_of"] - 1e-6
        st = client.pipeline_status()
        assert (st.events_applied, st.events_rejected, st.events_duplicate) == (
            expected.applied, expected.rejected, expected.duplicate)
        for bad, code in (("nobody-" + env.token, grpc.StatusCode.NOT_FOUND),
                          ("", grpc.StatusCode.INVALID_ARGUMENT),
                          ("x" * 129, grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(grpc.RpcError) as err:
                client.get_score(bad)
            assert err.value.code() == code


def test_flow_killed_mid_stream_ends_exact(broker, redis_url, unique, tmp_path, dataset):
    lines, expected = dataset
    env = FlowEnv(broker.address, redis_url, unique, tmp_path / "recovery")
    conn = redis.Redis.from_url(redis_url)
    rng = random.Random(5)
    # A first slice, then the rest from the moment the first flow is up (its start-up
    # time varies): at 1,200 events/s, while the flow is killed three times at random.
    # Each kill waits for the restarted flow to consume again (4-9 s on a slow 2-core
    # box), so the last 2,000 events only trickle in (20/s) until the third kill is over:
    # every kill is mid-stream, and there is always a new event to consume, whatever the
    # machine's speed.
    head, reserve = 200, 2000
    publish(env, lines[:head])
    proc = env.start_flow()
    wait_for_consumed(conn, env.layout, 1, proc)  # the first flow is up and applying
    kills_done = threading.Event()

    def rest() -> Iterator[bytes]:
        bucket = TokenBucket(1200.0)
        for line in lines[head:-reserve]:
            bucket.take()
            yield line
        for line in lines[-reserve:]:
            kills_done.wait(0.05)
            yield line

    publisher = threading.Thread(target=publish, args=(env, rest()),
                                 kwargs={"count": len(lines) - head})
    publisher.start()
    recoveries = []
    for _ in range(3):
        time.sleep(rng.uniform(1.0, 1.8))
        assert publisher.is_alive(), "the stream ended before the kill: not mid-stream"
        assert kill(proc) == -signal.SIGKILL
        proc = env.start_flow()
        recoveries.append(resumes_after(conn, env.layout, time.monotonic()))
    kills_done.set()
    publisher.join()
    wait_for_consumed(conn, env.layout, len(lines), proc)
    time.sleep(1.0)  # a double count would show up as consumed > lines
    kill(proc, signal.SIGTERM)
    check_final_state(env, conn, expected, len(lines))
    report_fault("flow SIGKILL + restart, at random moments", len(recoveries),
                 status(conn, env.layout), 0, recoveries)


def test_restart_resumes_from_snapshot(broker, redis_url, unique, tmp_path, dataset):
    """A stopped flow continues where it stopped: nothing re-read, nothing counted twice.
    The first run stores plain JSON documents, the second compresses (an upgrade): the
    store holds both, and both are read."""
    lines, expected = dataset
    env = FlowEnv(broker.address, redis_url, unique, tmp_path / "recovery")
    half = len(lines) // 2
    publish(env, lines[:half])
    assert env.start_flow("--until-end", CRMSCORE_DOC_COMPRESSION="off").wait(300) == 0
    conn = redis.Redis.from_url(redis_url)
    assert status(conn, env.layout)["events_consumed"] == half
    plain = stored_documents(conn, env)
    assert plain and all(raw.startswith(b"{") for raw in plain.values())
    publish(env, lines[half:])
    assert env.start_flow("--until-end").wait(300) == 0
    check_final_state(env, conn, expected, len(lines))
    kinds = {raw[:1] for raw in stored_documents(conn, env).values()}
    assert ZSTD_MAGIC[:1] in kinds  # and JSON for any customer untouched since
    check_grpc_serves_the_same(env, expected)
    # Had the second run started over, the first half's dead letters would be sent twice.
    assert len(read_topic(env.bootstrap, env.dlq, PARTITIONS)) == expected.rejected


def freeze_mid_stream(env: FlowEnv, conn: redis.Redis, server: Server, lines: list[bytes],
                      rate: float, what: str) -> float:
    """Publish ``lines`` at ``rate`` while the flow runs; freeze ``server`` (SIGSTOP) for
    10 s a third of the way in; wait for the flow to consume everything, then stop it.
    Returns the flow's recovery time after the freeze."""
    publisher = threading.Thread(target=publish, args=(env, lines, rate))
    proc = env.start_flow()
    publisher.start()
    wait_for_consumed(conn, env.layout, len(lines) // 3, proc)
    server.pause()
    time.sleep(10)
    assert proc.poll() is None, f"the flow must wait for {what}, not die"
    server.resume()
    recovery = resumes_after(conn, env.layout, time.monotonic())
    publisher.join()
    wait_for_consumed(conn, env.layout, len(lines), proc)
    time.sleep(1.0)  # a double count would show up as consumed > lines
    kill(proc, signal.SIGTERM)
    return recovery


def test_flow_rides_out_a_frozen_redis(broker, unique, tmp_path, dataset):
    """Redis frozen mid-stream: the sink backs off and retries; nothing lost or doubled."""
    from crmscore.embedded import start_redis

    lines, expected = dataset
    private = start_redis()
    try:
        url = f"redis://{private.address}/0"
        env = FlowEnv(broker.address, url, unique, tmp_path / "recovery")
        conn = redis.Redis.from_url(url)
        # 10 s: longer than the sink's 5 s socket timeout, so its retries kick in
        recovery = freeze_mid_stream(env, conn, private, lines, 8000.0, "Redis")
        check_final_state(env, conn, expected, len(lines))
        report_fault("Redis frozen (SIGSTOP) 10 s mid-stream", 1, status(conn, env.layout), 0,
                     [recovery])
    finally:
        private.stop()


def test_flow_rewrites_what_a_redis_restarted_empty_lost(broker, unique, tmp_path, dataset):
    """Redis restarted empty (it keeps nothing on disk), mid-stream and again once the
    flow is idle: the flow notices its marker key is gone, restarts itself from its last
    snapshot and rewrites every score document, so Redis ends as if nothing had been
    lost (flows/store_marker.py)."""
    from crmscore.embedded import start_redis

    lines, expected = dataset
    private = start_redis()
    port = int(private.address.rsplit(":", 1)[1])
    url = f"redis://{private.address}/0"
    env = FlowEnv(broker.address, url, unique, tmp_path / "recovery")

    def empty_redis() -> redis.Redis:
        nonlocal private
        private.stop()
        private = start_redis(port=port)  # same address, nothing in it
        return redis.Redis.from_url(url)

    try:
        publisher = threading.Thread(target=publish, args=(env, lines, 8000.0))
        proc = env.start_flow()
        publisher.start()
        wait_for_consumed(redis.Redis.from_url(url), env.layout, len(lines) // 3, proc)
        conn = empty_redis()  # mid-stream
        recoveries = [resumes_after(conn, env.layout, time.monotonic())]
        publisher.join()
        wait_for_consumed(conn, env.layout, len(lines), proc)
        wait_until_settled(conn, env)
        conn = empty_redis()  # idle: only the rewrite can bring the documents back
        emptied = time.monotonic()
        # The old process's status heartbeat lands before it notices the loss and restarts:
        # wait for the documents themselves.
        deadline = emptied + 60
        while (len(score_documents(conn, env.layout)) < len(expected.customers)
               and time.monotonic() < deadline):
            time.sleep(0.2)
        recoveries.append(time.monotonic() - emptied)
        wait_until_settled(conn, env, quiet_s=2.0)
        assert proc.poll() is None, "the flow restarts itself in place, it does not exit"
        kill(proc, signal.SIGTERM)
        log = b"".join(p.read_bytes() for p in tmp_path.glob("flow-*.log"))
        assert log.count(b"Redis lost the flow's data") >= 2
        check_final_state(env, conn, expected, len(lines))
        report_fault("Redis restarted empty, mid-stream and idle", 2, status(conn, env.layout),
                     0, recoveries)
    finally:
        private.stop()


def test_flow_rides_out_a_frozen_broker(redis_url, unique, tmp_path, dataset):
    """The broker frozen (SIGSTOP) 10 s mid-stream: the flow's consumer and producers wait
    and reconnect; nothing lost or doubled."""
    from crmscore.embedded import start_broker

    lines, expected = dataset
    private = start_broker()
    try:
        env = FlowEnv(private.address, redis_url, unique, tmp_path / "recovery")
        conn = redis.Redis.from_url(redis_url)
        recovery = freeze_mid_stream(env, conn, private, lines, 4000.0, "the broker")
        check_final_state(env, conn, expected, len(lines))
        report_fault("broker frozen (SIGSTOP) 10 s mid-stream", 1, status(conn, env.layout), 0,
                     [recovery])
    finally:
        private.stop()
