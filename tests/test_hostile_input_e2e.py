"""Hostile input, end to end: the flow never crashes, every bad event reaches the dead-letter
topic (DLQ) with a reason, and every good one is applied exactly once.

Against the real broker (tansu), the real flow process (``--until-end``) and a real Redis:

* a hand-written corpus of 93 bad events: not JSON, truncated, over 1 MB, 300 to 10,000
  levels deep, wrong types, NaN and Infinity, zero and negative amounts, impossible dates,
  over-long ids, lone UTF-16 surrogates, conflicting duplicates, another currency, too late.
  Each is dead-lettered exactly once, with the expected reason code and a message, and is
  traced to its bytes (SHA-256);
* 21 good events of 16 customers, ids with control characters, NUL, 128 characters, odd
  but valid JSON (500 levels deep, 1e999 in an unknown field, duplicate keys, a BOM, UTF-16),
  some sent again (byte for byte, or reformatted with the same content):
  the status counts and every customer's score document (purchases, refunds, spend, and
  the number of applied events in its version) are exactly what the good events imply;
* 300 events drawn by hypothesis-jsonschema from ``schemas/transaction.v1.json``, each
  applied or dead-lettered as the in-process parser decides (schema-valid is not enough:
  a far-future time or an amount below one micro-unit is refused);
* the flow exits 0 having consumed every message the broker accepted.

Over 1 MB: crmscore's own publisher (``publish_lines``) cannot send such an event: the
producer refuses it in ``produce()``, before the broker, with KafkaException
MSG_SIZE_TOO_LARGE (librdkafka's ``message.max.bytes`` is 1,000,000). tansu itself does
not cap message size, so another producer can deliver one: such events are sent with a
raised limit, and the flow must refuse them (``too_large``, or ``not_json``) without
failing on the dead letter it writes (a dead letter over 1 MB used to stop the flow on
every restart; flows/dead_letters.py now truncates its payload), or apply them if they
are valid and under the flow's 1 MiB limit.

Drawn times span years 0001-9999: an applied event centuries old, read first, used to
make the stream clock tick every hour since (17.7 million ticks from year 1); the clock
now ticks only the hours holding registrations (flows/timers.py, test at the end).

In-process (no broker), hypothesis checks that ``parse_transaction`` never raises, and
that its rejections can be dead-lettered, for schema-valid events and for a valid event
with one field replaced by any JSON value (including NaN, huge integers, lone surrogates).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import hypothesis_jsonschema._from_schema as hypothesis_jsonschema_impl
import orjson
import pytest
import redis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.internal.conjecture import utils as conjecture_utils
from hypothesis_jsonschema import from_schema

import schemas
from crmscore.clients import producer
from crmscore.replay import ReplayError, customer_key, publish_lines
from crmscore.settings import Settings
from flows.dead_letters import dead_letter
from flows.scoring import MAX_LETTER_KEY_BYTES
from models.scoring import STEP_BITS
from models.transaction import (
    MICROS,
    SECOND_US,
    Rejection,
    Transaction,
    parse_time,
    parse_transaction,
)
from tests.pipeline import FlowEnv, read_topic, report_fault, score_documents, status

PARTITIONS = 4
APPLIED, DUPLICATE = "applied", "duplicate"
SCHEMA = schemas.load("transaction.v1")
KAFKA_MESSAGE_LIMIT = 1_000_000  # librdkafka's default message.max.bytes
NOW_US = parse_time("2026-01-01T00:00:00Z")


class _ManyWithMore(conjecture_utils.many):
    """hypothesis-jsonschema 0.23.1 (the newest) draws object properties with
    ``while many.more():``; hypothesis 6.1xx replaced ``more()`` by iteration inside a
    ``with`` block. This gives the old call on top of the new protocol."""

    def __init__(self, data: Any, min_size: int, max_size: float, average_size: float) -> None:
        super().__init__(data, min_size, max_size, average_size)
        self.__enter__()
        self._elements = iter(self)

    def more(self) -> bool:
        return next(self._elements, False) is None


if not hasattr(conjecture_utils.many, "more"):
    hypothesis_jsonschema_impl.cu = SimpleNamespace(many=_ManyWithMore)


@dataclass(frozen=True)
class Case:
    """One message: what the flow must do with it, and what it adds to a customer."""

    label: str
    raw: bytes
    outcome: str  # APPLIED, DUPLICATE or the rejection code
    effect: tuple[str, bool, int] | None = None  # (customer_id, is_refund, amount_micros)
    key: bytes | None = None  # the Kafka key, when not the customer id


def event(event_id: str, customer_id: str, day: int, amount: Any, kind: str = "purchase",
          currency: str = "EUR", **extra: Any) -> dict[str, Any]:
    return {"event_id": event_id, "customer_id": customer_id, "type": kind, "amount": amount,
            "occurred_at": f"2025-06-{day:02d}T12:00:00Z", "currency": currency, **extra}


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def good(label: str, ev: dict[str, Any], raw: bytes | None = None) -> Case:
    micros = int(Decimal(str(ev["amount"])) * MICROS)
    return Case(label, dumps(ev) if raw is None else raw, APPLIED,
                (ev["customer_id"], ev["type"] == "refund", micros))


def bad(label: str, raw: bytes | dict[str, Any], code: str) -> Case:
    return Case(label, raw if isinstance(raw, bytes) else dumps(raw), code)


def with_(**changes: Any) -> dict[str, Any]:
    return {**event("bad-1", "mallory", 1, 19.99), **changes}


def without(name: str) -> dict[str, Any]:
    return {k: v for k, v in with_().items() if k != name}


BASE = dumps(with_())  # a valid event's bytes, for byte-level damage


def with_raw(field: str, raw_value: bytes) -> bytes:
    """BASE with one field's JSON value replaced by raw bytes (not always JSON)."""
    obj = with_()
    before = dumps({field: obj[field]})[1:-1]  # '"field": value'
    assert before in BASE
    return BASE.replace(before, f'"{field}": '.encode() + raw_value)


