"""Value tier: premium, normal or low, from expected total value and what refunds leave.

*Expected total value* is ``clv_historic + clv_predicted`` (LTV = LTV(present) +
LTV(future) in the brief). ``premium_boundary`` is the population's ``1 -
premium_share`` quantile of it (:meth:`models.quantiles.PopulationQuantiles.premium_boundary`,
top 20 % by default) and ``low_boundary`` optionally its ``low_share`` quantile. First
match wins:

=======  ==========================================================================
tier     when
=======  ==========================================================================
low      *unprofitable*: net spend <= ``min_net_spend`` [0] with some gross spend, or
         refunds above ``max_refund_share`` [50 %] of gross spend (they cost handling
         and returns, whatever their total); or expected total value at or below
         ``low_boundary`` (the bottom share), when one is given
premium  expected total value above ``premium_boundary`` (strictly: equal values tie, so
         the tier is never more than the share; with no boundary yet, nobody is premium)
normal   everyone else (including customers without a purchase)
=======  ==========================================================================

>>> value_tier(900.0, premium_boundary=600.0, net_spend=400.0, gross_spend=420.0)
'premium'
>>> value_tier(900.0, premium_boundary=600.0, net_spend=400.0, gross_spend=1000.0)
'low'
>>> value_tier(50.0, premium_boundary=600.0, net_spend=40.0, gross_spend=40.0)
'normal'
>>> low_value_cause(40.0, 40.0, expected_total_value=50.0, low_boundary=60.0)
'bottom_share'
"""

from __future__ import annotations

from dataclasses import dataclass

PREMIUM = "premium"
NORMAL = "normal"
LOW = "low"
TIERS = (PREMIUM, NORMAL, LOW)


@dataclass(frozen=True, slots=True)
class ValueRules:
    """Thresholds of the value tiers (see the module docstring)."""

    premium_share: float = 0.2  # share of the population that is premium
    low_share: float = 0.2  # bottom share that is low, when the flow passes ``low_boundary``
    max_refund_share: float = 0.5
    min_net_spend: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.premium_share < 1.0 or not 0.0 <= self.low_share < 1.0:
            raise ValueError(f"shares must be in (0, 1), got {self}")
        if self.premium_share + self.low_share > 1.0:
            raise ValueError(f"premium_share + low_share must be at most 1, got {self}")
        if not 0.0 <= self.max_refund_share <= 1.0:
            raise ValueError(f"max_refund_share must be in [0, 1], got {self}")


DEFAULT_VALUE_RULES = ValueRules()


def low_value_cause(net_spend: float, gross_spend: float, expected_total_value: float | None,
                    low_boundary: float | None = None,
                    rules: ValueRules = DEFAULT_VALUE_RULES) -> str | None:
    """Why a customer is low value: ``"unprofitable"``, ``"bottom_share"``, or None."""
    if gross_spend > 0 and (net_spend <= rules.min_net_spend
                            or gross_spend - net_spend > rules.max_refund_share * gross_spend):
        return "unprofitable"
    if (low_boundary is not None and expected_total_value is not None
            and expected_total_value <= low_boundary):
        return "bottom_share"
    return None


def value_tier(expected_total_value: float | None, premium_boundary: float | None,
               net_spend: float, gross_spend: float,
               rules: ValueRules = DEFAULT_VALUE_RULES,
               low_boundary: float | None = None) -> str:
    """The customer's value tier: ``"premium"``, ``"normal"`` or ``"low"``."""
    if low_value_cause(net_spend, gross_spend, expected_total_value, low_boundary,
                       rules) is not None:
        return LOW
    if (premium_boundary is not None and expected_total_value is not None
            and expected_total_value > premium_boundary):
        return PREMIUM
    return NORMAL
