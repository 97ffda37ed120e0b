"""The process that BTYD refits run in: one per flow process, started by the first refit.

A refit (BG/NBD, Pareto/NBD, Gamma-Gamma) is 0.1-3 s of scipy driving Python-level
likelihoods. In a thread of the flow's process it held the GIL that long while the flow's
own thread waited: with Pareto/NBD in every refit a full-speed replay lost a quarter of
its throughput (2,296 events/s against 3,069). In a process of its own it takes another
core, and costs the flow nothing measurable.

The worker is started with ``spawn`` (forking a process that runs bytewax's threads is
unsafe), ignores SIGINT (a Ctrl-C reaches the whole process group: the flow decides) and
exits by itself when the process that started it is gone, so a killed flow leaves no
worker behind.

It runs at a lower CPU priority (``NICENESS``): a refit may wait, an event may not. In a
full-speed replay the worker refits back to back and keeps a core busy; at equal priority
it took that core from the flow's own processes, the broker and Redis. Two flow processes
(a bytewax cluster on this 2-core machine) read 70,980 events in 33.7 and 34.5 s against
25.4 and 23.2 s with the worker niced (one process: 27.9 and 25.1 s against 26.5 and
23.7), run in turns. A refit's CPU budget counts CPU time, so it fits the same, later.

>>> submit(pow, 2, 10).result(timeout=60)
1024
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

T = TypeVar("T")

PARENT_POLL_S = 1.0  # how soon a worker notices that its flow is gone
NICENESS = 10  # added to the flow's; the kernel gives a nice-10 process ~1/10 of a busy core

_lock = threading.Lock()
_executor: ProcessPoolExecutor | None = None


def submit(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
    """Run ``fn(*args, **kwargs)`` in the worker (arguments and result are pickled).

    A worker that died (killed, out of memory) fails the futures it held with
    :class:`BrokenProcessPool`; the next call starts a new one.
    """
    global _executor
    with _lock:
        if _executor is not None:
            try:
                return _executor.submit(fn, *args, **kwargs)
            except BrokenProcessPool:
                _executor.shutdown(wait=False)
        _executor = ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"),
            initializer=_watch_parent, initargs=(os.getpid(),))
        return _executor.submit(fn, *args, **kwargs)


def _watch_parent(parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(NICENESS)

    def exit_when_orphaned() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(0)

    threading.Thread(target=exit_when_orphaned, name="parent-watch", daemon=True).start()
