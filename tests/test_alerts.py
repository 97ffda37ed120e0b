"""Alert rules: the config file's validation, each kind, hysteresis, cooldown, ids, holdout."""

from __future__ import annotations

import pickle
import tomllib
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import schemas
from models.alert_rules import (
    CHURN_RISK_HIGH,
    KINDS,
    LIVE,
    PURCHASE_LARGE,
    REFUND_SPIKE,
    SHADOW,
    AlertRules,
    AlertRulesError,
    load_rules,
    parse_rules,
)
from models.alerts import Alert, AlertMemory, Cause, Signals, alert_id, detect, holdout_draw
from models.scoring import EMPTY_BUNDLE, Outputs, ScoredCustomer, Transition
from models.transaction import DAY_US, MICROS, Transaction, format_time

DEFAULT_FILE = Path(__file__).parent.parent / "crmscore" / "alert_rules.toml"
VALIDATOR = jsonschema_rs.validator_for(schemas.load("alert.v1"), validate_formats=True)


def rules_with(extra: str = "", version: str = "t.1") -> AlertRules:
    """The rules of a file with ``extra`` TOML after the version line."""
    return parse_rules(tomllib.loads(f'version = "{version}"\n{extra}'))


# No cooldown and no shadow rules: every crossing shows.
NO_COOLDOWN = rules_with("[defaults]\ncooldown_days = 0\n")


def doc(day: float, customer: str = "c-1", *, risk: float | None = 0.2, tier: str = "normal",
        count: int = 4, gross: float = 40.0, spend_30d: float = 0.0,
        refunds_30d: float = 0.0, stage: str = "active") -> dict[str, Any]:
    """A score document at ``day`` with what the rules read."""
    return {
        "customer_id": customer, "version": 1, "as_of": format_time(round(day * DAY_US)),
        "currency": "EUR", "purchase_count": count, "gross_monetary": gross,
        "net_monetary": gross - refunds_30d,
        "windows": {"30d": {"purchases": 1, "spend": spend_30d, "refunds": refunds_30d}},
        "churn_risk": risk, "lifecycle_stage": stage, "value_tier": tier,
        "strategy": {"name": "cross_sell", "reason": "Cross-sell related products."},
    }


def detect_on(memory: AlertMemory, rules: AlertRules, score: dict[str, Any],
              transitions: list[Transition], cause: Cause | None) -> list[Alert]:
    """The alerts of a step whose score document is ``score``."""
    return detect(memory, rules, Signals.of(score), transitions, cause, lambda: score)


def buy(day: float, amount: float) -> Cause:
    return Cause(round(day * DAY_US), amount, False)


def refund(day: float, amount: float) -> Cause:
    return Cause(round(day * DAY_US), amount, True)


def kinds(alerts: list[Alert]) -> list[str]:
    return [a.rule for a in alerts]


def assert_valid(alert: Alert) -> None:
    message = alert.to_json()
    VALIDATOR.validate(orjson.loads(orjson.dumps(message)))  # JSON-serialisable too


# -- the rules file ------------------------------------------------------------------------

def test_default_file_has_every_kind_and_a_shadow_challenger() -> None:
    rules = load_rules(None)
    assert rules.version == "2026-11-28.1"
    assert rules == load_rules(DEFAULT_FILE) == load_rules(str(DEFAULT_FILE))
    assert {r.kind for r in rules.rules if r.mode == LIVE} == set(KINDS)
    live, shadow = rules.by_kind[CHURN_RISK_HIGH]
    assert (live.name, live.mode, live.threshold) == (CHURN_RISK_HIGH, LIVE, 0.7)
    assert (shadow.name, shadow.mode, shadow.threshold) == (
        "churn_risk.high@shadow_0.6", SHADOW, 0.6)
    assert shadow.rearm_below == pytest.approx(0.5)  # margin and the rest from the live rule
    assert rules.rule(PURCHASE_LARGE).cooldown_days == 7
    assert rules.rule("lifecycle.churned").outcome_days == 60
    assert rules.rule("lifecycle.at_risk").outcome_us == 30 * DAY_US


def test_quoted_and_dotted_kind_tables_are_the_same() -> None:
    dotted = rules_with("[kinds.refund.spike]\nmin_refunds = 3\n")
    quoted = rules_with('[kinds."refund.spike"]\nmin_refunds = 3\n')
    assert dotted == quoted
    assert dotted.rule(REFUND_SPIKE).min_refunds == 3


