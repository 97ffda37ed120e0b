"""Event-time wake-ups for customers, at millions of customers, in a dataflow without cycles.

bytewax's ``notify_at`` is wall-clock and a dataflow has no cycles, yet a silent
customer must turn at risk when the *stream's* clock passes their due instant. So the
wake-ups go round through Kafka, as a timer topic:

1. The customers step asks to be woken: a :class:`Registration` (customer, due instant).
2. The single clock step (it also keeps the pipeline status) knows the stream clock. A
   registration already due fires at once; any other goes to the timer bucket of its
   hour, a small key of the ``timers`` step. When the clock passes the end of an hour,
   the clock step sends that bucket a :class:`Tick`: the bucket fires what it holds and
   stays as a closed tombstone that fires any late registration at once.
3. Fired wake-ups are written to the timers topic (key = customer id, value = the due
   instant in microseconds) and read back by the flow's own Kafka input, keyed by
   customer like the transactions, so the customers step gets them in order with
   the customer's events.

Every part is recovered with the flow's snapshots, and the topic round trip is
at-least-once: a repeated or stale wake-up is harmless, because a customer only
processes due instants it computed itself (:meth:`models.scoring.ScoredCustomer.wake`).
A bucket's snapshot holds only its own registrations, so snapshot cost follows the
number of due instants touched, not the number of customers.

>>> [key for key, _ in ticks(None, 5 * BUCKET_US)]  # the first clock ticks nothing
[]
>>> [key for key, _ in ticks(5 * BUCKET_US + 7, 8 * BUCKET_US)]  # hours 5, 6, 7 have passed
['5', '6', '7']
>>> decode_wake(b"c-42", b"1700000000000000")
Wake(customer_id='c-42', due_us=1700000000000000)
"""

from __future__ import annotations

from typing import NamedTuple

from bytewax.operators import StatefulBatchLogic

from models.transaction import SECOND_US

BUCKET_US = 3600 * SECOND_US  # one hour of event time per timer bucket


class Registration(NamedTuple):
    """A customer asks to be woken once the stream clock passes ``due_us``."""

    customer_id: str
    due_us: int


class Wake(NamedTuple):
    """A fired registration, read back from the timers topic."""

    customer_id: str
    due_us: int


class Tick(NamedTuple):
    """The stream clock passed the end of the receiving bucket's hour."""

    clock_us: int


def bucket_key(due_us: int) -> str:
    return str(due_us // BUCKET_US)


def ticks(previous_clock_us: int | None, clock_us: int) -> list[tuple[str, Tick]]:
    """A tick for every bucket whose hour ended between the two clock readings.

    Registrations only reach buckets the clock has not passed yet (due ones fire at
    once), so buckets before the first reading never need a tick.
    """
    if previous_clock_us is None:
        return []
    first, end = previous_clock_us // BUCKET_US, clock_us // BUCKET_US
    return [(str(b), Tick(clock_us)) for b in range(first, end)]


def encode_wake(wake: Wake) -> tuple[bytes, bytes]:
    return wake.customer_id.encode(), str(wake.due_us).encode()


def decode_wake(key: bytes | None, value: bytes | None) -> Wake:
    """A wake-up from the timers topic; ValueError when it is not one."""
    if not key or not value or not value.isdigit():
        raise ValueError(f"not a wake-up: key={key!r:.80} value={value!r:.80}")
    return Wake(key.decode(), int(value))


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
