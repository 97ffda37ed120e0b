"""The stream clock as the watermark of the partitions (flows/watermark.py), in the clock
and models steps."""

from __future__ import annotations

import pickle
import time
from datetime import UTC, datetime

import orjson

from crmscore.layout import RedisLayout
from flows.clock import ClockLogic, Counts, sum_counts
from flows.redis_sink import VersionedDoc
from flows.timers import BUCKET_US, Registration, Tick, Wake
from flows.watermark import Watermark
from models.population import Population
from models.scoring import PopulationRow
from models.transaction import DAY_US, format_time


def test_the_clock_waits_for_the_slowest_partition_until_it_goes_quiet():
    mark = Watermark(idle_seconds=2.0)
    mark.update({0: 500, 1: 100, 2: 300}, now=0.0)
    assert mark.advance(now=0.1) == 100
    mark.update({1: 250}, now=1.0)
    assert mark.advance(now=1.1) == 250
    assert mark.idle_at(now=1.1) == 2.0  # partitions 0 and 2 turn quiet first
    assert mark.advance(now=2.5) == 250  # ... but partition 1, the slowest, still speaks
    assert mark.advance(now=3.5) == 500  # every partition quiet: all read was applied
    assert mark.idle_at(now=3.5) is None  # at the newest event time: nothing to wait for


def test_the_clock_never_moves_back_and_older_events_do_not_lower_a_partition():
    mark = Watermark(idle_seconds=2.0)
    mark.update({0: 100}, now=0.0)
    assert mark.advance(now=0.0) == 100
    mark.update({0: 40, 1: 10}, now=0.5)  # a repeat of an old event; a new partition
    assert mark.newest == {0: 100, 1: 10}
    assert mark.advance(now=0.6) == 100


def test_a_restored_watermark_keeps_its_clock_and_partitions_and_waits_for_them_again():
    mark = Watermark(idle_seconds=60.0)
    mark.update({0: 500, 1: 100})
    mark.advance()
    restored = pickle.loads(pickle.dumps(mark))
    assert (restored.clock_us, restored.newest) == (100, {0: 500, 1: 100})
    # A restored partition counts as just heard: partition 1 holds the clock back again.
    restored.update({0: 900})
    assert restored.advance() == 100


def test_a_named_partition_holds_the_clock_until_read_in_full_however_long_it_is_silent():
    mark = Watermark(idle_seconds=1.0, partitions={0, 1})
    mark.update({0: 500}, now=0.0, offsets={0: 99}, ends={0: 100})
    assert mark.advance(now=50.0) is None  # partition 1 never heard from: no clock at all
    mark.update({1: 100}, now=50.0, offsets={1: 9})
    assert mark.advance(now=50.1) == 100
    assert mark.idle_at(now=50.1) is None  # only partition 1 holds, and it is not read in full
    assert mark.advance(now=500.0) == 100  # silent, with no end: a stall, not caught up
    mark.update({}, now=500.0, ends={1: 12})  # its end is past what was counted
    assert mark.advance(now=501.0) == 100
    mark.update({1: 130}, now=501.0, offsets={1: 11})  # the counts catch up with the end
    assert mark.advance(now=501.5) == 130
    assert mark.idle_at(now=501.5) == 502.0
    assert mark.advance(now=502.0) == 500
    # A restored watermark knows no offsets: the partitions hold it until they report again.
    restored = pickle.loads(pickle.dumps(mark))  # heard: now (time.monotonic)
    restored.partitions = frozenset({0, 1})
    t = time.monotonic()
    restored.update({0: 600}, now=t, offsets={0: 120}, ends={0: 121})
    assert restored.advance(now=t + 100) == 500  # partition 1: no end since the restart
    restored.update({}, now=t + 100, ends={1: 12}, empty={1})  # nothing new to read there
    assert restored.advance(now=t + 100) == 600


def test_counts_carry_the_newest_offsets_and_ends_of_each_partition():
    total = sum_counts([Counts(1, offsets=((0, 7), (1, 3))), Counts(offsets=((0, 5),)),
                        Counts(ends=((0, 8),), empty=(2,)), Counts(ends=((0, 6), (2, 0)))])
    assert dict(total.offsets) == {0: 7, 1: 3}
    assert dict(total.ends) == {0: 8, 2: 0} and total.empty == (2,)
    mark = Watermark(partitions={0, 1, 2})
    total.observed_by(mark)
    assert [mark.read_in_full(p) for p in (0, 1, 2)] == [True, False, True]


