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
hash slot, so the documents are grouped by slot: one script call per group, sent to the
node that owns the slot. PUBLISH from a script reaches subscribers on every node
(classic pub/sub is broadcast over the cluster bus).

The sink does not wait for each batch: it waits at the end of each epoch, before
bytewax commits it (flows/own_sink.py says why that holds; ``_DocPartition`` below).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, cast

import redis
from bytewax.outputs import StatefulSinkPartition
from redis.connection import Connection
from redis.crc import key_slot

from crmscore.clients import RedisClient, redis_client
from crmscore.layout import RedisLayout
from crmscore.settings import Settings
from flows.kafka_source import SINGLE_PROCESS, ProcessShare
from flows.own_sink import OwnPartitionSink
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


class RedisDocSink(OwnPartitionSink[VersionedDoc]):
    def __init__(self, settings: Settings, on_lost: OnLost = raise_store_lost,
                 share: ProcessShare = SINGLE_PROCESS) -> None:
        super().__init__(share)
        self._settings = settings
        self._on_lost = on_lost

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _DocPartition:
        # Built on the worker's own thread (each of its partitions), before any item flows.
        keep_thread_state()
        marker = RedisLayout(self._settings.redis_prefix).store_marker()
        kind = _ClusterDocPartition if self._settings.redis_cluster else _RedisDocPartition
        return kind(functools.partial(redis_client, self._settings), marker, self._on_lost)


Command = tuple[Any, ...]


class _Sent(NamedTuple):
    docs: list[VersionedDoc]
    # The replies Redis owes for them, by connection, in order; the first reply on the
    # first connection answers the marker check.
    owed: list[tuple[Connection, int]]


class _DocPartition(StatefulSinkPartition[VersionedDoc, None]):
    """Writes without waiting for Redis: a batch's script calls are sent, and their
    replies read at the next batch or at the end of the epoch (``snapshot``), whichever
    comes first. So the flow works on the next batch while Redis writes this one, and
    bytewax commits an epoch only once Redis confirmed every document of it. Waiting
    for each batch held the flow's thread for the round trip and Redis's work: 90-103
    ms of each second at 1,000 events/s on a single Redis, 22-30 ms now (bytewax's
    ``out_part_write_batch_duration_seconds``; the epochs' confirmations 0.2 ms).

    A batch whose replies are not all confirmed (Redis went away, restarted and lost the
    script, or moved a slot) is written again by ``_write``, and waited for, until Redis
    confirms: each write is a compare-and-set, so a redo is harmless.

    The client is made at the first write: a process lists 64 partitions and writes
    through one (flows/own_sink.py)."""

    retryable: tuple[type[Exception], ...] = _RETRYABLE  # errors a write waits out
    # Errors of a batch in flight that writing it again, and waiting, sets right.
    redone: tuple[type[Exception], ...] = (redis.exceptions.NoScriptError,)

    def __init__(self, connect: Callable[[], RedisClient], marker: str,
                 on_lost: OnLost) -> None:
        self._connect = connect
        self._sha = hashlib.sha1(WRITE_IF_NEWER.encode()).hexdigest()
        self._marker = marker
        self._on_lost = on_lost
        self._sent: _Sent | None = None

    @functools.cached_property
    def _client(self) -> RedisClient:
        return self._connect()

    def write_batch(self, items: list[VersionedDoc]) -> None:
        docs = newest_versions(items)
        self.snapshot()  # one batch in flight at most
        try:
            self._sent = self._send(docs)
        except (redis.RedisError, redis.RedisClusterException) as exc:  # _write sees to it
            log.warning("Redis write of %d documents failed (%s); retrying", len(docs), exc)
            self._write_until_done(docs)

    def snapshot(self) -> None:
        """Return once Redis confirmed every document sent."""
        sent, self._sent = self._sent, None
        if sent is None:
            return
        try:
            self._confirm(sent)
        except self.redone:  # a new or restarted Redis, a slot moved: _write sees to it
            self._write_until_done(sent.docs)
        except self.retryable as exc:
            log.warning("Redis write of %d documents failed (%s); retrying",
                        len(sent.docs), exc)
            self._write_until_done(sent.docs)

    def _write_until_done(self, docs: list[VersionedDoc]) -> None:
        backoff = 0.05
        while True:
            try:
                self._write(docs)
                return
            except self.retryable as exc:
                log.warning("Redis write of %d documents failed (%s); retrying in %.2f s",
                            len(docs), exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)

    def _write(self, docs: list[VersionedDoc]) -> None:
        """Write ``docs`` and return once Redis confirmed them."""
        raise NotImplementedError

    def _plan(self, docs: list[VersionedDoc]) -> list[tuple[Connection, list[Command]]]:
        """The commands to send for ``docs``, by connection, the marker check first."""
        raise NotImplementedError

    def _send(self, docs: list[VersionedDoc]) -> _Sent:
        """Send the marker check and the script calls, by SHA (redis-py's Script objects
        would ask SCRIPT EXISTS first, a second round trip per batch)."""
        owed = []
        try:
            for conn, commands in self._plan(docs):
                conn.send_packed_command(conn.pack_commands(commands))
                owed.append((conn, len(commands)))
        except BaseException:
            self._drop_connections(owed)
            raise
        return _Sent(docs, owed)

    def _confirm(self, sent: _Sent) -> None:
        """Read every reply owed for ``sent``; an error reply among them is raised once
        all are read, so every connection stays in step."""
        replies: list[Any] = []
        try:
            for conn, count in sent.owed:
                for _ in range(count):
                    try:
                        replies.append(conn.read_response())
                    except redis.ResponseError as exc:
                        replies.append(exc)
        except BaseException:
            self._drop_connections(sent.owed)
            raise
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        if not replies[0]:  # the marker is gone
            self._on_lost(self._marker)

    def _drop_connections(self, owed: list[tuple[Connection, int]]) -> None:
        """Disconnect after a failure: replies may still be owed on any of them (each
        connects again at its next command)."""
        for conn, _ in owed:
            conn.disconnect()

    def close(self) -> None:
        self.snapshot()
        if "_client" in self.__dict__:  # made
            self._client.close()


