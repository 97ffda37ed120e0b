"""Value tiers and strategies: every combination answers, with a reason an agent can read."""

from __future__ import annotations

import itertools

import pytest

from models.lifecycle import STAGES
from models.rfm import SEGMENTS
from models.strategy import STRATEGIES, Strategy, strategy
from models.value import LOW, NORMAL, PREMIUM, TIERS, ValueRules, low_value_cause, value_tier


@pytest.mark.parametrize(("stage", "tier", "segment", "low_cause"), list(itertools.product(
    STAGES, TIERS, (*SEGMENTS, None), ("unprofitable", "bottom_share", None))))
def test_every_combination_yields_a_strategy_and_a_short_reason(
        stage: str, tier: str, segment: str | None, low_cause: str | None) -> None:
    for recency, usual in ((None, None), (1234.5, 365.0), (1.0, None)):
        got = strategy(stage, tier, segment, 0.987, low_cause=low_cause, recency_days=recency,
                       usual_gap_days=usual)
        assert isinstance(got, Strategy) and got.name in STRATEGIES
        assert 0 < len(got.reason) < 200, got.reason
        assert got.reason[0].isupper() and got.reason.endswith("."), got.reason
        without_risk = strategy(stage, tier, segment, None, low_cause=low_cause,
                                recency_days=recency, usual_gap_days=usual)
        assert without_risk.name == got.name  # churn risk only colours the reason


@pytest.mark.parametrize(("stage", "tier", "segment", "low_cause", "expected"), [
    ("prospect", PREMIUM, None, None, "acquisition"),
    ("churned", PREMIUM, "cant_lose_them", None, "win_back"),
    ("churned", LOW, "lost", "unprofitable", "win_back"),
    ("at_risk", PREMIUM, "champions", None, "churn_prevention"),
    ("at_risk", LOW, "at_risk", "bottom_share", "churn_prevention"),
    ("active", PREMIUM, "hibernating", None, "keep_premium"),
    ("new", PREMIUM, "new", None, "keep_premium"),
    ("reactivated", LOW, "new", "unprofitable", "make_profitable"),
    ("reactivated", NORMAL, "promising", None, "relationship"),
    ("new", LOW, "new", "bottom_share", "relationship"),
    ("active", LOW, "loyal", "bottom_share", "serve_at_lower_cost"),
    ("active", LOW, "loyal", None, "serve_at_lower_cost"),
    ("active", NORMAL, "champions", None, "upgrade"),
    ("active", NORMAL, "loyal", None, "upgrade"),
    ("active", NORMAL, "about_to_sleep", None, "relationship"),
    ("active", NORMAL, "potential_loyalist", None, "cross_sell"),
    ("active", NORMAL, None, None, "cross_sell"),
])
def test_precedence(stage: str, tier: str, segment: str | None, low_cause: str | None,
                    expected: str) -> None:
    assert strategy(stage, tier, segment, 0.3, low_cause=low_cause).name == expected


def test_the_reason_uses_the_customers_numbers() -> None:
    got = strategy("at_risk", PREMIUM, "loyal", 0.6, recency_days=45.0, usual_gap_days=12.3)
    assert got.reason == ("Premium customer (top 20% by value) whose purchase rhythm has slowed:"
                          " 45 days since last purchase vs. a usual 12. Offer a loyalty reward.")
    got = strategy("at_risk", NORMAL, "at_risk", 0.72, recency_days=20.0, usual_gap_days=14.0)
    assert "20 days since last purchase vs. a usual 14" in got.reason
    assert "72% risk of no purchase in 90 days" in got.reason
    got = strategy("active", PREMIUM, "champions", 0.1, premium_share=0.1,
                   recency_days=1.0)
    assert got.reason.startswith("Premium customer (top 10% by value); 1 day since last ")


def test_unknown_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown lifecycle stage 'vip'"):
        strategy("vip", NORMAL, None, None)
    with pytest.raises(ValueError):
        strategy("active", "gold", None, None)


# ---- value tiers -----------------------------------------------------------------------

@pytest.mark.parametrize(("value", "boundary", "net", "gross", "low_boundary", "expected"), [
    (900.0, 600.0, 400.0, 420.0, None, PREMIUM),
    (600.0, 600.0, 400.0, 420.0, None, NORMAL),  # at the boundary: not above it
    (900.0, None, 400.0, 420.0, None, NORMAL),  # no population yet: nobody is premium
    (900.0, 600.0, 400.0, 1000.0, None, LOW),  # refunds are 60% of gross
    (900.0, 600.0, 500.0, 1000.0, None, PREMIUM),  # exactly half refunded: not above 50%
    (10.0, 600.0, 0.0, 50.0, None, LOW),  # all refunded
    (10.0, 600.0, -5.0, 50.0, None, LOW),  # refunded more than bought
    (0.0, 600.0, 0.0, 0.0, None, NORMAL),  # no purchase: nothing to judge
    (20.0, 600.0, 20.0, 20.0, 25.0, LOW),  # bottom share
    (25.0, 600.0, 25.0, 25.0, 25.0, LOW),  # at the bottom boundary
    (26.0, 600.0, 26.0, 26.0, 25.0, NORMAL),
    (None, 600.0, 26.0, 26.0, 25.0, NORMAL),  # value unknown
])
def test_value_tier(value: float | None, boundary: float | None, net: float, gross: float,
                    low_boundary: float | None, expected: str) -> None:
    assert value_tier(value, boundary, net, gross, low_boundary=low_boundary) == expected


def test_low_value_cause_and_rules() -> None:
    assert low_value_cause(0.0, 50.0, 10.0) == "unprofitable"
    assert low_value_cause(20.0, 20.0, 20.0, low_boundary=25.0) == "bottom_share"
    assert low_value_cause(20.0, 20.0, 20.0) is None
    strict = ValueRules(max_refund_share=0.1, min_net_spend=100.0)
    assert value_tier(900.0, 600.0, 850.0, 1000.0, strict) == LOW  # 15% refunded
    assert value_tier(900.0, 600.0, 99.0, 99.0, strict) == LOW  # net below 100
    for bad in (dict(premium_share=0.0), dict(premium_share=0.7, low_share=0.5),
                dict(max_refund_share=1.5)):
        with pytest.raises(ValueError):
            ValueRules(**bad)