@pytest.mark.parametrize(("toml", "message"), [
    ("[kinds.churn_risk.high]\nthreshold = 1.5",
     "kinds.churn_risk.high.threshold: must be in (0, 1], got 1.5"),
    ('[kinds."churn_risk.high"]\nthreshold = 0',
     "kinds.churn_risk.high.threshold: must be in (0, 1], got 0.0"),
    ("[kinds.churn_risk.high]\nthreshold = nan",
     "kinds.churn_risk.high.threshold: must be a finite number, got nan"),
    ("[kinds.churn_risk.high]\nthreshold = 'high'",
     "kinds.churn_risk.high.threshold: must be a number, got 'high'"),
    ("[kinds.churn_risk.high]\nthreshold = true",
     "kinds.churn_risk.high.threshold: must be a number, got True"),
    ("[kinds.churn_risk.high]\nthreshold = 0.5\nrearm_margin = 0.6",
     "kinds.churn_risk.high.rearm_margin: must be in [0, threshold=0.5], got 0.6"),
    ("[kinds.churn_risk.high]\ntreshold = 0.5",
     "kinds.churn_risk.high.treshold: unknown key; expected one of mode, cooldown_days"),
    ("[kinds.lifecycle.at_risk]\nthreshold = 0.5",
     "kinds.lifecycle.at_risk.threshold: unknown key"),
    ("[kinds.churn_risk.hihg]\nthreshold = 0.5",
     "kinds.churn_risk.hihg: unknown kind; expected one of lifecycle.active"),
    ("[kinds.lifecycle.prospect]", "kinds.lifecycle.prospect: unknown kind"),
    ("[kinds.churn_risk]\nthreshold = 0.5", "kinds.churn_risk.threshold: unknown kind"),
    ("[kinds]\n\"refund.spike\" = 3", "kinds.refund.spike: must be a table, got 3"),
    ("[kinds.refund.spike]\nmin_refunds = 2.5",
     "kinds.refund.spike.min_refunds: must be an integer, got 2.5"),
    ("[kinds.refund.spike]\nmin_refunds = 40",
     "kinds.refund.spike.min_refunds: must be in [1, 16], got 40"),
    ("[kinds.purchase.large]\nfactor = 1", "kinds.purchase.large.factor: must be > 1, got 1.0"),
    ("[kinds.value.premium_left]\nmode = 'paused'",
     "kinds.value.premium_left.mode: must be one of live, shadow, off, got 'paused'"),
    ("[kinds.value.premium_left]\ncooldown_days = inf",
     "kinds.value.premium_left.cooldown_days: must be a finite number, got inf"),
    ('[kinds."churn_risk.high@x"]\nmode = "live"',
     "kinds.churn_risk.high@x.mode: only one rule per kind can be live and churn_risk.high is"),
    ('[kinds."churn_risk.high@a b"]', "kinds.churn_risk.high@a b.name: must be"),
    ("[defaults]\nholdout_share = 1.0", "defaults.holdout_share: must be in [0, 1), got 1.0"),
    ("[defaults]\nthreshold = 0.5", "defaults.threshold: unknown key"),
    ("[defaults]\nmode = 'off'", "defaults.mode: unknown key"),
    ("[kinds.lifecycle.churned]\noutcome_days = 0",
     "kinds.lifecycle.churned.outcome_days: must be in (0, 365], got 0.0"),
    ("colour = 'blue'", "colour: unknown key; expected one of version, defaults, kinds"),
])
def test_invalid_rules_are_refused_naming_the_entry(toml: str, message: str) -> None:
    with pytest.raises(AlertRulesError) as info:
        rules_with(toml)
    assert str(info.value).startswith(message)
    assert info.value.entry == message.split(": ")[0]


