"""PopulationQuantiles against exact numpy quantiles of the current population."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from models.quantiles import (
    DAY_US,
    QUINTILES,
    Boundaries,
    PopulationQuantiles,
    customer_hash,
    rank_error_bound,
)

T0 = 1_750_000_000 * 1_000_000


def assert_rank_within(population: np.ndarray, bounds: tuple, eps: float,
                       quantiles: tuple[float, ...] = QUINTILES) -> None:
    """Each boundary has at most q + eps of the population below it, at least q - eps at/below."""
    assert len(bounds) == len(quantiles)
    n = len(population)
    for q, b in zip(quantiles, bounds, strict=True):
        below = np.count_nonzero(population < b) / n
        at_or_below = np.count_nonzero(population <= b) / n
        assert below <= q + eps + 1e-12, (q, b, below, eps)
        assert at_or_below >= q - eps - 1e-12, (q, b, at_or_below, eps)


def draw(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    if kind == "uniform":
        return rng.uniform(0.0, 1000.0, size)
    if kind == "lognormal":
        return np.round(rng.lognormal(3.0, 1.5, size), 2)
    if kind == "ties":
        return rng.choice([5.0, 10.0, 10.0, 10.0, 20.0, 50.0], size)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["uniform", "lognormal", "ties"])
@pytest.mark.parametrize("k", [512, 50_000])  # sampled, and exact (k above the population)
def test_boundaries_track_the_current_population(kind: str, k: int) -> None:
    """Customers change their values batch after batch; the sketch follows the latest ones."""
    rng = np.random.default_rng(7)
    n_customers = 20_000
    hashes = [customer_hash(f"c{i}") for i in range(n_customers)]
    last = np.full(n_customers, -1, dtype=np.int64)  # -1: no purchase yet (not in population)
    freq = np.zeros(n_customers, dtype=np.int64)
    money = np.zeros(n_customers)
    value = np.zeros(n_customers)
    pq = PopulationQuantiles(k=k)
    clock = T0
    for _batch in range(8):
        who = rng.integers(0, n_customers, 6_000)
        clock += 7 * DAY_US
        times = clock - rng.integers(0, 7 * DAY_US, len(who))
        amounts = draw(kind, rng, len(who))
        for c, t, a in zip(who.tolist(), times.tolist(), amounts.tolist(), strict=True):
            last[c] = max(last[c], t)
            freq[c] += 1
            money[c] += a
            value[c] = a * 3.0 + money[c]  # any value that moves with the customer
            pq.update(hashes[c], int(last[c]), int(freq[c]), float(money[c]), float(value[c]))
        buyers = last >= 0
        b = pq.boundaries(as_of_us=clock)
        assert b is not None
        eps = b.rank_error
        assert b.exact == (k > buyers.sum()) and (eps == 0.0) == b.exact
        assert b.n == min(k, buyers.sum())
        assert_rank_within(last[buyers], b.last_purchase_us, eps)
        assert_rank_within(freq[buyers], b.frequency, eps)
        assert_rank_within(money[buyers], b.monetary, eps)
        assert_rank_within(value[buyers], b.value, eps)
        recency = (clock - last[buyers]) / DAY_US
        # recency boundaries, ascending: below the i-th one lies a share of at most
        # 1 - QUINTILES[-1 - i] + eps of the population (the freshest)
        assert list(b.recency_days) == sorted(b.recency_days)
        assert_rank_within(-recency, tuple(-r for r in b.recency_days[::-1]), eps)
        if b.exact:
            for col, bounds in ((freq[buyers], b.frequency), (money[buyers], b.monetary)):
                exact = np.quantile(col, QUINTILES, method="inverted_cdf")
                assert np.allclose(exact, bounds, rtol=0, atol=0)


def test_the_documented_bound_is_met_with_room_to_spare() -> None:
    """Over many populations the worst rank error stays within the 99 % bound."""
    worst = 0.0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        values = rng.lognormal(0, 2, 5_000)
        pq = PopulationQuantiles(k=256)
        for i, v in enumerate(values.tolist()):
            pq.update(customer_hash(f"s{seed}-{i}"), 0, 1, v)
        for q in QUINTILES:
            b = pq.quantile("monetary", q)
            worst = max(worst, np.mean(values < b) - q, q - np.mean(values <= b))
    assert worst <= rank_error_bound(256, 256)


def build(k: int, items: list[tuple[int, int, int, float, float | None]]) -> PopulationQuantiles:
    pq = PopulationQuantiles(k=k)
    for item in items:
        pq.update(*item)
    return pq


def customers(n: int, seed: int) -> list[tuple[int, int, int, float, float | None]]:
    rng = np.random.default_rng(seed)
    return [(customer_hash(f"m{i}"), T0 + int(rng.integers(0, 10**12)), int(rng.integers(1, 9)),
             float(rng.lognormal(3, 1)), None if i % 5 == 0 else float(rng.normal(100, 30)))
            for i in range(n)]


def test_merge_equals_sketching_the_union() -> None:
    items = customers(6_000, seed=1)
    whole = build(1024, items)
    shards = [build(1024, [it for it in items if it[0] % 3 == s]) for s in range(3)]
    merged = shards[0].merge(shards[1]).merge(shards[2])
    assert merged == whole
    assert merged.boundaries(T0) == whole.boundaries(T0)
    # merging into a smaller sketch keeps the smaller k's sample
    assert shards[0].merge(build(100, [])) == build(100, [it for it in items if it[0] % 3 == 0])


def test_pickle_round_trip_keeps_everything() -> None:
    items = customers(3_000, seed=2)
    pq = build(500, items[:2_000])
    copy = pickle.loads(pickle.dumps(pq))
    assert copy == pq and copy.boundaries(T0) == pq.boundaries(T0)
    for item in items[2_000:]:  # and both go on identically
        pq.update(*item)
        copy.update(*item)
    assert copy == pq and copy.boundaries(T0) == pq.boundaries(T0)
    assert copy.quantile("value", 0.5) == pq.quantile("value", 0.5)


def test_memory_is_bounded_after_a_million_updates() -> None:
    pq = PopulationQuantiles()  # default k = 8192
    hashes = [customer_hash(f"c{i}") for i in range(250_000)]
    for i in range(1_000_000):
        pq.update(hashes[i % 250_000], T0 + i, i % 13 + 1, float(i % 1000), float(i % 777))
    assert len(pq) == pq.k == 8192
    assert len(pickle.dumps(pq)) < 8192 * 57 + 1_000  # seven 8-byte columns and a header
    b = pq.boundaries(T0)
    assert b is not None and b.rank_error == pytest.approx(0.018, abs=5e-4)


def test_buyers_only_and_empty_sketch() -> None:
    pq = PopulationQuantiles(k=10)
    assert pq.boundaries(T0) is None and pq.quantile("monetary", 0.5) is None
    pq.update(customer_hash("prospect"), None, 0, 0.0)  # no purchase: not in the population
    assert len(pq) == 0
    pq.update(customer_hash("a"), T0, 1, 10.0)
    b = pq.boundaries(T0 + DAY_US)
    assert isinstance(b, Boundaries)
    assert b.frequency == (1, 1, 1, 1) and b.recency_days == (1.0,) * 4 and b.value == ()
    assert pq.premium_boundary() is None
    assert b.as_dict()["monetary"] == [10.0] * 4


def test_recency_moves_with_the_clock_alone() -> None:
    pq = build(100, [(customer_hash(f"r{i}"), T0 + i * DAY_US, 1, 1.0, None) for i in range(10)])
    b = pq.boundaries(T0 + 10 * DAY_US)
    assert b is not None
    later = b.at(T0 + 40 * DAY_US)
    assert later == pq.boundaries(T0 + 40 * DAY_US)
    assert [x - y for x, y in zip(later.recency_days, b.recency_days, strict=True)] == [30.0] * 4


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        PopulationQuantiles(k=0)
    pq = build(10, customers(5, seed=3))
    with pytest.raises(ValueError):
        pq.quantile("monetary", 0.0)


def test_rows_keep_first_purchase_and_instant_for_the_btyd_fits() -> None:
    pq = PopulationQuantiles(k=2)
    a, b, c = sorted(customer_hash(x) for x in "abc")
    pq.update(c, T0, 1, 5.0)  # defaults: both at the last purchase
    pq.update(a, T0 + 9, 3, 30.0, 7.0, first_purchase_us=T0, seen_us=T0 + 11)
    pq.update(b, T0 + 2, 2, 20.0, first_purchase_us=T0 + 1, seen_us=T0 + 3)  # evicts c
    assert pq.rows() == {a: (T0 + 9, 3, 30.0, 7.0, T0, T0 + 11),
                         b: (T0 + 2, 2, 20.0, None, T0 + 1, T0 + 3)}
    cols = pq.columns()
    assert sorted(cols["first_purchase_us"].tolist()) == [T0, T0 + 1]
    assert sorted(cols["seen_us"].tolist()) == [T0 + 3, T0 + 11]
    cols["seen_us"][:] = 0  # a copy: the sample is unchanged
    assert pq.rows()[a][5] == T0 + 11


def test_snapshots_of_five_columns_still_load() -> None:
    """Before the BTYD columns, a snapshot held the key and four dimensions."""
    items = customers(300, seed=3)
    pq = build(100, items)
    k, *blobs = pq.__getstate__()
    old = PopulationQuantiles.__new__(PopulationQuantiles)
    old.__setstate__((k, *blobs[:5]))
    assert old.boundaries(T0) == pq.boundaries(T0)
    assert {h: row[:4] for h, row in old.rows().items()} == {
        h: row[:4] for h, row in pq.rows().items()}
    assert all(row[4] == row[5] == row[0] for row in old.rows().values())


def test_the_sample_grows_past_its_first_allocation() -> None:
    items = customers(5_000, seed=4)
    pq = build(3_000, items)
    assert len(pq) == 3_000
    assert pq.rows() == {h: (last, f, m, v, last, last) for h, last, f, m, v in
                         sorted(items)[:3_000]}
