"""Pareto/NBD (Schmittlein, Morrison & Colombo 1987): BG/NBD's rival, dropout in continuous time.

The same summaries as :mod:`models.bgnbd` (``x`` repeat purchases, ``t_x`` days from the
first purchase to the last, ``T`` days from the first purchase to the clock). While
alive, a customer buys at a Poisson rate drawn from Gamma(r, alpha); their lifetime is
exponential with a rate drawn from Gamma(s, beta), so they may drop out at any instant,
not only right after a purchase as in BG/NBD. On the generator's stream (whose latent
process is exactly this) and on CDNOW it ranks customers who stopped better than BG/NBD.

The likelihood is equation (18) of Fader & Hardie's 2005 note "Deriving the Pareto/NBD
model" (as ``lifetimes.ParetoNBDFitter``), with its Gauss hypergeometric terms taken
through Euler's transformation ``2F1(a, b; a+1; z) = (1-z)^(1-b) 2F1(1, a+1-b; a+1; z)``
in log space, so they never overflow however many purchases a customer made.

Two quantities follow from the likelihood alone: ``P(no purchase in (T, T+h])`` is
``L(x, t_x, T+h) / L(x, t_x, T)`` (the history observed for ``h`` days longer), which
is churn risk's definition; and ``p_alive`` (eq. 36 of the note).

:func:`fit_paretonbd_report` maximises the same mean log-likelihood as lifetimes (time
rescaled so the oldest customer has age 1) over log-parameters with L-BFGS-B and a
central-difference gradient (the 2F1 terms have no cheap derivative in their parameters),
at most ``MAX_ITERATIONS`` steps; ``initial`` starts it from earlier parameters. Unlike
BG/NBD's, a fit ending on a bound is not refitted with penalties: this model is a rival,
and a rival that cannot be fitted is left out until it can.

>>> params = ParetoNbdParams(r=0.55, alpha=74.1, s=0.61, beta=81.7)  # CDNOW (weeks -> days)
>>> round(p_alive(params, x=2, t_x=213.0, T=272.0), 4)
0.8684
>>> round(p_no_purchase(params, 90.0, x=2, t_x=213.0, T=272.0), 4)
0.6363
>>> round(expected_purchases(params, 365.0, x=2, t_x=213.0, T=272.0), 4)
1.8483
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import gammaln, hyp2f1

from models.bgnbd import (
    LOG_BOUND,
    FitReport,
    PositiveParams,
    all_scalars,
    fit_inputs,
    minimize_log_params,
)

_STEP = 1e-5  # central-difference step in log-parameters


class _OutOfTime(Exception):
    """A fit ran past its time budget."""

# Iterations before a fit is given up (not converged). A fit from scratch or from the
# previous parameters takes ~10 (0.5 s on 8,192 customers); early in a stream, before
# dropout shows, (s, beta) run off together along a ridge of the likelihood and a fit
# without this cap took minutes on CDNOW's first weeks, holding up the BG/NBD refits.
MAX_ITERATIONS = 60
# ... and s, the dropout rates' gamma shape, is kept below this: (s, beta) -> infinity is
# the limit of one dropout rate for everyone, where the 2F1 series converge slowly (30 us
# a term at s = 155). A fit that ends there is not converged: left out.
MAX_S = 50.0
UNUSABLE = 1e10  # the objective where the likelihood is not finite


@dataclass(frozen=True, slots=True)
class ParetoNbdParams(PositiveParams):
    r: float
    alpha: float
    s: float
    beta: float


def log_likelihood(params: ParetoNbdParams, x: Any, t_x: Any, T: Any) -> Any:
    """Each customer's log-likelihood (days): a float for scalars, else an array."""
    r, alpha, s, beta = params.r, params.alpha, params.s, params.beta
    if all_scalars(x, t_x, T):
        head = math.lgamma(r + x) - math.lgamma(r) + r * math.log(alpha) + s * math.log(beta)
        alive = -(r + x) * math.log(alpha + T) - s * math.log(beta + T)
        dead = math.log(s / (r + s + x)) + _log_a0(params, x, t_x, T)
        return head + _logaddexp(alive, dead)
    x, t_x, T = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (x, t_x, T)))
    head = gammaln(r + x) - gammaln(r) + r * math.log(alpha) + s * math.log(beta)
    alive = -(r + x) * np.log(alpha + T) - s * np.log(beta + T)
    dead = np.log(s / (r + s + x)) + _log_a0(params, x, t_x, T)
    return head + np.logaddexp(alive, dead)


