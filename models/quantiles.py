"""Quintile boundaries of the *current* customer population: a bottom-k sample by customer hash.

RFM scores and the premium tier rank a customer against everyone else as they are
now. A customer's recency, frequency, spend and value change with every event, so a
sketch that only ever adds values (KLL, t-digest, GK) would describe every value ever
seen: a customer with 50 purchases would count 50 times, with 49 stale values.
Apache DataSketches' KLL installs and serialises fine here, but it cannot forget a
customer's old value; rolling generations of it either count frequent buyers once per
event or, once rotated, lose the dormant customers who send no events (precisely the
hibernating and lost ones). So this module keeps a different summary of bounded size:

**A bottom-k sample of customers.** Each customer has a fixed 64-bit hash of their id
(:func:`customer_hash`). The sketch keeps the ``k`` customers with the smallest hashes
seen so far, each with their *latest* values; an update for a sampled customer
overwrites their row, any other update is dropped after one comparison. Because the
hash is independent of the values, the sample is a uniform random sample of the
distinct customers, and it is current by construction: nothing is double-counted,
dormant customers keep their (unchanged) values, and no rebuild is ever needed.

- *Exact* while the population has fewer than ``k`` buyers (the sample is everyone).
- *Rank error* beyond that: with probability at least ``1 - delta``, every returned
  boundary ``b`` for quantile ``q`` has ``share(< b) <= q + eps`` and
  ``share(<= b) >= q - eps`` over the whole population, where
  ``eps = sqrt(ln(2 / delta) / (2 k))`` (Dvoretzky-Kiefer-Wolfowitz with Massart's
  constant; sampling without replacement only tightens it). ``k = 8192``, ``delta =
  0.01`` gives ``eps = 1.8 %`` in rank; the typical error at a quintile is ~0.4 %.
- *Bounded*: ``k`` rows (about 550 kB pickled at ``k = 8192``, with the BTYD columns),
  whatever the stream.
- *Mergeable*: the union of two samples, cut to the ``k`` smallest hashes, is exactly
  the sample of the union (shards of a keyed flow hold disjoint customers).
- *Deterministic*: no random state, so replays and restarts give identical boundaries.

Recency is sampled as the last purchase *instant*, not as days: the order of customers
by recency does not change as the clock moves, so boundaries in days are taken at any
clock with :meth:`Boundaries.at` at the cost of four subtractions. The population is the
customers with at least one purchase (prospects have no RFM). The ``value`` column
(expected total value, for the premium tier) is as fresh as each customer's last scoring.

*Use in a flow*: call :meth:`~PopulationQuantiles.update` whenever a customer is scored
(about 0.5 µs; one sketch per worker, merged for the global view), and recompute
:meth:`~PopulationQuantiles.boundaries` periodically, not per event (it sorts ``k`` values
per dimension: ~1.6 ms for all four at ``k = 8192``); per event, shift them with
:meth:`Boundaries.at`.

Quantiles use the inverted CDF (numpy ``method="inverted_cdf"``): the boundary for ``q``
is the smallest sampled value with at least a share ``q`` of the sample at or below it.

>>> pq = PopulationQuantiles(k=1000)
>>> for i in range(100):
...     pq.update(customer_hash(f"c{i}"), last_purchase_us=i * DAY_US, frequency=1 + i % 10,
...               monetary=float(i), value=2.0 * i)
>>> pq.update(customer_hash("c0"), last_purchase_us=100 * DAY_US, frequency=11,
...           monetary=500.0)  # c0 buys again: their row is replaced, not added
>>> b = pq.boundaries(as_of_us=101 * DAY_US)
>>> b.n, b.exact, b.frequency, b.monetary
(100, True, (3, 5, 7, 9), (20.0, 40.0, 60.0, 80.0))
>>> b.recency_days  # ascending: below the first one is the freshest fifth
(21.0, 41.0, 61.0, 81.0)
>>> b.at(111 * DAY_US).recency_days
(31.0, 51.0, 71.0, 91.0)
>>> pq.quantile("value", 0.8)  # c0's value is unset now, so 99 customers have one
160.0
"""

from __future__ import annotations

import hashlib
import heapq
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

DAY_US = 86_400_000_000
QUINTILES = (0.2, 0.4, 0.6, 0.8)
DEFAULT_K = 8192
DIMENSIONS = ("last_purchase_us", "frequency", "monetary", "value")

# A sampled row's columns: its key, the DIMENSIONS, then the BTYD inputs
# (see PopulationQuantiles.columns).
COLUMNS = ("key", *DIMENSIONS, "first_purchase_us", "seen_us")
_COLUMN = {name: COLUMNS.index(name) for name in DIMENSIONS}  # where each one is held
_DTYPES = (np.uint64, np.int64, np.int64, np.float64, np.float64, np.int64, np.int64)
_FIRST_CAPACITY = 1024  # rows allocated at first; doubled up to k as the sample fills


