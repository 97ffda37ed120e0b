"""The scoring dataflow: Kafka -> parse -> validate -> customers -> Redis, in event time.

::

    transactions + timers topics
      -> parse (orjson + JSON Schema) / decode wake-ups
      -> customers (key: customer id)    exact state, stage, churn label, due instant
           -> score documents -> Redis   (compare-and-set, never backwards)
           -> refused events  -> dead-letter topic
           -> outcome counts + wake-up registrations (+ cancels) -> clock (one key)
                -> pipeline status -> Redis
                -> ticks + registrations + cancels -> timer buckets (key: hour)
                     -> timers topic
           -> matured labels + population rows (+ counts) -> models (one key)
                -> model bundle + report -> Redis -> read back by customers (model_registry)
           -> alerts (live) -> alerts topic
           -> alerts + their outcomes -> alert report (one key) -> Redis

Every consumed transaction ends in exactly one of three counts, kept in the flow's own
recovered state so they stay exact across crashes: applied (a new valid event),
duplicate (an exact repeat) or rejected (sent to the dead-letter topic with a reason).
Time-driven scores (a silent customer turning at risk, a churn label maturing) follow
the stream's event-time clock through the timer topic (flows/timers.py); the clock is
the watermark of the transactions' partitions (flows/watermark.py).
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeGuard

import bytewax.operators as op
import orjson
from bytewax.connectors.kafka import KafkaError
from bytewax.dataflow import Dataflow, Stream
from bytewax.operators import StatefulBatchLogic

from crmscore import doc_codec
from crmscore.clients import (
    CONSUMER_DEFAULTS,
    SCORING_PREFETCH,
    redis_client,
    topic_partitions,
)
from crmscore.layout import RedisLayout
from crmscore.settings import Settings
from flows.alerting import AlertReportLogic, alert_message, is_published
from flows.batching import Unbatched, to_one_key
from flows.clock import UNPARTITIONED, ClockLogic, Counts, sum_counts
from flows.dead_letters import dead_letter
from flows.kafka_sink import KafkaTopicSink
from flows.kafka_source import (
    SINGLE_PROCESS,
    Message,
    PartitionEnd,
    ProcessShare,
    kafka_input,
)
from flows.live_customers import LiveCustomers
from flows.metrics import DEAD_LETTERS
from flows.model_registry import BundleCache, bundle_doc, shared_cache
from flows.own_sink import output_here
from flows.redis_sink import OnLost, PublishThrottle, RedisDocSink, VersionedDoc
from flows.store_marker import claim_store, raise_store_lost
from flows.timers import (
    Cancel,
    Registration,
    Rescore,
    TimerBucketLogic,
    Wake,
    decode_wake,
    encode_wake,
)
from flows.watermark import IDLE_SECONDS, Watermark
from models.alert_rules import AlertRules, load_rules
from models.alerts import Alert
from models.churn import LabeledExample, make_models
from models.customer import APPLIED, DUPLICATE
from models.outcomes import Outcome
from models.population import Population
from models.scoring import (
    ModelBundle,
    Outputs,
    PopulationRow,
    ScoredCustomer,
    ScoringConfig,
)
from models.transaction import (
    SECOND_US,
    Rejection,
    Transaction,
    format_time,
    parse_transaction,
)

log = logging.getLogger(__name__)

FIT_POLL = timedelta(seconds=1)  # how often an idle models step checks a background fit


@dataclass(slots=True)
class Accepted:
    tx: Transaction
    msg: Message


@dataclass(slots=True)
class Refused:
    rejection: Rejection
    msg: Message


def parse(msg: Message, max_future_us: int, timers_topic: str,
          started_ms: int) -> Accepted | Refused | Wake:
    if msg.topic == timers_topic:
        # Written before this run of the flow started: from before a restart.
        stale = (written_ms := kafka_ms(msg)) is not None and written_ms < started_ms
        try:
            return decode_wake(msg.key, msg.value, stale)
        except ValueError as exc:
            return Refused(Rejection("bad_wake", str(exc)), msg)
    parsed = parse_transaction(msg.value, time.time_ns() // 1000, max_future_us)
    if isinstance(parsed, Rejection):
        return Refused(parsed, msg)
    return Accepted(parsed, msg)


def count_refused(refused: Refused) -> Counts:
    """The count of a transaction refused before its customer (with where it was read)."""
    m = refused.msg
    if m.partition is None or m.offset is None:
        return Counts(rejected=1)
    stamp = kafka_ms(m)
    return Counts(rejected=1, offsets=((m.partition, m.offset),),
                  stamps=() if stamp is None else ((m.partition, stamp),))


def kafka_ms(msg: Message) -> int | None:
    """The message's Kafka timestamp (ms since the epoch), when the broker gave one."""
    stamp = msg.timestamp
    return stamp[1] if stamp is not None and stamp[0] and stamp[1] > 0 else None


