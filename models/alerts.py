"""Alerts: the triggers that fire when a customer changes type, in event time.

The flow calls :func:`detect` after every processed instant of a customer (an applied
transaction, or a wake-up when the stream clock passes a due instant) with the
:class:`Signals` the rules read of the new score, the lifecycle transitions of that step
and the transaction applied (``cause``; None for a wake-up). The full score document,
which every alert carries, is built only for an alert that fires: a replay processes
~2.3 instants per event, and the document was the costliest part of each.

The kinds, first the brief's customer types, then single events:

=========================  ==============================================================
kind                       fires when
=========================  ==============================================================
``lifecycle.active``       the stage becomes active, ``at_risk``, ``churned`` or
``lifecycle.at_risk``      ``reactivated`` (:mod:`models.lifecycle`); one alert per
``lifecycle.churned``      transition, at the transition's own instant
``lifecycle.reactivated``
``churn_risk.high``        the churn risk reaches ``threshold`` [0.7] from below, with at
                           least ``min_purchases`` [2] purchases; then not again until it
                           has fallen below ``threshold - rearm_margin`` [0.6]
``value.premium_entered``  the value tier becomes premium (:mod:`models.value`)
``value.premium_left``     the value tier stops being premium
``purchase.large``         a purchase >= ``factor`` [3] x the customer's mean earlier
                           purchase, >= ``min_amount`` [50], after at least
                           ``min_prior_purchases`` [3] purchases
``refund.spike``           a refund that brings the last 30 days' refunds to >=
                           ``min_share`` [50 %] of the 30 days' spend (the share above
                           which models/value.py calls a customer unprofitable), with at
                           least ``min_refunds`` [2] refunds in those 30 days
=========================  ==============================================================

A fresh :class:`AlertMemory` is the customer before any event (tier normal, armed), so a
customer whose very first score is premium enters premium. Every rule has a cooldown per
customer [30 days]: an alert within it is dropped (the memory still moves on, so a risk
crossing during a cooldown is spent). Rules and thresholds come from a versioned TOML
file (:func:`models.alert_rules.load_rules`; the packaged default is
``crmscore/alert_rules.toml``).

**Deterministic.** No randomness and no wall clock: the alert id is a hash of the rule
version, the rule, the customer and the event-time instant, so a replay or a restart
from a snapshot re-emits the same ids. Lifecycle alerts keep their transitions' instants
even when an event arrived before the wake-up (the scoring catches up), so the ids do not
depend on how wakes and events interleave. Risk and tier are read from the signals, so
call :func:`detect` for every processed instant, in order.

**Holdout.** For each kind a fixed share of customers [10 %], chosen by a hash of kind
and customer, get ``holdout=true``: consumers must not act on those, and
:mod:`models.outcomes` compares them with the treated ones. Variants of a kind share its
holdout customers. A ``shadow`` rule (``churn_risk.high@shadow_0.6`` beside the live
``churn_risk.high``) is evaluated and measured but never published: champion/challenger.

>>> from models.alert_rules import load_rules
>>> rules = load_rules(None)
>>> memory = AlertMemory()
>>> doc = {"customer_id": "c-1", "as_of": "2026-01-10T00:00:00.000000Z", "currency": "EUR",
...        "churn_risk": 0.2, "value_tier": "normal", "purchase_count": 4,
...        "gross_monetary": 330.0, "strategy": {"name": "cross_sell", "reason": "Cross-sell."}}
>>> cause = Cause(parse_time(doc["as_of"]), amount=300.0, is_refund=False)
>>> [a.kind for a in detect(memory, rules, Signals.of(doc), [], cause, lambda: doc)]
['purchase.large']
>>> high = dict(doc, as_of="2026-03-01T00:00:00.000000Z", churn_risk=0.75)
>>> [(a.rule, a.mode) for a in detect(memory, rules, Signals.of(high), [], None, lambda: high)]
[('churn_risk.high', 'live'), ('churn_risk.high@shadow_0.6', 'shadow')]
>>> later = dict(high, as_of="2026-05-01T00:00:00.000000Z")
>>> detect(memory, rules, Signals.of(later), [], None, lambda: later)
[]
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from models.alert_rules import (
    CHURN_RISK_HIGH,
    LIFECYCLE_KINDS,
    MAX_REFUNDS_KEPT,
    PREMIUM_ENTERED,
    PREMIUM_LEFT,
    PURCHASE_LARGE,
    REFUND_SPIKE,
    REFUND_WINDOW,
    REFUND_WINDOW_US,
    AlertRules,
    Rule,
)
from models.transaction import MICROS, Transaction, format_time, parse_time
from models.value import NORMAL, PREMIUM

if TYPE_CHECKING:
    from models.scoring import Transition


class Cause(NamedTuple):
    """The transaction just applied (amount in the currency's major units)."""

    occurred_at_us: int
    amount: float
    is_refund: bool

    @classmethod
    def of(cls, tx: Transaction) -> Cause:
        return cls(tx.occurred_at_us, tx.amount_micros / MICROS, tx.is_refund)


class Signals(NamedTuple):
    """What the rules read of a customer's score at one instant (money in major units)."""

    customer_id: str
    as_of_us: int
    churn_risk: float | None
    value_tier: str
    purchase_count: int
    gross_monetary: float
    currency: str | None
    # The last 30 days' (spend, refunds): read for a refund only, so given for one only.
    refund_window: tuple[float, float] | None = None

    @classmethod
    def of(cls, doc: Mapping[str, Any]) -> Signals:
        """The signals of a score document (tests, and what the fields mean)."""
        window = doc.get("windows", {}).get(REFUND_WINDOW)
        return cls(doc["customer_id"], parse_time(doc["as_of"]), doc.get("churn_risk"),
                   doc["value_tier"], doc["purchase_count"], doc.get("gross_monetary", 0.0),
                   doc.get("currency"),
                   None if window is None else (window["spend"], window["refunds"]))


class AlertMemory:
    """What the rules remember about one customer between steps. Picklable and small."""

    __slots__ = ("fired", "disarmed", "tier", "refunds")

    def __init__(self) -> None:
        self.fired: dict[str, int] = {}  # rule name -> instant of its latest alert
        self.disarmed: frozenset[str] = frozenset()  # churn-risk rules waiting to re-arm
        self.tier = NORMAL  # value tier at the previous step
        self.refunds: tuple[int, ...] = ()  # recent refund instants, sorted

    def __getstate__(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        for name, value in zip(self.__slots__, state, strict=True):
            setattr(self, name, value)


class Alert(NamedTuple):
    alert_id: str
    rule: str
    kind: str
    mode: str
    customer_id: str
    occurred_at_us: int  # the event-time instant that caused it
    as_of_us: int  # the score's instant: when the alert is known
    holdout: bool
    rule_version: str
    reason: str
    details: Mapping[str, Any]
    score: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The alert message (schemas/alert.v1.json)."""
        return {
            "alert_id": self.alert_id, "customer_id": self.customer_id, "kind": self.kind,
            "rule": self.rule, "mode": self.mode,
            "occurred_at": format_time(self.occurred_at_us), "as_of": self.score["as_of"],
            "holdout": self.holdout, "rule_version": self.rule_version,
            "strategy": {"name": self.score["strategy"]["name"], "reason": self.reason},
            "details": dict(self.details), "score": self.score,
        }


def alert_id(rule_version: str, rule: str, customer_id: str, at_us: int) -> str:
    """32 hex digits; the same inputs always give the same id.

    >>> alert_id("v1", "refund.spike", "c-1", 0) == alert_id("v1", "refund.spike", "c-1", 0)
    True
    """
    key = json.dumps([rule_version, rule, customer_id, at_us]).encode()
    return hashlib.blake2b(key, digest_size=16).hexdigest()


def holdout_draw(customer_id: str, kind: str) -> float:
    """A uniform number in [0, 1) fixed per customer and kind; holdout when below the share
    (so raising the share keeps every customer already held out)."""
    key = json.dumps([kind, customer_id]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64


class _Hit(NamedTuple):
    rule: Rule
    at_us: int
    what: str  # what happened, one short sentence
    details: dict[str, Any]


def _money(x: float, currency: str | None) -> str:
    return f"{x:,.2f}" + (f" {currency}" if currency else "")


def _lifecycle_hits(rules: AlertRules, transitions: Sequence[Transition]) -> list[_Hit]:
    hits = []
    for t in sorted(transitions, key=lambda t: t.at_us):
        kind = LIFECYCLE_KINDS.get(t.new)
        for rule in rules.by_kind.get(kind or "", ()):
            hits.append(_Hit(rule, t.at_us, f"Stage changed from {t.old} to {t.new}.",
                             {"from": t.old, "to": t.new}))
    return hits


def _churn_risk_hits(memory: AlertMemory, rules: AlertRules, signals: Signals,
                     at_us: int) -> list[_Hit]:
    risk = signals.churn_risk
    if risk is None:
        return []
    hits = []
    for rule in rules.by_kind[CHURN_RISK_HIGH]:
        if rule.name in memory.disarmed:
            if risk < rule.rearm_below:
                memory.disarmed -= {rule.name}
        elif risk >= rule.threshold and signals.purchase_count >= rule.min_purchases:
            memory.disarmed |= {rule.name}
            hits.append(_Hit(rule, at_us, f"Churn risk rose to {risk:.0%} "
                                          f"(alert level {rule.threshold:.0%}).",
                             {"churn_risk": risk, "threshold": rule.threshold,
                              "rearm_below": rule.rearm_below}))
    return hits


def _value_hits(memory: AlertMemory, rules: AlertRules, signals: Signals,
                at_us: int) -> list[_Hit]:
    old, new = memory.tier, signals.value_tier
    memory.tier = new
    if (old == PREMIUM) == (new == PREMIUM):
        return []
    kind, what = ((PREMIUM_ENTERED, "Entered the premium tier.") if new == PREMIUM
                  else (PREMIUM_LEFT, f"Left the premium tier (now {new})."))
    return [_Hit(rule, at_us, what, {"from": old, "to": new}) for rule in rules.by_kind[kind]]


def _purchase_hits(rules: AlertRules, signals: Signals, cause: Cause) -> list[_Hit]:
    prior = signals.purchase_count - 1
    if prior < 1:
        return []
    usual = (signals.gross_monetary - cause.amount) / prior  # mean of their other purchases
    hits = []
    for rule in rules.by_kind[PURCHASE_LARGE]:
        if (prior >= rule.min_prior_purchases and cause.amount >= rule.min_amount
                and cause.amount >= rule.factor * usual):
            currency = signals.currency
            what = (f"Large purchase: {_money(cause.amount, currency)}, "
                    f"{cause.amount / usual:.1f}x their usual {_money(usual, currency)}."
                    if usual > 0 else f"Large purchase: {_money(cause.amount, currency)}.")
            hits.append(_Hit(rule, cause.occurred_at_us, what,
                             {"amount": cause.amount, "usual_amount": usual,
                              "factor": rule.factor}))
    return hits


def _refund_hits(memory: AlertMemory, rules: AlertRules, signals: Signals,
                 cause: Cause) -> list[_Hit]:
    at = cause.occurred_at_us
    kept = sorted((*memory.refunds, at))
    memory.refunds = tuple(t for t in kept if t > kept[-1] - REFUND_WINDOW_US)[
        -MAX_REFUNDS_KEPT:]
    count = sum(1 for t in memory.refunds if at - REFUND_WINDOW_US < t <= at)
    assert signals.refund_window is not None, "a refund's signals carry its window"
    spend, refunds = signals.refund_window
    hits = []
    for rule in rules.by_kind[REFUND_SPIKE]:
        if count >= rule.min_refunds and refunds >= rule.min_share * spend:
            currency = signals.currency
            hits.append(_Hit(rule, at, f"Refund spike: {count} refunds of "
                                       f"{_money(refunds, currency)} in 30 days against "
                                       f"{_money(spend, currency)} spent.",
                             {"refund_count": count, "refunds": refunds, "spend": spend,
                              "window_days": 30}))
    return hits


def detect(memory: AlertMemory, rules: AlertRules, signals: Signals,
           transitions: Sequence[Transition], cause: Cause | None,
           document: Callable[[], Mapping[str, Any]]) -> list[Alert]:
    """The alerts of one processed instant of a customer; updates ``memory`` in place.

    ``signals`` are the score's after the step, ``transitions`` the lifecycle changes the
    step produced, ``cause`` the transaction it applied (None for a wake-up);
    ``document`` builds the score document, called at most once, for an alert that fires.
    Lifecycle alerts occur at their transitions' instants, event alerts at the
    transaction's, and risk and tier alerts at the transaction's or, on a wake-up, at the
    score's ``as_of``.
    """
    as_of_us = signals.as_of_us
    at_us = as_of_us if cause is None else cause.occurred_at_us
    hits = _lifecycle_hits(rules, transitions)
    hits += _churn_risk_hits(memory, rules, signals, at_us)
    hits += _value_hits(memory, rules, signals, at_us)
    if cause is not None and not cause.is_refund:
        hits += _purchase_hits(rules, signals, cause)
    elif cause is not None:
        hits += _refund_hits(memory, rules, signals, cause)
    alerts: list[Alert] = []
    customer_id = signals.customer_id
    doc: Mapping[str, Any] | None = None
    for rule, at, what, details in hits:
        last = memory.fired.get(rule.name)
        if last is not None and at - last < max(rule.cooldown_us, 1):
            continue  # in cooldown (or a second alert at the same instant)
        memory.fired[rule.name] = at if last is None else max(at, last)
        doc = document() if doc is None else doc
        alerts.append(Alert(
            alert_id(rules.version, rule.name, customer_id, at), rule.name, rule.kind,
            rule.mode, customer_id, at, as_of_us,
            holdout_draw(customer_id, rule.kind) < rule.holdout_share, rules.version,
            f"{what} {doc['strategy']['reason']}", details, doc))
    return alerts
