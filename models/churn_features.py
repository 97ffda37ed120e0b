"""Churn features: what one customer's facts say at one instant, and nothing after it.

:func:`churn_features` reads a :class:`models.customer.CustomerState` *as of* an instant
``as_of_us`` (normally the purchase that opens a churn prediction). Events the state
holds that are newer than ``as_of_us`` (out-of-order arrivals within the lateness
window) are subtracted back out of the aggregates, so the features are the same whether
or not later events have already been applied: no future leaks into a training row.
That is exact for any instant the state could still accept an event at
(``as_of_us >= max_event_us - lateness``), because every event newer than such an
instant is still in ``state.recent``.

Features are plain floats (``FEATURE_NAMES``, always all of them, in that order);
missing quantities (gaps of a one-purchase customer) are 0 with ``has_repeat`` = 0.

>>> from models.customer import CustomerState
>>> from models.transaction import Transaction
>>> def buy(state, eid, day, amount, refund=False):
...     tx = Transaction(eid, "c", day * DAY_US, refund, amount * MICROS, "EUR", eid.encode())
...     return state.apply(tx, lateness_us=7 * DAY_US)
>>> s = CustomerState("c")
>>> _ = [buy(s, *e) for e in (("a", 0, 10), ("b", 10, 30), ("c", 30, 20))]
>>> f = churn_features(s, 30 * DAY_US)
>>> f["purchases"], f["gap_mean_days"], f["gap_last_days"], f["gap_last_rel"], f["spend_mean"]
(3.0, 15.0, 20.0, 1.3333333333333333, 20.0)
>>> _ = buy(s, "d", 33, 50)   # a later purchase (and a refund) arrive...
>>> _ = buy(s, "e", 31, 5, refund=True)
>>> churn_features(s, 30 * DAY_US) == f   # ...and the features at day 30 do not move
True
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Mapping, Sequence

from models.customer import CustomerState
from models.transaction import DAY_US, MICROS

GAP_CAP_DAYS = 365.0  # a gap older than the state keeps (a year) counts as a year

FEATURE_NAMES: tuple[str, ...] = (
    "purchases",  # purchases up to and including the instant
    "log_purchases",
    "has_repeat",  # 1 when there are at least two purchases (the gap features mean something)
    "tenure_days",  # days since the first purchase
    "recency_days",  # days since the newest purchase (0 at a purchase instant)
    "gap_mean_days",
    "gap_std_days",
    "gap_cv",  # std / mean of the gaps
    "gap_last_days",  # the newest gap: days between the two newest purchases
    "gap_last_rel",  # newest gap / own mean gap (1 when there is no gap yet)
    "recency_rel",  # recency / own mean gap (0 when there is no gap yet)
    "repeat_rate_per_year",  # (purchases - 1) / tenure, per year
    "spend_mean",  # gross spend per purchase
    "log_monetary",  # log1p(net spend)
    "refund_share",  # refunded / gross spend
    "purchases_30d",
    "purchases_90d",
    "purchases_365d",
    "log_spend_30d",
    "log_spend_90d",
    "log_spend_365d",
    # Stacking: logit of BG/NBD's P(no purchase in the horizon) with the population's
    # current parameters (0 before the first fit). Not computed here: it needs the
    # population model, so models.scoring sets it (ScoredCustomer._features).
    "bgnbd_logit",
)


def churn_features(state: CustomerState, as_of_us: int) -> dict[str, float]:
    """The customer's features at ``as_of_us``, from events at or before it only.

    Raises ``ValueError`` when the state has no purchase at or before ``as_of_us``, or
    when ``as_of_us`` is older than what the state still keeps (then it cannot be exact).
    """
    recent = state.recent
    if recent and as_of_us < recent[0][0]:
        raise ValueError(
            f"churn_features: as_of {as_of_us} is older than the oldest event customer "
            f"{state.customer_id!r} still keeps ({recent[0][0]}); features would not be exact"
        )
    split = bisect_left(recent, (as_of_us + 1, -1, False))
    later = recent[split:]  # events after the instant: taken back out of the aggregates
    later_buys = [t for t, _, is_refund in later if not is_refund]
    n = state.purchase_count - len(later_buys)
    if n < 1 or state.first_purchase_us is None or state.last_purchase_us is None:
        raise ValueError(
            f"churn_features: customer {state.customer_id!r} has no purchase at or before "
            f"{as_of_us}"
        )
    gross = state.gross_micros - sum(a for _, a, r in later if not r)
    refunds = state.refund_micros - sum(a for _, a, r in later if r)
    before = [t for t, _, is_refund in recent[:split] if not is_refund]  # newest last
    if later_buys and not before:
        raise ValueError(
            f"churn_features: customer {state.customer_id!r}'s newest purchase before "
            f"{as_of_us} is no longer kept; features would not be exact"
        )
    first = state.first_purchase_us
    last = before[-1] if later_buys else state.last_purchase_us
    gap_sq = state.gap_sq_sum
    chain = [last, *later_buys]
    for a, b in zip(chain, chain[1:], strict=False):
        gap_sq -= (b - a) ** 2
    return _features(
        n, first, last, gap_sq, gross, refunds, before, as_of_us, state.windows(as_of_us)
    )


def _features(
    n: int, first: int, last: int, gap_sq: int, gross: int, refunds: int,
    before: Sequence[int], as_of_us: int, windows: Mapping[str, Mapping[str, float]],
) -> dict[str, float]:
    tenure = (as_of_us - first) / DAY_US
    recency = (as_of_us - last) / DAY_US
    repeat = n >= 2
    if repeat:
        k = n - 1
        gap_mean = (last - first) / k / DAY_US
        scaled = gap_sq * k - (last - first) ** 2  # k^2 variance, exact in integer us^2
        gap_std = math.sqrt(max(scaled, 0)) / k / DAY_US
        gap_last = (before[-1] - before[-2]) / DAY_US if len(before) >= 2 else GAP_CAP_DAYS
        if n == 2:
            gap_last = gap_mean
        gap_last = min(gap_last, GAP_CAP_DAYS)
    else:
        gap_mean = gap_std = gap_last = 0.0
    spans = {days: windows[f"{days}d"] for days in (30, 90, 365)}
    return {
        "purchases": float(n),
        "log_purchases": math.log1p(n),
        "has_repeat": 1.0 if repeat else 0.0,
        "tenure_days": tenure,
        "recency_days": recency,
        "gap_mean_days": gap_mean,
        "gap_std_days": gap_std,
        "gap_cv": gap_std / gap_mean if gap_mean > 0 else 0.0,
        "gap_last_days": gap_last,
        "gap_last_rel": gap_last / gap_mean if gap_mean > 0 else 1.0,
        "recency_rel": recency / gap_mean if gap_mean > 0 else 0.0,
        "repeat_rate_per_year": (n - 1) / tenure * 365.0 if tenure > 0 else 0.0,
        "spend_mean": gross / n / MICROS,
        "log_monetary": math.log1p(max(gross - refunds, 0) / MICROS),
        "refund_share": refunds / gross if gross > 0 else 0.0,
        "purchases_30d": float(spans[30]["purchases"]),
        "purchases_90d": float(spans[90]["purchases"]),
        "purchases_365d": float(spans[365]["purchases"]),
        "log_spend_30d": math.log1p(spans[30]["spend"]),
        "log_spend_90d": math.log1p(spans[90]["spend"]),
        "log_spend_365d": math.log1p(spans[365]["spend"]),
        "bgnbd_logit": 0.0,
    }


def pack(features: Mapping[str, float]) -> tuple[float, ...]:
    """The features as a tuple in ``FEATURE_NAMES`` order: a third of a dict's pickle."""
    return tuple(features[name] for name in FEATURE_NAMES)


def unpack(values: Sequence[float]) -> dict[str, float]:
    """Inverse of :func:`pack`."""
    return dict(zip(FEATURE_NAMES, values, strict=True))
