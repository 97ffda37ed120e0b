"""The generic checks every registered churn model passes (river's ``checks`` idea).

A family added to ``models.churn.MODEL_FAMILIES`` is picked up here automatically.
"""

from __future__ import annotations

import pickle
import random
import time

import numpy as np
import pytest

from models.churn import MODEL_FAMILIES, RiverChurnModel
from models.churn_features import FEATURE_NAMES
from tests.test_churn_e2e import exact_auc

FAMILIES = sorted(MODEL_FAMILIES)


def toy_stream(n: int, seed: int = 0) -> list[tuple[dict[str, float], int]]:
    """A separable problem over the real feature names: churn iff a gap is overdue."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        x = {name: rng.gauss(0.0, 1.0) for name in FEATURE_NAMES}
        y = int(x["gap_last_rel"] + 0.5 * x["recency_days"] > 0.3)
        rows.append((x, y))
    return rows


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request: pytest.FixtureRequest) -> tuple[RiverChurnModel, list]:
    model = MODEL_FAMILIES[request.param]()
    for x, y in toy_stream(8000):
        model.learn_one(x, y)
    return model, toy_stream(500, seed=1)


def test_learns_a_separable_problem(trained: tuple[RiverChurnModel, list]) -> None:
    model, test = trained
    scores = np.array([model.predict_proba_one(x) for x, _ in test])
    auc = exact_auc(scores, np.array([y for _, y in test]))
    print(f"\n{model.name}: toy AUC {auc:.3f}")
    assert auc > 0.9


def test_probabilities_are_probabilities(trained: tuple[RiverChurnModel, list]) -> None:
    model, test = trained
    extreme = {name: 1e9 for name in FEATURE_NAMES}
    for x in [x for x, _ in test] + [extreme, {}]:
        p = model.predict_proba_one(x)
        assert isinstance(p, float) and 0.0 <= p <= 1.0


def test_pickle_round_trip_predicts_identically(trained: tuple[RiverChurnModel, list]) -> None:
    model, test = trained
    copy = pickle.loads(pickle.dumps(model))
    assert [copy.predict_proba_one(x) for x, _ in test] == \
        [model.predict_proba_one(x) for x, _ in test]
    # and both keep learning the same way
    for x, y in test[:50]:
        copy.learn_one(x, y)
        model.learn_one(x, y)
    assert copy.predict_proba_one(test[0][0]) == model.predict_proba_one(test[0][0])


def test_clone_is_fresh(trained: tuple[RiverChurnModel, list]) -> None:
    model, test = trained
    fresh = model.clone()
    fresh_again = MODEL_FAMILIES[model.name]()
    assert fresh.name == model.name and fresh is not model
    assert [fresh.predict_proba_one(x) for x, _ in test[:20]] == \
        [fresh_again.predict_proba_one(x) for x, _ in test[:20]]
    before = model.predict_proba_one(test[0][0])
    fresh.learn_one(test[0][0], 1 - test[0][1])
    assert model.predict_proba_one(test[0][0]) == before  # no shared state


@pytest.mark.parametrize("family", FAMILIES)
def test_size_stays_bounded_and_cost_is_measured(family: str) -> None:
    model = MODEL_FAMILIES[family]()
    stream = toy_stream(2000, seed=2)
    sizes = []
    t0 = time.perf_counter()
    for round_ in range(5):  # 10k events, drifting so that trees keep growing if they can
        for x, y in stream:
            model.learn_one(x, y if round_ % 2 == 0 else 1 - y)
            model.predict_proba_one(x)
        sizes.append(len(pickle.dumps(model)))
    us = (time.perf_counter() - t0) / (5 * len(stream)) * 1e6
    print(f"\n{family}: {us:.0f} us per predict+learn, pickle {sizes[-1] / 1024:.0f} KB "
          f"(bound {model.max_pickle_bytes / 1024:.0f} KB)")
    assert max(sizes) <= model.max_pickle_bytes
