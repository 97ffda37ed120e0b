"""Per-customer scoring in event time (models/scoring.py) and its timers (flows/timers.py)."""

from __future__ import annotations

import copyreg
import io
import pickle
import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from flows.clock import ClockLogic, Counts
from flows.timers import BUCKET_US, Cancel, Registration, Tick, TimerBucketLogic, Wake
from models.alert_rules import load_rules
from models.churn_features import FEATURE_NAMES
from models.scoring import EMPTY_BUNDLE, Outputs, ScoredCustomer
from models.transaction import DAY_US, MICROS, Transaction

HORIZON_US = EMPTY_BUNDLE.config.horizon_us


def purchase(day: float, n: int, refund: bool = False) -> Transaction:
    return Transaction(f"e{n}", "c", round(day * DAY_US), refund, 20 * MICROS, "EUR",
                       f"e{n}".encode())


def run(events: list[Transaction], end_us: int, wakes_on_time: bool) -> tuple[object, ...]:
    """Feed ``events``; with ``wakes_on_time`` every registered wake-up is delivered as
    soon as the clock (the newest event time) passes it, else only at ``end_us``."""
    customer, out = ScoredCustomer("c"), Outputs()
    clock = None
    for tx in events:
        clock = tx.occurred_at_us if clock is None else max(clock, tx.occurred_at_us)
        if wakes_on_time:
            while customer.registered_us is not None and customer.registered_us <= clock:
                customer.wake(customer.registered_us, EMPTY_BUNDLE, out)
                customer.register(EMPTY_BUNDLE, out)
        customer.apply(tx, EMPTY_BUNDLE, out)
        customer.register(EMPTY_BUNDLE, out)
    customer.wake(end_us, EMPTY_BUNDLE, out)
    labels = [(x.opened_at_us, x.label, x.matured_at_us) for x in out.labels]
    return customer.stage, customer.as_of_us, out.transitions, labels


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(0, 700), min_size=1, max_size=25))
@example([0.0, 0.0, 0.0, 30.0])  # a wake-up due exactly at an event's time
def test_wakes_and_catch_up_give_the_same_history(days):
    """Replaying at full speed (wake-ups arrive late) = running live (they arrive on time)."""
    events = [purchase(d, i) for i, d in enumerate(sorted(days))]
    end = 800 * DAY_US
    assert run(events, end, wakes_on_time=True) == run(events, end, wakes_on_time=False)


def test_labels_mature_on_the_next_purchase_or_when_the_clock_passes_the_horizon():
    customer, out = ScoredCustomer("c"), Outputs()
    customer.apply(purchase(0, 1), EMPTY_BUNDLE, out)
    customer.apply(purchase(30, 2), EMPTY_BUNDLE, out)  # bought again within 90 days: 0
    assert [(x.label, x.matured_at_us) for x in out.labels] == [(0, 30 * DAY_US)]
    due = 30 * DAY_US + HORIZON_US + 1  # the clock must pass day 120
    assert not customer.wake(due - 2, EMPTY_BUNDLE, out) or len(out.labels) == 1
    customer.wake(due, EMPTY_BUNDLE, out)
    assert [(x.label, x.matured_at_us) for x in out.labels][-1] == (1, 30 * DAY_US + HORIZON_US)
    # Silent now: a new prediction opens at that instant, with the silence in its features.
    assert customer.pending.opened_at_us == due
    features = dict(zip(FEATURE_NAMES, customer.pending.features, strict=True))
    assert features["recency_days"] > 89.9


def test_a_silent_customer_turns_at_risk_then_churned_and_comes_back_reactivated():
    customer, out = ScoredCustomer("c"), Outputs()
    for i, day in enumerate((0, 10, 20, 30, 40)):
        customer.apply(purchase(day, i), EMPTY_BUNDLE, out)
    stages = []
    while (due := customer.next_due_us(EMPTY_BUNDLE)) is not None:
        customer.wake(due, EMPTY_BUNDLE, out)
        stages.append(customer.stage.name)
    assert stages[-1] == "churned" and "at_risk" in stages
    # Wake-ups stop once silence exceeds max_silence_days: nothing is due forever.
    cfg = EMPTY_BUNDLE.config
    assert customer.as_of_us <= (40 + cfg.max_silence_days + cfg.churn_horizon_days + 1) * DAY_US
    customer.apply(purchase(customer.as_of_us / DAY_US + 1, 9), EMPTY_BUNDLE, out)
    assert customer.stage.name == "reactivated"
    kinds = [(t.old, t.new) for t in out.transitions]
    assert kinds[-3:] == [("active", "at_risk"), ("at_risk", "churned"),
                          ("churned", "reactivated")]