def count_end(end: PartitionEnd) -> Counts:
    """A partition read in full, for the stream clock (flows/watermark.py)."""
    return Counts(ends=((end.partition, end.offset),), empty=(end.partition,) if end.first else ())


def is_refused(parsed: Accepted | Refused | Wake) -> TypeGuard[Refused]:
    return isinstance(parsed, Refused)


def customer_of(item: Any) -> str:
    """The customer an accepted event or a wake-up is for."""
    return item.tx.customer_id if isinstance(item, Accepted) else item.customer_id


def kafka_error(err: KafkaError[bytes | None, bytes | None]) -> Refused:
    return Refused(Rejection("kafka_error", f"consumer error: {err.err}"), err.msg)


# A dead letter's Kafka key: the refused message's, cut to this length so that a huge key
# cannot make the letter too big to write (its source partition and offset name it).
MAX_LETTER_KEY_BYTES = 1024


def to_dead_letter(refused: Refused) -> tuple[bytes | None, bytes]:
    DEAD_LETTERS.labels(refused.rejection.code).inc()
    m = refused.msg
    key = None if m.key is None else m.key[:MAX_LETTER_KEY_BYTES]
    return key, dead_letter(refused.rejection, m.topic or "", m.partition or 0,
                            m.offset if m.offset is not None else -1, m.value)



def scoring_config(settings: Settings) -> ScoringConfig:
    return ScoringConfig(churn_horizon_days=settings.churn_horizon_days,
                         clv_horizon_days=settings.clv_horizon_days,
                         lateness_days=settings.lateness_days)