def test_a_partition_lags_by_its_newest_message_s_age_until_read_in_full():
    mark = Watermark(partitions={0, 1, 2, 3})
    sum_counts([Counts(1, offsets=((0, 7), (1, 3)), stamps=((0, 40_000), (1, 55_000))),
                Counts(1, offsets=((0, 5),), stamps=((0, 30_000),)),  # older, same partition
                Counts(ends=((1, 4),)), Counts(ends=((2, 0),), empty=(2,))]).observed_by(mark)
    # 0: its newest message (40 s) was read 60 s in; 1 and 2 are read in full; 3 unknown.
    assert mark.lags(now_ms=100_000) == {0: 60.0, 1: 0.0, 2: 0.0}
    assert mark.lags(now_ms=10_000)[0] == 0.0  # a producer clock ahead of ours: no lag
    mark.update({}, offsets={1: 9}, stamps={1: 99_000})  # partition 1 delivers again
    assert mark.lags(now_ms=100_500)[1] == 1.5
    mark.update({}, ends={0: 8})
    assert mark.lags(now_ms=200_000)[0] == 0.0
    # Not snapshotted: a restored watermark has not read anything in this run.
    restored = pickle.loads(pickle.dumps(mark))
    restored.partitions = frozenset({0, 1})
    assert restored.lags(now_ms=200_000) == {}


def test_the_status_gives_each_partition_s_lag_and_the_largest():
    clock = ClockLogic(None, RedisLayout("t:"), partitions=(0, 1))
    written_ms = time.time_ns() // 1_000_000 - 3_600_000  # an hour-old backlog
    out, _ = clock.on_batch([Counts(1, 0, 0, 30 * BUCKET_US, ((0, 30 * BUCKET_US),),
                                    offsets=((0, 4),), stamps=((0, written_ms),)),
                             Counts(ends=((1, 0),), empty=(1,))])
    (status,) = [orjson.loads(o.doc) for o in out if isinstance(o, VersionedDoc)]
    lags = status["partition_lag_seconds"]
    assert lags["1"] == 0.0 and 3600 <= lags["0"] < 3660
    assert status["input_lag_seconds"] == lags["0"]
    clock.on_batch([Counts(ends=((0, 5),))])  # read in full: written with the heartbeat
    clock.status_due = datetime.now(UTC)
    out, _ = clock.on_notify()
    (status,) = [orjson.loads(o.doc) for o in out if isinstance(o, VersionedDoc)]
    assert status["partition_lag_seconds"] == {"0": 0.0, "1": 0.0}
    assert status["input_lag_seconds"] == 0.0
    empty = ClockLogic(None, RedisLayout("t:"), partitions=(0,))
    empty.status_due = datetime.now(UTC)
    (status,) = [orjson.loads(o.doc) for o in empty.on_notify()[0]
                 if isinstance(o, VersionedDoc)]
    assert status["input_lag_seconds"] is None and status["partition_lag_seconds"] == {}


def test_counts_of_a_batch_keep_the_newest_event_time_of_each_partition():
    total = sum_counts([Counts(1, 0, 0, 50, ((0, 50), (1, 20))),
                        Counts(0, 1, 0, None, ((1, 30),)),
                        Counts(0, 0, 1)])
    assert (total.applied, total.duplicate, total.rejected, total.clock_us) == (1, 1, 1, 50)
    assert total.newest_by_partition() == {0: 50, 1: 30}
    assert Counts(clock_us=7).newest_by_partition() == {-1: 7}  # a source without partitions


def test_the_clock_step_fires_a_wake_up_only_once_every_partition_has_passed_it():
    clock = ClockLogic(None, RedisLayout("t:"))
    due = 10 * BUCKET_US + 5
    out, _ = clock.on_batch([Registration("a", due),
                             Counts(1, 0, 0, 30 * BUCKET_US, ((0, 30 * BUCKET_US),)),
                             Counts(1, 0, 0, 2 * BUCKET_US, ((1, 2 * BUCKET_US),))])
    assert Wake("a", due) not in out
    assert not any(isinstance(o, tuple) and isinstance(o[1], Tick) for o in out)
    # Partition 1 catches up past the due instant: the hour holding it is ticked.
    out, _ = clock.on_batch([Counts(1, 0, 0, 11 * BUCKET_US, ((1, 11 * BUCKET_US),))])
    assert ("10", Tick(11 * BUCKET_US)) in out


