"""Event-time wake-ups for customers, at millions of customers, in a dataflow without cycles.

bytewax's ``notify_at`` is wall-clock and a dataflow has no cycles, yet a silent
customer must turn at risk when the *stream's* clock passes their due instant. So the
wake-ups go round through Kafka, as a timer topic:

1. The customers step asks to be woken: a :class:`Registration` (customer, due instant).
   When an event moves its next due instant, it also sends a :class:`Cancel` for the
   registration that instant replaces: the bucket drops it, so its wake-up does not go
   round the timers topic to find nothing due (7% of a replay's wake-ups, 9.7k of 135.5k
   on the generator's stream; live, where wake-ups are not overtaken by the customer's
   next event, most of those that find nothing). A cancel that comes too late (its hour
   already fired) is dropped, and the wake-up it meant to stop is harmless.
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

**Promotions.** When the served model changes (a challenger promoted, or the first
model served after the priors), a score computed before would name the old model until
the customer's next due instant: months for a silent customer. So the models step sends
the clock a :class:`Rescore`, the clock sends every open bucket a :class:`RescoreAll`,
and each bucket fires a *rescore* wake-up (``bundle_version`` set) for every
registration it holds, and keeps holding them. The clock gives the buckets firing times
(wall clock) at most ``CRMSCORE_RESCORE_RATE`` registrations a second, counting those
it sent each bucket: all at once, the rescores of every customer queued ahead of live
events (at 300 events/s, 2,000 customers' rescores put freshness p99 at 0.8 s), and a
fixed spread would not scale (5 minutes for a million customers is 3,300 rescores a
second, twice what the flow scores). A customer rescores at its current
instant with a bundle at least that new (:meth:`models.scoring.ScoredCustomer.rescore`;
a wake that overtook its bundle on the way to Redis waits for it up to ~0.3 s,
flows/model_registry.py ``BundleCache.at_least``); a second rescore wake (a cancel that
came too late) finds nothing to change. Any batch a customer gets rescores it too if its
score is older than the bundle in hand's ``rescore_from``.
A customer scored meanwhile with an older bundle (its process had not read the new one
yet) was not in a bucket: its next registration names the bundle that scored it, and
the clock sends it a rescore wake at once. Customers without a registration (asleep after
``max_silence_days``) keep their score. The cost is one wake-up per waiting customer per
change of the served model. A BTYD refit, once the flow has caught up with its
input, is swept in the same way (flows/scoring.py, ``ModelsLogic``).

**Chains.** A silent customer's instants form a chain: each is registered only once the
one before it is processed. When the stream clock runs far ahead (a replay at full
speed), every link would cost a round trip through the timers topic, one instant per
trip. So a wake-up carries the clock that fired it, when that is later than its due
instant, and the customer processes every instant up to it, as it would on an event
of that time (:meth:`models.scoring.ScoredCustomer.wake`): the same instants in the same
order, in one trip. Before (until session 15), replaying the generator's stream took
126k wake-ups (49k now), and they trailed the events so far that the silent instants of
event days 100-200 were processed a median 131 s into a 162 s replay (their events ~14 s
in), by models trained far beyond them: that flattered the learned churn model
(docs/design.md, "Wake-ups in a replay").

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
Wake(customer_id='c-42', due_us=1700000000000000, stale=False, bundle_version=0)
>>> decode_wake(*encode_wake(Wake("c-42", 17, bundle_version=9)))
Wake(customer_id='c-42', due_us=0, stale=False, bundle_version=9)
"""

from __future__ import annotations

import heapq
import pickle
import time
from datetime import UTC, datetime
from typing import NamedTuple

from bytewax.operators import StatefulBatchLogic

from flows.bucket_journal import BucketJournal
from models.transaction import SECOND_US

BUCKET_US = 3600 * SECOND_US  # one hour of event time per timer bucket


