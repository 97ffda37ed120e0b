"""The score sink on a single real Redis (flows/redis_sink.py): a batch is sent without
waiting, confirmed at the next batch or at the end of the epoch (``snapshot``), never
goes back a version, and is written again when Redis did not confirm it."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Iterator

import orjson
import pytest
import redis

from crmscore.embedded import Server
from crmscore.layout import RedisLayout
from crmscore.settings import Settings
from flows.redis_sink import WRITE_IF_NEWER, RedisDocSink, VersionedDoc
from flows.store_marker import claim_store


@pytest.fixture
def conn(private_redis: Server) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(f"redis://{private_redis.address}/0")
    yield client
    client.close()


def test_sink_writes_without_waiting_confirms_at_the_epochs_end_and_never_goes_back(
        private_redis, conn):
    settings = Settings(redis_url=f"redis://{private_redis.address}/0", redis_prefix="t:")
    layout = RedisLayout(settings.redis_prefix)
    claim_store(conn, layout)
    lost: list[str] = []
    sink = RedisDocSink(settings, on_lost=lost.append).build_part("redis", "0", None)
    conn.script_flush()  # a fresh Redis: the first script call meets NOSCRIPT

    def doc(cid: str, version: int, channel: str = "") -> VersionedDoc:
        return VersionedDoc(layout.score(cid), version, orjson.dumps({"v": version}), channel)

    def versions() -> dict[str, int]:
        return {c: int(conn.hget(layout.score(c), "v") or -1) for c in ids}

    ids = [f"c{i}" for i in range(600)]
    sink.write_batch([doc(c, 5) for c in ids])  # sent; refused for want of the script
    sink.snapshot()  # ... so written again, script loaded, and confirmed
    assert versions() == dict.fromkeys(ids, 5)

    # Redis restarted and forgot its scripts; the batch mixes older versions (never
    # written), newer ones, and the same key twice.
    conn.script_flush()
    batch = [doc(c, 3) for c in ids] + [doc(c, 7) for c in ids[::2]] + [doc(c, 6) for c in ids[::2]]
    random.Random(1).shuffle(batch)
    sink.write_batch(batch)
    sink.write_batch([doc(ids[1], 8)])  # the next batch confirms the one before first
    assert versions() == {c: 8 if c == ids[1] else 7 if i % 2 == 0 else 5
                          for i, c in enumerate(ids)}
    sink.snapshot()

    # The sink's connection dropped while idle: the next batch finds out and is redone.
    assert conn.client_kill_filter(_type="normal", skipme=True) >= 1
    sink.write_batch([doc(c, 9) for c in ids[:10]])
    sink.snapshot()
    assert [versions()[c] for c in ids[:10]] == [9] * 10

    # A document is published as soon as Redis runs the batch, before any confirmation.
    pubsub = conn.pubsub()
    pubsub.subscribe(layout.updates(ids[2]))
    try:
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
        sink.write_batch([doc(ids[2], 10, layout.updates(ids[2]))])
        message = pubsub.get_message(timeout=5)
        assert message is not None and message["data"] == b'{"v":10}'
    finally:
        pubsub.close()
    sink.snapshot()
    assert lost == []

    conn.delete(layout.store_marker())  # Redis lost the flow's data
    sink.write_batch([doc(ids[0], 11)])
    sink.snapshot()
    assert lost == [layout.store_marker()]
    sink.close()


def test_sink_waits_out_a_frozen_redis_and_loses_nothing(private_redis, conn, caplog):
    settings = Settings(redis_url=f"redis://{private_redis.address}/0", redis_prefix="t:")
    layout = RedisLayout(settings.redis_prefix)
    claim_store(conn, layout)
    conn.script_load(WRITE_IF_NEWER)
    sink = RedisDocSink(settings).build_part("redis", "0", None)
    docs = [VersionedDoc(layout.score(f"c{i}"), 1, b"{}") for i in range(50)]
    private_redis.pause()  # SIGSTOP: the batch is sent, its replies do not come
    thawed = threading.Timer(6.0, private_redis.resume)  # after the 5 s socket timeout
    thawed.start()
    try:
        sink.write_batch(docs)
        with caplog.at_level(logging.WARNING, logger="flows.redis_sink"):
            sink.snapshot()  # waits, times out, writes the batch again once Redis is back
    finally:
        thawed.join()
    assert "Redis write of 50 documents failed" in caplog.text
    assert all(conn.hget(d.key, "v") == b"1" for d in docs)
    sink.close()


def test_a_partition_never_written_never_connects() -> None:
    """A process lists 64 sink partitions and writes through one (flows/own_sink.py):
    the others make no client, not even a cluster client that reads the slot map."""
    nowhere = Settings(redis_url="redis://127.0.0.1:1/0", redis_cluster=True)
    part = RedisDocSink(nowhere).build_part("redis", "5", None)
    part.snapshot()
    part.close()
