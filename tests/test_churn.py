"""Churn labels mature in event time; churn features never see the future."""

from __future__ import annotations

import math
import pickle
import random

import numpy as np
import pytest

from models.bgnbd import BgNbdParams
from models.churn import (
    HORIZON_US,
    PendingLabel,
    bgnbd_churn_prior,
    mature_on_clock,
    mature_on_purchase,
)
from models.churn_features import FEATURE_NAMES, churn_features, pack, unpack
from models.customer import CustomerState
from models.transaction import DAY_US, MICROS, Transaction

LATENESS_US = 7 * DAY_US


def pending_at(day: float) -> PendingLabel:
    features = {name: float(i) for i, name in enumerate(FEATURE_NAMES)}
    return PendingLabel.open(features, round(day * DAY_US), {"logreg": 0.25, "tree": 0.5})


# --- labels ---------------------------------------------------------------------------

def test_repurchase_within_the_horizon_matures_as_zero() -> None:
    p = pending_at(10)
    for day in (10.5, 50, 100):  # the horizon's last instant still counts as "within"
        example = mature_on_purchase(p, round(day * DAY_US))
        assert example is not None and example.label == 0
        assert example.matured_at_us == round(day * DAY_US)
    assert example.predictions_at_open == {"logreg": 0.25, "tree": 0.5}
    assert example.features == {name: float(i) for i, name in enumerate(FEATURE_NAMES)}
    assert example.opened_at_us == 10 * DAY_US


def test_clock_passing_the_horizon_matures_as_one_and_nothing_before() -> None:
    p = pending_at(10)
    due = 10 * DAY_US + HORIZON_US
    assert p.due_at_us() == due
    for clock in (10 * DAY_US, 50 * DAY_US, due - 1, due):
        assert mature_on_clock(p, clock, HORIZON_US) is None
    example = mature_on_clock(p, due + 1, HORIZON_US)
    assert example is not None and example.label == 1
    assert example.matured_at_us == due  # the same whatever the clock's step: replay = live
    assert mature_on_clock(p, due + 30 * DAY_US, HORIZON_US) == example


def test_nothing_matures_without_a_pending_or_from_an_older_purchase() -> None:
    p = pending_at(10)
    assert mature_on_purchase(None, 20 * DAY_US) is None
    assert mature_on_clock(None, 200 * DAY_US) is None
    assert mature_on_purchase(p, 10 * DAY_US) is None  # the opening purchase itself
    assert mature_on_purchase(p, 9 * DAY_US) is None  # a late purchase from before


def test_a_purchase_after_the_horizon_still_counts_as_churned() -> None:
    example = mature_on_purchase(pending_at(10), 150 * DAY_US)
    assert example is not None and example.label == 1
    assert example.matured_at_us == 10 * DAY_US + HORIZON_US


def test_horizon_is_a_parameter() -> None:
    p = pending_at(0)
    assert mature_on_clock(p, 31 * DAY_US, 30 * DAY_US).label == 1
    assert mature_on_purchase(p, 31 * DAY_US, 30 * DAY_US).label == 1
    assert mature_on_purchase(p, 29 * DAY_US, 30 * DAY_US).label == 0


def test_pending_label_is_small_and_picklable() -> None:
    p = pending_at(10)
    blob = pickle.dumps(p)
    assert pickle.loads(blob) == p
    assert len(blob) < 600, len(blob)  # per customer: millions of these live in the state
    assert unpack(pack(unpack(p.features))) == unpack(p.features)


# --- features -------------------------------------------------------------------------

def random_events(seed: int, n: int = 60) -> list[tuple[int, int, bool]]:
    """(time, amount micros, is_refund) sorted by time: purchases with gaps, some refunds."""
    rng = random.Random(seed)
    t, events = 0, []
    for _ in range(n):
        t += round(rng.expovariate(1 / 12) * DAY_US) + 1
        events.append((t, rng.randint(1, 200) * MICROS, rng.random() < 0.1))
    if events[0][2]:
        events[0] = (events[0][0], events[0][1], False)
    return events


def apply_all(events: list[tuple[int, int, bool]], order: list[int]) -> CustomerState:
    state = CustomerState("c")
    for i in order:
        t, amount, refund = events[i]
        tx = Transaction(f"e{i}", "c", t, refund, amount, "EUR", f"{i}".encode())
        assert state.apply(tx, LATENESS_US) == "applied"
    return state


