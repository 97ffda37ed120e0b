"""A plain batch recomputation of what the flow should hold, from the published lines.

Deliberately independent of ``models/``: dicts, sorting and numpy on the whole
history, no incremental tricks. Tests compare the flow's online state to this.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import orjson

DAY_S = 86_400.0


@dataclass
class Expected:
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    applied: int = 0
    duplicate: int = 0
    rejected: int = 0
    rejected_lines: list[bytes] = field(default_factory=list)
    clock: float | None = None


def _epoch_s(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def recompute(lines: list[bytes], malformed: set[int]) -> Expected:
    """``malformed``: indexes of the lines the flow must reject (from the ground truth)."""
    out = Expected()
    seen: set[str] = set()
    events: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for i, line in enumerate(lines):
        if i in malformed:
            out.rejected += 1
            out.rejected_lines.append(line)
            continue
        event = orjson.loads(line)
        if event["event_id"] in seen:
            out.duplicate += 1
            continue
        seen.add(event["event_id"])
        out.applied += 1
        events[event["customer_id"]].append(event)
    for customer_id, evs in events.items():
        out.customers[customer_id] = _aggregate(evs)
    if out.customers:
        out.clock = max(c["as_of"] for c in out.customers.values())
    return out


def _aggregate(events: list[dict[str, Any]]) -> dict[str, Any]:
    times = [_epoch_s(e["occurred_at"]) for e in events]
    as_of = max(times)
    purchases = sorted(
        (t, e["amount"]) for t, e in zip(times, events, strict=True) if e["type"] == "purchase"
    )
    refunds = [(t, e["amount"]) for t, e in zip(times, events, strict=True)
               if e["type"] == "refund"]
    gaps = np.diff([t for t, _ in purchases]) / DAY_S
    gross = sum(a for _, a in purchases)
    refund_total = sum(a for _, a in refunds)
    return {
        "as_of": as_of,
        "purchase_count": len(purchases),
        "gross_monetary": gross,
        "refund_count": len(refunds),
        "refund_total": refund_total,
        "net_monetary": gross - refund_total,
        "first_purchase_at": purchases[0][0] if purchases else None,
        "last_purchase_at": purchases[-1][0] if purchases else None,
        "gap_mean_days": float(gaps.mean()) if len(gaps) else None,
        "gap_std_days": float(gaps.std()) if len(gaps) else None,
        "windows": windows_at(as_of, purchases, refunds),
        "purchases": purchases,
        "refunds": refunds,
    }


def windows_at(as_of: float, purchases: list[tuple[float, float]],
               refunds: list[tuple[float, float]]) -> dict[str, dict[str, float]]:
    windows = {}
    for days in (30, 90, 365):
        start = as_of - days * DAY_S
        windows[f"{days}d"] = {
            "purchases": sum(1 for t, _ in purchases if start < t <= as_of),
            "spend": sum(a for t, a in purchases if start < t <= as_of),
            "refunds": sum(a for t, a in refunds if start < t <= as_of),
        }
    return windows


def mismatches(doc: dict[str, Any], want: dict[str, Any], clock: float | None = None
               ) -> list[str]:
    """Differences between a flow score document and the recomputation (empty when equal).

    A document describes its ``as_of``: the customer's newest event, or later when the
    stream clock (at most ``clock``) woke a silent customer; windows and recency are
    recomputed at that instant.
    """
    problems = []

    def check(name: str, got: Any, expected: Any, tol: float = 1e-6) -> None:
        if expected is None or got is None:
            if got != expected:
                problems.append(f"{name}: got {got!r}, want {expected!r}")
        elif abs(got - expected) > tol * max(1.0, abs(expected)):
            problems.append(f"{name}: got {got!r}, want {expected!r}")

    def time_of(field_name: str) -> float | None:
        value = doc.get(field_name)
        return None if value is None else _epoch_s(value)

    as_of = _epoch_s(doc["as_of"])
    check("last_event_at", time_of("last_event_at"), want["as_of"])
    if as_of < want["as_of"] - 1e-6 or (clock is not None and as_of > clock + 1e-6):
        problems.append(f"as_of: {doc['as_of']} outside [newest event, stream clock]")
    last = want["last_purchase_at"]
    check("rfm.recency_days", doc["rfm"]["recency_days"],
          None if last is None else (as_of - last) / DAY_S)
    for name in ("purchase_count", "gross_monetary", "refund_count", "refund_total",
                 "net_monetary", "gap_mean_days"):
        check(name, doc[name], want[name])
    check("gap_std_days", doc["gap_std_days"], want["gap_std_days"], tol=1e-5)
    check("first_purchase_at", time_of("first_purchase_at"), want["first_purchase_at"])
    check("last_purchase_at", time_of("last_purchase_at"), want["last_purchase_at"])
    check("rfm.frequency", doc["rfm"]["frequency"], want["purchase_count"])
    check("rfm.monetary", doc["rfm"]["monetary"], want["net_monetary"])
    for window, values in windows_at(as_of, want["purchases"], want["refunds"]).items():
        for name, value in values.items():
            check(f"windows.{window}.{name}", doc["windows"][window][name], value)
    return problems
