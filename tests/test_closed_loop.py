"""Closed loop: a campaign acts on alerts, customers respond, the uplift report sees it.

The per-customer code of the flow (:class:`models.scoring.ScoredCustomer` with the packaged
alert rules, its follow-ups, and :class:`models.outcomes.UpliftReport`) runs in process on
a simulated population whose campaign effect is known:

1. **Natural purchases**, generated up front: each customer buys as a Poisson process at
   their own rate from a random start until a latent end of life (exponential lifetime).
2. **One event-time loop** over a heap of purchases and wake-ups, as the flow delivers
   them: a purchase is applied at its instant, and a customer is woken at every due
   instant it registers (``register``; a stale wake-up does nothing).
3. **The campaign consumer** reads each alert. On a live ``lifecycle.at_risk`` alert that
   is not held out, the customer responds with probability ``q``: one extra purchase
   1 to 20 days after the alert's ``as_of``, inside its 30-day follow-up window. Holdout
   and shadow alerts get no action.
4. **The report** counts every alert and adds every matured outcome; the loop runs until
   nothing is due any more, so every follow-up has matured.

**The truth.** A treated alert converts if the customer's natural schedule has a purchase
in the window or the customer responded, so the campaign's effect on the treated alerts
is the share with a response and no natural purchase in the window. The holdout, a random
10 % of customers by hash, estimates the treated alerts' natural conversion, so the
report's treated-minus-holdout conversion uplift should cover that share. A rerun with
``q = 0`` (the same customers, nobody responds) is the negative control.

**What it found.** Acting on an alert changes which alerts follow: a customer who responds
goes at risk again later, and those extra alerts (mostly of customers whose natural life
is over) join the treated group only. The treated alerts' natural conversion falls below
the holdout's, and the report's alert-level uplift underestimates the effect (by 0.05 to
0.10 here). Each customer's *first* at-risk alert comes before any action, so on first
alerts treated and holdout compare like for like; that comparison recovers the truth, and
the report now gives it per rule (``first_alerts``).
"""

from __future__ import annotations

import bisect
import heapq
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from models.alert_rules import LIVE, load_rules
from models.alerts import Alert
from models.customer import APPLIED
from models.outcomes import UpliftReport, newcombe_interval
from models.scoring import EMPTY_BUNDLE, ModelBundle, Outputs, ScoredCustomer, ScoringConfig
from models.transaction import DAY_US, MICROS, Transaction

SEED = 1  # the first of seeds 1..6 tried: all detect the effect (see the assertions)
CUSTOMERS = 2000
HISTORY_DAYS = 730  # natural purchases happen within the first two years
RESPONSE_RATE = 0.3  # q: chance that a treated at-risk customer buys once more
RESPONSE_DAYS = (1.0, 20.0)  # the response comes this long after the alert's as_of
AT_RISK = "lifecycle.at_risk"
CONTROL_RULE = "lifecycle.churned"  # nobody acts on it: an A/A comparison

# With an empty bundle the churn risk is the constant base rate, so the periodic rescoring
# of silent customers and their churn labels change no alert and no outcome; skipping
# their wake-ups halves the run time (test_skipping_rescoring_wakeups_changes_no_alert).
BUNDLE = ModelBundle(config=ScoringConfig(refresh_days=(), max_silence_days=0.0))


# -- the population ------------------------------------------------------------------------

def natural_purchases(rng: np.random.Generator, customers: int
                      ) -> dict[str, list[tuple[int, int]]]:
    """Per customer, their natural (instant, amount) purchases in time order, in micro-units.

    Mean gap between purchases lognormal around 20 days (clipped to 5..60), lifetime
    exponential with a mean of a year, first purchase uniform in the first year, amounts
    lognormal around 30.
    """
    population = {}
    for i in range(customers):
        mean_gap = float(np.clip(rng.lognormal(np.log(20.0), 0.5), 5.0, 60.0))
        start = rng.uniform(0.0, 365.0)
        end = min(start + rng.exponential(365.0), HISTORY_DAYS)
        days = [start]
        while (day := days[-1] + rng.exponential(mean_gap)) < end:
            days.append(day)
        amounts = rng.lognormal(np.log(30.0), 0.6, size=len(days))
        population[f"c{i:05d}"] = [(round(d * DAY_US), round(a * MICROS))
                                   for d, a in zip(days, amounts, strict=True)]
    return population


def bought_within(instants: list[int], after_us: int, until_us: int) -> bool:
    """Whether the sorted ``instants`` have one in ``(after_us, until_us]``."""
    i = bisect.bisect_right(instants, after_us)
    return i < len(instants) and instants[i] <= until_us


def purchase(customer_id: str, event_id: str, at_us: int, amount_micros: int) -> Transaction:
    return Transaction(event_id, customer_id, at_us, False, amount_micros, "EUR",
                       event_id.encode())


# -- the event-time loop -------------------------------------------------------------------

