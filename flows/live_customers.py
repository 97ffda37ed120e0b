"""Which customers the flow keeps unpickled: the most recently touched, up to a limit.

A customer held as Python objects takes ~5 KB (a year of history: its recent events, the
event ids it has seen, its alert memory); pickled, ~1.4 KB. The flow pickles every
customer at the end of each batch anyway (its snapshot, flows/scoring.py), so a customer
left alone can rest as those bytes and be unpickled (~15 µs) when its next event or
wake-up comes. Most of a large population is quiet at any moment: keeping only the
recently touched ones unpickled bounds the memory the others take to their snapshots.

Each bytewax worker is a thread with its own customers, so each thread keeps its own
recency order: one worker never puts another's customer to rest in the middle of a batch.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Protocol


class Resting(Protocol):
    def rest(self) -> None:
        """Drop the unpickled customer; keep its snapshot bytes."""


class LiveCustomers:
    """The ``limit`` most recently touched customers of each worker thread stay
    unpickled; touching one more puts the least recently touched to rest.

    >>> class Logic:
    ...     def __init__(self, name): self.name, self.resting = name, False
    ...     def rest(self): self.resting = True
    >>> live = LiveCustomers(limit=2)
    >>> a, b, c = Logic("a"), Logic("b"), Logic("c")
    >>> for logic in (a, b, a, c):
    ...     live.touch(logic)
    >>> [x.name for x in (a, b, c) if x.resting]
    ['b']
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self._local = threading.local()

    def _recent(self) -> OrderedDict[Resting, None]:
        try:
            recent: OrderedDict[Resting, None] = self._local.recent
        except AttributeError:
            recent = self._local.recent = OrderedDict()
        return recent

    def touch(self, logic: Resting) -> None:
        """``logic`` holds its customer unpickled now: the most recently touched."""
        recent = self._recent()
        if logic in recent:
            recent.move_to_end(logic)
            return
        recent[logic] = None
        if len(recent) > self.limit:
            oldest, _ = recent.popitem(last=False)
            oldest.rest()

    def forget(self, logic: Resting) -> None:
        """``logic`` is gone (bytewax discarded it)."""
        self._recent().pop(logic, None)

    def __len__(self) -> int:
        """Customers unpickled in the calling thread."""
        return len(self._recent())
