"""The model registry: the models step publishes bundles to Redis, customer steps read them.

Churn models learn from every customer's labels and the population statistics span all
customers, so they live in one ``models`` step; every customer, on any worker or
process, needs to read them. A dataflow cannot broadcast to millions of keys, so the
models step publishes a :class:`~models.scoring.ModelBundle` (pickled, versioned, with
the same never-backwards compare-and-set as every document) to
``{prefix}models:bundle``, and each flow process keeps the newest one in a
:class:`BundleCache`, checking its version at most every ``refresh_seconds``.

Consequences, by design: a score names the bundle behind it (``model_version``); a
bundle reaches customers a refresh later than it was learned; after a restart, customers
score with the last published bundle until the recovered models step publishes again.
So with live updates, a decision that reads the models (churn risk, value tier, a
risk-driven stage, the alerts on them) depends on which bundle had arrived when the
customer was scored: a crash or a replay at another speed can decide differently.

``CRMSCORE_MODEL_UPDATES=frozen`` removes that: every process scores with the bundle
found in Redis when it starts (the cold-start priors if none), and the models step keeps
learning but publishes its bundle as ``{prefix}models:candidate``. Scores and alerts no
longer depend on when a bundle arrived (they still can on disordered events:
docs/design.md, "Known gap: disorder"). Campaign periods want this too
(the uplift of an alert is measured under one model). ``crmscore models promote`` makes
the candidate the served bundle; frozen processes take it at their next start.

Redis must be trusted (bundles are pickles): the same trust the score store needs.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time

import redis

from crmscore.clients import RedisClient, redis_client
from crmscore.layout import RedisLayout
from crmscore.settings import Settings
from flows.redis_sink import VersionedDoc
from models.scoring import ModelBundle

log = logging.getLogger(__name__)


LIVE, FROZEN = "live", "frozen"
UPDATES = (LIVE, FROZEN)


# What reading a bundle can raise: Redis down (a cluster client's own errors are not
# RedisErrors), or a blob that is not a bundle.
_LOAD_ERRORS = (redis.RedisError, redis.RedisClusterException, pickle.UnpicklingError,
                EOFError, AttributeError)


class ModelRegistryError(RuntimeError):
    """The model updates setting is wrong, or a frozen start cannot read its bundle."""


def updates_mode(value: str) -> str:
    """CRMSCORE_MODEL_UPDATES: 'live' (default) or 'frozen'."""
    lowered = value.strip().lower()
    if lowered not in UPDATES:
        raise ModelRegistryError(
            f"CRMSCORE_MODEL_UPDATES: expected 'live' or 'frozen', got {value!r}")
    return lowered


def bundle_doc(layout: RedisLayout, bundle: ModelBundle, *, frozen: bool = False
               ) -> VersionedDoc:
    """The bundle as a document: the served one, or with ``frozen`` the candidate."""
    key = layout.model_candidate() if frozen else layout.model_bundle()
    return VersionedDoc(key, bundle.version,
                        pickle.dumps(bundle, protocol=pickle.HIGHEST_PROTOCOL))


def load_published(client: RedisClient, key: str) -> ModelBundle | None:
    """The bundle stored at ``key``, or None if there is none; Redis errors propagate."""
    blob = client.hget(key, "doc")
    if not isinstance(blob, bytes):
        return None
    bundle: ModelBundle = pickle.loads(blob)
    return bundle


# Pauses before each read while a rescore wake waits for its bundle (BundleCache.at_least).
AT_LEAST_WAITS = (0.0, 0.01, 0.05, 0.25)


class BundleCache:
    """The newest published bundle, shared by the worker threads of one process."""

    def __init__(self, client: RedisClient, layout: RedisLayout, initial: ModelBundle,
                 refresh_seconds: float = 0.5, *, frozen: bool = False) -> None:
        self._client = client
        self._key = layout.model_bundle()
        self._bundle = initial
        self._refresh = refresh_seconds
        self._checked_at = -float("inf")
        self._given_up = 0  # the newest version a rescore wake waited for in vain
        self.frozen = frozen
        if frozen:  # the bundle in Redis now, for the life of the process
            try:
                self._bundle = load_published(client, self._key) or initial
            except _LOAD_ERRORS as exc:
                raise ModelRegistryError(
                    f"frozen model updates: cannot read {self._key} from Redis: {exc}") from exc
            self._checked_at = float("inf")
        self._lock = threading.Lock()

    def get(self) -> ModelBundle:
        now = time.monotonic()
        if now - self._checked_at < self._refresh:
            return self._bundle
        with self._lock:
            if now - self._checked_at >= self._refresh:
                self._checked_at = now
                self._load()
        return self._bundle

    def at_least(self, version: int) -> ModelBundle:
        """The newest bundle, read from Redis at once if the one in hand is older than
        ``version`` (a rescore wake names the bundle it was sent for).

        A wake that overtook its bundle on the way to Redis (the sink writes it within a
        millisecond, the wake goes round through Kafka: not seen here, but nothing forbids
        it) waits for it a little, up to ~0.3 s: rescored with the older bundle, the
        customer would keep naming the old model until their next instant."""
        bundle = self.get()
        if bundle.version >= version or self.frozen:
            return bundle
        # Waited for in vain once: every other wake of that rescore reads once, no more
        # (thousands of customers may be waiting for it).
        waits = AT_LEAST_WAITS[:1] if version <= self._given_up else AT_LEAST_WAITS
        for wait in waits:
            time.sleep(wait)
            with self._lock:
                self._checked_at = time.monotonic()
                self._load()
            if self._bundle.version >= version:
                return self._bundle
        if version > self._given_up:
            self._given_up = version
            log.warning("rescore wake for model bundle %d: Redis still holds %d after "
                        "%.2f s; rescored with it", version, self._bundle.version,
                        sum(AT_LEAST_WAITS))
        return self._bundle

    def _load(self) -> None:
        try:
            version = self._client.hget(self._key, "v")
            if version is None or int(version) <= self._bundle.version:
                return
            self._bundle = load_published(self._client, self._key) or self._bundle
        except _LOAD_ERRORS as exc:
            # Scores go on with the bundle in hand; the next refresh tries again.
            log.warning("model bundle not refreshed from Redis: %s", exc)


_caches: dict[tuple[str, str, bool], BundleCache] = {}
_caches_lock = threading.Lock()


def shared_cache(settings: Settings, initial: ModelBundle) -> BundleCache:
    """One cache per process, Redis key prefix and updates mode."""
    frozen = updates_mode(settings.model_updates) == FROZEN
    key = (settings.redis_url, settings.redis_prefix, frozen)
    with _caches_lock:
        if key not in _caches:
            _caches[key] = BundleCache(redis_client(settings), RedisLayout(settings.redis_prefix),
                                       initial, frozen=frozen)
        return _caches[key]


def restore_frozen_bundle(settings: Settings) -> None:
    """Write this process's frozen bundle back to Redis if Redis lost it, so a restarted
    flow scores with the same models (flows/store_marker.py)."""
    layout = RedisLayout(settings.redis_prefix)
    with _caches_lock:
        cache = _caches.get((settings.redis_url, settings.redis_prefix, True))
    if cache is None or cache.get().version == 0:  # not frozen, or frozen on the priors
        return
    doc = bundle_doc(layout, cache.get())
    with redis_client(settings) as client:
        if not client.exists(doc.key):
            client.hset(doc.key, mapping={"v": doc.version, "doc": doc.doc})
