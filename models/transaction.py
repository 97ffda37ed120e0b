"""A transaction event: parsed from raw bytes, validated, or rejected with a reason.

Validation runs on the hot path, so the happy path is: orjson parse, one
jsonschema-rs ``is_valid`` call (Rust, JSON Schema 2020-12), one ``fromisoformat``.
Only a failing event pays for a detailed error walk.

Amounts are kept as integer micro-units and times as integer microseconds since
the epoch: sums and squared gaps are then exact whatever order events arrive in.

>>> tx = parse_transaction(b'{"event_id": "e1", "customer_id": "c1", "type": "purchase",'
...     b' "occurred_at": "2025-03-01T10:00:00+01:00", "amount": 19.99, "currency": "EUR"}',
...     now_us=1_800_000_000_000_000)
>>> tx.customer_id, tx.amount_micros, format_time(tx.occurred_at_us)
('c1', 19990000, '2025-03-01T09:00:00.000000Z')
>>> parse_transaction(b'{"event_id": "e1"}', now_us=0).code
'schema_violation'
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

import jsonschema_rs
import orjson

import schemas

SECOND_US = 1_000_000
DAY_US = 86_400 * SECOND_US
MICROS = 1_000_000
MAX_EVENT_BYTES = 1 << 20  # Kafka's default message size limit; larger is abuse, not a sale
_EPOCH_ORDINAL = datetime(1970, 1, 1).toordinal()
_VALIDATOR = jsonschema_rs.validator_for(schemas.load("transaction.v1"), validate_formats=True)


@dataclass(slots=True)  # not frozen: frozen __init__ costs ~1 µs per event
class Transaction:
    """A valid purchase or refund, reduced to what the scores need."""

    event_id: str
    customer_id: str
    occurred_at_us: int
    is_refund: bool
    amount_micros: int
    currency: str
    fingerprint: bytes  # digest of the content: tells an exact repeat from a conflicting one


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why an event was refused: a machine-readable ``code`` and a human ``message``."""

    code: str
    message: str
    field: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "field": self.field}


def parse_transaction(raw: bytes | None, now_us: int, max_future_us: int = 3600 * SECOND_US
                      ) -> Transaction | Rejection:
    """Parse and validate one raw event; ``now_us`` is the wall clock (for future events)."""
    if raw is None:
        return Rejection("not_json", "message has no value (null payload)")
    if len(raw) > MAX_EVENT_BYTES:
        return Rejection("too_large", f"event is {len(raw):,} bytes; the limit is "
                         f"{MAX_EVENT_BYTES:,}")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        obj = _load_beyond_orjson(raw, exc)
        if isinstance(obj, Rejection):
            return obj
    if not isinstance(obj, dict):
        return Rejection("not_object", f"expected a JSON object, got {_json_type(obj)}")
    if not _VALIDATOR.is_valid(obj):
        return _schema_rejection(obj)
    try:
        occurred_us = parse_time(obj["occurred_at"])
    except (ValueError, OverflowError) as exc:
        return Rejection("schema_violation", f"occurred_at: {exc}", "occurred_at")
    if occurred_us > now_us + max_future_us:
        return Rejection(
            "future_event",
            f"occurred_at {obj['occurred_at']} is {(occurred_us - now_us) / 3.6e9:.1f} h ahead "
            f"of the wall clock (limit {max_future_us / 3.6e9:g} h)",
            "occurred_at",
        )
    amount_micros = round(obj["amount"] * MICROS)
    if amount_micros <= 0:
        return Rejection(
            "schema_violation",
            f"amount: {obj['amount']} rounds to zero micro-units",
            "amount",
        )
    is_refund = obj["type"] == "refund"
    content = (obj["customer_id"], occurred_us, is_refund, amount_micros, obj["currency"],
               obj.get("order_id"))
    return Transaction(
        event_id=obj["event_id"],
        customer_id=obj["customer_id"],
        occurred_at_us=occurred_us,
        is_refund=is_refund,
        amount_micros=amount_micros,
        currency=obj["currency"],
        fingerprint=hashlib.blake2b(orjson.dumps(content), digest_size=8).digest(),
    )


def format_time(us: int) -> str:
    """RFC 3339 UTC with microseconds, e.g. ``2025-03-01T09:00:00.000000Z``.

    >>> format_time(parse_time("0484-12-05T13:02:23Z"))
    '0484-12-05T13:02:23.000000Z'

    Integer arithmetic and a per-day cache: several times faster than strftime,
    and this runs for every score document.
    """
    day, rest = divmod(us, DAY_US)
    second, micro = divmod(rest, SECOND_US)
    hour, second = divmod(second, 3600)
    minute, second = divmod(second, 60)
    return f"{_date_prefix(day)}{hour:02d}:{minute:02d}:{second:02d}.{micro:06d}Z"


def parse_time(text: str) -> int:
    """Microseconds since the epoch of an RFC 3339 time (inverse of :func:`format_time`)."""
    t = datetime.fromisoformat(text)
    us = ((t.toordinal() - _EPOCH_ORDINAL) * 86_400 + t.hour * 3600 + t.minute * 60
          + t.second) * SECOND_US + t.microsecond
    offset = t.utcoffset()
    if offset:
        us -= offset // timedelta(microseconds=1)
    return us


@lru_cache(maxsize=8192)
def _date_prefix(day: int) -> str:
    d = datetime.fromordinal(day + _EPOCH_ORDINAL)
    return f"{d.year:04d}-{d.month:02d}-{d.day:02d}T"  # strftime's %Y drops leading zeros


def _load_beyond_orjson(raw: bytes, exc: orjson.JSONDecodeError) -> Any:
    """JSON orjson refuses but the standard allows (integers beyond 64 bits, numbers
    beyond float range), or a Rejection naming why it is not JSON."""
    try:
        obj = json.loads(raw)  # accepts NaN and Infinity too: tell them apart below
    except (ValueError, RecursionError):
        return Rejection("not_json", f"not valid JSON: {exc}")
    if isinstance(obj, dict):
        amount = obj.get("amount")
        if isinstance(amount, float) and not math.isfinite(amount):
            return Rejection("amount_not_finite", f"amount is {amount}, not a finite number",
                             "amount")
    try:
        obj = json.loads(raw, parse_constant=_refuse_constant)
    except ValueError as constant:
        return Rejection("not_json", f"not valid JSON: {constant}")
    try:
        json.dumps(obj, ensure_ascii=False).encode()
    except (UnicodeEncodeError, RecursionError):
        # A lone surrogate (escaped "\ud800", or UTF-8-encoded, which json.loads passes):
        # not Unicode text, so no Redis key, validator or digest can take it.
        return Rejection("not_json", f"not valid JSON: {exc}")
    return obj


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


def _schema_rejection(obj: dict[str, Any]) -> Rejection:
    try:
        found = list(_VALIDATOR.iter_errors(obj))
    except ValueError as exc:  # "Recursion limit reached" at 255+ levels: is_valid copes
        return Rejection("schema_violation", f"<event>: does not match the schema, and is "
                         f"nested too deeply to say where ({exc})")
    errors = sorted(found, key=lambda e: list(map(str, e.instance_path)))
    first = errors[0]
    path = ".".join(str(p) for p in first.instance_path)
    if not path and "required" in [str(p) for p in first.schema_path]:
        # A missing property has an empty instance path; name it from the message.
        path = first.message.split('"')[1] if '"' in first.message else ""
    message = first.message if len(first.message) <= 300 else first.message[:300] + "..."
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return Rejection("schema_violation", f"{path or '<event>'}: {message}{more}", path or None)


def _json_type(obj: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(obj), type(obj).__name__)