def batch_features(events: list[tuple[int, int, bool]], as_of: int) -> dict[str, float]:
    """A plain recomputation from the full history up to ``as_of``."""
    past = [e for e in events if e[0] <= as_of]
    buys = np.array([t for t, _, r in past if not r], dtype=float) / DAY_US
    gross = sum(a for _, a, r in past if not r) / MICROS
    refunds = sum(a for _, a, r in past if r) / MICROS
    gaps = np.diff(buys)
    now = as_of / DAY_US
    n = len(buys)
    out = {"purchases": float(n), "tenure_days": now - buys[0], "recency_days": now - buys[-1],
           "gap_mean_days": gaps.mean() if n > 1 else 0.0,
           "gap_std_days": gaps.std() if n > 1 else 0.0,
           "gap_last_days": min(gaps[-1], 365.0) if n > 1 else 0.0,
           "spend_mean": gross / n, "log_monetary": math.log1p(max(gross - refunds, 0.0)),
           "refund_share": refunds / gross}
    for days in (30, 90, 365):
        inside = [(t, a) for t, a, r in past if not r and t > as_of - days * DAY_US]
        out[f"purchases_{days}d"] = float(len(inside))
        out[f"log_spend_{days}d"] = math.log1p(sum(a for _, a in inside) / MICROS)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_features_match_a_batch_recomputation_at_every_purchase(seed: int) -> None:
    events = random_events(seed)
    state = CustomerState("c")
    for i, (t, amount, refund) in enumerate(events):
        tx = Transaction(f"e{i}", "c", t, refund, amount, "EUR", f"{i}".encode())
        state.apply(tx, LATENESS_US)
        if refund:
            continue
        got = churn_features(state, t)
        assert list(got) == list(FEATURE_NAMES)
        for name, value in batch_features(events, t).items():
            assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-9), (i, name)


@pytest.mark.parametrize("seed", range(5))
def test_no_future_leaks_in_whatever_order_later_events_arrive(seed: int) -> None:
    events = random_events(seed)
    rng = random.Random(seed)
    for cut in range(3, len(events) - 3):
        t = events[cut][0]
        if events[cut][2]:
            continue
        alone = churn_features(apply_all(events, list(range(cut + 1))), t)
        later = [j for j in range(cut + 1, len(events)) if events[j][0] <= t + LATENESS_US]
        assert churn_features(apply_all(events, list(range(cut + 1)) + later), t) == alone
        # later events arrive *before* the last ones up to t (all within the lateness)
        newest = events[later[-1]][0] if later else t
        early = [j for j in range(cut + 1) if events[j][0] < newest - LATENESS_US]
        tail = [j for j in range(cut + 1) if j not in early]
        rng.shuffle(tail)
        state = apply_all(events, early + later + tail)
        assert churn_features(state, t) == alone, cut


def test_features_refuse_an_instant_without_a_purchase_or_already_forgotten() -> None:
    refund_first = [(1 * DAY_US, 5 * MICROS, True), (5 * DAY_US, 9 * MICROS, False)]
    with pytest.raises(ValueError, match="no purchase at or before"):
        churn_features(apply_all(refund_first, [0, 1]), 2 * DAY_US)
    events = random_events(0)
    state = apply_all(events, list(range(len(events))))
    assert state.recent[0][0] > events[0][0]  # two years of events: the first are pruned
    with pytest.raises(ValueError, match="older than the oldest event"):
        churn_features(state, events[0][0])


# --- the prior ------------------------------------------------------------------------

def test_bgnbd_prior_matches_a_monte_carlo_draw() -> None:
    params = BgNbdParams(r=0.75, alpha=15.0, a=0.8, b=2.5)
    x, t_x, T, h = 4, 80.0, 120.0, 90.0
    rng = np.random.default_rng(0)
    n = 400_000
    lam = rng.gamma(params.r, 1 / params.alpha, n)
    p = rng.beta(params.a, params.b, n)
    # condition on the history by importance weights: BG/NBD likelihood of (x, t_x, T)
    like = lam ** x * np.exp(-lam * T) * (1 - p) ** x \
        + (x > 0) * p * (1 - p) ** (x - 1) * lam ** x * np.exp(-lam * t_x)
    alive_like = lam ** x * np.exp(-lam * T) * (1 - p) ** x
    silent = (like - alive_like) + alive_like * np.exp(-lam * h)
    mc = float(silent.sum() / like.sum())
    assert bgnbd_churn_prior(params, x, t_x, T, h) == pytest.approx(mc, abs=0.01)
