"""Event-time wake-ups for customers, at millions of customers, in a dataflow without cycles.

bytewax's ``notify_at`` is wall-clock and a dataflow has no cycles, yet a silent
customer must turn at risk when the *stream's* clock passes their due instant. So the
wake-ups go round through Kafka, as a timer topic:

1. The customers step asks to be woken: a :class:`Registration` (customer, due instant).
2. The single clock step (it also keeps the pipeline status) knows the stream clock. A
   registration already due fires at once; any other goes to the timer bucket of its
   hour, a small key of the ``timers`` step. When the clock passes the end of an hour
   it has sent registrations to (:class:`OpenBuckets`), the clock step sends that bucket
   a :class:`Tick`: the bucket fires what it holds and stays as a closed tombstone that
   fires any late registration at once. Hours without registrations cost nothing, so a
   clock that jumps decades (an event from 1971 read first) sends no flood of ticks.
3. Fired wake-ups are written to the timers topic (key = customer id, value = the due
   instant in microseconds) and read back by the flow's own Kafka input, keyed by
   customer like the transactions, so the customers step gets them in order with
   the customer's events.

Every part is recovered with the flow's snapshots, and the topic round trip is
at-least-once: a repeated or stale wake-up is harmless, because a customer only
processes due instants it computed itself (:meth:`models.scoring.ScoredCustomer.wake`).
A bucket's snapshot holds only its own registrations, so snapshot cost follows the
number of due instants touched, not the number of customers.

**Restarts.** After a crash the flow resumes from its last snapshot and re-reads both
topics from the snapshot's offsets. The timers topic then still holds wake-ups that the
crashed run fired after that snapshot, at a stream clock the restarted run has not
reached again: processed on arrival, they would wake a customer past events it has not
re-applied yet. So a wake-up written before this run started (its Kafka timestamp is older
than the flow's start) is *stale*: the customer does not process it but registers it
again, and the restarted clock fires it once it passes the instant
(at once if it already has). Wake-ups fired before the snapshot are re-fired that way;
those fired after it are fired again by the recovered buckets too, and the duplicate is
harmless.

>>> hours = OpenBuckets()
>>> [hours.route(Registration("c", due * BUCKET_US + 1))[0] for due in (7, 5, 7, 900)]
['7', '5', '7', '900']
>>> [key for key, _ in hours.passed(8 * BUCKET_US)]  # hours 5 and 7 ended; 6 held nothing
['5', '7']
>>> [key for key, _ in hours.passed(10**6 * BUCKET_US)]
['900']
>>> decode_wake(b"c-42", b"1700000000000000")
Wake(customer_id='c-42', due_us=1700000000000000, stale=False)
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import NamedTuple

from bytewax.operators import StatefulBatchLogic

from models.transaction import SECOND_US

BUCKET_US = 3600 * SECOND_US  # one hour of event time per timer bucket


class Registration(NamedTuple):
    """A customer asks to be woken once the stream clock passes ``due_us``."""

    customer_id: str
    due_us: int


class Wake(NamedTuple):
    """A fired registration, read back from the timers topic; ``stale`` when a previous
    run of the flow wrote it (see Restarts, above)."""

    customer_id: str
    due_us: int
    stale: bool = False


class Tick(NamedTuple):
    """The stream clock passed the end of the receiving bucket's hour."""

    clock_us: int


class OpenBuckets:
    """The hours the clock sent registrations to and has not ticked yet, earliest first."""

    def __init__(self, hours: Iterable[int] = ()) -> None:
        self._heap = sorted(set(hours))
        self._open = set(self._heap)

    def route(self, registration: Registration) -> tuple[str, Registration]:
        """The (bucket key, registration) to send; the hour stays open until ticked."""
        hour = registration.due_us // BUCKET_US
        if hour not in self._open:
            self._open.add(hour)
            heapq.heappush(self._heap, hour)
        return str(hour), registration

    def passed(self, clock_us: int) -> list[tuple[str, Tick]]:
        """A tick for every open hour that ended at or before ``clock_us``."""
        out = []
        while self._heap and (self._heap[0] + 1) * BUCKET_US <= clock_us:
            hour = heapq.heappop(self._heap)
            self._open.discard(hour)
            out.append((str(hour), Tick(clock_us)))
        return out

    def hours(self) -> list[int]:
        return list(self._heap)


def encode_wake(wake: Wake) -> tuple[bytes, bytes]:
    return wake.customer_id.encode(), str(wake.due_us).encode()


def decode_wake(key: bytes | None, value: bytes | None, stale: bool = False) -> Wake:
    """A wake-up from the timers topic; ValueError when it is not one."""
    if not key or not value or not value.isdigit():
        raise ValueError(f"not a wake-up: key={key!r:.80} value={value!r:.80}")
    return Wake(key.decode(), int(value), stale)



BucketState = tuple[bool, set[Registration]]


class TimerBucketLogic(StatefulBatchLogic[Registration | Tick, Wake, BucketState]):
    """One hour of due instants: holds registrations until its tick, then fires them."""

    def __init__(self, resume: BucketState | None) -> None:
        self.closed, self.held = resume if resume is not None else (False, set())

    def on_batch(self, values: list[Registration | Tick]) -> tuple[list[Wake], bool]:
        fired: list[Wake] = []
        for item in values:
            if isinstance(item, Tick):
                self.closed = True
                fired.extend(Wake(*r) for r in self.held)
                self.held = set()
            elif self.closed:
                fired.append(Wake(*item))
            else:
                self.held.add(item)
        return fired, StatefulBatchLogic.RETAIN

    def snapshot(self) -> BucketState:
        return self.closed, set(self.held)
