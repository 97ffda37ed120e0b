"""What bytewax's recovery store costs at the end of every epoch, whatever was touched.

bytewax 0.21 keeps one row per state key in each recovery partition (sqlite table
``snaps(step_id, state_key, snap_epoch, ser_change)``), for every key ever seen: a
customer, a timer hour. When it commits an epoch it collects the superseded
snapshots with one query over the whole table (the newest epoch of every key, joined
back to find older rows). That query's time grows with the keys held, not with the keys
touched: ~0.8-0.9 µs a key here, so 76-100 ms at 100k customers and 807 ms at a million
(measured: bench/RESULTS-memory-1m.md), paid every ``CRMSCORE_SNAPSHOT_INTERVAL`` (0.25 s
by default, chosen for freshness at small populations) while new events wait. A flow
holding a million customers needs an interval of ~10 s or more, or its keys spread over
more processes and partitions. Keys are never dropped: a discarded state leaves an empty row.

:func:`scan` runs the same scan, read-only, and times it; ``crmscore flow`` runs it at
start and every 15 minutes (:class:`ScanWatch`), and warns when it takes more than
``WARN_SHARE`` of the snapshot interval.

**Never in the process of a running flow.** bytewax links its own copy of SQLite; a
second copy in the same process (Python's ``sqlite3``) on the same live store breaks
both: POSIX locks belong to the process, so neither copy sees the other's, and closing
a file drops the locks of both (sqlite.org/howtocorrupt.html, 2.2.1). Seen here: a scan
from a thread of a running bytewax flow left "database disk image is malformed" and
bytewax panicked (tests/test_recovery_scan.py), and a flow holding a million customers
died of SIGBUS four minutes after its 15-minute scan (most likely the same cause: the
same run with the scan apart completed). So :class:`ScanWatch` scans in a child process
(:func:`scan_apart`), as any other reader of a live store must.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

WARN_SHARE = 0.1  # of the snapshot interval spent scanning: worth a warning

# bytewax's garbage query, without its DELETE: the newest snapshot of every key, and the
# older rows of the same keys (what a commit deletes).
_SCAN = """
    WITH newest AS (
        SELECT step_id, state_key, MAX(snap_epoch) AS snap_epoch
        FROM snaps GROUP BY step_id, state_key
    )
    SELECT (SELECT COUNT(*) FROM newest),
           (SELECT COUNT(*) FROM snaps JOIN newest USING (step_id, state_key)
            WHERE snaps.snap_epoch < newest.snap_epoch)
"""


class RecoveryScan(NamedTuple):
    partitions: int
    keys: int  # state keys held, one row each once superseded snapshots are collected
    superseded: int  # older snapshots still held (kept for the backup interval)
    seconds: float  # the scan's time over every partition

    def share_of(self, snapshot_interval_s: float) -> float:
        """The part of each epoch the scan takes."""
        return self.seconds / snapshot_interval_s

    def interval_for(self, share: float) -> float:
        """The snapshot interval at which the scan takes ``share`` of each epoch."""
        return self.seconds / share


def scan(recovery_dir: Path) -> RecoveryScan:
    """Time bytewax's end-of-epoch scan over every recovery partition in the directory
    (read-only: a running flow's partitions may be scanned)."""
    partitions = sorted(Path(recovery_dir).glob("*.sqlite3"))
    keys = superseded = 0
    started = time.perf_counter()
    for path in partitions:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            held, older = db.execute(_SCAN).fetchone()
        keys += held
        superseded += older
    return RecoveryScan(len(partitions), keys, superseded, time.perf_counter() - started)


class ScanFailed(RuntimeError):
    """The child process could not scan the store."""


def scan_apart(recovery_dir: Path, timeout_s: float = 600.0) -> RecoveryScan:
    """:func:`scan` in a child process: safe while this process's bytewax writes the store."""
    done = subprocess.run([sys.executable, "-m", "flows.recovery_scan", str(recovery_dir)],
                          capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise ScanFailed(lines[-1] if lines else f"exit status {done.returncode}")
    return RecoveryScan(*json.loads(done.stdout))


class ScanWatch:
    """Times the scan at start and then every ``every_s`` while the flow runs (its keys
    grow with every new customer): says what it costs at start, and warns when it takes
    more than ``WARN_SHARE`` of the snapshot interval, again each time that share has
    doubled since the last warning."""

    def __init__(self, recovery_dir: Path, snapshot_interval_s: float) -> None:
        self.recovery_dir = recovery_dir
        self.snapshot_interval_s = snapshot_interval_s
        self.warned_share = 0.0
        self.checks = 0
        self.stopped = threading.Event()

    def check(self) -> RecoveryScan:
        found = scan_apart(self.recovery_dir)
        share = found.share_of(self.snapshot_interval_s)
        message = ("recovery holds %d state keys in %d partition(s); bytewax scans them all "
                   "at the end of every epoch: %.1f ms now, %.0f%% of a %g s snapshot "
                   "interval, growing with the keys")
        values = (found.keys, found.partitions, found.seconds * 1000, share * 100,
                  self.snapshot_interval_s)
        if share > WARN_SHARE and share >= 2 * self.warned_share:
            log.warning(message + ": raise CRMSCORE_SNAPSHOT_INTERVAL to %.1f s or more, or "
                        "run more processes (flows/recovery_scan.py)",
                        *values, found.interval_for(WARN_SHARE))
            self.warned_share = share
        elif self.checks == 0:
            log.info(message, *values)
        self.checks += 1
        return found

    def start(self, every_s: float = 900.0) -> threading.Thread:
        """Check now, then every ``every_s`` in a daemon thread that waits for the child
        process scanning (so the flow's thread keeps running). A scan that fails is said
        and does not stop the flow: bytewax reads its store on its own."""

        def check() -> None:
            try:
                self.check()
            except (ScanFailed, subprocess.TimeoutExpired, OSError) as exc:
                log.warning("could not scan the recovery store %s: %s", self.recovery_dir, exc)

        def watch() -> None:
            while not self.stopped.wait(every_s):
                check()

        check()
        thread = threading.Thread(target=watch, name="recovery-scan", daemon=True)
        thread.start()
        return thread


if __name__ == "__main__":  # scan_apart's child: the scan's figures as JSON
    print(json.dumps(scan(Path(sys.argv[1]))))
