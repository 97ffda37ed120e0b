"""The synthetic stream: reproducible, and its ground truth is true.

Valid lines are checked against the event schema, malformed lines against the
flow's rules (schema, finite amount, future time, duplicate ids, lateness,
currency), and the stream's shape against the model (stop_at, refunds, delays).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson
import pytest

import schemas
from crmscore import cli
from crmscore.generator import DAY_US, HOUR_US, GeneratorConfig, generate
from models.customer import CustomerState
from models.transaction import Rejection, parse_transaction

VALIDATOR = jsonschema_rs.validator_for(schemas.load("transaction.v1"), validate_formats=True)
CONFIG = GeneratorConfig(customers=300, days=200, seed=11, malformed_rate=0.05)
LATENESS_US = round(CONFIG.lateness_days * DAY_US)


@pytest.fixture(scope="module")
def stream() -> tuple[list[bytes], list[dict[str, Any]]]:
    gen = generate(CONFIG)
    return list(gen.lines()), list(gen.truth())


def us(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1_000_000)


def malformed_lines(truth: list[dict[str, Any]]) -> dict[int, str]:
    return {r["malformed"]["line"]: r["malformed"]["kind"] for r in truth if "malformed" in r}


def customers(truth: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["customer_id"]: r for r in truth if "customer_id" in r}


def good_events(lines: list[bytes], truth: list[dict[str, Any]]) -> list[tuple[int, dict]]:
    """(line number, event) of every line that is not malformed, duplicates included."""
    bad = malformed_lines(truth)
    return [(n, orjson.loads(line)) for n, line in enumerate(lines) if n not in bad]


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    config = GeneratorConfig(customers=50, days=90, seed=3)
    first = generate(config)
    again = generate(config)
    assert list(first.lines()) == list(again.lines())
    assert list(first.truth()) == list(again.truth())
    other = generate(GeneratorConfig(customers=50, days=90, seed=4))
    assert list(other.lines()) != list(first.lines())


def test_cli_writes_files_reproducibly(tmp_path: Path) -> None:
    argv = ["generate", "--customers", "40", "--days", "60", "--seed", "9"]
    assert cli.main([*argv, "--out", str(tmp_path / "a.jsonl")]) == 0
    assert cli.main([*argv, "--out", str(tmp_path / "b.jsonl")]) == 0
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    truth = (tmp_path / "a.truth.jsonl").read_bytes().splitlines()
    summary = orjson.loads(truth[-1])["summary"]
    assert summary["lines"] == len((tmp_path / "a.jsonl").read_bytes().splitlines())


def test_valid_lines_match_the_schema(stream: tuple[list[bytes], list[dict]]) -> None:
    lines, truth = stream
    events = good_events(lines, truth)
    assert len(events) > 1000
    for n, event in events:
        assert VALIDATOR.is_valid(event), (n, next(VALIDATOR.iter_errors(event)).message)
        assert event["amount"] == round(event["amount"], 2) > 0
        assert event["occurred_at"].endswith("Z")
        assert event["currency"] == customers(truth)[event["customer_id"]]["currency"]


def test_every_kind_of_malformed_line_is_present(stream: tuple[list[bytes], list[dict]]) -> None:
    _, truth = stream
    kinds = set(malformed_lines(truth).values())
    assert kinds == {
        "not_json", "not_object", "schema_violation", "amount_not_finite", "future_event",
        "conflicting_duplicate", "too_late", "currency_mismatch",
    }  # fmt: skip
    summary = truth[-1]["summary"]
    assert summary["malformed"] == len(malformed_lines(truth))
    assert summary["malformed"] / summary["lines"] == pytest.approx(CONFIG.malformed_rate, 0.1)


def stateless_reason(line: bytes, now_us: int) -> str | None:
    """Why the flow rejects a line before looking at any customer state, or None."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return "not_json_or_not_finite"
    if not isinstance(obj, dict):
        return "not_object"
    if not VALIDATOR.is_valid(obj):
        return "schema"
    if round(obj["amount"] * 1_000_000) <= 0:
        return "rounds_to_zero"
    if us(obj["occurred_at"]) > now_us + HOUR_US:
        return "future"
    return None


def test_malformed_lines_are_exactly_those_in_truth(stream: tuple[list[bytes], list]) -> None:
    """Replays the rules by hand: schema, finiteness and future time, then per customer
    a repeated id with other content, lateness behind the newest event, currency."""
    lines, truth = stream
    bad = malformed_lines(truth)
    now_us = time.time_ns() // 1000
    seen: dict[tuple[str, str], bytes] = {}
    newest: dict[str, int] = {}
    currency = {cid: c["currency"] for cid, c in customers(truth).items()}
    for n, line in enumerate(lines):
        reason = stateless_reason(line, now_us)
        if reason is None:
            event = orjson.loads(line)
            cid, t = event["customer_id"], us(event["occurred_at"])
            key = (cid, event["event_id"])
            if key in seen:
                reason = None if seen[key] == line else "conflict"
            elif t < newest.get(cid, t) - LATENESS_US:
                reason = "too_late"
            elif event["currency"] != currency[cid]:
                reason = "currency"
            else:
                seen[key] = line
                newest[cid] = max(newest.get(cid, t), t)
        assert (reason is not None) == (n in bad), (n, reason, bad.get(n), line[:200])
    for n in (n for n, kind in bad.items() if kind == "amount_not_finite"):
        assert not math.isfinite(json.loads(lines[n])["amount"])  # json reads 1e400 as inf