class _RedisDocPartition(_DocPartition):
    """Writes to a single Redis."""

    @functools.cached_property
    def _conn(self) -> Connection:
        return own_connection(cast(redis.Redis, self._client))

    def _plan(self, docs: list[VersionedDoc]) -> list[tuple[Connection, list[Command]]]:
        commands: list[Command] = [("EXISTS", self._marker)]
        commands += [script_call(self._sha, docs[start : start + _CHUNK])
                     for start in range(0, len(docs), _CHUNK)]
        return [(self._conn, commands)]

    def _write(self, docs: list[VersionedDoc]) -> None:
        try:
            self._confirm(self._send(docs))
        except redis.exceptions.NoScriptError:  # a new or restarted Redis: load it, redo
            self._client.script_load(WRITE_IF_NEWER)
            self._confirm(self._send(docs))

    def close(self) -> None:
        super().close()
        if "_conn" in self.__dict__:  # made
            self._conn.disconnect()


class _ClusterDocPartition(_DocPartition):
    """Writes to a Redis Cluster: one script call per hash slot group, sent to the node
    owning the slot on a connection of the partition's own. A batch in flight that a
    node refused (it lost the script, or the slot moved) is written again through a
    cluster pipeline, which follows the cluster's redirections."""

    # Also a failover or a slot move in progress: the client refreshes its slot map.
    retryable = (*_RETRYABLE, redis.exceptions.ClusterDownError, redis.exceptions.TryAgainError)
    redone = (redis.exceptions.NoScriptError, redis.exceptions.MovedError,
              redis.exceptions.AskError)

    def __init__(self, connect: Callable[[], RedisClient], marker: str,
                 on_lost: OnLost) -> None:
        super().__init__(connect, marker, on_lost)
        self._conns: dict[str, Connection] = {}  # by node name

    @property
    def _cluster(self) -> redis.RedisCluster:
        return cast(redis.RedisCluster, self._client)

    def _plan(self, docs: list[VersionedDoc]) -> list[tuple[Connection, list[Command]]]:
        by_node: dict[str, list[Command]] = {self._node(key_slot(self._marker.encode())).name:
                                             [("EXISTS", self._marker)]}
        for slot, group in slot_groups(docs):
            by_node.setdefault(self._node(slot).name, []).append(script_call(self._sha, group))
        return [(self._node_connection(name), commands) for name, commands in by_node.items()]

    def _node_connection(self, name: str) -> Connection:
        conn = self._conns.get(name)
        if conn is None:
            node = self._cluster.get_node(node_name=name)
            conn = self._conns[name] = own_connection(self._cluster.get_redis_connection(node))
        return conn

    def _drop_connections(self, owed: list[tuple[Connection, int]]) -> None:
        super()._drop_connections(owed)
        self._conns.clear()  # a node may have failed over: find them again

    def close(self) -> None:
        super().close()
        for conn in self._conns.values():
            conn.disconnect()

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
            pipe.execute_command(*script_call(self._sha, group), target_nodes=self._node(slot))
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


def own_connection(client: redis.Redis) -> Connection:
    """A connection outside ``client``'s pool, of the pool's kind and settings: replies
    owed come back on it in order. It connects at the first command, and again after an
    error."""
    pool = client.connection_pool
    return cast(Connection, pool.connection_class(**pool.connection_kwargs))


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


def newest_versions(items: list[VersionedDoc]) -> list[VersionedDoc]:
    """The newest version of each key in ``items``."""
    newest: dict[str, VersionedDoc] = {}
    for item in items:
        held = newest.get(item.key)
        if held is None or item.version > held.version:
            newest[item.key] = item
    return list(newest.values())


def script_call(sha: str, chunk: list[VersionedDoc]) -> Command:
    """The command of one WRITE_IF_NEWER call, by SHA, for ``chunk`` (what
    ``evalsha`` sends; redis-py's cluster pipeline blocks that method, not the command)."""
    args: list[Any] = []
    for d in chunk:
        args += (d.version, d.doc, d.channel)
    return ("EVALSHA", sha, len(chunk), *(d.key for d in chunk), *args)


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
