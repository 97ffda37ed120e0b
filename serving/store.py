"""Read-only access to the score documents in Redis (layout in docs/design.md).

Every call is bounded: it waits for Redis at most ``redis_timeout`` seconds, or less
when the caller's gRPC deadline is nearer, and a refused, broken or frozen Redis
becomes :class:`~serving.errors.Unavailable` instead of a hang. Commands go straight
over the calling thread's own connection (one round trip, batches pipelined; no pool
checkout per call, which cost a quarter of a GetScore's Redis time) with a per-read
timeout; a connection that failed mid-reply is closed and reconnects on its next use,
so the next call starts clean and the store recovers by itself when Redis returns.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import redis

from crmscore.clients import redis_client
from crmscore.layout import RedisLayout
from crmscore.settings import Settings
from serving.errors import DataError, DeadlineExceeded, Unavailable
from serving.metrics import REDIS_ERRORS

_FAILURES = (redis.ConnectionError, redis.TimeoutError, OSError)
SCAN_COUNT = 1000


def open_store(settings: Settings) -> ScoreStore:
    """The store for ``settings``: on a Redis Cluster a ClusterScoreStore, the same reads
    each sent to the node owning its key."""
    if settings.redis_cluster:
        from serving.cluster_store import ClusterScoreStore  # it builds on this module

        return ClusterScoreStore(settings)
    return ScoreStore(settings)


class ScoreStore:
    """Score documents, pipeline status, model report and alert report, read from Redis."""

    def __init__(self, settings: Settings) -> None:
        self.layout = RedisLayout(settings.redis_prefix)
        self.timeout = settings.redis_timeout
        client = redis_client(
            settings,
            socket_timeout=settings.redis_timeout,
            socket_connect_timeout=settings.redis_timeout,
        )
        assert isinstance(client, redis.Redis)  # a cluster gets a ClusterScoreStore: open_store
        self.client = client
        self._pool = self.client.connection_pool
        self._local = threading.local()  # .conn: this thread's connection

    def close(self) -> None:
        self._pool.disconnect()
        self.client.close()

    # -- documents -----------------------------------------------------------------------

    def get(self, customer_id: str, timeout: float | None = None) -> bytes | None:
        """The JSON score document of one customer, or None."""
        (doc,) = self._call("get", [("HGET", self.layout.score(customer_id), "doc")], timeout)
        return doc

    def get_many(self, customer_ids: Sequence[str], timeout: float | None = None) -> list[Any]:
        """Score documents (or None) of several customers, in one pipelined round trip."""
        score = self.layout.score
        return self._call("get_many", [("HGET", score(c), "doc") for c in customer_ids], timeout)

    def get_tracked(
        self, customer_ids: Sequence[str], redirect: int, timeout: float | None = None
    ) -> tuple[list[Any], bool]:
        """Score documents (or None) of ``customer_ids``, read on a connection that asks
        Redis to send an invalidation to client ``redirect`` when any of them changes
        (:mod:`serving.cache`); and whether Redis agreed to (it refuses a ``redirect``
        that is gone, and Redis before 6 knows no tracking)."""
        score = self.layout.score
        reads = [("HGET", score(c), "doc") for c in customer_ids]
        local = self._local
        # Tracking holds for the socket it was turned on on: turned on again after a
        # reconnect, and a read that reconnected midway is not tracked.
        conn: Any = getattr(local, "conn", None)
        sock = None if conn is None else conn._sock
        if sock is not None and getattr(local, "tracking", None) == (sock, redirect):
            docs = self._call("get", reads, timeout)
            return docs, conn._sock is sock
        turn_on = ("CLIENT", "TRACKING", "ON", "REDIRECT", redirect)
        replies = self._call("get", [turn_on, *reads], timeout, refusable=1)
        tracked = not isinstance(replies[0], redis.ResponseError)
        local.tracking = (local.conn._sock, redirect) if tracked else None
        return replies[1:], tracked

    def status(self, timeout: float | None = None) -> bytes | None:
        """The JSON pipeline status document, or None before the flow wrote one."""
        (doc,) = self._call("status", [("HGET", self.layout.status(), "doc")], timeout)
        return doc

    def model_report(self, timeout: float | None = None) -> bytes | None:
        """The JSON model report at ``{prefix}models`` (a string, or a HASH's ``doc``)."""
        key = self.model_report_key()
        deadline = self._deadline(timeout)
        (kind,) = self._call("model_report", [("TYPE", key)], deadline=deadline)
        if kind in (b"none", "none"):
            return None
        command = ("HGET", key, "doc") if kind in (b"hash", "hash") else ("GET", key)
        (doc,) = self._call("model_report", [command], deadline=deadline)
        return doc

    def model_report_key(self) -> str:
        return self.layout.model_report()

    def alert_report(self, timeout: float | None = None) -> bytes | None:
        """The JSON alert report (``{prefix}alerts:report``), or None before the flow wrote one."""
        (doc,) = self._call("alert_report", [("HGET", self.layout.alert_report(), "doc")], timeout)
        return doc

    def iter_docs(self, timeout: float | None = None) -> Iterator[bytes]:
        """Every score document, by SCAN over the score keys: O(customers) per call."""
        deadline = self._deadline(timeout)
        cursor: Any = 0
        while True:
            ((cursor, keys),) = self._call(
                "scan",
                [("SCAN", cursor, "MATCH", self.layout.score_pattern(), "COUNT", SCAN_COUNT)],
                deadline=deadline,
            )
            if keys:
                docs = self._call("scan", [("HGET", k, "doc") for k in keys], deadline=deadline)
                yield from (d for d in docs if d is not None)
            if int(cursor) == 0:
                return

    def ping(self, timeout: float | None = None) -> None:
        """Raise :class:`Unavailable` unless Redis answers PING in time."""
        self._call("ping", [("PING",)], timeout)

    # -- plumbing ------------------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float:
        wait = self.timeout if timeout is None else min(timeout, self.timeout)
        return time.monotonic() + wait

    def _call(
        self,
        op: str,
        commands: list[tuple[Any, ...]],
        timeout: float | None = None,
        *,
        deadline: float | None = None,
        refusable: int = 0,
    ) -> list[Any]:
        """Replies to ``commands``, read before ``deadline`` (else ``timeout`` from now,
        capped by ``redis_timeout``). The first ``refusable`` commands may be refused:
        their error is their reply."""
        deadline = self._deadline(timeout) if deadline is None else deadline
        replies = self._send(op, commands, deadline)
        for n, reply in enumerate(replies):
            if n >= refusable and isinstance(reply, redis.ResponseError):
                raise DataError(f"Redis refused {commands[n][0]}: {reply}")
        return replies

    def _send(self, op: str, commands: list[tuple[Any, ...]], deadline: float) -> list[Any]:
        """Send ``commands`` in one write and read their replies (a refusal's error as its
        reply) before ``deadline``."""
        if deadline <= time.monotonic():
            raise DeadlineExceeded(f"the deadline passed before Redis was asked ({op})")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = self._local.conn = self._pool.get_connection()
            except _FAILURES as exc:
                REDIS_ERRORS.labels(op).inc()
                raise Unavailable(f"Redis unavailable ({op}): {exc}") from exc
        # A connection idle across a Redis restart fails on first use: retry that once.
        reused = conn._sock is not None
        try:
            return self._exchange(conn, commands, deadline)
        except redis.ConnectionError:
            conn.disconnect()
            if not reused or deadline <= time.monotonic():
                REDIS_ERRORS.labels(op).inc()
                raise Unavailable(f"Redis unavailable ({op})") from None
        try:
            return self._exchange(conn, commands, deadline)
        except redis.ConnectionError as exc:
            conn.disconnect()
            REDIS_ERRORS.labels(op).inc()
            raise Unavailable(f"Redis unavailable ({op}): {exc}") from exc

    def _exchange(self, conn: Any, commands: list[tuple[Any, ...]], deadline: float) -> list[Any]:
        try:
            if len(commands) == 1:
                conn.send_command(*commands[0])
            else:
                conn.send_packed_command(conn.pack_commands(commands))
            replies = []
            for _ in commands:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise redis.TimeoutError("deadline reached between replies")
                try:
                    replies.append(conn.read_response(timeout=remaining))
                except redis.ResponseError as refusal:  # read whole: the next reply follows
                    replies.append(refusal)
            return replies
        except redis.ConnectionError:
            raise  # the caller decides whether to retry
        except (redis.TimeoutError, OSError) as exc:
            conn.disconnect()  # a reply may still be on its way: reconnect at next use
            op = str(commands[0][0]).lower()
            REDIS_ERRORS.labels(op).inc()
            raise Unavailable(f"Redis unavailable ({op}): {exc}") from exc
