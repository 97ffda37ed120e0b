"""Noticing that Redis lost the flow's data, so the flow can write it again.

Redis holds what the flow computed (score documents, status, reports); the flow's
recovered state holds the truth. A Redis restarted empty (no persistence, a failover to
an empty replica, a FLUSHALL) would otherwise keep serving NOT_FOUND for every customer
who has not changed since. So the flow keeps a marker key in Redis:

- at start it claims the store: if the marker is missing, Redis lost (or never had) the
  flow's data, and every resumed customer rewrites its score document from the recovered
  state (``rewrite``: bytewax calls each resumed logic's ``notify_at`` once it is built);
- while running, every Redis write also checks the marker (an idle flow still writes
  its status every few seconds); when it has gone, the sink calls ``on_lost``:
  ``crmscore flow`` restarts itself from its last snapshot, which rewrites the documents
  of that snapshot and re-applies everything after it, so Redis ends exactly as if
  nothing had been lost.

A crash within the first snapshot interval after a rewrite started can leave documents
unwritten (the marker is already back); ``crmscore flow --rewrite-store`` forces one.
"""

from __future__ import annotations

import logging
import time

import redis

from crmscore.clients import RedisClient
from crmscore.layout import RedisLayout

log = logging.getLogger(__name__)

_MAX_WAIT_S = 5.0


class StoreLost(RuntimeError):
    """The marker key vanished while the flow ran: Redis lost the flow's data."""


def claim_store(client: RedisClient, layout: RedisLayout) -> bool:
    """Set the marker; True if it was missing (the documents must be rewritten).

    Waits for Redis, retrying with backoff: a flow cannot write anything without it.
    """
    backoff = 0.1
    while True:
        try:
            lost = client.set(layout.store_marker(), time.time_ns(), nx=True)
            return bool(lost)
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
            log.warning("Redis not answering at start (%s); retrying in %.1f s", exc, backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, _MAX_WAIT_S)


def raise_store_lost(marker: str) -> None:
    raise StoreLost(f"Redis lost the flow's data (the key {marker!r} is gone); restart the "
                    "flow: it rewrites the score documents from its recovered state")
