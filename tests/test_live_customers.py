"""flows/live_customers.py: which customers stay unpickled."""

from __future__ import annotations

import threading

import pytest

from flows.live_customers import LiveCustomers


class Logic:
    def __init__(self) -> None:
        self.resting = False

    def rest(self) -> None:
        self.resting = True


def test_each_worker_thread_puts_only_its_own_customers_to_rest() -> None:
    live = LiveCustomers(limit=1)
    mine, theirs = Logic(), [Logic(), Logic()]
    live.touch(mine)

    def other_worker() -> None:
        for logic in theirs:
            live.touch(logic)
        assert len(live) == 1

    worker = threading.Thread(target=other_worker)
    worker.start()
    worker.join()
    assert not mine.resting  # the other thread's limit does not count this one
    assert [logic.resting for logic in theirs] == [True, False]
    assert len(live) == 1


def test_a_forgotten_customer_frees_its_place() -> None:
    live = LiveCustomers(limit=1)
    first, second = Logic(), Logic()
    live.touch(first)
    live.forget(first)  # bytewax discarded it
    live.touch(second)
    assert not first.resting and not second.resting and len(live) == 1


def test_the_limit_is_at_least_one() -> None:
    with pytest.raises(ValueError, match="limit must be >= 1"):
        LiveCustomers(limit=0)
