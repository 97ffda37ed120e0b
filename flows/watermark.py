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
A partition that has delivered nothing for ``idle_seconds`` (wall clock: it is caught
up, or its producers are quiet) no longer holds the clock back; when every partition is
idle, all that was read has been applied and the clock is the newest event time seen.
The clock never moves back. Quiet is wall-clock, so a flow that stalls for longer than
``idle_seconds`` with events still unread (Redis down, a long pause) takes every
partition for caught up and lets the clock run to the newest event time seen: the
newest-anywhere clock of before, for that moment.

>>> mark = Watermark(idle_seconds=2.0)
>>> mark.update({0: 100, 1: 40}, now=0.0)
>>> mark.advance(now=0.5)  # partition 1 is behind: the clock waits for it
40
>>> mark.update({0: 180}, now=1.5)
>>> mark.advance(now=1.6), mark.idle_at(now=1.6)
(40, 2.0)
>>> mark.advance(now=2.5)  # partition 1 went quiet: it no longer holds the clock back
180
>>> mark.update({1: 60}, now=3.0)  # a late partition speaks again: the clock stays
>>> mark.advance(now=3.1)
180
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

IDLE_SECONDS = 2.0  # a partition read continuously delivers far more often than this


class Watermark:
    """Newest event time applied per partition, and the clock they allow. Picklable
    (what was heard when is wall-clock: a restored partition counts as just heard)."""

    __slots__ = ("idle_seconds", "newest", "heard", "clock_us", "moves")

    def __init__(self, idle_seconds: float = IDLE_SECONDS, clock_us: int | None = None,
                 newest: Mapping[int, int] | None = None, moves: int = 0) -> None:
        self.idle_seconds = idle_seconds
        self.newest: dict[int, int] = dict(newest or {})
        self.heard: dict[int, float] = dict.fromkeys(self.newest, time.monotonic())
        self.clock_us = clock_us
        self.moves = moves  # how often the clock moved: only grows (it orders documents)

    def __getstate__(self) -> tuple[float, int | None, dict[int, int], int]:
        return self.idle_seconds, self.clock_us, self.newest, self.moves

    def __setstate__(self, state: tuple[float, int | None, dict[int, int], int]) -> None:
        self.__init__(*state)  # type: ignore[misc]

    def update(self, newest: Mapping[int, int], now: float | None = None) -> None:
        """Partitions that delivered, with the newest event time applied from each."""
        now = time.monotonic() if now is None else now
        for partition, at_us in newest.items():
            self.heard[partition] = now
            self.newest[partition] = max(at_us, self.newest.get(partition, at_us))

    def advance(self, now: float | None = None) -> int | None:
        """Move the clock to the watermark; returns the clock (None before any event)."""
        now = time.monotonic() if now is None else now
        active = [self.newest[p] for p, heard in self.heard.items()
                  if now - heard < self.idle_seconds]
        mark = min(active) if active else max(self.newest.values(), default=None)
        if mark is not None and (self.clock_us is None or mark > self.clock_us):
            self.clock_us = mark
            self.moves += 1
        return self.clock_us

    def idle_at(self, now: float | None = None) -> float | None:
        """When (``time.monotonic``) an active partition turns idle, which may let the
        clock move on; None when the clock is already at the newest event time seen."""
        now = time.monotonic() if now is None else now
        top = max(self.newest.values(), default=None)
        if top is None or (self.clock_us is not None and self.clock_us >= top):
            return None
        ends = [heard + self.idle_seconds for heard in self.heard.values()
                if heard + self.idle_seconds > now]
        return min(ends, default=None)

    def quiet_at(self) -> datetime | None:
        """:meth:`idle_at` as a wall-clock instant, for a step's ``notify_at``."""
        idle_at = self.idle_at()
        if idle_at is None:
            return None
        return datetime.now(UTC) + timedelta(seconds=max(idle_at - time.monotonic(), 0.0))
