"""``crmscore generate``: a synthetic transaction stream with its ground truth.

Each customer follows a Pareto/NBD-style model: purchases arrive as a Poisson
process whose rate is gamma-distributed across customers, from the first purchase
(``acquired_at``, uniform in the first half of the span) until a latent, exponential
``stop_at`` (null when the customer is still buying at the end of the span).
Amounts are lognormal around a gamma-distributed spend level; some purchases are
refunded later, in part or in full.

The stream is written in publication order: event time, except for delayed events
(published up to ``max_delay_hours`` late), exact re-sends of earlier lines and
malformed lines. Every malformed line is one the flow rejects without touching any
customer's state; the truth file names its line and the rejection code expected.
Everything is drawn from one seed, so a seed gives the same bytes every time.

The truth file is JSONL: one record per customer (``customer_id``, ``acquired_at``,
``stop_at`` or null, ``purchase_rate_per_day``, ``spend_level``, ``currency`` and the
exact aggregates the flow should reach: ``purchase_count``, ``refund_count``,
``gross_monetary``, ``refund_total``), then ``{"malformed": {"line": N, "kind": CODE,
"variant": NAME}}`` per malformed line (N counts from 0; CODE is the dead-letter reason
code the flow must give), then ``{"summary": {...}}`` with the counts.

>>> gen = generate(GeneratorConfig(customers=20, days=60, seed=7))
>>> lines = list(gen.lines())
>>> len(lines) == gen.summary()["lines"], lines == list(generate(gen.config).lines())
(True, True)
"""

from __future__ import annotations

import argparse
import random
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from crmscore.settings import Settings

HOUR_US = 3_600_000_000
DAY_US = 24 * HOUR_US
DUPLICATE_WINDOW_US = 72 * HOUR_US  # re-sends come at most this long after event time
# The customer model: purchases per day ~ Gamma, lifetime ~ Exp(rate ~ Gamma), spend ~ Gamma.
PURCHASE_RATE_SHAPE, PURCHASE_RATE_SCALE = 0.75, 1 / 15  # mean 0.05 purchases a day
DROPOUT_SHAPE, DROPOUT_SCALE = 0.8, 1 / 250  # mean lifetime ~ 300 days, a long tail
SPEND_SHAPE, SPEND_SCALE = 2.0, 25.0  # mean spend level 50
AMOUNT_SIGMA = 0.5  # lognormal spread of one purchase around the spend level
ACQUISITION_SHARE = 0.5  # first purchases fall in this first share of the span
USD_SHARE = 0.15
CHANNELS = ("web", "app", "store", "call_center", "other")
CHANNEL_WEIGHTS = (0.4, 0.25, 0.25, 0.05, 0.05)
SESSION_SHARE = 0.8  # web and app purchases with a session_id
ITEMS_SHARE = 0.3  # purchases listing their items
CATEGORIES = ("apparel", "books", "electronics", "grocery", "home", "toys")
REFUND_MEAN_DELAY_DAYS = 7.0
FULL_REFUND_SHARE = 0.6
CHUNK = 65_536  # lines rendered per vectorised step


@dataclass(frozen=True)
class GeneratorConfig:
    customers: int = 1000
    days: float = 365.0
    start: datetime = datetime(2025, 1, 1, tzinfo=UTC)
    seed: int = 0
    duplicate_rate: float = 0.02
    refund_rate: float = 0.05
    disorder_rate: float = 0.05
    max_delay_hours: float = 72.0
    malformed_rate: float = 0.02
    lateness_days: float = 7.0  # the flow's lateness window: delays must stay inside it
    # Shape of the gamma-distributed gaps between a customer's purchases: 1 is the Poisson
    # process of Pareto/NBD (the default); larger is more regular (coefficient of
    # variation 1/sqrt(rhythm)), like shoppers with a habit.
    rhythm: float = 1.0

    def check(self) -> None:
        """Raise ``ValueError`` naming the first unusable value."""
        if self.seed < 0:
            raise ValueError(f"seed: expected a non-negative integer, got {self.seed}")
        if self.customers < 1:
            raise ValueError(f"customers: expected at least 1, got {self.customers}")
        if not self.days > 0:
            raise ValueError(f"days: expected a positive span, got {self.days}")
        if self.start.tzinfo is None:
            raise ValueError(f"start: expected a time with an offset or Z, got {self.start}")
        if not self.rhythm >= 1.0:
            raise ValueError(f"rhythm: expected a gamma shape >= 1, got {self.rhythm}")
        for name in ("duplicate_rate", "refund_rate", "disorder_rate", "malformed_rate"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"{name}: expected a share in [0, 1), got {value}")
        limit = self.lateness_days * 24
        if not 0 < self.max_delay_hours < limit:
            raise ValueError(
                f"max_delay_hours: expected more than 0 and less than the flow's lateness "
                f"window ({limit:g} h), got {self.max_delay_hours}"
            )


