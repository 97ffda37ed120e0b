"""flows/heap_trim.py: freed heap below the top goes back to the system when trimmed."""

from __future__ import annotations

import threading

import pytest

from flows.heap_trim import HeapTrimmer, rss_bytes

MIB = 2**20


@pytest.fixture
def trimmer() -> HeapTrimmer:
    trimmer = HeapTrimmer(every_s=0.05)
    if trimmer.malloc_trim is None:
        pytest.skip("this C library has no malloc_trim (not glibc)")
    return trimmer


def test_a_trim_gives_back_heap_freed_below_a_live_allocation(trimmer: HeapTrimmer) -> None:
    trimmer.trim()  # what earlier tests left free does not count below
    # 4 KB objects come from malloc's heap (not pymalloc, not mmap); the one allocated
    # last keeps the freed ones below the heap's top, where free() never returns them.
    blocks = [bytes(4096) for _ in range(40_000)]  # ~160 MiB
    cork = bytes(4096)
    del blocks
    released = trimmer.trim()
    assert released is not None and released > 80 * MIB, released / MIB
    assert cork  # alive until here


def test_the_thread_trims_every_interval_until_stopped(trimmer: HeapTrimmer) -> None:
    real = trimmer.malloc_trim
    assert real is not None
    calls = threading.Semaphore(0)

    def counted(pad: int) -> int:
        calls.release()
        return real(pad)

    trimmer.malloc_trim = counted
    thread = trimmer.start()
    assert thread is not None
    assert all(calls.acquire(timeout=5) for _ in range(3))  # three trims, one per interval
    trimmer.stopped.set()
    thread.join(5)
    assert not thread.is_alive()


def test_rss_is_the_resident_memory_of_this_process() -> None:
    before = rss_bytes()
    touched = bytearray(64 * MIB)  # zero pages become resident once written
    touched[::4096] = b"x" * len(touched[::4096])
    assert rss_bytes() - before > 48 * MIB
