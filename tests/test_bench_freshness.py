"""The freshness bench's history, with customers held beside it (bench/freshness.py)."""

import logging
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import orjson
from bytewax.recovery import init_db_dir

from bench.freshness import history, ran_epochs_s
from bench.processes import cpu_seconds
from flows.recovery_scan import ScanWatch


def test_held_customers_come_after_the_history_and_end_with_it(tmp_path):
    alone, currency = history(tmp_path / "alone", 20)
    lines, same_currency = history(tmp_path / "held", 20, held=7)
    # the same seed; the start may differ by a second between the calls
    assert len(lines) == len(alone) + 7 * 2 and currency == same_currency
    held = [orjson.loads(line) for line in lines[len(alone):]]
    assert len({e["customer_id"] for e in held}) == 7  # two purchases each
    assert {e["customer_id"] for e in held}.isdisjoint(currency)  # never sent a purchase
    a_day_ago = datetime.now(UTC) - timedelta(days=1)
    for event in held:
        at = datetime.fromisoformat(event["occurred_at"])
        assert a_day_ago - timedelta(days=61) < at <= a_day_ago


def test_the_interval_a_flow_ran_at_is_read_from_its_log(tmp_path, caplog):
    """The bench reads the interval from the message the flow logs at start: they must
    agree (flows/recovery_scan.py)."""
    init_db_dir(tmp_path, 1)  # an empty store: nothing to scan, no lengthening
    with caplog.at_level(logging.INFO, logger="flows.recovery_scan"):
        chosen = ScanWatch(tmp_path, 0.75).choose_interval()
    assert chosen == 0.75
    assert ran_epochs_s(caplog.text) == 0.75
    assert ran_epochs_s("flow starting") is None


def test_a_process_cpu_time_grows_while_it_works_not_while_it_sleeps():
    """The bench's flow CPU share (bench/processes.py cpu_seconds, from /proc)."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.3)  # both started
        busy_before, idle_before = cpu_seconds(busy.pid), cpu_seconds(idle.pid)
        time.sleep(1.0)
        busy_used = cpu_seconds(busy.pid) - busy_before
        idle_used = cpu_seconds(idle.pid) - idle_before
    finally:
        for process in (busy, idle):
            process.kill()
            process.wait()
    assert busy_used > 0.3  # a spinning thread: most of a second, on a busy machine less
    assert idle_used < 0.05
    assert cpu_seconds(busy.pid) is None  # gone