@dataclass
class Customers:
    acquired_us: np.ndarray  # int64 microseconds since the epoch
    stop_us: np.ndarray  # int64, -1 when the customer never stops within the span
    rate: np.ndarray  # purchases per day while active
    spend: np.ndarray
    usd: np.ndarray  # bool


@dataclass
class Events:
    """The valid events, sorted by event time; refunds point at their purchase's order."""

    cust: np.ndarray
    t_us: np.ndarray
    refund: np.ndarray
    cents: np.ndarray
    order: np.ndarray
    channel: np.ndarray
    salt: np.ndarray  # seeds the event's session id and items


@dataclass
class Plan:
    """Every output line in publication order: which event it shows and how."""

    src: np.ndarray  # index into Events (the original, or the anchor of a malformed line)
    variant: np.ndarray  # VALID, DUPLICATE or an index into MALFORMED
    salt: np.ndarray
    delayed: int


VALID, DUPLICATE = -1, -2


@dataclass
class Generated:
    config: GeneratorConfig
    customers: Customers
    events: Events
    plan: Plan
    tag: str = field(init=False)  # in every id, so streams of different seeds can mix
    customer_id: Callable[[int], str] = field(init=False)

    def __post_init__(self) -> None:
        self.tag = f"{self.config.seed & 0xFFFFFF:06x}"
        self.customer_id = f"c-{{:0{max(6, len(str(self.config.customers - 1)))}d}}".format

    def lines(self) -> Iterator[bytes]:
        """The output lines in publication order, without their newline."""
        for lo in range(0, len(self.plan.src), CHUNK):
            src = self.plan.src[lo : lo + CHUNK]
            variants = self.plan.variant[lo : lo + CHUNK].tolist()
            salts = self.plan.salt[lo : lo + CHUNK].tolist()
            for k, event in enumerate(self._events(src)):
                if variants[k] < 0:
                    yield orjson.dumps(event)
                else:
                    yield self._malformed(event, variants[k], salts[k], lo + k)

    def _events(self, src: np.ndarray) -> Iterator[dict[str, Any]]:
        """The event dicts of valid events ``src`` (indices into ``self.events``)."""
        ev, tag, customer = self.events, self.tag, self.customer_id
        usd = self.customers.usd[ev.cust[src]].tolist()
        rows = zip(
            src.tolist(),
            ev.cust[src].tolist(),
            _times(ev.t_us[src]),
            ev.refund[src].tolist(),
            ev.cents[src].tolist(),
            ev.order[src].tolist(),
            ev.channel[src].tolist(),
            ev.salt[src].tolist(),
            usd,
            strict=True,
        )
        for i, cust, occurred_at, refund, cents, order, channel, salt, is_usd in rows:
            event: dict[str, Any] = {
                "event_id": f"e-{tag}-{i}",
                "customer_id": customer(cust),
                "occurred_at": occurred_at,
                "type": "refund" if refund else "purchase",
                "amount": cents / 100,
                "currency": "USD" if is_usd else "EUR",
                "order_id": f"o-{tag}-{order}",
                "channel": CHANNELS[channel],
            }
            if not refund:
                if channel <= 1 and salt % 100 < SESSION_SHARE * 100:  # web or app
                    event["session_id"] = f"s-{tag}-{salt & 0xFFFFFFFF:08x}"
                if (salt >> 7) % 100 < ITEMS_SHARE * 100:
                    event["items"] = _items(salt >> 14, cents)
            yield event

    def _malformed(self, event: dict[str, Any], variant: int, salt: int, line: int) -> bytes:
        code, _, build = MALFORMED[variant]
        if code != "conflicting_duplicate":  # the others must not touch a known event id
            event["event_id"] = f"x-{self.tag}-{line}"
        late_us = round((self.config.lateness_days + 1) * DAY_US)
        too_late_at = _times(np.array([_us_of(event["occurred_at"]) - late_us]))[0]
        ctx = Context({"EUR": "USD", "USD": "EUR"}[event["currency"]], too_late_at)
        return build(event, random.Random(salt), ctx)

    def summary(self) -> dict[str, Any]:
        variants = self.plan.variant
        kinds: dict[str, int] = {}
        for v, n in zip(*np.unique(variants[variants >= 0], return_counts=True), strict=True):
            code = MALFORMED[int(v)][0]
            kinds[code] = kinds.get(code, 0) + int(n)
        refunds = int(self.events.refund.sum())
        return {
            "seed": self.config.seed,
            "customers": self.config.customers,
            "customers_stopped": int((self.customers.stop_us >= 0).sum()),
            "lines": len(variants),
            "events": len(self.events.t_us),
            "purchases": len(self.events.t_us) - refunds,
            "refunds": refunds,
            "duplicates": int((variants == DUPLICATE).sum()),
            "delayed": self.plan.delayed,
            "malformed": int((variants >= 0).sum()),
            "malformed_by_kind": dict(sorted(kinds.items())),
            "start": _times(np.array([_us(self.config.start)]))[0],
            "end": _times(np.array([_end_us(self.config)]))[0],
        }

    def truth(self) -> Iterator[dict[str, Any]]:
        """Per-customer records, then one record per malformed line, then the summary."""
        c, ev = self.customers, self.events
        n = self.config.customers
        purchases = np.bincount(ev.cust[~ev.refund], minlength=n).tolist()
        refunds = np.bincount(ev.cust[ev.refund], minlength=n).tolist()
        gross = np.bincount(ev.cust[~ev.refund], ev.cents[~ev.refund], minlength=n).tolist()
        refunded = np.bincount(ev.cust[ev.refund], ev.cents[ev.refund], minlength=n).tolist()
        stops = _times(np.maximum(c.stop_us, 0))
        rows = zip(
            _times(c.acquired_us),
            stops,
            c.stop_us.tolist(),
            c.rate.tolist(),
            c.spend.tolist(),
            c.usd.tolist(),
            strict=True,
        )
        for i, (acquired, stop, stop_us, rate, spend, usd) in enumerate(rows):
            yield {
                "customer_id": self.customer_id(i),
                "acquired_at": acquired,
                "stop_at": stop if stop_us >= 0 else None,
                "purchase_rate_per_day": round(rate, 6),
                "spend_level": round(spend, 2),
                "currency": "USD" if usd else "EUR",
                "purchase_count": purchases[i],
                "refund_count": refunds[i],
                "gross_monetary": round(gross[i] / 100, 2),
                "refund_total": round(refunded[i] / 100, 2),
            }
        for line in np.flatnonzero(self.plan.variant >= 0).tolist():
            code, variant, _ = MALFORMED[int(self.plan.variant[line])]
            yield {"malformed": {"line": line, "kind": code, "variant": variant}}
        yield {"summary": self.summary()}


