"""The stream's event-time clock and the pipeline status: the flow's one ``clock`` key.

Customers send the outcome counts of their batches (applied, duplicate, rejected, and
the newest event time applied from each partition) and their wake-up registrations. The
clock sums the counts into the status document (``GetPipelineStatus``), keeps the stream
clock (the watermark of the partitions, flows/watermark.py), fires registrations already
due and routes the others to the timer bucket of their hour, ticking each open hour
once the clock passes it (flows/timers.py).
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import orjson
from bytewax.operators import StatefulBatchLogic

from crmscore.layout import RedisLayout
from flows.redis_sink import VersionedDoc
from flows.timers import (
    BUCKET_US,
    Cancel,
    OpenBuckets,
    Registration,
    Rescore,
    RescoreAll,
    Wake,
)
from flows.watermark import IDLE_SECONDS, Watermark, keep_newest
from models.transaction import format_time

# How often an idle flow writes its status anyway: the write that notices, within this
# delay, that Redis lost the flow's data (flows/store_marker.py).
STATUS_HEARTBEAT = timedelta(seconds=5)


# The partition of counts that do not say theirs (tests, sources without partitions).
UNPARTITIONED = -1


class Counts(NamedTuple):
    """Outcome counts of some messages; the newest event time among those applied, and
    per partition (``(partition, newest), ...``) the newest among those applied or
    repeated: how far each partition has been read. ``offsets``: per partition, the
    newest offset counted (any outcome); ``ends``: the newest end of partition reported
    (flows/kafka_source.py, PartitionEnd) and ``empty`` the partitions whose end came
    before any message: what tells a partition read in full (flows/watermark.py);
    ``stamps``: per partition, the newest Kafka timestamp (ms) counted: how long the
    reading trails the producers (the status's ``partition_lags``)."""

    applied: int = 0
    duplicate: int = 0
    rejected: int = 0
    clock_us: int | None = None
    partitions: tuple[tuple[int, int], ...] = ()
    offsets: tuple[tuple[int, int], ...] = ()
    ends: tuple[tuple[int, int], ...] = ()
    empty: tuple[int, ...] = ()
    stamps: tuple[tuple[int, int], ...] = ()

    def newest_by_partition(self) -> dict[int, int]:
        if self.partitions:
            return dict(self.partitions)
        return {} if self.clock_us is None else {UNPARTITIONED: self.clock_us}

    def observed_by(self, watermark: Watermark) -> None:
        """Tell ``watermark`` how far each partition has been read."""
        watermark.update(self.newest_by_partition(), offsets=dict(self.offsets),
                         ends=dict(self.ends), empty=self.empty, stamps=dict(self.stamps))


def sum_counts(batch: list[Counts], start: Counts | None = None) -> Counts:
    applied, duplicate, rejected, clock, *_ = start or Counts()
    newest: dict[int, int] = {}
    offsets: dict[int, int] = {}
    ends: dict[int, int] = {}
    empty: set[int] = set()
    stamps: dict[int, int] = {}
    for c in batch:
        applied += c.applied
        duplicate += c.duplicate
        rejected += c.rejected
        if c.clock_us is not None and (clock is None or c.clock_us > clock):
            clock = c.clock_us
        keep_newest(newest, c.partitions)
        keep_newest(offsets, c.offsets)
        keep_newest(ends, c.ends)
        empty.update(c.empty)
        keep_newest(stamps, c.stamps)
    return Counts(applied, duplicate, rejected, clock, tuple(newest.items()),
                  tuple(offsets.items()), tuple(ends.items()), tuple(empty),
                  tuple(stamps.items()))


class ClockLogic(StatefulBatchLogic[Counts | Registration | Cancel | Rescore, Any, bytes]):
    """Sums outcome counts into the pipeline status; keeps the stream clock; routes
    wake-up registrations (due ones fire at once), ticks the timer buckets, and passes a
    change of the served model to every open bucket (flows/timers.py, Promotions)."""

    def __init__(self, resume: bytes | None, layout: RedisLayout,
                 rescore_rate: float = 0.0, idle_seconds: float = IDLE_SECONDS,
                 partitions: Collection[int] = ()) -> None:
        self.totals, held, self.watermark = ((Counts(), {}, Watermark()) if resume is None
                                             else _clock_state(resume))
        self.watermark.idle_seconds = idle_seconds  # the setting wins over the snapshot's
        self.watermark.partitions = frozenset(partitions)  # the transactions topic's
        self.buckets = OpenBuckets(held)
        self.layout = layout
        # When to write the status again without new counts: at once when resumed (Redis
        # may hold an older one, or none), then every STATUS_HEARTBEAT.
        self.status_due: datetime | None = datetime.now(UTC) if resume is not None else None
        self.status_version = 0  # of the status written last
        # The newest bundle that changed the served model: a registration scored with an
        # older one gets a rescore wake (flows/timers.py, Promotions). Not snapshotted: a
        # restarted flow's customers read the newest bundle from Redis.
        self.rescore_version = 0
        self.rescore_rate = rescore_rate  # registrations a second; 0: all at once

    def on_batch(self, values: list[Counts | Registration | Cancel | Rescore]
                 ) -> tuple[list[Any], bool]:
        counts = [v for v in values if isinstance(v, Counts)]
        self.totals = sum_counts(counts, self.totals)
        moves = self.watermark.moves
        for c in counts:
            c.observed_by(self.watermark)
        clock = self.watermark.advance()
        out: list[Any] = []
        for r in values:
            if isinstance(r, Registration):
                if 0 < r.bundle_version < self.rescore_version:
                    out.append(Wake(r.customer_id, 0, bundle_version=self.rescore_version))
                if clock is not None and r.due_us <= clock:
                    out.append(r.wake(clock))
                else:
                    out.append(self.buckets.route(r))
            elif isinstance(r, Cancel):
                routed = self.buckets.cancel(r)
                if routed is not None:
                    out.append(routed)
            elif isinstance(r, Rescore):
                self.rescore_version = max(self.rescore_version, r.bundle_version)
                out += self._rescore_all(r.bundle_version)
        if clock is not None:
            out += self.buckets.passed(clock)
        # A new status when something was counted or the clock moved (not for an end of
        # partition alone: live, one comes after most fetches).
        if any(c.applied or c.duplicate or c.rejected for c in counts) \
                or self.watermark.moves != moves:
            out.append(self._status())
        return out, StatefulBatchLogic.RETAIN

    def _rescore_all(self, version: int) -> list[tuple[str, RescoreAll]]:
        """A RescoreAll for every open bucket, earliest hours first, each firing once the
        registrations before it have had their time at ``rescore_rate`` a second."""
        now, out, before = time.time(), [], 0
        for hour, held in sorted(self.buckets.held().items()):
            delay = before / self.rescore_rate if self.rescore_rate > 0 else 0.0
            out.append((str(hour), RescoreAll(version, now + delay)))
            before += held
        return out

    def notify_at(self) -> datetime | None:
        due = [at for at in (self.watermark.quiet_at(), self.status_due) if at is not None]
        return min(due, default=None)

    def on_notify(self) -> tuple[list[Any], bool]:
        """A quiet partition may let the clock move on; the status heartbeat."""
        before = self.watermark.clock_us
        clock = self.watermark.advance()
        out: list[Any] = []
        if clock is not None and clock != before:
            out += self.buckets.passed(clock)
        if clock != before or (self.status_due is not None
                               and datetime.now(UTC) >= self.status_due):
            out.append(self._status())
        return out, StatefulBatchLogic.RETAIN

    def _status(self) -> VersionedDoc:
        applied, duplicate, rejected, *_ = self.totals
        clock = self.watermark.clock_us
        consumed = applied + duplicate + rejected
        now_us = time.time_ns() // 1000
        lags = self.watermark.lags(now_us // 1000)
        doc = {
            "events_consumed": consumed,
            "events_applied": applied,
            "events_rejected": rejected,
            "events_duplicate": duplicate,
            "stream_clock": None if clock is None else format_time(clock),
            "updated_at": format_time(now_us),
            "partition_clocks": {str(p): format_time(t)
                                 for p, t in sorted(self.watermark.newest.items())},
            "input_lag_seconds": max(lags.values(), default=None),
            "partition_lag_seconds": {str(p): lag for p, lag in lags.items()},
        }
        self.status_due = datetime.now(UTC) + STATUS_HEARTBEAT
        # The newest status written wins, heartbeats included: they keep ``updated_at``
        # and the lags current while nothing is counted (a stall, or caught up). After a
        # restart that means the resumed run's counts at once, not the crashed run's
        # higher ones until it passes them. Wall-clock µs, made strictly increasing.
        self.status_version = max(now_us, self.status_version + 1)
        return VersionedDoc(self.layout.status(), self.status_version, orjson.dumps(doc))

    def snapshot(self) -> bytes:
        return pickle.dumps((self.totals, self.buckets.held(), self.watermark))


def _clock_state(resume: bytes) -> tuple[Counts, dict[int, int], Watermark]:
    """The clock's snapshot: totals, the registrations sent to each open hour, and the
    watermark (older snapshots: the clock was the newest event time, in the totals).

    Older snapshots: a list of open hours, without counts (0, unknown); totals only,
    from before open hours were kept: then every hour of the next ~2 years may hold
    registrations (the farthest a customer registers ahead), as the clock used to assume.
    """
    state = pickle.loads(resume)
    if isinstance(state, Counts):
        now = (state.clock_us or 0) // BUCKET_US
        return state, dict.fromkeys(range(now, now + 800 * 24), 0), Watermark(
            clock_us=state.clock_us)
    totals, held, *rest = state
    watermark = rest[0] if rest else Watermark(clock_us=totals.clock_us)
    return totals, held if isinstance(held, dict) else dict.fromkeys(held, 0), watermark