class CustomerLogic(StatefulBatchLogic[Any, Any, bytes]):
    """Applies a customer's events and wake-ups; emits one score document per batch that
    changed it, dead letters for refused events, the batch's outcome counts, the next
    wake-up registration, matured churn labels, the customer's population row, alerts
    and the outcomes of alerts followed up."""

    def __init__(self, resume: bytes | None, bundles: BundleCache, layout: RedisLayout,
                 rules: AlertRules | None, live: LiveCustomers, rewrite: bool = False,
                 compress: bool = True) -> None:
        # The customer unpickled while it is among the recently touched (``live``), and
        # pickled as of its last batch: its snapshot, and all that is kept once it rests.
        # Only a new customer, before its first batch ends, has no bytes yet.
        self.customer: ScoredCustomer | None = None
        self.pickled: bytes | None = resume
        self.live = live
        self.bundles = bundles
        self.layout = layout
        self.compress = compress  # crmscore/doc_codec.py
        self.rules = rules
        # Redis lost the documents (flows/store_marker.py): write this one again at once.
        self.rewrite = rewrite and resume is not None

    def _unpickled(self) -> ScoredCustomer:
        customer = self.customer
        if customer is None:
            assert self.pickled is not None  # a new customer is made in on_batch
            customer = self.customer = pickle.loads(self.pickled)
        self.live.touch(self)
        return customer

    def rest(self) -> None:
        """Keep only the pickled customer (the least recently touched of many)."""
        self.customer = None

    def on_batch(self, values: list[Accepted | Wake]) -> tuple[list[Any], bool]:
        if self.customer is None and self.pickled is None:  # a new customer
            # bytewax does not pass the key: take it from the item
            self.customer = ScoredCustomer(customer_of(values[0]))
        customer = self._unpickled()
        bundle = self.bundles.get()
        out = Outputs()
        emitted: list[Any] = []
        applied = duplicate = rejected = 0
        read: dict[int, int] = {}  # partition -> newest event time applied or repeated
        offsets: dict[int, int] = {}  # partition -> newest offset counted
        stamps: dict[int, int] = {}  # partition -> newest Kafka timestamp counted (ms)
        version = customer.version  # the score changed when this did
        for item in values:
            if isinstance(item, Wake):
                if item.bundle_version:  # the served model changed: rescored below
                    bundle = self.bundles.at_least(item.bundle_version)
                elif item.stale:  # from before a restart: fire it again on this run's clock
                    out.registrations.append((item.customer_id, item.due_us))
                else:
                    customer.wake(item.due_us, bundle, out, self.rules)
                continue
            outcome = customer.apply(item.tx, bundle, out, self.rules)
            if item.msg.partition is not None and item.msg.offset is not None:
                offsets[item.msg.partition] = max(item.msg.offset,
                                                  offsets.get(item.msg.partition, -1))
                if (stamp := kafka_ms(item.msg)) is not None:
                    stamps[item.msg.partition] = max(stamp, stamps.get(item.msg.partition, 0))
            if outcome is APPLIED or outcome is DUPLICATE:
                if outcome is APPLIED:
                    applied += 1
                else:
                    duplicate += 1
                at_us, partition = item.tx.occurred_at_us, item.msg.partition
                if partition is None:  # a message not from Kafka (tests)
                    partition = UNPARTITIONED
                read[partition] = max(at_us, read.get(partition, at_us))
            elif isinstance(outcome, Rejection):
                rejected += 1
                emitted.append(Refused(outcome, item.msg))
        if applied or duplicate or rejected:
            emitted.append(Counts(applied, duplicate, rejected, customer.state.max_event_us,
                                  tuple(read.items()), tuple(offsets.items()),
                                  stamps=tuple(stamps.items())))
        if customer.state.max_event_us is None:  # only wake-ups for a customer never seen
            self.live.forget(self)
            return emitted, StatefulBatchLogic.DISCARD
        # A score from before the served model or fit changed is redone: on a rescore wake,
        # or on any batch that did not rescore (a wake that only closed an alert's outcome
        # window).
        customer.rescore(bundle, out, self.rules)
        if customer.version != version:
            emitted.append(self._document(customer, bundle, out))
        customer.register(bundle, out)
        emitted += [Cancel(*c) for c in out.cancellations]
        emitted += [Registration(*r, bundle.version) for r in out.registrations]
        emitted += out.labels
        emitted += out.population[-1:]  # the newest row replaces the older ones anyway
        emitted += out.alerts
        emitted += out.outcomes
        self.pickled = pickle.dumps(customer, protocol=pickle.HIGHEST_PROTOCOL)
        return emitted, StatefulBatchLogic.RETAIN

    def _document(self, customer: ScoredCustomer, bundle: ModelBundle,
                  out: Outputs) -> VersionedDoc:
        cid = customer.customer_id
        doc = out.doc  # built for an alert at the newest instant, if any
        if doc is None or doc["version"] != customer.version:
            doc = customer.document(bundle, out)
        self.rewrite = False
        stored = orjson.dumps(doc)
        if self.compress:
            stored = doc_codec.encode(stored)
        return VersionedDoc(self.layout.score(cid), customer.version, stored,
                            self.layout.updates(cid))

    def notify_at(self) -> datetime | None:
        return datetime.now(UTC) if self.rewrite else None

    def on_notify(self) -> tuple[list[Any], bool]:
        if not self.rewrite:  # only a resumed customer rewrites
            return [], StatefulBatchLogic.RETAIN
        customer = self._unpickled()
        return [self._document(customer, self.bundles.get(), Outputs())], StatefulBatchLogic.RETAIN

    def snapshot(self) -> bytes:
        """The customer pickled at the end of its last batch (bytes: an immutable copy,
        cheaper than bytewax's deepcopy).

        bytewax snapshots every key touched in an epoch in the pause that ends it, while
        new events wait. Pickled there, ~900 customers at 1,000 events/s made that pause
        55-65 ms, the freshness p99. Pickled at the end of each batch, the same work is
        spread over the epoch; a customer with several batches in one epoch is pickled
        more than once, which left replay throughput within noise. The bytes are kept:
        they are the customer once it rests (flows/live_customers.py)."""
        assert self.pickled is not None  # on_batch ends by pickling, or discards
        return self.pickled


