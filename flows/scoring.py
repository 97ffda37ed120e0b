"""The scoring dataflow: Kafka -> parse -> validate -> per-customer state -> Redis.

Every consumed message ends in exactly one of three counts, kept in the flow's
own recovered state so they stay exact across crashes:
applied (a new valid event), duplicate (an exact repeat) or rejected (sent to
the dead-letter topic with a reason).
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeGuard

import bytewax.operators as op
import orjson
from bytewax.connectors.kafka import KafkaError, KafkaSourceMessage
from bytewax.connectors.kafka import operators as kop
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulBatchLogic

from crmscore.clients import CONSUMER_DEFAULTS
from crmscore.layout import RedisLayout
from crmscore.settings import Settings
from flows.dead_letters import DeadLetterSink, dead_letter
from flows.redis_sink import RedisDocSink, VersionedDoc
from models.customer import APPLIED, DUPLICATE, CustomerState
from models.transaction import (
    DAY_US,
    SECOND_US,
    Rejection,
    Transaction,
    format_time,
    parse_transaction,
)

Message = KafkaSourceMessage[bytes | None, bytes | None]


@dataclass(slots=True)
class Accepted:
    tx: Transaction
    msg: Message


@dataclass(slots=True)
class Refused:
    rejection: Rejection
    msg: Message


class Counts(NamedTuple):
    """Outcome counts of some messages, and the newest event time among those applied."""

    applied: int = 0
    duplicate: int = 0
    rejected: int = 0
    clock_us: int | None = None


def sum_counts(batch: list[Counts], start: Counts | None = None) -> Counts:
    applied, duplicate, rejected, clock = start or Counts()
    for c in batch:
        applied += c.applied
        duplicate += c.duplicate
        rejected += c.rejected
        if c.clock_us is not None and (clock is None or c.clock_us > clock):
            clock = c.clock_us
    return Counts(applied, duplicate, rejected, clock)


def parse(msg: Message, max_future_us: int) -> Accepted | Refused:
    parsed = parse_transaction(msg.value, time.time_ns() // 1000, max_future_us)
    if isinstance(parsed, Rejection):
        return Refused(parsed, msg)
    return Accepted(parsed, msg)


def is_accepted(parsed: Accepted | Refused) -> TypeGuard[Accepted]:
    return isinstance(parsed, Accepted)


def kafka_error(err: KafkaError[bytes | None, bytes | None]) -> Refused:
    return Refused(Rejection("kafka_error", f"consumer error: {err.err}"), err.msg)


def to_dead_letter(refused: Refused) -> tuple[bytes | None, bytes]:
    m = refused.msg
    return m.key, dead_letter(refused.rejection, m.topic or "", m.partition or 0,
                              m.offset if m.offset is not None else -1, m.value)


class CustomerLogic(StatefulBatchLogic[Accepted, Any, bytes]):
    """Applies a customer's events; emits one score document per batch, dead letters
    for refused events, and the batch's outcome counts."""

    def __init__(self, resume: bytes | None, lateness_us: int, layout: RedisLayout) -> None:
        self.state: CustomerState | None = None if resume is None else pickle.loads(resume)
        self.lateness_us = lateness_us
        self.layout = layout

    def on_batch(self, values: list[Accepted]) -> tuple[list[Any], bool]:
        if self.state is None:  # bytewax does not pass the key: take it from the event
            self.state = CustomerState(values[0].tx.customer_id)
        state = self.state
        out: list[Any] = []
        applied = duplicate = rejected = 0
        for item in values:
            outcome = state.apply(item.tx, self.lateness_us)
            if outcome is APPLIED:
                applied += 1
            elif outcome is DUPLICATE:
                duplicate += 1
            elif isinstance(outcome, Rejection):
                rejected += 1
                out.append(Refused(outcome, item.msg))
        if applied:
            out.append(VersionedDoc(
                self.layout.score(state.customer_id), state.version,
                orjson.dumps(state.document()), self.layout.updates(state.customer_id),
            ))
        out.append(Counts(applied, duplicate, rejected, state.max_event_us))
        return out, StatefulBatchLogic.RETAIN

    def snapshot(self) -> bytes:
        # Pickled bytes are an immutable copy, cheaper than bytewax's deepcopy.
        return pickle.dumps(self.state, protocol=pickle.HIGHEST_PROTOCOL)