def test_register_asks_when_the_instant_moves_and_cancels_the_one_it_replaces():
    customer, out = ScoredCustomer("c"), Outputs()
    customer.apply(purchase(0, 1), EMPTY_BUNDLE, out)
    customer.register(EMPTY_BUNDLE, out)
    assert out.registrations == [("c", 30 * DAY_US)]  # one typical gap, and no longer new
    customer.apply(purchase(5, 2), EMPTY_BUNDLE, out)  # a faster rhythm moves the instant
    customer.register(EMPTY_BUNDLE, out)
    moved = customer.registered_us
    assert moved is not None and moved < 30 * DAY_US and out.registrations[-1] == ("c", moved)
    assert out.cancellations == [("c", 30 * DAY_US)]  # its wake-up would find nothing due
    customer.register(EMPTY_BUNDLE, out)  # the instant has not moved: nothing to send
    assert len(out.registrations) == 2 and len(out.cancellations) == 1
    customer.wake(moved, EMPTY_BUNDLE, out)  # woken at its instant: nothing to cancel
    customer.register(EMPTY_BUNDLE, out)
    assert len(out.registrations) == 3 and out.registrations[-1][1] > moved
    assert len(out.cancellations) == 1


def test_a_wake_up_fired_late_processes_the_whole_chain_of_instants_up_to_the_clock():
    """A silent customer's instants are registered one after the other; when the clock
    is far ahead (a replay), one wake-up carries it and the customer processes every
    instant up to it, as the same wake-ups one by one would have."""
    from crmscore.layout import RedisLayout

    def silent_customer() -> ScoredCustomer:
        customer, out = ScoredCustomer("c"), Outputs()
        for i, day in enumerate((0, 10, 20, 30)):
            customer.apply(purchase(day, i), EMPTY_BUNDLE, out)
        customer.register(EMPTY_BUNDLE, out)
        return customer

    chained, one_by_one = silent_customer(), silent_customer()
    first = chained.registered_us
    clock_us = 400 * DAY_US
    clock = ClockLogic(None, RedisLayout("t:"))
    out, _ = clock.on_batch([Counts(applied=1, clock_us=clock_us), Registration("c", first)])
    (wake,) = [o for o in out if isinstance(o, Wake)]
    assert wake == Wake("c", clock_us)
    chained_out, step_out = Outputs(), Outputs()
    chained.wake(wake.due_us, EMPTY_BUNDLE, chained_out)
    trips = 0
    while one_by_one.registered_us is not None and one_by_one.registered_us <= clock_us:
        one_by_one.wake(one_by_one.registered_us, EMPTY_BUNDLE, step_out)
        one_by_one.register(EMPTY_BUNDLE, step_out)
        trips += 1
    assert trips >= 5  # the round trips a wake-up per instant would have cost
    assert chained.as_of_us == one_by_one.as_of_us and chained.stage == one_by_one.stage
    assert chained_out.transitions == step_out.transitions
    assert chained_out.labels == step_out.labels and chained_out.labels


def test_a_cancel_drops_the_registration_it_names_until_the_tick():
    bucket = TimerBucketLogic(None)
    bucket.on_batch([Registration("a", 5), Registration("b", 7), Cancel("a", 5),
                     Cancel("b", 6)])  # not b's instant: b stays
    resumed = TimerBucketLogic(bucket.snapshot())
    assert resumed.held == {("b", 7): Registration("b", 7)} and not resumed.closed
    older = TimerBucketLogic((False, {Registration("b", 7)}, None))  # before session 26
    assert older.held == resumed.held
    assert TimerBucketLogic(older.snapshot()).held == resumed.held
    fired, _ = resumed.on_batch([Tick(BUCKET_US)])
    assert fired == [Wake("b", BUCKET_US)]  # up to the clock that ticked it
    assert resumed.on_batch([Cancel("b", 7)])[0] == []  # it fired already: nothing to do


