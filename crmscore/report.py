"""``crmscore report alerts``: the campaign analysis of every alert rule, from Redis.

Per rule (live and shadow): alerts raised, and for the matured follow-ups of customers'
first alerts of the rule (the unbiased comparison, see models/outcomes.py), treated vs
holdout conversion and mean spend within the rule's outcome window, with the uplift and
its 95% interval. ``--json`` prints the raw report document.
"""

from __future__ import annotations

import argparse
from typing import Any

import orjson

from crmscore.clients import redis_client
from crmscore.layout import RedisLayout
from crmscore.settings import Settings


def configure(parser: argparse.ArgumentParser) -> None:
    from crmscore.cli import add_setting_flags

    parser.add_argument("what", choices=["alerts"], help="which report")
    parser.add_argument("--json", action="store_true", help="print the report document as JSON")
    add_setting_flags(parser, "redis_url", "redis_prefix", "redis_cluster")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:6.1%}"


def _uplift(u: dict[str, Any] | None, pct: bool) -> str:
    if u is None:
        return "-"
    fmt = (lambda v: f"{v * 100:+.1f}pp") if pct else (lambda v: f"{v:+.2f}")
    lo, hi = u["ci95"]
    return f"{fmt(u['difference'])} [{fmt(lo)}, {fmt(hi)}]"


def format_report(rules: dict[str, dict[str, Any]]) -> str:
    """One row per rule; the uplift columns are of customers' first alerts (unbiased)."""
    rows = [f"{'rule':34s} {'mode':6s} {'alerts':>7s} {'treated':>8s} {'conv':>7s} "
            f"{'holdout':>8s} {'conv':>7s}  conversion uplift (95% CI)      spend uplift (95% CI)"]
    for name, r in rules.items():
        first = r.get("first_alerts") or r
        t, h = first["treated"], first["holdout"]
        rows.append(
            f"{name:34s} {r['mode']:6s} {r['alerts']:7d} {t['n']:8d} {_pct(t['conversion_rate'])} "
            f"{h['n']:8d} {_pct(h['conversion_rate'])}  "
            f"{_uplift(first['conversion_uplift'], True):31s} "
            f"{_uplift(first['spend_uplift'], False)}")
    return "\n".join(rows)


def run(args: argparse.Namespace, settings: Settings) -> int:
    raw = redis_client(settings).hget(RedisLayout(settings.redis_prefix).alert_report(), "doc")
    if raw is None:
        print("no alert report yet: is the flow running against this Redis and prefix?")
        return 1
    doc = orjson.loads(raw)
    if args.json:
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
        return 0
    print(f"alert report, updated {doc['updated_at']}: per rule, customers' first alerts, "
          "treated vs holdout, conversion and spend within the rule's outcome window")
    print(format_report(doc["rules"]))
    return 0
