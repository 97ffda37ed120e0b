"""BG/NBD + Gamma-Gamma: recovery of known parameters, agreement with lifetimes, edge cases."""

from __future__ import annotations

import json
import math
import pickle
import warnings
from importlib.resources import files

import numpy as np
import pandas as pd
import pytest

from models.btyd import (
    BgNbdParams,
    FitError,
    GammaGammaParams,
    PopulationModel,
    clv_predicted,
    customer_summary,
    expected_purchases,
    expected_spend,
    fit_bgnbd,
    fit_bgnbd_report,
    fit_gamma_gamma,
    fit_population,
    p_alive,
)
from models.customer import CustomerState
from models.transaction import DAY_US, parse_transaction

with warnings.catch_warnings():  # lifetimes 0.11.3 sets a pandas option deprecated in pandas 3
    warnings.simplefilter("ignore")
    from lifetimes import BetaGeoFitter, GammaGammaFitter

TRUE = BgNbdParams(r=0.5, alpha=20.0, a=0.8, b=2.5)
TRUE_GG = GammaGammaParams(p=6.0, q=4.0, v=15.0)


def sample_bgnbd(params: BgNbdParams, n: int, seed: int) -> tuple[np.ndarray, ...]:
    """Simulate the generative story purchase by purchase: (x, t_x, T) in days."""
    rng = np.random.default_rng(seed)
    lam = rng.gamma(params.r, 1.0 / params.alpha, n)
    drop = rng.beta(params.a, params.b, n)
    T = rng.uniform(30.0, 720.0, n)
    x, t_x, now = np.zeros(n), np.zeros(n), np.zeros(n)
    alive = np.ones(n, dtype=bool)
    while alive.any():
        i = np.flatnonzero(alive)
        now[i] += rng.exponential(1.0 / lam[i])
        beyond = now[i] > T[i]
        alive[i[beyond]] = False
        i = i[~beyond]
        x[i] += 1
        t_x[i] = now[i]
        alive[i[rng.random(i.size) < drop[i]]] = False  # dropout after a repeat purchase
    return x, t_x, T


def sample_spend(params: GammaGammaParams, x: np.ndarray, seed: int) -> np.ndarray:
    """Mean of x Gamma(p, nu) transactions, nu ~ Gamma(q, v) per customer; 0 when x = 0."""
    rng = np.random.default_rng(seed)
    nu = rng.gamma(params.q, 1.0 / params.v, x.size)
    k = np.maximum(x, 1)
    return np.where(x > 0, rng.gamma(params.p * k, 1.0 / (k * nu)), 0.0)


@pytest.fixture(scope="module")
def synthetic() -> tuple[np.ndarray, ...]:
    x, t_x, T = sample_bgnbd(TRUE, 40_000, seed=1)
    return x, t_x, T, sample_spend(TRUE_GG, x, seed=2)


def cdnow() -> pd.DataFrame:
    path = files("lifetimes") / "datasets" / "cdnow_customers_summary_with_transactions.csv"
    d = pd.read_csv(str(path))
    d["T"] = np.maximum(d["T"], d["t_x"]) * 7.0  # weeks -> days; rounding put a few t_x > T
    d["t_x"] = d["t_x"] * 7.0
    return d


def rel(mine: object, theirs: object) -> float:
    a, b = np.asarray(mine, dtype=float), np.asarray(theirs, dtype=float)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


# (a) recovery of known parameters


def test_fit_recovers_generating_parameters(synthetic: tuple[np.ndarray, ...]) -> None:
    x, t_x, T, spend = synthetic
    fit = fit_bgnbd_report(x, t_x, T)
    assert fit.converged, fit.message
    for name, tolerance in (("r", 0.1), ("alpha", 0.1), ("a", 0.15), ("b", 0.15)):
        assert getattr(fit.params, name) == pytest.approx(getattr(TRUE, name), rel=tolerance)
    gg = fit_gamma_gamma(x, spend)
    for name in ("p", "q", "v"):
        assert getattr(gg, name) == pytest.approx(getattr(TRUE_GG, name), rel=0.15)


def test_subsample_is_deterministic_and_close(synthetic: tuple[np.ndarray, ...]) -> None:
    x, t_x, T, _ = synthetic
    one, two = (fit_bgnbd_report(x, t_x, T, sample_size=20_000, seed=3) for _ in range(2))
    assert one == two and one.n_used == 20_000 and one.n_customers == x.size
    assert one.params.r == pytest.approx(TRUE.r, rel=0.15)


# (b) agreement with lifetimes


