"""Lifecycle stage: prospect, new, active, at_risk, churned or reactivated, in event time.

The stage follows each customer's own purchase rhythm. Their *expected gap* between
purchases is the mean of their ``n`` observed gaps shrunk towards the population's
typical gap ``g0`` with the weight of ``w`` pseudo-gaps, then clamped::

    E = clamp((n * mean_gap + w * g0) / (n + w), min_gap_days, max_gap_days)

so a customer with one purchase is expected back after ``g0``, and one with 20 regular
purchases after roughly their own mean. With ``L`` the last purchase, ``F`` the first,
``t`` the clock, ``risk`` the churn model's probability of no purchase within its
horizon (None when unknown), the rules, first match wins (defaults in brackets):

=============  ===============================================================================
stage          when
=============  ===============================================================================
prospect       no purchase yet (no events, or only refunds)
churned        ``t >= L + k2 E`` [k2 = 4]; or ``risk >= churned_churn_risk`` [0.9] and
               ``t >= L + k1 E``; and it stays churned until the customer buys again
at_risk        ``t >= L + k1 E`` [k1 = 2]; or ``risk >= at_risk_churn_risk`` [0.7] and
               ``t >= L + E``
reactivated    bought again after being churned: the purchase came after the churn instant
               ``churn_at_us`` recorded in the previous stage (or after the previous stage
               became ``churned``), so a late wake-up changes nothing and a purchase from
               before it, read late, is no comeback; lasts ``reactivated_days`` [90] from
               that purchase, until ``reactivated_purchases`` [2] more purchases or until
               at risk, then active
new            at most ``new_max_purchases`` [1] purchases, or first purchase within
               ``new_days`` [30] (``t < F + new_days``)
active         any other buyer
=============  ===============================================================================

The churn model can move a customer one stage earlier than the rhythm alone, but never
right after a purchase (a one-time buyer's high churn risk does not make a new customer
"at risk" the day they buy).

*Event time.* ``t`` is the stream's clock, not the wall clock nor the customer's last
event. All instants are integer microseconds and every rule is a ``t >= instant``
comparison, so the stage is constant between the instants :func:`next_change_at`
returns (taking the churn risk as it is): a scheduler wakes the customer exactly then.
Each :class:`Stage` also remembers when the customer would turn at risk and churned, so a
purchase that arrives before a due wake-up was processed still yields the same stage
(e.g. ``reactivated``): replaying at full speed gives the stages of a live run. And it
remembers the stage it replaced: a purchase published late, read after a wake-up that
changed the stage (a churn, say) but made before it, is judged against the stage that
held when it was made, so it is no "comeback" and the stage is the one of reading it in
time (the alerts of the change are out by then: a stream does not take them back).

:func:`lifecycle_stage` is pure: the customer's facts, the clock and the previous
:class:`Stage` in, the new :class:`Stage` out (the previous one when nothing changed).

>>> from models.quantiles import DAY_US
>>> rules = LifecycleRules()
>>> facts = Facts(purchase_count=5, first_purchase_us=0, last_purchase_us=40 * DAY_US,
...               gap_mean_days=10.0, churn_risk=0.2)
>>> round(expected_gap_days(facts, rules), 2)  # 4 gaps of 10 days, 2 pseudo-gaps of 30
16.67
>>> s = lifecycle_stage(facts, as_of_us=45 * DAY_US)
>>> s.name, next_change_at(facts, 45 * DAY_US, s) / DAY_US  # at_risk after 2 x 16.67 days
('active', 73.33333333333333)
>>> s = lifecycle_stage(facts, 80 * DAY_US, s); s.name
'at_risk'
>>> s = lifecycle_stage(facts, 120 * DAY_US, s); s.name
'churned'
>>> back = facts._replace(purchase_count=6, last_purchase_us=121 * DAY_US, gap_mean_days=24.2)
>>> lifecycle_stage(back, 121 * DAY_US, s).name
'reactivated'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

DAY_US = 86_400_000_000

PROSPECT = "prospect"
NEW = "new"
ACTIVE = "active"
AT_RISK = "at_risk"
CHURNED = "churned"
REACTIVATED = "reactivated"
STAGES = (PROSPECT, NEW, ACTIVE, AT_RISK, CHURNED, REACTIVATED)


@dataclass(frozen=True, slots=True)
class LifecycleRules:
    """Thresholds of the stage rules (see the module docstring).

    ``typical_gap_days`` is the population's typical gap between purchases; refresh it
    from the population (e.g. the median of customers' mean gaps) with
    ``dataclasses.replace``.
    """

    typical_gap_days: float = 30.0
    prior_weight: float = 2.0  # pseudo-gaps: how strongly few gaps are pulled to the typical one
    min_gap_days: float = 1.0
    max_gap_days: float = 365.0
    at_risk_gaps: float = 2.0  # k1
    churned_gaps: float = 4.0  # k2
    at_risk_churn_risk: float = 0.7
    churned_churn_risk: float = 0.9
    new_days: float = 30.0
    new_max_purchases: int = 1
    reactivated_days: float = 90.0
    reactivated_purchases: int = 2
    # derived, in microseconds (set in __post_init__)
    new_us: int = field(init=False, repr=False, compare=False)
    reactivated_us: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "new_us", round(self.new_days * DAY_US))
        object.__setattr__(self, "reactivated_us", round(self.reactivated_days * DAY_US))
        if not 0 < self.min_gap_days <= self.max_gap_days:
            raise ValueError(f"need 0 < min_gap_days <= max_gap_days, got {self}")
        if not 1.0 <= self.at_risk_gaps < self.churned_gaps:
            raise ValueError(f"need 1 <= at_risk_gaps < churned_gaps, got {self}")
        if not 0.0 <= self.at_risk_churn_risk <= self.churned_churn_risk <= 1.0:
            raise ValueError(f"need 0 <= at_risk_churn_risk <= churned_churn_risk <= 1, got {self}")
        if self.typical_gap_days <= 0 or self.prior_weight < 0:
            raise ValueError(f"need typical_gap_days > 0 and prior_weight >= 0, got {self}")


DEFAULT_RULES = LifecycleRules()


class Facts(NamedTuple):
    """What the stage depends on, from the customer's state (models/customer.py)."""

    purchase_count: int
    first_purchase_us: int | None
    last_purchase_us: int | None
    gap_mean_days: float | None  # None with fewer than 2 purchases
    churn_risk: float | None = None


class Stage(NamedTuple):
    """A customer's stage and what the next evaluation needs to remember.

    ``since_us``: the clock at which the change was observed (the reactivating purchase
    for ``reactivated``); ``purchases``: the purchase count then; ``last_purchase_us``,
    ``risk_at_us`` and ``churn_at_us`` (when the customer would be at risk, churned, if they
    did not buy): as of the latest evaluation. The two instants let a purchase tell what
    the customer had become before it, even if no wake-up was processed in between.
    ``before``: the stage this one replaced, so that a purchase read after the change
    but made before it is judged against the stage that held when it was made.
    """

    name: str
    since_us: int
    purchases: int
    last_purchase_us: int | None
    risk_at_us: int | None
    churn_at_us: int | None
    before: Stage | None = None  # the stage this one replaced (one level: no older ones)

    def flat(self) -> tuple[Any, ...]:
        """Builtins only, for pickling (:meth:`from_flat` is the inverse)."""
        before = None if self.before is None else tuple(self.before[:6])
        return (*self[:6], before)

    @classmethod
    def from_flat(cls, flat: tuple[Any, ...]) -> Stage:
        name, since, purchases, last, risk_at, churn_at, *rest = flat  # older: no before
        before = rest[0] if rest else None
        return cls(name, since, purchases, last, risk_at, churn_at,
                   None if before is None else cls(*before))


def expected_gap_days(facts: Facts, rules: LifecycleRules = DEFAULT_RULES) -> float:
    """The customer's expected gap between purchases, in days (see the module docstring)."""
    g0 = rules.typical_gap_days
    n = facts.purchase_count - 1
    if n < 1 or facts.gap_mean_days is None:
        gap = g0
    else:
        gap = (n * facts.gap_mean_days + rules.prior_weight * g0) / (n + rules.prior_weight)
    return min(max(gap, rules.min_gap_days), rules.max_gap_days)


def _instants(facts: Facts, rules: LifecycleRules) -> tuple[int, int, int]:
    """(one gap, at risk, churned) instants after the last purchase, given the churn risk."""
    last = facts.last_purchase_us
    assert last is not None
    gap_us = expected_gap_days(facts, rules) * DAY_US
    gap_at = last + round(gap_us)
    risk_at = last + round(rules.at_risk_gaps * gap_us)
    risk = facts.churn_risk
    if risk is None or risk < rules.at_risk_churn_risk:
        return gap_at, risk_at, last + round(rules.churned_gaps * gap_us)
    if risk < rules.churned_churn_risk:
        return gap_at, gap_at, last + round(rules.churned_gaps * gap_us)
    return gap_at, gap_at, risk_at


def _name(facts: Facts, t: int, previous: Stage | None, rules: LifecycleRules,
          risk_at: int, churn_at: int) -> str:
    """The stage's name at ``t`` for a buyer (the rules table, in order)."""
    count, first, last, _, _ = facts
    assert last is not None
    if previous is None:
        if t >= churn_at:
            return CHURNED
        if t >= risk_at:
            return AT_RISK
    else:
        p_name, p_since, p_purchases, p_last, p_risk_at, p_churn_at, _ = previous
        bought = p_last is None or last > p_last
        if t >= churn_at or (p_name == CHURNED and not bought):
            return CHURNED
        if t >= risk_at:
            return AT_RISK
        # The instant the customer churned (or would have, had nobody woken them): a
        # purchase from before it, read late, is no comeback.
        churned_at = p_churn_at
        if p_name == CHURNED:
            churned_at = p_since if p_churn_at is None else min(p_since, p_churn_at)
        if bought and churned_at is not None and last >= churned_at:
            if t < last + rules.reactivated_us:
                return REACTIVATED
        elif (p_name == REACTIVATED
                and not (bought and p_risk_at is not None and last >= p_risk_at)
                and t < p_since + rules.reactivated_us
                and count - p_purchases < rules.reactivated_purchases):
            return REACTIVATED
    if count <= rules.new_max_purchases or (first is not None and t < first + rules.new_us):
        return NEW
    return ACTIVE


def lifecycle_stage(facts: Facts, as_of_us: int, previous: Stage | None = None,
                    rules: LifecycleRules = DEFAULT_RULES) -> Stage:
    """The customer's stage at the clock ``as_of_us``, given their previous stage."""
    last = facts.last_purchase_us
    if facts.purchase_count < 1 or last is None:
        if previous is not None and previous.name == PROSPECT:
            return previous
        return Stage(PROSPECT, as_of_us, 0, None, None, None)
    if (previous is not None and previous.before is not None
            and previous.last_purchase_us is not None
            and previous.last_purchase_us < last < previous.since_us):
        # A purchase made before the last change, read after it (published late): the
        # change may not have happened, had it been read in time.
        previous = previous.before
    _, risk_at, churn_at = _instants(facts, rules)
    name = _name(facts, as_of_us, previous, rules, risk_at, churn_at)
    if previous is not None and previous.name == name and (
            name != REACTIVATED or last == previous.last_purchase_us
            or previous.churn_at_us is None or last < previous.churn_at_us):
        if (previous.last_purchase_us == last and previous.risk_at_us == risk_at
                and previous.churn_at_us == churn_at):
            return previous
        return previous._replace(last_purchase_us=last, risk_at_us=risk_at, churn_at_us=churn_at)
    before = None if previous is None else previous._replace(before=None)
    if name == REACTIVATED:  # starts at the purchase that brought the customer back
        return Stage(name, last, facts.purchase_count, last, risk_at, churn_at, before)
    return Stage(name, as_of_us, facts.purchase_count, last, risk_at, churn_at, before)


def next_change_at(facts: Facts, as_of_us: int, stage: Stage,
                   rules: LifecycleRules = DEFAULT_RULES) -> int | None:
    """The earliest instant after ``as_of_us`` at which ``stage`` changes if no event arrives.

    ``stage`` is the result of :func:`lifecycle_stage` at ``as_of_us`` for ``facts``; the
    churn risk is taken as constant (a rescoring with a new risk gives a new answer).
    None when only an event can change the stage (prospect, churned).
    """
    if facts.last_purchase_us is None or facts.purchase_count < 1 or stage.name == CHURNED:
        return None
    gap_at, risk_at, churn_at = _instants(facts, rules)
    candidates = [gap_at, risk_at, churn_at]
    if facts.first_purchase_us is not None:
        candidates.append(facts.first_purchase_us + rules.new_us)
    if stage.name == REACTIVATED:
        candidates.append(stage.since_us + rules.reactivated_us)
    candidates.sort()
    for t in candidates:
        if t > as_of_us and _name(facts, t, stage, rules, risk_at, churn_at) != stage.name:
            return t
    return None
