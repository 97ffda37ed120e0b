"""Redis outages: a frozen or stopped Redis gives UNAVAILABLE within the caller's
deadline (never a hang), health turns NOT_SERVING, and everything recovers by itself.

Each test runs its own private Redis so pausing it cannot break the shared one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
import redis

from crmscore.embedded import Server, start_redis
from serving.cache import LEASE_S
from tests.test_serving import (
    Running,
    score_doc,
    serving_settings,
    start,
    status_of,
    wait_for,
    write_score,
)

FAILED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@pytest.fixture
def api(private_redis: Server) -> Iterator[Running]:
    running = start(serving_settings(
        f"redis://{private_redis.address}/0", "out:", redis_timeout=0.3, health_interval=0.1))
    conn = redis.Redis.from_url(running.settings.redis_url)
    write_score(conn, running.layout, score_doc("c-1"))
    conn.close()
    yield running
    running.server.stop(0).wait(5)


def timed(call, *args, **kwargs) -> tuple[grpc.StatusCode, str, float]:
    started = time.monotonic()
    code, details = status_of(call, *args, **kwargs)
    return code, details, time.monotonic() - started


def test_frozen_redis_is_unavailable_within_the_deadline_then_recovers(api, private_redis):
    with api.client() as client:
        assert client.get_score("c-1").customer_id == "c-1"
        wait_for(lambda: client.health() == "SERVING", what="SERVING")
        private_redis.pause()
        try:
            # The cached c-1 may be served until the cache's lease runs out (serving.cache).
            time.sleep(LEASE_S)
            # Deadline longer than the server's Redis bound: UNAVAILABLE after ~0.3 s.
            code, details, elapsed = timed(client.get_score, "c-1", timeout=3)
            assert code == grpc.StatusCode.UNAVAILABLE, details
            assert "Redis unavailable" in details and elapsed < 1.5
            # Shorter deadline: the server gives up before it, never a hang.
            code, _, elapsed = timed(client.get_score, "c-1", timeout=0.15)
            assert code in FAILED and elapsed < 1.0
            code, _, elapsed = timed(client.batch_get_scores, ["c-1", "c-2"], timeout=3)
            assert code == grpc.StatusCode.UNAVAILABLE and elapsed < 1.5
            wait_for(lambda: client.health() == "NOT_SERVING", what="NOT_SERVING")
        finally:
            private_redis.resume()
        wait_for(lambda: client.health() == "SERVING", what="SERVING again")
        assert client.get_score("c-1").version == 1
        assert client.batch_get_scores(["c-1"]).scores[0].customer_id == "c-1"


def test_stopped_redis_is_unavailable_then_recovers_when_it_returns(api, private_redis):
    port = int(private_redis.address.rpartition(":")[2])
    with api.client() as client:
        assert client.get_score("c-1").customer_id == "c-1"
        private_redis.stop()
        code, details, elapsed = timed(client.get_score, "c-1", timeout=3)
        assert code == grpc.StatusCode.UNAVAILABLE, details
        assert elapsed < 1.5
        wait_for(lambda: client.health() == "NOT_SERVING", what="NOT_SERVING")
        revived = start_redis(port=port)
        try:
            conn = redis.Redis.from_url(api.settings.redis_url)
            write_score(conn, api.layout, score_doc("c-1", version=2))
            conn.close()
            wait_for(lambda: client.health() == "SERVING", what="SERVING again")
            assert client.get_score("c-1").version == 2
        finally:
            revived.stop()


def test_watch_survives_a_redis_restart(api, private_redis):
    port = int(private_redis.address.rpartition(":")[2])
    with api.client() as client:
        call = client.watch("c-1", timeout=20)
        try:
            assert next(call).version == 1
            private_redis.stop()
            time.sleep(0.3)
            revived = start_redis(port=port)
            try:
                conn = redis.Redis.from_url(api.settings.redis_url)
                # Written while the hub reconnects: delivered by publish or by resync.
                write_score(conn, api.layout, score_doc("c-1", version=5), publish=True)
                assert next(call).version == 5
                conn.close()
            finally:
                revived.stop()
        finally:
            call.cancel()