class ModelsLogic(StatefulBatchLogic[LabeledExample | PopulationRow | Counts, Any, bytes]):
    """Learns churn models from matured labels and the population from customers' rows,
    on the stream clock that the customers' counts give (flows/watermark.py, as in the
    clock step); publishes the model bundle and report every ``publish_seconds`` (wall
    clock), and a :class:`~flows.timers.Rescore` with a bundle that serves another model
    than the last one published, or a BTYD refit once the flow has caught up with its
    input. With ``frozen`` model updates the bundle is published as the candidate, not
    served, and nobody is rescored.

    Why sweep a refit in: its parameters change every customer's ``p_alive`` and CLV (and
    churn risk, from a BTYD model), and a customer scored before it kept the older ones
    until their next instant, up to a week of event time (in a replay, where the fits
    trail the racing clock, longer). So customers ranked side by side (a campaign's top
    CLV) were scored by different fits. A refit comes every
    ``CRMSCORE_BTYD_REFIT_DAYS`` (a week) of event time: live, one rescoring a week per
    waiting customer, at ``CRMSCORE_RESCORE_RATE``. A replay sweeps in only the fit it
    ends with, not one every few seconds of its catch-up."""

    def __init__(self, resume: bytes | None, config: ScoringConfig, layout: RedisLayout,
                 publish_seconds: float, refit_days: float, frozen: bool,
                 challengers: str, idle_seconds: float = IDLE_SECONDS,
                 partitions: Collection[int] = ()) -> None:
        if resume is None:
            self.population = Population(config, refit_days=refit_days, challengers=challengers)
            self.watermark = Watermark()
        else:
            state = pickle.loads(resume)
            # Snapshots from before the watermark: the population alone.
            self.population, self.watermark = (
                state if isinstance(state, tuple) else (state, Watermark(clock_us=state.clock_us)))
            self.population.use_challengers(challengers)
        self.watermark.idle_seconds = idle_seconds
        self.watermark.partitions = frozenset(partitions)
        self.layout = layout
        self.throttle = PublishThrottle(publish_seconds, resumed=resume is not None)
        self.frozen = frozen
        # The served model of the last bundle published (a resumed step assumes it was
        # published before the restart: customers scored with it then).
        self.served = self.population.bundle_version_name()
        self.unswept_fit = False  # a refit taken, everyone's rescoring with it not yet asked
        self.announced_from = self.population.rescore_from  # the newest sweep sent the clock

    def on_batch(self, values: list[LabeledExample | PopulationRow | Counts]
                 ) -> tuple[list[Any], bool]:
        population = self.population
        for item in values:
            if isinstance(item, PopulationRow):
                population.observe(item)
            elif isinstance(item, Counts):
                item.observed_by(self.watermark)
            else:
                population.learn(item)
        return self._advance()

    def on_notify(self) -> tuple[list[Any], bool]:
        # A quiet partition may let the clock move on; a fit may have finished.
        return self._advance()

    def _advance(self) -> tuple[list[Any], bool]:
        self.population.advance(self.watermark.advance())
        if self.population.maybe_refit():
            self.unswept_fit = True
        return self._publish(), StatefulBatchLogic.RETAIN

    def _caught_up(self) -> bool:
        return all(self.watermark.read_in_full(p) for p in self.watermark.partitions)

    def notify_at(self) -> datetime | None:
        candidates = [self.throttle.retry_at()]
        if self.population.fitting:  # collect the fit without new input
            candidates.append(datetime.now(UTC) + FIT_POLL)
        candidates.append(self.watermark.quiet_at())  # a quiet partition may move the clock
        return min((at for at in candidates if at is not None), default=None)

    def _publish(self) -> list[VersionedDoc | Rescore]:
        population = self.population
        if self.unswept_fit and self._caught_up() and not self.frozen:
            population.rescore_all()  # published now, or at the throttle's next turn
            self.unswept_fit = False
        if not self.throttle.due(population.version):
            return []
        served = population.bundle_version_name()
        promoted = served != self.served and not self.frozen
        if promoted:
            population.rescore_all()
        report = population.report(format_time(time.time_ns() // 1000))
        bundle = population.bundle()
        out: list[VersionedDoc | Rescore] = [
            bundle_doc(self.layout, bundle, frozen=self.frozen),
            VersionedDoc(self.layout.model_report(), population.version,
                         orjson.dumps(report, option=orjson.OPT_SERIALIZE_NUMPY))]
        if bundle.rescore_from > self.announced_from:
            fit = population.btyd
            why = (f"served model {self.served} -> {served}" if promoted else
                   f"BTYD refit of {format_time(fit.fitted_at_us) if fit else '?'}")
            log.info("%s: rescoring waiting customers (bundle %d)", why, bundle.version)
            out.append(Rescore(bundle.version))
            self.announced_from = bundle.rescore_from
        self.served = served
        return out

    def snapshot(self) -> bytes:
        return pickle.dumps((self.population, self.watermark), protocol=pickle.HIGHEST_PROTOCOL)


def _instance_of(kind: type) -> Callable[[Any], bool]:
    return lambda x: isinstance(x, kind)


def split(step_id: str, stream: Stream[Any], *kinds: type) -> list[Stream[Any]]:
    """One stream per kind (by isinstance, in order), then one of everything else."""
    streams = []
    for kind in kinds:
        branch: op.BranchOut[Any, Any] = op.branch(f"{step_id}_{kind.__name__}", stream,
                                                   _instance_of(kind))
        streams.append(branch.trues)
        stream = branch.falses
    return [*streams, stream]


def build_flow(settings: Settings, *, tail: bool = True, on_lost: OnLost = raise_store_lost,
               rewrite_store: bool = False, share: ProcessShare = SINGLE_PROCESS) -> Dataflow:
    """The dataflow; ``tail=False`` stops at the end of the topics (batch replays, tests);
    ``share``: the Kafka partitions this process of a cluster reads.

    ``on_lost`` is called when Redis loses the flow's data while it runs; resumed
    customers rewrite their documents if it had lost them before the start, or with
    ``rewrite_store`` (flows/store_marker.py).
    """
    layout = RedisLayout(settings.redis_prefix)
    config = scoring_config(settings)
    max_future_us = round(settings.max_future_seconds * SECOND_US)
    kafka_config = settings.kafka_client_config()
    brokers = kafka_config.pop("bootstrap.servers").split(",")
    timers_topic = settings.timers_topic
    started_ms = time.time_ns() // 1_000_000  # wake-ups written before are stale
    rules = load_rules(settings.alert_rules or None)  # a bad file stops the start here
    make_models(settings.churn_models)  # so does an unknown model family
    compress = doc_codec.compression_on(settings.doc_compression)  # and a bad value here
    bundles = shared_cache(settings, ModelBundle(config=config))  # frozen: read here, once
    live_customers = LiveCustomers(settings.live_customers)
    with redis_client(settings) as client:
        rewrite = claim_store(client, layout) or rewrite_store
    if rewrite:
        log.warning("Redis holds no marker of this flow (a first start, or Redis lost its "
                    "data): customers resumed from a snapshot rewrite their documents")

    # The partitions that hold the stream clock (flows/watermark.py).
    partitions = topic_partitions(settings, settings.transactions_topic)
    flow = Dataflow("crmscore")
    kafka = kafka_input(
        "kafka_in", flow, brokers=brokers, topics=[settings.transactions_topic, timers_topic],
        tail=tail, add_config=kafka_config,
        consumer_config={**CONSUMER_DEFAULTS, **SCORING_PREFETCH}, share=share,
    )
    # KafkaSourceMessage(key=customer_id bytes, value=event JSON or due instant bytes)
    parsed = op.map("parse", kafka.oks, lambda m: parse(m, max_future_us, timers_topic, started_ms))
    # Accepted(tx, msg) | Refused(rejection, msg) | Wake(customer_id, due_us)
    refused_or_not = op.branch("is_refused", parsed, is_refused)
    broken = op.map("kafka_errors", kafka.errs, kafka_error)
    by_customer = op.key_on("by_customer", refused_or_not.falses, customer_of)
    # (customer_id, Accepted | Wake)
    results = op.stateful_batch(
        "customers", by_customer,
        lambda resume: CustomerLogic(resume, bundles, layout, rules, live_customers, rewrite,
                                     compress),
    )
    results = op.key_rm("drop_customer_key", results)
    scores, refused_late, counts, registrations, cancels, alerts, outcomes, learning = split(
        "customer_out", results, VersionedDoc, Refused, Counts, Registration, Cancel, Alert,
        Outcome)
    # learning: LabeledExample | PopulationRow; counts: Counts (the models step's clock)

    live = op.filter("live_alerts", alerts, is_published)
    output_here("alerts_out", op.map("alert_message", live, alert_message),
                KafkaTopicSink(settings, settings.alerts_topic, share))
    alert_report = op.stateful_batch(
        "alert_report",
        to_one_key("alert_report", op.merge("alert_report_in", alerts, outcomes), "alerts"),
        lambda resume: Unbatched(AlertReportLogic(resume, layout, settings.model_publish_seconds)),
    )

    refused_early = op.merge("refused_early", refused_or_not.trues, broken)
    refused = op.merge("all_refused", refused_early, refused_late)
    output_here("dead_letters", op.map("to_dead_letter", refused, to_dead_letter),
                KafkaTopicSink(settings, settings.dlq_topic, share))

    # Customers count what they refuse; count the transactions refused before them here
    # (a malformed wake-up is not a transaction: dead-lettered, not counted).
    refused_transactions = op.filter("refused_transactions", refused_early,
                                     lambda r: r.msg.topic != timers_topic)
    counts = op.merge("all_counts", counts,
                      op.map("count_refused_early", refused_transactions, count_refused),
                      op.map("count_ends", op.filter("transaction_ends", kafka.ends,
                                                     lambda end: end.topic != timers_topic),
                             count_end))
    # One item per batch, not per customer, crosses to the single clock key.
    counts = op.flat_map_batch("sum_counts", counts, lambda batch: [sum_counts(batch)])

    models = op.stateful_batch(
        "models",
        to_one_key("models", op.merge("models_in", learning, counts), "models"),
        lambda resume: Unbatched(ModelsLogic(
            resume, config, layout, settings.model_publish_seconds, settings.btyd_refit_days,
            bundles.frozen, settings.churn_models, settings.partition_idle_seconds,
            partitions)),
    )
    model_docs, rescores = split("models_out", op.key_rm("drop_models_key", models),
                                 VersionedDoc)

    clock_in = op.merge("clock_in", counts, registrations, cancels, rescores)
    clock_out = op.stateful_batch(
        "clock",
        to_one_key("clock", clock_in, "clock"),
        lambda resume: Unbatched(ClockLogic(resume, layout, settings.rescore_rate,
                                            settings.partition_idle_seconds, partitions)),
    )
    status, due_now, to_buckets = split("clock_out", op.key_rm("drop_clock_key", clock_out),
                                        VersionedDoc, Wake)
    # to_buckets: (bucket, Registration | Tick | RescoreAll)
    fired = op.stateful_batch("timers", to_buckets, TimerBucketLogic)
    wakes = op.merge("wakes", due_now, op.key_rm("drop_bucket_key", fired))
    output_here("wake_ups", op.map("encode_wake", wakes, encode_wake),
                KafkaTopicSink(settings, timers_topic, share))

    docs = op.merge("all_docs", scores, status, model_docs,
                    op.key_rm("drop_alert_report_key", alert_report))
    output_here("redis", docs, RedisDocSink(settings, on_lost, share))
    return flow
