"""CustomerState against a batch recomputation, after every event, in any bounded order."""

from __future__ import annotations

import pickle

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from models.customer import APPLIED, DUPLICATE, CustomerState
from models.transaction import DAY_US, Rejection, Transaction, parse_transaction
from tests.reference import _aggregate, mismatches

LATENESS_US = 7 * DAY_US
NOW_US = 2_000_000_000_000_000
BASE_S = 1_735_689_600  # 2025-01-01


def event(i: int, offset_s: int, amount_cents: int, refund: bool) -> dict:
    from datetime import UTC, datetime

    when = datetime.fromtimestamp(BASE_S + offset_s, UTC).isoformat().replace("+00:00", "Z")
    return {"event_id": f"e{i}", "customer_id": "c", "occurred_at": when,
            "type": "refund" if refund else "purchase", "amount": amount_cents / 100,
            "currency": "EUR"}


def as_tx(e: dict) -> Transaction:
    tx = parse_transaction(orjson.dumps(e), NOW_US)
    assert isinstance(tx, Transaction), tx
    return tx


raw_events = st.lists(
    st.tuples(
        st.integers(0, 800 * 86_400),  # time, seconds after the base
        st.integers(1, 100_000),  # amount in cents
        st.integers(0, 2).map(lambda k: k == 0),  # a third are refunds
    ),
    min_size=1, max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(raw=raw_events, shuffle_seed=st.randoms(use_true_random=False),
       dup_every=st.integers(2, 9))
def test_state_matches_recomputation_after_every_event(raw, shuffle_seed, dup_every):
    events = [event(i, t, a, refund) for i, (t, a, refund) in enumerate(sorted(raw))]
    # Disorder within the lateness window: swap neighbours less than 6 days apart.
    order = list(range(len(events)))
    for k in range(len(order) - 1):
        a, b = events[order[k]], events[order[k + 1]]
        close = abs(as_tx(a).occurred_at_us - as_tx(b).occurred_at_us) < 6 * DAY_US
        if close and shuffle_seed.random() < 0.5:
            order[k], order[k + 1] = order[k + 1], order[k]
    stream = []
    for n, k in enumerate(order):
        stream.append(events[k])
        if n % dup_every == 0:
            stream.append(events[k])  # an exact repeat
    state = CustomerState("c")
    applied: dict[str, dict] = {}
    for e in stream:
        outcome = state.apply(as_tx(e), LATENESS_US)
        if e["event_id"] in applied:
            assert outcome == DUPLICATE
            continue
        if isinstance(outcome, Rejection):
            assert outcome.code == "too_late"
            continue
        assert outcome == APPLIED
        applied[e["event_id"]] = e
        doc = state.document()
        assert mismatches(doc, _aggregate(list(applied.values()))) == []
        # The snapshot round-trip keeps everything.
        assert pickle.loads(pickle.dumps(state)).document() == doc


def test_refund_reduces_net_and_is_not_a_purchase():
    state = CustomerState("c")
    state.apply(as_tx(event(1, 0, 10_000, False)), LATENESS_US)
    state.apply(as_tx(event(2, 3600, 2_500, True)), LATENESS_US)
    doc = state.document()
    assert (doc["purchase_count"], doc["refund_count"]) == (1, 1)
    assert (doc["net_monetary"], doc["refund_total"]) == (75.0, 25.0)


def test_conflicting_duplicate_and_too_late_are_rejected_with_reasons():
    state = CustomerState("c")
    assert state.apply(as_tx(event(1, 10 * 86_400, 1000, False)), LATENESS_US) == APPLIED
    conflict = state.apply(as_tx(event(1, 10 * 86_400, 2000, False)), LATENESS_US)
    assert isinstance(conflict, Rejection) and conflict.code == "conflicting_duplicate"
    late = state.apply(as_tx(event(2, 0, 1000, False)), LATENESS_US)
    assert isinstance(late, Rejection) and late.code == "too_late"
    other = dict(event(3, 10 * 86_400, 1000, False), currency="USD")
    mismatch = state.apply(as_tx(other), LATENESS_US)
    assert isinstance(mismatch, Rejection) and mismatch.code == "currency_mismatch"
    assert state.purchase_count == 1


def test_dedup_memory_is_bounded():
    state = CustomerState("c")
    for i in range(5000):
        state.apply(as_tx(event(i, i * 3600, 100, False)), LATENESS_US)
    # Only ids within 7 days of the newest event are remembered (168 hourly events).
    assert len(state.seen) <= 2 * 7 * 24 + 64
    assert len(state.recent) <= (365 + 7) * 24 + 2
