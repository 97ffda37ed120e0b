"""A bytewax cluster worker keeps one Python thread state for its life
(flows/worker_thread.py)."""

from __future__ import annotations

import threading

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSource, cluster_main

from flows import worker_thread
from flows.worker_thread import keep_thread_state


def _locals_made(keep: bool) -> int:
    """How many times a worker's threading.local came back empty over 20 batches."""
    local = threading.local()
    made: list[object] = []

    def step(n: int) -> int:
        if keep:
            keep_thread_state()
        if getattr(local, "value", None) is None:
            local.value = object()
            made.append(local.value)
        return n

    flow = Dataflow("thread_state")
    numbers = op.input("numbers", flow, TestingSource(range(200), batch_size=10))
    op.inspect("seen", op.map("step", numbers, step), lambda *_: None)
    cluster_main(flow, [], 0)  # the worker runs in a thread Rust started
    return len(made)


def test_without_it_every_batch_gets_a_new_thread_state() -> None:
    assert _locals_made(keep=False) == 20  # what the flow paid for before


def test_with_it_the_worker_keeps_its_thread_state() -> None:
    assert _locals_made(keep=True) == 1


def test_the_main_thread_is_left_alone() -> None:
    keep_thread_state()
    assert threading.get_ident() not in worker_thread._kept