@dataclass(frozen=True)
class Context:
    """What a malformed line may need beyond its anchor event."""

    other_currency: str
    too_late_at: str  # an occurred_at beyond the lateness window behind the anchor


Builder = Callable[[dict[str, Any], random.Random, Context], bytes]


def generate(config: GeneratorConfig) -> Generated:
    """Draw customers, events and publication order; lines render lazily from them."""
    config.check()
    rng = np.random.default_rng(config.seed)
    customers = draw_customers(rng, config)
    events = draw_events(rng, config, customers)
    return Generated(config, customers, events, plan_lines(rng, config, events))


def draw_customers(rng: np.random.Generator, config: GeneratorConfig) -> Customers:
    n, start, end = config.customers, _us(config.start), _end_us(config)
    acquired = start + (rng.random(n) * ACQUISITION_SHARE * (end - start)).astype(np.int64)
    dropout_per_day = rng.gamma(DROPOUT_SHAPE, DROPOUT_SCALE, n)
    lifetime_days = np.minimum(rng.exponential(1.0, n) / dropout_per_day, 100 * config.days)
    lifetime_us = (lifetime_days * DAY_US).astype(np.int64) + 1
    stop = np.where(acquired + lifetime_us < end, acquired + lifetime_us, -1)
    return Customers(
        acquired_us=acquired,
        stop_us=stop,
        rate=rng.gamma(PURCHASE_RATE_SHAPE, PURCHASE_RATE_SCALE, n),
        spend=rng.gamma(SPEND_SHAPE, SPEND_SCALE, n),
        usd=rng.random(n) < USD_SHARE,
    )