def test_a_bad_file_names_itself_and_the_entry(tmp_path: Path) -> None:
    bad = tmp_path / "rules.toml"
    bad.write_text('version = "x"\n[kinds.churn_risk.high]\nthreshold = 1.5\n')
    with pytest.raises(AlertRulesError, match=r"rules\.toml: kinds\.churn_risk\.high\."
                                              r"threshold: must be in \(0, 1\], got 1\.5"):
        load_rules(bad)
    bad.write_text("[kinds.churn_risk.high]\n")
    with pytest.raises(AlertRulesError, match="version: must be a string, got None"):
        load_rules(bad)
    bad.write_text("version = \n")
    with pytest.raises(AlertRulesError, match="not valid TOML"):
        load_rules(bad)


def test_rules_off_are_dropped_and_variants_inherit() -> None:
    rules = rules_with("[kinds.purchase.large]\nfactor = 4\nmode = 'off'\n"
                       "[kinds.\"purchase.large@x\"]\nmin_amount = 0\n")
    (variant,) = rules.by_kind[PURCHASE_LARGE]
    assert (variant.name, variant.mode, variant.factor, variant.min_amount) == (
        "purchase.large@x", SHADOW, 4.0, 0.0)


# -- each kind -----------------------------------------------------------------------------

def test_lifecycle_transitions_alert_at_their_own_instants() -> None:
    memory = AlertMemory()
    steps = [Transition("c-1", "churned", "reactivated", 120 * DAY_US),
             Transition("c-1", "active", "at_risk", 66 * DAY_US),
             Transition("c-1", "at_risk", "churned", 100 * DAY_US),
             Transition("c-1", "new", "active", 30 * DAY_US),
             Transition("c-1", "prospect", "new", 10 * DAY_US)]  # no kind for "new"
    alerts = detect_on(memory, NO_COOLDOWN, doc(120, stage="reactivated"), steps, buy(120, 10.0))
    assert [(a.kind, a.occurred_at_us // DAY_US) for a in alerts] == [
        ("lifecycle.active", 30), ("lifecycle.at_risk", 66), ("lifecycle.churned", 100),
        ("lifecycle.reactivated", 120)]
    assert all(a.as_of_us == 120 * DAY_US for a in alerts)
    assert alerts[1].details == {"from": "active", "to": "at_risk"}
    assert alerts[1].reason.startswith("Stage changed from active to at_risk. Cross-sell")


def test_churn_risk_hysteresis_alerts_once_per_excursion() -> None:
    memory = AlertMemory()
    risks = [0.5, 0.72, 0.69, 0.71, 0.65, 0.75, 0.61, 0.7, 0.59, 0.71, 0.7]
    fired = [risk for day, risk in enumerate(risks)
             if detect_on(memory, NO_COOLDOWN, doc(day, risk=risk), [], None)]
    assert fired == [0.72, 0.71]  # hovering at 0.7 re-alerts only after dipping below 0.6


def test_churn_risk_needs_min_purchases_and_a_risk() -> None:
    memory = AlertMemory()
    assert detect_on(memory, NO_COOLDOWN, doc(0, risk=0.9, count=1), [], buy(0, 10.0)) == []
    assert detect_on(memory, NO_COOLDOWN, doc(1, risk=None, count=0), [], None) == []
    alerts = detect_on(memory, NO_COOLDOWN, doc(2, risk=0.9, count=2), [], None)
    assert kinds(alerts) == [CHURN_RISK_HIGH]
    assert alerts[0].details == {"churn_risk": 0.9, "threshold": 0.7,
                                 "rearm_below": pytest.approx(0.6)}
    assert alerts[0].reason.startswith("Churn risk rose to 90% (alert level 70%).")


def test_shadow_challenger_fires_at_its_own_threshold() -> None:
    rules, memory = load_rules(None), AlertMemory()
    alerts = detect_on(memory, rules, doc(0, risk=0.65), [], None)
    assert [(a.rule, a.kind, a.mode) for a in alerts] == [
        ("churn_risk.high@shadow_0.6", CHURN_RISK_HIGH, SHADOW)]
    assert alerts[0].to_json()["mode"] == "shadow"
    assert kinds(detect_on(memory, rules, doc(1, risk=0.72), [], None)) == [CHURN_RISK_HIGH]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), max_size=40))
def test_churn_risk_alerts_follow_the_hysteresis(risks: list[float]) -> None:
    memory = AlertMemory()
    fired = [i for i, risk in enumerate(risks)
             if detect_on(memory, NO_COOLDOWN, doc(i, risk=risk), [], None)]
    assert all(risks[i] >= 0.7 for i in fired)
    for a, b in zip(fired, fired[1:], strict=False):
        assert any(r < 0.7 - 0.1 for r in risks[a:b])  # re-armed in between
    first_high = next((i for i, r in enumerate(risks) if r >= 0.7), None)
    assert (fired[0] if fired else None) == first_high