class Registration(NamedTuple):
    """A customer asks to be woken once the stream clock passes ``due_us``; it was last
    scored with bundle ``bundle_version`` (0: unknown)."""

    customer_id: str
    due_us: int
    bundle_version: int = 0

    def wake(self, clock_us: int | None = None) -> Wake:
        """The wake-up, up to the stream clock that fired it (if later than the due
        instant): the customer then processes every instant the clock has passed, not
        only this one (see "Chains", above)."""
        if clock_us is None or clock_us < self.due_us:
            return Wake(self.customer_id, self.due_us)
        return Wake(self.customer_id, clock_us)


class Wake(NamedTuple):
    """A fired registration, read back from the timers topic; ``stale`` when a previous
    run of the flow wrote it (see Restarts, above). With ``bundle_version`` it is a
    rescore wake-up instead: score again with a bundle at least that new (Promotions)."""

    customer_id: str
    due_us: int
    stale: bool = False
    bundle_version: int = 0


class Cancel(NamedTuple):
    """From a customer: the registration at ``due_us`` is superseded; its bucket drops it."""

    customer_id: str
    due_us: int


class Rescore(NamedTuple):
    """From the models step to the clock: bundle ``bundle_version`` serves another model."""

    bundle_version: int


class RescoreAll(NamedTuple):
    """From the clock to an open bucket: fire a rescore wake for every registration held,
    once the wall clock reads ``fire_at_s`` (Unix seconds)."""

    bundle_version: int
    fire_at_s: float = 0.0


class Tick(NamedTuple):
    """The stream clock passed the end of the receiving bucket's hour."""

    clock_us: int


class OpenBuckets:
    """The hours the clock sent registrations to and has not ticked yet, earliest first,
    with how many registrations each was sent (0 when unknown: resumed from a snapshot
    that did not count them)."""

    def __init__(self, held: dict[int, int] | None = None) -> None:
        self._held = dict(held or {})
        self._heap = sorted(self._held)

    def route(self, registration: Registration) -> tuple[str, Registration]:
        """The (bucket key, registration) to send; the hour stays open until ticked."""
        hour = registration.due_us // BUCKET_US
        if hour not in self._held:
            self._held[hour] = 0
            heapq.heappush(self._heap, hour)
        self._held[hour] += 1
        return str(hour), registration

    def cancel(self, cancel: Cancel) -> tuple[str, Cancel] | None:
        """The (bucket key, cancel) to send; None when its hour is not open (ticked: the
        wake-up has fired; or fired at once when registered: it was due then)."""
        hour = cancel.due_us // BUCKET_US
        if hour not in self._held:
            return None
        self._held[hour] = max(self._held[hour] - 1, 0)
        return str(hour), cancel

    def passed(self, clock_us: int) -> list[tuple[str, Tick]]:
        """A tick for every open hour that ended at or before ``clock_us``."""
        out = []
        while self._heap and (self._heap[0] + 1) * BUCKET_US <= clock_us:
            hour = heapq.heappop(self._heap)
            del self._held[hour]
            out.append((str(hour), Tick(clock_us)))
        return out

    def held(self) -> dict[int, int]:
        """Registrations sent to each open hour (superseded ones included)."""
        return dict(self._held)


RESCORE_PREFIX = b"rescore:"


def encode_wake(wake: Wake) -> tuple[bytes, bytes]:
    if wake.bundle_version:
        return wake.customer_id.encode(), RESCORE_PREFIX + str(wake.bundle_version).encode()
    return wake.customer_id.encode(), str(wake.due_us).encode()


def decode_wake(key: bytes | None, value: bytes | None, stale: bool = False) -> Wake:
    """A wake-up from the timers topic; ValueError when it is not one. A due instant
    before 1970 (a customer whose events are that old) is negative."""
    if key and value and value.startswith(RESCORE_PREFIX):
        version = value[len(RESCORE_PREFIX):]
        if version.isdigit() and int(version) > 0:
            return Wake(key.decode(), 0, stale, int(version))
    elif key and value and value.removeprefix(b"-").isdigit():
        return Wake(key.decode(), int(value), stale)
    raise ValueError(f"not a wake-up: key={key!r:.80} value={value!r:.80}")



