"""Writes versioned documents to Redis, idempotently and never backwards.

bytewax re-delivers a sink's outputs after a crash (at-least-once), so every
write is a compare-and-set in one Lua script: a document lands only if its
version is greater than the stored one, and only then is it published on its
update channel. A batch keeps only the newest version per key before writing.

While Redis is unreachable the sink retries with capped exponential backoff,
which back-pressures the whole flow: nothing is dropped, nothing is skipped. Every
write also checks the flow's marker key: when Redis comes back without it, it lost its
data, and ``on_lost`` is called (flows/store_marker.py).

On a Redis Cluster (``CRMSCORE_REDIS_CLUSTER=on``) a script may only touch keys of one
hash slot, so the documents are grouped by slot: one script call per group, all sent in
one cluster pipeline (one round trip per node). PUBLISH from a script reaches
subscribers on every node (classic pub/sub is broadcast over the cluster bus).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import redis
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from redis.crc import key_slot

from crmscore.clients import RedisClient, redis_client
from crmscore.layout import RedisLayout
from crmscore.settings import Settings
from flows.store_marker import raise_store_lost
from flows.worker_thread import keep_thread_state

log = logging.getLogger(__name__)

# KEYS: document hashes; ARGV: (version, document, update channel or '') per key.
# One call writes a whole chunk: per-command client overhead dominated otherwise.
WRITE_IF_NEWER = """
local written = 0
for i, key in ipairs(KEYS) do
  local version, doc, channel = ARGV[3 * i - 2], ARGV[3 * i - 1], ARGV[3 * i]
  local current = redis.call('HGET', key, 'v')
  if not current or tonumber(current) < tonumber(version) then
    redis.call('HSET', key, 'v', version, 'doc', doc)
    if channel ~= '' then
      redis.call('PUBLISH', channel, doc)
    end
    written = written + 1
  end
