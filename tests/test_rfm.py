"""RFM scores and segments against a batch recomputation with numpy."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest

from models.customer import CustomerState
from models.quantiles import DAY_US, QUINTILES, Boundaries, PopulationQuantiles, customer_hash
from models.rfm import SEGMENT_MAP, SEGMENTS, RfmScore, rfm_scores, segment_of
from models.transaction import Transaction

T0 = 1_750_000_000 * 1_000_000


def reference_score(worse: int, n: int) -> int:
    """1 + the number of quintiles q with (share strictly worse) >= q, in integers."""
    return 1 + sum(1 for i in range(1, 5) if 5 * worse >= i * n)


def batch_scores(rec: np.ndarray, freq: np.ndarray, money: np.ndarray) -> list[tuple[int, ...]]:
    n = len(rec)
    return [(reference_score(int(np.count_nonzero(rec > r)), n),
             reference_score(int(np.count_nonzero(freq < f)), n),
             reference_score(int(np.count_nonzero(money < m)), n))
            for r, f, m in zip(rec, freq, money, strict=True)]


def numpy_boundaries(rec: np.ndarray, freq: np.ndarray, money: np.ndarray) -> Boundaries:
    """Boundaries from numpy's percentiles, as a batch job would compute them."""
    q = np.array(QUINTILES) * 100
    return Boundaries(
        as_of_us=0, quantiles=QUINTILES, last_purchase_us=(),
        # recency orders like the last purchase instant, reversed: quantiles of -recency
        recency_days=tuple((-np.percentile(-rec, q[::-1], method="inverted_cdf")).tolist()),
        frequency=tuple(np.percentile(freq, q, method="inverted_cdf").tolist()),
        monetary=tuple(np.percentile(money, q, method="inverted_cdf").tolist()),
        value=(), n=len(rec), exact=True, rank_error=0.0)


