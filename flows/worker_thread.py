"""Keep a bytewax cluster worker's Python thread state for the life of its thread.

In cluster mode (``crmscore flow -i/-a``) bytewax runs each worker in a thread that Rust
started, and enters Python from it through pyo3, which asks CPython for a thread state
(``PyGILState_Ensure``) and gives it back when the call returns. The thread has no state
of its own, so CPython made one for every call and deleted it after: every operator's
batch, every item pickled for another process. Each new state also maps a fresh frame
stack (the mmap calls and kernel time seen in py-spy), and drops the thread's
``threading.local`` values.

One ``PyGILState_Ensure`` more, never released, leaves CPython's count of this thread's
uses above zero, so the state is kept and reused by every later call. In a one-process
cluster flow with 200,000 items in 20,000 batches, 1.03-1.30 s of CPU went to
0.19-0.24 s. The main thread (a single-process flow runs its worker there) has a state
of its own already.
"""

from __future__ import annotations

import ctypes
import threading

_kept: set[int] = set()  # OS thread ids whose state is kept


def keep_thread_state() -> None:
    """Make CPython keep the calling thread's state between calls into Python.

    Call it on the worker's thread (a step's or sink's builder runs there); once per
    thread is enough, and later calls do nothing."""
    thread = threading.get_ident()
    if thread in _kept or thread == threading.main_thread().ident:
        return
    ensure = ctypes.pythonapi.PyGILState_Ensure
    ensure.restype = ctypes.c_int
    ensure()  # the GIL is held already: this only counts one more use
    _kept.add(thread)