class StatusLogic(StatefulBatchLogic[Counts, VersionedDoc, bytes]):
    """Sums outcome counts into the pipeline status document."""

    def __init__(self, resume: bytes | None, layout: RedisLayout) -> None:
        self.totals = Counts() if resume is None else pickle.loads(resume)
        self.layout = layout

    def on_batch(self, values: list[Counts]) -> tuple[list[VersionedDoc], bool]:
        self.totals = applied, duplicate, rejected, clock = sum_counts(values, self.totals)
        consumed = applied + duplicate + rejected
        doc = {
            "events_consumed": consumed,
            "events_applied": applied,
            "events_rejected": rejected,
            "events_duplicate": duplicate,
            "stream_clock": None if clock is None else format_time(clock),
            "updated_at": format_time(time.time_ns() // 1000),
        }
        # consumed only grows, so it orders status documents.
        return [VersionedDoc(self.layout.status(), consumed, orjson.dumps(doc))], False

    def snapshot(self) -> bytes:
        return pickle.dumps(self.totals)


def build_flow(settings: Settings, *, tail: bool = True) -> Dataflow:
    """The dataflow; ``tail=False`` stops at the end of the topic (batch replays, tests)."""
    layout = RedisLayout(settings.redis_prefix)
    lateness_us = round(settings.lateness_days * DAY_US)
    max_future_us = round(settings.max_future_seconds * SECOND_US)
    kafka_config = settings.kafka_client_config()
    brokers = kafka_config.pop("bootstrap.servers").split(",")

    flow = Dataflow("crmscore")
    kafka = kop.input(
        "kafka_in", flow, brokers=brokers, topics=[settings.transactions_topic], tail=tail,
        add_config={**CONSUMER_DEFAULTS, **kafka_config},
    )
    # KafkaSourceMessage(key=customer_id bytes, value=event JSON bytes)
    parsed = op.map("parse", kafka.oks, lambda m: parse(m, max_future_us))
    # Accepted(tx, msg) | Refused(rejection, msg)
    valid = op.branch("is_valid", parsed, is_accepted)
    broken = op.map("kafka_errors", kafka.errs, kafka_error)
    # Refused
    by_customer = op.key_on("by_customer", valid.trues, lambda a: a.tx.customer_id)
    # (customer_id, Accepted)
    results = op.stateful_batch(
        "customers", by_customer,
        lambda resume: CustomerLogic(resume, lateness_us, layout),
    )
    # (customer_id, VersionedDoc | Refused | Counts)
    results = op.key_rm("drop_customer_key", results)
    is_doc = op.branch("is_doc", results, lambda r: isinstance(r, VersionedDoc))
    is_counts = op.branch("is_counts", is_doc.falses, lambda r: isinstance(r, Counts))
    refused_early = op.merge("refused_early", valid.falses, broken)
    refused = op.merge("all_refused", refused_early, is_counts.falses)
    # Refused
    op.output("dead_letters", op.map("to_dead_letter", refused, to_dead_letter),
              DeadLetterSink(settings))
    # Customers count what they refuse; count the rest here.
    counts = op.merge("all_counts", is_counts.trues,
                      op.map("count_refused_early", refused_early, lambda _: Counts(rejected=1)))
    # Counts
    # One item per batch, not per customer, crosses to the single status key.
    counts = op.flat_map_batch("sum_counts", counts, lambda batch: [sum_counts(batch)])
    status = op.stateful_batch(
        "status", op.key_on("status_key", counts, lambda _: "status"),
        lambda resume: StatusLogic(resume, layout),
    )
    # ("status", VersionedDoc)
    docs = op.merge("all_docs", is_doc.trues, op.key_rm("drop_status_key", status))
    op.output("redis", docs, RedisDocSink(settings))
    return flow

