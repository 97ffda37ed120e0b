"""Alert rules: which kinds exist, their thresholds, and the versioned TOML file they live in.

:func:`load_rules` reads the file (None: the packaged ``crmscore/alert_rules.toml``) into
frozen :class:`AlertRules`; any bad value or unknown key raises :class:`AlertRulesError`
naming the entry, e.g. ``kinds.churn_risk.high.threshold: must be in (0, 1], got 1.5``.
What each kind means and when it fires: :mod:`models.alerts`.

>>> rules = load_rules(None)
>>> rules.rule("churn_risk.high").threshold, rules.rule("churn_risk.high@shadow_0.6").mode
(0.7, 'shadow')
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from models.lifecycle import ACTIVE, AT_RISK, CHURNED, REACTIVATED
from models.transaction import DAY_US

LIFECYCLE_KINDS = {ACTIVE: "lifecycle.active", AT_RISK: "lifecycle.at_risk",
                   CHURNED: "lifecycle.churned", REACTIVATED: "lifecycle.reactivated"}
CHURN_RISK_HIGH = "churn_risk.high"
PREMIUM_ENTERED = "value.premium_entered"
PREMIUM_LEFT = "value.premium_left"
PURCHASE_LARGE = "purchase.large"
REFUND_SPIKE = "refund.spike"
KINDS = (*LIFECYCLE_KINDS.values(), CHURN_RISK_HIGH, PREMIUM_ENTERED, PREMIUM_LEFT,
         PURCHASE_LARGE, REFUND_SPIKE)
LIVE, SHADOW, OFF = "live", "shadow", "off"
MODES = (LIVE, SHADOW, OFF)
REFUND_WINDOW = "30d"  # a window of the score document (models/customer.py)
REFUND_WINDOW_US = 30 * DAY_US
MAX_REFUNDS_KEPT = 16  # refund instants remembered per customer (bounds min_refunds)

COMMON_KEYS = ("mode", "cooldown_days", "holdout_share", "outcome_days")
KIND_KEYS: dict[str, tuple[str, ...]] = {
    CHURN_RISK_HIGH: ("threshold", "rearm_margin", "min_purchases"),
    PURCHASE_LARGE: ("factor", "min_prior_purchases", "min_amount"),
    REFUND_SPIKE: ("min_share", "min_refunds"),
}
_VARIANT = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class AlertRulesError(ValueError):
    """An invalid rules file or rule; ``entry`` names the bad entry (``kinds.x.y.key``)."""

    def __init__(self, entry: str, problem: str, source: str | None = None) -> None:
        self.entry, self.problem, self.source = entry, problem, source
        text = f"{entry}: {problem}"
        super().__init__(text if source is None else f"alert rules {source}: {text}")

    def within(self, prefix: str, source: str | None = None) -> AlertRulesError:
        return AlertRulesError(prefix + self.entry, self.problem, source)


def _require(ok: bool, entry: str, problem: str, value: object) -> None:
    if not ok:
        raise AlertRulesError(entry, f"{problem}, got {value!r}")


@dataclass(frozen=True, slots=True)
class Rule:
    """One alert rule: a kind, or a variant ``kind@name`` of it, with its settings."""

    name: str
    kind: str
    mode: str = LIVE
    cooldown_days: float = 30.0
    holdout_share: float = 0.1
    outcome_days: float = 30.0
    threshold: float = 0.7  # churn_risk.high
    rearm_margin: float = 0.1
    min_purchases: int = 2
    factor: float = 3.0  # purchase.large
    min_prior_purchases: int = 3
    min_amount: float = 50.0
    min_share: float = 0.5  # refund.spike
    min_refunds: int = 2
    cooldown_us: int = field(init=False, repr=False, compare=False)
    outcome_us: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        kind, at, variant = self.name.partition("@")
        _require(self.kind in KINDS, "kind", f"must be one of {', '.join(KINDS)}", self.kind)
        _require(kind == self.kind and (not at or _VARIANT.fullmatch(variant) is not None),
                 "name", f"must be {self.kind} or {self.kind}@<variant> ([A-Za-z0-9_.-])",
                 self.name)
        _require(self.mode in MODES, "mode", f"must be one of {', '.join(MODES)}", self.mode)
        for key in ("cooldown_days", "holdout_share", "outcome_days", "threshold",
                    "rearm_margin", "factor", "min_amount", "min_share"):
            value = getattr(self, key)
            _require(math.isfinite(value), key, "must be a finite number", value)
        _require(0 <= self.cooldown_days <= 3650, "cooldown_days", "must be in [0, 3650]",
                 self.cooldown_days)
        _require(0 <= self.holdout_share < 1, "holdout_share", "must be in [0, 1)",
                 self.holdout_share)
        _require(0 < self.outcome_days <= 365, "outcome_days", "must be in (0, 365]",
                 self.outcome_days)
        _require(0 < self.threshold <= 1, "threshold", "must be in (0, 1]", self.threshold)
        _require(0 <= self.rearm_margin <= self.threshold, "rearm_margin",
                 f"must be in [0, threshold={self.threshold}]", self.rearm_margin)
        _require(self.min_purchases >= 1, "min_purchases", "must be >= 1", self.min_purchases)
        _require(self.factor > 1, "factor", "must be > 1", self.factor)
        _require(self.min_prior_purchases >= 1, "min_prior_purchases", "must be >= 1",
                 self.min_prior_purchases)
        _require(self.min_amount >= 0, "min_amount", "must be >= 0", self.min_amount)
        _require(self.min_share > 0, "min_share", "must be > 0", self.min_share)
        _require(1 <= self.min_refunds <= MAX_REFUNDS_KEPT, "min_refunds",
                 f"must be in [1, {MAX_REFUNDS_KEPT}]", self.min_refunds)
        object.__setattr__(self, "cooldown_us", round(self.cooldown_days * DAY_US))
        object.__setattr__(self, "outcome_us", round(self.outcome_days * DAY_US))

    @property
    def rearm_below(self) -> float:
        return self.threshold - self.rearm_margin


@dataclass(frozen=True, slots=True)
class AlertRules:
    """A versioned set of rules, at most one live per kind; ``off`` rules are dropped."""

    version: str
    rules: tuple[Rule, ...]
    by_kind: Mapping[str, tuple[Rule, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _require(0 < len(self.version) <= 64, "version", "must be 1 to 64 characters",
                 self.version)
        live: dict[str, str] = {}
        names: set[str] = set()
        for rule in self.rules:
            _require(rule.name not in names, f"kinds.{rule.name}", "is defined twice",
                     rule.name)
            names.add(rule.name)
            if rule.mode == LIVE:
                _require(rule.kind not in live, f"kinds.{rule.name}.mode",
                         f"only one rule per kind can be live and {live.get(rule.kind)} is",
                         rule.mode)
                live[rule.kind] = rule.name
        object.__setattr__(self, "by_kind", {
            kind: tuple(r for r in self.rules if r.kind == kind and r.mode != OFF)
            for kind in KINDS})

    def rule(self, name: str) -> Rule:
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise KeyError(f"no alert rule {name!r} in rules version {self.version}")


# -- the rules file ------------------------------------------------------------------------

_FIELD_TYPES = {"mode": str, "min_purchases": int, "min_prior_purchases": int,
                "min_refunds": int}  # every other key is a number


def _typed(key: str, value: object) -> object:
    want = _FIELD_TYPES.get(key, float)
    if want is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    what = {str: "a string", int: "an integer", float: "a number"}[want]
    _require(isinstance(value, want) and not isinstance(value, bool), key, f"must be {what}",
             value)
    return value


def _check_keys(table: Mapping[str, Any], allowed: Sequence[str]) -> None:
    for key in table:
        _require(key in allowed, key, f"unknown key; expected one of {', '.join(allowed)}", key)


def _settings(table: Mapping[str, Any], allowed: Sequence[str]) -> dict[str, object]:
    _check_keys(table, allowed)
    return {key: _typed(key, value) for key, value in table.items()}


def _rule_tables(table: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(rule name, its table) under ``kinds``, for both ``[kinds.churn_risk.high]`` and
    ``[kinds."churn_risk.high"]`` (TOML splits the first at its dots)."""
    found = []
    for key, value in table.items():
        name = prefix + key
        if name.partition("@")[0] in KINDS:
            _require(isinstance(value, dict), f"kinds.{name}", "must be a table", value)
            found.append((name, value))
        elif "@" not in name and isinstance(value, dict) and any(
                kind.startswith(name + ".") for kind in KINDS):
            found.extend(_rule_tables(value, name + "."))
        else:
            raise AlertRulesError(f"kinds.{name}",
                                  f"unknown kind; expected one of {', '.join(KINDS)}")
    return found