end
return written
"""
_CHUNK = 256  # documents per script call: keeps each call well under a millisecond

_RETRYABLE: tuple[type[Exception], ...] = (
    redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)
_MAX_BACKOFF_S = 5.0


class VersionedDoc(NamedTuple):
    key: str
    version: int
    doc: bytes
    channel: str = ""


OnLost = Callable[[str], None]  # called with the marker key when Redis lost the data


class RedisDocSink(DynamicSink[VersionedDoc]):
    def __init__(self, settings: Settings, on_lost: OnLost = raise_store_lost) -> None:
        self._settings = settings
        self._on_lost = on_lost

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _RedisDocPartition:
        # Each worker builds this once, on its own thread, before any item flows.
        keep_thread_state()
        marker = RedisLayout(self._settings.redis_prefix).store_marker()
        client = redis_client(self._settings)
        if isinstance(client, redis.RedisCluster):
            return _ClusterDocPartition(client, marker, self._on_lost)
        return _RedisDocPartition(client, marker, self._on_lost)


class _RedisDocPartition(StatelessSinkPartition[VersionedDoc]):
    retryable = _RETRYABLE  # errors a write waits out

    def __init__(self, client: RedisClient, marker: str, on_lost: OnLost) -> None:
        self._client = client
        self._sha = hashlib.sha1(WRITE_IF_NEWER.encode()).hexdigest()
        self._marker = marker
        self._on_lost = on_lost

    def write_batch(self, items: list[VersionedDoc]) -> None:
        newest: dict[str, VersionedDoc] = {}
        for item in items:
            held = newest.get(item.key)
            if held is None or item.version > held.version:
                newest[item.key] = item
        backoff = 0.05
        while True:
            try:
                self._write(list(newest.values()))
                return
            except self.retryable as exc:
                log.warning("Redis write of %d documents failed (%s); retrying in %.2f s",
                            len(newest), exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)

    def _write(self, docs: list[VersionedDoc]) -> None:
        try:
            marker_exists = self._write_once(docs)
        except redis.exceptions.NoScriptError:  # a new or restarted Redis: load it, redo
            self._client.script_load(WRITE_IF_NEWER)
            marker_exists = self._write_once(docs)  # compare-and-set: a redo is harmless
        if not marker_exists:
            self._on_lost(self._marker)

    def _write_once(self, docs: list[VersionedDoc]) -> bool:
        """One round trip: the marker check and the scripts, by SHA (redis-py's Script
        objects would ask SCRIPT EXISTS first, a second round trip per batch)."""
        pipe = self._client.pipeline(transaction=False)
        pipe.exists(self._marker)
        for start in range(0, len(docs), _CHUNK):
            _queue_write(pipe, self._sha, docs[start : start + _CHUNK])
        marker_exists, *_ = pipe.execute()
        return bool(marker_exists)

    def close(self) -> None:
        self._client.close()


class _ClusterDocPartition(_RedisDocPartition):
    """The same writes on a Redis Cluster: one script call per hash slot group."""

    # Also a failover or a slot move in progress: the client refreshes its slot map.
    retryable = (*_RETRYABLE, redis.exceptions.ClusterDownError, redis.exceptions.TryAgainError)

    def __init__(self, client: redis.RedisCluster, marker: str, on_lost: OnLost) -> None:
        super().__init__(client, marker, on_lost)
        self._cluster = client

    def _write(self, docs: list[VersionedDoc]) -> None:
        try:
            self._write_by_slot(docs)
        except redis.RedisClusterException as exc:  # not a RedisError: say which it is
            if isinstance(exc, redis.exceptions.SlotNotCoveredError) or isinstance(
                    exc.__cause__, (redis.ConnectionError, redis.TimeoutError)):
                raise redis.ConnectionError(f"Redis Cluster unreachable: {exc}") from exc
            raise

    def _write_by_slot(self, docs: list[VersionedDoc]) -> None:
        marker_exists, unscripted = self._write_groups(slot_groups(docs))
        if unscripted:  # their nodes never saw the script (new, restarted, failed over)
            for node in {self._node(slot) for slot, _ in unscripted}:
                self._cluster.get_redis_connection(node).script_load(WRITE_IF_NEWER)
            marker_exists, unscripted = self._write_groups(unscripted)  # a redo is harmless
            if unscripted:
                raise redis.exceptions.NoScriptError(
                    f"a Redis Cluster node lost the write script right after loading it "
                    f"(slot {unscripted[0][0]})")
        if not marker_exists:
            self._on_lost(self._marker)

    def _write_groups(self, groups: list[tuple[int, list[VersionedDoc]]]
                      ) -> tuple[bool, list[tuple[int, list[VersionedDoc]]]]:
        """One cluster pipeline: the marker check and a script call per group. Returns
        whether the marker exists and the groups whose node did not know the script."""
        pipe = self._cluster.pipeline()
        pipe.exists(self._marker)
        for slot, group in groups:
            # The node named: else redis-py asks a server for a script call's keys, a
            # round trip per call.
            _queue_write(pipe, self._sha, group, target_nodes=self._node(slot))
        marker_exists, *results = pipe.execute(raise_on_error=False)
        for result in (marker_exists, *results):
            if isinstance(result, Exception) and not isinstance(
                    result, redis.exceptions.NoScriptError):
                raise result
        unscripted = [g for g, r in zip(groups, results, strict=True)
                      if isinstance(r, redis.exceptions.NoScriptError)]
        return bool(marker_exists), unscripted

    def _node(self, slot: int) -> Any:
        return self._cluster.nodes_manager.get_node_from_slot(slot)


def slot_groups(docs: list[VersionedDoc]) -> list[tuple[int, list[VersionedDoc]]]:
    """``docs`` grouped by the hash slot of their key, at most ``_CHUNK`` per group.

    >>> [(slot, [d.key for d in g]) for slot, g in slot_groups(
    ...     [VersionedDoc(k, 1, b"") for k in ("{a}x", "b", "{a}y")])]
    [(15495, ['{a}x', '{a}y']), (3300, ['b'])]
    """
    by_slot: dict[int, list[VersionedDoc]] = {}
    for d in docs:
        by_slot.setdefault(key_slot(d.key.encode()), []).append(d)
    return [(slot, group[start : start + _CHUNK])
            for slot, group in by_slot.items() for start in range(0, len(group), _CHUNK)]


def _queue_write(pipe: Any, sha: str, chunk: list[VersionedDoc], **options: Any) -> None:
    """Queue one WRITE_IF_NEWER call, by SHA, for ``chunk`` on ``pipe``."""
    args: list[Any] = []
    for d in chunk:
        args += (d.version, d.doc, d.channel)
    # What pipe.evalsha sends; redis-py's cluster pipeline blocks that method, not the
    # command.
    pipe.execute_command("EVALSHA", sha, len(chunk), *(d.key for d in chunk), *args,
                         **options)


class PublishThrottle:
    """When a single-key step should publish its report: when its version changed, at
    most every ``seconds`` of wall clock. A change held back is due at :meth:`retry_at`
    (the step's ``notify_at``), so the newest version is published even if no input
    follows it. Not snapshotted: a ``resumed`` step republishes at once."""

    def __init__(self, seconds: float, *, resumed: bool = False) -> None:
        self.seconds = seconds
        self.version: int | None = None  # the version published last
        # A newer version not published yet. A resumed step has one at once: what Redis
        # holds may be older than its state, or gone (flows/store_marker.py).
        self.held: int | None = -1 if resumed else None
        self.at = -float("inf")

    def due(self, version: int) -> bool:
        now = time.monotonic()
        if version == self.version:
            return False
        if now - self.at < self.seconds:
            self.held = version
            return False
        self.version, self.held, self.at = version, None, now
        return True

    def retry_at(self) -> datetime | None:
        """Wall-clock instant (UTC) at which the held-back version may be published."""
        if self.held is None:
            return None
        wait = max(self.at + self.seconds - time.monotonic(), 0.0)
        return datetime.now(UTC) + timedelta(seconds=wait)