def test_value_tier_entered_and_left() -> None:
    memory = AlertMemory()
    tiers = ["normal", "premium", "premium", "low", "normal", "premium"]
    got = [kinds(detect_on(memory, NO_COOLDOWN, doc(day, tier=tier), [], None))
           for day, tier in enumerate(tiers)]
    assert got == [[], ["value.premium_entered"], [], ["value.premium_left"], [],
                   ["value.premium_entered"]]
    assert kinds(detect_on(AlertMemory(), NO_COOLDOWN, doc(0, tier="premium"), [], None)) == [
        "value.premium_entered"]  # a fresh memory is a customer before any event


@pytest.mark.parametrize(("count", "gross", "amount", "fires"), [
    (4, 330.0, 300.0, True),    # 30x a usual 10 (three earlier purchases of 30 in all)
    (4, 90.0, 60.0, True),      # 6x a usual 10, above min_amount 50
    (4, 70.0, 40.0, False),     # 4x a usual 10 but below min_amount 50
    (4, 450.0, 150.0, False),   # 1.5x a usual 100
    (3, 320.0, 300.0, False),   # only 2 earlier purchases
    (1, 300.0, 300.0, False),   # first purchase
])
def test_purchase_large(count: int, gross: float, amount: float, fires: bool) -> None:
    alerts = detect_on(AlertMemory(), NO_COOLDOWN, doc(5, count=count, gross=gross), [],
                    buy(5, amount))
    assert kinds(alerts) == ([PURCHASE_LARGE] if fires else [])


def test_purchase_large_at_the_factor_exactly_and_not_for_refunds() -> None:
    rules = rules_with("[kinds.purchase.large]\nmin_amount = 0\n")
    # three earlier purchases of 30 on average
    assert kinds(detect_on(AlertMemory(), rules, doc(5, count=4, gross=180.0), [],
                        buy(5, 90.0))) == [PURCHASE_LARGE]  # 90 = 3 x 30
    assert kinds(detect_on(AlertMemory(), rules, doc(5, count=4, gross=179.99), [],
                        buy(5, 89.99))) == []
    assert kinds(detect_on(AlertMemory(), rules, doc(5, count=4, gross=180.0), [],
                        refund(5, 90.0))) == []
    alert, = detect_on(AlertMemory(), rules, doc(5, count=4, gross=180.0), [], buy(5, 90.0))
    assert alert.reason.startswith("Large purchase: 90.00 EUR, 3.0x their usual 30.00 EUR.")


def test_refund_spike_needs_the_share_and_the_count() -> None:
    memory = AlertMemory()
    # one refund of the whole month's spend: a return, not a spike
    assert detect_on(memory, NO_COOLDOWN, doc(1, spend_30d=100.0, refunds_30d=100.0), [],
                  refund(1, 100.0)) == []
    # a second one 40 days later: one refund in the last 30 days
    assert detect_on(memory, NO_COOLDOWN, doc(41, spend_30d=100.0, refunds_30d=60.0), [],
                  refund(41, 60.0)) == []
    # a third within 30 days of the second, refunds 60 % of spend: a spike
    alerts = detect_on(memory, NO_COOLDOWN, doc(50, spend_30d=200.0, refunds_30d=120.0), [],
                    refund(50, 60.0))
    assert kinds(alerts) == [REFUND_SPIKE]
    assert alerts[0].details["refund_count"] == 2
    # a fourth, but refunds are only 40 % of the month's spend
    assert detect_on(memory, NO_COOLDOWN, doc(51, spend_30d=450.0, refunds_30d=180.0), [],
                  refund(51, 60.0)) == []


def test_refund_memory_stays_bounded() -> None:
    memory = AlertMemory()
    for i in range(100):
        detect_on(memory, NO_COOLDOWN, doc(i / 10, refunds_30d=1.0), [], refund(i / 10, 1.0))
    assert len(memory.refunds) == 16
    detect_on(memory, NO_COOLDOWN, doc(400, refunds_30d=1.0), [], refund(400, 1.0))
    assert memory.refunds == (400 * DAY_US,)