def population(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    rec = rng.integers(0, 400, n).astype(float)  # whole days: many ties
    freq = rng.geometric(0.45, n)  # about half bought once
    money = np.round(rng.lognormal(4, 1.2, n), 2)
    return rec, freq, money


def test_scores_match_the_batch_recomputation_exactly() -> None:
    rng = np.random.default_rng(11)
    rec, freq, money = population(rng, 3_001)
    as_of = T0 + 400 * DAY_US
    pq = PopulationQuantiles(k=10_000)
    for i, (r, f, m) in enumerate(zip(rec.tolist(), freq.tolist(), money.tolist(), strict=True)):
        pq.update(customer_hash(f"c{i}"), as_of - int(r * DAY_US), f, m)
    sketch = pq.boundaries(as_of)
    assert sketch is not None and sketch.exact
    npb = numpy_boundaries(rec, freq, money)
    assert sketch.frequency == npb.frequency and sketch.monetary == npb.monetary
    expected = batch_scores(rec, freq, money)
    for bounds in (sketch, npb):
        got = [rfm_scores(r, f, m, bounds)[:3] for r, f, m in zip(rec, freq, money, strict=True)]
        assert got == expected
    # quintiles hold up to ties: each score's share is about a fifth for recency and money
    scores = np.array(expected)
    for col in (0, 2):
        shares = np.bincount(scores[:, col], minlength=6)[1:] / len(rec)
        assert np.all(np.abs(shares - 0.2) < 0.02), shares


def test_sampled_boundaries_only_misplace_customers_near_a_quintile() -> None:
    """With the population above k, a score differs only within the rank error of a cut."""
    rng = np.random.default_rng(12)
    rec, freq, money = population(rng, 30_000)
    as_of = T0 + 400 * DAY_US
    pq = PopulationQuantiles(k=2048)
    for i, (r, f, m) in enumerate(zip(rec.tolist(), freq.tolist(), money.tolist(), strict=True)):
        pq.update(customer_hash(f"c{i}"), as_of - int(r * DAY_US), f, m)
    b = pq.boundaries(as_of)
    assert b is not None and not b.exact
    n = len(money)
    order = np.sort(money)
    differ = 0
    for m in money[:3_000].tolist():
        got = rfm_scores(0.0, 1, m, b).m_score
        worse = int(np.searchsorted(order, m, side="left"))
        if got != reference_score(worse, n):
            differ += 1
            tie_hi = int(np.searchsorted(order, m, side="right")) / n
            # some quintile lies within the rank error of the customer's tie group
            assert any(worse / n - b.rank_error <= q <= tie_hi + b.rank_error
                       for q in QUINTILES)
    assert 0 < differ < 0.05 * 3_000


def tx(i: int, customer: str, t: int, amount: int, refund: bool) -> Transaction:
    return Transaction(f"e{i}", customer, t, refund, amount, "EUR",
                       hashlib.sha256(f"{i}".encode()).digest())


def test_streaming_rfm_equals_batch_after_every_batch_of_events() -> None:
    """CustomerState -> sketch -> rfm_scores, against a recomputation from the raw events."""
    rng = np.random.default_rng(13)
    states: dict[str, CustomerState] = {}
    events: list[tuple[str, int, int, bool]] = []
    pq = PopulationQuantiles(k=5_000)
    clock = T0
    for batch in range(6):
        touched = set()
        for j in range(400):
            c = f"c{int(rng.zipf(1.6)) % 500}"
            t = T0 + batch * 30 * DAY_US + int(rng.integers(0, 30 * DAY_US))
            amount = int(rng.integers(1, 500)) * 1_000_000
            refund = bool(rng.random() < 0.1)
            state = states.setdefault(c, CustomerState(c))
            if state.apply(tx(batch * 1000 + j, c, t, amount, refund), 60 * DAY_US) == "applied":
                events.append((c, t, amount, refund))
                touched.add(c)
                clock = max(clock, t)
        for c in touched:
            s = states[c]
            pq.update(customer_hash(c), s.last_purchase_us, s.purchase_count, s.net_micros / 1e6)
        boundaries = pq.boundaries(clock)
        # batch: per-customer facts straight from the event list
        last: dict[str, int] = {}
        count: dict[str, int] = {}
        net: dict[str, int] = {}
        for c, t, amount, refund in events:
            net[c] = net.get(c, 0) + (-amount if refund else amount)
            if not refund:
                last[c] = max(last.get(c, t), t)
                count[c] = count.get(c, 0) + 1
        buyers = sorted(last)
        rec = np.array([(clock - last[c]) / DAY_US for c in buyers])
        freq = np.array([count[c] for c in buyers])
        money = np.array([net[c] / 1e6 for c in buyers])
        expected = dict(zip(buyers, batch_scores(rec, freq, money), strict=True))
        for c in buyers:
            s = states[c]
            assert s.last_purchase_us is not None
            got = rfm_scores((clock - s.last_purchase_us) / DAY_US, s.purchase_count,
                             s.net_micros / 1e6, boundaries)
            assert got[:3] == expected[c], c


def test_degenerate_populations() -> None:
    pq = PopulationQuantiles(k=100)
    for i in range(50):  # everyone bought once, for the same amount, the same day
        pq.update(customer_hash(f"c{i}"), T0, 1, 25.0)
    b = pq.boundaries(T0 + DAY_US)
    assert b is not None
    assert rfm_scores(1.0, 1, 25.0, b) == RfmScore(1, 1, 1, "111", "lost")
    # someone better than all of them on every measure is top on every measure
    assert rfm_scores(0.5, 2, 30.0, b) == RfmScore(5, 5, 5, "555", "champions")
    assert rfm_scores(3.0, 1, 1.0, None) == RfmScore(1, 1, 1, "111", "lost")  # no population


def test_every_cell_has_a_named_segment_and_every_segment_a_cell() -> None:
    seen = set()
    for r, f, m in itertools.product(range(1, 6), repeat=3):
        segment = segment_of(r, f, m)
        assert segment in SEGMENTS
        seen.add(segment)
    assert seen == set(SEGMENTS)
    assert len(SEGMENT_MAP) == 5 and all(len(row) == 5 for row in SEGMENT_MAP)


@pytest.mark.parametrize(("cell", "segment"), [
    ("555", "champions"), ("545", "champions"), ("512", "new"), ("411", "promising"),
    ("444", "loyal"), ("333", "need_attention"), ("321", "about_to_sleep"),
    ("233", "at_risk"), ("155", "cant_lose_them"), ("221", "hibernating"), ("111", "lost"),
    ("515", "potential_loyalist"),
])
def test_canonical_cells(cell: str, segment: str) -> None:
    assert segment_of(*(int(x) for x in cell)) == segment


def test_only_quintile_boundaries_are_accepted() -> None:
    pq = PopulationQuantiles(k=10)
    pq.update(customer_hash("a"), T0, 1, 1.0)
    with pytest.raises(ValueError, match="quintile"):
        rfm_scores(1.0, 1, 1.0, pq.boundaries(T0, quantiles=(0.25, 0.5, 0.75)))
