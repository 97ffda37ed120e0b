"""The score store on a Redis Cluster: each command goes to the node owning its key.

Same contract as :class:`serving.store.ScoreStore` (``open_store`` returns this class
when ``CRMSCORE_REDIS_CLUSTER=on``): every call bounded by ``redis_timeout`` or the
caller's nearer deadline, :class:`~serving.errors.Unavailable` instead of a hang,
:class:`~serving.errors.DataError` for a refused command. Same transport too: each
thread keeps its own connection, here one per node, and sends packed commands. A call's
commands are grouped by the primary owning each key's hash slot, written to every node
first and read after, so a batch spread over all nodes costs about one round trip.

The slot map is redis-py's (``RedisCluster``, built at the first call so the server
starts while the cluster is down). A MOVED, TRYAGAIN or CLUSTERDOWN reply, or a node
that drops or refuses the connection, refreshes it (at most once a second) and the
commands concerned are sent once more within the deadline; an ASK reply (its slot is
being migrated) is followed with ASKING to the node it names. SCAN visits every primary.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import redis
from redis.cluster import ClusterNode
from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, MovedError, TryAgainError

from crmscore.clients import redis_client
from crmscore.layout import RedisLayout
from crmscore.settings import Settings
from serving.errors import DataError, DeadlineExceeded, Unavailable
from serving.metrics import REDIS_ERRORS
from serving.store import SCAN_COUNT, ScoreStore

log = logging.getLogger(__name__)

REFRESH_EVERY_S = 1.0  # most often the slot map is read again
# Replies and failures after which the slot map is refreshed and the command sent again.
_REROUTE = (MovedError, TryAgainError, ClusterDownError, redis.ConnectionError)

Job = tuple[ClusterNode, bool, list[int]]  # node, ASKING first, indexes of the commands


class ClusterScoreStore(ScoreStore):
    """:class:`ScoreStore` reads, each routed to the primary owning the key's slot."""

    def __init__(self, settings: Settings) -> None:  # not ScoreStore's: no single client
        self.layout = RedisLayout(settings.redis_prefix)
        self.timeout = settings.redis_timeout
        self._settings = settings
        self._client: redis.RedisCluster | None = None
        self._lock = threading.Lock()
        self._refreshed_at = -float("inf")
        self._local = threading.local()  # .conns: {node name: this thread's connection}

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is None:
            return
        for node in client.get_nodes():  # the per-thread connections are never released
            if node.redis_connection is not None:
                node.redis_connection.connection_pool.disconnect()
        client.close()

    def get_tracked(
        self, customer_ids: Sequence[str], redirect: int, timeout: float | None = None
    ) -> tuple[list[Any], bool]:
        """Never tracked: a redirect reaches only a client on the key's own node."""
        return self.get_many(customer_ids, timeout), False

    def iter_docs(self, timeout: float | None = None) -> Iterator[bytes]:
        """Every score document, by SCAN over the score keys of every primary."""
        deadline = self._deadline(timeout)
        for node in self._cluster("scan").get_primaries():
            cursor: Any = 0
            while True:
                scan = ("SCAN", cursor, "MATCH", self.layout.score_pattern(), "COUNT", SCAN_COUNT)
                ((cursor, keys),) = self._send("scan", [scan], deadline, [node])
                if keys:
                    docs = self._send("scan", [("HGET", k, "doc") for k in keys], deadline)
                    yield from (d for d in docs if d is not None)
                if int(cursor) == 0:
                    break

    def ping(self, timeout: float | None = None) -> None:
        """Raise :class:`Unavailable` unless every primary answers PING in time: a node
        down leaves its slots' customers unserved."""
        deadline = self._deadline(timeout)
        primaries = self._cluster("ping").get_primaries()
        self._send("ping", [("PING",)] * len(primaries), deadline, primaries)

    # -- plumbing ------------------------------------------------------------------------

    def _send(self, op: str, commands: list[tuple[Any, ...]], deadline: float,
              nodes: Sequence[ClusterNode] | None = None) -> list[Any]:
        """Replies to ``commands``, each sent to the owner of its key (or to ``nodes[i]``)."""
        if deadline <= time.monotonic():
            raise DeadlineExceeded(f"the deadline passed before Redis was asked ({op})")
        client = self._cluster(op)
        replies: list[Any] = [None] * len(commands)
        todo: list[int] = list(range(len(commands)))
        asks: dict[int, ClusterNode] = {}
        failure: Exception | None = None
        for attempt in range(2):
            try:
                jobs = self._jobs(client, commands, todo, asks, nodes)
            except redis.RedisClusterException as exc:  # a slot no node serves
                failure = exc
                break
            results = self._round_trip(op, commands, jobs, deadline)
            todo, asks = [], {}
            for i, result in results.items():
                ask_node = _ask_node(client, result)
                if ask_node is not None:
                    asks[i] = ask_node
                    todo.append(i)
                elif isinstance(result, MovedError):
                    # The reply names the slot's owner: route there at once. The slot map's
                    # refresh below is rate-limited, and one just before left the retry
                    # going to the old owner (MOVED twice, UNAVAILABLE; CI, once).
                    client.nodes_manager.move_slot(result)
                    failure = result
                    todo.append(i)
                elif isinstance(result, (*_REROUTE, AskError)):
                    failure = result
                    todo.append(i)
                elif isinstance(result, redis.ResponseError):
                    raise DataError(f"Redis refused {commands[i][0]}: {result}") from result
                else:
                    replies[i] = result
            if not todo:
                return replies
            if failure is not None and attempt == 0:
                self._refresh(client)
            if deadline <= time.monotonic():
                break
        REDIS_ERRORS.labels(op).inc()
        raise Unavailable(f"Redis unavailable ({op}): {failure or 'redirected twice'}")

    def _jobs(self, client: redis.RedisCluster, commands: list[tuple[Any, ...]],
              todo: list[int], asks: dict[int, ClusterNode],
              nodes: Sequence[ClusterNode] | None) -> list[Job]:
        """The commands in ``todo`` grouped by the node each goes to."""
        jobs: dict[tuple[str, bool], Job] = {}
        for i in todo:
            asking = i in asks
            if asking:
                node = asks[i]
            elif nodes is not None:
                node = nodes[i]
            else:
                key = commands[i][1]
                slot = key_slot(key.encode() if isinstance(key, str) else key)
                node = client.nodes_manager.get_node_from_slot(slot)
            jobs.setdefault((node.name, asking), (node, asking, []))[2].append(i)
        return list(jobs.values())

    def _round_trip(self, op: str, commands: list[tuple[Any, ...]], jobs: list[Job],
                    deadline: float) -> dict[int, Any]:
        """Write every node's commands, then read every reply before ``deadline``. A
        refused command's error or a node's lost connection is its command's result."""
        results: dict[int, Any] = {}
        unread: list[tuple[Any, bool, list[int]]] = []
        try:
            for node, asking, indexes in jobs:
                batch = [commands[i] for i in indexes]
                if asking:  # each command right after its own ASKING
                    batch = [c for command in batch for c in (("ASKING",), command)]
                try:
                    conn = self._connection(node)
                    if len(batch) == 1:
                        conn.send_command(*batch[0])
                    else:
                        conn.send_packed_command(conn.pack_commands(batch))
                except redis.ConnectionError as exc:
                    results.update(dict.fromkeys(indexes, exc))
                    continue
                unread.append((conn, asking, indexes))
            while unread:
                conn, asking, indexes = unread[0]
                try:
                    for i in indexes:
                        if asking:
                            _read(conn, deadline)
                        results[i] = _read(conn, deadline)
                except redis.ConnectionError as exc:
                    conn.disconnect()  # reconnects at its next use
                    for i in indexes:
                        results.setdefault(i, exc)
                unread.pop(0)
            return results
        except (redis.TimeoutError, OSError) as exc:
            for conn, _, _ in unread:
                conn.disconnect()  # a reply may still be on its way: reconnect at next use
            REDIS_ERRORS.labels(op).inc()
            raise Unavailable(f"Redis unavailable ({op}): {exc}") from exc

    def _connection(self, node: ClusterNode) -> Any:
        """This thread's connection to ``node`` (one pool checkout, ever)."""
        conns: dict[str, Any] = self._local.__dict__.setdefault("conns", {})
        conn = conns.get(node.name)
        if conn is None:
            pool = self._cluster("connect").get_redis_connection(node).connection_pool
            conn = conns[node.name] = pool.get_connection()
        return conn

    def _cluster(self, op: str) -> redis.RedisCluster:
        """The cluster client, built at first use: building it reads the slot map."""
        client = self._client
        if client is not None:
            return client
        with self._lock:
            if self._client is None:
                try:
                    built = redis_client(self._settings, socket_timeout=self.timeout,
                                         socket_connect_timeout=self.timeout)
                except redis.ConnectionError as exc:
                    REDIS_ERRORS.labels(op).inc()
                    raise Unavailable(f"Redis unavailable ({op}): {exc}") from exc
                assert isinstance(built, redis.RedisCluster)
                self._client = built
            return self._client

    def _refresh(self, client: redis.RedisCluster) -> None:
        """Read the slot map again (a failover or a resharding moved slots)."""
        with self._lock:
            if time.monotonic() - self._refreshed_at < REFRESH_EVERY_S:
                return
            self._refreshed_at = time.monotonic()
        try:
            client.nodes_manager.initialize()
        except (redis.RedisError, redis.RedisClusterException) as exc:
            log.warning("Redis Cluster slot map not refreshed: %s", exc)


def _read(conn: Any, deadline: float) -> Any:
    """One reply; a refused command's error is returned, not raised (the connection
    stays in step with its replies)."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise redis.TimeoutError("deadline reached between replies")
    try:
        return conn.read_response(timeout=remaining)
    except redis.ResponseError as exc:
        return exc


def _ask_node(client: redis.RedisCluster, result: Any) -> ClusterNode | None:
    """The node an ASK reply names, if the slot map knows it."""
    if not isinstance(result, AskError) or isinstance(result, MovedError):
        return None
    node: ClusterNode | None = client.get_node(result.host, result.port)
    return node