def test_flow_rules_reject_each_malformed_line_with_its_kind(
    stream: tuple[list[bytes], list[dict]],
) -> None:
    """The flow's own parser and customer state agree with the truth file, and the
    aggregates come out as the truth says: malformed lines change nothing."""
    lines, truth = stream
    bad = malformed_lines(truth)
    now_us = time.time_ns() // 1000
    states: dict[str, CustomerState] = {}
    for n, line in enumerate(lines):
        parsed = parse_transaction(line, now_us)
        if isinstance(parsed, Rejection):
            outcome = parsed.code
        else:
            state = states.setdefault(parsed.customer_id, CustomerState(parsed.customer_id))
            result = state.apply(parsed, LATENESS_US)
            outcome = result if isinstance(result, str) else result.code
        if n in bad:
            assert outcome == bad[n], (n, lines[n][:200])
        else:
            assert outcome in ("applied", "duplicate"), (n, outcome, lines[n][:200])
    for cid, expected in customers(truth).items():
        state = states[cid]
        assert state.purchase_count == expected["purchase_count"]
        assert state.refund_count == expected["refund_count"]
        assert state.gross_micros == round(expected["gross_monetary"] * 1_000_000)
        assert state.refund_micros == round(expected["refund_total"] * 1_000_000)


def test_duplicates_are_byte_identical_and_prompt(stream: tuple[list[bytes], list]) -> None:
    lines, truth = stream
    bad = malformed_lines(truth)
    first_at: dict[bytes, int] = {}
    newest_before = 0  # newest event time published so far
    duplicates = 0
    for n, event in good_events(lines, truth):
        line, t = lines[n], us(event["occurred_at"])
        if line in first_at:
            duplicates += 1
            assert newest_before <= t + max(72 * HOUR_US, CONFIG.max_delay_hours * HOUR_US)
        first_at.setdefault(line, n)
        newest_before = max(newest_before, t)
    assert duplicates == truth[-1]["summary"]["duplicates"] > 0
    ids = defaultdict(set)
    for n, event in good_events(lines, truth):
        ids[event["event_id"]].add(lines[n])
    assert all(len(v) == 1 for v in ids.values()), "an id with two contents among valid lines"
    assert not bad.keys() & set(first_at.values())


def test_delays_stay_within_max_delay(stream: tuple[list[bytes], list[dict]]) -> None:
    lines, truth = stream
    newest_before = 0
    late = 0
    published: set[bytes] = set()
    for n, event in good_events(lines, truth):
        if lines[n] in published:
            continue  # a re-send: checked in test_duplicates_are_byte_identical_and_prompt
        published.add(lines[n])
        t = us(event["occurred_at"])
        assert newest_before - t <= CONFIG.max_delay_hours * HOUR_US
        late += newest_before > t
        newest_before = max(newest_before, t)
    assert late > 0


def test_model_stop_at_and_refunds(stream: tuple[list[bytes], list[dict]]) -> None:
    lines, truth = stream
    people = customers(truth)
    purchases: dict[tuple[str, str], tuple[int, float]] = {}
    refunds = []
    for _, event in good_events(lines, truth):
        t = us(event["occurred_at"])
        truth_row = people[event["customer_id"]]
        if event["type"] == "purchase":
            assert t >= us(truth_row["acquired_at"])
            if truth_row["stop_at"] is not None:
                assert t < us(truth_row["stop_at"])
            purchases[(event["customer_id"], event["order_id"])] = (t, event["amount"])
        else:
            refunds.append(event)
    assert refunds
    for refund in refunds:
        bought_at, amount = purchases[(refund["customer_id"], refund["order_id"])]
        assert bought_at < us(refund["occurred_at"])
        assert refund["amount"] <= amount
    stopped = [c for c in people.values() if c["stop_at"] is not None]
    assert 0 < len(stopped) < len(people)
    assert {c["currency"] for c in people.values()} == {"EUR", "USD"}


def test_bad_config_is_refused_with_the_value() -> None:
    with pytest.raises(ValueError, match="max_delay_hours.*got 200"):
        generate(GeneratorConfig(max_delay_hours=200))
    with pytest.raises(ValueError, match="malformed_rate.*got 1.5"):
        generate(GeneratorConfig(malformed_rate=1.5))


def test_rhythm_makes_gaps_regular_at_the_same_rate() -> None:
    """--rhythm K: gamma(K) gaps, coefficient of variation ~ 1/sqrt(K), same mean rate."""
    def gaps(rhythm: float) -> tuple[float, float]:
        gen = generate(GeneratorConfig(customers=400, days=730, seed=11, rhythm=rhythm,
                                       malformed_rate=0.0, duplicate_rate=0.0))
        truth = {t["customer_id"]: t for t in gen.truth() if "customer_id" in t}
        times: dict[str, list[float]] = defaultdict(list)
        for line in gen.lines():
            e = json.loads(line)
            if e["type"] == "purchase":
                times[e["customer_id"]].append(datetime.fromisoformat(e["occurred_at"])
                                               .timestamp() / 86_400)
        cvs, ratios = [], []
        for cid, ts in times.items():
            g = [b - a for a, b in zip(sorted(ts), sorted(ts)[1:], strict=False)]
            if len(g) >= 8:
                mean = sum(g) / len(g)
                cvs.append(math.sqrt(sum((x - mean) ** 2 for x in g) / len(g)) / mean)
                ratios.append(mean * truth[cid]["purchase_rate_per_day"])
        return sorted(cvs)[len(cvs) // 2], sorted(ratios)[len(ratios) // 2]

    poisson_cv, poisson_ratio = gaps(1.0)
    regular_cv, regular_ratio = gaps(4.0)
    assert 0.8 < poisson_cv < 1.2 and 0.35 < regular_cv < 0.6
    assert 0.8 < poisson_ratio < 1.25 and 0.8 < regular_ratio < 1.25  # mean gap = 1 / rate