@dataclass
class EventQueue:
    """Purchases (a transaction) and wake-ups (None) in event-time order."""

    heap: list[tuple[int, int, str, Transaction | None]] = field(default_factory=list)
    pushed: int = 0  # breaks ties: first pushed, first out

    def push(self, at_us: int, customer_id: str, tx: Transaction | None = None) -> None:
        heapq.heappush(self.heap, (at_us, self.pushed, customer_id, tx))
        self.pushed += 1

    def pop(self) -> tuple[int, str, Transaction | None]:
        at_us, _, customer_id, tx = heapq.heappop(self.heap)
        return at_us, customer_id, tx

    def __len__(self) -> int:
        return len(self.heap)


@dataclass(frozen=True)
class AtRiskAlert:
    """A live at-risk alert and what the simulation knows about its follow-up window."""

    customer_id: str
    holdout: bool
    first: bool  # the customer's first at-risk alert: nobody acted on them before it
    natural: bool  # their natural schedule has a purchase in the window
    responded: bool  # the campaign made them buy once more (inside the window)

    @property
    def converted(self) -> bool:
        return self.natural or self.responded

    @property
    def effect(self) -> bool:
        """Converted because of the campaign only."""
        return self.responded and not self.natural


@dataclass
class ClosedLoop:
    """What one simulation produced."""

    report: UpliftReport = field(default_factory=UpliftReport)
    at_risk: list[AtRiskAlert] = field(default_factory=list)
    alert_ids: list[str] = field(default_factory=list)
    events: int = 0
    wakes: int = 0  # that had something due
    open_followups: int = 0  # at the end: must be 0

    def alerts(self, holdout: bool, first_only: bool = False) -> list[AtRiskAlert]:
        return [a for a in self.at_risk
                if a.holdout == holdout and (a.first or not first_only)]


def is_treated(alert: Alert) -> bool:
    """What the campaign consumer acts on: live at-risk alerts outside the holdout."""
    return alert.rule == AT_RISK and alert.mode == LIVE and not alert.holdout


def simulate(seed: int, response_rate: float, customers: int = CUSTOMERS,
             bundle: ModelBundle = BUNDLE) -> ClosedLoop:
    natural = natural_purchases(np.random.default_rng(seed), customers)
    campaign = np.random.default_rng([seed, 1])  # the responses, independent of the above
    natural_instants = {cid: [t for t, _ in bought] for cid, bought in natural.items()}
    rules = load_rules(None)
    window_us = rules.rule(AT_RISK).outcome_us
    scored = {cid: ScoredCustomer(cid) for cid in natural}
    queue = EventQueue()
    for cid, bought in natural.items():
        for i, (at_us, amount) in enumerate(bought):
            queue.push(at_us, cid, purchase(cid, f"{cid}/{i}", at_us, amount))
    loop = ClosedLoop()
    alerted: set[str] = set()  # customers with an at-risk alert so far

    def follow_at_risk(alert: Alert) -> None:
        """Record the alert's truth; the campaign consumer acts on a treated one."""
        cid, as_of = alert.customer_id, alert.as_of_us
        responded = is_treated(alert) and bool(campaign.random() < response_rate)
        if responded:
            at_us = as_of + round(campaign.uniform(*RESPONSE_DAYS) * DAY_US)
            amount = round(campaign.lognormal(np.log(30.0), 0.6) * MICROS)
            # Natural ids are "<customer>/<n>"; a response is named after its alert.
            queue.push(at_us, cid, purchase(cid, f"{cid}/response/{alert.alert_id}", at_us,
                                            amount))
        natural_hit = bought_within(natural_instants[cid], as_of, as_of + window_us)
        loop.at_risk.append(AtRiskAlert(cid, alert.holdout, cid not in alerted, natural_hit,
                                        responded))
        alerted.add(cid)

    while queue:
        at_us, cid, tx = queue.pop()
        customer, out = scored[cid], Outputs()
        if tx is None:
            loop.wakes += customer.wake(at_us, bundle, out, rules)
        else:
            assert customer.apply(tx, bundle, out, rules) == APPLIED, tx
            loop.events += 1
        customer.register(bundle, out)
        for _, due in out.registrations:
            queue.push(due, cid)
        for alert in out.alerts:
            loop.report.count_alert(alert.rule, alert.mode)
            loop.alert_ids.append(alert.alert_id)
            if alert.rule == AT_RISK and alert.mode == LIVE:
                follow_at_risk(alert)
        for outcome in out.outcomes:
            loop.report.add(outcome)
    loop.open_followups = sum(len(c.followups) for c in scored.values())
    return loop


# -- estimates -----------------------------------------------------------------------------

def true_uplift(loop: ClosedLoop, first_only: bool = False) -> float:
    """The campaign's effect on the conversion of the treated alerts."""
    return float(np.mean([a.effect for a in loop.alerts(False, first_only)]))


def first_alert_uplift(loop: ClosedLoop) -> tuple[float, float, float]:
    """Treated minus holdout conversion on first at-risk alerts: (difference, lo, hi)."""
    treated, holdout = loop.alerts(False, True), loop.alerts(True, True)
    k1, n1 = sum(a.converted for a in treated), len(treated)
    k2, n2 = sum(a.converted for a in holdout), len(holdout)
    lo, hi = newcombe_interval(k1, n1, k2, n2)
    return k1 / n1 - k2 / n2, lo, hi


