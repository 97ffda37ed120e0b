"""BG/NBD (Fader, Hardie & Lee 2005): how many more purchases, and is the customer alive.

Each customer is summarised by ``x`` (repeat purchases: purchase count - 1), ``t_x`` (days
from the first to the last purchase) and ``T`` (days from the first purchase to the clock).
While alive, a customer buys at a Poisson rate drawn from Gamma(r, alpha); after each
repeat purchase they drop out for good with a probability drawn from Beta(a, b).

:func:`fit_bgnbd` finds ``r, alpha, a, b`` by maximum likelihood with the same objective as
``lifetimes.BetaGeoFitter`` (mean log-likelihood over customers in time rescaled so the
oldest customer has age 1, plus ``penalizer_coef`` times the sum of the squared rescaled
parameters), but with an analytic gradient, log-parameters bounded to ``[-10, 10]`` (so
``a`` or ``b`` can never run off to infinity) and the gamma terms evaluated once per
distinct ``x``. A fit that ends on an upper bound is refitted with growing penalties;
the report says so. A parameter on its lower bound (e.g. ``a`` -> 0 with ``b`` small:
customers either leave at once or never, so no dropout evidence) is kept, finite, and
reported as not converged. :func:`p_alive` and :func:`expected_purchases` take scalars (a fast
``math`` path, for per-event scoring) or arrays.

>>> params = BgNbdParams(r=0.243, alpha=30.9, a=0.793, b=2.426)  # CDNOW (weeks -> days)
>>> round(p_alive(params, x=2, t_x=213.0, T=272.0), 4)
0.7266
>>> round(expected_purchases(params, 365.0, x=2, t_x=213.0, T=272.0), 4)
1.5623
>>> float(p_alive(params, x=0, t_x=0.0, T=272.0))  # no repeat purchase: no dropout yet
1.0
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Generic, Self, TypeVar

import numpy as np
from scipy.optimize import minimize
from scipy.special import digamma, expit, gammaln, hyp2f1

LOG_BOUND = 10.0  # every fitted parameter lies in [exp(-10), exp(10)] (rescaled units)
FALLBACK_PENALIZERS = (0.001, 0.01, 0.1)
_NEAR = 1e-6  # E[purchases] has removable singularities at a = 1 and at a + b = 1 (x = 0)

P = TypeVar("P")


class FitError(ValueError):
    """The data cannot identify the model (no repeat buyers, no ages, ...)."""


@dataclass(frozen=True, slots=True)
class FitReport(Generic[P]):
    """Fitted parameters and how the fit went.

    ``log_likelihood`` is the total unpenalised log-likelihood of the customers used, in the
    caller's units; ``converged`` is False when the optimiser failed or a parameter ended on
    a bound even after the fallback penalties (the parameters are then finite but biased).
    """

    params: P
    log_likelihood: float
    n_customers: int  # customers given (after dropping unusable rows)
    n_used: int  # customers in the fit (a subsample when ``sample_size`` is set)
    penalizer_coef: float  # the penalty actually used (may be a fallback)
    converged: bool
    message: str


class PositiveParams:
    """Base of the models' parameter dataclasses (BG/NBD, Pareto/NBD, Gamma-Gamma): every
    field finite and > 0, and a JSON form, ``to_dict`` / ``from_dict``."""

    __slots__ = ()
    __dataclass_fields__: ClassVar[dict[str, Any]]  # what makes a subclass a dataclass

    def __post_init__(self) -> None:
        check_positive_params(self)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return cls(**{f.name: float(data[f.name]) for f in fields(cls)})


@dataclass(frozen=True, slots=True)
class BgNbdParams(PositiveParams):
    """Population parameters of the BG/NBD model, ``alpha`` in days."""

    r: float
    alpha: float
    a: float
    b: float


def check_positive_params(params: Any) -> None:
    for f in fields(params):
        value = getattr(params, f.name)
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ValueError(f"{type(params).__name__}.{f.name} must be finite and > 0, "
                             f"got {value!r}")


def minimize_log_params(
    objective: Callable[[np.ndarray], tuple[float, np.ndarray]], x0: np.ndarray,
    maxiter: int = 2000, maxfun: int = 15000, upper: Sequence[float] | None = None,
) -> tuple[np.ndarray, bool, str]:
    """Minimise over bounded log-parameters: ``(log_params, converged, message)``.

    Each log-parameter lies in ``[-LOG_BOUND, LOG_BOUND]``, or below its ``upper`` bound.
    """
    highs = np.full(len(x0), LOG_BOUND) if upper is None else np.asarray(upper, dtype=float)
    res = minimize(objective, np.minimum(x0, highs), jac=True, method="L-BFGS-B",
                   bounds=[(-LOG_BOUND, hi) for hi in highs],
                   options={"maxiter": maxiter, "maxfun": maxfun, "ftol": 1e-15,
                            "gtol": 1e-9})
    if not np.all(np.isfinite(res.x)) or not np.isfinite(res.fun):
        return res.x, False, f"optimiser ended on non-finite values: {res.message}"
    for side, hit in (("upper", res.x > highs - 1e-3), ("lower", res.x < 1e-3 - LOG_BOUND)):
        if hit.any():  # the likelihood keeps growing towards 0 or infinity
            return res.x, False, f"log-parameters {np.flatnonzero(hit).tolist()} on their " \
                f"{side} bound"
    # L-BFGS-B reports ABNORMAL when the objective is flat to machine precision: accept it
    # when the gradient is small.
    ok = bool(res.success) or float(np.max(np.abs(res.jac))) < 1e-5
    return res.x, ok, str(res.message)


def as_float_arrays(*columns: Any) -> list[np.ndarray]:
    arrays = [np.asarray(c, dtype=float).ravel() for c in columns]
    if len({a.size for a in arrays}) != 1:
        raise ValueError(f"inputs differ in length: {[a.size for a in arrays]}")
    for a in arrays:
        if not np.all(np.isfinite(a)):
            raise ValueError("inputs must be finite (got NaN or inf)")
    return arrays


def subsample(n: int, sample_size: int | None, seed: int) -> np.ndarray | None:
    """Deterministic indices of ``sample_size`` of ``n`` rows (None: use all)."""
    if sample_size is None or n <= sample_size:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=sample_size, replace=False))


def fit_bgnbd(x: Any, t_x: Any, T: Any, weights: Any = None, **kwargs: Any) -> BgNbdParams:
    """Maximum-likelihood BG/NBD parameters (see :func:`fit_bgnbd_report`)."""
    return fit_bgnbd_report(x, t_x, T, weights, **kwargs).params


def fit_bgnbd_report(
    x: Any, t_x: Any, T: Any, weights: Any = None, *, penalizer_coef: float = 0.0,
    sample_size: int | None = None, seed: int = 0,
) -> FitReport[BgNbdParams]:
    """Fit BG/NBD to customer summaries (days); raises :class:`FitError` on degenerate data.

    ``weights`` counts customers per row. ``sample_size`` fits a deterministic random
    subsample (``seed``) of that many rows. A fit ending on an upper bound is refitted
    with the penalties in ``FALLBACK_PENALIZERS`` larger than ``penalizer_coef``.
    """
    x, t_x, T, w, n_customers = fit_inputs("BG/NBD", x, t_x, T, weights, sample_size, seed)
    scale = 1.0 / T.max()  # as lifetimes: the oldest customer has age 1
    data = _LikelihoodData(x, t_x * scale, T * scale, w)
    x0 = np.full(4, 0.1)
    penalties = [penalizer_coef] + [p for p in FALLBACK_PENALIZERS if p > penalizer_coef]
    for pen in penalties:
        log_params, converged, message = minimize_log_params(
            functools.partial(data.objective, pen=pen), x0)
        if converged or "upper bound" not in message:  # a penalty pulls towards 0 only
            break
    r, alpha_s, a, b = np.exp(log_params)
    params = BgNbdParams(float(r), float(alpha_s / scale), float(a), float(b))
    ll = data.log_likelihood(log_params) + float(w @ x) * math.log(scale)  # in days
    if pen != penalizer_coef:
        message = f"refitted with penalizer_coef={pen} after a bound was hit; {message}"
    return FitReport(params, float(ll), n_customers, int(x.size), pen, converged, message)


def fit_inputs(model: str, x: Any, t_x: Any, T: Any, weights: Any, sample_size: int | None,
               seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """The summaries a purchase-and-dropout model (BG/NBD, Pareto/NBD) can be fitted to:
    ``(x, t_x, T, weights, customers given)``, subsampled as asked, else an error naming
    ``model``: :class:`FitError` for data that cannot identify it yet, ``ValueError`` for
    impossible summaries."""
    x, t_x, T = as_float_arrays(x, t_x, T)
    w = np.ones_like(x) if weights is None else as_float_arrays(weights, x)[0]
    if x.size == 0:
        raise FitError(f"{model}: no customers to fit")
    if np.any(x < 0) or np.any(x != np.round(x)):
        raise ValueError(f"{model}: x (repeat purchases) must be non-negative integers")
    if np.any(T < 0) or np.any(t_x < 0) or np.any(t_x > T) or np.any(w < 0):
        raise ValueError(f"{model}: need 0 <= t_x <= T and weights >= 0 for every customer")
    n_customers = int(x.size)
    idx = subsample(x.size, sample_size, seed)
    if idx is not None:
        x, t_x, T, w = x[idx], t_x[idx], T[idx], w[idx]
    if w.sum() <= 0 or T.max() <= 0:
        raise FitError(f"{model}: all {n_customers} customers have age 0: nothing to learn yet")
    if not np.any((x > 0) & (w > 0)):
        raise FitError(f"{model}: none of {n_customers} customers bought twice: the dropout "
                       "process cannot be identified")
    return x, t_x, T, w, n_customers


class _LikelihoodData:
    """BG/NBD log-likelihood and gradient, vectorised; gamma terms once per distinct x."""

    def __init__(self, x: np.ndarray, t_x: np.ndarray, T: np.ndarray, w: np.ndarray) -> None:
        self.ux, inv = np.unique(x, return_inverse=True)
        self.wx = np.bincount(inv, weights=w, minlength=self.ux.size)
        self.W = float(w.sum())
        rep = x > 0
        self.x, self.T, self.w = x, T, w
        self.rep_x, self.rep_tx = x[rep], t_x[rep]
        self.rep_idx = np.flatnonzero(rep)

    def _terms(self, log_params: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        r, alpha, a, b = np.exp(log_params)
        ux, wx = self.ux, self.wx
        g = (gammaln(r + ux) - gammaln(r) + gammaln(a + b) + gammaln(b + ux) - gammaln(b)
             - gammaln(a + b + ux))
        common = float(wx @ g) + self.W * r * math.log(alpha)
        a3 = -(r + self.x) * np.log(alpha + self.T)
        a4 = (math.log(a) - np.log(b + self.rep_x - 1.0)
              - (r + self.rep_x) * np.log(alpha + self.rep_tx))
        return common, a3, a4

    def log_likelihood(self, log_params: np.ndarray) -> float:
        common, a3, a4 = self._terms(log_params)
        lse = a3.copy()
        lse[self.rep_idx] = np.logaddexp(a3[self.rep_idx], a4)
        return common + float(self.w @ lse)

    def objective(self, log_params: np.ndarray, pen: float) -> tuple[float, np.ndarray]:
        """Penalised negative mean log-likelihood and its gradient in log-parameters."""
        params = np.exp(log_params)
        r, alpha, a, b = params
        common, a3, a4 = self._terms(log_params)
        rep = self.rep_idx
        w4 = np.zeros_like(a3)  # weight of the "dropped out after t_x" branch
        w4[rep] = expit(a4 - a3[rep])
        lse = a3.copy()
        lse[rep] = np.logaddexp(a3[rep], a4)
        ll = common + float(self.w @ lse)
        ux, wx, w, W = self.ux, self.wx, self.w, self.W
        w3 = w * (1.0 - w4)  # customer weight times branch weight
        w4w = (w * w4)[rep]
        d_r = (float(wx @ (digamma(r + ux) - digamma(r))) + W * math.log(alpha)
               - float(w3 @ np.log(alpha + self.T)) - float(w4w @ np.log(alpha + self.rep_tx)))
        d_alpha = (W * r / alpha - float(w3 @ ((r + self.x) / (alpha + self.T)))
                   - float(w4w @ ((r + self.rep_x) / (alpha + self.rep_tx))))
        dg_ab = float(wx @ (digamma(a + b) - digamma(a + b + ux)))
        d_a = dg_ab + float(w4w.sum()) / a
        d_b = (dg_ab + float(wx @ (digamma(b + ux) - digamma(b)))
               - float(w4w @ (1.0 / (b + self.rep_x - 1.0))))
        grad = np.array([d_r, d_alpha, d_a, d_b]) * params  # d/d log(theta)
        value = -ll / W + pen * float(params @ params)
        return value, -grad / W + 2.0 * pen * params * params


def p_alive(params: BgNbdParams, x: Any, t_x: Any, T: Any) -> Any:
    """P(customer still alive | x, t_x, T): a float for scalars, else an array."""
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    if all_scalars(x, t_x, T):
        if x == 0:
            return 1.0
        log_div = (r + x) * math.log((alpha + T) / (alpha + t_x)) + math.log(a / (b + x - 1))
        return 0.0 if log_div > 700.0 else 1.0 / (1.0 + math.exp(log_div))
    x, t_x, T = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (x, t_x, T)))
    log_div = (r + x) * np.log((alpha + T) / (alpha + t_x)) + np.log(a / (b + np.maximum(x, 1) - 1))
    return np.where(x == 0, 1.0, expit(-log_div))


def expected_purchases(params: BgNbdParams, t: Any, x: Any, t_x: Any, T: Any) -> Any:
    """Expected purchases in the next ``t`` days given (x, t_x, T) (FHL 2005, eq. 10).

    Uses Euler's transformation, ``((alpha+T)/(alpha+T+t))^(r+x) 2F1(r+x, b+x; c; z) =
    (1-z)^(a-1) 2F1(a+b-1-r, a-1; c; z)`` with ``c = a+b+x-1``, ``z = t/(alpha+T+t)``: the
    series never overflows, however large ``x``. At ``a`` within 1e-6 of 1 (a removable
    singularity; likewise a + b at 1 for x = 0) the value is the mean of the two sides.
    """
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    if abs(a - 1.0) < _NEAR or abs(a + b - 1.0) < _NEAR:  # a = 1; or c = 0 when x = 0
        lo, hi = (BgNbdParams(r, alpha, a + s * _NEAR, b) for s in (-2.0, 2.0))
        return 0.5 * (expected_purchases(lo, t, x, t_x, T) + expected_purchases(hi, t, x, t_x, T))
    if all_scalars(t, x, t_x, T):
        z = t / (alpha + T + t)
        c = a + b + x - 1.0
        h = 1.0 - (1.0 - z) ** (a - 1.0) * float(hyp2f1(a + b - 1.0 - r, a - 1.0, c, z))
        return c / (a - 1.0) * h * p_alive(params, x, t_x, T)
    t, x, t_x, T = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (t, x, t_x, T)))
    z = t / (alpha + T + t)
    c = a + b + x - 1.0
    h = 1.0 - (1.0 - z) ** (a - 1.0) * hyp2f1(a + b - 1.0 - r, a - 1.0, c, z)
    return c / (a - 1.0) * h * p_alive(params, x, t_x, T)


_SCALAR = frozenset((int, float))


def all_scalars(*values: Any) -> bool:
    for v in values:  # a loop, not all(genexpr): this runs per event
        if type(v) not in _SCALAR:
            return False
    return True
