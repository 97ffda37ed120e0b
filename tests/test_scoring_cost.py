"""bench/scoring_cost.py, the in-process cost harness, on a small stream: it drives the
flow's own step logic, so a change to those steps' interfaces shows up here."""

from bench.scoring_cost import messages, replay


def test_replay_runs_every_event_and_the_wake_ups_they_lead_to():
    events = messages(customers=40, days=120, seed=1)
    result = replay(events)
    assert result["wakes"] > 0  # silent customers' instants came due
    assert result["batches"] == len(events) + result["wakes"]
    spent = result["spent"]
    assert spent["customers, events"] > 0 and spent["customers, wake-ups"] > 0
    assert spent["models"] > 0