def first_pass() -> list[Case]:
    """Good events, each applied once: ids with control characters, edge amounts, ..."""
    return [
        good("alice purchase 1", event("a-1", "alice", 1, 30.0)),
        good("alice purchase 2", event("a-2", "alice", 2, 20.0)),
        good("alice refund", event("a-3", "alice", 3, 5.5, "refund")),
        good("alice purchase 4", event("a-4", "alice", 4, 12.25)),
        good("bob purchase", event("b-1", "bob", 10, 100, currency="USD")),
        good("bob refund", event("b-2", "bob", 11, 40, "refund", currency="USD")),
        good("carol newest", event("c-1", "carol", 20, 10)),
        good("carol late but within the lateness window", event("c-3", "carol", 15, 3)),
        good("dave reuses alice's event id: ids are per customer",
             event("a-1", "dave", 5, 7)),
        good("control characters and NUL in ids are data",
             event("ctl\n\t\x00-1", "ctl\x00\x1b\u202e\U0001f600\n", 6, 1.5)),
        good("customer id of exactly 128 characters", event("long-1", "L" * 128, 6, 2)),
        good("non-ASCII customer id", event("u-1", "客户-ü-é", 6, 4.2)),
        good("one micro-unit", event("tiny-1", "tiny", 6, 0.000001)),
        good("the schema's maximum amount", event("whale-1", "whale", 6, 1e12)),
        good("500 levels of nesting in an unknown field",
             event("nest-1", "nested", 6, 8), dumps(event("nest-1", "nested", 6, 8))[:-1]
             + b', "extra": ' + b"[" * 500 + b"]" * 500 + b"}"),
        good("beyond-float and beyond-64-bit numbers in unknown fields",
             event("num-1", "bignum", 6, 9), dumps(event("num-1", "bignum", 6, 9))[:-1]
             + b', "huge": 1e999, "big": ' + str(2**100).encode() + b"}"),
        good("UTF-8 byte order mark", event("bom-1", "bom", 6, 6),
             b"\xef\xbb\xbf" + dumps(event("bom-1", "bom", 6, 6))),
        good("duplicate JSON keys: the last one wins", event("dk-1", "dupkey", 6, 5),
             dumps(event("dk-1", "dupkey", 6, 19.99))[:-1] + b', "amount": 5}'),
        good("offset normalised", {**event("off-1", "offset", 6, 3),
                                   "occurred_at": "2025-06-06T23:30:00-14:00"}),
    ]


