"""Push of score changes to WatchCustomer streams: one Redis subscriber for all.

The flow PUBLISHes every accepted score document on ``{prefix}updates:{customer_id}``
(docs/design.md). One :class:`UpdateHub` thread owns one pub/sub connection, subscribes
to the channels of the customers being watched, and fans each message out to those
watchers' queues; watchers never poll Redis. If the pub/sub connection breaks, the
hub reconnects, resubscribes, and tells every watcher to re-read its customer's
current score (``RESYNC``), so a change published during the outage is not lost.

On a Redis Cluster the hub subscribes on one primary, the next one at each reconnect:
classic PUBLISH reaches subscribers on every node (the cluster bus broadcasts it), so
any node will do, and one node down does not keep the watchers down.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

import redis

from crmscore.clients import RedisClient, redis_client
from crmscore.layout import RedisLayout
from crmscore.settings import Settings
from serving.errors import ResourceExhausted, Unavailable
from serving.metrics import REDIS_ERRORS, WATCHERS

log = logging.getLogger(__name__)

RESYNC = object()  # re-read the current score: updates may have been missed
CLOSED = object()  # the hub stops: end the stream

_POLL_S = 0.05
_MAX_BACKOFF_S = 2.0


class Watcher:
    """One WatchCustomer stream's inbox: score documents, RESYNC or CLOSED."""

    def __init__(self, channel: str, ready: threading.Event) -> None:
        self.channel = channel
        self.ready = ready
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def next(self, timeout: float) -> Any:
        """The next item, or None after ``timeout`` seconds without one."""
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.inbox.put(CLOSED)


class UpdateHub:
    """Shares one Redis pub/sub connection among every watcher of this server."""

    def __init__(self, settings: Settings, max_watchers: int) -> None:
        self.layout = RedisLayout(settings.redis_prefix)
        self._settings = settings
        self._client: RedisClient | None = None  # built by the hub thread
        self._connects = 0
        self._max = max_watchers
        self._lock = threading.Lock()
        self._watchers: dict[str, set[Watcher]] = {}
        self._ready: dict[str, threading.Event] = {}
        self._commands: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._count = 0

    # -- watchers (gRPC threads) ---------------------------------------------------------

    def watch(self, customer_id: str) -> Watcher:
        channel = self.layout.updates(customer_id)
        with self._lock:
            if self._count >= self._max:
                raise ResourceExhausted(
                    f"too many watchers: this server allows {self._max} at once"
                )
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="crmscore-update-hub", daemon=True
                )
                self._thread.start()
            ready = self._ready.get(channel)
            if ready is None:
                ready = self._ready[channel] = threading.Event()
                self._commands.put(("subscribe", channel))
            watcher = Watcher(channel, ready)
            self._watchers.setdefault(channel, set()).add(watcher)
            self._count += 1
        WATCHERS.inc()
        return watcher

    def unwatch(self, watcher: Watcher) -> None:
        with self._lock:
            watchers = self._watchers.get(watcher.channel)
            if watchers is None or watcher not in watchers:
                return
            watchers.discard(watcher)
            self._count -= 1
            if not watchers:
                del self._watchers[watcher.channel]
                del self._ready[watcher.channel]
                self._commands.put(("unsubscribe", watcher.channel))
        WATCHERS.dec()

    def wait_subscribed(self, watcher: Watcher, timeout: float) -> None:
        if not watcher.ready.wait(timeout):
            raise Unavailable(
                f"Redis did not confirm the subscription within {timeout:.2f} s"
            )

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for watchers in self._watchers.values():
                for w in watchers:
                    w.close()
        if self._thread is not None:
            self._thread.join(5)
        if self._client is not None:
            self._client.close()

    # -- hub thread ----------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.05
        first = True
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self._pubsub()
                self._subscribe_all(pubsub, resync=not first)
                first = False
                backoff = 0.05
                while not self._stop.is_set():
                    self._apply_commands(pubsub)
                    message = pubsub.get_message(timeout=_POLL_S)
                    if message is not None:
                        self._dispatch(message)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                REDIS_ERRORS.labels("pubsub").inc()
                log.warning("update hub lost Redis: %s; reconnecting in %.2f s", exc, backoff)
                with self._lock:
                    for event in self._ready.values():
                        event.clear()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                first = False
            finally:
                try:
                    if pubsub is not None:
                        pubsub.close()
                except (redis.RedisError, OSError):
                    pass  # the connection is being dropped anyway

    def _pubsub(self) -> Any:
        """A pub/sub object for this connection attempt (connecting at its first command)."""
        if self._client is None:
            # A cluster client reads the slot map now: in this thread, so a cluster that
            # is down at start is waited for like a broken connection. Its socket timeout
            # bounds that read; a single Redis's pub/sub connection waits without one.
            timeout = self._settings.redis_timeout if self._settings.redis_cluster else None
            self._client = redis_client(self._settings, socket_timeout=timeout,
                                        socket_connect_timeout=self._settings.redis_timeout)
        if isinstance(self._client, redis.RedisCluster):
            primaries = self._client.get_primaries()
            self._connects += 1
            return self._client.pubsub(node=primaries[self._connects % len(primaries)])
        return self._client.pubsub()

    def _subscribe_all(self, pubsub: Any, resync: bool) -> None:
        # Commands queued so far are covered by subscribing the current channels.
        while True:
            try:
                self._commands.get_nowait()
            except queue.Empty:
                break
        with self._lock:
            channels = list(self._watchers)
        if channels:
            pubsub.subscribe(*channels)
        if resync:
            log.info("update hub reconnected; resubscribed channels=%d", len(channels))
            with self._lock:
                for watchers in self._watchers.values():
                    for w in watchers:
                        w.inbox.put(RESYNC)

    def _apply_commands(self, pubsub: Any) -> None:
        while True:
            try:
                command, channel = self._commands.get_nowait()
            except queue.Empty:
                return
            if command == "subscribe":
                pubsub.subscribe(channel)
            else:
                pubsub.unsubscribe(channel)

    def _dispatch(self, message: dict[str, Any]) -> None:
        channel = message["channel"]
        if isinstance(channel, bytes):
            channel = channel.decode()
        kind = message["type"]
        with self._lock:
            if kind == "subscribe":
                event = self._ready.get(channel)
                if event is not None:
                    event.set()
            elif kind == "message":
                for w in self._watchers.get(channel, ()):
                    w.inbox.put(message["data"])
