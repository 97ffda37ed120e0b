"""The stream clock: the event time every partition has reached (a watermark).

Kafka keeps order within a partition only, and the flow reads its partitions each at its
own pace: replaying history, one partition ran six weeks of event time ahead of another.
With the clock at the newest event time applied anywhere, that skew fired a customer's
wake-ups (a churn label maturing as "no purchase", a lifecycle change, a refresh) while
the customer's purchase still waited in the slower partition, and the BTYD refits took
the clock as everyone's age while 9% of the sampled customers' rows lacked their newest
purchases. On CDNOW through four partitions, served churn AUC ranged 0.752-0.761 and
the total of ``expected_purchases`` 13,300-19,200 from run to run; with this clock,
0.761-0.762 and 19,658-19,666 in most runs (19,674 actual purchases).

So the clock is the minimum over partitions of the newest event time applied from each.
A partition that was read in full and has delivered nothing since for ``idle_seconds``
(wall clock: it is caught up, or its producers are quiet) no longer holds the clock
back; when every partition is idle, all that was read has been applied and the clock is
the newest event time seen. The clock never moves back.

*Read in full* is the consumer's end-of-partition signal (flows/kafka_source.py): the
end it reported is the offset after the newest one counted, or it came before any
message was read in this run. Silence alone is not enough: any stall of the flow (Redis
or the broker frozen, a long pause of the worker while a promotion rescored everyone)
used to turn every partition idle at once, and the clock ran to the newest event time
seen past events still unread in slower partitions: customers woken there churned
before their own purchases were read (one CI run in several). And a partition not yet
heard from does hold the clock: at the start, the first partition to deliver used to set
it alone. tests/test_watermark_e2e.py shows both, freezing the broker mid-read.

So the flow names its ``partitions`` (the transactions topic's): each holds the clock
until it has been read in full and quiet for ``idle_seconds``. Partitions it does not
name (sources without Kafka, tests) go idle on silence alone.

>>> mark = Watermark(idle_seconds=2.0, partitions={0, 1, 2})
>>> mark.update({0: 100, 1: 40}, now=0.0, offsets={0: 9, 1: 4})
>>> mark.advance(now=0.5) is None  # partition 2 has not been heard from
True
>>> mark.update({}, now=0.6, ends={2: 0}, empty={2})  # it holds nothing
>>> mark.advance(now=0.7)  # partition 1 is behind: the clock waits for it
40
>>> mark.update({0: 180}, now=1.5, offsets={0: 12})
>>> mark.advance(now=2.5)  # partition 1 is silent, but was never read to its end
40
>>> mark.update({}, now=2.6, ends={1: 5})  # it was: offset 4 was its last
>>> mark.advance(now=2.7)  # so it no longer holds the clock back
180
>>> mark.update({1: 60}, now=3.0, offsets={1: 5})  # a late partition speaks again
>>> mark.advance(now=3.1)  # the clock stays
180
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping
from datetime import UTC, datetime, timedelta

IDLE_SECONDS = 2.0  # a partition read continuously delivers far more often than this


def keep_newest(into: dict[int, int], pairs: Iterable[tuple[int, int]]) -> None:
    """Merge ``(partition, value)`` pairs into ``into``, keeping the larger value of each."""
    for partition, value in pairs:
        into[partition] = max(value, into.get(partition, value))


class Watermark:
    """Newest event time applied per partition, and the clock they allow. Picklable
    (what was heard when is wall-clock: a restored partition counts as just heard)."""

    __slots__ = ("idle_seconds", "newest", "heard", "clock_us", "moves", "partitions",
                 "counted", "ends", "empty", "stamps")

    def __init__(self, idle_seconds: float = IDLE_SECONDS, clock_us: int | None = None,
                 newest: Mapping[int, int] | None = None, moves: int = 0,
                 partitions: Collection[int] = ()) -> None:
        self.idle_seconds = idle_seconds
        self.newest: dict[int, int] = dict(newest or {})
        self.heard: dict[int, float] = dict.fromkeys(self.newest, time.monotonic())
        self.clock_us = clock_us
        self.moves = moves  # how often the clock moved (a new status is due when it does)
        self.partitions = frozenset(partitions)  # the flow's (the setting: not snapshotted)
        # Per partition, the newest offset counted, the newest end reported, whether an
        # end came before any message, and the newest Kafka timestamp counted (ms). Not
        # snapshotted: a resumed source reports its ends again once it has read them.
        self.counted: dict[int, int] = {}
        self.ends: dict[int, int] = {}
        self.empty: set[int] = set()
        self.stamps: dict[int, int] = {}

    def __getstate__(self) -> tuple[float, int | None, dict[int, int], int]:
        return self.idle_seconds, self.clock_us, self.newest, self.moves

    def __setstate__(self, state: tuple[float, int | None, dict[int, int], int]) -> None:
        self.__init__(*state)  # type: ignore[misc]

    def update(self, newest: Mapping[int, int], now: float | None = None, *,
               offsets: Mapping[int, int] | None = None, ends: Mapping[int, int] | None = None,
               empty: Collection[int] = (), stamps: Mapping[int, int] | None = None) -> None:
        """Partitions that delivered, with the newest event time applied from each; the
        newest offset counted from each; ends of partitions reported, the partitions
        whose end came before any message, and the newest Kafka timestamp (ms) counted
        from each."""
        now = time.monotonic() if now is None else now
        for partition, at_us in newest.items():
            self.heard[partition] = now
            self.newest[partition] = max(at_us, self.newest.get(partition, at_us))
        keep_newest(self.counted, (offsets or {}).items())
        keep_newest(self.ends, (ends or {}).items())
        self.empty.update(empty)
        keep_newest(self.stamps, (stamps or {}).items())

    def read_in_full(self, partition: int) -> bool:
        """Whether everything the partition held when its consumer last reported its end
        has been counted (always, for a partition the flow does not name)."""
        if partition not in self.partitions:
            return True
        counted = self.counted.get(partition)
        if counted is None:
            return partition in self.empty
        return self.ends.get(partition) == counted + 1

    def lags(self, now_ms: int) -> dict[int, float]:
        """Per partition the flow names, how far its reading is behind, in seconds: 0 once
        read in full, else how long the newest message counted from it has been in Kafka
        (``now_ms`` less its timestamp). A partition with nothing counted in this run and
        not known empty is left out: how far behind it is, nobody can tell yet."""
        lags = {}
        for partition in sorted(self.partitions):
            if self.read_in_full(partition):
                lags[partition] = 0.0
            elif (stamp := self.stamps.get(partition)) is not None:
                lags[partition] = max(now_ms - stamp, 0) / 1000
        return lags

    def _holds(self, partition: int, now: float) -> bool:
        heard = self.heard.get(partition)
        quiet = heard is None or now - heard >= self.idle_seconds
        return not (quiet and self.read_in_full(partition))

    def advance(self, now: float | None = None) -> int | None:
        """Move the clock to the watermark; returns the clock (None before any event)."""
        now = time.monotonic() if now is None else now
        holding = [p for p in self.partitions.union(self.heard) if self._holds(p, now)]
        if any(p not in self.newest for p in holding):  # not heard from: no mark yet
            return self.clock_us
        mark = (min(self.newest[p] for p in holding) if holding
                else max(self.newest.values(), default=None))
        if mark is not None and (self.clock_us is None or mark > self.clock_us):
            self.clock_us = mark
            self.moves += 1
        return self.clock_us

    def idle_at(self, now: float | None = None) -> float | None:
        """When (``time.monotonic``) a partition read in full turns idle, which may let
        the clock move on; None when the clock is already at the newest event time seen,
        or no partition can turn idle before it delivers again or reports its end."""
        now = time.monotonic() if now is None else now
        top = max(self.newest.values(), default=None)
        if top is None or (self.clock_us is not None and self.clock_us >= top):
            return None
        ends = [heard + self.idle_seconds for p, heard in self.heard.items()
                if heard + self.idle_seconds > now and self.read_in_full(p)]
        return min(ends, default=None)

    def quiet_at(self) -> datetime | None:
        """:meth:`idle_at` as a wall-clock instant, for a step's ``notify_at``."""
        idle_at = self.idle_at()
        if idle_at is None:
            return None
        return datetime.now(UTC) + timedelta(seconds=max(idle_at - time.monotonic(), 0.0))