@pytest.mark.parametrize("data", ["cdnow", "synthetic"])
@pytest.mark.parametrize("penalizer", [0.0, 0.001])
def test_agrees_with_lifetimes(data: str, penalizer: float,
                               synthetic: tuple[np.ndarray, ...]) -> None:
    if data == "cdnow":
        d = cdnow()
        x, t_x, T, spend = d["x"].to_numpy(), d["t_x"].to_numpy(), d["T"].to_numpy(), \
            d["zbar"].to_numpy()
    else:
        x, t_x, T, spend = (column[:4000] for column in synthetic)
    mine = fit_bgnbd(x, t_x, T, penalizer_coef=penalizer)
    bgf = BetaGeoFitter(penalizer_coef=penalizer).fit(x, t_x, T)
    assert rel([mine.r, mine.alpha, mine.a, mine.b], bgf.params_[["r", "alpha", "a", "b"]]) < 1e-3
    assert rel(p_alive(mine, x, t_x, T), bgf.conditional_probability_alive(x, t_x, T)) < 1e-3
    for t in (30.0, 365.0):
        theirs = bgf.conditional_expected_number_of_purchases_up_to_time(t, x, t_x, T)
        assert rel(expected_purchases(mine, t, x, t_x, T), theirs) < 1e-3

    repeat = x > 0
    gg = fit_gamma_gamma(x, spend)
    ggf = GammaGammaFitter().fit(x[repeat], spend[repeat])
    assert rel([gg.p, gg.q, gg.v], ggf.params_[["p", "q", "v"]]) < 1e-3
    theirs = ggf.conditional_expected_average_profit(x[repeat], spend[repeat])
    assert rel(expected_spend(gg, x[repeat], spend[repeat]), theirs) < 1e-3

    # 12 discounted 30-day months at 1 % a month == lifetimes' monthly CLV sum
    ours = clv_predicted(mine, gg, 360.0, x[repeat], t_x[repeat], T[repeat], spend[repeat],
                         discount_rate_per_day=1.01 ** (1 / 30) - 1)
    theirs = ggf.customer_lifetime_value(
        bgf, pd.Series(x[repeat]), pd.Series(t_x[repeat]), pd.Series(T[repeat]),
        pd.Series(spend[repeat]), time=12, discount_rate=0.01, freq="D")
    assert rel(ours, theirs) < 1e-3


# (c) degenerate inputs


def test_degenerate_inputs_give_clear_errors() -> None:
    with pytest.raises(FitError, match="bought twice"):
        fit_bgnbd([0, 0, 0], [0.0, 0.0, 0.0], [10.0, 20.0, 30.0])
    with pytest.raises(FitError, match="age 0"):
        fit_bgnbd([0, 1], [0.0, 0.0], [0.0, 0.0])
    with pytest.raises(FitError, match="no customers"):
        fit_bgnbd([], [], [])
    with pytest.raises(ValueError, match="t_x <= T"):
        fit_bgnbd([1], [5.0], [3.0])
    with pytest.raises(ValueError, match="finite"):
        fit_bgnbd([1], [float("nan")], [3.0])
    with pytest.raises(FitError, match="repeat purchase"):
        fit_gamma_gamma([0, 0], [10.0, 20.0])
    with pytest.raises(FitError, match="same mean spend"):
        fit_gamma_gamma([1, 2, 3], [10.0, 10.0, 10.0])
    with pytest.raises(FitError, match="bought twice"):
        fit_population([0], [0.0], [5.0], [10.0], fitted_at_us=0)


@pytest.mark.parametrize("rows", [
    ([3], [20.0], [40.0]),  # one customer
    ([1, 0, 2], [5.0, 0.0, 9.0], [10.0, 0.0, 9.0]),  # tiny, with an age-0 customer
    ([2] * 50 + [0] * 50, [30.0] * 50 + [0.0] * 50, [30.0] * 100),  # no dropout evidence
])
def test_tiny_or_extreme_data_fits_finite(rows: tuple[list[float], ...]) -> None:
    fit = fit_bgnbd_report(*rows)
    values = [fit.params.r, fit.params.alpha, fit.params.a, fit.params.b, fit.log_likelihood]
    assert all(math.isfinite(v) and v != 0 for v in values)
    x, t_x, T = (np.asarray(c, dtype=float) for c in rows)
    assert np.all(np.isfinite(p_alive(fit.params, x, t_x, T)))
    assert np.all(np.isfinite(expected_purchases(fit.params, 365.0, x, t_x, T)))
    assert fit.converged or "bound" in fit.message


def test_no_dropout_data_hits_no_infinity() -> None:
    rng = np.random.default_rng(5)
    T = rng.uniform(100.0, 400.0, 5000)
    x = rng.poisson(T / 30.0).astype(float)  # everyone keeps buying: p -> 0
    t_x = np.where(x > 0, T * rng.beta(np.maximum(x, 1), 1.0), 0.0)
    fit = fit_bgnbd_report(x, t_x, T)
    assert all(0 < v < 1e7 for v in (fit.params.r, fit.params.alpha, fit.params.a, fit.params.b))
    assert np.all(np.isfinite(expected_purchases(fit.params, 365.0, x, t_x, T)))


