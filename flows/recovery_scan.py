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

:func:`scan` runs the same scan, read-only, and times it. ``crmscore flow`` runs it at
start, before bytewax opens the store, and lengthens the snapshot interval so that the
scan takes at most ``CRMSCORE_SNAPSHOT_SCAN_SHARE`` of each epoch
(:meth:`ScanWatch.choose_interval`): a flow restarted on 100,000 customers runs 1 s
epochs by itself, where 0.25 s ones spent most of their time scanning. bytewax fixes the
interval for a run, so a population that grows while the flow runs is caught by the
scan every 15 minutes (:meth:`ScanWatch.start`), which warns when it takes more than
that share.

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
import math
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

from flows.metrics import RECOVERY_KEYS, RECOVERY_SCAN

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

    def per_worker(self, workers: int) -> RecoveryScan:
        """The scan one worker pays: each commits its own partitions, the busiest
        ``ceil(partitions / workers)`` of them (taken as scanning alike).

        >>> RecoveryScan(partitions=4, keys=400, superseded=0, seconds=0.8).per_worker(3)
        RecoveryScan(partitions=2, keys=200, superseded=0, seconds=0.4)
        """
        if self.partitions <= 1 or workers <= 1:
            return self
        owned = math.ceil(self.partitions / workers)
        part = owned / self.partitions
        return RecoveryScan(owned, round(self.keys * part), round(self.superseded * part),
                            self.seconds * part)


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
    """Times the scan before the flow starts, to choose its snapshot interval
    (:meth:`choose_interval`), and then every ``every_s`` while it runs (its keys grow
    with every new customer, :meth:`start`). Warns when the scan takes more than
    ``share`` of the interval, again each time that share has doubled since the last
    warning. ``workers`` is the cluster's worker count: each pays the scan of its own
    partitions. A scan that fails is said and does not stop the flow: bytewax reads its
    store on its own."""

    def __init__(self, recovery_dir: Path, snapshot_interval_s: float,
                 share: float = WARN_SHARE, workers: int = 1) -> None:
        self.recovery_dir = recovery_dir
        self.set_interval_s = self.snapshot_interval_s = snapshot_interval_s
        self.share = share
        self.workers = workers
        self.warned_share = 0.0
        self.checks = 0
        self.stopped = threading.Event()

    def choose_interval(self, lengthen: bool = True) -> float:
        """Check now and, with ``lengthen``, lengthen the snapshot interval (never shorten
        it) so that the scan takes at most ``share`` of each epoch; returns the interval
        to run at (as set when the scan fails)."""
        self.check(lengthen)
        return self.snapshot_interval_s

    def check(self, lengthen: bool = False) -> RecoveryScan | None:
        """Scan now and say what it costs (None: the scan failed)."""
        try:
            found = scan_apart(self.recovery_dir).per_worker(self.workers)
        except (ScanFailed, subprocess.TimeoutExpired, OSError) as exc:
            log.warning("could not scan the recovery store %s: %s", self.recovery_dir, exc)
            return None
        if lengthen:
            self.snapshot_interval_s = max(self.snapshot_interval_s,
                                           found.interval_for(self.share))
        self.report(found)
        return found

    def report(self, found: RecoveryScan) -> None:
        """Say what the scan costs the first time, warn when it takes too much."""
        RECOVERY_SCAN.set(found.seconds)
        RECOVERY_KEYS.set(found.keys)
        share = found.share_of(self.snapshot_interval_s)
        lengthened = (f" (lengthened from CRMSCORE_SNAPSHOT_INTERVAL={self.set_interval_s:g} "
                      f"s for CRMSCORE_SNAPSHOT_SCAN_SHARE={self.share:g})"
                      if self.snapshot_interval_s > self.set_interval_s else "")
        message = ("recovery holds %d state keys in %d partition(s) a worker commits; "
                   "bytewax scans them all at the end of every epoch: %.1f ms now, %.0f%% "
                   "of a %.2f s snapshot interval%s, growing with the keys")
        values = (found.keys, found.partitions, found.seconds * 1000, share * 100,
                  self.snapshot_interval_s, lengthened)
        if share > self.share and share >= 2 * self.warned_share:
            log.warning(message + ": restart the flow to lengthen its interval (chosen at "
                        "start, CRMSCORE_SNAPSHOT_SCAN_SHARE), set CRMSCORE_SNAPSHOT_INTERVAL "
                        "to %.1f s or more, or run more processes (flows/recovery_scan.py)",
                        *values, found.interval_for(self.share))
            self.warned_share = share
        elif self.checks == 0:
            log.info(message, *values)
        self.checks += 1

    def start(self, every_s: float = 900.0) -> threading.Thread:
        """Check every ``every_s`` in a daemon thread that waits for the child process
        scanning (so the flow's thread keeps running)."""

        def watch() -> None:
            while not self.stopped.wait(every_s):
                self.check()

        thread = threading.Thread(target=watch, name="recovery-scan", daemon=True)
        thread.start()
        return thread


if __name__ == "__main__":  # scan_apart's child: the scan's figures as JSON
    print(json.dumps(scan(Path(sys.argv[1]))))