def p_alive(params: ParetoNbdParams, x: Any, t_x: Any, T: Any) -> Any:
    """P(customer still alive at ``T`` | x, t_x, T) (eq. 36)."""
    r, alpha, s, beta = params.r, params.alpha, params.s, params.beta
    if all_scalars(x, t_x, T):
        log_odds_dead = (math.log(s / (r + s + x)) + (r + x) * math.log(alpha + T)
                         + s * math.log(beta + T) + _log_a0(params, x, t_x, T))
        return 0.0 if log_odds_dead > 700.0 else 1.0 / (1.0 + math.exp(log_odds_dead))
    x, t_x, T = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (x, t_x, T)))
    log_odds_dead = (np.log(s / (r + s + x)) + (r + x) * np.log(alpha + T)
                     + s * np.log(beta + T) + _log_a0(params, x, t_x, T))
    return 1.0 / (1.0 + np.exp(np.minimum(log_odds_dead, 700.0)))


def p_no_purchase(params: ParetoNbdParams, h: float, x: Any, t_x: Any, T: Any) -> Any:
    """P(no purchase in the next ``h`` days | x, t_x, T): churn risk's definition."""
    if all_scalars(x, t_x, T):
        ratio = log_likelihood(params, x, t_x, T + h) - log_likelihood(params, x, t_x, T)
        return min(math.exp(min(ratio, 0.0)), 1.0)
    ratio = log_likelihood(params, x, t_x, np.asarray(T, dtype=float) + h) \
        - log_likelihood(params, x, t_x, T)
    return np.exp(np.minimum(ratio, 0.0))


def expected_purchases(params: ParetoNbdParams, t: float, x: Any, t_x: Any, T: Any) -> Any:
    """Expected purchases in the next ``t`` days given (x, t_x, T) (eq. 41):
    ``p_alive`` times :func:`purchases_if_alive`."""
    return p_alive(params, x, t_x, T) * purchases_if_alive(params, t, x, T)


def purchases_if_alive(params: ParetoNbdParams, t: float, x: Any, T: Any) -> Any:
    """Expected purchases in the next ``t`` days of a customer alive at ``T`` with ``x``
    repeat purchases: ``(r+x)(beta+T) / (alpha+T) * (1 - q^(s-1)) / (s-1)``, ``q =
    (beta+T) / (beta+T+t)``; the last factor is ``-log q`` at ``s = 1``."""
    r, alpha, s, beta = params.r, params.alpha, params.s, params.beta
    if all_scalars(x, T):
        log_q = math.log((beta + T) / (beta + T + t))
        span = -log_q if abs(s - 1.0) < 1e-9 else -math.expm1((s - 1.0) * log_q) / (s - 1.0)
        return (r + x) * (beta + T) / (alpha + T) * span
    x, T = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (x, T)))
    log_q = np.log((beta + T) / (beta + T + t))
    span = -log_q if abs(s - 1.0) < 1e-9 else -np.expm1((s - 1.0) * log_q) / (s - 1.0)
    return (r + x) * (beta + T) / (alpha + T) * span


def _logaddexp(a: float, b: float) -> float:
    if a < b:
        a, b = b, a
    return a if b == -math.inf else a + math.log1p(math.exp(b - a))


def _log_a0(params: ParetoNbdParams, x: Any, t_x: Any, T: Any) -> Any:
    """log A0 (eqs. 19-20): ``s/(r+s+x) * A0`` is the likelihood of dying in (t_x, T].

    ``A0 = F(t_x) - F(T)`` with ``F(t) = 2F1(r+s+x, b; r+s+x+1; z(t)) / (m + t)^(r+s+x)``,
    ``m = max(alpha, beta)``, ``z(t) = |alpha - beta| / (m + t)`` and ``b = s + 1`` when
    alpha >= beta, else ``r + x``. ``-inf`` when ``t_x = T``.
    """
    r, alpha, s, beta = params.r, params.alpha, params.s, params.beta
    m, d = max(alpha, beta), abs(alpha - beta)
    a = r + s + x
    b = s + 1.0 if alpha >= beta else r + x
    if all_scalars(x, t_x, T):
        hi, lo = _log_f(a, b, m, d, t_x), _log_f(a, b, m, d, T)
        gap = lo - hi
        return -math.inf if gap >= 0.0 else hi + math.log(-math.expm1(gap))
    hi, lo = _log_f(a, b, m, d, t_x), _log_f(a, b, m, d, T)
    gap = np.minimum(lo - hi, 0.0)
    with np.errstate(divide="ignore"):
        return np.where(lo < hi, hi + np.log(-np.expm1(gap)), -np.inf)


