"""Customer value from "buy till you die" models: BG/NBD purchases x Gamma-Gamma spend.

The flow refits a :class:`PopulationModel` from its customers' summaries now and then (in
the background: :func:`fit_population` is pure and the model is immutable, so swapping
the one reference the scorer reads is atomic) and scores each customer at the stream clock
with it. :func:`customer_summary` turns the exact per-customer state
(:class:`models.customer.CustomerState`) into the models' inputs, in days.

>>> import numpy as np
>>> rng = np.random.default_rng(7)  # 4000 customers drawn from BG/NBD(0.5, 20, 0.8, 2.5)
>>> n = 4000
>>> T = rng.uniform(60.0, 400.0, n)                     # days since the first purchase
>>> bought = rng.poisson(rng.gamma(0.5, 1 / 20, n) * T)  # purchases while alive
>>> x = np.minimum(bought, rng.geometric(rng.beta(0.8, 2.5, n)))  # repeat purchases
>>> t_x = np.where(x > 0, T * rng.beta(np.maximum(x, 1), bought - x + 1), 0.0)
>>> spend = rng.gamma(4.0, 10.0, n)                     # mean spend per purchase
>>> model = fit_population(x, t_x, T, spend, fitted_at_us=1_700_000_000_000_000)
>>> model.converged, model.n_customers
(True, 4000)
>>> round(model.bgnbd.a, 2), round(model.bgnbd.b, 2)  # drawn with 0.8, 2.5
(0.78, 2.38)
>>> round(model.p_alive(x=3, t_x=100.0, T=300.0), 3)   # scalars in, a float out
0.153
>>> model.expected_purchases(365.0, x=[0, 3], t_x=[0.0, 290.0], T=[300.0, 300.0]).round(3)
array([0.478, 2.593])
>>> round(model.clv_predicted(365.0, x=3, t_x=290.0, T=300.0, monetary_mean=50.0), 2)
124.47
>>> PopulationModel.from_dict(model.to_dict()) == model
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.bgnbd import (
    BgNbdParams,
    FitError,
    FitReport,
    expected_purchases,
    fit_bgnbd,
    fit_bgnbd_report,
    p_alive,
)
from models.gamma_gamma import (
    GammaGammaParams,
    expected_spend,
    fit_gamma_gamma,
    fit_gamma_gamma_report,
)
from models.paretonbd import ParetoNbdParams, fit_paretonbd_report, purchases_if_alive
from models.paretonbd import p_alive as pareto_p_alive
from models.transaction import DAY_US, MICROS

__all__ = [
    "BgNbdParams", "FitError", "FitReport", "GammaGammaParams", "ParetoNbdParams",
    "PopulationModel", "clv_predicted", "customer_summary", "expected_purchases",
    "expected_spend", "fit_bgnbd", "fit_bgnbd_report", "fit_gamma_gamma",
    "fit_gamma_gamma_report", "fit_population", "p_alive",
]

# CPU seconds a Pareto/NBD refit may take before it is given up: 0.4-1.8 s on its
# subsample once the data show dropout; before that (CDNOW's first months) its likelihood
# is flat along a ridge where every evaluation is slow, and an unbounded fit took minutes,
# holding up BG/NBD's refits behind it. CPU time, not wall clock: on a wall clock, a busy
# machine gave up more fits (7 of the last 11 in a CDNOW replay, each 0.2-0.9 s alone).
RIVAL_BUDGET_S = 3.0
# Customers a Pareto/NBD refit uses: its numerical gradient costs 9 likelihood evaluations
# a step, each two 2F1 series per customer. Its dropout parameters are weakly identified:
# on 5,000 generated customers, three subsamples of 2,048 gave s 0.59-0.94 and churn AUCs
# 0.9366-0.9379 (the full fit 0.9373), three of 4,096 s 0.74-0.75 and 0.9373-0.9374
# (~1 s of CPU each). Live, a refit comes once a week; in a replay the worker is busy
# throughout anyway, and the fit the replay ends with is swept in (flows/scoring.py).
RIVAL_SAMPLE = 4096
DISCOUNT_STEP_DAYS = 30  # cash flows are discounted at the end of each 30-day step


def customer_summary(
    purchase_count: int, first_purchase_us: int | None, last_purchase_us: int | None,
    as_of_us: int, net_micros: int,
) -> tuple[int, float, float, float] | None:
    """``(x, t_x, T, monetary_mean)`` in days and money units; None without a purchase.

    ``monetary_mean`` is the net spend per purchase over *all* purchases (the state does
    not keep the first one apart; lifetimes averages the repeat purchases only). ``T``
    is never below ``t_x``, even if the clock lags the customer's last purchase.

    >>> customer_summary(3, 0, 10 * DAY_US, 40 * DAY_US, 90 * MICROS)
    (2, 10.0, 40.0, 30.0)
    """
    if purchase_count < 1 or first_purchase_us is None or last_purchase_us is None:
        return None
    t_x = (last_purchase_us - first_purchase_us) / DAY_US
    T = max(as_of_us - first_purchase_us, last_purchase_us - first_purchase_us) / DAY_US
    return purchase_count - 1, t_x, T, net_micros / purchase_count / MICROS


def clv_predicted(
    bgnbd: BgNbdParams, gg: GammaGammaParams, horizon_days: float, x: Any, t_x: Any, T: Any,
    monetary_mean: Any, discount_rate_per_day: float = 0.0,
) -> Any:
    """Expected spend over the next ``horizon_days``: expected purchases x expected spend.

    Undiscounted (the default) this is exactly ``E[purchases in horizon] * E[spend]``. With
    ``discount_rate_per_day > 0`` the expected purchases of each 30-day step are discounted
    at the step's end, ``(1 + d) ** days``. lifetimes' ``customer_lifetime_value`` sums
    monthly steps with a monthly rate ``m``: with ``d = (1 + m) ** (1 / 30) - 1`` and a
    horizon of whole 30-day months both give the same number.
    """
    return _discounted_purchases(bgnbd, horizon_days, x, t_x, T, discount_rate_per_day) * \
        expected_spend(gg, x, monetary_mean)


def _discounted_purchases(
    bgnbd: BgNbdParams, horizon_days: float, x: Any, t_x: Any, T: Any, rate_per_day: float
) -> Any:
    if not horizon_days >= 0 or not rate_per_day >= 0:
        raise ValueError(f"need horizon_days >= 0 and discount_rate_per_day >= 0, got "
                         f"{horizon_days!r}, {rate_per_day!r}")
    if rate_per_day == 0:
        return expected_purchases(bgnbd, horizon_days, x, t_x, T)
    total: Any = 0.0
    before: Any = 0.0
    steps = math.ceil(horizon_days / DISCOUNT_STEP_DAYS)
    for end in (min(i * DISCOUNT_STEP_DAYS, horizon_days) for i in range(1, steps + 1)):
        cumulative = expected_purchases(bgnbd, float(end), x, t_x, T)
        total = total + (cumulative - before) / (1.0 + rate_per_day) ** end
        before = cumulative
    return total


@dataclass(frozen=True, slots=True)
class PopulationModel:
    """Both fits and where they came from: immutable, picklable, JSON-able via ``to_dict``.

    ``gamma_gamma`` is None when the spend model could not be fitted (e.g. every repeat
    buyer spends the same): expected spend then falls back to the customer's own mean.
    ``log_likelihood`` is the BG/NBD total over the customers used, in days.
    ``paretonbd`` (None when its fit failed, and in models saved before it existed) is
    fitted to the same customers, for the churn arena's Pareto/NBD contender and for the
    customer values (``p_alive``, expected purchases, CLV) once the arena has found it
    better than BG/NBD, the reference (models/population.py, ``value_model``).
    """

    bgnbd: BgNbdParams
    gamma_gamma: GammaGammaParams | None
    fitted_at_us: int  # the stream clock the summaries describe
    n_customers: int
    n_used: int
    converged: bool
    log_likelihood: float
    message: str = ""
    paretonbd: ParetoNbdParams | None = None

    @property
    def version(self) -> str:
        return f"btyd@{self.fitted_at_us}"

    def p_alive(self, x: Any, t_x: Any, T: Any) -> Any:
        return p_alive(self.bgnbd, x, t_x, T)

    def expected_purchases(self, t: float, x: Any, t_x: Any, T: Any) -> Any:
        return expected_purchases(self.bgnbd, t, x, t_x, T)

    def alive_and_expected(self, t: float, x: Any, t_x: Any, T: Any,
                           family: str = "bgnbd") -> tuple[Any, Any]:
        """``(P(alive at T), expected purchases in the next t days)`` under BG/NBD, or
        under Pareto/NBD (``family="paretonbd"``) when this fit has it: there the second
        is the first times the purchases of a customer alive, so P(alive), two 2F1
        series, is computed once."""
        if family == "paretonbd" and self.paretonbd is not None:
            alive = pareto_p_alive(self.paretonbd, x, t_x, T)
            return alive, alive * purchases_if_alive(self.paretonbd, t, x, T)
        return self.p_alive(x, t_x, T), self.expected_purchases(t, x, t_x, T)

    def expected_spend(self, frequency: Any, monetary_mean: Any) -> Any:
        if self.gamma_gamma is not None:
            return expected_spend(self.gamma_gamma, frequency, monetary_mean)
        if isinstance(monetary_mean, int | float):
            return max(float(monetary_mean), 0.0)
        return np.maximum(np.asarray(monetary_mean, dtype=float), 0.0)

    def clv_predicted(self, horizon_days: float, x: Any, t_x: Any, T: Any, monetary_mean: Any,
                      discount_rate_per_day: float = 0.0) -> Any:
        purchases = _discounted_purchases(self.bgnbd, horizon_days, x, t_x, T,
                                          discount_rate_per_day)
        return purchases * self.expected_spend(x, monetary_mean)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bgnbd": self.bgnbd.to_dict(),
            "gamma_gamma": None if self.gamma_gamma is None else self.gamma_gamma.to_dict(),
            "fitted_at_us": self.fitted_at_us, "n_customers": self.n_customers,
            "n_used": self.n_used, "converged": self.converged,
            "log_likelihood": self.log_likelihood, "message": self.message,
            "paretonbd": None if self.paretonbd is None else self.paretonbd.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PopulationModel:
        gg, pnbd = data.get("gamma_gamma"), data.get("paretonbd")
        return cls(
            bgnbd=BgNbdParams.from_dict(data["bgnbd"]),
            gamma_gamma=None if gg is None else GammaGammaParams.from_dict(gg),
            fitted_at_us=int(data["fitted_at_us"]), n_customers=int(data["n_customers"]),
            n_used=int(data["n_used"]), converged=bool(data["converged"]),
            log_likelihood=float(data["log_likelihood"]), message=str(data.get("message", "")),
            paretonbd=None if pnbd is None else ParetoNbdParams.from_dict(pnbd),
        )


def fit_population(
    x: Any, t_x: Any, T: Any, monetary_mean: Any, *, fitted_at_us: int, weights: Any = None,
    penalizer_coef: float = 0.0, sample_size: int | None = None, seed: int = 0,
    previous: PopulationModel | None = None,
) -> PopulationModel:
    """Fit BG/NBD, Pareto/NBD and Gamma-Gamma to the same customers' summaries (days,
    money units); Pareto/NBD starts from the ``previous`` model's parameters.

    Raises :class:`FitError` when BG/NBD cannot be fitted (no repeat buyer yet, every age
    0): the caller keeps serving its previous model, or none. When a Pareto/NBD fit fails
    or does not converge, the ``previous`` parameters are kept (None without them), and
    the message says so: values served from Pareto/NBD do not flip to BG/NBD's and back.
    """
    purchases = fit_bgnbd_report(x, t_x, T, weights, penalizer_coef=penalizer_coef,
                                 sample_size=sample_size, seed=seed)
    kept = None if previous is None else previous.paretonbd
    rival, rival_message = _fit_rival(x, t_x, T, weights, penalizer_coef, sample_size, seed,
                                      initial=kept)
    if rival is None and kept is not None:
        rival, rival_message = kept, f"{rival_message}; previous parameters kept"
    messages = [f"bgnbd: {purchases.message}", rival_message]
    spend: FitReport[GammaGammaParams] | None
    try:
        spend = fit_gamma_gamma_report(x, monetary_mean, weights, penalizer_coef=penalizer_coef,
                                       sample_size=sample_size, seed=seed)
        messages.append(f"gamma_gamma: {spend.message}")
    except FitError as exc:  # served with each customer's own mean spend instead
        spend = None
        messages.append(f"gamma_gamma: not fitted, own mean spend used: {exc}")
    return PopulationModel(
        bgnbd=purchases.params,
        gamma_gamma=None if spend is None else spend.params,
        fitted_at_us=fitted_at_us,
        n_customers=purchases.n_customers,
        n_used=purchases.n_used,
        converged=purchases.converged and (spend is None or spend.converged),
        log_likelihood=purchases.log_likelihood,
        message="; ".join(messages),
        paretonbd=rival,
    )


def _fit_rival(x: Any, t_x: Any, T: Any, weights: Any, penalizer_coef: float,
               sample_size: int | None, seed: int, initial: ParetoNbdParams | None
               ) -> tuple[ParetoNbdParams | None, str]:
    """Pareto/NBD's parameters (None when the fit failed or did not converge) and a message."""
    try:
        fit = fit_paretonbd_report(
            x, t_x, T, weights, penalizer_coef=penalizer_coef, seed=seed,
            sample_size=min(sample_size or RIVAL_SAMPLE, RIVAL_SAMPLE), initial=initial,
            budget_s=RIVAL_BUDGET_S)
    except (FitError, ValueError, FloatingPointError) as exc:
        return None, f"paretonbd: not fitted: {exc}"
    if not fit.converged:
        return None, f"paretonbd: left out, not converged: {fit.message}"
    return fit.params, f"paretonbd: {fit.message}"
