"""Alerts and scores across SIGKILLs: no alert id beyond an uninterrupted run's.

One generated stream on the real broker is read by three flows, each with its own
state, timers, alerts topic and Redis prefix:

1. a live flow learns the models (a churn champion, BTYD, RFM and tier boundaries);
2. a flow with frozen model updates, serving that bundle, runs uninterrupted;
3. the same, SIGKILLed three times mid-stream and restarted from its snapshots, with
   only 50 customers unpickled at a time (``CRMSCORE_LIVE_CUSTOMERS``): the others rest
   as their snapshot bytes (flows/live_customers.py).

With the models frozen, every score and alert is a function of the events alone, so the
killed run must publish exactly the uninterrupted run's alert ids (an id may be
re-delivered after a kill, never new), with the same content, and end with the same score
documents. The alerts include model-driven kinds (churn risk, value tier), not only
rhythm-driven lifecycle changes.

The stream is in event-time order on one partition (refunds included; no re-sends, which
come with old times, and no malformed events). A wake-up fires when the stream clock, the
newest event time read, passes its instant; an event of the same customer published
later with an earlier time (disorder, or a partition read behind the others) is then
applied after the wake-up in one run and before it in another. Exactness with disorder
needs a per-partition watermark (docs/design.md).

Before the fix in flows/timers.py ("Restarts"), wake-ups the killed process had written
to the timers topic overtook the re-read events after a restart: a customer was woken
past an event it had not re-applied yet (seen: `purchase.large` alerts with a later
`as_of`, new lifecycle alert ids).
"""

from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import redis

from crmscore.settings import Settings
from models.scoring import ModelBundle
from tests.pipeline import (
    FlowEnv,
    kill,
    read_topic,
    report_fault,
    resumes_after,
    status,
    wait_for_consumed,
    wait_until_settled,
)

pytestmark = [pytest.mark.e2e]
PARTITIONS = 4
# ~10k events by default; scripts/faults runs ~200k (CRMSCORE_FAULT_CUSTOMERS=14000).
CUSTOMERS = int(os.environ.get("CRMSCORE_FAULT_CUSTOMERS", "700"))


def alerts_by_id(env: FlowEnv) -> tuple[dict[str, dict[str, Any]], int]:
    """The alerts on the env's topic by id, and how many messages carried them."""
    messages = [orjson.loads(v) for *_, v in read_topic(env.bootstrap, env.alerts, PARTITIONS)]
    by_id: dict[str, dict[str, Any]] = {}
    for alert in messages:
        held = by_id.setdefault(alert["alert_id"], alert)
        assert held == alert, "one alert id published with two different contents"
    return by_id, len(messages)