def test_the_clock_sends_a_cancel_to_its_open_hour_only():
    from crmscore.layout import RedisLayout

    clock = ClockLogic(None, RedisLayout("t:"))
    clock.on_batch([Counts(applied=1, clock_us=10 * BUCKET_US + 5),
                    Registration("a", 11 * BUCKET_US + 1)])
    out, _ = clock.on_batch([Cancel("a", 11 * BUCKET_US + 1), Cancel("z", 40 * BUCKET_US)])
    assert out == [("11", Cancel("a", 11 * BUCKET_US + 1))]  # hour 40 was never sent any
    assert clock.buckets.held() == {11: 0}  # the rescore pacing counts what is left


def lived_customer() -> ScoredCustomer:
    """A customer with every part of its state set: stage, open label, risk, alert
    memory and followed alerts (the default rules), a refund, a registered wake-up."""
    rules = load_rules(None)
    customer, out = ScoredCustomer("c"), Outputs()
    for n, day in enumerate((0, 9, 20, 31, 45)):
        customer.apply(purchase(day, n), EMPTY_BUNDLE, out, rules)
        customer.register(EMPTY_BUNDLE, out)
    customer.apply(purchase(46, 9, refund=True), EMPTY_BUNDLE, out, rules)
    customer.wake(100 * DAY_US, EMPTY_BUNDLE, out, rules)  # silent: at risk, alerted
    customer.register(EMPTY_BUNDLE, out)
    assert customer.stage and customer.pending and customer.followups.items
    assert customer.alerts.fired and customer.registered_us
    return customer


def state_of(c: ScoredCustomer) -> tuple[object, ...]:
    return (c.state.__getstate__(), c.stage, c.pending, c.risk, c.as_of_us, c.steps,
            c.registered_us, c.key_hash, c.alerts.__getstate__(), c.followups.items)


def continues_alike(a: ScoredCustomer, b: ScoredCustomer) -> None:
    rules = load_rules(None)
    outs = []
    for c in (a, b):
        out = Outputs()
        c.apply(purchase(104, 20), EMPTY_BUNDLE, out, rules)  # back: an outcome, alerts
        outs.append((c.document(EMPTY_BUNDLE, out), out.alerts, out.outcomes, out.labels))
    assert outs[0] == outs[1]


def test_scored_customer_pickles_round_trip():
    customer = lived_customer()
    back = pickle.loads(pickle.dumps(customer, protocol=pickle.HIGHEST_PROTOCOL))
    assert state_of(back) == state_of(customer)
    continues_alike(customer, back)