def test_predictions_stay_finite_at_the_edges() -> None:
    params = BgNbdParams(r=0.5, alpha=20.0, a=0.8, b=2.5)
    assert p_alive(params, 0, 0.0, 0.0) == 1.0
    assert expected_purchases(params, 0.0, 4, 10.0, 50.0) == 0.0
    assert math.isfinite(expected_purchases(params, 365.0, 0, 0.0, 0.0))
    huge = expected_purchases(params, 3650.0, 5000, 999.0, 1000.0)
    assert math.isfinite(huge) and huge > 0
    assert p_alive(params, 5000, 1.0, 1000.0) == 0.0
    # removable singularities: a = 1, and a + b = 1 for x = 0
    for a, b in ((1.0, 2.5), (0.4, 0.6)):
        at = expected_purchases(BgNbdParams(0.5, 20.0, a, b), 365.0, 0, 0.0, 100.0)
        near = [expected_purchases(BgNbdParams(0.5, 20.0, a + s, b), 365.0, 0, 0.0, 100.0)
                for s in (-1e-4, 1e-4)]
        assert math.isfinite(at) and at == pytest.approx(sum(near) / 2, rel=1e-6)
    with pytest.raises(ValueError):
        BgNbdParams(r=0.5, alpha=float("inf"), a=0.8, b=2.5)
    with pytest.raises(ValueError):
        GammaGammaParams(p=1.0, q=1.0, v=1.0)


def test_population_without_spend_model_falls_back_to_own_mean() -> None:
    model = fit_population([1, 2, 0], [5.0, 9.0, 0.0], [10.0, 12.0, 8.0], [10.0, 10.0, 0.0],
                           fitted_at_us=0)
    assert model.gamma_gamma is None and "own mean" in model.message
    assert model.expected_spend(2, 10.0) == 10.0
    assert math.isfinite(model.clv_predicted(365.0, 2, 9.0, 12.0, 10.0))


# (d) scalar and vector paths agree; serialisation


def test_scalar_and_vector_paths_agree(synthetic: tuple[np.ndarray, ...]) -> None:
    x, t_x, T, spend = (column[:300] for column in synthetic)
    model = fit_population(x, t_x, T, spend, fitted_at_us=0)
    assert model.gamma_gamma is not None
    vectors = (model.p_alive(x, t_x, T), model.expected_purchases(90.0, x, t_x, T),
               model.expected_spend(x, spend),
               model.clv_predicted(365.0, x, t_x, T, spend, discount_rate_per_day=3e-4))
    for i in range(x.size):
        row = int(x[i]), float(t_x[i]), float(T[i])
        scalars = (model.p_alive(*row), model.expected_purchases(90.0, *row),
                   model.expected_spend(row[0], float(spend[i])),
                   model.clv_predicted(365.0, *row, float(spend[i]), 3e-4))
        for scalar, vector in zip(scalars, vectors, strict=True):
            assert isinstance(scalar, float)
            assert scalar == pytest.approx(vector[i], rel=1e-10, abs=1e-12)


def test_population_model_round_trips(synthetic: tuple[np.ndarray, ...]) -> None:
    x, t_x, T, spend = (column[:2000] for column in synthetic)
    model = fit_population(x, t_x, T, spend, fitted_at_us=1_700_000_000_000_000)
    assert pickle.loads(pickle.dumps(model)) == model
    assert PopulationModel.from_dict(json.loads(json.dumps(model.to_dict()))) == model
    assert BgNbdParams.from_dict(model.bgnbd.to_dict()) == model.bgnbd
    assert model.version == "btyd@1700000000000000"


def test_customer_summary_from_customer_state() -> None:
    state = CustomerState("c")
    for eid, day, amount in (("a", 1, 10), ("b", 5, 20), ("c", 11, 30)):
        raw = (f'{{"event_id":"{eid}","customer_id":"c","type":"purchase","currency":"EUR",'
               f'"occurred_at":"2025-01-{day:02d}T00:00:00Z","amount":{amount}}}')
        state.apply(parse_transaction(raw.encode(), now_us=2_000_000_000_000_000), 7 * DAY_US)
    assert state.first_purchase_us is not None and state.last_purchase_us is not None
    as_of = state.last_purchase_us + 4 * DAY_US
    summary = customer_summary(state.purchase_count, state.first_purchase_us,
                               state.last_purchase_us, as_of, state.net_micros)
    assert summary == (2, 10.0, 14.0, 20.0)
    assert customer_summary(0, None, None, as_of, 0) is None