def test_cooldown_per_customer_and_rule() -> None:
    rules, memory = load_rules(None), AlertMemory()  # purchase.large: 7 days

    def large(day: float) -> list[str]:
        return kinds(detect_on(memory, rules, doc(day, count=4, gross=330.0), [],
                            buy(day, 300.0)))

    assert large(0) == [PURCHASE_LARGE]
    assert large(6.9) == []
    assert large(7.0) == [PURCHASE_LARGE]  # 7 days after the last alert, not the dropped one
    assert large(7.0) == []  # never twice at one instant
    other = detect_on(AlertMemory(), rules, doc(7.5, "c-2", count=4, gross=330.0), [],
                   buy(7.5, 300.0))
    assert kinds(other) == [PURCHASE_LARGE]  # another customer has their own cooldown
    assert kinds(detect_on(memory, rules, doc(8, tier="premium"), [], None)) == [
        "value.premium_entered"]  # another rule too


def test_a_crossing_during_the_cooldown_is_spent() -> None:
    rules, memory = rules_with("[defaults]\ncooldown_days = 10\n"), AlertMemory()
    risks = {0: 0.8, 1: 0.5, 2: 0.8, 20: 0.8, 21: 0.5, 22: 0.8}
    fired = [day for day, risk in risks.items()
             if detect_on(memory, rules, doc(day, risk=risk), [], None)]
    assert fired == [0, 22]


# -- ids, holdout, schema ------------------------------------------------------------------

def history(rules: AlertRules, customer: str = "c-1") -> list[Alert]:
    """One customer's alerts over a history touching most kinds."""
    memory, alerts = AlertMemory(), []
    steps: list[tuple[dict[str, Any], list[Transition], Cause | None]] = [
        (doc(0, customer, count=4, gross=330.0), [], buy(0, 300.0)),
        (doc(10, customer, tier="premium"), [], None),
        (doc(40, customer, risk=0.8, stage="at_risk"),
         [Transition(customer, "active", "at_risk", 40 * DAY_US)], None),
        (doc(45, customer, risk=0.8, spend_30d=10.0, refunds_30d=10.0), [], refund(45, 5.0)),
        (doc(46, customer, risk=0.8, spend_30d=10.0, refunds_30d=10.0), [], refund(46, 5.0)),
        (doc(90, customer, risk=0.95, tier="normal", stage="churned"),
         [Transition(customer, "at_risk", "churned", 90 * DAY_US)], None),
    ]
    for d, transitions, cause in steps:
        alerts += detect_on(memory, rules, d, transitions, cause)
    return alerts


def test_same_history_same_ids_and_a_new_version_new_ids() -> None:
    rules = load_rules(None)
    first, second = history(rules), history(rules)
    assert {a.kind for a in first} == set(KINDS) - {"lifecycle.active",
                                                    "lifecycle.reactivated"}
    assert [a.alert_id for a in first] == [a.alert_id for a in second]
    assert len({a.alert_id for a in first}) == len(first)
    data = tomllib.loads(DEFAULT_FILE.read_text())
    other = history(parse_rules({**data, "version": "2026-12-01.1"}))
    assert [a.kind for a in other] == [a.kind for a in first]
    assert not {a.alert_id for a in other} & {a.alert_id for a in first}
    assert {a.rule_version for a in other} == {"2026-12-01.1"}
    assert alert_id("v", "refund.spike", "c-1", 1) != alert_id("v", "refund.spike", "c-1", 2)
    assert alert_id("v", "refund.spike", "c-1", 1) != alert_id("v", "refund.spike", "c-2", 1)


def test_every_alert_matches_the_schema() -> None:
    alerts = history(load_rules(None)) + history(load_rules(None), "c-with-\"quotes\"")
    for alert in alerts:
        assert_valid(alert)
    message = alerts[0].to_json()
    assert message["occurred_at"] == "1970-01-01T00:00:00.000000Z"
    assert message["strategy"] == {"name": "cross_sell", "reason": alerts[0].reason}
    assert message["score"]["customer_id"] == "c-1"
    with pytest.raises(jsonschema_rs.ValidationError):
        VALIDATOR.validate({**message, "kind": "lifecycle.new"})
    with pytest.raises(jsonschema_rs.ValidationError):
        VALIDATOR.validate({k: v for k, v in message.items() if k != "holdout"})