def draw_events(rng: np.random.Generator, config: GeneratorConfig, c: Customers) -> Events:
    """Purchases (the first at acquisition, then Poisson until stop_at) and their refunds."""
    end = _end_us(config)
    active_us = np.where(c.stop_us >= 0, c.stop_us, end) - c.acquired_us
    if config.rhythm == 1.0:
        counts = 1 + rng.poisson(c.rate * active_us / DAY_US)
        cust = np.repeat(np.arange(config.customers), counts)
        offset = rng.random(len(cust))
        offset[np.cumsum(counts) - counts] = 0.0  # each customer's first purchase
        t = c.acquired_us[cust] + (offset * active_us[cust]).astype(np.int64)
    else:
        cust, t = _renewal_purchases(rng, config.rhythm, c, active_us)
    amount = c.spend[cust] * rng.lognormal(-(AMOUNT_SIGMA**2) / 2, AMOUNT_SIGMA, len(cust))
    cents = np.maximum(1, np.round(amount * 100)).astype(np.int64)
    channel = rng.choice(len(CHANNELS), len(cust), p=CHANNEL_WEIGHTS).astype(np.int8)

    refunded = np.flatnonzero(rng.random(len(cust)) < config.refund_rate)
    delay = HOUR_US + rng.exponential(REFUND_MEAN_DELAY_DAYS * DAY_US, len(refunded))
    refund_t = t[refunded] + delay.astype(np.int64)
    share = np.where(
        rng.random(len(refunded)) < FULL_REFUND_SHARE, 1.0, rng.uniform(0.1, 0.9, len(refunded))
    )
    refund_cents = np.maximum(1, np.floor(cents[refunded] * share)).astype(np.int64)
    keep = refund_t < end
    refunded, refund_t, refund_cents = refunded[keep], refund_t[keep], refund_cents[keep]

    n_refunds = len(refunded)
    all_t = np.concatenate([t, refund_t])
    order = np.argsort(all_t, kind="stable")
    return Events(
        cust=np.concatenate([cust, cust[refunded]])[order],
        t_us=all_t[order],
        refund=np.concatenate([np.zeros(len(t), bool), np.ones(n_refunds, bool)])[order],
        cents=np.concatenate([cents, refund_cents])[order],
        order=np.concatenate([np.arange(len(t)), refunded])[order],
        channel=np.concatenate([channel, channel[refunded]])[order],
        salt=rng.integers(0, 2**63, len(all_t), dtype=np.int64),
    )