def _log_f(a: Any, b: Any, m: float, d: float, t: Any) -> Any:
    """``log(2F1(a, b; a+1; z) / (m+t)^a)`` with ``z = d / (m+t)``, by Euler's transformation."""
    if all_scalars(a, b, t):
        q = m + t
        series = float(hyp2f1(1.0, a + 1.0 - b, a + 1.0, d / q))
        return (1.0 - b) * math.log1p(-d / q) + math.log(series) - a * math.log(q)
    q = m + np.asarray(t, dtype=float)
    return (1.0 - b) * np.log1p(-d / q) + np.log(hyp2f1(1.0, a + 1.0 - b, a + 1.0, d / q)) \
        - a * np.log(q)


def fit_paretonbd_report(
    x: Any, t_x: Any, T: Any, weights: Any = None, *, penalizer_coef: float = 0.0,
    sample_size: int | None = None, seed: int = 0, initial: ParetoNbdParams | None = None,
    budget_s: float | None = None,
) -> FitReport[ParetoNbdParams]:
    """Fit Pareto/NBD to customer summaries (days); raises
    :class:`~models.bgnbd.FitError` on degenerate data. The arguments are
    :func:`models.bgnbd.fit_bgnbd_report`'s, plus ``initial``: parameters to start from
    (an earlier fit), else all 1 in rescaled time; ``budget_s``: seconds of the calling
    thread's CPU time after which the fit is given up (not converged): other work on the
    machine does not count."""
    x, t_x, T, w, n_customers = fit_inputs("Pareto/NBD", x, t_x, T, weights, sample_size, seed)
    scale = 1.0 / T.max()  # as lifetimes: the oldest customer has age 1
    t_x_s, T_s, W = t_x * scale, T * scale, float(w.sum())

    deadline = None if budget_s is None else time.thread_time() + budget_s

    def mean_ll(log_params: np.ndarray) -> float:
        if deadline is not None and time.thread_time() > deadline:
            raise _OutOfTime
        r, alpha, s, beta = np.exp(log_params)
        ll = log_likelihood(ParetoNbdParams(r, alpha, s, beta), x, t_x_s, T_s)
        return float(w @ ll) / W

    def objective(log_params: np.ndarray, pen: float) -> tuple[float, np.ndarray]:
        params = np.exp(log_params)
        ll = mean_ll(log_params)
        if not math.isfinite(ll):  # a 2F1 term overflowed: step back
            return UNUSABLE, np.zeros(4)
        grad = np.empty(4)
        for i in range(4):
            step = np.zeros(4)
            step[i] = _STEP
            grad[i] = (mean_ll(log_params + step) - mean_ll(log_params - step)) / (2 * _STEP)
        value = -ll + pen * float(params @ params)
        return value, -grad + 2.0 * pen * params * params

    x0 = np.zeros(4) if initial is None else np.clip(np.log(
        [initial.r, initial.alpha * scale, initial.s, initial.beta * scale]), -5.0, 5.0)
    with np.errstate(invalid="ignore", over="ignore"):
        try:
            log_params, converged, message = minimize_log_params(
                functools.partial(objective, pen=penalizer_coef), x0, maxiter=MAX_ITERATIONS,
                maxfun=3 * MAX_ITERATIONS,
                upper=(LOG_BOUND, LOG_BOUND, math.log(MAX_S), LOG_BOUND))
        except _OutOfTime:
            log_params, converged, message = x0, False, f"gave up after {budget_s:g} s of CPU"
        # The budget bounds the search, not the one evaluation that reports its result: a
        # search that converged as the budget ran out raised here once and stopped the flow.
        deadline = None
        r, alpha_s, s, beta_s = np.exp(log_params)
        params = ParetoNbdParams(float(r), float(alpha_s / scale), float(s),
                                 float(beta_s / scale))
        ll = mean_ll(log_params) * W + float(w @ x) * math.log(scale)  # in days
    converged = converged and math.isfinite(ll)
    return FitReport(params, float(ll), n_customers, int(x.size), penalizer_coef, converged,
                     message)
