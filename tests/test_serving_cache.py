"""The server's score cache against a real, private Redis: hits come from memory, and a
write, delete or flush in Redis reaches the cache through Redis's invalidation messages;
a reply overtaken by an invalidation is not cached; a lost invalidation connection
empties the cache, and a new one resumes it; a Redis user refused tracking gets every
score from Redis, with one warning.

Each test runs its own Redis: they flush it and kill its clients.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import redis

from crmscore.embedded import Server
from serving.cache import LEASE_S, ScoreCache
from serving.metrics import CACHE_LOOKUPS
from serving.server import score_cache
from tests.test_serving import (
    Running,
    score_doc,
    serving_settings,
    start,
    status_of,
    wait_for,
    write_score,
)


@pytest.fixture
def api(private_redis: Server) -> Iterator[Running]:
    running = start(serving_settings(f"redis://{private_redis.address}/0", "cache:"))
    assert running.server.cache is not None
    wait_for(lambda: running.server.cache.live, what="the cache's lease")
    yield running
    running.server.stop(0).wait(5)


@pytest.fixture
def conn(api: Running) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(api.settings.redis_url)
    yield c
    c.close()


def hits() -> float:
    return CACHE_LOOKUPS.labels("hit")._value.get()  # type: ignore[no-any-return]


def from_memory(call: Any, *args: Any) -> Any:
    """``call(*args)`` repeated until one answer comes from the cache, that answer. (On a
    loaded machine the cache's lease may lapse for a moment: calls then read Redis.)"""
    for _ in range(100):
        before = hits()
        answer = call(*args)
        if hits() > before:
            return answer
        time.sleep(0.02)
    raise AssertionError("no answer came from the cache")


def test_a_second_ask_is_answered_from_memory(api, conn):
    write_score(conn, api.layout, score_doc("c-1"))
    with api.client() as client:
        first = client.get_score("c-1")
        assert "c-1" in api.server.cache
        again = from_memory(client.get_score, "c-1")
    assert again == first and again.customer_id == "c-1"


def test_a_cached_score_follows_each_write_and_delete(api, conn):
    write_score(conn, api.layout, score_doc("c-1", version=1))
    with api.client() as client:
        assert client.get_score("c-1").version == 1
        assert from_memory(client.get_score, "c-1").version == 1
        write_score(conn, api.layout, score_doc("c-1", version=2))
        # Any hit after the lease proves the invalidation of that write arrived first.
        time.sleep(LEASE_S)
        assert client.get_score("c-1").version == 2
        assert client.batch_get_scores(["c-1"]).scores[0].version == 2
        conn.delete(api.layout.score("c-1"))
        time.sleep(LEASE_S)
        code, _ = status_of(client.get_score, "c-1")
        assert code == grpc.StatusCode.NOT_FOUND


def test_batches_mix_cached_and_read_scores_in_order(api, conn):
    cache = api.server.cache
    for n in (1, 2, 3):
        write_score(conn, api.layout, score_doc(f"c-{n}", version=n))
    with api.client() as client:
        wait_for(lambda: client.get_score("c-2") and "c-2" in cache, what="c-2 cached")
        reply = from_memory(client.batch_get_scores, ["c-3", "c-2", "nobody", "c-1", "c-3"])
        assert [s.customer_id for s in reply.scores] == ["c-3", "c-2", "c-1"]
        assert [s.version for s in reply.scores] == [3, 2, 1]
        assert list(reply.missing_ids) == ["nobody"]
    assert "c-1" in cache and "c-3" in cache and "nobody" not in cache


def test_a_flush_empties_the_cache(api, conn):
    cache = api.server.cache
    ids = [f"c-{n}" for n in range(5)]
    for customer_id in ids:
        write_score(conn, api.layout, score_doc(customer_id))
    with api.client() as client:
        wait_for(lambda: client.batch_get_scores(ids) and all(c in cache for c in ids),
                 what="the scores cached")
        conn.flushdb()
        wait_for(lambda: len(cache) == 0, what="the flush's invalidation")
        code, _ = status_of(client.get_score, "c-0")
        assert code == grpc.StatusCode.NOT_FOUND


def live_redirect(cache: ScoreCache) -> int:
    wait_for(lambda: cache.redirect() is not None, what="the cache's lease")
    redirect = cache.redirect()
    assert redirect is not None
    return redirect


def test_a_reply_overtaken_by_an_invalidation_is_not_cached(api, conn):
    cache, store = api.server.cache, api.server.store
    write_score(conn, api.layout, score_doc("c-1", version=1))
    redirect = live_redirect(cache)
    reservation = cache.reserve("c-1", redirect)
    docs, tracked = store.get_tracked(["c-1"], redirect)
    assert reservation is not None and tracked and docs[0] is not None
    write_score(conn, api.layout, score_doc("c-1", version=2))  # after the read
    wait_for(lambda: cache._entries.get("c-1") is not reservation,
             what="the invalidation dropping the reservation")
    cache.fill("c-1", reservation, b"version 1")
    assert "c-1" not in cache

    # Without a write in between, the same steps cache the reply.
    reservation = cache.reserve("c-1", redirect)
    assert reservation is not None
    store.get_tracked(["c-1"], redirect)
    cache.fill("c-1", reservation, b"version 2")
    assert "c-1" in cache
    wait_for(lambda: cache.lookup("c-1") == b"version 2", what="a hit")


def test_a_read_tracked_for_a_gone_connection_is_not_cached(api):
    docs, tracked = api.server.store.get_tracked(["c-1"], redirect=10**9)  # no such client
    assert docs == [None] and not tracked


def test_a_lost_invalidation_connection_empties_the_cache_and_a_new_one_resumes(api, conn):
    cache = api.server.cache
    write_score(conn, api.layout, score_doc("c-1", version=1))
    with api.client() as client:
        wait_for(lambda: client.get_score("c-1") and "c-1" in cache, what="c-1 cached")
        old = live_redirect(cache)
        conn.execute_command("CLIENT", "KILL", "ID", old)
        wait_for(lambda: cache.redirect() not in (None, old), what="a new connection")
        assert "c-1" not in cache
        # Caching resumes, and the reading connections track for the new connection.
        wait_for(lambda: client.get_score("c-1").version == 1 and "c-1" in cache,
                 what="c-1 cached again")
        write_score(conn, api.layout, score_doc("c-1", version=2))
        wait_for(lambda: "c-1" not in cache, what="the invalidation on the new connection")
        assert client.get_score("c-1").version == 2


def test_the_cache_can_be_turned_off_and_is_off_on_a_cluster(private_redis):
    url = f"redis://{private_redis.address}/0"
    assert score_cache(serving_settings(url, "x:", score_cache_size=0)) is None
    assert score_cache(serving_settings(url, "x:", redis_cluster=True)) is None
    running = start(serving_settings(url, "off:", score_cache_size=0))
    assert running.server.cache is None
    conn = redis.Redis.from_url(url)
    try:
        write_score(conn, running.layout, score_doc("c-1", version=1))
        with running.client() as client:
            assert client.get_score("c-1").version == 1
            write_score(conn, running.layout, score_doc("c-1", version=2))
            assert client.get_score("c-1").version == 2  # no lease to wait for
    finally:
        conn.close()
        running.server.stop(0).wait(5)


def test_entries_beyond_the_size_go_least_recently_used_first(private_redis):
    cache = ScoreCache(serving_settings(f"redis://{private_redis.address}/0", "lru:"), 2)
    cache.start()
    try:
        redirect = live_redirect(cache)
        for name in ("a", "b"):
            reservation = cache.reserve(name, redirect)
            assert reservation is not None
            cache.fill(name, reservation, name.encode())
        wait_for(lambda: cache.lookup("a") == b"a", what="a hit")  # "b" is now the LRU one
        reservation = cache.reserve("c", redirect)
        assert reservation is not None
        cache.fill("c", reservation, b"c")
        assert ("a" in cache, "b" in cache, "c" in cache) == (True, False, True)
    finally:
        cache.stop()


def start_as(private_redis: Server, rights: str, prefix: str) -> tuple[Running, redis.Redis]:
    """A server reading Redis as a user with ``rights`` (ACL rules), and an admin client."""
    admin = redis.Redis.from_url(f"redis://{private_redis.address}/0")
    admin.execute_command("ACL", "SETUSER", prefix, "on", ">secret", "~*", "&*", "+@all",
                          *rights.split())
    url = f"redis://{prefix}:secret@{private_redis.address}/0"
    return start(serving_settings(url, f"{prefix}:")), admin


def serves_every_write(running: Running, admin: redis.Redis) -> None:
    write_score(admin, running.layout, score_doc("c-1", version=1))
    with running.client() as client:
        for _ in range(3):
            assert client.get_score("c-1").version == 1
        write_score(admin, running.layout, score_doc("c-1", version=2))
        assert client.get_score("c-1").version == 2  # never cached: no lease to wait for
    assert running.server.cache is not None and len(running.server.cache) == 0


def warnings_with(caplog: Any, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records if r.name == "serving.cache")


def test_a_redis_user_refused_tracking_gets_every_score_and_one_warning(
        private_redis, caplog):
    caplog.set_level("WARNING", logger="serving.cache")
    running, admin = start_as(private_redis, "-client +client|id", "notracking")
    try:
        cache = running.server.cache
        wait_for(lambda: cache.live, what="the cache's lease")  # CLIENT ID, SUBSCRIBE, PING
        serves_every_write(running, admin)
        assert warnings_with(caplog, "refuses CLIENT TRACKING") == 1
    finally:
        admin.close()
        running.server.stop(0).wait(5)


def test_a_redis_user_refused_the_invalidation_connection_gets_every_score(
        private_redis, caplog):
    caplog.set_level("WARNING", logger="serving.cache")
    running, admin = start_as(private_redis, "-client", "noclient")
    try:
        wait_for(lambda: warnings_with(caplog, "Redis refuses its invalidation") == 1,
                 what="the cache giving up")
        serves_every_write(running, admin)
        assert not running.server.cache.live
        time.sleep(0.3)  # it gave up for good: no retry, no second warning
        assert warnings_with(caplog, "Redis refuses its invalidation") == 1
    finally:
        admin.close()
        running.server.stop(0).wait(5)
