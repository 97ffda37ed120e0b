"""One customer, scored in event time: exact state, lifecycle stage, churn label, due time.

:class:`ScoredCustomer` is what the flow keeps per customer: the exact aggregates
(:class:`models.customer.CustomerState`) plus what the time-dependent scores remember:
the lifecycle :class:`~models.lifecycle.Stage`, the open churn prediction
(:class:`~models.churn.PendingLabel`) and the instant it must next be woken at.

**Event time.** ``as_of`` only moves with event time: to an event's ``occurred_at``, or to
a *due instant* the customer computed itself (the next lifecycle change, the expected
gap that the churn model may turn into "at risk", the churn label's maturity). The flow
delivers a *wake* when the stream clock passes a registered due instant; an event that
arrives first catches the customer up to every due instant before it. Either way the
same instants are processed in the same order, so a full-speed replay yields the stages
and labels of a live run, whatever the interleaving of wakes and events.

**Population knowledge** (churn models, RFM quintiles, the premium boundary, BG/NBD +
Gamma-Gamma parameters, the typical purchase gap) comes in a read-only
:class:`ModelBundle` that the flow's models step publishes; a score names the bundle's
``model_version``. With an empty bundle (cold start) churn risk is the base rate and
CLV, RFM scores and the premium tier are unset.

>>> from models.transaction import Transaction
>>> def buy(cid, eid, day):
...     return Transaction(eid, cid, day * DAY_US, False, 10 * MICROS, "EUR", eid.encode())
>>> c, out = ScoredCustomer("c"), Outputs()
>>> for day in (0, 10, 20, 30):
...     _ = c.apply(buy("c", f"e{day}", day), EMPTY_BUNDLE, out)
>>> c.stage.name
'active'
>>> dues = []  # one expected gap (18 days) on, then weekly refreshes: 21, 28, 35 days on
>>> while (due := c.next_due_us(EMPTY_BUNDLE)) < 70 * DAY_US:
...     _ = c.wake(due, EMPTY_BUNDLE, out)
...     dues.append((due / DAY_US, c.stage.name))
>>> dues
[(48.0, 'active'), (51.0, 'active'), (58.0, 'active'), (65.0, 'active'), (66.0, 'at_risk')]
>>> [(t.old, t.new, t.at_us / DAY_US) for t in out.transitions]  # two expected gaps: at risk
[('new', 'active', 30.0), ('active', 'at_risk', 66.0)]
"""

from __future__ import annotations

import functools
import math
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, NamedTuple

from models.alert_rules import REFUND_WINDOW, AlertRules
from models.alerts import Alert, AlertMemory, Cause, Signals, detect
from models.btyd import PopulationModel
from models.churn import (
    BtydChurnModel,
    ChurnModel,
    LabeledExample,
    PendingLabel,
    bgnbd_churn_prior,
    mature_on_clock,
    mature_on_purchase,
)
from models.churn_features import churn_features
from models.customer import APPLIED, CustomerState
from models.lifecycle import (
    DEFAULT_RULES,
    PROSPECT,
    Facts,
    LifecycleRules,
    Stage,
    expected_gap_days,
    lifecycle_stage,
    next_change_at,
)
from models.outcomes import FollowUp, FollowUps, Outcome
from models.quantiles import Boundaries, customer_hash
from models.rfm import rfm_scores
from models.strategy import strategy
from models.transaction import DAY_US, MICROS, Rejection, Transaction
from models.value import DEFAULT_VALUE_RULES, ValueRules, low_value_cause, value_tier

# A score document's version: applied events in the high bits, due instants processed
# since the newest one in the low bits, so it grows with every change of the score.
STEP_BITS = 20


