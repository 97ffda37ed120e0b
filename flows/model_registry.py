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
Redis must be trusted (bundles are pickles): the same trust the score store needs.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time

import redis

from crmscore.clients import redis_client
from crmscore.layout import RedisLayout
from crmscore.settings import Settings
from flows.redis_sink import VersionedDoc
from models.scoring import ModelBundle

log = logging.getLogger(__name__)


def bundle_doc(layout: RedisLayout, bundle: ModelBundle) -> VersionedDoc:
    return VersionedDoc(layout.model_bundle(), bundle.version,
                        pickle.dumps(bundle, protocol=pickle.HIGHEST_PROTOCOL))


class BundleCache:
    """The newest published bundle, shared by the worker threads of one process."""

    def __init__(self, client: redis.Redis, layout: RedisLayout, initial: ModelBundle,
                 refresh_seconds: float = 0.5) -> None:
        self._client = client
        self._key = layout.model_bundle()
        self._bundle = initial
        self._refresh = refresh_seconds
        self._checked_at = -float("inf")
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

    def _load(self) -> None:
        try:
            version = self._client.hget(self._key, "v")
            if version is None or int(version) <= self._bundle.version:
                return
            blob = self._client.hget(self._key, "doc")
            if isinstance(blob, bytes):
                self._bundle = pickle.loads(blob)
        except (redis.RedisError, pickle.UnpicklingError, EOFError, AttributeError) as exc:
            # Scores go on with the bundle in hand; the next refresh tries again.
            log.warning("model bundle not refreshed from Redis: %s", exc)


_caches: dict[tuple[str, str], BundleCache] = {}
_caches_lock = threading.Lock()


def shared_cache(settings: Settings, initial: ModelBundle) -> BundleCache:
    """One cache per process and Redis key prefix."""
    key = (settings.redis_url, settings.redis_prefix)
    with _caches_lock:
        if key not in _caches:
            _caches[key] = BundleCache(redis_client(settings), RedisLayout(settings.redis_prefix),
                                       initial)
        return _caches[key]