def test_holdout_share_is_close_to_the_configured_share_and_stable() -> None:
    customers = [f"c-{i}" for i in range(10_000)]
    draws = {kind: [holdout_draw(c, kind) for c in customers] for kind in KINDS}
    for kind, values in draws.items():
        share = sum(v < 0.1 for v in values) / len(values)
        assert share == pytest.approx(0.1, abs=0.015), kind  # 5 sd of a binomial share
        assert sum(v < 0.3 for v in values) / len(values) == pytest.approx(0.3, abs=0.025)
    assert draws[KINDS[0]] == [holdout_draw(c, KINDS[0]) for c in customers]
    a = [v < 0.1 for v in draws[CHURN_RISK_HIGH]]
    b = [v < 0.1 for v in draws[PURCHASE_LARGE]]
    both = sum(x and y for x, y in zip(a, b, strict=True)) / len(a)
    assert both == pytest.approx(0.01, abs=0.005)  # kinds pick independent groups


def test_alerts_carry_the_holdout_of_customer_and_kind() -> None:
    rules = load_rules(None)
    held = []
    for i in range(2_000):
        alerts = detect_on(AlertMemory(), rules, doc(0, f"c-{i}", risk=0.75), [], None)
        live, shadow = alerts
        assert live.holdout == shadow.holdout == (holdout_draw(f"c-{i}", CHURN_RISK_HIGH) < 0.1)
        held.append(live.holdout)
    assert 0.07 < sum(held) / len(held) < 0.13


def test_memory_pickles_and_carries_on() -> None:
    rules, memory = NO_COOLDOWN, AlertMemory()
    detect_on(memory, rules, doc(0, risk=0.8, tier="premium"), [], refund(0, 1.0))
    copy = pickle.loads(pickle.dumps(memory))
    assert copy.__getstate__() == memory.__getstate__()
    later = doc(1, risk=0.5, tier="normal")
    assert kinds(detect_on(copy, rules, later, [], None)) == kinds(
        detect_on(memory, rules, later, [], None)) == ["value.premium_left"]
    assert len(pickle.dumps(memory)) < 400


# -- with the real scoring -----------------------------------------------------------------

def purchase(day: float, amount: float = 10.0) -> Transaction:
    eid = f"e{day}"
    return Transaction(eid, "c-9", round(day * DAY_US), False, round(amount * MICROS), "EUR",
                       eid.encode())


def scored_run(with_wakes: bool) -> list[Alert]:
    """A regular customer who falls silent for 200 days and comes back, scored for real."""
    rules, memory = load_rules(None), AlertMemory()
    customer, out, alerts = ScoredCustomer("c-9"), Outputs(), []

    def step(cause: Cause | None) -> None:
        doc = customer.document(EMPTY_BUNDLE, out)
        alerts.extend(detect_on(memory, rules, doc, out.transitions, cause))
        out.transitions.clear()

    for day in (0, 10, 20, 30):
        customer.apply(purchase(day), EMPTY_BUNDLE, out)
        step(buy(day, 10.0))
    while with_wakes and (due := customer.next_due_us(EMPTY_BUNDLE) or 1 << 62) < 230 * DAY_US:
        customer.wake(due, EMPTY_BUNDLE, out)
        step(None)
    customer.apply(purchase(230, 200.0), EMPTY_BUNDLE, out)
    step(buy(230, 200.0))
    return alerts


def test_scored_customer_alerts_validate_and_do_not_depend_on_wakes() -> None:
    woken, caught_up = scored_run(with_wakes=True), scored_run(with_wakes=False)
    for alert in woken + caught_up:
        assert_valid(alert)
    assert [a.kind for a in woken] == ["lifecycle.active", "lifecycle.at_risk",
                                       "lifecycle.churned", "lifecycle.reactivated",
                                       "purchase.large"]
    assert [(a.alert_id, a.occurred_at_us) for a in woken] == [
        (a.alert_id, a.occurred_at_us) for a in caught_up]
    assert woken[1].score["lifecycle_stage"] == "at_risk"
    assert caught_up[1].score["lifecycle_stage"] == "reactivated"  # known only later
