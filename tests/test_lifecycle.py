"""Lifecycle stages: every rule and transition, and next_change_at as an event-time alarm."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.lifecycle import (
    ACTIVE,
    AT_RISK,
    CHURNED,
    NEW,
    PROSPECT,
    REACTIVATED,
    STAGES,
    Facts,
    LifecycleRules,
    Stage,
    expected_gap_days,
    lifecycle_stage,
    next_change_at,
)

DAY = 86_400_000_000
RULES = LifecycleRules()  # typical gap 30 d, weight 2, k1 = 2, k2 = 4, risk 0.7 / 0.9


def facts(count: int, first: float | None = None, last: float | None = None,
          gap: float | None = None, risk: float | None = None) -> Facts:
    """Facts with times in days."""
    return Facts(count, None if first is None else round(first * DAY),
                 None if last is None else round(last * DAY), gap, risk)


def stage(name: str, since: float = 0.0, purchases: int = 1, last: float | None = None,
          churn_at: float | None = None, risk_at: float | None = None) -> Stage:
    def us(days: float | None) -> int | None:
        return None if days is None else round(days * DAY)

    return Stage(name, round(since * DAY), purchases, us(last), us(risk_at), us(churn_at))


# A regular buyer: 5 purchases, days 0..40, mean gap 10 -> E = (4*10 + 2*30) / 6 = 16.67 days;
# at risk from day 73.33 (2 E), churned from day 106.67 (4 E); with risk >= 0.7 at risk from
# day 56.67 (E), with risk >= 0.9 churned from day 73.33.
def regular(risk: float | None = None) -> Facts:
    return facts(5, 0, 40, 10.0, risk)


def one_time(risk: float | None = None) -> Facts:
    """E = 30: at risk from day 60, churned from day 120."""
    return facts(1, 0, 0, None, risk)


CASES = [
    # (description, facts, clock in days, previous stage, expected stage)
    ("no events", facts(0), 5, None, PROSPECT),
    ("only refunds", facts(0), 5, stage(PROSPECT), PROSPECT),
    ("first purchase", one_time(), 0, stage(PROSPECT), NEW),
    ("one-time buyer stays new", one_time(), 59.9, stage(NEW), NEW),
    ("one-time buyer at risk after 2 x typical gap", one_time(), 60, stage(NEW), AT_RISK),
    ("one-time buyer churned after 4 x typical gap", one_time(), 120, None, CHURNED),
    ("high risk right after the first purchase stays new",
     one_time(0.95), 1, None, NEW),
    ("high risk past one usual gap", one_time(0.75), 30, stage(NEW), AT_RISK),
    ("very high risk past 2 gaps", one_time(0.95), 60, stage(AT_RISK), CHURNED),
    ("new within new_days", facts(3, 0, 10, 5.0), 12, stage(NEW), NEW),
    ("new_days over", facts(3, 0, 10, 5.0), 30, stage(NEW), ACTIVE),
    ("regular on rhythm", regular(), 45, None, ACTIVE),
    ("regular slowed", regular(), 73.4, stage(ACTIVE), AT_RISK),
    ("regular, risky but within a gap", regular(0.75), 50, None, ACTIVE),
    ("regular, risky past a gap", regular(0.75), 56.7, None, AT_RISK),
    ("regular gone", regular(), 106.7, stage(AT_RISK), CHURNED),
    ("regular, very risky past 2 gaps", regular(0.95), 73.4, None, CHURNED),
    ("churned stays churned when the risk drops",
     regular(0.1), 80, stage(CHURNED, 74, 5, 40), CHURNED),
    ("at risk recovers when the risk drops", regular(0.1), 60,
     stage(AT_RISK, 57, 5, 40), ACTIVE),
    ("at risk buys again", facts(6, 0, 100, 20.0), 100,
     stage(AT_RISK, 74, 5, 40, churn_at=106.67), ACTIVE),
    ("churned buys again", facts(6, 0, 200, 40.0), 200,
     stage(CHURNED, 107, 5, 40, churn_at=106.67), REACTIVATED),
    ("a purchase from before the churn instant, read after it, is no comeback",
     facts(6, 0, 100, 20.0), 110, stage(CHURNED, 107, 5, 40, churn_at=106.67), ACTIVE),
    ("churned, from a snapshot without the churn instant, buys again",
     facts(6, 0, 200, 40.0), 200, stage(CHURNED, 107, 5, 40), REACTIVATED),
    ("bought after the churn instant although nobody woke the customer",
     facts(6, 0, 150, 30.0), 150, stage(AT_RISK, 74, 5, 40, churn_at=106.67), REACTIVATED),
    ("reactivated shortly after", facts(7, 0, 230, 230 / 6), 240,
     stage(REACTIVATED, 200, 6, 200), REACTIVATED),
    ("reactivated until 2 more purchases", facts(8, 0, 240, 30.0), 241,
     stage(REACTIVATED, 200, 6, 230), ACTIVE),
    ("reactivated until 90 days", facts(7, 0, 280, 280 / 6), 290,
     stage(REACTIVATED, 200, 6, 280), ACTIVE),
    ("reactivated can be at risk again", facts(6, 0, 200, 40.0), 275,
     stage(REACTIVATED, 200, 6, 200), AT_RISK),
    ("reactivated ends if the customer was at risk before buying again, woken or not",
     facts(7, 0, 280, 40.0), 280, stage(REACTIVATED, 200, 6, 200, 348.57, 274.29), ACTIVE),
    ("reactivated after a short first life", facts(2, 0, 20, 20.0), 20,
     stage(CHURNED, 5, 1, 0, churn_at=4), REACTIVATED),
]


@pytest.mark.parametrize(("facts_", "clock", "previous", "expected"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_stage_rules(facts_: Facts, clock: float, previous: Stage | None, expected: str) -> None:
    got = lifecycle_stage(facts_, round(clock * DAY), previous, RULES)
    assert got.name == expected
    if previous is not None and previous.name == expected:
        assert got.since_us == previous.since_us  # an unchanged stage keeps its start


def test_every_stage_is_covered_by_the_table() -> None:
    assert {c[-1] for c in CASES} == set(STAGES)


def test_reactivation_starts_at_the_purchase_and_counts_it() -> None:
    got = lifecycle_stage(facts(6, 0, 200, 40.0), 201 * DAY, stage(CHURNED, 107, 5, 40))
    assert (got.name, got.since_us, got.purchases) == (REACTIVATED, 200 * DAY, 6)


@pytest.mark.parametrize(("count", "gap", "expected"), [
    (1, None, 30.0),  # no gap seen: the typical one
    (2, 10.0, (10 + 2 * 30) / 3),  # one gap: pulled hard towards 30
    (21, 10.0, (200 + 60) / 22),  # twenty gaps: close to their own 10
    (500, 0.01, 1.0),  # clamped to min_gap_days
    (3, 900.0, 365.0),  # clamped to max_gap_days
])
def test_expected_gap_shrinks_towards_the_typical_gap(count: int, gap: float | None,
                                                      expected: float) -> None:
    assert expected_gap_days(facts(count, 0, 10, gap), RULES) == pytest.approx(expected)


@pytest.mark.parametrize("bad", [
    dict(at_risk_gaps=3.0, churned_gaps=2.0), dict(at_risk_gaps=0.5),
    dict(at_risk_churn_risk=0.95, churned_churn_risk=0.9), dict(min_gap_days=0.0),
    dict(typical_gap_days=0.0),
])
def test_rules_are_validated(bad: dict) -> None:
    with pytest.raises(ValueError):
        LifecycleRules(**bad)


# ---- next_change_at ---------------------------------------------------------------------

@st.composite
def situations(draw: st.DrawFn) -> tuple[Facts, int, Stage | None, LifecycleRules]:
    count = draw(st.integers(0, 12))
    rules = LifecycleRules(
        typical_gap_days=draw(st.floats(1, 90)), prior_weight=draw(st.floats(0, 5)),
        at_risk_gaps=draw(st.floats(1, 3)), churned_gaps=draw(st.floats(3.01, 6)),
        new_days=draw(st.floats(0, 60)), new_max_purchases=draw(st.integers(0, 2)),
        reactivated_days=draw(st.floats(1, 120)), reactivated_purchases=draw(st.integers(1, 4)))
    risk = draw(st.none() | st.floats(0, 1))
    if count == 0:
        f = Facts(0, None, None, None, risk)
        last = 0
    else:
        first = draw(st.integers(0, 400 * DAY))
        last = first + (0 if count == 1 else draw(st.integers(0, 400 * DAY)))
        gap = None if count == 1 else (last - first) / (count - 1) / DAY
        f = Facts(count, first, last, gap, risk)
    as_of = last + draw(st.integers(0, 800 * DAY))
    previous = draw(st.none() | st.builds(
        Stage, st.sampled_from(STAGES), st.integers(0, as_of), st.integers(0, count),
        st.none() | st.integers(0, last), st.none() | st.integers(0, as_of + 400 * DAY),
        st.none() | st.integers(0, as_of + 400 * DAY)))
    return f, as_of, previous, rules


@settings(max_examples=400, deadline=None)
@given(situations(), st.lists(st.floats(0, 1), min_size=3, max_size=3))
def test_next_change_at_is_exactly_when_the_stage_changes(situation, fractions) -> None:
    f, as_of, previous, rules = situation
    current = lifecycle_stage(f, as_of, previous, rules)
    assert lifecycle_stage(f, as_of, current, rules) == current  # evaluating again: no change
    t = next_change_at(f, as_of, current, rules)
    if t is None:
        for later in (as_of + 1, as_of + 10 * 365 * DAY, as_of + 100 * 365 * DAY):
            assert lifecycle_stage(f, later, current, rules).name == current.name
        return
    assert t > as_of
    assert lifecycle_stage(f, t - 1, current, rules).name == current.name
    assert lifecycle_stage(f, t, current, rules).name != current.name
    for x in fractions:  # and nothing changes in between
        between = as_of + int(x * (t - 1 - as_of))
        assert lifecycle_stage(f, between, current, rules).name == current.name


def test_no_alarm_for_prospects_and_churned() -> None:
    s = lifecycle_stage(facts(0), 10 * DAY)
    assert next_change_at(facts(0), 10 * DAY, s) is None
    f = one_time()
    s = lifecycle_stage(f, 200 * DAY)
    assert s.name == CHURNED and next_change_at(f, 200 * DAY, s) is None


def test_alarms_walk_a_customer_through_every_stage() -> None:
    f = regular(0.2)
    s = lifecycle_stage(f, 45 * DAY)
    seen = [s.name]
    clock = 45 * DAY
    while (t := next_change_at(f, clock, s)) is not None:
        clock, s = t, lifecycle_stage(f, t, s)
        seen.append(s.name)
    assert seen == [ACTIVE, AT_RISK, CHURNED]
    assert clock == 40 * DAY + round(4 * (50 / 3) * DAY)


def simulate(purchases: list[int], end: int, policy: str, risk: float | None) -> list[str]:
    """Stage names at every day boundary and purchase (``daily``, ``alarms``) or at every
    purchase (``events``), when the stage is evaluated

    - ``daily``: at every day boundary and purchase (the reference);
    - ``alarms``: only at purchases and at the instants next_change_at asks for;
    - ``events``: only at purchases (nobody wakes the customer up).
    """
    bought = set(purchases)
    times: list[int] = []
    f = Facts(0, None, None, None, risk)
    s: Stage | None = None
    alarm: int | None = None
    out: list[str] = []

    def evaluate(clock: int) -> None:
        nonlocal s, alarm
        s = lifecycle_stage(f, clock, s)
        alarm = next_change_at(f, clock, s)

    for mark in sorted(bought | set(range(0, end, DAY))):
        while policy == "alarms" and alarm is not None and alarm <= mark:
            evaluate(alarm)
        if mark in bought:
            times.append(mark)
            gap = None if len(times) < 2 else (times[-1] - times[0]) / (len(times) - 1) / DAY
            f = Facts(len(times), times[0], times[-1], gap, risk)
            evaluate(mark)
        elif policy == "daily":
            evaluate(mark)
        if policy != "events" or mark in bought:
            out.append(PROSPECT if s is None else s.name)
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("risk", [None, 0.8, 0.95])
def test_alarms_give_the_same_stages_as_evaluating_every_day(seed: int, risk: float | None,
                                                             ) -> None:
    """Waking customers only at next_change_at reproduces a clock that ticks every day;
    without any wake-up, the stage at each purchase (e.g. a reactivation) is still the same."""
    rng = np.random.default_rng(seed)
    t, purchases = 0, []
    for _ in range(12):
        t += int(rng.exponential(25 * DAY) * (8 if rng.random() < 0.2 else 1)) + DAY // 3
        purchases.append(t)
    end = purchases[-1] + 400 * DAY
    daily = simulate(purchases, end, "daily", risk)
    assert simulate(purchases, end, "alarms", risk) == daily
    marks = sorted({*purchases, *range(0, end, DAY)})
    at_purchases = [name for mark, name in zip(marks, daily, strict=True) if mark in purchases]
    assert simulate(purchases, end, "events", risk) == at_purchases
    assert len(set(daily)) >= 4, set(daily)  # the walk is not trivial


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("risk", [None, 0.95])
@pytest.mark.parametrize("delay_days", [3, 7])
def test_a_purchase_read_late_gives_the_stage_of_reading_it_on_time(
        seed: int, risk: float | None, delay_days: int) -> None:
    """A purchase published late (within the lateness window) may be read after the
    customer's wake-ups up to the clock were processed, a churn among them: once read,
    the stage is the one of reading it on time."""
    rng = np.random.default_rng(seed)
    t, purchases = 0, []
    for _ in range(12):
        t += int(rng.exponential(25 * DAY) * (8 if rng.random() < 0.3 else 1)) + DAY // 3
        purchases.append(t)
    delay = delay_days * DAY

    def walk(reads: list[tuple[int, int]], end: int) -> str:
        """The stage at ``end`` when each purchase (event time) is read at its clock, every
        wake-up (next_change_at) up to each read and to ``end`` processed."""
        f = Facts(0, None, None, None, risk)
        s: Stage | None = None
        clock, times = 0, []
        for read_at, at in [*reads, (end, None)]:
            while s is not None and (alarm := next_change_at(f, clock, s)) is not None \
                    and alarm <= read_at:
                clock, s = alarm, lifecycle_stage(f, alarm, s)
            clock = read_at
            if at is not None:
                times = sorted([*times, at])
                gap = None if len(times) < 2 else (times[-1] - times[0]) / (len(times) - 1) / DAY
                f = Facts(len(times), times[0], times[-1], gap, risk)
            s = lifecycle_stage(f, clock, s)
        assert s is not None
        return s.name

    checked = 0
    for i in range(1, len(purchases)):
        if i + 1 < len(purchases) and purchases[i + 1] <= purchases[i] + delay:
            continue  # the next purchase comes before the late one is read: another case
        before = [(p, p) for p in purchases[:i]]
        end = purchases[i] + delay
        on_time = walk([*before, (purchases[i], purchases[i])], end)
        assert walk([*before, (end, purchases[i])], end) == on_time, i
        checked += 1
    assert checked >= 5


def test_a_stage_and_the_one_it_replaced_round_trip_as_builtins() -> None:
    churned = lifecycle_stage(regular(), 107 * DAY, stage(AT_RISK, 74, 5, 40))
    assert churned.name == CHURNED and churned.before is not None
    assert churned.before.name == AT_RISK and churned.before.before is None  # one level
    assert Stage.from_flat(churned.flat()) == churned
    older = tuple(stage(ACTIVE, 45, 5, 40))[:6]  # pickled before ``before`` existed
    assert Stage.from_flat(older) == stage(ACTIVE, 45, 5, 40)
