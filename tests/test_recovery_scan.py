"""flows/recovery_scan.py on recovery stores written by real bytewax runs."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, run_main

from flows.recovery_scan import RecoveryScan, log_scan, scan


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


def test_scan_of_a_running_flows_store_does_not_write(tmp_path: Path) -> None:
    _count_keys(tmp_path, 10)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.sqlite3")}
    scan(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.sqlite3")} == before


def test_share_and_interval() -> None:
    found = RecoveryScan(partitions=1, keys=1_000_000, superseded=0, seconds=0.9)
    assert found.share_of(0.25) == pytest.approx(3.6)
    assert found.interval_for(0.1) == pytest.approx(9.0)


def test_log_warns_when_the_scan_eats_the_interval(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _count_keys(tmp_path, 50)
    with caplog.at_level(logging.INFO, logger="flows.recovery_scan"):
        log_scan(tmp_path, snapshot_interval_s=1e-9)
        log_scan(tmp_path, snapshot_interval_s=1e9)
    warned, told = caplog.records
    assert warned.levelno == logging.WARNING
    assert "raise CRMSCORE_SNAPSHOT_INTERVAL" in warned.getMessage()
    assert told.levelno == logging.INFO
    assert "state keys" in told.getMessage()
