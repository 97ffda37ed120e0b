"""Items bound for the same key cross between the processes of a cluster together.

bytewax sends every item that crosses to another process on its own: pickled alone, and
in a cluster worker (a thread that Rust started) with a Python thread state made anew
for it. The steps with a single key (models, clock, alert report) receive an item from
every process per label, population row, registration, alert...: ~300,000 items a
process sent the other in a 71,000-event replay on two processes, whose worker threads
spent ~45% of their CPU outside the flow's own logic (one process: ~20%).

:func:`to_one_key` turns what one worker emits for such a step in one activation into one
item, and :class:`Unbatched` hands the items to the step's logic one by one, as before:
the step's state, snapshots and outputs are unchanged. (The timer buckets have many keys,
an hour each: grouping by bucket left ~47,000 items where ~45,000 had crossed, so their
registrations cross one by one.)
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Generic, TypeVar

import bytewax.operators as op
from bytewax.dataflow import Stream
from bytewax.operators import StatefulBatchLogic

V = TypeVar("V")
W = TypeVar("W")
S = TypeVar("S")


def group_by_key(items: Iterable[tuple[str, V]]) -> list[tuple[str, tuple[V, ...]]]:
    """``(key, value)`` pairs -> one ``(key, values)`` per key, in order of first sight.

    >>> group_by_key([("a", 1), ("b", 2), ("a", 3)])
    [('a', (1, 3)), ('b', (2,))]
    """
    groups: dict[str, list[V]] = {}
    for key, value in items:
        groups.setdefault(key, []).append(value)
    return [(key, tuple(values)) for key, values in groups.items()]


def to_one_key(step_id: str, up: Stream[V], key: str) -> Stream[tuple[str, tuple[V, ...]]]:
    """Everything in ``up`` for the single-key step ``step_id``, keyed ``key``: what a
    worker emits in one activation goes as one item."""
    keyed = op.key_on(f"{step_id}_key", up, lambda _: key)
    return op.flat_map_batch(f"{step_id}_batches", keyed, group_by_key)


class Unbatched(StatefulBatchLogic[tuple[V, ...], W, S], Generic[V, W, S]):
    """A step's logic fed from :func:`to_one_key`: the batches' items, in order."""

    def __init__(self, logic: StatefulBatchLogic[V, W, S]) -> None:
        self.logic = logic

    def on_batch(self, values: list[tuple[V, ...]]) -> tuple[Iterable[W], bool]:
        return self.logic.on_batch([v for batch in values for v in batch])

    def on_notify(self) -> tuple[Iterable[W], bool]:
        return self.logic.on_notify()

    def on_eof(self) -> tuple[Iterable[W], bool]:
        return self.logic.on_eof()

    def notify_at(self) -> datetime | None:
        return self.logic.notify_at()

    def snapshot(self) -> S:
        return self.logic.snapshot()

