"""End to end: the arena learns churn online from the generator's customers.

The generator's customers buy as Poisson processes until a latent stop time. The test
replays their purchases in event time through exactly what the flow does (per-customer
state, one pending label each, an event-time timer heap that matures labels when the
clock passes them, the arena) and checks that the online models' prequential AUC beats
the "days since the previous purchase" baseline on the same matured labels.
"""

from __future__ import annotations

import heapq
import pickle
import time
from typing import Any

import numpy as np
import pytest

from crmscore.generator import GeneratorConfig, generate
from models.arena import ArenaConfig, ChurnArena
from models.churn import HORIZON_US, PendingLabel, mature_on_clock, mature_on_purchase
from models.churn_features import churn_features
from models.customer import CustomerState
from models.transaction import DAY_US, Transaction

BURN_IN = 1500  # labels before the models are judged


def exact_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted half (the reference for the binned one)."""
    order = np.argsort(scores, kind="mergesort")
    s, y = scores[order], labels[order]
    ranks = np.empty(len(s))
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i : j + 1] = (i + j) / 2 + 1
        i = j + 1
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def simulate(customers: int, days: float, seed: int, arena: ChurnArena) -> dict[str, Any]:
    gen = generate(GeneratorConfig(customers=customers, days=days, seed=seed,
                                   duplicate_rate=0.0, disorder_rate=0.0, malformed_rate=0.0))
    ev = gen.events
    stop_us, rate = gen.customers.stop_us, gen.customers.rate
    states: dict[int, CustomerState] = {}
    pending: dict[int, PendingLabel] = {}
    baseline: dict[tuple[int, int], float] = {}
    heap: list[tuple[int, int, int]] = []  # (due_us, customer, opened_at_us)
    # (baseline, logreg at open, label, oracle, tree at open, rate-only oracle)
    rows: list[tuple[float, ...]] = []
    served: list[str] = []
    timing = [0.0, 0]

    def learn(cust: int, example: Any) -> None:
        if example is None:
            return
        key = (cust, example.opened_at_us)
        # the oracle: P(no purchase in the horizon) from the customer's true rate and stop
        stop = int(stop_us[cust])
        active_us = HORIZON_US if stop < 0 else min(HORIZON_US, stop - example.opened_at_us)
        truth = float(np.exp(-rate[cust] * max(active_us, 0) / DAY_US))
        rate_only = float(np.exp(-rate[cust] * HORIZON_US / DAY_US))  # knows no stop time
        rows.append((baseline.pop(key), example.predictions_at_open["logreg"],
                     example.label, truth, example.predictions_at_open["tree"], rate_only))
        t0 = time.perf_counter()
        arena.learn(example)
        timing[0] += time.perf_counter() - t0
        timing[1] += 1

    for i in range(len(ev.t_us)):
        t, cust = int(ev.t_us[i]), int(ev.cust[i])
        while heap and heap[0][0] < t:  # the clock passes a due instant
            _, c, opened = heapq.heappop(heap)
            p = pending.get(c)
            if p is not None and p.opened_at_us == opened:
                del pending[c]
                learn(c, mature_on_clock(p, t))
        state = states.get(cust) or states.setdefault(cust, CustomerState(str(cust)))
        refund = bool(ev.refund[i])
        tx = Transaction(f"e{i}", str(cust), t, refund, int(ev.cents[i]) * 10_000, "EUR",
                         str(i).encode())
        assert state.apply(tx, lateness_us=7 * DAY_US) == "applied"
        if refund:
            continue
        learn(cust, mature_on_purchase(pending.pop(cust, None), t))
        x = churn_features(state, t)
        t0 = time.perf_counter()
        opened = arena.open(x, t)
        served.append(arena.predict(x, prior=0.5, pending=opened).source)
        timing[0] += time.perf_counter() - t0
        pending[cust] = opened
        gap = x["gap_last_days"] if x["has_repeat"] else x["tenure_days"]
        baseline[(cust, t)] = gap
        heapq.heappush(heap, (opened.due_at_us(), cust, t))
    return {"rows": np.array(rows), "served": served,
            "us_per_event": timing[0] / max(timing[1], 1) * 1e6}


@pytest.fixture(scope="module")
def run() -> dict[str, Any]:
    arena = ChurnArena(config=ArenaConfig(min_labels=500))
    out = simulate(customers=2500, days=540, seed=3, arena=arena)
    out["arena"] = arena
    return out


def test_online_model_beats_the_recency_baseline(run: dict[str, Any]) -> None:
    rows = run["rows"][BURN_IN:]
    labels = rows[:, 2].astype(int)
    # the baseline, with one-purchase customers ranked either way: the better of the two
    base = max(exact_auc(rows[:, 0], labels),
               exact_auc(np.where(rows[:, 0] == 0, 1e6, rows[:, 0]), labels))
    model = exact_auc(rows[:, 1], labels)
    report = run["arena"].report()
    print(f"\nlabels={len(run['rows'])} churn rate={labels.mean():.3f} "
          f"baseline AUC={base:.3f} logreg AUC={model:.3f} "
          f"arena: { {n: m['metrics']['auc'] for n, m in report['models'].items()} } "
          f"champion={report['model_version']} us/event={run['us_per_event']:.0f}")
    assert model > base + 0.02
    assert model > 0.7
    # the binned online AUC (all labels) agrees with the exact one
    logreg_all = exact_auc(run["rows"][:, 1], run["rows"][:, 2].astype(int))
    assert abs(report["models"]["logreg"]["metrics"]["auc"] - logreg_all) < 0.005


def test_the_models_against_oracles(run: dict[str, Any]) -> None:
    """Two oracles: one knows each customer's true purchase rate and stop time (a ceiling
    no model reaches: the stop is in the future), one knows the true rate only."""
    rows = run["rows"][BURN_IN:]
    labels = rows[:, 2].astype(int)
    oracle, logreg, tree, rate_only = (exact_auc(rows[:, k], labels) for k in (3, 1, 4, 5))
    print(f"\nAUC oracle={oracle:.3f} rate-only oracle={rate_only:.3f} "
          f"logreg={logreg:.3f} tree={tree:.3f}")
    assert oracle > logreg
    assert logreg > rate_only - 0.1


def test_prior_is_served_until_enough_labels_then_the_model(run: dict[str, Any]) -> None:
    served = run["served"]
    first_model = served.index("model")
    assert set(served[:first_model]) == {"prior"}
    assert set(served[first_model:]) == {"model"}


def test_the_arena_survives_a_pickle_round_trip(run: dict[str, Any]) -> None:
    arena = run["arena"]
    blob = pickle.dumps(arena)
    copy = pickle.loads(blob)
    x = {"purchases": 3.0, "gap_last_days": 40.0, "tenure_days": 100.0}
    assert copy.predict(x) == arena.predict(x)
    assert copy.report() == arena.report()
    print(f"\narena pickle: {len(blob) / 1024:.0f} KB")
    assert len(blob) < sum(m.max_pickle_bytes for m in arena.models.values()) + 200_000