# closed, held registrations, and the rescore to fire (None, or one a snapshot of an
# older version of the flow did not have): snapshots before session 26
OldBucketState = tuple[bool, set[Registration]] | tuple[bool, set[Registration],
                                                         RescoreAll | None]


class TimerBucketLogic(StatefulBatchLogic[Registration | Cancel | Tick | RescoreAll, Wake,
                                           bytes | OldBucketState]):
    """One hour of due instants: holds registrations until its tick, then fires them; a
    :class:`Cancel` drops one; on a :class:`RescoreAll`, fires a rescore wake for each at
    its time and keeps them.

    A bucket holds ~(customers waiting / hours they wait in): ~470 registrations an hour
    near the clock at 100,000 customers, and it is snapshotted whole at the end of each
    epoch it was touched in, as live events register and cancel. So it keeps them as a
    journal of changes, whose snapshot is a copy of bytes (flows/bucket_journal.py)."""

    def __init__(self, resume: bytes | OldBucketState | None) -> None:
        self.journal = BucketJournal()
        self.closed, self.rescore = False, None
        if isinstance(resume, bytes):
            state = pickle.loads(resume)
            if len(state) == 3:  # closed, rescore, journal
                self.closed, self.rescore, journal = state
                self.journal = BucketJournal(journal)
            else:  # session 26: closed, then columns of the registrations, and rescore
                self.closed, customers, dues, versions, self.rescore = state
                for c, d, v in zip(customers, dues, versions, strict=True):
                    self.journal.add(c, d, v)
        elif resume is not None:
            self.closed = resume[0]
            for r in resume[1]:
                self.journal.add(*r)
            self.rescore = resume[2] if len(resume) > 2 else None  # type: ignore[misc]

    @property
    def held(self) -> dict[tuple[str, int], Registration]:
        """The registrations held, by (customer, due instant): what a cancel names."""
        return {(c, d): Registration(c, d, v) for (c, d), v in self.journal.held.items()}

    def on_batch(self, values: list[Registration | Cancel | Tick | RescoreAll]
                 ) -> tuple[list[Wake], bool]:
        fired: list[Wake] = []
        for item in values:
            if isinstance(item, Tick):
                self.closed = True
                fired.extend(r.wake(item.clock_us) for r in self.held.values())
                self.journal.clear()
                self.rescore = None
            elif isinstance(item, RescoreAll):
                if self.journal.held:  # the newer version, at the earlier of the two times
                    pending = self.rescore or item
                    self.rescore = RescoreAll(max(item.bundle_version, pending.bundle_version),
                                              min(item.fire_at_s, pending.fire_at_s))
            elif isinstance(item, Cancel):
                self.journal.drop(item.customer_id, item.due_us)  # closed: it fired
            elif self.closed:
                fired.append(item.wake())
            else:
                self.journal.add(*item)
        return fired + self._fire_rescore(), StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        return None if self.rescore is None else datetime.fromtimestamp(
            self.rescore.fire_at_s, UTC)

    def on_notify(self) -> tuple[list[Wake], bool]:
        return self._fire_rescore(), StatefulBatchLogic.RETAIN

    def _fire_rescore(self) -> list[Wake]:
        rescore = self.rescore
        if rescore is None or rescore.fire_at_s > time.time():
            return []
        self.rescore = None
        return [Wake(c, d, bundle_version=rescore.bundle_version)
                for c, d in self.journal.held]

    def snapshot(self) -> bytes:
        return pickle.dumps((self.closed, self.rescore, self.journal.snapshot()),
                            protocol=pickle.HIGHEST_PROTOCOL)
