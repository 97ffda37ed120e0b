"""Gamma-Gamma spend model (Fader, Hardie & Lee 2005; Hardie's note 025).

A customer's transaction values are Gamma(p, nu) around their own mean spend, and nu is
Gamma(q, v) across customers. Given ``frequency`` (repeat purchases, ``x`` of BG/NBD) and
``monetary_mean`` (their mean transaction value), the expected value of their next
transactions shrinks their own mean towards the population mean ``p v / (q - 1)``, the
less so the more they bought. It assumes spend does not depend on purchase frequency.

:func:`fit_gamma_gamma` uses the objective of ``lifetimes.GammaGammaFitter`` (mean
log-likelihood of the customers with ``frequency > 0`` and ``monetary_mean > 0``), but with
money rescaled to a median of 1 (so the penalty, when ``penalizer_coef > 0``, does not
depend on the currency unit, unlike lifetimes'), an analytic gradient, and ``q > 1``
enforced, so that the population mean is finite and positive.

>>> params = GammaGammaParams(p=6.25, q=3.74, v=15.44)  # CDNOW
>>> round(expected_spend(params, frequency=2, monetary_mean=20.0), 2)
22.74
>>> round(expected_spend(params, frequency=0, monetary_mean=0.0), 2)  # population mean
35.22
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import digamma, gammaln

from models.bgnbd import (
    FALLBACK_PENALIZERS,
    FitError,
    FitReport,
    PositiveParams,
    all_scalars,
    as_float_arrays,
    check_positive_params,
    minimize_log_params,
    subsample,
)

Q_MIN = 1.01  # q <= 1 has no finite population mean spend


@dataclass(frozen=True, slots=True)
class GammaGammaParams(PositiveParams):
    """Population parameters of the Gamma-Gamma model, ``v`` in money units."""

    p: float
    q: float
    v: float

    def __post_init__(self) -> None:
        check_positive_params(self)
        if self.q <= 1.0:
            raise ValueError(f"GammaGammaParams.q must be > 1 for a finite mean, got {self.q}")

    @property
    def population_mean(self) -> float:
        return self.p * self.v / (self.q - 1.0)


def fit_gamma_gamma(frequency: Any, monetary_mean: Any, weights: Any = None,
                    **kwargs: Any) -> GammaGammaParams:
    """Maximum-likelihood Gamma-Gamma parameters (see :func:`fit_gamma_gamma_report`)."""
    return fit_gamma_gamma_report(frequency, monetary_mean, weights, **kwargs).params


def fit_gamma_gamma_report(
    frequency: Any, monetary_mean: Any, weights: Any = None, *, penalizer_coef: float = 0.0,
    sample_size: int | None = None, seed: int = 0,
) -> FitReport[GammaGammaParams]:
    """Fit on the rows with ``frequency > 0`` and ``monetary_mean > 0`` (the others are
    ignored); raises :class:`FitError` when none remain or all spend the same."""
    x, m = as_float_arrays(frequency, monetary_mean)
    w = np.ones_like(x) if weights is None else as_float_arrays(weights, x)[0]
    keep = (x > 0) & (m > 0) & (w > 0)
    x, m, w = x[keep], m[keep], w[keep]
    n_customers = int(x.size)
    if n_customers == 0:
        raise FitError("Gamma-Gamma: no customer with a repeat purchase and positive mean spend")
    idx = subsample(x.size, sample_size, seed)
    if idx is not None:
        x, m, w = x[idx], m[idx], w[idx]
    if np.ptp(m) <= 1e-12 * m.max():
        raise FitError(f"Gamma-Gamma: all {n_customers} repeat buyers have the same mean spend "
                       f"({m[0]:g}): the spread across customers cannot be identified")
    scale = float(np.median(m))
    data = _GammaGammaData(x, m / scale, w)
    x0 = np.array([0.1, math.log(2.0), 0.1])  # log(q - Q_MIN), so q > Q_MIN throughout
    penalties = [penalizer_coef] + [p for p in FALLBACK_PENALIZERS if p > penalizer_coef]
    for pen in penalties:
        log_params, converged, message = minimize_log_params(
            functools.partial(data.objective, pen=pen), x0)
        if converged or "upper bound" not in message:
            break
    p, q, v = _natural(log_params)
    params = GammaGammaParams(float(p), float(q), float(v * scale))
    ll = -data.W * (data.objective(log_params, 0.0)[0] + math.log(scale))  # in money units
    if pen != penalizer_coef:
        message = f"refitted with penalizer_coef={pen} after a bound was hit; {message}"
    return FitReport(params, float(ll), n_customers, int(x.size), pen, converged, message)


def _natural(log_params: np.ndarray) -> np.ndarray:
    p, q_excess, v = np.exp(log_params)
    return np.array([p, Q_MIN + q_excess, v])


class _GammaGammaData:
    def __init__(self, x: np.ndarray, m: np.ndarray, w: np.ndarray) -> None:
        self.x, self.m, self.w, self.W = x, m, w, float(w.sum())
        self.log_m, self.log_x = np.log(m), np.log(x)
        self.xm = x * m
        self.ux, inv = np.unique(x, return_inverse=True)  # gamma terms once per distinct x
        self.wx = np.bincount(inv, weights=w, minlength=self.ux.size)
        self.wx_ux = self.wx * self.ux
        self.const_p = float(w @ (x * (self.log_m + self.log_x)))
        self.sum_log_m = float(w @ self.log_m)

    def objective(self, log_params: np.ndarray, pen: float) -> tuple[float, np.ndarray]:
        """Penalised negative mean log-likelihood and its gradient in the log-parameters."""
        p, q, v = params = _natural(log_params)
        x, w, wx, W = self.x, self.w, self.wx, self.W
        pu = p * self.ux
        log_xmv = np.log(self.xm + v)
        wpq = w * (p * x + q)
        ll = (float(wx @ (gammaln(pu + q) - gammaln(pu))) - W * (gammaln(q) - q * math.log(v))
              + p * self.const_p - self.sum_log_m - float(wpq @ log_xmv))
        dg = digamma(pu + q)
        d_p = (float(self.wx_ux @ (dg - digamma(pu))) + self.const_p
               - float((w * x) @ log_xmv))
        d_q = float(wx @ dg) - W * (digamma(q) - math.log(v)) - float(w @ log_xmv)
        d_v = W * q / v - float(wpq @ (1.0 / (self.xm + v)))
        dlog = np.array([p, q - Q_MIN, v])  # d theta / d log-parameter
        grad = -np.array([d_p, d_q, d_v]) * dlog / self.W + 2.0 * pen * params * dlog
        return float(-ll / self.W + pen * float(params @ params)), grad


def expected_spend(params: GammaGammaParams, frequency: Any, monetary_mean: Any) -> Any:
    """Expected mean transaction value given ``frequency`` repeat purchases at a mean of
    ``monetary_mean`` (negative means, refunds exceeding spend, count as 0)."""
    p, q = params.p, params.q
    pop = params.population_mean
    if all_scalars(frequency, monetary_mean):
        weight = p * frequency / (p * frequency + q - 1.0)
        return (1.0 - weight) * pop + weight * max(monetary_mean, 0.0)
    x = np.asarray(frequency, dtype=float)
    weight = p * x / (p * x + q - 1.0)
    return (1.0 - weight) * pop + weight * np.maximum(np.asarray(monetary_mean, dtype=float), 0.0)
