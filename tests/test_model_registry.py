"""The model registry against the real Redis: live and frozen bundle caches, promotion,
and the publish throttle that lets the single-key steps publish their last change."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
import redis

from crmscore.cli import main as cli_main
from crmscore.layout import RedisLayout
from flows.model_registry import (
    BundleCache,
    ModelRegistryError,
    bundle_doc,
    load_published,
    updates_mode,
)
from flows.redis_sink import PublishThrottle
from models.scoring import ModelBundle


def publish(conn: redis.Redis, layout: RedisLayout, version: int, *, frozen: bool = False
            ) -> None:
    doc = bundle_doc(layout, ModelBundle(version=version, model_version=f"test@v{version}"),
                     frozen=frozen)
    conn.hset(doc.key, mapping={"v": doc.version, "doc": doc.doc})


def test_a_live_cache_follows_new_bundles_and_a_frozen_one_keeps_its_first(
        redis_conn, unique):
    layout = RedisLayout(f"t{unique}:")
    publish(redis_conn, layout, 3)
    live = BundleCache(redis_conn, layout, ModelBundle(), refresh_seconds=0.0)
    frozen = BundleCache(redis_conn, layout, ModelBundle(), refresh_seconds=0.0, frozen=True)
    assert live.get().version == frozen.get().version == 3
    publish(redis_conn, layout, 4)
    assert live.get().version == 4
    assert frozen.get().version == 3 and frozen.frozen and not live.frozen


def test_a_frozen_cache_without_a_bundle_serves_the_cold_start_priors(redis_conn, unique):
    cache = BundleCache(redis_conn, RedisLayout(f"t{unique}:"), ModelBundle(version=0),
                        frozen=True)
    assert cache.get().version == 0 and cache.get().model_version == "prior:base_rate"


def test_a_frozen_start_without_redis_is_refused_not_run_on_priors():
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    with pytest.raises(ModelRegistryError, match="cannot read"):
        BundleCache(dead, RedisLayout("x:"), ModelBundle(), frozen=True)


def test_updates_mode_names_the_setting_when_wrong():
    assert updates_mode(" Frozen ") == "frozen"
    with pytest.raises(ModelRegistryError, match="CRMSCORE_MODEL_UPDATES"):
        updates_mode("sometimes")


def test_promote_serves_a_newer_candidate_only(redis_conn, redis_url, unique, capsys):
    layout = RedisLayout(f"t{unique}:")
    args = ["models", "promote", "--redis-url", redis_url, "--redis-prefix", layout.prefix]
    assert cli_main(args) == 1  # no candidate yet
    publish(redis_conn, layout, 5)
    publish(redis_conn, layout, 7, frozen=True)
    assert cli_main(args) == 0
    assert "promoted" in capsys.readouterr().out
    served = load_published(redis_conn, layout.model_bundle())
    assert served is not None and served.version == 7
    publish(redis_conn, layout, 6, frozen=True)  # older than what is served
    assert cli_main(args) == 0
    assert "not promoted" in capsys.readouterr().out
    served = load_published(redis_conn, layout.model_bundle())
    assert served is not None and served.version == 7


def test_a_held_back_version_is_due_when_the_throttle_allows():
    throttle = PublishThrottle(0.2)
    assert throttle.due(1) and throttle.retry_at() is None
    assert not throttle.due(2)  # too soon: held back
    at = throttle.retry_at()
    assert at is not None and at > datetime.now(UTC)
    time.sleep(0.25)
    assert throttle.due(2) and throttle.retry_at() is None
    assert not throttle.due(2)  # published already


def test_a_rescore_wake_waits_a_little_for_a_bundle_still_on_its_way(redis_conn, unique):
    """The wake names bundle 5; Redis gets it 30 ms later: the cache waits for it rather
    than rescoring with 4. A bundle that never comes costs the bounded wait, then 4."""
    import threading

    layout = RedisLayout(f"t{unique}:")
    publish(redis_conn, layout, 4)
    cache = BundleCache(redis_conn, layout, ModelBundle(), refresh_seconds=3600)
    assert cache.get().version == 4
    late = threading.Timer(0.03, publish, args=(redis_conn, layout, 5))
    late.start()
    try:
        assert cache.at_least(5).version == 5
    finally:
        late.join()
    started = time.monotonic()
    assert cache.at_least(6).version == 5  # never published
    assert time.monotonic() - started >= 0.25
    started = time.monotonic()  # the other customers of that rescore do not wait again
    assert cache.at_least(6).version == 5 and time.monotonic() - started < 0.1
    publish(redis_conn, layout, 6)  # but still read it once
    assert cache.at_least(6).version == 6
