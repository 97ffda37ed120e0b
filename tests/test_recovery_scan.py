"""flows/recovery_scan.py on recovery stores written by real bytewax runs."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, run_main

from flows.recovery_scan import RecoveryScan, ScanWatch, scan, scan_apart


def _count_keys(recovery_dir: Path, customers: int, partitions: int = 1) -> None:
    """A keyed running count over ``customers`` keys, with recovery into ``recovery_dir``."""
    if not any(recovery_dir.glob("*.sqlite3")):
        init_db_dir(recovery_dir, partitions)
    flow = Dataflow("scan_test")
    events = op.input("in", flow, TestingSource([(f"c{i % customers}", 1) for i in range(500)]))
    counts = op.stateful_map("count", events, lambda total, n: ((total or 0) + n,) * 2)
    op.output("out", counts, TestingSink([]))
    run_main(flow, epoch_interval=timedelta(seconds=0),
             recovery_config=RecoveryConfig(str(recovery_dir), backup_interval=timedelta(0)))


def test_scan_counts_every_state_key_held(tmp_path: Path) -> None:
    small, large = tmp_path / "small", tmp_path / "large"
    small.mkdir()
    large.mkdir()
    _count_keys(small, 40)
    _count_keys(large, 240)
    found_small, found_large = scan(small), scan(large)
    assert found_small.partitions == found_large.partitions == 1
    # one row per customer key, besides the same few of the input step
    assert found_large.keys - found_small.keys == 200
    assert found_small.superseded == 0  # collected at each commit (no backup interval)
    assert found_large.seconds > 0


def test_scan_spans_every_partition(tmp_path: Path) -> None:
    _count_keys(tmp_path, 100, partitions=3)
    one = tmp_path / "one"
    one.mkdir()
    _count_keys(one, 100)
    found = scan(tmp_path)
    assert found.partitions == 3
    assert found.keys == scan(one).keys  # the same keys, spread over the partitions


def test_scan_does_not_write_the_store(tmp_path: Path) -> None:
    _count_keys(tmp_path, 10)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.sqlite3")}
    scan(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.sqlite3")} == before


def test_share_and_interval() -> None:
    found = RecoveryScan(partitions=1, keys=1_000_000, superseded=0, seconds=0.9)
    assert found.share_of(0.25) == pytest.approx(3.6)
    assert found.interval_for(0.1) == pytest.approx(9.0)


def test_watch_warns_when_the_scan_eats_the_interval_and_again_when_it_doubles(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _count_keys(tmp_path, 50)
    calm, tight = ScanWatch(tmp_path, snapshot_interval_s=1e9), ScanWatch(tmp_path, 1e-9)
    with caplog.at_level(logging.INFO, logger="flows.recovery_scan"):
        calm.check()
        calm.check()  # said once, at start
        first = tight.check()
        assert first is not None
        tight.warned_share = first.share_of(1e-9) * 1e6  # as if it had warned far higher
        tight.check()  # not twice the last warning: quiet
    told, warned = caplog.records
    assert told.levelno == logging.INFO and "state keys" in told.getMessage()
    assert warned.levelno == logging.WARNING
    assert "restart the flow" in warned.getMessage()
    assert "set CRMSCORE_SNAPSHOT_INTERVAL" in warned.getMessage()


def test_watch_checks_again_while_the_flow_runs(tmp_path: Path) -> None:
    _count_keys(tmp_path, 10)
    watch = ScanWatch(tmp_path, snapshot_interval_s=1e9)
    thread = watch.start(every_s=0.01)
    deadline = time.monotonic() + 10
    while watch.checks < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    watch.stopped.set()
    thread.join(5)
    assert watch.checks >= 3
    assert not thread.is_alive()


def test_a_failed_scan_does_not_stop_the_flow(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "part-0.sqlite3").write_bytes(b"not a database" * 100)
    watch = ScanWatch(tmp_path, snapshot_interval_s=0.25)
    with caplog.at_level(logging.WARNING, logger="flows.recovery_scan"):
        assert watch.choose_interval() == 0.25  # as set
        thread = watch.start(every_s=0.01)
        deadline = time.monotonic() + 10
        while caplog.text.count("could not scan") < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    watch.stopped.set()
    thread.join(5)
    assert caplog.text.count("could not scan the recovery store") >= 2
    assert not thread.is_alive()


def test_the_interval_is_lengthened_for_the_scan_never_shortened(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _count_keys(tmp_path, 2_000)
    took = scan(tmp_path).seconds
    short = took / 100  # an interval the scan would take 100 times over
    with caplog.at_level(logging.INFO, logger="flows.recovery_scan"):
        chosen = ScanWatch(tmp_path, short, share=0.5).choose_interval()
    # timed again in the child process: the same scan, within a busy machine's jitter
    assert took / 0.5 / 10 < chosen < took / 0.5 * 10
    assert f"lengthened from CRMSCORE_SNAPSHOT_INTERVAL={short:g} s" in caplog.text
    assert "raise" not in caplog.text and "restart the flow" not in caplog.text  # now fits
    assert ScanWatch(tmp_path, short).choose_interval(lengthen=False) == short
    assert ScanWatch(tmp_path, 1e9).choose_interval() == 1e9


def test_a_worker_pays_the_scan_of_its_own_partitions() -> None:
    found = RecoveryScan(partitions=4, keys=4_000, superseded=40, seconds=0.4)
    assert found.per_worker(1) == found
    assert found.per_worker(2) == RecoveryScan(2, 2_000, 20, 0.2)
    assert found.per_worker(4).seconds == pytest.approx(0.1)
    assert found.per_worker(8).seconds == pytest.approx(0.1)  # a partition is not shared
    assert RecoveryScan(1, 100, 0, 0.1).per_worker(2).seconds == 0.1


def test_the_watch_scans_a_live_store_apart_and_leaves_it_whole(tmp_path: Path) -> None:
    """bytewax's own SQLite and Python's, in one process on one live store, corrupt it
    (flows/recovery_scan.py: "database disk image is malformed", and bytewax panicked,
    when this test scanned in-process). The watch scans in a child process, while this
    process's flow writes the store."""
    init_db_dir(tmp_path, 1)

    def slow() -> Iterator[tuple[str, int]]:
        for i in range(100_000):
            if i % 10_000 == 0:
                time.sleep(0.3)  # a flow that lasts for several scans
            yield f"c{i % 20_000}", 1

    flow = Dataflow("live_scan")
    counts = op.stateful_map("count", op.input("in", flow, TestingSource(slow())),
                             lambda total, n: ((total or 0) + n,) * 2)
    op.output("out", counts, TestingSink([]))
    watch, running = ScanWatch(tmp_path, snapshot_interval_s=1e9), threading.Event()
    found: list[RecoveryScan] = []
    failed: list[BaseException] = []

    def scans() -> None:
        while not running.is_set():  # wait for the flow to open its store
            time.sleep(0.01)
        while running.is_set():
            try:
                checked = watch.check()
            except BaseException as exc:  # noqa: BLE001 - reported by the test below
                failed.append(exc)
            else:
                if checked is None:  # the scan failed (said in the log)
                    failed.append(RuntimeError("scan failed"))
                else:
                    found.append(checked)

    scanner = threading.Thread(target=scans)
    scanner.start()
    running.set()
    try:
        run_main(flow, epoch_interval=timedelta(seconds=0.05),
                 recovery_config=RecoveryConfig(str(tmp_path), backup_interval=timedelta(0)))
    finally:
        running.clear()
        scanner.join()
    assert failed == []
    assert len(found) >= 2
    assert scan_apart(tmp_path).keys == scan(tmp_path).keys >= 20_000
