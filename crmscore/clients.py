"""Kafka and Redis clients built from settings: the one place that configures them."""

from __future__ import annotations

import logging
from typing import Any

import redis
from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from crmscore.settings import Settings

log = logging.getLogger(__name__)

# tansu and Kafka both: a short fetch wait keeps end-to-end latency low
# (librdkafka's default 500 ms dominates p99; 0 makes tansu deliver nothing).
CONSUMER_DEFAULTS = {"fetch.wait.max.ms": "10", "session.timeout.ms": "6000"}

# The scoring flow's consumer (one per process, for all its partitions) prefetches at most
# ~8 MB (librdkafka's default: up to 64 MB and 100k messages per partition). The flow
# scores ~3k events/s, so 8 MB is seconds of work; the default let a replay's backlog sit
# in memory: peak RSS at 100k customers' replay 1,015 -> 865 MiB with 2 MB for each of
# four partitions, throughput unchanged (bench/memory.py). The trivial baseline flow keeps
# the defaults: a buffer this small slowed it (31k -> 22k events/s, one run).
SCORING_PREFETCH = {"queued.max.messages.kbytes": "8192", "queued.min.messages": "5000"}


# What redis_client returns: both answer the same single-key commands, pipelines and
# scripts (a cluster pipeline routes each command to the node owning its key).
RedisClient = redis.Redis | redis.RedisCluster


def redis_client(settings: Settings, **kwargs: Any) -> RedisClient:
    """A Redis client, or with ``redis_cluster`` a Redis Cluster client.

    The cluster client reads the slot map from the node in ``redis_url`` when it is
    built: unlike a single Redis client it fails at once (:class:`redis.ConnectionError`)
    when no node answers.
    """
    kwargs.setdefault("socket_timeout", 5.0)
    kwargs.setdefault("socket_connect_timeout", 2.0)
    if not settings.redis_cluster:
        return redis.Redis.from_url(settings.redis_url, **kwargs)
    try:
        return redis.RedisCluster.from_url(settings.redis_url, **kwargs)
    except redis.RedisClusterException as exc:
        raise redis.ConnectionError(f"Redis Cluster at {_safe(settings)}: {exc}") from exc


def _safe(settings: Settings) -> str:
    return str(settings.redacted()["redis_url"])


# Batches of up to 10 ms (librdkafka's default is 5). Each produce request costs the
# broker far more than its records: at 1,000 events/s to 4 partitions, 5 ms kept tansu
# at 89% of a core and end-to-end p99 at 41 ms; 10 ms halved its CPU, p99 20 ms, p50 the
# same (the consumer's fetch wait dominates it). On 2 cores that CPU is the flow's.
PRODUCER_LINGER_MS = 10


def producer(settings: Settings, **extra: str) -> Producer:
    config: dict[str, Any] = {
        "enable.idempotence": True,
        "linger.ms": PRODUCER_LINGER_MS,
        "compression.type": "lz4",
    }
    config.update(settings.kafka_client_config())
    config.update(extra)
    return Producer(config)


def topic_partitions(settings: Settings, topic: str, timeout: float = 15.0) -> frozenset[int]:
    """The partitions of ``topic`` (none when it does not exist)."""
    meta = AdminClient(settings.kafka_client_config()).list_topics(topic, timeout=timeout)
    found = meta.topics.get(topic)
    if found is None or found.error is not None:
        return frozenset()
    return frozenset(found.partitions)


def ensure_topics(settings: Settings, topics: list[str], timeout: float = 15.0) -> None:
    """Create missing topics with ``settings.topic_partitions``; existing ones are kept."""
    admin = AdminClient(settings.kafka_client_config())
    existing = admin.list_topics(timeout=timeout).topics
    missing = [t for t in topics if t not in existing]
    if not missing:
        return
    futures = admin.create_topics(
        [NewTopic(t, settings.topic_partitions, 1) for t in missing], operation_timeout=timeout
    )
    for topic, future in futures.items():
        try:
            future.result(timeout)
            log.info("created topic %s with %d partitions", topic, settings.topic_partitions)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise RuntimeError(f"could not create topic {topic!r}: {exc}") from exc
