"""Give the heap the flow freed back to the operating system, every minute.

glibc's malloc returns freed memory to the system only from the top of its heap: pages
freed anywhere below stay with the process. A flow that caught up with a backlog
freed most of what the catch-up held in flight (batches, documents, messages), yet kept
it: at 100,000 customers a caught-up flow held 849 MiB, and ``malloc_trim(0)`` (called
into it with gdb) gave 162 MiB back at once; with ``CRMSCORE_LIVE_CUSTOMERS=1000``, 610
-> 431 MiB. The memory was free, only not returned.

``malloc_trim(0)`` walks the whole heap: ~40 ms on an 800 MiB test heap, 10-16 ms in a
caught-up flow at 100,000 customers, while the flow's own allocations may wait for it.
Hence a trim every ``CRMSCORE_HEAP_TRIM_SECONDS`` (60 s), in a thread of its own, and
not after every epoch (a trim every 5 s left the freshness p99 as it was). A trim lowers
the peak only when it falls within a catch-up (with a trim every 15 s, 780-832 MiB
against 840-930). A C library without ``malloc_trim`` (musl) leaves nothing to do.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

_PAGE = os.sysconf("SC_PAGE_SIZE")
NOTABLE_BYTES = 64 * 2**20  # a trim that gives back this much is logged at INFO


def rss_bytes() -> int:
    """This process's resident memory."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library this process runs on
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim  # type: ignore[no-any-return]


class HeapTrimmer:
    """Calls ``malloc_trim(0)`` every ``every_s`` seconds in a daemon thread."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.malloc_trim = _malloc_trim()
        self.stopped = threading.Event()

    def trim(self) -> int | None:
        """Trim now: the resident bytes given back (None: no ``malloc_trim`` here)."""
        if self.malloc_trim is None:
            return None
        before = rss_bytes()
        self.malloc_trim(0)
        return max(before - rss_bytes(), 0)

    def start(self) -> threading.Thread | None:
        """The trimming thread, or None where there is nothing to trim with."""
        if self.malloc_trim is None:
            log.info("no malloc_trim in this C library: the freed heap is not trimmed")
            return None

        def run() -> None:
            while not self.stopped.wait(self.every_s):
                started = time.perf_counter()
                released = self.trim() or 0
                level = logging.INFO if released >= NOTABLE_BYTES else logging.DEBUG
                log.log(level, "heap trimmed in %.0f ms: %.1f MiB given back",
                        (time.perf_counter() - started) * 1000, released / 2**20)

        thread = threading.Thread(target=run, name="heap-trim", daemon=True)
        thread.start()
        return thread