def second_pass() -> list[Case]:
    """Re-sends after the first pass: exact repeats, reformatted repeats, conflicts."""
    a2 = event("a-2", "alice", 2, 20.0)
    reformatted = (b'{ "currency" : "EUR", "amount": 20.000, "type": "purchase",\n'
                   b'  "occurred_at": "2025-06-02T14:00:00+02:00", "customer_id": "alice",'
                   b' "event_id": "a-2", "note": "same content, other bytes" }')
    return [
        Case("exact re-send of a-2", dumps(a2), DUPLICATE),
        Case("exact re-send of a-1", dumps(event("a-1", "alice", 1, 30.0)), DUPLICATE),
        Case("exact re-send of b-1", dumps(event("b-1", "bob", 10, 100, currency="USD")),
             DUPLICATE),
        Case("a-2 reformatted, same content", reformatted, DUPLICATE),
        bad("a-2 again with another amount", {**a2, "amount": 25.0}, "conflicting_duplicate"),
        bad("a-2 again as a refund", {**a2, "type": "refund"}, "conflicting_duplicate"),
        bad("a-2 again at another time", {**a2, "occurred_at": "2025-06-02T12:00:01Z"},
            "conflicting_duplicate"),
        bad("alice in another currency", event("a-5", "alice", 5, 1, currency="USD"),
            "currency_mismatch"),
        bad("carol 19 days behind her newest event", event("c-2", "carol", 1, 10), "too_late"),
    ]