def describe(name: str, row: dict[str, Any]) -> str:
    t, h, up = row["treated"], row["holdout"], row["conversion_uplift"]
    lo, hi = up["ci95"]
    return (f"{name}: alerts {row['alerts']}, treated n={t['n']} rate="
            f"{t['conversion_rate']:.3f}, holdout n={h['n']} rate={h['conversion_rate']:.3f}, "
            f"uplift {up['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]")


@pytest.fixture(scope="module")
def runs() -> tuple[ClosedLoop, ClosedLoop]:
    """The campaign (q = 0.3) and the negative control (q = 0), on the same customers."""
    start = time.perf_counter()
    campaign, control = simulate(SEED, RESPONSE_RATE), simulate(SEED, 0.0)
    print(f"\n{CUSTOMERS} customers, {campaign.events} purchases "
          f"({sum(a.responded for a in campaign.at_risk)} responses), {campaign.wakes} "
          f"wake-ups; both runs {time.perf_counter() - start:.1f} s")
    return campaign, control


# -- the tests -----------------------------------------------------------------------------

@pytest.mark.slow
def test_the_closed_loop_detects_a_known_campaign_effect(
        runs: tuple[ClosedLoop, ClosedLoop]) -> None:
    campaign, control = runs
    report, control_report = campaign.report.report(), control.report.report()
    at_risk = report[AT_RISK]
    treated, holdout = campaign.alerts(False), campaign.alerts(True)
    holdout_share = len(holdout) / len(campaign.at_risk)
    first, (diff, lo, hi) = true_uplift(campaign, True), first_alert_uplift(campaign)
    print(describe(f"q={RESPONSE_RATE} {AT_RISK}", at_risk))
    print(f"  true uplift {true_uplift(campaign):+.3f}; natural conversion: treated "
          f"{np.mean([a.natural for a in treated]):.3f}, holdout "
          f"{np.mean([a.natural for a in holdout]):.3f}; holdout share {holdout_share:.3f}")
    print(f"  first alerts: treated n={len(campaign.alerts(False, True))}, holdout "
          f"n={len(campaign.alerts(True, True))}, uplift {diff:+.3f} [{lo:+.3f}, {hi:+.3f}], "
          f"true uplift {first:+.3f}")
    print(describe(f"q=0 {AT_RISK}", control_report[AT_RISK]))
    print(describe(f"q={RESPONSE_RATE} {CONTROL_RULE}", report[CONTROL_RULE]))

    # Every alert was followed up to the end, and the outcomes are the simulated ones.
    assert campaign.open_followups == 0 and control.open_followups == 0
    assert at_risk["alerts"] == len(campaign.at_risk)
    for group, alerts in (("treated", treated), ("holdout", holdout)):
        assert at_risk[group]["n"] == len(alerts)
        assert at_risk[group]["conversions"] == sum(a.converted for a in alerts)
    assert len(holdout) >= 150 and len(campaign.alerts(True, True)) >= 100
    assert 0.06 <= holdout_share <= 0.14
    # The effect is detected, and the report's like-for-like comparison (customers' first
    # alerts) recovers it.
    assert at_risk["conversion_uplift"]["ci95"][0] > 0
    first_alerts = at_risk["first_alerts"]
    assert first_alerts["treated"]["n"] == len(campaign.alerts(False, True))
    assert first_alerts["holdout"]["n"] == len(campaign.alerts(True, True))
    assert first_alerts["conversion_uplift"]["difference"] == pytest.approx(diff)
    assert first_alerts["conversion_uplift"]["ci95"] == pytest.approx([lo, hi])
    assert lo > 0 and lo <= first <= hi, (first, lo, hi)
    # Negative controls: nobody responds; nobody acts on churned alerts.
    for row in (control_report[AT_RISK], report[CONTROL_RULE]):
        lo, hi = row["conversion_uplift"]["ci95"]
        assert lo <= 0 <= hi, row


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="alert-level uplift is biased when acting on an alert "
                   "brings more alerts of the treated customers (see the module docstring)")
def test_the_report_covers_the_true_uplift_of_all_alerts(
        runs: tuple[ClosedLoop, ClosedLoop]) -> None:
    campaign, _ = runs
    truth = true_uplift(campaign)
    lo, hi = campaign.report.report()[AT_RISK]["conversion_uplift"]["ci95"]
    assert lo <= truth <= hi, (truth, lo, hi)


@pytest.mark.slow
def test_skipping_rescoring_wakeups_changes_no_alert() -> None:
    fast, full = simulate(SEED, RESPONSE_RATE, 120), simulate(SEED, RESPONSE_RATE, 120,
                                                                EMPTY_BUNDLE)
    assert fast.wakes < full.wakes
    assert fast.alert_ids == full.alert_ids and fast.at_risk == full.at_risk
    assert fast.report.report() == full.report.report()
