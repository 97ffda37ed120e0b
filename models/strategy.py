"""The CRM strategy for a customer's type (the table in shared/crm-brief.md), with a reason.

A customer is several types at once (a premium customer can be at risk), so the rules
are tried in order and the first match wins; urgency (about to lose the customer) comes
before value, value before the stage of the relationship:

==  ===========================================  =======================  ==================
#   customer type                                strategy                 brief's row
==  ===========================================  =======================  ==================
1   stage prospect                               ``acquisition``          prospect
2   stage churned                                ``win_back``             churned
3   stage at_risk (any tier; the reason says it) ``churn_prevention``     at-risk
4   tier premium                                 ``keep_premium``         premium
5   tier low, unprofitable (refunds, net <= 0)   ``make_profitable``      low-value
6   stage reactivated                            ``relationship``         churned, came back
7   stage new                                    ``relationship``         new
8   tier low (bottom share)                      ``serve_at_lower_cost``  low-value
9   normal, segment champions or loyal           ``upgrade``              normal-value
10  normal, segment cooling (need_attention,     ``relationship``         regular
    about_to_sleep, at_risk, cant_lose_them,
    hibernating, lost)
11  normal, any other segment                    ``cross_sell``           normal-value
==  ===========================================  =======================  ==================

Every strategy comes with a one-line ``reason`` (under 200 characters) that a
contact-center agent can read aloud, with the customer's own numbers when given.

>>> strategy("at_risk", "premium", "loyal", 0.64, recency_days=45.2, usual_gap_days=12.4)
... # doctest: +NORMALIZE_WHITESPACE
Strategy(name='churn_prevention', reason='Premium customer (top 20% by value) whose purchase
rhythm has slowed: 45 days since last purchase vs. a usual 12. Offer a loyalty reward.')
>>> strategy("active", "normal", "loyal", 0.1).name
'upgrade'
>>> strategy("prospect", "normal", None, None).reason
'Not a customer yet: offer a first-purchase coupon, a sample or a referral reward.'
"""

from __future__ import annotations

from typing import NamedTuple

from models.lifecycle import ACTIVE, AT_RISK, CHURNED, NEW, PROSPECT, REACTIVATED, STAGES
from models.rfm import SEGMENT_LABELS
from models.value import LOW, PREMIUM, TIERS

STRATEGIES = (
    "acquisition", "win_back", "churn_prevention", "keep_premium", "make_profitable",
    "relationship", "serve_at_lower_cost", "upgrade", "cross_sell",
)
COOLING_SEGMENTS = frozenset(
    {"need_attention", "about_to_sleep", "at_risk", "cant_lose_them", "hibernating", "lost"}
)
UPGRADE_SEGMENTS = frozenset({"champions", "loyal"})


class Strategy(NamedTuple):
    name: str
    reason: str


def _days(x: float) -> str:
    n = round(x)
    return "1 day" if n == 1 else f"{n} days"


def _rhythm(recency_days: float | None, usual_gap_days: float | None) -> str:
    """'45 days since last purchase vs. a usual 12', or less when numbers are missing."""
    if recency_days is None:
        return "no recent purchase"
    text = f"{_days(recency_days)} since last purchase"
    if usual_gap_days is not None:
        text += f" vs. a usual {round(usual_gap_days)}"
    return text


def strategy(lifecycle_stage: str, value_tier: str, rfm_segment: str | None,
             churn_risk: float | None, *, recency_days: float | None = None,
             usual_gap_days: float | None = None, low_cause: str | None = None,
             premium_share: float = 0.2, churn_horizon_days: int = 90) -> Strategy:
    """The strategy for one customer (rules table in the module docstring).

    ``low_cause`` is :func:`models.value.low_value_cause` (``"unprofitable"`` or
    ``"bottom_share"``); ``usual_gap_days`` is :func:`models.lifecycle.expected_gap_days`.
    """
    if lifecycle_stage not in STAGES or value_tier not in TIERS:
        raise ValueError(f"unknown lifecycle stage {lifecycle_stage!r} or value tier "
                         f"{value_tier!r}; expected one of {STAGES} and {TIERS}")
    if lifecycle_stage == PROSPECT:
        return Strategy("acquisition", "Not a customer yet: offer a first-purchase coupon, "
                                       "a sample or a referral reward.")
    rhythm = _rhythm(recency_days, usual_gap_days)
    top = f"Premium customer (top {round(premium_share * 100)}% by value)"
    if lifecycle_stage == CHURNED:
        who = {PREMIUM: "Former premium customer", LOW: "Former low-value customer"}.get(
            value_tier, "Former customer")
        offer = ("a low-cost win-back e-mail" if value_tier == LOW
                 else "a personal win-back offer")
        return Strategy("win_back", f"{who} who stopped buying: {rhythm}. Send {offer}.")
    if lifecycle_stage == AT_RISK:
        if value_tier == PREMIUM:
            reason = (f"{top} whose purchase rhythm has slowed: {rhythm}. "
                      "Offer a loyalty reward.")
        elif value_tier == LOW:
            reason = (f"Low-value customer drifting away: {rhythm}. "
                      "A low-cost reminder (e-mail) is enough.")
        else:
            why = rhythm if churn_risk is None else (
                f"{rhythm}; {round(churn_risk * 100)}% risk of no purchase in "
                f"{churn_horizon_days} days")
            reason = f"Customer likely to leave: {why}. Reach out with a personal offer."
        return Strategy("churn_prevention", reason)
    if value_tier == PREMIUM:
        return Strategy("keep_premium", f"{top}; {rhythm}. "
                                        "Thank them and offer premium rewards or early access.")
    if value_tier == LOW and low_cause == "unprofitable":
        return Strategy("make_profitable", "Refunds eat most of this customer's spend: help "
                                           "them choose well to cut returns; no costly offers.")
    if lifecycle_stage == REACTIVATED:
        return Strategy("relationship", f"Came back after leaving: {rhythm}. Welcome them "
                                        "back and build the habit with a follow-up offer.")
    if lifecycle_stage == NEW:
        return Strategy("relationship", f"New customer ({rhythm}). Welcome them, ask how "
                                        "the first purchase went, suggest a second one.")
    if value_tier == LOW:
        return Strategy("serve_at_lower_cost", "Low-value customer: serve them through "
                                               "self-service and e-mail rather than costly "
                                               "channels.")
    assert lifecycle_stage == ACTIVE
    label = SEGMENT_LABELS.get(rfm_segment or "", "regular customer")
    if rfm_segment in UPGRADE_SEGMENTS:
        return Strategy("upgrade", f"Frequent buyer ({label}) with normal value: up-sell "
                                   "to higher-value products to grow them to premium.")
    if rfm_segment in COOLING_SEGMENTS:
        return Strategy("relationship", f"Regular customer cooling off ({label}; {rhythm}). "
                                        "Strengthen the relationship with a personal touch.")
    who = "Regular customer" if rfm_segment is None else f"Regular customer ({label})"
    return Strategy("cross_sell", f"{who} with normal value: cross-sell related products "
                                  "to grow them to premium.")