def test_snapshots_of_the_previous_format_still_load():
    """Before ScoredCustomer.__reduce__, a snapshot held the objects in _STATE order."""

    class OldFormat(pickle.Pickler):
        def reducer_override(self, obj: object) -> object:
            if type(obj) is not ScoredCustomer:
                return NotImplemented
            return (copyreg.__newobj__, (ScoredCustomer,),
                    tuple(getattr(obj, name) for name in ScoredCustomer._STATE))

    customer = lived_customer()
    buffer = io.BytesIO()
    OldFormat(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(customer)
    old = pickle.loads(buffer.getvalue())
    assert state_of(old) == state_of(customer)
    continues_alike(customer, old)


def test_timer_bucket_holds_until_its_tick_then_fires_late_registrations_at_once():
    bucket = TimerBucketLogic(None)
    assert bucket.on_batch([Registration("a", 5), Registration("b", 7)])[0] == []
    fired, _ = bucket.on_batch([Tick(BUCKET_US)])
    assert sorted(fired) == [Wake("a", BUCKET_US), Wake("b", BUCKET_US)]  # up to the tick
    resumed = TimerBucketLogic(bucket.snapshot())
    assert resumed.on_batch([Registration("c", 9)])[0] == [Wake("c", 9)]


def test_clock_fires_due_registrations_and_ticks_the_passed_hours_holding_some():
    from crmscore.layout import RedisLayout

    def routed(out: list[object]) -> list[tuple[str, object]]:
        return [o for o in out if isinstance(o, tuple) and not hasattr(o, "_fields")]

    clock = ClockLogic(None, RedisLayout("t:"))
    out, _ = clock.on_batch([Counts(applied=1, clock_us=10 * BUCKET_US + 5),
                             Registration("a", 11 * BUCKET_US + 1)])
    assert routed(out) == [("11", Registration("a", 11 * BUCKET_US + 1))]
    out, _ = clock.on_batch([Registration("b", 10 * BUCKET_US),  # already due
                             Registration("c", 13 * BUCKET_US + 1),
                             Counts(applied=1, clock_us=12 * BUCKET_US + 3)])
    assert Wake("b", 12 * BUCKET_US + 3) in out  # due at hour 10: woken up to the clock
    assert ("13", Registration("c", 13 * BUCKET_US + 1)) in routed(out)
    assert [k for k, v in routed(out) if isinstance(v, Tick)] == ["11"]  # 10 and 12 held none
    resumed = ClockLogic(clock.snapshot(), RedisLayout("t:"))
    out, _ = resumed.on_batch([Counts(applied=1, clock_us=10**6 * BUCKET_US)])
    assert [k for k, v in routed(out) if isinstance(v, Tick)] == ["13"]  # decades: one tick


def test_a_wake_up_written_before_the_flow_started_is_registered_again_not_processed(
        redis_conn, unique):
    from bytewax.connectors.kafka import KafkaSourceMessage

    from crmscore.layout import RedisLayout
    from flows.live_customers import LiveCustomers
    from flows.model_registry import BundleCache
    from flows.scoring import Accepted, CustomerLogic, parse

    def wake_message(written_ms: int) -> KafkaSourceMessage[bytes, bytes]:
        return KafkaSourceMessage(b"c", str(40 * DAY_US).encode(), topic="timers",
                                  timestamp=(1, written_ms))

    started_ms = 1_800_000_000_000
    stale, fresh = (parse(wake_message(started_ms + d), 0, "timers", started_ms)
                    for d in (-1, 0))
    assert stale == Wake("c", 40 * DAY_US, stale=True) and fresh == Wake("c", 40 * DAY_US)

    layout = RedisLayout(f"{unique}:")  # no bundle published there: the empty one is used
    logic = CustomerLogic(None, BundleCache(redis_conn, layout, EMPTY_BUNDLE), layout, None,
                          LiveCustomers(10))
    for day in (0, 10, 20):  # a rhythm of 10 days: due to be rescored before day 40
        logic.on_batch([Accepted(purchase(day, day), wake_message(0))])
    as_of = logic.customer.as_of_us if logic.customer else None
    out, _ = logic.on_batch([stale])
    assert logic.customer is not None and logic.customer.as_of_us == as_of  # not woken
    assert out == [Registration("c", 40 * DAY_US)]  # the restarted clock fires it again
    logic.on_batch([fresh])
    assert logic.customer.as_of_us is not None and logic.customer.as_of_us > as_of


def test_a_customer_snapshot_is_its_state_after_its_last_batch_and_is_how_it_rests(
        redis_conn, unique):
    from dataclasses import replace

    from bytewax.connectors.kafka import KafkaSourceMessage

    from crmscore.layout import RedisLayout
    from flows.live_customers import LiveCustomers
    from flows.model_registry import BundleCache
    from flows.scoring import Accepted, CustomerLogic

    layout = RedisLayout(f"{unique}:")
    cache = BundleCache(redis_conn, layout, EMPTY_BUNDLE)
    live = LiveCustomers(limit=1)
    logic = CustomerLogic(None, cache, layout, None, live)
    message = KafkaSourceMessage(b"c", b"", topic="tx")
    logic.on_batch([Accepted(purchase(0, 0), message)])
    logic.on_batch([Accepted(purchase(10, 1), message)])
    snapshot = logic.snapshot()  # pickled at the end of the second batch
    assert logic.snapshot() is snapshot  # no batch since: the same bytes
    assert logic.customer is not None and pickle.loads(snapshot).version == logic.customer.version

    # A second customer touched with a limit of one puts the first to rest: only its bytes.
    other = CustomerLogic(None, cache, layout, None, live)
    other.on_batch([Accepted(replace(purchase(5, 2), customer_id="d"), message)])
    assert logic.customer is None and logic.pickled is snapshot and len(live) == 1
    assert other.customer is not None

    # Its next batch unpickles it and goes on from there, as if it had never rested; and
    # a customer resumed from its snapshot rests until its first batch.
    resumed = CustomerLogic(snapshot, cache, layout, None, LiveCustomers(10))
    assert resumed.customer is None
    unbounded = CustomerLogic(None, cache, layout, None, LiveCustomers(10))
    for n, day in enumerate((0, 10, 20)):
        unbounded.on_batch([Accepted(purchase(day, n), message)])
    for each in (logic, resumed):
        out, _ = each.on_batch([Accepted(purchase(20, 2), message)])
        assert each.customer is not None and unbounded.customer is not None
        assert each.customer.version == unbounded.customer.version
        assert each.snapshot() == unbounded.snapshot()
    assert other.customer is None  # the least recently touched now


def test_a_wake_up_before_1970_survives_the_timers_topic_and_garbage_does_not():
    from flows.timers import decode_wake, encode_wake

    # The JSON Schema accepts events that old; their customers' due instants are negative.
    wake = Wake("p062", -37_565_234_059_947_479)
    assert decode_wake(*encode_wake(wake)) == wake
    for value in (b"-", b"--5", b"5-", b"-x", b""):
        with pytest.raises(ValueError, match="not a wake-up"):
            decode_wake(b"c", value)


def test_a_clock_snapshot_without_open_hours_still_ticks_the_next_hours():
    from crmscore.layout import RedisLayout

    older = pickle.dumps(Counts(applied=1, clock_us=100 * BUCKET_US + 5))  # totals only
    clock = ClockLogic(older, RedisLayout("t:"))
    out, _ = clock.on_batch([Counts(applied=1, clock_us=103 * BUCKET_US)])
    ticked = [o[0] for o in out if isinstance(o, tuple) and isinstance(o[-1], Tick)]
    assert ticked == ["100", "101", "102"]
    assert clock.totals.applied == 2


class ConstantModel:
    """A churn model that always says ``risk`` (the contract of models.churn)."""

    name = "constant"
    max_pickle_bytes = 1024

    def __init__(self, risk: float) -> None:
        self.risk = risk

    def predict_proba_one(self, x: object) -> float:
        return self.risk

    def learn_one(self, x: object, y: int) -> None:
        pass

    def clone(self) -> ConstantModel:
        return ConstantModel(self.risk)


def test_a_rescore_serves_the_new_model_at_the_same_instant_once():
    from dataclasses import replace

    customer, out = ScoredCustomer("c"), Outputs()
    for n, day in enumerate((0, 10, 20)):
        customer.apply(purchase(day, n), EMPTY_BUNDLE, out)
    as_of, version, risk = customer.as_of_us, customer.version, customer.risk
    assert risk == EMPTY_BUNDLE.base_rate
    promoted = replace(EMPTY_BUNDLE, version=2, rescore_from=2,
                       models={"constant": ConstantModel(0.9)},
                       champion="constant", model_version="constant@v1")

    assert customer.rescore(promoted, out)
    assert customer.risk == 0.9 and customer.as_of_us == as_of and customer.version > version
    doc = customer.document(promoted, Outputs())
    assert doc["churn_risk"] == 0.9 and doc["model_version"] == "constant@v1"
    rescored_version = customer.version
    assert not customer.rescore(promoted, out)  # a second rescore wake: nothing to change
    assert customer.version == rescored_version
    assert not ScoredCustomer("x").rescore(promoted, out)  # never seen: nothing to rescore

    # Newer bundles that serve the same: nothing to change; one that sweeps a refit in
    # (the same model, other parameters): scored again.
    learned_more = replace(promoted, version=5)
    assert not customer.rescore(learned_more, out)
    refitted = replace(promoted, version=7, rescore_from=7,
                       models={"constant": ConstantModel(0.7)})
    assert customer.rescore(refitted, out) and customer.risk == 0.7
    assert customer.as_of_us == as_of and customer.scored_by == 7

    # Snapshots from before the bundle version was kept (none kept, or the model's name)
    # load, and their first rescore goes through.
    restore, (flat,) = customer.__reduce__()
    for older in (restore(flat[:-1]), restore((*flat[:-1], "constant@v1"))):
        assert older.scored_by is None and older.risk == 0.7
        assert older.rescore(refitted, out) and older.scored_by == 7


def test_a_rescore_reaches_every_registration_held_and_keeps_them():
    from crmscore.layout import RedisLayout
    from flows.timers import Rescore, RescoreAll, decode_wake, encode_wake

    clock = ClockLogic(None, RedisLayout("t:"), rescore_rate=2.0)
    routed, _ = clock.on_batch([Counts(applied=1, clock_us=BUCKET_US),
                                Registration("a", 2 * BUCKET_US + 1),
                                Registration("a2", 2 * BUCKET_US + 5),
                                Registration("a3", 2 * BUCKET_US + 9),
                                Registration("b", 5 * BUCKET_US + 1),
                                Registration("z", 9 * BUCKET_US + 1)])
    before = time.time()
    out, _ = clock.on_batch([Rescore(7)])
    assert [(k, v.bundle_version) for k, v in out] == [("2", 7), ("5", 7), ("9", 7)]
    # 2 a second: hour 2's three registrations first, hour 5's one 1.5 s later, then 9's.
    first, second, third = (v.fire_at_s for _, v in out)
    assert before <= first <= time.time()
    assert second == pytest.approx(first + 1.5) and third == pytest.approx(first + 2.0)
    # The counts survive a snapshot; an older snapshot's hours (no counts) fire together.
    resumed = ClockLogic(clock.snapshot(), RedisLayout("t:"), rescore_rate=2.0)
    assert [v.fire_at_s - out[0][1].fire_at_s for _, v in resumed.on_batch([Rescore(8)])[0]
            ] == pytest.approx([0.0, 1.5, 2.0], abs=0.5)
    older = ClockLogic(pickle.dumps((clock.totals, [2, 5, 9])), RedisLayout("t:"), 2.0)
    times = [v.fire_at_s for _, v in older.on_batch([Rescore(8)])[0]]
    assert len(times) == 3 and max(times) - min(times) < 0.5
    at_once = ClockLogic(clock.snapshot(), RedisLayout("t:"), rescore_rate=0.0)
    times = [v.fire_at_s for _, v in at_once.on_batch([Rescore(8)])[0]]
    assert max(times) - min(times) < 0.5
    # Scored with an older bundle after the broadcast: rescored at once, and registered.
    out, _ = clock.on_batch([Registration("c", 3 * BUCKET_US, 6),
                             Registration("d", 3 * BUCKET_US, 7)])
    assert out == [Wake("c", 0, bundle_version=7),
                   ("3", Registration("c", 3 * BUCKET_US, 6)),
                   ("3", Registration("d", 3 * BUCKET_US, 7))]

    bucket = TimerBucketLogic(None)
    bucket.on_batch([Registration("a", 5), Registration("b", 7)])
    fired, _ = bucket.on_batch([RescoreAll(7)])
    assert sorted(fired) == [Wake("a", 5, bundle_version=7), Wake("b", 7, bundle_version=7)]
    assert [decode_wake(*encode_wake(w)) for w in sorted(fired)] == [
        Wake("a", 0, bundle_version=7), Wake("b", 0, bundle_version=7)]
    fired, _ = bucket.on_batch([Tick(BUCKET_US)])  # still held: they fire on time too
    assert sorted(fired) == [Wake("a", BUCKET_US), Wake("b", BUCKET_US)]
    assert bucket.on_batch([RescoreAll(8)])[0] == []  # a closed bucket holds nobody


def test_a_bucket_fires_its_rescore_wakes_at_their_time_and_snapshots_them():
    from datetime import UTC, datetime

    from flows.timers import RescoreAll

    bucket = TimerBucketLogic(None)
    later = time.time() + 3600
    assert bucket.on_batch([Registration("a", 5), RescoreAll(7, later)])[0] == []
    assert bucket.notify_at() == datetime.fromtimestamp(later, UTC)
    assert bucket.on_notify()[0] == []  # too early: bytewax woke it before its time
    resumed = TimerBucketLogic(bucket.snapshot())
    resumed.on_batch([RescoreAll(8, later + 60)])  # newer version, earlier time kept
    assert resumed.rescore == RescoreAll(8, later)
    resumed.on_batch([RescoreAll(6, later + 30)])  # an older version arriving late
    assert resumed.rescore == RescoreAll(8, later)
    resumed.rescore = RescoreAll(8, time.time() - 1)  # its time has come
    assert resumed.on_notify()[0] == [Wake("a", 5, bundle_version=8)]
    assert resumed.notify_at() is None
    assert TimerBucketLogic((False, {Registration("b", 9)})).rescore is None  # older format


def test_the_customer_step_rescores_with_a_bundle_at_least_as_new_as_the_wake(
        redis_conn, unique):
    from dataclasses import replace

    from bytewax.connectors.kafka import KafkaSourceMessage

    from crmscore.doc_codec import load
    from crmscore.layout import RedisLayout
    from flows.live_customers import LiveCustomers
    from flows.model_registry import BundleCache, bundle_doc
    from flows.scoring import Accepted, CustomerLogic

    layout = RedisLayout(f"{unique}:")
    cache = BundleCache(redis_conn, layout, EMPTY_BUNDLE, refresh_seconds=3600)
    logic = CustomerLogic(None, cache, layout, None, LiveCustomers(10))
    message = KafkaSourceMessage(b"c", b"{}", topic="tx")
    for n, day in enumerate((0, 10, 20)):
        logic.on_batch([Accepted(purchase(day, n), message)])
    assert cache.get() is EMPTY_BUNDLE  # and it would not look again for an hour

    promoted = replace(EMPTY_BUNDLE, version=3, rescore_from=3,
                       models={"constant": ConstantModel(0.9)},
                       champion="constant", model_version="constant@v1")
    doc = bundle_doc(layout, promoted)
    redis_conn.hset(doc.key, mapping={"v": doc.version, "doc": doc.doc})
    out, _ = logic.on_batch([Wake("c", 0, bundle_version=3)])
    (stored,) = [o for o in out if hasattr(o, "doc") and o.key == layout.score("c")]
    assert load(stored.doc)["model_version"] == "constant@v1"
    assert load(stored.doc)["churn_risk"] == 0.9


def test_the_value_is_computed_anew_when_the_bundle_or_the_state_changes_at_one_instant():
    from dataclasses import replace

    from models.bgnbd import BgNbdParams
    from models.btyd import PopulationModel

    fit = PopulationModel(BgNbdParams(r=0.5, alpha=10.0, a=0.5, b=2.0), None, 0, 100, 100,
                          True, -1.0)
    fitted = replace(EMPTY_BUNDLE, version=2, btyd=fit, premium_boundary=1e9)
    customer, out = ScoredCustomer("c"), Outputs()
    for n, day in enumerate((0, 10, 20)):
        customer.apply(purchase(day, n), fitted, out)
    assert customer.document(fitted, out)["value_tier"] == "normal"
    # Another bundle at the same instant: its premium boundary puts the customer on top.
    lower = replace(fitted, version=3, premium_boundary=10.0)
    assert customer.document(lower, out)["value_tier"] == "premium"
    assert customer.document(fitted, out)["value_tier"] == "normal"
    # A refund at the same instant as the last purchase: the net spend (60 + ~250 expected
    # before it) falls under the boundary, and so does the tier.
    between = replace(fitted, version=4, premium_boundary=300.0)
    assert customer.document(between, out)["value_tier"] == "premium"
    customer.apply(purchase(20, 9, refund=True), between, out)
    assert customer.as_of_us == round(20 * DAY_US)
    assert customer.document(between, out)["value_tier"] != "premium"


def test_a_btyd_champion_scores_from_the_summary_as_from_all_the_features():
    """A BG/NBD or Pareto/NBD champion is asked with the three figures it reads, not the
    whole feature set: the risk must be the one the features give, late events included."""
    from dataclasses import replace

    from models.bgnbd import BgNbdParams
    from models.churn import BgNbdChurnModel, ParetoNbdChurnModel
    from models.paretonbd import ParetoNbdParams

    pareto, bg = ParetoNbdChurnModel(), BgNbdChurnModel()
    pareto.params = ParetoNbdParams(r=0.55, alpha=74.1, s=0.61, beta=81.7)
    bg.params = BgNbdParams(r=0.75, alpha=15.0, a=0.8, b=2.5)
    for model in (pareto, bg):
        bundle = replace(EMPTY_BUNDLE, version=1, models={model.name: model},
                         champion=model.name, model_version=f"{model.name}@v1")
        customer, out = ScoredCustomer("c"), Outputs()
        risks = set()
        # day 3.5 arrives after the clock woke the customer at day 30: late, still applied
        for n, (day, refund) in enumerate(((0, False), (3.5, False), (40, True), (41, False),
                                           (97.25, False))):
            customer.apply(purchase(day, n, refund), bundle, out)
            customer.wake(customer.as_of_us + 30 * DAY_US, bundle, out)
            now = customer.as_of_us
            assert customer.risk == model.predict_proba_one(customer._features(now, bundle))
            risks.add(customer.risk)
        assert len(risks) == 5  # the risk moved: each check compared a new figure


def test_a_refit_rescores_everyone_once_the_flow_has_caught_up_with_its_input():
    """A promotion rescores at once; a BTYD refit only when every partition has been read
    to its end (live: each refit; a replay: the fit it ends with, not every one)."""
    import random

    from crmscore.layout import RedisLayout
    from flows.scoring import ModelsLogic
    from flows.timers import Rescore
    from models.scoring import PopulationRow, ScoringConfig

    logic = ModelsLogic(None, ScoringConfig(), RedisLayout("t:"), publish_seconds=0.0,
                        refit_days=7.0, frozen=False, challengers="logreg", partitions={0})
    rng = random.Random(1)

    def read(day: float, offset: int, end: int | None = None) -> list[object]:
        """A week of 300 customers' rows read from partition 0, up to ``day``."""
        now = round(day * DAY_US)
        rows: list[object] = []
        for key in range(300):
            first = rng.uniform(0, day - 30) * DAY_US
            n = rng.randint(1, 6)
            last = first if n == 1 else rng.uniform(first, now)
            rows.append(PopulationRow(key, round(first), round(last), n, 20.0 * n, None, now))
        counts = Counts(applied=300, clock_us=now, partitions=((0, now),),
                        offsets=((0, offset),), ends=() if end is None else ((0, end),))
        return [*rows, counts]

    def fit_in(out: list[object]) -> list[object]:
        """Wait for the running refit; what the step sends once it has taken it."""
        assert logic.population.fitting
        logic.population._fit.result(120)  # type: ignore[union-attr]
        return out + logic.on_notify()[0]

    def rescores(out: list[object]) -> list[int]:
        return [r.bundle_version for r in out if isinstance(r, Rescore)]

    # The first fit serves BG/NBD's prior in place of the base rate: a promotion.
    out = fit_in(logic.on_batch(read(100, 999))[0])
    assert logic.population.btyd is not None and rescores(out) == [logic.population.version]
    # A week later, read up to offset 1999 of a partition whose end is further on: the
    # refit is taken, served, and nobody is rescored yet.
    first_sweep = logic.population.rescore_from
    out = fit_in(logic.on_batch(read(108, 1999))[0])
    assert logic.population.fitted_clock_us == 108 * DAY_US
    assert rescores(out) == [] and logic.population.rescore_from == first_sweep
    # The partition's end is read: everyone is rescored with that fit, once.
    out, _ = logic.on_batch([Counts(offsets=((0, 2999),), ends=((0, 3000),))])
    assert rescores(out) == [logic.population.version] == [logic.population.rescore_from]
    assert rescores(logic.on_batch([Counts(ends=((0, 3000),))])[0]) == []


def test_a_bundle_pickled_before_a_field_was_added_loads_with_its_default():
    """The bundle in Redis when the flow is upgraded was pickled by the older version:
    the fields added since (at the end) take their defaults, the others keep their place."""
    from dataclasses import replace

    from models.scoring import ModelBundle

    bundle = replace(EMPTY_BUNDLE, version=9, base_rate=0.2, model_version="bgnbd@v1",
                     rescore_from=7)
    assert pickle.loads(pickle.dumps(bundle)) == bundle
    older = ModelBundle.__new__(ModelBundle)
    older.__setstate__(bundle.__getstate__()[:-1])  # type: ignore[attr-defined]
    assert older == replace(bundle, rescore_from=0)


def test_a_refit_that_raises_keeps_the_previous_parameters_and_the_flow_going(monkeypatch):
    """Whatever a refit raises in its worker (here a bug's RuntimeError), the models step
    logs it and serves on: the next refit tries again."""
    from concurrent.futures import Future

    from crmscore.layout import RedisLayout
    from flows.scoring import ModelsLogic
    from models import population
    from models.scoring import PopulationRow, ScoringConfig

    def failing(*args, **kwargs):
        failed: Future[object] = Future()
        failed.set_exception(RuntimeError("a bug in the fit"))
        return failed

    monkeypatch.setattr(population.fit_process, "submit", failing)
    logic = ModelsLogic(None, ScoringConfig(), RedisLayout("t:"), publish_seconds=0.0,
                        refit_days=7.0, frozen=False, challengers="logreg", partitions={0})
    now = 100 * DAY_US
    rows = [PopulationRow(key, 10 * DAY_US, 50 * DAY_US, 3, 60.0, None, now)
            for key in range(300)]
    counts = Counts(applied=300, clock_us=now, partitions=((0, now),), offsets=((0, 299),))
    logic.on_batch([*rows, counts])
    assert logic.population.fitting
    logic.on_notify()  # collects the failed fit: no exception reaches bytewax
    assert logic.population.btyd is None and not logic.population.fitting
