"""A timer bucket's journal: what it rebuilds, and what its snapshot weighs."""

import pickle

from hypothesis import given, settings
from hypothesis import strategies as st

from flows.bucket_journal import SLACK, BucketJournal
from flows.timers import Registration, Tick, TimerBucketLogic, Wake

CUSTOMERS = st.sampled_from(["a", "b", "c-42", "ü-7", "x" * 128])
DUES = st.integers(-(2**40), 2**60)
CHANGES = st.lists(st.tuples(st.booleans(), CUSTOMERS, DUES, st.integers(0, 2**40)),
                   max_size=300)


@settings(max_examples=200, deadline=None)
@given(CHANGES)
def test_a_snapshot_rebuilds_what_the_changes_left_held(changes):
    journal, expected = BucketJournal(), {}
    for add, customer_id, due_us, version in changes:
        if add:
            journal.add(customer_id, due_us, version)
            expected[customer_id, due_us] = version
        else:
            assert journal.drop(customer_id, due_us) == ((customer_id, due_us) in expected)
            expected.pop((customer_id, due_us), None)
        resumed = BucketJournal(journal.snapshot())
        assert resumed.held == expected == journal.held
        assert list(resumed.held) == list(expected)  # insertion order: the firing order
        journal = resumed  # and go on from it, as a restarted flow does


def test_the_journal_stays_within_twice_the_held_set_however_much_it_churns():
    journal, largest = BucketJournal(), 0
    for n in range(400):
        journal.add(f"c-{n}", n, 1)
    record_bytes = 18 + len("c-19999")  # the largest record below
    for n in range(400, 20_000):  # a customer's instant moving: drop one, add one
        journal.drop(f"c-{n - 400}", n - 400)
        journal.add(f"c-{n}", n, 1)
        assert len(journal.held) == 400
        if n % 1000 == 0:  # resumed now and then: it counts the records it read
            journal = BucketJournal(journal.snapshot())
        largest = max(largest, len(journal.snapshot()))
    assert largest <= (2 * 400 + SLACK) * record_bytes
    rewritten = sum(18 + len(c.encode()) for c, _ in journal.held)  # one record each
    assert largest > 1.9 * rewritten  # it does grow between rewrites


def test_a_bucket_resumes_from_each_snapshot_format_it_ever_wrote():
    columns = pickle.dumps((False, ["b", "c"], [7, 9], [3, 0], None))  # session 26
    sets = (False, {Registration("b", 7, 3), Registration("c", 9)}, None)  # before
    for resume in (columns, sets):
        bucket = TimerBucketLogic(resume)
        assert bucket.held == {("b", 7): Registration("b", 7, 3), ("c", 9): Registration("c", 9)}
        resumed = TimerBucketLogic(bucket.snapshot())
        assert resumed.held == bucket.held and not resumed.closed
        fired, _ = resumed.on_batch([Tick(10)])
        assert sorted(fired) == [Wake("b", 10), Wake("c", 10)]
        assert TimerBucketLogic(resumed.snapshot()).held == {}  # fired: nothing held
        assert TimerBucketLogic(resumed.snapshot()).closed