def _renewal_purchases(rng: np.random.Generator, shape: float, c: Customers,
                       active_us: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Purchases at acquisition, then after gamma(shape) gaps of mean 1 / rate, until stop;
    grouped by customer, in time order."""
    n = len(active_us)
    expected = c.rate * active_us / DAY_US
    draws = (expected + 4 * np.sqrt(expected) + 4).astype(np.int64)  # enough gaps, w.h.p.
    owner = np.repeat(np.arange(n), draws)
    gap_us = rng.gamma(shape, 1.0 / (shape * c.rate[owner])) * DAY_US
    csum = np.cumsum(gap_us)
    starts = np.cumsum(draws) - draws
    before = np.repeat(np.where(starts > 0, csum[starts - 1], 0.0), draws)
    since_first = csum - before  # time from the customer's first purchase
    keep = since_first < active_us[owner]
    cust = np.concatenate([np.arange(n), owner[keep]])
    t = np.concatenate([c.acquired_us, c.acquired_us[owner[keep]] +
                        since_first[keep].astype(np.int64)])
    order = np.lexsort((t, cust))
    return cust[order], t[order]


def plan_lines(rng: np.random.Generator, config: GeneratorConfig, ev: Events) -> Plan:
    """Publication order of originals (some delayed), re-sends and malformed lines.

    A re-send or malformed line tied to an event is published after that event and
    within the duplicate window of its event time (or right after a longer delay):
    the flow then still remembers the event id, and the customer's currency is set.
    """
    n = len(ev.t_us)
    delayed = rng.random(n) < config.disorder_rate
    delay = rng.integers(1, round(config.max_delay_hours * HOUR_US) + 1, n)
    pub = ev.t_us + np.where(delayed, delay, 0)

    n_dup = round(config.duplicate_rate * n)
    n_bad = round(config.malformed_rate * (n + n_dup) / (1 - config.malformed_rate))
    variant = _malformed_variants(rng, n_bad)
    src = np.concatenate([np.arange(n), rng.integers(0, n, n_dup + n_bad)])
    window = min(DUPLICATE_WINDOW_US, round(config.lateness_days * DAY_US / 2))
    extra = src[n:]
    room = np.maximum(ev.t_us[extra] + window - pub[extra], 0)
    extra_pub = pub[extra] + (rng.random(len(extra)) * room).astype(np.int64)
    all_pub = np.concatenate([pub, extra_pub])
    order = np.lexsort((np.arange(len(all_pub)), all_pub))  # ties: originals first
    kinds = np.concatenate([np.full(n, VALID), np.full(n_dup, DUPLICATE), variant])
    salts = np.concatenate([ev.salt, rng.integers(0, 2**32, n_dup + n_bad, dtype=np.int64)])
    return Plan(src[order], kinds.astype(np.int16)[order], salts[order], int(delayed.sum()))


def _malformed_variants(rng: np.random.Generator, n: int) -> np.ndarray:
    """Malformed variants: every one once (when there is room), then random codes."""
    codes = sorted({m[0] for m in MALFORMED})
    by_code = {code: [i for i, m in enumerate(MALFORMED) if m[0] == code] for code in codes}
    first = list(range(min(n, len(MALFORMED))))
    rest = [by_code[codes[rng.integers(len(codes))]] for _ in range(n - len(first))]
    out = np.array(first + [r[rng.integers(len(r))] for r in rest], dtype=np.int64)
    return rng.permutation(out)


def _items(bits: int, cents: int) -> list[dict[str, Any]]:
    """1-3 line items sharing the amount, drawn from the random ``bits`` (49 of them)."""
    bits, n = divmod(bits, 3)
    parts = []
    for _ in range(n + 1):
        bits, sku = divmod(bits, 5000)
        bits, category = divmod(bits, len(CATEGORIES))
        bits, quantity = divmod(bits, 3)
        bits, weight = divmod(bits, 4)
        parts.append((sku, category, quantity + 1, weight + 1))
    total = sum(p[3] for p in parts)
    return [
        {
            "sku": f"SKU-{sku:05d}",
            "category": CATEGORIES[category],
            "quantity": quantity,
            "unit_price": round(cents * weight / total / quantity / 100, 2),
        }
        for sku, category, quantity, weight in parts
    ]


# --- malformed lines: each takes a copy of a real event (with a fresh event_id) ---------


def _with(**changes: Any) -> Builder:
    def build(event: dict[str, Any], r: random.Random, ctx: Context) -> bytes:
        return orjson.dumps({**event, **changes})

    return build


def _garbage(event: dict[str, Any], r: random.Random, ctx: Context) -> bytes:
    return ("#" + "".join(r.choice("abcxyz{}[]:,\"' ") for _ in range(r.randint(5, 60)))).encode()


def _binary(event: dict[str, Any], r: random.Random, ctx: Context) -> bytes:
    return b"\xff\xfe" + bytes(r.choice(range(0x80, 0x100)) for _ in range(r.randint(4, 40)))


def _truncated(event: dict[str, Any], r: random.Random, ctx: Context) -> bytes:
    raw = orjson.dumps(event)
    return raw[: r.randint(1, len(raw) - 2)]


def _missing(event: dict[str, Any], r: random.Random, ctx: Context) -> bytes:
    del event[r.choice(["event_id", "occurred_at", "type", "amount", "currency"])]
    return orjson.dumps(event)


def _amount_literal(literal: bytes) -> Builder:
    def build(event: dict[str, Any], r: random.Random, ctx: Context) -> bytes:
        event["amount"] = 0.5  # a placeholder orjson writes as exactly this
        return orjson.dumps(event).replace(b'"amount":0.5', b'"amount":' + literal)

    return build


def _mutate(key: str, value: Callable[[dict[str, Any], random.Random, Context], Any]) -> Builder:
    def build(event: dict[str, Any], r: random.Random, ctx: Context) -> bytes:
        event[key] = value(event, r, ctx)
        return orjson.dumps(event)

    return build


def _conflict(event: dict[str, Any], r: random.Random, ctx: Context) -> bytes:
    """The same event id and customer as the anchor event, with another amount."""
    event["amount"] = round(event["amount"] + r.randint(1, 5000) / 100, 2)
    return orjson.dumps(event)


# (expected DLQ code, variant, builder); the order is part of the seed's output.
MALFORMED: list[tuple[str, str, Builder]] = [
    ("not_json", "garbage", _garbage),
    ("not_json", "binary", _binary),
    ("not_json", "truncated", _truncated),
    ("not_object", "array", lambda e, r, c: orjson.dumps([e])),
    ("not_object", "number", lambda e, r, c: orjson.dumps(e["amount"])),
    ("not_object", "string", lambda e, r, c: orjson.dumps(e["customer_id"])),
    ("not_object", "null", lambda e, r, c: b"null"),
    ("schema_violation", "missing_field", _missing),
    ("schema_violation", "zero_amount", _with(amount=0)),
    ("schema_violation", "negative_amount", _mutate("amount", lambda e, r, c: -e["amount"])),
    ("schema_violation", "amount_rounds_to_zero", _with(amount=1e-9)),
    ("schema_violation", "wrong_type", _mutate("amount", lambda e, r, c: str(e["amount"]))),
    ("schema_violation", "bad_currency", _mutate("currency", lambda e, r, c: e["currency"][:2])),
    ("schema_violation", "bad_date", _with(occurred_at="2025-02-30T10:00:00Z")),
    ("schema_violation", "long_id", _mutate("event_id", lambda e, r, c: e["event_id"] * 20)),
    ("schema_violation", "unknown_type", _with(type="chargeback")),
    ("amount_not_finite", "overflow", _amount_literal(b"1e400")),
    ("amount_not_finite", "nan", _amount_literal(b"NaN")),
    (
        "future_event",
        "year_2096",
        _mutate("occurred_at", lambda e, r, c: "2096" + e["occurred_at"][4:]),
    ),
    ("conflicting_duplicate", "different_amount", _conflict),
    ("too_late", "beyond_lateness", _mutate("occurred_at", lambda e, r, c: c.too_late_at)),
    ("currency_mismatch", "other_currency", _mutate("currency", lambda e, r, c: c.other_currency)),
]


def _times(us: np.ndarray) -> list[str]:
    """RFC 3339 UTC strings with microseconds and Z, vectorised."""
    return np.datetime_as_string(us.astype("datetime64[us]"), timezone="UTC").tolist()


def _us_of(text: str) -> int:
    return int(np.datetime64(text.rstrip("Z"), "us").astype(np.int64))


def _us(t: datetime) -> int:
    return int(t.timestamp()) * 1_000_000 + t.microsecond


def _end_us(config: GeneratorConfig) -> int:
    return _us(config.start) + round(config.days * DAY_US)


# --- the command -------------------------------------------------------------------


def write(gen: Generated, out: Path, truth: Path) -> None:
    """Write the lines to ``out`` (JSONL) and the truth records to ``truth``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    truth.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        batch: list[bytes] = []
        for line in gen.lines():
            batch.append(line)
            if len(batch) >= CHUNK:
                f.write(b"\n".join(batch) + b"\n")
                batch.clear()
        if batch:
            f.write(b"\n".join(batch) + b"\n")
    with open(truth, "wb") as f:
        f.writelines(orjson.dumps(record) + b"\n" for record in gen.truth())


def configure(parser: argparse.ArgumentParser) -> None:
    d = GeneratorConfig()
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="PATH",
        help="JSONL file of events, one per line, in publication order",
    )
    parser.add_argument(
        "--truth",
        type=Path,
        metavar="PATH",
        help="ground-truth JSONL (default: OUT with suffix .truth.jsonl)",
    )
    parser.add_argument(
        "--customers",
        type=int,
        default=d.customers,
        metavar="N",
        help=f"number of customers (default {d.customers})",
    )
    parser.add_argument(
        "--days",
        type=float,
        default=d.days,
        metavar="D",
        help=f"span of event time in days (default {d.days:g})",
    )
    parser.add_argument(
        "--start",
        type=_parse_start,
        default=d.start,
        metavar="RFC3339",
        help="start of event time (default 2025-01-01T00:00:00Z)",
    )
    parser.add_argument("--seed", type=int, help="random seed (default: a random one, printed)")
    rates = {
        "duplicate-rate": (d.duplicate_rate, "share of exact re-sends of an earlier line"),
        "refund-rate": (d.refund_rate, "share of purchases refunded later, in part or in full"),
        "disorder-rate": (d.disorder_rate, "share of events published late"),
        "malformed-rate": (d.malformed_rate, "share of lines the flow must reject"),
    }
    for name, (default, help_text) in rates.items():
        parser.add_argument(
            f"--{name}",
            type=float,
            default=default,
            metavar="SHARE",
            help=f"{help_text} (default {default:g})",
        )
    parser.add_argument(
        "--rhythm",
        type=float,
        default=d.rhythm,
        metavar="K",
        help="gamma shape of the gaps between a customer's purchases: 1 = Poisson "
        f"(Pareto/NBD), larger = more regular habits (default {d.rhythm:g})",
    )
    parser.add_argument(
        "--max-delay-hours",
        type=float,
        default=d.max_delay_hours,
        metavar="H",
        help=f"longest publication delay (default {d.max_delay_hours:g})",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    seed = args.seed if args.seed is not None else secrets.randbits(32)
    config = GeneratorConfig(
        customers=args.customers,
        days=args.days,
        start=args.start,
        seed=seed,
        duplicate_rate=args.duplicate_rate,
        refund_rate=args.refund_rate,
        disorder_rate=args.disorder_rate,
        max_delay_hours=args.max_delay_hours,
        malformed_rate=args.malformed_rate,
        lateness_days=settings.lateness_days,
        rhythm=args.rhythm,
    )
    truth = args.truth or args.out.with_suffix(".truth.jsonl")
    began = time.perf_counter()
    try:
        gen = generate(config)
    except ValueError as exc:
        print(f"crmscore generate: {exc}")
        return 2
    write(gen, args.out, truth)
    ahead_s = (_end_us(config) - time.time_ns() // 1000) / 1e6
    if ahead_s > settings.max_future_seconds:
        print(
            f"crmscore generate: warning: the span ends {ahead_s / 3600:.0f} h from now; the "
            f"flow rejects events more than {settings.max_future_seconds:g} s in the future",
            file=sys.stderr,
        )
    s = gen.summary()
    print(
        f"wrote {s['lines']} lines to {args.out} ({s['purchases']} purchases, {s['refunds']} "
        f"refunds, {s['duplicates']} duplicates, {s['malformed']} malformed, {s['delayed']} "
        f"delayed; {s['customers']} customers, {s['customers_stopped']} stopped) and truth to "
        f"{truth}; seed {seed}, {time.perf_counter() - began:.1f} s"
    )
    return 0


def _parse_start(text: str) -> datetime:
    try:
        start = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an RFC 3339 time, got {text!r}") from None
    if start.tzinfo is None:
        raise argparse.ArgumentTypeError(f"expected a time with Z or an offset, got {text!r}")
    return start