def hostile_corpus() -> list[Case]:
    half = len(BASE) // 2
    return [
        # not JSON
        bad("garbage", b"hello, world", "not_json"),
        bad("empty message", b"", "not_json"),
        bad("whitespace only", b" \t\r\n ", "not_json"),
        bad("single quotes", b"{'event_id': 'e', 'amount': 1}", "not_json"),
        bad("trailing comma", BASE[:-1] + b",}", "not_json"),
        bad("two objects in one message", BASE + BASE, "not_json"),
        bad("a comment", b"// order\n" + BASE, "not_json"),
        bad("raw control character in a string", BASE.replace(b"mallory", b"mal\x01lory"),
            "not_json"),
        bad("invalid UTF-8 in a string", BASE.replace(b"mallory", b"mal\xff\xfelory"),
            "not_json"),
        bad("Latin-1 text", BASE.replace(b"mallory", b"Jos\xe9"), "not_json"),
        # Lenient, not refused: the fallback parser (json.loads) detects UTF-16.
        good("UTF-16 text with a BOM", with_(), BASE.decode().encode("utf-16")),
        bad("lone surrogate escape in customer_id", with_raw("customer_id", b'"\\ud800"'),
            "not_json"),
        bad("lone low surrogate in currency", with_raw("currency", b'"\\udc00UR"'), "not_json"),
        bad("lone surrogate in order_id", BASE[:-1] + b', "order_id": "o\\udfff"}', "not_json"),
        bad("NaN in an unknown field", BASE[:-1] + b', "score": NaN}', "not_json"),
        bad("NaN as occurred_at", with_raw("occurred_at", b"NaN"), "not_json"),
        # truncated
        bad("truncated after 10 bytes", BASE[:10], "not_json"),
        bad("truncated in the middle", BASE[:half], "not_json"),
        bad("last brace missing", BASE[:-1], "not_json"),
        bad("truncated inside an escape", b'{"event_id": "e\\u00', "not_json"),
        # not an object
        bad("top-level array", b"[1, 2, 3]", "not_object"),
        bad("top-level number", b"42", "not_object"),
        bad("top-level null", b"null", "not_object"),
        bad("top-level string", b'"purchase"', "not_object"),
        bad("top-level true", b"true", "not_object"),
        bad("a valid event inside an array", b"[" + BASE + b"]", "not_object"),
        # deeply nested
        bad("10,000 nested arrays", b"[" * 10_000 + b"]" * 10_000, "not_json"),
        bad("10,000 nested objects", b'{"a": ' * 10_000 + b"1" + b"}" * 10_000, "not_json"),
        bad("10,000 levels in an unknown field of a valid event",
            BASE[:-1] + b', "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "not_json"),
        bad("2,000 levels in an unknown field of a valid event",
            BASE[:-1] + b', "x": ' + b"[" * 2_000 + b"]" * 2_000 + b"}", "not_json"),
        bad("an invalid event with 300 levels in an unknown field",
            dumps(with_(amount=-5))[:-1] + b', "x": ' + b"[" * 300 + b"]" * 300 + b"}",
            "schema_violation"),
        bad("1,000 nested arrays as the amount",
            with_raw("amount", b"[" * 1_000 + b"]" * 1_000), "schema_violation"),
        # wrong types
        bad("amount as a string", with_(amount="19.99"), "schema_violation"),
        bad("amount true", with_(amount=True), "schema_violation"),
        bad("amount null", with_(amount=None), "schema_violation"),
        bad("amount in an array", with_(amount=[19.99]), "schema_violation"),
        bad("amount as an object", with_(amount={"value": 19.99}), "schema_violation"),
        bad("customer_id a number", with_(customer_id=42), "schema_violation"),
        bad("customer_id null", with_(customer_id=None), "schema_violation"),
        bad("event_id an object", with_(event_id={}), "schema_violation"),
        bad("type a number", with_(type=1), "schema_violation"),
        bad("type capitalised", with_(type="Purchase"), "schema_violation"),
        bad("currency in an array", with_(currency=["EUR"]), "schema_violation"),
        bad("currency lower case", with_(currency="eur"), "schema_violation"),
        bad("occurred_at epoch seconds", with_(occurred_at=1717243200), "schema_violation"),
        bad("items a string", with_(items="x"), "schema_violation"),
        bad("item sku a number", with_(items=[{"sku": 5}]), "schema_violation"),
        bad("item quantity 0", with_(items=[{"sku": "s", "quantity": 0}]), "schema_violation"),
        bad("amount missing", without("amount"), "schema_violation"),
        bad("customer_id missing", without("customer_id"), "schema_violation"),
        bad("empty object", b"{}", "schema_violation"),
        # NaN and Infinity
        bad("amount NaN", with_raw("amount", b"NaN"), "amount_not_finite"),
        bad("amount Infinity", with_raw("amount", b"Infinity"), "amount_not_finite"),
        bad("amount -Infinity", with_raw("amount", b"-Infinity"), "amount_not_finite"),
        bad("amount 1e999", with_raw("amount", b"1e999"), "amount_not_finite"),
        bad("amount -1e999", with_raw("amount", b"-1e999"), "amount_not_finite"),
        # zero, negative, out of range amounts
        bad("amount 0", with_(amount=0), "schema_violation"),
        bad("amount 0.0", with_(amount=0.0), "schema_violation"),
        bad("amount -0.0", with_raw("amount", b"-0.0"), "schema_violation"),
        bad("amount -5", with_(amount=-5), "schema_violation"),
        bad("amount -1e-6", with_(amount=-1e-6), "schema_violation"),
        bad("amount 1e-9 rounds to zero micro-units", with_(amount=1e-9), "schema_violation"),
        bad("amount 4e-7 rounds to zero micro-units", with_(amount=4e-7), "schema_violation"),
        bad("amount just over the maximum", with_(amount=1e12 + 0.5), "schema_violation"),
        bad("amount a 30-digit integer", with_raw("amount", b"1" + b"0" * 29),
            "schema_violation"),
        bad("duplicate JSON keys, the last amount negative", BASE[:-1] + b', "amount": -5}',
            "schema_violation"),
        # impossible and unacceptable dates
        *(bad(f"occurred_at {text!r}", with_(occurred_at=text), "schema_violation") for text in (
            "2025-02-30T00:00:00Z", "2025-13-01T00:00:00Z", "2025-06-31T00:00:00Z",
            "2025-06-01T24:00:00Z", "2025-06-01T23:59:60Z", "0000-01-01T00:00:00Z",
            "2025-06-01T12:00:00+25:00", "2025-06-01T12:00:00", "2025-06-01", "", "yesterday",
        )),
        *(bad(f"occurred_at {text!r}", with_(occurred_at=text), "future_event") for text in (
            "9999-12-31T23:59:59Z", "9999-12-31T23:59:59-23:59", "2099-01-01T00:00:00Z",
        )),
        # ids
        bad("customer_id of 129 characters", with_(customer_id="c" * 129), "schema_violation"),
        bad("customer_id of 100,000 characters", with_(customer_id="c" * 100_000),
            "schema_violation"),
        bad("event_id of 129 characters", with_(event_id="e" * 129), "schema_violation"),
        bad("event_id of 10,000 control characters", with_(event_id="\x07" * 10_000),
            "schema_violation"),
        bad("empty customer_id", with_(customer_id=""), "schema_violation"),
        bad("order_id of 129 characters", with_(order_id="o" * 129), "schema_violation"),
    ]


def over_one_megabyte() -> list[Case]:
    """Events over the producer's 1,000,000 bytes: only a producer with a raised limit
    can send them (see the module docstring)."""
    padding = "p" * 1_030_000
    return [
        bad("1.1 MB event", dumps(with_(padding="p" * 1_100_000)), "too_large"),
        bad("1.03 MB of truncated JSON", dumps(with_(padding=padding))[:-2], "not_json"),
        # base64 in the dead letter makes this 1.07 MB
        bad("800 kB of invalid UTF-8", b"\xff" * 800_000, "not_json"),
        good("1.03 MB valid event, under the flow's 1 MiB limit",
             event("big-1", "big", 6, 11, padding=padding)),
        # a letter keeps the refused message's key: cut, or it would be too big to write
        Case("not JSON under a 900 kB Kafka key", b"not JSON, huge key", "not_json",
             key=b"k" * 900_000),
    ]


def schema_sample(n: int = 300) -> list[Case]:
    """``n`` events drawn from the JSON Schema, deterministically, each its own customer
    (so its outcome does not depend on the order of other customers' events)."""
    drawn: list[dict[str, Any]] = []

    @settings(max_examples=n, derandomize=True, database=None, phases=[Phase.generate],
              deadline=None, suppress_health_check=list(HealthCheck))
    @given(from_schema(SCHEMA))
    def draw(ev: dict[str, Any]) -> None:
        drawn.append(ev)

    draw()
    now_us = time.time_ns() // 1000
    cases = []
    for i, ev in enumerate(drawn[:n]):
        ev = {**ev, "customer_id": f"p{i:03d}-{ev['customer_id']}"[:128]}
        try:
            raw = json.dumps(ev, ensure_ascii=i % 2 == 0).encode()
        except UnicodeEncodeError:  # a lone surrogate: only expressible escaped
            raw = json.dumps(ev).encode()
        now, later = (parse_transaction(raw, t) for t in (now_us, now_us + 600 * SECOND_US))
        if type(now) is not type(later):
            continue  # within minutes of the future limit: the flow may decide otherwise
        if isinstance(now, Rejection):
            cases.append(Case(f"schema sample {i}", raw, now.code))
        else:
            cases.append(Case(f"schema sample {i}", raw, APPLIED,
                              (now.customer_id, now.is_refund, now.amount_micros)))
    return cases


def publish(env: FlowEnv, cases: list[Case]) -> Settings:
    """Publish through crmscore's own publisher; the 1.1 MB event must be refused there."""
    flow_settings = Settings.from_env(env.env(CRMSCORE_TOPIC_PARTITIONS=str(PARTITIONS)))
    with pytest.raises(ReplayError, match="MSG_SIZE_TOO_LARGE"):
        publish_lines(flow_settings, [dumps(with_(padding="p" * 1_100_000))])
    assert publish_lines(flow_settings, [c.raw for c in cases]) == len(cases)
    return flow_settings


def publish_unlimited(flow_settings: Settings, cases: list[Case]) -> None:
    """Publish with ``message.max.bytes`` raised, as a producer other than crmscore's can."""
    kafka = producer(flow_settings, **{"message.max.bytes": "8000000"})
    errors: list[Any] = []
    for case in cases:
        kafka.produce(flow_settings.transactions_topic, case.raw,
                      case.key or customer_key(case.raw),
                      on_delivery=lambda err, _msg: errors.append(err) if err else None)
    assert kafka.flush(60) == 0
    assert errors == [], "tansu refused an over-1 MB message: update the docstring"


def flow_log(env: FlowEnv) -> str:
    logs = sorted(env.recovery_dir.parent.glob("flow-*.log"))
    return logs[-1].read_text(errors="replace")[-3000:] if logs else "(no log)"


def letter_payload(letter: dict[str, Any]) -> bytes:
    if letter["payload"] is None:
        return b""
    if letter["payload_encoding"] == "base64":
        return base64.b64decode(letter["payload"])
    return str(letter["payload"]).encode()


def letter_digest(letter: dict[str, Any]) -> str:
    """SHA-256 of the refused message's bytes (given by a letter with a truncated payload)."""
    if letter.get("payload_truncated"):
        return str(letter["payload_sha256"])
    return hashlib.sha256(letter_payload(letter)).hexdigest()


@pytest.mark.e2e
def test_hostile_input_is_dead_lettered_and_good_events_applied_once(
        broker, redis_url, unique, tmp_path):
    env = FlowEnv(broker.address, redis_url, unique, tmp_path / "recovery")
    published = first_pass() + hostile_corpus() + second_pass() + schema_sample()
    oversized = over_one_megabyte()
    cases = published + oversized
    rejected = [c for c in cases if c.outcome not in (APPLIED, DUPLICATE)]
    assert len({c.raw for c in rejected}) == len(rejected), "rejected events must differ"

    flow_settings = publish(env, published)
    publish_unlimited(flow_settings, oversized)
    proc = env.start_flow("--until-end")
    assert proc.wait(120) == 0, flow_log(env)

    conn = redis.Redis.from_url(redis_url)
    # Every refused event is in the DLQ exactly once, with the expected reason.
    messages = read_topic(env.bootstrap, env.dlq, PARTITIONS)
    assert max(len(key or b"") for *_, key, _ in messages) <= MAX_LETTER_KEY_BYTES
    letters = [orjson.loads(value) for *_, value in messages]
    letters_by_digest = defaultdict(list)
    for letter in letters:
        letters_by_digest[letter_digest(letter)].append(letter)
    wrong = {}
    for case in rejected:
        found = letters_by_digest.pop(hashlib.sha256(case.raw).hexdigest(), [])
        reasons = [(lt["reason"]["code"], bool(lt["reason"]["message"])) for lt in found]
        if reasons != [(case.outcome, True)] or any(
                lt["source"]["topic"] != env.topic for lt in found):
            wrong[case.label] = reasons
    assert wrong == {}, f"{len(wrong)} bad events without their one letter: {wrong}"
    assert dict(letters_by_digest) == {}, "dead letters for events that were not refused"
    truncated = [lt for lt in letters if lt.get("payload_truncated")]
    assert len(truncated) == 3  # the 1.1 MB, 1.03 MB and base64-encoded 800 kB events
    for letter in truncated:
        original = next(c.raw for c in oversized if hashlib.sha256(c.raw).hexdigest()
                        == letter["payload_sha256"])
        assert original.startswith(letter_payload(letter))
        assert letter["payload_bytes"] == len(original)

    # Every good event is applied exactly once: the customers' documents add up.
    expected: dict[str, Counter[str]] = defaultdict(Counter)
    for case in cases:
        if case.effect is not None:
            customer_id, is_refund, micros = case.effect
            totals = expected[customer_id]
            totals["applied"] += 1
            totals["refunds" if is_refund else "purchases"] += 1
            totals["refund_micros" if is_refund else "gross_micros"] += micros
    docs = score_documents(conn, env.layout)
    assert set(docs) == set(expected)
    differ = {}
    for customer_id, totals in expected.items():
        doc = docs[customer_id]
        got = (doc["version"] >> STEP_BITS, doc["purchase_count"], doc["refund_count"],
               doc["gross_monetary"], doc["net_monetary"])
        want = (totals["applied"], totals["purchases"], totals["refunds"],
                totals["gross_micros"] / MICROS,
                (totals["gross_micros"] - totals["refund_micros"]) / MICROS)
        if got != want:
            differ[customer_id] = (got, want)
    assert differ == {}
    outcomes = Counter(c.outcome for c in cases)
    counts = status(conn, env.layout)
    assert counts is not None, flow_log(env)
    assert (counts["events_consumed"], counts["events_applied"], counts["events_duplicate"],
            counts["events_rejected"]) == (len(cases), outcomes[APPLIED], outcomes[DUPLICATE],
                                       len(rejected)), outcomes
    report_fault(f"hostile events: {len(rejected)} bad of {len(cases)} (every category, "
                 "schema-drawn, over 1 MB)", len(rejected), counts, len(wrong) + len(differ),
                 [])


# --- in-process -------------------------------------------------------------------------

GOOD = event("e-1", "c-1", 1, 19.99)
with_lone_surrogate = st.builds("{}{}{}".format, st.text(max_size=5),
                                st.characters(categories=["Cs"]), st.text(max_size=5))
json_leaves = (st.none() | st.booleans() | st.integers() | st.floats()
               | st.text(max_size=20) | with_lone_surrogate)
json_values = json_leaves | st.recursive(  # a leaf half the time: mostly replaces a string
    json_leaves,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def check_handled(raw: bytes) -> Transaction | Rejection:
    """Parses without raising; a rejection has a reason and can be dead-lettered."""
    result = parse_transaction(raw, NOW_US)
    if isinstance(result, Rejection):
        assert result.code and result.message
        assert len(dead_letter(result, "t", 0, 0, raw)) < KAFKA_MESSAGE_LIMIT
    else:
        assert isinstance(result, Transaction)
        for text in (result.event_id, result.customer_id, result.currency):
            text.encode()  # a Redis key and JSON: must be Unicode text
    return result


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(from_schema(SCHEMA), st.booleans())
def test_schema_valid_events_are_applied_or_refused_only_for_time_or_rounding(event_, ascii_):
    try:
        raw = json.dumps(event_, ensure_ascii=ascii_).encode()
    except UnicodeEncodeError:
        raw = json.dumps(event_).encode()
    result = check_handled(raw)
    if isinstance(result, Rejection):
        assert (result.code, result.field) in {
            ("future_event", "occurred_at"), ("schema_violation", "occurred_at"),
            ("schema_violation", "amount")}, result
    else:
        assert (result.event_id, result.customer_id) == (event_["event_id"],
                                                          event_["customer_id"])


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(st.sampled_from([*SCHEMA["properties"], "unknown"]), json_values, st.booleans())
def test_a_valid_event_with_any_value_in_one_field_never_crashes(field, value, ascii_):
    # surrogatepass: a lone surrogate becomes bytes that are not UTF-8, as on the wire
    raw = json.dumps({**GOOD, field: value}, ensure_ascii=ascii_).encode(
        "utf-8", "surrogatepass")
    check_handled(raw)


def test_dead_letter_of_an_oversized_event_fits_a_kafka_message():
    raw = b'{"x": "' + b"\x01" * 2_000_000 + b'"}'  # JSON-escaped, each byte grows 6x
    letter = orjson.loads(dead_letter(Rejection("too_large", "big"), "t", 1, 2, raw))
    assert len(orjson.dumps(letter)) < KAFKA_MESSAGE_LIMIT
    assert (letter["payload_truncated"], letter["payload_bytes"]) == (True, len(raw))
    assert letter["payload_sha256"] == hashlib.sha256(raw).hexdigest()
    assert raw.startswith(letter_payload(letter))


def test_an_ancient_event_does_not_flood_the_timer_buckets():
    """An applied event from 1971 read first, then one from 2025: the clock ticks only the
    hours holding registrations, not the 477,000 hours in between."""
    from crmscore.layout import RedisLayout
    from flows.clock import ClockLogic, Counts
    from flows.timers import Registration, Tick

    clock = ClockLogic(None, RedisLayout("t:"))
    ancient, modern = parse_time("1971-01-01T00:00:00Z"), parse_time("2025-06-01T00:00:00Z")
    clock.on_batch([Counts(applied=1, clock_us=ancient),
                    Registration("c", ancient + 30 * 24 * 3600 * SECOND_US)])
    out, _ = clock.on_batch([Counts(applied=1, clock_us=modern)])
    assert len([o for o in out if isinstance(o, tuple) and isinstance(o[1], Tick)]) == 1
