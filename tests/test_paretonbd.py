"""Pareto/NBD: agreement with lifetimes and with direct integration, recovery of known
parameters, the churn contender, and a population fit that cannot hold up BG/NBD's."""

from __future__ import annotations

import math
import pickle
import warnings

import numpy as np
import pytest
from scipy.integrate import quad

from models.btyd import PopulationModel, fit_population
from models.churn import ParetoNbdChurnModel
from models.paretonbd import (
    ParetoNbdParams,
    expected_purchases,
    fit_paretonbd_report,
    log_likelihood,
    p_alive,
    p_no_purchase,
)
from tests.test_btyd import cdnow

with warnings.catch_warnings():  # lifetimes 0.11.3 sets a pandas option deprecated in pandas 3
    warnings.simplefilter("ignore")
    from lifetimes import ParetoNBDFitter

TRUE = ParetoNbdParams(r=0.6, alpha=15.0, s=0.8, beta=200.0)
# Both orders of alpha and beta: the likelihood's 2F1 terms differ between them.
PARAMS = (TRUE, ParetoNbdParams(r=0.55, alpha=74.1, s=0.61, beta=20.0))


def sample(params: ParetoNbdParams, n: int, seed: int) -> tuple[np.ndarray, ...]:
    """The generative story: Poisson purchases until an exponential lifetime ends (days)."""
    rng = np.random.default_rng(seed)
    lam = rng.gamma(params.r, 1.0 / params.alpha, n)
    mu = rng.gamma(params.s, 1.0 / params.beta, n)
    T = rng.uniform(30.0, 720.0, n)
    active = np.minimum(rng.exponential(1.0 / mu), T)
    x = rng.poisson(lam * active).astype(float)
    # given x purchases in (0, active], the last is the max of x uniforms
    t_x = np.where(x > 0, active * rng.beta(np.maximum(x, 1), 1.0), 0.0)
    return x, t_x, T


def lifetimes_fitter(params: ParetoNbdParams) -> ParetoNBDFitter:
    fitter = ParetoNBDFitter()
    fitter.params_ = {"r": params.r, "alpha": params.alpha, "s": params.s, "beta": params.beta}
    return fitter


@pytest.mark.parametrize("params", PARAMS)
def test_agrees_with_lifetimes(params: ParetoNbdParams) -> None:
    x, t_x, T = sample(TRUE, 300, seed=1)
    theirs = lifetimes_fitter(params)
    ll = ParetoNBDFitter._conditional_log_likelihood(
        (params.r, params.alpha, params.s, params.beta), x, t_x, T)
    np.testing.assert_allclose(log_likelihood(params, x, t_x, T), ll, rtol=1e-9)
    np.testing.assert_allclose(p_alive(params, x, t_x, T),
                               theirs.conditional_probability_alive(x, t_x, T), atol=1e-9)
    np.testing.assert_allclose(
        expected_purchases(params, 365.0, x, t_x, T),
        theirs.conditional_expected_number_of_purchases_up_to_time(365.0, x, t_x, T),
        rtol=1e-8)
    no_buy = [theirs.conditional_probability_of_n_purchases_up_to_time(0, 90.0, *row)
              for row in zip(x[:60], t_x[:60], T[:60], strict=True)]
    np.testing.assert_allclose(p_no_purchase(params, 90.0, x[:60], t_x[:60], T[:60]), no_buy,
                               atol=1e-9)


@pytest.mark.parametrize("params", PARAMS)
def test_scalars_match_arrays(params: ParetoNbdParams) -> None:
    x, t_x, T = sample(TRUE, 50, seed=2)
    for fn in (p_alive, lambda p, *a: p_no_purchase(p, 90.0, *a),
               lambda p, *a: expected_purchases(p, 365.0, *a)):
        arrays = fn(params, x, t_x, T)
        scalars = [fn(params, int(a), float(b), float(c)) for a, b, c in zip(x, t_x, T,
                                                                           strict=True)]
        assert all(isinstance(v, float) for v in scalars)
        np.testing.assert_allclose(scalars, arrays, rtol=1e-10, atol=1e-12)