def test_a_quiet_partition_lets_the_clock_step_move_on_without_new_input():
    clock = ClockLogic(None, RedisLayout("t:"))
    clock.watermark = Watermark(idle_seconds=0.05)
    out, _ = clock.on_batch([Registration("a", 10 * BUCKET_US + 5), Counts(
        1, 0, 0, 30 * BUCKET_US, ((0, 30 * BUCKET_US), (1, 2 * BUCKET_US)))])
    (status,) = [o for o in out if isinstance(o, VersionedDoc)]
    assert orjson.loads(status.doc)["stream_clock"] == format_time(2 * BUCKET_US)
    assert clock.notify_at() is not None  # the step asks to be woken when they go quiet
    time.sleep(0.1)
    out, _ = clock.on_notify()
    assert ("10", Tick(30 * BUCKET_US)) in out
    assert clock.watermark.clock_us == 30 * BUCKET_US
    # The status says so, in a newer version than the last one although no event came.
    (moved,) = [o for o in out if isinstance(o, VersionedDoc)]
    assert orjson.loads(moved.doc)["stream_clock"] == format_time(30 * BUCKET_US)
    assert moved.version > status.version
    assert orjson.loads(moved.doc)["partition_clocks"] == {  # which partition held it
        "0": format_time(30 * BUCKET_US), "1": format_time(2 * BUCKET_US)}


def test_the_clock_step_holds_a_partition_until_its_end_and_writes_no_status_for_an_end():
    clock = ClockLogic(None, RedisLayout("t:"), idle_seconds=0.0, partitions=(0, 1))
    out, _ = clock.on_batch([Counts(1, 0, 0, 30 * BUCKET_US, ((0, 30 * BUCKET_US),),
                                    offsets=((0, 4),), ends=((0, 5),))])
    assert clock.watermark.clock_us is None  # partition 1 not heard from
    assert [o for o in out if isinstance(o, VersionedDoc)]  # one event counted: a status
    out, _ = clock.on_batch([Counts(ends=((1, 0),), empty=(1,))])  # partition 1 is empty
    assert clock.watermark.clock_us == 30 * BUCKET_US
    (status,) = [o for o in out if isinstance(o, VersionedDoc)]  # the clock moved
    out, _ = clock.on_batch([Counts(ends=((0, 5),))])  # the same end again: nothing new
    assert not [o for o in out if isinstance(o, VersionedDoc)]


def test_an_older_clock_snapshot_resumes_with_its_clock():
    older = pickle.dumps((Counts(applied=3, clock_us=100 * BUCKET_US), {100: 1}))
    clock = ClockLogic(older, RedisLayout("t:"))
    assert clock.watermark.clock_us == 100 * BUCKET_US
    out, _ = clock.on_batch([Counts(applied=1, clock_us=101 * BUCKET_US)])
    assert ("100", Tick(101 * BUCKET_US)) in out


def test_population_fits_on_the_watermark_not_on_the_newest_row():
    population = Population()
    row = PopulationRow(key_hash=1, first_purchase_us=0, last_purchase_us=50 * DAY_US,
                        purchase_count=3, net_spend=30.0, expected_value=None,
                        as_of_us=200 * DAY_US)
    population.observe(row)
    assert population.clock_us is None  # a row read ahead does not move the clock
    population.advance(100 * DAY_US)
    population.advance(90 * DAY_US)  # never backwards
    assert population.clock_us == 100 * DAY_US


def test_a_customers_age_in_a_fit_runs_to_the_clock_or_to_their_own_later_row():
    population = Population()
    for h in range(60):  # enough repeat buyers for a fit; half read ahead of the clock
        population.observe(PopulationRow(
            key_hash=h, first_purchase_us=0, last_purchase_us=10 * DAY_US, purchase_count=2,
            net_spend=20.0, expected_value=None, as_of_us=(150 if h % 2 else 40) * DAY_US))
    population.advance(100 * DAY_US)
    _, t_x, T, _ = population._fit_inputs(100 * DAY_US)
    assert set(t_x) == {10.0}
    assert sorted(set(T)) == [100.0, 150.0]


def test_a_population_snapshot_with_btyd_rows_beside_the_sample_resumes_with_them():
    """Before the sample held the BTYD inputs, a dict of rows beside it did."""
    population = Population()
    for h in range(60):
        population.observe(PopulationRow(
            key_hash=h, first_purchase_us=h * DAY_US, last_purchase_us=(h + 10) * DAY_US,
            purchase_count=2 + h % 3, net_spend=20.0 + h, expected_value=float(h),
            as_of_us=(h + 40) * DAY_US))
    state = population.__getstate__()
    k, *blobs = state["quantiles"].__getstate__()
    old_sample = type(state["quantiles"]).__new__(type(state["quantiles"]))
    old_sample.__setstate__((k, *blobs[:5]))  # the key and four dimensions only
    rows = population.quantiles.rows()
    state.update(quantiles=old_sample, btyd_rows={
        h: (row[4], row[0], row[1], row[2], *((row[5],) if h % 2 else ()))
        for h, row in rows.items()})  # the oldest rows had no instant
    resumed = Population.__new__(Population)
    resumed.__setstate__(state)
    assert resumed.quantiles.rows() == {
        h: (*row[:5], row[5] if h % 2 else row[0]) for h, row in rows.items()}
    assert resumed.typical_gap_days() == population.typical_gap_days()
