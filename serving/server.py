"""The gRPC scoring API over the score documents in Redis.

:func:`create_server` builds everything a running server needs: the Scoring servicer,
with its score cache (:mod:`serving.cache`: GetScore and BatchGetScores answer from
memory what Redis has not reported changed), each method wrapped with auth, error
mapping and metrics (:mod:`serving.interceptors`), the standard health service
(SERVING only while a background checker's Redis PING answers), server reflection,
message size limits and, when configured, TLS. It binds the port (0 picks a free one)
but does not start; tests and ``crmscore serve`` call ``start()``.

The server is grpcio's synchronous one on a thread pool: measured faster than
grpc.aio for these short Redis-bound calls. Each open WatchCustomer stream holds a
thread, so watchers are capped (``CRMSCORE_MAX_WATCHERS``) below the pool size.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from crmscore.doc_codec import load
from crmscore.settings import Settings
from crmscore.v1 import scoring_pb2, scoring_pb2_grpc
from serving.auth import ApiKeys, auth_enabled
from serving.cache import ScoreCache
from serving.convert import (
    alert_report_message,
    model_report_message,
    score_message,
    status_message,
)
from serving.errors import DataError, InvalidArgument, NotFound, ServingError, Unavailable
from serving.interceptors import Registrar
from serving.metrics import REDIS_UP, observe_pipeline_status
from serving.store import ScoreStore, open_store
from serving.threads import CallRouter
from serving.watch import CLOSED, RESYNC, UpdateHub

log = logging.getLogger(__name__)

SERVICE = scoring_pb2.DESCRIPTOR.services_by_name["Scoring"].full_name
MAX_ID_LENGTH = 128
MAX_BATCH = 1000
WATCH_SUBSCRIBE_TIMEOUT_S = 5.0
STREAM_THREADS_SPARE = 3


class ServerConfigError(ValueError):
    """The server cannot start with these settings (TLS files, address)."""


def check_id(customer_id: str, field: str = "customer_id") -> str:
    if not customer_id:
        raise InvalidArgument(f"{field} is empty")
    if len(customer_id) > MAX_ID_LENGTH:
        raise InvalidArgument(
            f"{field} is {len(customer_id)} characters long; at most {MAX_ID_LENGTH} are allowed"
        )
    return customer_id


def _remaining(context: grpc.ServicerContext) -> float | None:
    return context.time_remaining()  # None without a deadline; the store caps it anyway


class ScoringServicer(scoring_pb2_grpc.ScoringServicer):
    def __init__(self, store: ScoreStore, hub: UpdateHub, cache: ScoreCache | None = None) -> None:
        self.store = store
        self.hub = hub
        self.cache = cache

    # GetScore and BatchGetScores answer serialized CustomerScores (bytes): what the cache
    # holds. Registrar lets a behavior return its reply serialized.

    def GetScore(self, request: Any, context: grpc.ServicerContext) -> Any:
        customer_id = check_id(request.customer_id)
        score = None if self.cache is None else self.cache.lookup(customer_id)
        if score is None:
            (score,) = self._read([customer_id], _remaining(context))
            if score is None:
                raise NotFound(f"customer {customer_id!r} has no score")
        return score

    def BatchGetScores(self, request: Any, context: grpc.ServicerContext) -> Any:
        ids = request.customer_ids
        if not ids:
            raise InvalidArgument("customer_ids is empty: ask for 1 to 1000 customers")
        if len(ids) > MAX_BATCH:
            raise InvalidArgument(
                f"customer_ids has {len(ids)} ids; at most {MAX_BATCH} are allowed per call"
            )
        for n, customer_id in enumerate(ids):
            check_id(customer_id, f"customer_ids[{n}]")
        scores = dict.fromkeys(ids)  # in order, each id once
        if self.cache is not None:
            for customer_id in scores:
                scores[customer_id] = self.cache.lookup(customer_id)
        unread = [c for c, score in scores.items() if score is None]
        if unread:
            scores.update(zip(unread, self._read(unread, _remaining(context)), strict=True))
        response = scoring_pb2.BatchGetScoresResponse()
        for customer_id, score in scores.items():
            if score is None:
                response.missing_ids.append(customer_id)
            else:
                response.scores.add().MergeFromString(score)
        return response.SerializeToString()

    def _read(self, customer_ids: list[str], timeout: float | None) -> list[bytes | None]:
        """Serialized scores (None: no score) of ``customer_ids`` from Redis, into the
        cache when it is live."""
        redirect = None if self.cache is None else self.cache.redirect()
        if redirect is None:
            docs = self.store.get_many(customer_ids, timeout)
            return [None if d is None else score_message(d).SerializeToString() for d in docs]
        assert self.cache is not None
        reservations = [self.cache.reserve(c, redirect) for c in customer_ids]
        docs, tracked = self.store.get_tracked(customer_ids, redirect, timeout)
        if not tracked:
            self.cache.refused(redirect)
        scores = []
        for customer_id, reservation, doc in zip(customer_ids, reservations, docs, strict=True):
            score = None if doc is None else score_message(doc).SerializeToString()
            if reservation is not None:
                self.cache.fill(customer_id, reservation, score if tracked else None)
            scores.append(score)
        return scores

    def WatchCustomer(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        customer_id = check_id(request.customer_id)
        watcher = self.hub.watch(customer_id)
        try:
            context.add_callback(watcher.close)  # wakes the loop below when the call ends
            remaining = _remaining(context)
            wait = WATCH_SUBSCRIBE_TIMEOUT_S if remaining is None else remaining
            self.hub.wait_subscribed(watcher, min(wait, WATCH_SUBSCRIBE_TIMEOUT_S))
            last = -1
            item: Any = RESYNC  # first: the current score
            resync_pending = False
            while context.is_active():
                if item is CLOSED:
                    return
                if item is None and resync_pending:
                    item = RESYNC
                message = None
                if item is RESYNC:
                    try:
                        doc = self.store.get(customer_id)
                        resync_pending = False
                    except Unavailable as exc:  # retried until Redis answers again
                        log.warning("watch resync failed, retrying: %s", exc.message)
                        doc, resync_pending = None, True
                    message = None if doc is None else score_message(doc)
                elif item is not None:
                    message = score_message(item)
                if message is not None and message.version > last:
                    last = message.version
                    yield message
                item = watcher.next(timeout=0.2 if resync_pending else 1.0)
        finally:
            self.hub.unwatch(watcher)

    def GetPipelineStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        doc = self.store.status(_remaining(context))
        if doc is None:
            raise NotFound("no pipeline status in Redis yet: has the flow run?")
        return status_message(doc)

    def GetModelReport(self, request: Any, context: grpc.ServicerContext) -> Any:
        return model_report_message(self.store.model_report(_remaining(context)))

    def GetAlertReport(self, request: Any, context: grpc.ServicerContext) -> Any:
        doc = self.store.alert_report(_remaining(context))
        if doc is None:
            raise NotFound("no alert report in Redis yet: has the flow run with alert rules?")
        return alert_report_message(doc)

    def ListSegments(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Counts by SCAN over every score document: O(customers) per call, fine for an
        operator's screen at up to ~1M customers; a counter maintained by the flow
        should replace it when it becomes a hot path."""
        by_stage_tier: Counter[tuple[str, str]] = Counter()
        by_segment: Counter[str] = Counter()
        total = 0
        for raw in self.store.iter_docs(_remaining(context)):
            try:
                d = load(raw)
            except ValueError as exc:  # DocumentError, orjson.JSONDecodeError
                raise DataError(f"unreadable score document in Redis: {exc!r}") from exc
            total += 1
            by_stage_tier[(d.get("lifecycle_stage") or "", d.get("value_tier") or "")] += 1
            by_segment[(d.get("rfm") or {}).get("segment") or ""] += 1
        computed_at = Timestamp()
        computed_at.GetCurrentTime()
        return scoring_pb2.ListSegmentsResponse(
            customers_total=total,
            by_stage_tier=[
                scoring_pb2.StageTierCount(lifecycle_stage=s, value_tier=t, customers=n)
                for (s, t), n in sorted(by_stage_tier.items(), key=lambda kv: (-kv[1], kv[0]))
            ],
            by_rfm_segment=[
                scoring_pb2.RfmSegmentCount(segment=s, customers=n)
                for s, n in sorted(by_segment.items(), key=lambda kv: (-kv[1], kv[0]))
            ],
            computed_at=computed_at,
        )


