"""Exact per-customer state: RFM aggregates, gaps between purchases, trailing windows.

One ``CustomerState`` per customer, fed valid transactions in any order. The
aggregates are exact whatever the arrival order, because:

- money is summed in integer micro-units and time in integer microseconds;
- the spread of the gaps between purchases is kept as the sum of squared gaps,
  and a purchase arriving out of order splits the gap between its two
  neighbours, which are always still in ``recent`` (see ``_prune``);
- an ``event_id`` seen before is a duplicate (same fingerprint) or a conflict
  (different content). Ids are remembered for ``lateness_us`` of event time
  behind the customer's newest event; an event older than that is refused as
  ``too_late``, since a repeat of it could no longer be recognised.

The customer's clock (``as_of``) is their newest event time, so a state built
from the same events describes the same instant however they were ordered.

>>> from models.transaction import parse_transaction
>>> def tx(eid, day, amount, kind="purchase"):
...     raw = (f'{{"event_id":"{eid}","customer_id":"c","type":"{kind}","currency":"EUR",'
...            f'"occurred_at":"2025-01-{day:02d}T00:00:00Z","amount":{amount}}}')
...     return parse_transaction(raw.encode(), now_us=2_000_000_000_000_000)
>>> state = CustomerState("c")
>>> [state.apply(t, lateness_us=7 * DAY_US) for t in (tx("a", 1, 10), tx("c", 11, 30),
...                                               tx("b", 5, 20), tx("b", 5, 20))]
['applied', 'applied', 'applied', 'duplicate']
>>> state.purchase_count, state.net_micros / 1e6, state.gap_mean_days(), state.gap_std_days()
(3, 60.0, 5.0, 1.0)
>>> state.apply(tx("b", 5, 99), lateness_us=7 * DAY_US).code
'conflicting_duplicate'
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from typing import Any

from models.transaction import DAY_US, MICROS, Rejection, Transaction, format_time

WINDOW_DAYS = (30, 90, 365)
_WINDOWS = tuple((days, f"{days}d") for days in WINDOW_DAYS)
APPLIED = "applied"
DUPLICATE = "duplicate"
_MIN_SEEN_PRUNE = 64


class CustomerState:
    """Everything the flow knows about one customer. Picklable and small."""

    __slots__ = (
        "customer_id", "currency", "version", "max_event_us",
        "purchase_count", "gross_micros", "refund_count", "refund_micros",
        "first_purchase_us", "last_purchase_us", "gap_sq_sum",
        "recent", "seen", "seen_prune_at",
    )

    def __init__(self, customer_id: str) -> None:
        self.customer_id = customer_id
        self.currency: str | None = None
        self.version = 0  # grows with every applied event: orders score documents
        self.max_event_us: int | None = None
        self.purchase_count = 0
        self.gross_micros = 0
        self.refund_count = 0
        self.refund_micros = 0
        self.first_purchase_us: int | None = None
        self.last_purchase_us: int | None = None
        self.gap_sq_sum = 0  # sum of squared gaps between consecutive purchases, in us^2
        # (occurred_at_us, amount_micros, is_refund), sorted; the last 365 days + lateness,
        # plus the newest purchase before that (a neighbour for late purchases).
        self.recent: list[tuple[int, int, bool]] = []
        # event_id -> (fingerprint, occurred_at_us), for ids within the lateness window
        self.seen: dict[str, tuple[bytes, int]] = {}
        self.seen_prune_at = _MIN_SEEN_PRUNE

    def __getstate__(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        for name, value in zip(self.__slots__, state, strict=True):
            setattr(self, name, value)

    @property
    def net_micros(self) -> int:
        return self.gross_micros - self.refund_micros

    def apply(self, tx: Transaction, lateness_us: int) -> str | Rejection:
        """Apply one event: ``"applied"``, ``"duplicate"`` or a :class:`Rejection`."""
        known = self.seen.get(tx.event_id)
        if known is not None:
            if known[0] == tx.fingerprint:
                return DUPLICATE
            return Rejection(
                "conflicting_duplicate",
                f"event_id {tx.event_id!r} was seen before for customer "
                f"{tx.customer_id!r} with different content",
                "event_id",
            )
        if self.max_event_us is not None and tx.occurred_at_us < self.max_event_us - lateness_us:
            return Rejection(
                "too_late",
                f"occurred_at {format_time(tx.occurred_at_us)} is more than "
                f"{lateness_us / DAY_US:g} days behind customer {tx.customer_id!r}'s newest "
                f"event ({format_time(self.max_event_us)}): a repeat could not be detected",
                "occurred_at",
            )
        if self.currency is not None and tx.currency != self.currency:
            return Rejection(
                "currency_mismatch",
                f"currency {tx.currency} differs from customer {tx.customer_id!r}'s "
                f"currency {self.currency}; amounts in different currencies are not summed",
                "currency",
            )
        self.currency = tx.currency
        self.seen[tx.event_id] = (tx.fingerprint, tx.occurred_at_us)
        self.version += 1
        if self.max_event_us is None or tx.occurred_at_us > self.max_event_us:
            self.max_event_us = tx.occurred_at_us
        if tx.is_refund:
            self.refund_count += 1
            self.refund_micros += tx.amount_micros
        else:
            self._add_purchase(tx.occurred_at_us, tx.amount_micros)
        insort(self.recent, (tx.occurred_at_us, tx.amount_micros, tx.is_refund))
        self._prune(lateness_us)
        return APPLIED

    def _add_purchase(self, t: int, amount_micros: int) -> None:
        self.purchase_count += 1
        self.gross_micros += amount_micros
        first, last = self.first_purchase_us, self.last_purchase_us
        if first is None or last is None:
            self.first_purchase_us = self.last_purchase_us = t
        elif t >= last:
            self.gap_sq_sum += (t - last) ** 2
            self.last_purchase_us = t
        elif t < first:
            self.gap_sq_sum += (first - t) ** 2
            self.first_purchase_us = t
        else:  # splits the gap between its neighbours a <= t < b
            a, b = self._purchase_neighbours(t)
            self.gap_sq_sum += (t - a) ** 2 + (b - t) ** 2 - (b - a) ** 2

    def _purchase_neighbours(self, t: int) -> tuple[int, int]:
        """Times of the purchases just before (<= t) and just after (> t) time ``t``."""
        i = bisect_left(self.recent, (t + 1, -1, False))
        before = next(e[0] for e in reversed(self.recent[:i]) if not e[2])
        after = next(e[0] for e in self.recent[i:] if not e[2])
        return before, after

    def _prune(self, lateness_us: int) -> None:
        assert self.max_event_us is not None
        cut = self.max_event_us - WINDOW_DAYS[-1] * DAY_US - lateness_us
        if self.recent and self.recent[0][0] < cut:
            i = bisect_left(self.recent, (cut, -1, False))
            purchases_before = [j for j in range(i) if not self.recent[j][2]]
            del self.recent[: purchases_before[-1] if purchases_before else i]
        if len(self.seen) >= self.seen_prune_at:
            horizon = self.max_event_us - lateness_us
            self.seen = {k: v for k, v in self.seen.items() if v[1] >= horizon}
            self.seen_prune_at = max(_MIN_SEEN_PRUNE, 2 * len(self.seen))

    def gap_mean_days(self) -> float | None:
        if self.purchase_count < 2 or self.first_purchase_us is None:
            return None
        assert self.last_purchase_us is not None
        return (self.last_purchase_us - self.first_purchase_us) / (self.purchase_count - 1) / DAY_US

    def gap_std_days(self) -> float | None:
        """Population standard deviation of the gaps between consecutive purchases."""
        if self.purchase_count < 2 or self.first_purchase_us is None:
            return None
        assert self.last_purchase_us is not None
        n = self.purchase_count - 1
        # n^2 * variance, exactly, in integer us^2: no cancellation when the spread is small.
        scaled = self.gap_sq_sum * n - (self.last_purchase_us - self.first_purchase_us) ** 2
        return math.sqrt(max(scaled, 0)) / n / DAY_US

    def windows(self, as_of_us: int) -> dict[str, dict[str, float]]:
        """Purchases, spend and refunds in the trailing windows ending at ``as_of_us``
        (each window is (as_of - days, as_of])."""
        recent = self.recent
        # (t,) sorts before every (t, amount, is_refund): bisecting finds the first t >= it
        hi = bisect_left(recent, (as_of_us + 1,))
        n = spend = refunds = 0  # micro-units, summed from the newest entry back
        out = {}
        for days, key in _WINDOWS:  # narrowest first: each wider one adds older entries
            lo = bisect_left(recent, (as_of_us - days * DAY_US + 1,), 0, hi)
            for i in range(lo, hi):
                _, amount, is_refund = recent[i]
                if is_refund:
                    refunds += amount
                else:
                    n += 1
                    spend += amount
            hi = lo
            out[key] = {"purchases": n, "spend": spend / MICROS, "refunds": refunds / MICROS}
        return out

    def as_of(self, as_of_us: int | None = None) -> int:
        """The instant a score at ``as_of_us`` describes: never before their newest event
        (a later instant, the stream clock passing a silent customer's due time, moves
        recency and the windows on)."""
        assert self.max_event_us is not None, "no event applied yet"
        return self.max_event_us if as_of_us is None else max(as_of_us, self.max_event_us)

    def document(self, as_of_us: int | None = None) -> dict[str, Any]:
        """The customer's score document (see docs/design.md), as of :meth:`as_of`."""
        as_of, newest = self.as_of(as_of_us), self.max_event_us
        assert newest is not None  # as_of checked it
        last = self.last_purchase_us
        as_of_text = format_time(as_of)  # formatting is the costliest part: reuse it
        return {
            "customer_id": self.customer_id,
            "version": self.version,
            "as_of": as_of_text,
            "currency": self.currency,
            "first_purchase_at": as_of_text if self.first_purchase_us == as_of
            else _time_or_none(self.first_purchase_us),
            "last_purchase_at": as_of_text if last == as_of else _time_or_none(last),
            "last_event_at": as_of_text if newest == as_of else format_time(newest),
            "rfm": {
                "recency_days": None if last is None else (as_of - last) / DAY_US,
                "frequency": self.purchase_count,
                "monetary": self.net_micros / MICROS,
            },
            "purchase_count": self.purchase_count,
            "gross_monetary": self.gross_micros / MICROS,
            "net_monetary": self.net_micros / MICROS,
            "refund_count": self.refund_count,
            "refund_total": self.refund_micros / MICROS,
            "gap_mean_days": self.gap_mean_days(),
            "gap_std_days": self.gap_std_days(),
            "windows": self.windows(as_of),
        }


def _time_or_none(us: int | None) -> str | None:
    return None if us is None else format_time(us)