@dataclass(frozen=True, slots=True)
class ScoringConfig:
    churn_horizon_days: float = 90.0
    clv_horizon_days: float = 365.0
    lateness_days: float = 7.0
    premium_share: float = 0.2
    # Days after the last purchase at which an overdue customer (silent for longer than
    # their expected gap) is rescored, so recency and churn risk keep moving with the
    # clock (lifecycle instants come on top): every week, until max_silence_days.
    # Each instant costs a rescoring, in live runs and replays alike (live, nothing to
    # speak of: a million silent customers rescored weekly is ~2 a second). Weekly, not
    # at 20 milestones (7, 14, 21, 30, 45, ... 365, 450, 540, 730 days): served scores
    # lag the clock by a median 3.7 days instead of 12.6 (p90 10 instead of 52) on the
    # generator, whose churn AUC for "stopped" went 0.9340 / 0.9404 / 0.9426 -> 0.9365 /
    # 0.9411 / 0.9441 (seeds 3-5; offline BG/NBD 0.9350 / 0.9407 / 0.9443), and 14 -> 4
    # days on CDNOW (AUC 0.765 -> 0.771); a full-speed replay takes ~20% longer.
    refresh_days: tuple[float, ...] = tuple(range(7, 731, 7))
    # ... and at these multiples of the customer's expected gap between purchases (at
    # one gap a confident churn model may turn the customer at risk).
    refresh_gaps: tuple[float, ...] = (1.0,)
    # A silent customer keeps opening churn predictions (one per horizon) until this
    # long after their last purchase; then they sleep until their next event.
    max_silence_days: float = 730.0
    lifecycle: LifecycleRules = DEFAULT_RULES
    value: ValueRules = DEFAULT_VALUE_RULES
    horizon_us: int = field(init=False, repr=False, compare=False)
    lateness_us: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.churn_horizon_days <= 0 or self.clv_horizon_days <= 0:
            raise ValueError(f"horizons must be positive, got {self}")
        object.__setattr__(self, "horizon_us", round(self.churn_horizon_days * DAY_US))
        object.__setattr__(self, "lateness_us", round(self.lateness_days * DAY_US))


@dataclass(frozen=True, slots=True)
class ModelBundle:
    """What the population knows, as published by the models step. Read-only."""

    version: int = 0
    config: ScoringConfig = ScoringConfig()
    models: Mapping[str, ChurnModel] = field(default_factory=dict)
    champion: str | None = None  # None: serve the prior
    model_version: str = "prior:base_rate"
    base_rate: float = 0.5
    boundaries: Boundaries | None = None
    premium_boundary: float | None = None
    btyd: PopulationModel | None = None
    value_model: str = "bgnbd"  # the BTYD family of p_alive, expected purchases and CLV
    typical_gap_days: float | None = None
    # Largest customer hash in the population sample once it is full: updates from
    # customers above it cannot enter the sample, so they are not sent.
    sample_threshold: int | None = None
    # The bundle version from which the served scores are current: a score computed with
    # an older bundle is redone (another model serves, or a BTYD refit is swept in).
    rescore_from: int = 0

    @property
    def rules(self) -> LifecycleRules:
        return _rules(self.config.lifecycle, self.typical_gap_days)

    def __setstate__(self, state: list[Any]) -> None:
        """A bundle pickled by an earlier version (the one in Redis when the flow is
        upgraded) lacks the fields added since, always at the end: they take their
        defaults. dataclass's own pairs fields and values up to the shorter."""
        for i, f in enumerate(fields(self)):
            if i < len(state):
                value = state[i]
            else:
                value = f.default if f.default_factory is MISSING else f.default_factory()
            object.__setattr__(self, f.name, value)


EMPTY_BUNDLE = ModelBundle()


@functools.lru_cache(maxsize=64)
def _rules(base: LifecycleRules, typical_gap_days: float | None) -> LifecycleRules:
    if typical_gap_days is None:
        return base
    return replace(base, typical_gap_days=typical_gap_days)


@functools.lru_cache(maxsize=8)
def _offsets_us(days: tuple[float, ...]) -> tuple[int, ...]:
    """``days`` in microseconds, sorted (a config's refresh milestones, bisected)."""
    return tuple(sorted(round(d * DAY_US) for d in days))