def test_likelihood_equals_direct_integration_over_the_dropout_instant() -> None:
    """Alive at T, or died at some tau in (t_x, T] after the x purchases: integrate the
    gamma mixtures' closed forms over tau numerically (no 2F1 involved)."""
    r, alpha, s, beta = 0.55, 74.1, 0.61, 20.0
    params = ParetoNbdParams(r, alpha, s, beta)
    for x, t_x, T in ((0, 0.0, 100.0), (3, 40.0, 300.0), (40, 290.0, 300.0), (12, 5.0, 700.0)):
        head = math.lgamma(r + x) - math.lgamma(r) + r * math.log(alpha) + s * math.log(beta)
        alive = (alpha + T) ** -(r + x) * (beta + T) ** -s
        died, _ = quad(lambda tau, x=x: s * (alpha + tau) ** -(r + x) * (beta + tau) ** -(s + 1),
                       t_x, T, epsabs=0.0, epsrel=1e-11, limit=200)
        assert log_likelihood(params, x, t_x, T) == pytest.approx(
            head + math.log(alive + died), rel=1e-9)


def test_extreme_histories_stay_finite() -> None:
    """Hundreds of purchases, ages near 0, and a purchase at the clock: no overflow."""
    for params in PARAMS:
        for x, t_x, T in ((500, 700.0, 700.5), (300, 10.0, 700.0), (0, 0.0, 0.0),
                          (1, 1e-6, 1e-6), (5, 100.0, 100.0)):
            values = (p_alive(params, x, t_x, T), p_no_purchase(params, 90.0, x, t_x, T),
                      expected_purchases(params, 90.0, x, t_x, T))
            assert all(math.isfinite(v) for v in values), (params, x, t_x, T, values)
            assert 0.0 <= values[0] <= 1.0 and 0.0 <= values[1] <= 1.0


def test_fit_recovers_generating_parameters() -> None:
    x, t_x, T = sample(TRUE, 20_000, seed=3)
    fit = fit_paretonbd_report(x, t_x, T)
    assert fit.converged, fit.message
    assert fit.params.r == pytest.approx(TRUE.r, rel=0.1)
    assert fit.params.alpha == pytest.approx(TRUE.alpha, rel=0.15)
    # s and beta are less identified one by one than together: the mean dropout rate
    assert fit.params.s / fit.params.beta == pytest.approx(TRUE.s / TRUE.beta, rel=0.2)
    again = fit_paretonbd_report(x, t_x, T, initial=fit.params)  # a refit from the last one
    assert again.converged and again.params.r == pytest.approx(fit.params.r, rel=1e-3)


