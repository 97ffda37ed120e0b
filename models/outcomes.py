"""Outcomes of alerts in event time, and the uplift report: did acting on an alert pay?

Every alert, treated or holdout, opens a *follow-up* on its customer: a window
``(as_of, as_of + outcome_days]`` after the alert became known (the purchase that raised
it does not count). :meth:`FollowUps.on_purchase` credits every open window containing
the purchase; :meth:`FollowUps.mature` closes the windows whose deadline the customer's
watermark has passed and returns one :class:`Outcome` each: converted (bought at least
once) and spend (sum of purchases in the window, in micro-units; refunds are ignored).

:class:`UpliftReport` adds outcomes up per rule (a few integers per rule and group, so it
is small, picklable, and merges exactly across workers in any order) and reports, per
rule, treated against holdout:

- conversion uplift ``p_treated - p_holdout`` with Newcombe's hybrid score 95 % interval
  (from the two Wilson intervals: good coverage even for rare conversions);
- spend uplift, the difference of mean spend per alerted customer (zeros included), with
  Welch's 95 % interval (unequal variances, Welch-Satterthwaite degrees of freedom).

**Every alert, and first alerts.** Acting on an alert changes which alerts follow: a
treated customer who responds can go at risk again and be alerted again, a holdout one
cannot respond, so over *all* alerts the treated group gathers extra alerts of customers
whose natural buying is over, and the alert-level uplift underestimates the effect (the
closed-loop simulation in ``tests/test_closed_loop.py`` measured it at about half).
Each customer's *first* alert of a rule comes before any action on them, so treated and
holdout compare like for like there: ``first_alerts`` is the unbiased estimate (an
intention-to-treat comparison per customer); the all-alert figures show volume.

This is the brief's campaign analysis (response, ROI) with a control group, automated. A
*shadow* rule's alerts are not published, so nobody is treated: its treated and holdout
groups are both untreated (an A/A check whose uplift should straddle 0); what it shows is
how many alerts the challenger would send and how its customers convert unprompted.

>>> from models.transaction import DAY_US, MICROS
>>> f = FollowUps()
>>> f.open("a1", "lifecycle.at_risk", "live", False, opened_at_us=0, deadline_us=30 * DAY_US)
True
>>> f.on_purchase(25 * MICROS, at_us=10 * DAY_US), f.on_purchase(5 * MICROS, 40 * DAY_US)
(1, 0)
>>> [(o.converted, o.spend_micros / MICROS) for o in f.mature(watermark_us=31 * DAY_US)]
[(True, 25.0)]
>>> [round(x, 3) for x in newcombe_interval(120, 1000, 80, 1000)]  # 12 % vs 8 % converted
[0.014, 0.066]
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import TYPE_CHECKING, Any, NamedTuple

from scipy.special import stdtrit

from models.transaction import MICROS

if TYPE_CHECKING:
    from models.alerts import Alert

MAX_OPEN = 32  # open follow-ups per customer; more are not followed (see FollowUps.open)
Z95 = NormalDist().inv_cdf(0.975)


class FollowUp(NamedTuple):
    alert_id: str
    rule: str
    mode: str
    holdout: bool
    opened_at_us: int
    deadline_us: int
    purchases: int = 0
    spend_micros: int = 0
    first: bool = False  # the customer's first alert of this rule


class Outcome(NamedTuple):
    rule: str
    mode: str
    holdout: bool
    converted: bool
    spend_micros: int
    first: bool = False  # of the customer's first alert of this rule


class FollowUps:
    """A customer's open follow-ups. Picklable; at most :data:`MAX_OPEN` entries."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[FollowUp] = []

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.items,)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        (self.items,) = state

    def __len__(self) -> int:
        return len(self.items)

    def open(self, alert_id: str, rule: str, mode: str, holdout: bool, opened_at_us: int,
             deadline_us: int, first: bool = False) -> bool:
        """Follow an alert until ``deadline_us``. False when it is followed already, or
        when :data:`MAX_OPEN` are open (the flow counts those; with cooldowns of days
        a customer has a handful open at most)."""
        if len(self.items) >= MAX_OPEN or any(f.alert_id == alert_id for f in self.items):
            return False
        self.items.append(FollowUp(alert_id, rule, mode, holdout, opened_at_us, deadline_us,
                                   first=first))
        return True

    def follow(self, alert: Alert, window_us: int, first: bool = False) -> bool:
        """:meth:`open` for an alert, from its ``as_of`` for ``window_us`` (the rule's
        ``outcome_us``); ``first``: the customer's first alert of this rule."""
        return self.open(alert.alert_id, alert.rule, alert.mode, alert.holdout,
                         alert.as_of_us, alert.as_of_us + window_us, first)

    def on_purchase(self, amount_micros: int, at_us: int) -> int:
        """Credit a purchase to every follow-up whose window contains it; how many."""
        credited = 0
        for i, f in enumerate(self.items):
            if f.opened_at_us < at_us <= f.deadline_us:
                self.items[i] = f._replace(purchases=f.purchases + 1,
                                           spend_micros=f.spend_micros + amount_micros)
                credited += 1
        return credited

    def mature(self, watermark_us: int) -> list[Outcome]:
        """Close the follow-ups with ``deadline_us < watermark_us``; their outcomes.

        Pass the customer's clock minus the allowed lateness, so that a late purchase
        inside a window is still credited before the window closes.
        """
        done = [f for f in self.items if f.deadline_us < watermark_us]
        if done:
            self.items = [f for f in self.items if f.deadline_us >= watermark_us]
        return [Outcome(f.rule, f.mode, f.holdout, f.purchases > 0, f.spend_micros, f.first)
                for f in done]

    def next_deadline_us(self) -> int | None:
        """The earliest deadline: when the flow should wake the customer to mature it."""
        return min((f.deadline_us for f in self.items), default=None)