def _empty_columns(capacity: int) -> tuple[np.ndarray, ...]:
    return tuple(np.zeros(capacity, dtype=dtype) for dtype in _DTYPES)


def customer_hash(customer_id: str) -> int:
    """A stable 64-bit hash of a customer id (Python's ``hash`` is salted per process).

    >>> customer_hash("c-42") == customer_hash("c-42"), 0 <= customer_hash("x") < 2**64
    (True, True)
    """
    digest = hashlib.blake2b(customer_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank_error_bound(n: int, k: int, delta: float = 0.01) -> float:
    """Rank error that holds for all quantiles at once with probability ``1 - delta``.

    ``n`` is the number of sampled customers: when it is below ``k`` the sample is the
    whole population and the boundaries are exact.

    >>> rank_error_bound(500, 8192), round(rank_error_bound(8192, 8192), 4)
    (0.0, 0.018)
    """
    if n < k:
        return 0.0
    return math.sqrt(math.log(2.0 / delta) / (2.0 * k))


@dataclass(frozen=True, slots=True)
class Boundaries:
    """Quantile boundaries of the population, as of ``as_of_us``.

    ``recency_days`` is ascending (the freshest share is below the first boundary); it is
    computed from ``last_purchase_us`` (ascending, the instants at the same quantiles,
    stalest first) and moves with the clock: use :meth:`at`. ``value`` is empty when no
    sampled customer has a value yet. ``rank_error`` is :func:`rank_error_bound`.
    """

    as_of_us: int
    quantiles: tuple[float, ...]
    last_purchase_us: tuple[int, ...]
    recency_days: tuple[float, ...]
    frequency: tuple[int, ...]
    monetary: tuple[float, ...]
    value: tuple[float, ...]
    n: int
    exact: bool
    rank_error: float

    def at(self, as_of_us: int) -> Boundaries:
        """The same boundaries with recency in days at another clock."""
        return Boundaries(as_of_us, self.quantiles, self.last_purchase_us,
                          _recency_days(self.last_purchase_us, as_of_us), self.frequency,
                          self.monetary, self.value, self.n, self.exact, self.rank_error)

    def as_dict(self) -> dict[str, Any]:
        return {"as_of_us": self.as_of_us, "quantiles": list(self.quantiles),
                "recency_days": list(self.recency_days), "frequency": list(self.frequency),
                "monetary": list(self.monetary), "value": list(self.value), "n": self.n,
                "exact": self.exact, "rank_error": self.rank_error}


def _recency_days(last_purchase_us: tuple[int, ...], as_of_us: int) -> tuple[float, ...]:
    return tuple((as_of_us - t) / DAY_US for t in reversed(last_purchase_us))


def _index(q: float, n: int) -> int:
    """Position of the inverted-CDF ``q`` quantile in ``n`` sorted values, in exact arithmetic."""
    if not 0.0 < q <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {q!r}")
    return min(n, max(1, math.ceil(Fraction(str(q)) * n))) - 1


class PopulationQuantiles:
    """Bottom-``k`` sample of customers by hash, each with their latest values. Picklable.

    The rows are held as columns (numpy arrays, one slot per sampled customer) because the
    flow's models step is snapshotted at the end of every epoch, while new events wait: a
    dict of ``k`` tuples took ~1 ms per 2,000 rows to pickle, and the same rows as columns
    are a few memory copies. Besides the four :data:`DIMENSIONS`, each row keeps the
    customer's first purchase and the instant of the row (``seen_us``): the BTYD fits'
    inputs for the same customers (:meth:`columns`)."""

    __slots__ = ("k", "_slot", "_heap", "_sorted", "_cols")

    def __init__(self, k: int = DEFAULT_K) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.k = k
        self._slot: dict[int, int] = {}  # hash -> its row in the columns
        self._heap: list[int] = []  # negated hashes of the sampled customers: a max-heap
        self._sorted: dict[str, list[Any]] | None = None  # sorted columns, built on demand
        self._cols = _empty_columns(min(k, _FIRST_CAPACITY))

    def __len__(self) -> int:
        return len(self._slot)

    def update(self, key_hash: int, last_purchase_us: int | None, frequency: int,
               monetary: float, value: float | None = None, *,
               first_purchase_us: int | None = None, seen_us: int | None = None) -> None:
        """Record a customer's current values (replacing any earlier ones).

        A customer without a purchase (``last_purchase_us is None``) is not part of the
        population and is ignored. ``first_purchase_us`` and ``seen_us`` (the instant of
        these values) default to the last purchase.
        """
        if last_purchase_us is None:
            return
        slot = self._slot.get(key_hash)
        if slot is None:
            n = len(self._slot)
            if n < self.k:
                heapq.heappush(self._heap, -key_hash)
                slot = n
                if slot == len(self._cols[0]):
                    self._grow()
            elif key_hash < -self._heap[0]:
                slot = self._slot.pop(-heapq.heapreplace(self._heap, -key_hash))
            else:
                return  # not among the k smallest hashes: the common, cheap path
            self._slot[key_hash] = slot
        keys, last, freq, money, val, first, seen = self._cols
        keys[slot] = key_hash
        last[slot] = last_purchase_us
        freq[slot] = frequency
        money[slot] = monetary
        val[slot] = math.nan if value is None else value  # NaN: unknown
        first[slot] = last_purchase_us if first_purchase_us is None else first_purchase_us
        seen[slot] = last_purchase_us if seen_us is None else seen_us
        self._sorted = None

    def _grow(self) -> None:
        n = len(self._cols[0])
        grown = _empty_columns(min(self.k, 2 * n))
        for new, old in zip(grown, self._cols, strict=True):
            new[:n] = old
        self._cols = grown

    def max_key(self) -> int | None:
        """The largest sampled hash: once the sample is full, nothing above it gets in."""
        return -self._heap[0] if self._heap else None

    def columns(self) -> dict[str, np.ndarray]:
        """The sampled rows as columns (copies), in :data:`COLUMNS` order of names; a
        ``value`` not known is NaN."""
        n = len(self._slot)
        return {name: col[:n].copy() for name, col in zip(COLUMNS, self._cols, strict=True)}

    def rows(self) -> dict[int, tuple[Any, ...]]:
        """Every sampled row by hash: the :data:`COLUMNS` after the key, as Python values
        (``value`` None when unknown)."""
        n = len(self._slot)
        lists = [col[:n].tolist() for col in self._cols]
        lists[4] = [None if v != v else v for v in lists[4]]
        return {row[0]: row[1:] for row in zip(*lists, strict=True)}

    def merge(self, other: PopulationQuantiles) -> PopulationQuantiles:
        """A new sketch of the union (for a key in both, ``other``'s row wins)."""
        out = PopulationQuantiles(min(self.k, other.k))
        rows = {**self.rows(), **other.rows()}
        for h in heapq.nsmallest(out.k, rows):
            last, freq, money, value, first, seen = rows[h]
            out.update(h, last, freq, money, value, first_purchase_us=first, seen_us=seen)
        return out

    def _column(self, dimension: str) -> list[Any]:
        if self._sorted is None:
            self._sorted = {}
        col = self._sorted.get(dimension)
        if col is None:
            values = self._cols[_COLUMN[dimension]][:len(self._slot)]
            if dimension == "value":
                values = values[~np.isnan(values)]
            col = np.sort(values).tolist()
            self._sorted[dimension] = col
        return col

    def quantile(self, dimension: str, q: float) -> Any:
        """The inverted-CDF ``q`` quantile of one of :data:`DIMENSIONS`, or None if empty."""
        col = self._column(dimension)
        return col[_index(q, len(col))] if col else None

    def premium_boundary(self, share: float = 0.2) -> float | None:
        """The value above which a customer is in the top ``share`` (see models/value.py)."""
        return self.quantile("value", 1.0 - share)

    def boundaries(self, as_of_us: int, quantiles: tuple[float, ...] = QUINTILES,
                   delta: float = 0.01) -> Boundaries | None:
        """Boundaries at ``quantiles`` of every dimension; None while nobody has bought."""
        if not self._slot:
            return None

        def cut(dimension: str) -> tuple[Any, ...]:
            col = self._column(dimension)
            return tuple(col[_index(q, len(col))] for q in quantiles) if col else ()

        last = cut("last_purchase_us")
        n = len(self._slot)
        return Boundaries(
            as_of_us=as_of_us, quantiles=tuple(quantiles), last_purchase_us=last,
            recency_days=_recency_days(last, as_of_us), frequency=cut("frequency"),
            monetary=cut("monetary"), value=cut("value"), n=n, exact=n < self.k,
            rank_error=rank_error_bound(n, self.k, delta),
        )

    def __getstate__(self) -> tuple[Any, ...]:
        n = len(self._slot)
        return (self.k, *(col[:n].tobytes() for col in self._cols))

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        # Snapshots from before the first purchase and seen_us columns hold five blobs:
        # both default to the last purchase (models/population.py restores them).
        k, *packed = state
        n = len(packed[0]) // 8
        self.k = k
        self._cols = _empty_columns(max(n, min(k, _FIRST_CAPACITY)))
        for col, blob in zip(self._cols, packed, strict=False):
            col[:n] = np.frombuffer(blob, dtype=col.dtype)
        if len(packed) < len(self._cols):
            self._cols[5][:n] = self._cols[6][:n] = self._cols[1][:n]
        keys = self._cols[0][:n].tolist()
        self._slot = {h: i for i, h in enumerate(keys)}
        self._heap = [-h for h in keys]
        heapq.heapify(self._heap)
        self._sorted = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PopulationQuantiles):
            return NotImplemented
        return self.k == other.k and self.rows() == other.rows()

    __hash__ = None  # type: ignore[assignment]