def wait_for_bundle(conn: redis.Redis, env: FlowEnv, ready: Callable[[ModelBundle], bool],
                    timeout: float = 90) -> dict[bytes, bytes]:
    """The raw model bundle hash, once the published bundle is ``ready``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = conn.hgetall(env.layout.model_bundle())
        if raw and ready(pickle.loads(raw[b"doc"])):
            return raw
        time.sleep(0.5)
    raise AssertionError("the live flow published no bundle with a champion and tiers")


def test_sigkill_and_restart_publish_no_new_alert_ids(broker, redis_url, unique, tmp_path):
    out = tmp_path / "events.jsonl"
    subprocess.run(
        [sys.executable, "-m", "crmscore.cli", "generate", "--customers", str(CUSTOMERS),
         "--days", "540", "--seed", "23", "--disorder-rate", "0", "--duplicate-rate", "0",
         "--malformed-rate", "0", "--out", str(out)],
        check=True, stdout=subprocess.DEVNULL,
    )
    lines = out.read_bytes().splitlines()
    patience = max(180.0, len(lines) / 200)  # seconds for a run through the stream
    topic = f"tx-shared-{unique}"
    train, calm, crashed = (FlowEnv(broker.address, redis_url, f"{unique}{run}",
                                    tmp_path / f"recovery-{run}") for run in "tab")
    from crmscore.replay import publish_lines

    settings = Settings.from_env(train.env(CRMSCORE_TRANSACTIONS_TOPIC=topic,
                                           CRMSCORE_TOPIC_PARTITIONS="1"))
    assert publish_lines(settings, lines) == len(lines)
    conn = redis.Redis.from_url(redis_url)

    # 1. Learn the models, live, and serve what was learned to both frozen runs.
    proc = train.start_flow(CRMSCORE_TRANSACTIONS_TOPIC=topic, CRMSCORE_MODEL_PUBLISH_SECONDS="0.5")
    wait_for_consumed(conn, train.layout, len(lines), proc, timeout=patience)
    bundle = wait_for_bundle(conn, train, lambda b: b.champion is not None
                             and b.premium_boundary is not None)
    kill(proc, signal.SIGTERM)
    for env in (calm, crashed):
        conn.hset(env.layout.model_bundle(), mapping=bundle)
    frozen = {"CRMSCORE_TRANSACTIONS_TOPIC": topic, "CRMSCORE_MODEL_UPDATES": "frozen"}

    # 2. Uninterrupted.
    proc = calm.start_flow(**frozen)
    wait_for_consumed(conn, calm.layout, len(lines), proc, timeout=patience)
    calm_docs = wait_until_settled(conn, calm, timeout=patience)
    kill(proc, signal.SIGTERM)
    calm_alerts, calm_messages = alerts_by_id(calm)
    assert calm_messages == len(calm_alerts)  # one run: every id once
    kinds = {a["kind"] for a in calm_alerts.values()}
    assert {"lifecycle.at_risk", "lifecycle.churned", "lifecycle.reactivated"} <= kinds
    assert kinds & {"churn_risk.high", "value.premium_entered", "value.premium_left"}, kinds
    assert {a["score"]["model_version"] for a in calm_alerts.values()} == {
        calm_docs[next(iter(calm_docs))]["model_version"]}

    # 3. Killed three times at random moments of the stream, restarted each time.
    seed = int(os.environ.get("CRMSCORE_FAULT_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    shares = sorted(rng.uniform(0.05, 0.95) for _ in range(3))
    print(f"kills at {[round(s, 3) for s in shares]} of the stream (CRMSCORE_FAULT_SEED={seed})")
    resting = {**frozen, "CRMSCORE_LIVE_CUSTOMERS": "50"}
    proc = crashed.start_flow(**resting)
    recoveries = []
    for share in shares:
        wait_for_consumed(conn, crashed.layout, int(share * len(lines)), proc,
                          timeout=patience)
        assert kill(proc) == -signal.SIGKILL
        # The flow reads faster than its status shows: a kill may land after the whole
        # stream was counted. Then no event is left to count anew, so the restart's
        # recovery time is not timed; the comparisons below still judge the restart.
        killed_at = status(conn, crashed.layout)
        proc = crashed.start_flow(**resting)
        fault_ended = time.monotonic()
        if killed_at is not None and killed_at["events_consumed"] < len(lines):
            recoveries.append(resumes_after(conn, crashed.layout, fault_ended))
    wait_for_consumed(conn, crashed.layout, len(lines), proc, timeout=patience)
    crashed_docs = wait_until_settled(conn, crashed, timeout=patience)
    kill(proc, signal.SIGTERM)
    crashed_alerts, crashed_messages = alerts_by_id(crashed)

    new_ids = set(crashed_alerts) - set(calm_alerts)
    assert new_ids == set(), f"{len(new_ids)} new alert ids after a restart"
    assert set(crashed_alerts) == set(calm_alerts)
    assert crashed_alerts == calm_alerts
    assert crashed_docs == calm_docs
    report_fault(f"flow SIGKILL + restart, at random moments; {len(calm_alerts)} alert ids "
                 "and every score document compared", len(shares),
                 status(conn, crashed.layout), 0, recoveries)
    print(f"{len(lines)} events; {len(calm_alerts)} alert ids in both runs; "
          f"{crashed_messages - len(crashed_alerts)} re-delivered after the kills")
