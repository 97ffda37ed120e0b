"""Scores kept in the server's memory, exact because Redis says when one changes.

Most GetScore calls of a web shop ask again for a customer asked for moments before
(each page of a session), and a round trip to Redis is most of a call's cost: at peak,
64 GetScore calls in flight answered 3,800-5,300 QPS from Redis and 5,200-7,900 with
this cache, beside an echo service's 8,300-10,800 (``python -m serving.bench``).

:class:`ScoreCache` uses Redis's server-assisted client-side caching
(https://redis.io/docs/latest/develop/reference/client-side-caching/):

- One thread holds one connection subscribed to ``__redis__:invalidate``. The reads
  that fill the cache ask Redis to track their keys for that connection
  (``CLIENT TRACKING ON REDIRECT <its id>``), so when a read key changes (written by the
  flow, deleted, expired, flushed) Redis sends its name there, and the entry goes.
- A read reserves its entry before asking Redis and fills it only if the reservation is
  still there: an invalidation that overtakes the reply wins.
- A lease bounds what a lost or late invalidation could cost. The thread PINGs every
  :data:`PING_EVERY_S` on the same connection; replies come in order, so an answered
  PING proves every invalidation sent before it has been applied. Entries are served
  only within :data:`LEASE_S` of the last answered PING's sending. Past it (Redis frozen,
  the connection slow, this thread starved) calls read Redis as if there were no cache,
  and a frozen Redis is UNAVAILABLE as before, at most :data:`LEASE_S` later. A lost
  connection empties the cache; a new one starts it afresh.

Entries are the serialized ``CustomerScore`` (~300 B each, 1.7 KB as a message), least
recently used first out beyond ``score_cache_size``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from typing import Any

import redis

from crmscore.clients import redis_client
from crmscore.layout import RedisLayout
from crmscore.settings import Settings
from serving.metrics import CACHE_LOOKUPS

log = logging.getLogger(__name__)

INVALIDATIONS = "__redis__:invalidate"
PING_EVERY_S = 0.05
LEASE_S = 0.2
_MAX_BACKOFF_S = 2.0


class Reservation:
    """The place of an entry being read from Redis (compared by identity)."""

    __slots__ = ()


class ScoreCache:
    """Serialized scores by customer id, dropped when Redis reports their key changed."""

    def __init__(self, settings: Settings, max_entries: int) -> None:
        self.max_entries = max_entries
        self._settings = settings
        self._key_prefix = RedisLayout(settings.redis_prefix).score("").encode()
        self._entries: OrderedDict[str, Any] = OrderedDict()  # bytes, or a Reservation
        self._lock = threading.Lock()
        self._redirect: int | None = None  # the invalidation connection's id while open
        self._fresh_until = 0.0  # monotonic: entries are served before this instant
        self._refusal_logged = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="crmscore-cache", daemon=True)
        self._hits = CACHE_LOOKUPS.labels("hit")
        self._misses = CACHE_LOOKUPS.labels("miss")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def live(self) -> bool:
        """Whether entries may be served now (the lease holds)."""
        return time.monotonic() < self._fresh_until

    def lookup(self, customer_id: str) -> bytes | None:
        """The serialized score of ``customer_id``, or None: not cached, or not live."""
        if time.monotonic() < self._fresh_until:
            with self._lock:
                entry = self._entries.get(customer_id)
                if entry is not None and entry.__class__ is bytes:
                    self._entries.move_to_end(customer_id)
                    self._hits.inc()
                    return entry  # type: ignore[no-any-return]
        self._misses.inc()
        return None

    def redirect(self) -> int | None:
        """The client id a read must have its keys tracked for to fill entries; None while
        the cache is not live."""
        return self._redirect if self.live else None

    def reserve(self, customer_id: str, redirect: int) -> Reservation | None:
        """Reserve the entry of ``customer_id`` before reading it from Redis with tracking
        for ``redirect``; None if that connection is gone already."""
        reservation = Reservation()
        with self._lock:
            if self._redirect != redirect:
                return None
            self._entries[customer_id] = reservation
            self._entries.move_to_end(customer_id)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return reservation

    def fill(self, customer_id: str, reservation: Reservation, serialized: bytes | None) -> None:
        """Cache ``serialized`` (None: nothing to cache) unless the reservation was dropped
        meanwhile."""
        with self._lock:
            if self._entries.get(customer_id) is reservation:
                if serialized is None:
                    del self._entries[customer_id]
                else:
                    self._entries[customer_id] = serialized

    def refused(self, redirect: int) -> None:
        """Redis did not track a read for ``redirect``. If that connection is still the
        cache's (a reconnect in between explains a refusal), Redis refuses tracking
        itself: say so once."""
        if redirect == self._redirect and not self._refusal_logged:
            self._refusal_logged = True
            log.warning("score cache: Redis refuses CLIENT TRACKING (a Redis before 6, or "
                        "an ACL user without the CLIENT command?): every score is read "
                        "from Redis; set CRMSCORE_SCORE_CACHE_SIZE=0 to stop trying")

    def __contains__(self, customer_id: object) -> bool:
        """Whether a score (not a reservation) of ``customer_id`` is held."""
        return self._entries.get(customer_id).__class__ is bytes  # type: ignore[call-overload]

    def __len__(self) -> int:
        return len(self._entries)

    # -- the invalidation connection ------------------------------------------------------

    def _run(self) -> None:
        backoff = PING_EVERY_S
        while not self._stop.is_set():
            try:
                self._listen()
                backoff = PING_EVERY_S
            except redis.ResponseError as exc:  # refused, not unreachable: for good
                log.warning("score cache off: Redis refuses its invalidation connection "
                            "(%s); every score is read from Redis", exc)
                return
            except (redis.RedisError, OSError) as exc:
                log.warning("score cache off until Redis answers again: %s", exc)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_S)

    def _listen(self) -> None:
        # RESP2: invalidations arrive as pub/sub messages on INVALIDATIONS.
        timeout = self._settings.redis_timeout
        client = redis_client(self._settings, protocol=2, socket_timeout=timeout,
                              socket_connect_timeout=timeout)
        assert isinstance(client, redis.Redis)  # off on a cluster: serving.server.score_cache
        conn = client.connection_pool.get_connection()
        try:
            conn.send_command("CLIENT", "ID")
            redirect = int(conn.read_response())
            conn.send_command("SUBSCRIBE", INVALIDATIONS)
            conn.read_response()
            with self._lock:
                self._entries.clear()
                self._redirect = redirect
            log.info("score cache on: invalidations to client id=%d", redirect)
            self._follow(conn)
        finally:
            with self._lock:
                self._redirect = None
                self._fresh_until = 0.0
                self._entries.clear()
            conn.disconnect()
            client.close()

    def _follow(self, conn: Any) -> None:
        """Apply invalidations and renew the lease until stopped or the connection fails."""
        pings: deque[float] = deque()  # sending instants of the unanswered PINGs
        next_ping = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_ping:
                if pings and now - pings[0] > self._settings.redis_timeout + LEASE_S:
                    raise redis.TimeoutError("Redis answers no PING")
                conn.send_command("PING")
                pings.append(now)
                next_ping = now + PING_EVERY_S
            if not conn.can_read(timeout=max(0.0, next_ping - time.monotonic())):
                continue
            kind, *rest = conn.read_response()
            if kind == b"pong":
                self._fresh_until = pings.popleft() + LEASE_S
            elif kind == b"message":
                self._invalidate(rest[1])

    def _invalidate(self, keys: list[bytes] | None) -> None:
        """Drop the entries of ``keys`` (None: Redis flushed everything)."""
        with self._lock:
            if keys is None:
                self._entries.clear()
                return
            start = len(self._key_prefix)
            for key in keys:
                if key.startswith(self._key_prefix):
                    self._entries.pop(key[start:].decode(), None)