class Transition(NamedTuple):
    customer_id: str
    old: str
    new: str
    at_us: int


class Value(NamedTuple):
    """A customer's expected value at an instant, and the tier it puts them in."""

    p_alive: float | None
    expected_purchases: float | None
    clv_predicted: float | None
    expected_total: float | None  # net spend so far + clv_predicted
    tier: str


class PopulationRow(NamedTuple):
    """A customer's current values, for the population sample."""

    key_hash: int
    first_purchase_us: int
    last_purchase_us: int
    purchase_count: int
    net_spend: float
    expected_value: float | None
    as_of_us: int


@dataclass(slots=True)
class Outputs:
    """What scoring customers produced, besides their documents."""

    labels: list[LabeledExample] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)
    registrations: list[tuple[str, int]] = field(default_factory=list)  # (customer, due)
    cancellations: list[tuple[str, int]] = field(default_factory=list)  # superseded ones
    population: list[PopulationRow] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)  # of alerts followed up
    doc: dict[str, Any] | None = None  # the newest score document built (for an alert)


class ScoredCustomer:
    """A customer's exact state and time-dependent scores (see the module docstring)."""

    # What a snapshot keeps; the memos (next rescoring instant, value) are recomputed.
    _STATE = ("state", "stage", "pending", "risk", "as_of_us", "steps", "registered_us",
              "key_hash", "alerts", "followups")
    __slots__ = (*_STATE, "scored_by", "memo", "value_memo")

    def __init__(self, customer_id: str) -> None:
        self.state = CustomerState(customer_id)
        self.stage: Stage | None = None
        self.pending: PendingLabel | None = None
        self.risk: float | None = None  # churn risk at the last evaluation
        self.scored_by: int | None = None  # the version of the bundle that computed it
        self.as_of_us: int | None = None
        self.steps = 0  # due instants processed since the newest applied event
        self.registered_us: int | None = None  # due instant the flow will wake us at
        self.key_hash = customer_hash(customer_id)
        self.alerts = AlertMemory()  # what the alert rules remember
        self.followups = FollowUps()  # alerts whose outcome (a purchase?) is being watched
        self.memo: tuple[tuple[int | None, int, int, int], int | None] | None = None
        # The value at the last instant it was asked for: the alert rules read its tier
        # and the document then shows it, at the same instant (BTYD expectations, twice).
        self.value_memo: tuple[tuple[int | None, int, int, int], Value] | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as builtins only (tuples, lists, dicts) behind one function: the flow
        pickles every customer touched in an epoch, in the pause that ends it, and each
        class in a pickle costs more than its data (34-51 µs a customer, now 20-24)."""
        followups = [tuple(f) for f in self.followups.items]
        stage = None if self.stage is None else self.stage.flat()
        pending = None if self.pending is None else tuple(self.pending)
        return _restore_customer, ((
            self.state.__getstate__(), stage, pending, self.risk, self.as_of_us, self.steps,
            self.registered_us, self.key_hash, self.alerts.__getstate__(), followups,
            self.scored_by,
        ),)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        """Snapshots taken before ``__reduce__`` (the objects themselves, in _STATE order)."""
        for name, value in zip(self._STATE, state, strict=True):
            object.__setattr__(self, name, value)
        self.scored_by = None
        self.memo = self.value_memo = None

    @property
    def customer_id(self) -> str:
        return self.state.customer_id

    @property
    def version(self) -> int:
        return (self.state.version << STEP_BITS) | min(self.steps, (1 << STEP_BITS) - 1)

    # -- inputs ---------------------------------------------------------------------------

    def apply(self, tx: Transaction, bundle: ModelBundle, out: Outputs,
              rules: AlertRules | None = None) -> str | Rejection:
        """Apply one event: catch up the due instants up to its time, then update the
        scores (and, with alert ``rules``, detect alerts and follow up the open ones).

        An instant due exactly at the event's time is processed first, as a wake-up
        delivered before the event would have been: the flow may deliver either first.
        """
        t = tx.occurred_at_us
        self._advance(t, bundle, out, rules)
        outcome = self.state.apply(tx, bundle.config.lateness_us)
        if outcome is not APPLIED:
            return outcome
        self.steps = 0
        if self.as_of_us is None or t > self.as_of_us:
            self.as_of_us = t
        if not tx.is_refund:
            self.followups.on_purchase(tx.amount_micros, t)
            if t == self.state.last_purchase_us:
                self._open_label(t, bundle, out)
        self._step(bundle, out, rules, Cause.of(tx))
        return outcome

    def wake(self, due_us: int, bundle: ModelBundle, out: Outputs,
             rules: AlertRules | None = None) -> bool:
        """The stream clock passed ``due_us``: process every due instant up to it.

        Returns whether the score moved on (not for a stale wake, superseded by events,
        nor for an instant that only closes an alert's outcome window).
        """
        if self.registered_us is not None and self.registered_us <= due_us:
            self.registered_us = None
        return self._advance(due_us, bundle, out, rules)

    def rescore(self, bundle: ModelBundle, out: Outputs,
                rules: AlertRules | None = None) -> bool:
        """Another model is served, or another BTYD fit: score again at ``as_of`` (the clock
        does not move), so the score stops naming a model that no longer serves; stage,
        alerts and version follow as at any instant. False when the score is already
        current (computed with ``bundle.rescore_from`` or newer: a second rescore wake),
        or there is nothing to score."""
        now = self.as_of_us
        if (now is None or self.state.last_purchase_us is None
                or (self.scored_by is not None and self.scored_by >= bundle.rescore_from)):
            return False
        self.steps += 1
        self._step(bundle, out, rules, None)
        return True

    def register(self, bundle: ModelBundle, out: Outputs) -> None:
        """Ask to be woken at the next due instant, and cancel the registration it replaces
        (an event moved the instant, or the customer sleeps now)."""
        due = self.next_due_us(bundle)
        if due == self.registered_us:
            return
        if self.registered_us is not None:
            out.cancellations.append((self.customer_id, self.registered_us))
        self.registered_us = due
        if due is not None:
            out.registrations.append((self.customer_id, due))

    # -- time -----------------------------------------------------------------------------

    def next_due_us(self, bundle: ModelBundle) -> int | None:
        """The next instant at which a score changes, or an alert's outcome is known, if no
        event arrives."""
        score, outcome = self._next_score_us(bundle), self._next_outcome_us(bundle)
        if score is None or outcome is None:
            return outcome if score is None else score
        return min(score, outcome)

    def _next_score_us(self, bundle: ModelBundle) -> int | None:
        """The next instant at which the score moves on (rescoring); remembered until the
        state, ``as_of`` or the bundle changes: the flow asks after every batch."""
        key = (self.as_of_us, self.version, id(bundle), bundle.version)
        if self.memo is not None and self.memo[0] == key:
            return self.memo[1]
        due = self._compute_next_score_us(bundle)
        self.memo = (key, due)
        return due

    def _compute_next_score_us(self, bundle: ModelBundle) -> int | None:
        now = self.as_of_us
        if now is None:
            return None
        candidates = []
        if self.pending is not None:  # the label matures once the clock *passes* the horizon
            candidates.append(self.pending.opened_at_us + bundle.config.horizon_us + 1)
        facts = self._facts(self.risk)
        if self.stage is not None and facts.last_purchase_us is not None:
            rules = bundle.rules
            change = next_change_at(facts, now, self.stage, rules)
            if change is not None:
                candidates.append(change)
            # Churn risk moves fastest on the customer's own time scale: rescore at
            # multiples of their expected gap (at one gap a confident churn model may
            # turn them at risk), and at fixed milestones for the slow ones.
            last = facts.last_purchase_us
            gap_us = expected_gap_days(facts, rules) * DAY_US
            cfg = bundle.config
            rhythm = next((last + round(m * gap_us) for m in cfg.refresh_gaps
                           if last + m * gap_us > now), None)
            # Fixed milestones only once the customer is overdue (past one expected gap):
            # a regular buyer's score is refreshed by their purchases.
            offsets = _offsets_us(cfg.refresh_days)
            i = bisect_right(offsets, max(now - last, gap_us))
            fixed = last + offsets[i] if i < len(offsets) else None
            candidates += [t for t in (rhythm, fixed) if t is not None]
        later = [t for t in candidates if t > now]
        return min(later) if later else None

    def _next_outcome_us(self, bundle: ModelBundle) -> int | None:
        """When the earliest followed alert's outcome is known: its window closed and the
        late events it may credit are in. Not a rescoring: the score stays as it is."""
        deadline = self.followups.next_deadline_us()
        return None if deadline is None else deadline + bundle.config.lateness_us + 1

    def _advance(self, to_us: int, bundle: ModelBundle, out: Outputs,
                 rules: AlertRules | None) -> bool:
        """Process every due instant up to ``to_us``; returns whether the score moved."""
        rescored = False
        while True:
            score, outcome = self._next_score_us(bundle), self._next_outcome_us(bundle)
            if outcome is not None and outcome <= to_us and (score is None or outcome < score):
                out.outcomes += self.followups.mature(outcome - bundle.config.lateness_us)
                continue
            if score is None or score > to_us:
                return rescored
            self.as_of_us = score
            self.steps += 1
            self._step(bundle, out, rules, None)
            rescored = True

    def _step(self, bundle: ModelBundle, out: Outputs, rules: AlertRules | None,
              cause: Cause | None) -> None:
        """One processed instant: scores, then (with rules) alerts and their follow-ups."""
        since = len(out.transitions)
        self._evaluate(bundle, out)
        now = self.as_of_us
        assert now is not None
        out.outcomes += self.followups.mature(now - bundle.config.lateness_us)
        if rules is None:
            return
        alerted_before = set(self.alerts.fired)
        for alert in detect(self.alerts, rules, self._signals(bundle, cause),
                            out.transitions[since:], cause,
                            lambda: self.document(bundle, out)):
            out.alerts.append(alert)
            self.followups.follow(alert, rules.rule(alert.rule).outcome_us,
                                  first=alert.rule not in alerted_before)

    # -- scores ---------------------------------------------------------------------------

    def _facts(self, risk: float | None) -> Facts:
        s = self.state
        return Facts(s.purchase_count, s.first_purchase_us, s.last_purchase_us,
                     s.gap_mean_days(), risk)

    def _open_label(self, t: int, bundle: ModelBundle, out: Outputs) -> None:
        horizon = bundle.config.horizon_us
        example = mature_on_purchase(self.pending, t, horizon)
        if example is not None:
            out.labels.append(example)
        self.pending = self._open(t, bundle)

    def _features(self, t: int, bundle: ModelBundle) -> dict[str, float]:
        """Churn features at ``t``, stacked with BG/NBD's view under the current bundle."""
        features = churn_features(self.state, t)
        if bundle.btyd is not None:
            x, t_x, T = self._btyd_inputs(t)
            p = bgnbd_churn_prior(bundle.btyd.bgnbd, x, t_x, T, bundle.config.churn_horizon_days)
            p = min(max(p, 1e-6), 1 - 1e-6)
            features["bgnbd_logit"] = math.log(p / (1 - p))
        return features

    def _open(self, t: int, bundle: ModelBundle) -> PendingLabel:
        features = self._features(t, bundle)
        predictions = {name: m.predict_proba_one(features) for name, m in bundle.models.items()}
        return PendingLabel.open(features, t, predictions)

    def _evaluate(self, bundle: ModelBundle, out: Outputs) -> None:
        """Mature the label if the clock passed it, then recompute risk and stage."""
        now = self.as_of_us
        assert now is not None
        example = mature_on_clock(self.pending, now, bundle.config.horizon_us)
        if example is not None:
            out.labels.append(example)
            # A new prediction opens while the customer is silent: the models learn what
            # silence means (will someone quiet for 90 days buy in the next 90?).
            last = self.state.last_purchase_us
            silent_days = 0.0 if last is None else (now - last) / DAY_US
            self.pending = (self._open(now, bundle)
                            if silent_days < bundle.config.max_silence_days else None)
        self.risk, self.scored_by = self._churn_risk(bundle, now), bundle.version
        stage = lifecycle_stage(self._facts(self.risk), now, self.stage, bundle.rules)
        if self.stage is not None and stage.name != self.stage.name:
            out.transitions.append(Transition(self.customer_id, self.stage.name, stage.name, now))
        self.stage = stage

    def _churn_risk(self, bundle: ModelBundle, now: int) -> float | None:
        s = self.state
        if s.last_purchase_us is None:
            return None
        if bundle.champion is not None:
            pending = self.pending
            if pending is not None and pending.opened_at_us == now:
                risk = dict(pending.predictions).get(bundle.champion)
                if risk is not None:
                    return risk
            model = bundle.models[bundle.champion]
            if isinstance(model, BtydChurnModel) and s.first_purchase_us is not None:
                # The features it reads, as churn_features gives them at ``now`` (no event
                # is newer than as_of): building all 22 took as long as Pareto/NBD's
                # probability itself (~8 µs each), at every instant.
                return model.predict_summary(float(s.purchase_count),
                                             (now - s.first_purchase_us) / DAY_US,
                                             (now - s.last_purchase_us) / DAY_US)
            return model.predict_proba_one(self._features(now, bundle))
        if bundle.btyd is not None:
            x, t_x, T = self._btyd_inputs(now)
            return bgnbd_churn_prior(bundle.btyd.bgnbd, x, t_x, T,
                                     bundle.config.churn_horizon_days)
        return bundle.base_rate

    def _btyd_inputs(self, now: int) -> tuple[int, float, float]:
        s = self.state
        assert s.first_purchase_us is not None and s.last_purchase_us is not None
        t_x = (s.last_purchase_us - s.first_purchase_us) / DAY_US
        return s.purchase_count - 1, t_x, max((now - s.first_purchase_us) / DAY_US, t_x)

    def _value(self, bundle: ModelBundle) -> Value:
        """The customer's value at ``as_of``; remembered until the state, ``as_of`` or the
        bundle changes."""
        key = (self.as_of_us, self.state.version, id(bundle), bundle.version)
        if self.value_memo is not None and self.value_memo[0] == key:
            return self.value_memo[1]
        value = self._compute_value(bundle)
        self.value_memo = (key, value)
        return value

    def _compute_value(self, bundle: ModelBundle) -> Value:
        s, cfg, now = self.state, bundle.config, self.as_of_us
        assert now is not None
        net, gross = s.net_micros / MICROS, s.gross_micros / MICROS
        p_alive = expected = clv = None
        if bundle.btyd is not None and s.purchase_count > 0:
            x, t_x, T = self._btyd_inputs(now)
            spend_mean = max(s.gross_micros / s.purchase_count / MICROS, 0.0)
            p_alive, expected = (float(v) for v in bundle.btyd.alive_and_expected(
                cfg.clv_horizon_days, x, t_x, T, bundle.value_model))
            clv = expected * float(bundle.btyd.expected_spend(x, spend_mean))
        expected_total = None if clv is None else net + clv
        tier = value_tier(expected_total, bundle.premium_boundary, net, gross, cfg.value)
        return Value(p_alive, expected, clv, expected_total, tier)

    def _signals(self, bundle: ModelBundle, cause: Cause | None) -> Signals:
        """What the alert rules read at ``as_of``: the document's figures, without it."""
        s = self.state
        assert self.as_of_us is not None
        as_of = s.as_of(self.as_of_us)  # the document's
        refund_window = None
        if cause is not None and cause.is_refund:
            window = s.windows(as_of)[REFUND_WINDOW]
            refund_window = (window["spend"], window["refunds"])
        return Signals(s.customer_id, as_of, self.risk,
                       self._value(bundle).tier, s.purchase_count, s.gross_micros / MICROS,
                       s.currency, refund_window)

    def document(self, bundle: ModelBundle, out: Outputs) -> dict[str, Any]:
        """The score document at ``as_of`` (docs/design.md); records the population row."""
        s, cfg, now = self.state, bundle.config, self.as_of_us
        assert now is not None
        doc = s.document(now)
        doc["version"] = self.version
        net, gross = s.net_micros / MICROS, s.gross_micros / MICROS
        p_alive, expected, clv, expected_total, tier = self._value(bundle)
        rfm = doc["rfm"]
        stage = self.stage.name if self.stage is not None else PROSPECT
        segment = None
        if s.last_purchase_us is not None and bundle.boundaries is not None:
            cell = rfm_scores(rfm["recency_days"], rfm["frequency"], rfm["monetary"],
                              bundle.boundaries.at(now))
            segment = cell.segment
            rfm.update(cell._asdict())
        usual_gap = (expected_gap_days(self._facts(self.risk), bundle.rules)
                     if s.purchase_count else None)
        plan = strategy(stage, tier, segment, self.risk, recency_days=rfm["recency_days"],
                        usual_gap_days=usual_gap,
                        low_cause=low_value_cause(net, gross, expected_total, None, cfg.value),
                        premium_share=cfg.premium_share,
                        churn_horizon_days=round(cfg.churn_horizon_days))
        doc.update(
            churn_risk=self.risk, churn_horizon_days=cfg.churn_horizon_days,
            churn_risk_source=("model" if bundle.champion is not None else "prior"),
            p_alive=p_alive, expected_purchases=expected, clv_historic=net,
            clv_predicted=clv, clv_horizon_days=cfg.clv_horizon_days,
            lifecycle_stage=stage, value_tier=tier,
            strategy={"name": plan.name, "reason": plan.reason},
            model_version=bundle.model_version,
        )
        threshold = bundle.sample_threshold
        if s.first_purchase_us is not None and s.last_purchase_us is not None and (
                threshold is None or self.key_hash <= threshold):
            out.population.append(PopulationRow(
                self.key_hash, s.first_purchase_us, s.last_purchase_us, s.purchase_count,
                net, expected_total, now))
        out.doc = doc
        return doc


def _restore_customer(flat: tuple[Any, ...]) -> ScoredCustomer:
    """Inverse of :meth:`ScoredCustomer.__reduce__`."""
    (state, stage, pending, risk, as_of_us, steps, registered_us, key_hash, alerts,
     followups, *scored_by) = flat  # missing from snapshots taken before it
    customer = ScoredCustomer.__new__(ScoredCustomer)
    customer.state = CustomerState.__new__(CustomerState)
    customer.state.__setstate__(state)
    customer.stage = None if stage is None else Stage.from_flat(stage)
    customer.pending = None if pending is None else PendingLabel(*pending)
    customer.risk, customer.as_of_us, customer.steps = risk, as_of_us, steps
    # Snapshots from before the bundle version kept the model's name: rescored at once.
    customer.scored_by = scored_by[0] if scored_by and isinstance(scored_by[0], int) else None
    customer.registered_us, customer.key_hash = registered_us, key_hash
    customer.alerts = AlertMemory.__new__(AlertMemory)
    customer.alerts.__setstate__(alerts)
    customer.followups = FollowUps()
    customer.followups.items = [FollowUp(*f) for f in followups]
    customer.memo = customer.value_memo = None
    return customer