# -- statistics ----------------------------------------------------------------------------

def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (``n > 0``).

    >>> [round(x, 4) for x in wilson_interval(0, 10)]
    [0.0, 0.2775]
    """
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_interval(k1: int, n1: int, k2: int, n2: int,
                      z: float = Z95) -> tuple[float, float]:
    """Newcombe's hybrid score interval of ``k1/n1 - k2/n2`` (his method 10)."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, z)
    l2, u2 = wilson_interval(k2, n2, z)
    d = p1 - p2
    return (d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
            d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def welch_interval(n1: int, mean1: float, var1: float, n2: int, mean2: float, var2: float,
                   level: float = 0.95) -> tuple[float, float]:
    """Welch's interval of ``mean1 - mean2`` from sample variances (``n1, n2 >= 2``).

    >>> [round(x, 3) for x in welch_interval(10, 5.0, 4.0, 10, 3.0, 4.0)]
    [0.121, 3.879]
    """
    a, b = var1 / n1, var2 / n2
    d = mean1 - mean2
    se = math.sqrt(a + b)
    if se == 0:
        return d, d
    df = (a + b) ** 2 / (a * a / (n1 - 1) + b * b / (n2 - 1))
    half = float(stdtrit(df, 0.5 + level / 2)) * se
    return d - half, d + half


class Group:
    """Outcomes of one group (treated or holdout) of a rule, as exact integer sums."""

    __slots__ = ("n", "conversions", "spend", "spend_sq")

    def __init__(self) -> None:
        self.n = self.conversions = self.spend = self.spend_sq = 0  # spend in micro-units

    def __getstate__(self) -> tuple[int, int, int, int]:
        return self.n, self.conversions, self.spend, self.spend_sq

    def __setstate__(self, state: tuple[int, int, int, int]) -> None:
        self.n, self.conversions, self.spend, self.spend_sq = state

    def add(self, converted: bool, spend_micros: int) -> None:
        self.n += 1
        self.conversions += converted
        self.spend += spend_micros
        self.spend_sq += spend_micros * spend_micros

    def merge(self, other: Group) -> None:
        self.n += other.n
        self.conversions += other.conversions
        self.spend += other.spend
        self.spend_sq += other.spend_sq

    def mean(self) -> float:
        return self.spend / self.n / MICROS

    def variance(self) -> float:
        """Sample variance of spend per customer, in major units squared (exact sums)."""
        return (self.n * self.spend_sq - self.spend**2) / (self.n * (self.n - 1)) / MICROS**2

    def summary(self) -> dict[str, Any]:
        n = self.n
        return {"n": n, "conversions": self.conversions,
                "conversion_rate": self.conversions / n if n else None,
                "mean_spend": self.mean() if n else None}


def compare(t: Group, h: Group) -> dict[str, Any]:
    """Treated against holdout: both groups and the uplifts (None while undefined)."""
    conversion = spend = None
    if t.n and h.n:
        lo, hi = newcombe_interval(t.conversions, t.n, h.conversions, h.n)
        conversion = {"difference": t.conversions / t.n - h.conversions / h.n, "ci95": [lo, hi]}
    if t.n >= 2 and h.n >= 2:
        lo, hi = welch_interval(t.n, t.mean(), t.variance(), h.n, h.mean(), h.variance())
        spend = {"difference": t.mean() - h.mean(), "ci95": [lo, hi]}
    return {"treated": t.summary(), "holdout": h.summary(),
            "conversion_uplift": conversion, "spend_uplift": spend}


class RuleStats:
    """One rule's alerts and outcomes: of every alert, and of customers' first alerts."""

    __slots__ = ("mode", "alerts", "treated", "holdout", "first_treated", "first_holdout")

    def __init__(self, mode: str) -> None:
        self.mode = mode  # of the latest outcome or alert
        self.alerts = 0
        self.treated = Group()
        self.holdout = Group()
        self.first_treated = Group()
        self.first_holdout = Group()

    def __getstate__(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        for name, value in zip(self.__slots__, state, strict=True):
            setattr(self, name, value)

    def add(self, outcome: Outcome) -> None:
        group = self.holdout if outcome.holdout else self.treated
        group.add(outcome.converted, outcome.spend_micros)
        if outcome.first:
            group = self.first_holdout if outcome.holdout else self.first_treated
            group.add(outcome.converted, outcome.spend_micros)

    def merge(self, other: RuleStats) -> None:
        self.alerts += other.alerts
        for name in ("treated", "holdout", "first_treated", "first_holdout"):
            getattr(self, name).merge(getattr(other, name))

    def report(self, rule: str) -> dict[str, Any]:
        return {"kind": rule.partition("@")[0], "mode": self.mode, "alerts": self.alerts,
                **compare(self.treated, self.holdout),
                "first_alerts": compare(self.first_treated, self.first_holdout)}


class UpliftReport:
    """Alerts and outcomes per rule, for the whole population (or one worker's share).

    ``count_alert`` at each alert, ``add`` at each matured outcome; ``merge`` of the
    workers' reports is exact. Size: a few integers per rule.
    """

    __slots__ = ("rules",)

    def __init__(self) -> None:
        self.rules: dict[str, RuleStats] = {}

    def __getstate__(self) -> dict[str, RuleStats]:
        return self.rules

    def __setstate__(self, state: dict[str, RuleStats]) -> None:
        self.rules = state

    def _stats(self, rule: str, mode: str) -> RuleStats:
        stats = self.rules.get(rule)
        if stats is None:
            stats = self.rules[rule] = RuleStats(mode)
        stats.mode = mode
        return stats

    def count_alert(self, rule: str, mode: str) -> None:
        self._stats(rule, mode).alerts += 1

    def add(self, outcome: Outcome) -> None:
        self._stats(outcome.rule, outcome.mode).add(outcome)

    def merge(self, other: UpliftReport) -> UpliftReport:
        """A new report with the alerts and outcomes of both."""
        merged = UpliftReport()
        for report in (self, other):
            for rule, stats in report.rules.items():
                merged._stats(rule, stats.mode).merge(stats)
        return merged

    def report(self) -> dict[str, dict[str, Any]]:
        """Per rule: alerts, treated and holdout groups, uplifts with 95 % intervals
        (None while a group is empty, or has fewer than 2 outcomes for spend)."""
        return {rule: self.rules[rule].report(rule) for rule in sorted(self.rules)}