def test_fit_matches_lifetimes_on_cdnow() -> None:
    d = cdnow()
    x, t_x, T = d["x"].to_numpy(float), d["t_x"].to_numpy(), d["T"].to_numpy()
    ours = fit_paretonbd_report(x, t_x, T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.random.seed(0)  # lifetimes draws its starting point
        theirs = ParetoNBDFitter().fit(x, t_x, T)
    theirs_ll = float(log_likelihood(ParetoNbdParams(*(theirs.params_[k] for k in (
        "r", "alpha", "s", "beta"))), x, t_x, T).sum())
    assert ours.converged, ours.message
    assert ours.log_likelihood >= theirs_ll - 0.01  # at least as good a maximum
    assert ours.params.r == pytest.approx(theirs.params_["r"], rel=0.02)


def test_a_fit_that_cannot_finish_in_its_budget_is_not_converged() -> None:
    x, t_x, T = sample(TRUE, 4000, seed=4)
    fit = fit_paretonbd_report(x, t_x, T, budget_s=0.0)
    assert not fit.converged and "gave up" in fit.message
    assert math.isfinite(fit.params.r)


def test_a_fit_that_converges_as_its_budget_runs_out_is_kept(monkeypatch) -> None:
    # The search ends within the budget; the CPU clock passes the deadline before the
    # fit's final likelihood is computed. That evaluation once raised, and the flow died.
    from types import SimpleNamespace

    from models import paretonbd

    cpu = SimpleNamespace(now=0.0)
    monkeypatch.setattr(paretonbd, "time", SimpleNamespace(thread_time=lambda: cpu.now))
    search = paretonbd.minimize_log_params

    def search_then_run_out(*args, **kwargs):
        found = search(*args, **kwargs)
        cpu.now = 1e9
        return found

    monkeypatch.setattr(paretonbd, "minimize_log_params", search_then_run_out)
    x, t_x, T = sample(TRUE, 4000, seed=4)
    fit = fit_paretonbd_report(x, t_x, T, budget_s=3.0)
    assert fit.converged, fit.message
    assert math.isfinite(fit.log_likelihood)


def test_population_fit_carries_pareto_for_the_churn_contender() -> None:
    x, t_x, T = sample(TRUE, 3000, seed=5)
    spend = np.full(x.size, 30.0) + x
    model = fit_population(x, t_x, T, spend, fitted_at_us=1)
    assert model.paretonbd is not None and "paretonbd:" in model.message
    assert PopulationModel.from_dict(model.to_dict()) == model
    old = model.to_dict()
    del old["paretonbd"]  # a model saved before the rival existed
    assert PopulationModel.from_dict(old).paretonbd is None
    contender = ParetoNbdChurnModel(horizon_days=90.0)
    assert contender.predict_proba_one({"purchases": 2.0}) == 0.5  # no fit yet
    contender.use_fit(model)
    features = {"purchases": 4.0, "tenure_days": 300.0, "recency_days": 120.0}
    assert contender.predict_proba_one(features) == pytest.approx(
        p_no_purchase(model.paretonbd, 90.0, 3, 180.0, 300.0))
    copy = pickle.loads(pickle.dumps(contender))
    assert copy.predict_proba_one(features) == contender.predict_proba_one(features)
    assert copy.clone().predict_proba_one(features) == 0.5
    contender.use_fit(PopulationModel.from_dict(old))  # a fit without Pareto/NBD: kept
    assert contender.params == model.paretonbd


def test_pareto_is_refitted_from_the_previous_parameters() -> None:
    x, t_x, T = sample(TRUE, 3000, seed=6)
    spend = np.full(x.size, 30.0)
    first = fit_population(x, t_x, T, spend, fitted_at_us=0)
    assert first.paretonbd is not None
    later = fit_population(x[:1500], t_x[:1500], T[:1500], spend[:1500],
                           fitted_at_us=1, previous=first)
    assert later.paretonbd is not None and later.paretonbd != first.paretonbd
    # A refit of Pareto/NBD that fails keeps the previous parameters, said in the message.
    import models.btyd

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models.btyd, "RIVAL_BUDGET_S", -1.0)  # given up at once
        failed = fit_population(x, t_x, T, spend, fitted_at_us=1, previous=first)
        assert failed.paretonbd == first.paretonbd
        assert "gave up" in failed.message and "previous parameters kept" in failed.message
        assert fit_population(x, t_x, T, spend, fitted_at_us=1).paretonbd is None
    # Started from the maximum of the same customers, the fit stays there.
    again = fit_population(x, t_x, T, spend, fitted_at_us=2, previous=first)
    assert again.paretonbd is not None
    for name in ("r", "alpha", "s", "beta"):
        assert getattr(again.paretonbd, name) == pytest.approx(
            getattr(first.paretonbd, name), rel=0.02)


def test_customer_values_follow_the_btyd_family_the_arena_promoted() -> None:
    from dataclasses import replace

    from models.population import Population
    from models.scoring import Outputs, ScoredCustomer
    from models.transaction import DAY_US, MICROS, Transaction

    x, t_x, T = sample(TRUE, 3000, seed=7)
    fit = fit_population(x, t_x, T, np.full(x.size, 30.0) + x, fitted_at_us=0)
    assert fit.paretonbd is not None
    population = Population()
    population.btyd = fit
    assert population.value_model() == "bgnbd"  # the reference, first champion
    arena = population.arena
    arena.promotions.append({"from": "bgnbd", "to": "paretonbd"})
    arena.champion = "paretonbd"
    assert population.value_model() == "paretonbd"
    arena.promotions.append({"from": "paretonbd", "to": "logreg"})
    arena.champion = "logreg"  # a learned model serves churn risk: values stay Pareto/NBD's
    assert population.value_model() == "paretonbd"
    assert population.report("now")["value_model"] == "paretonbd"
    bundle = population.bundle()
    assert bundle.value_model == "paretonbd"

    # A one-time buyer silent for 300 days: BG/NBD holds them alive for sure, Pareto/NBD not.
    customer = ScoredCustomer("c")
    customer.apply(Transaction("e", "c", 0, False, 10 * MICROS, "EUR", b"e"), bundle, Outputs())
    customer.as_of_us = 300 * DAY_US
    doc = customer.document(bundle, Outputs())
    assert doc["p_alive"] == pytest.approx(p_alive(fit.paretonbd, 0, 0.0, 300.0))
    assert doc["p_alive"] < 0.9
    assert doc["expected_purchases"] == pytest.approx(
        expected_purchases(fit.paretonbd, 365.0, 0, 0.0, 300.0))
    reference = customer.document(replace(bundle, value_model="bgnbd"), Outputs())
    assert reference["p_alive"] == 1.0

    population.btyd = replace(fit, paretonbd=None)  # no Pareto/NBD fit has succeeded yet
    assert population.value_model() == "bgnbd"