def parse_rules(data: Mapping[str, Any]) -> AlertRules:
    """The rules from a parsed TOML document (see crmscore/alert_rules.toml)."""
    _check_keys(data, ("version", "defaults", "kinds"))
    version = data.get("version")
    _require(isinstance(version, str), "version", "must be a string", version)
    assert isinstance(version, str)
    defaults = data.get("defaults", {})
    kinds = data.get("kinds", {})
    _require(isinstance(defaults, dict), "defaults", "must be a table", defaults)
    _require(isinstance(kinds, dict), "kinds", "must be a table", kinds)
    try:
        common = _settings(defaults, COMMON_KEYS[1:])
        Rule(KINDS[0], KINDS[0], **common)  # type: ignore[arg-type]
    except AlertRulesError as exc:
        raise exc.within("defaults.") from None
    tables = dict(_rule_tables(kinds))
    settings: dict[str, dict[str, object]] = {}
    rules = []
    for name in [*KINDS, *sorted(n for n in tables if "@" in n)]:
        kind, at, _ = name.partition("@")
        try:
            own = _settings(tables.get(name, {}), COMMON_KEYS + KIND_KEYS.get(kind, ()))
            start = {**settings[kind], "mode": SHADOW} if at else common
            settings[name] = {**start, **own}
            rules.append(Rule(name, kind, **settings[name]))  # type: ignore[arg-type]
        except AlertRulesError as exc:
            raise exc.within(f"kinds.{name}.") from None
    return AlertRules(version, tuple(rules))


def load_rules(path: str | Path | None = None) -> AlertRules:
    """The rules in the TOML file ``path``; None: the packaged crmscore/alert_rules.toml."""
    if path is None:
        source = "crmscore/alert_rules.toml"
        text = resources.files("crmscore").joinpath("alert_rules.toml").read_text("utf-8")
    else:
        source = str(path)
        text = Path(path).read_text(encoding="utf-8")
    try:
        return parse_rules(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise AlertRulesError("<file>", f"not valid TOML: {exc}", source) from exc
    except AlertRulesError as exc:
        raise exc.within("", source) from None
