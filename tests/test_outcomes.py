"""Alert outcomes in event time and the uplift report, against known populations."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from models.alert_rules import load_rules
from models.alerts import AlertMemory, Signals, detect, holdout_draw
from models.outcomes import (
    MAX_OPEN,
    FollowUps,
    Outcome,
    UpliftReport,
    newcombe_interval,
    welch_interval,
    wilson_interval,
)
from models.transaction import DAY_US, MICROS, format_time

RULE = "lifecycle.at_risk"


def followed(opened_day: float = 0.0, days: float = 30.0) -> FollowUps:
    f = FollowUps()
    assert f.open("a1", RULE, "live", False, round(opened_day * DAY_US),
                  round((opened_day + days) * DAY_US))
    return f


# -- follow-ups ----------------------------------------------------------------------------

def test_a_purchase_within_the_window_converts_one_after_it_does_not() -> None:
    inside, after, at_open = followed(), followed(), followed()
    inside.on_purchase(20 * MICROS, 30 * DAY_US)  # the deadline itself is inside
    after.on_purchase(20 * MICROS, 30 * DAY_US + 1)
    at_open.on_purchase(20 * MICROS, 0)  # the purchase that raised the alert is not an outcome
    watermark = 31 * DAY_US
    assert inside.mature(watermark) == [Outcome(RULE, "live", False, True, 20 * MICROS)]
    assert after.mature(watermark) == [Outcome(RULE, "live", False, False, 0)]
    assert at_open.mature(watermark) == [Outcome(RULE, "live", False, False, 0)]


def test_mature_waits_for_the_watermark_so_late_purchases_count() -> None:
    f = followed()
    assert f.mature(30 * DAY_US) == []  # not past the deadline yet
    assert f.next_deadline_us() == 30 * DAY_US
    f.on_purchase(5 * MICROS, 29 * DAY_US)  # arrives late, still credited
    f.on_purchase(7 * MICROS, 12 * DAY_US)
    (outcome,) = f.mature(30 * DAY_US + 1)
    assert outcome.converted and outcome.spend_micros == 12 * MICROS
    assert len(f) == 0 and f.mature(100 * DAY_US) == [] and f.next_deadline_us() is None


def test_one_purchase_credits_every_window_that_covers_it() -> None:
    f = FollowUps()
    f.open("a", RULE, "live", False, 0, 30 * DAY_US)
    f.open("b", "churn_risk.high@x", "shadow", True, 10 * DAY_US, 40 * DAY_US)
    f.open("c", "purchase.large", "live", False, 25 * DAY_US, 55 * DAY_US)
    assert f.on_purchase(MICROS, 20 * DAY_US) == 2
    outcomes = f.mature(60 * DAY_US)
    assert [(o.rule, o.mode, o.holdout, o.converted) for o in outcomes] == [
        (RULE, "live", False, True), ("churn_risk.high@x", "shadow", True, True),
        ("purchase.large", "live", False, False)]


def test_open_follow_ups_are_bounded_and_unique() -> None:
    f = FollowUps()
    assert f.open("a", RULE, "live", False, 0, DAY_US)
    assert f.open("a", RULE, "live", False, 0, DAY_US) is False  # a replayed alert
    for i in range(MAX_OPEN - 1):
        assert f.open(f"b{i}", RULE, "live", False, 0, DAY_US)
    assert f.open("one too many", RULE, "live", False, 0, DAY_US) is False
    assert len(f) == MAX_OPEN
    f.mature(2 * DAY_US)
    assert f.open("one too many", RULE, "live", False, 2 * DAY_US, 3 * DAY_US)


def test_follow_an_alert_from_its_as_of_and_pickle() -> None:
    rules = load_rules(None)
    doc = {"customer_id": "c-1", "as_of": format_time(40 * DAY_US), "churn_risk": 0.8,
           "purchase_count": 3, "value_tier": "normal",
           "strategy": {"name": "churn_prevention", "reason": "Reach out."}}
    live, shadow = detect(AlertMemory(), rules, Signals.of(doc), [], None, lambda: doc)
    f = FollowUps()
    for alert in (live, shadow):
        assert f.follow(alert, rules.rule(alert.rule).outcome_us)
    f = pickle.loads(pickle.dumps(f))
    assert f.next_deadline_us() == 70 * DAY_US
    f.on_purchase(9 * MICROS, 69 * DAY_US)
    outcomes = f.mature(71 * DAY_US)
    assert [(o.rule, o.mode, o.holdout, o.spend_micros) for o in outcomes] == [
        (live.rule, "live", live.holdout, 9 * MICROS),
        (shadow.rule, "shadow", shadow.holdout, 9 * MICROS)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(-5, 50), st.integers(1, 10**9)), max_size=30),
       st.randoms(use_true_random=False))
def test_spend_is_the_sum_of_purchases_in_the_window_in_any_order(
        purchases: list[tuple[int, int]], rng: object) -> None:
    f = followed(opened_day=0, days=30)
    shuffled = list(purchases)
    rng.shuffle(shuffled)  # type: ignore[attr-defined]
    for day, amount in shuffled:
        f.on_purchase(amount, day * DAY_US)
    (outcome,) = f.mature(31 * DAY_US)
    inside = [amount for day, amount in purchases if 0 < day <= 30]
    assert outcome.spend_micros == sum(inside)
    assert outcome.converted == bool(inside)


# -- intervals -----------------------------------------------------------------------------

def test_intervals_match_published_values_and_scipy() -> None:
    # Newcombe (1998), Statistics in Medicine 17, table II: 56/70 - 48/80, method 10
    lo, hi = newcombe_interval(56, 70, 48, 80)
    assert (round(lo, 4), round(hi, 4)) == (0.0524, 0.3339)
    assert [round(x, 4) for x in wilson_interval(81, 263)] == [0.2553, 0.3662]
    rng = np.random.default_rng(7)
    a, b = rng.gamma(2.0, 10.0, 40), rng.gamma(2.0, 6.0, 25)
    expected = stats.ttest_ind(a, b, equal_var=False).confidence_interval()
    got = welch_interval(40, a.mean(), a.var(ddof=1), 25, b.mean(), b.var(ddof=1))
    assert got == pytest.approx((expected.low, expected.high))
    assert welch_interval(5, 2.0, 0.0, 5, 1.0, 0.0) == (1.0, 1.0)


def test_newcombe_interval_covers_the_true_difference_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(11)
    p_treated, p_holdout, n_treated, n_holdout = 0.12, 0.08, 900, 100
    k1 = rng.binomial(n_treated, p_treated, 2000)
    k2 = rng.binomial(n_holdout, p_holdout, 2000)
    intervals = [newcombe_interval(int(a), n_treated, int(b), n_holdout)
                 for a, b in zip(k1, k2, strict=True)]
    covered = [lo <= p_treated - p_holdout <= hi for lo, hi in intervals]
    assert 0.93 <= np.mean(covered) <= 0.975


def test_welch_interval_covers_the_true_spend_difference() -> None:
    rng = np.random.default_rng(12)
    covered = []
    for _ in range(1000):  # zero-inflated, skewed spend as in a real campaign
        t = rng.binomial(1, 0.3, 500) * rng.gamma(2.0, 25.0, 500)
        h = rng.binomial(1, 0.2, 100) * rng.gamma(2.0, 25.0, 100)
        lo, hi = welch_interval(500, t.mean(), t.var(ddof=1), 100, h.mean(), h.var(ddof=1))
        covered.append(lo <= (0.3 - 0.2) * 50.0 <= hi)
    assert 0.92 <= np.mean(covered) <= 0.975


# -- the report ----------------------------------------------------------------------------

def simulate(n_customers: int, seed: int) -> tuple[UpliftReport, float, float]:
    """A campaign on a known population: treated convert at 15 %, holdout at 10 %, buyers
    spend gamma(2, 20) (mean 40) each purchase, one or two purchases. Everything goes
    through follow-ups in event time. Returns the report and the true uplifts."""
    rng = np.random.default_rng(seed)
    report = UpliftReport()
    for i in range(n_customers):
        customer = f"c-{i}"
        holdout = holdout_draw(customer, RULE) < 0.1
        f = FollowUps()
        opened = int(rng.integers(0, 100)) * DAY_US
        f.open(f"a{i}", RULE, "live", holdout, opened, opened + 30 * DAY_US)
        report.count_alert(RULE, "live")
        if rng.random() < (0.10 if holdout else 0.15):
            for _ in range(int(rng.integers(1, 3))):
                day = opened + int(rng.integers(1, 30 * DAY_US))
                f.on_purchase(round(rng.gamma(2.0, 20.0) * MICROS), day)
        f.on_purchase(MICROS, opened + 31 * DAY_US)  # after the window: never counted
        for outcome in f.mature(opened + 40 * DAY_US):
            report.add(outcome)
    return report, 0.05, 0.05 * 1.5 * 40.0


def test_report_ci_contains_the_true_uplift_of_a_simulated_population() -> None:
    report, true_conversion, true_spend = simulate(20_000, seed=5)
    row = report.report()[RULE]
    assert row["kind"] == RULE and row["mode"] == "live" and row["alerts"] == 20_000
    treated, holdout = row["treated"], row["holdout"]
    assert treated["n"] + holdout["n"] == 20_000
    assert holdout["n"] / 20_000 == pytest.approx(0.1, abs=0.01)
    assert treated["conversion_rate"] == pytest.approx(0.15, abs=0.01)
    assert holdout["conversion_rate"] == pytest.approx(0.10, abs=0.02)
    lo, hi = row["conversion_uplift"]["ci95"]
    assert lo <= true_conversion <= hi and lo > 0  # the campaign works, and it shows
    assert row["conversion_uplift"]["difference"] == pytest.approx(
        treated["conversion_rate"] - holdout["conversion_rate"])
    lo, hi = row["spend_uplift"]["ci95"]
    assert lo <= true_spend <= hi
    json.dumps(report.report())  # a plain JSON document


def test_report_of_empty_groups_and_shadow_rules() -> None:
    report = UpliftReport()
    assert report.report() == {}
    report.count_alert("churn_risk.high@shadow_0.6", "shadow")
    report.add(Outcome("churn_risk.high@shadow_0.6", "shadow", False, True, 5 * MICROS))
    row = report.report()["churn_risk.high@shadow_0.6"]
    assert (row["kind"], row["mode"], row["alerts"]) == ("churn_risk.high", "shadow", 1)
    assert row["treated"] == {"n": 1, "conversions": 1, "conversion_rate": 1.0,
                              "mean_spend": 5.0}
    assert row["holdout"] == {"n": 0, "conversions": 0, "conversion_rate": None,
                              "mean_spend": None}
    assert row["conversion_uplift"] is None and row["spend_uplift"] is None


outcomes = st.lists(st.builds(
    Outcome, st.sampled_from(["refund.spike", "churn_risk.high", "churn_risk.high@b"]),
    st.just("live"), st.booleans(), st.booleans(), st.integers(0, 10**12)), max_size=60)


@settings(max_examples=100, deadline=None)
@given(outcomes, st.integers(0, 60))
def test_merged_reports_equal_one_report_of_everything(items: list[Outcome], cut: int) -> None:
    whole, left, right = UpliftReport(), UpliftReport(), UpliftReport()
    for i, outcome in enumerate(items):
        whole.add(outcome)
        whole.count_alert(outcome.rule, outcome.mode)
        part = left if i < cut else right
        part.add(outcome)
        part.count_alert(outcome.rule, outcome.mode)
    assert left.merge(right).report() == right.merge(left).report() == whole.report()
    assert pickle.loads(pickle.dumps(whole)).report() == whole.report()