class HealthChecker:
    """Sets the health service to SERVING while Redis answers PING, NOT_SERVING otherwise;
    samples the flow's pipeline status for the metrics while it does."""

    def __init__(self, store: ScoreStore, servicer: health.HealthServicer, interval: float):
        self._store = store
        self._servicer = servicer
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="crmscore-health", daemon=True)
        self.serving: bool | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def check(self) -> bool:
        try:
            self._store.ping(min(self._interval, self._store.timeout))
            up = True
        except ServingError as exc:
            up = False
            if self.serving is not False:
                log.warning("health NOT_SERVING: %s", exc.message)
        if up and self.serving is not True:
            log.info("health SERVING: Redis answers")
        if up != self.serving:
            status = health_pb2.HealthCheckResponse.SERVING if up else (
                health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for service in ("", SERVICE):
                self._servicer.set(service, status)
            REDIS_UP.set(1 if up else 0)
        self.serving = up
        if up:
            self._sample_pipeline_status()
        return up

    def _sample_pipeline_status(self) -> None:
        """The flow's status into the metrics (serving/metrics.py): one read per check."""
        try:
            raw = self._store.status(min(self._interval, self._store.timeout))
            observe_pipeline_status(None if raw is None else status_message(raw))
        except ServingError as exc:  # the gauges keep their values; the age grows
            log.debug("pipeline status not sampled: %s", exc.message)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check()
            self._stop.wait(self._interval)


class ScoringServer:
    """The grpc.Server and the helpers that live and stop with it."""

    def __init__(
        self, server: grpc.Server, store: ScoreStore, hub: UpdateHub,
        health_checker: HealthChecker, cache: ScoreCache | None = None,
    ) -> None:
        self.grpc = server
        self.store = store
        self.hub = hub
        self.health = health_checker
        self.cache = cache

    def start(self) -> None:
        self.health.start()
        if self.cache is not None:
            self.cache.start()
        self.grpc.start()

    def stop(self, grace: float | None = None) -> threading.Event:
        """Refuse new calls, give in-flight ones ``grace`` seconds, then release Redis."""
        self.hub.stop()  # ends the watch streams, which would otherwise outlive the grace
        done = self.grpc.stop(grace)
        self.health.stop()
        if self.cache is not None:
            self.cache.stop()

        def release() -> None:
            done.wait()
            self.store.close()

        threading.Thread(target=release, name="crmscore-release", daemon=True).start()
        return done

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return bool(self.grpc.wait_for_termination(timeout))


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ServerConfigError(f"cannot read the {what} {path!r}: {exc.strerror}") from exc


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the tls_* settings, or None for plaintext."""
    if not settings.tls_cert and not settings.tls_key:
        if settings.tls_client_ca:
            raise ServerConfigError("CRMSCORE_TLS_CLIENT_CA needs CRMSCORE_TLS_CERT and _KEY")
        return None
    if not (settings.tls_cert and settings.tls_key):
        raise ServerConfigError("TLS needs both CRMSCORE_TLS_CERT and CRMSCORE_TLS_KEY")
    pair = (_read(settings.tls_key, "TLS key"), _read(settings.tls_cert, "TLS certificate"))
    client_ca = _read(settings.tls_client_ca, "client CA") if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def create_server(
    settings: Settings, address: str | None = None
) -> tuple[ScoringServer, int]:
    """Build (not start) the server on ``address`` (default: settings.grpc_address)."""
    address = address or settings.grpc_address
    keys = ApiKeys.parse(settings.api_keys)
    auth = auth_enabled(settings.auth)
    if auth:
        if not keys.entries:
            log.warning("auth on but CRMSCORE_API_KEYS is empty: every Scoring call will be "
                        "refused (create a key with `crmscore keys new --role reader`)")
    else:
        log.warning("!!! AUTH IS OFF (CRMSCORE_AUTH=off): anyone who reaches %s can read "
                    "every score and the pipeline status. For local demos only. !!!", address)
    credentials = server_credentials(settings)

    limit = settings.grpc_max_message_bytes
    # Streams get threads of their own: one per allowed watcher, and a few more so that a
    # watcher over the cap is refused at once and health Watch / reflection streams fit.
    server = grpc.server(
        CallRouter(settings.grpc_workers, settings.max_watchers + STREAM_THREADS_SPARE),
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ],
    )
    store = open_store(settings)
    hub = UpdateHub(settings, max_watchers=settings.max_watchers)
    registrar = Registrar(server, keys if auth else None)  # auth, metrics, error statuses
    cache = score_cache(settings)
    scoring_pb2_grpc.add_ScoringServicer_to_server(ScoringServicer(store, hub, cache), registrar)
    health_servicer = health.HealthServicer()
    for service in ("", SERVICE):
        health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, registrar)
    reflection.enable_server_reflection(
        (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), registrar
    )
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        store.close()
        raise ServerConfigError(f"cannot listen on {address}: {exc}") from exc
    if port == 0:
        store.close()
        raise ServerConfigError(f"cannot listen on {address}")
    log.info(
        "gRPC server built address=%s port=%d tls=%s client_certs=%s auth=%s api_keys=%d "
        "workers=%d max_message_bytes=%d", address, port, credentials is not None,
        bool(settings.tls_client_ca), settings.auth, len(keys.entries), settings.grpc_workers,
        limit,
    )
    checker = HealthChecker(store, health_servicer, settings.health_interval)
    return ScoringServer(server, store, hub, checker, cache), port


def score_cache(settings: Settings) -> ScoreCache | None:
    """The server's score cache, or None: turned off, or on a Redis Cluster (an
    invalidation reaches only a client on the node that owns the key)."""
    if settings.score_cache_size <= 0:
        log.info("score cache off (score_cache_size=%d)", settings.score_cache_size)
        return None
    if settings.redis_cluster:
        log.info("score cache off: not on a Redis Cluster")
        return None
    return ScoreCache(settings, settings.score_cache_size)
