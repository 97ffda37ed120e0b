"""Scores end to end, in event time: generated customers -> real broker -> flow -> Redis.

Two years of a generated stream (each customer has a latent moment at which they stop
buying) go through the real flow. Then, with no further events, the stream clock alone
must have moved silent customers on: the churned ones are ``churned`` with an ``as_of``
past their last event (woken through the timers topic), churn risk separates those
who stopped from those who did not, the churn models learned from matured labels and
the model report says so.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import redis

from crmscore.settings import Settings
from models.lifecycle import STAGES
from models.value import TIERS
from tests.pipeline import (
    FlowEnv,
    admin_client,
    epoch,
    kill,
    score_documents,
    wait_for_consumed,
    wait_until_settled,
)

pytestmark = [pytest.mark.e2e]
DAY_S = 86_400.0


def auc(scores: list[float], labels: list[int]) -> float:
    """Mann-Whitney AUC with ties counted half."""
    s, y = np.asarray(scores), np.asarray(labels)
    pos, neg = s[y == 1], s[y == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[bytes], dict[str, Any]]:
    out = tmp_path_factory.mktemp("data") / "events.jsonl"
    subprocess.run(
        [sys.executable, "-m", "crmscore.cli", "generate", "--customers", "2500", "--days", "730",
         "--start", "2024-01-01T00:00:00Z",
         "--seed", "5", "--malformed-rate", "0", "--out", str(out)],
        check=True, stdout=subprocess.DEVNULL,
    )
    rows = map(orjson.loads, Path(f"{out.with_suffix('')}.truth.jsonl").read_bytes().splitlines())
    truth = {t["customer_id"]: t for t in rows if "stop_at" in t}  # customers, not events
    return out.read_bytes().splitlines(), truth


def test_scores_follow_the_stream_clock(broker, redis_url, unique, tmp_path, stream):
    from crmscore.replay import publish_lines

    lines, truth = stream
    env = FlowEnv(broker.address, redis_url, unique, tmp_path / "recovery")
    settings = Settings.from_env(env.env(CRMSCORE_TOPIC_PARTITIONS="4"))
    assert publish_lines(settings, lines) == len(lines)
    conn = redis.Redis.from_url(redis_url)
    proc = env.start_flow(CRMSCORE_MODEL_PUBLISH_SECONDS="0.5")
    try:
        st = wait_for_consumed(conn, env.layout, len(lines), proc)
        # Long enough for the rescoring that follows a promotion at the very end of the
        # replay to begin: on a slow 2-core box it took over 4 s (two CI runs).
        wait_until_settled(conn, env, quiet_s=10.0)
    finally:
        kill(proc)
    docs = score_documents(conn, env.layout)  # what the flow left, as the checks read it
    clock = epoch(st["stream_clock"])
    buyers = {cid: d for cid, d in docs.items() if d["purchase_count"] > 0}
    assert len(buyers) > 2000

    for cid, d in docs.items():
        assert d["lifecycle_stage"] in STAGES, cid
        assert d["value_tier"] in TIERS, cid
        assert d["strategy"]["name"] and d["strategy"]["reason"], cid
        assert d["model_version"], cid
        assert d["churn_horizon_days"] == 90 and d["clv_horizon_days"] == 365
        if d["purchase_count"]:
            assert 0.0 <= d["churn_risk"] <= 1.0, cid
            assert d["clv_historic"] == pytest.approx(d["net_monetary"])

    # The clock alone moved silent customers on: long gone ones (silent for a year and
    # for over four of their own usual gaps) are churned, and their documents describe
    # an instant after their last event.
    def silent_days(d: dict[str, Any]) -> float:
        return (clock - epoch(d["last_purchase_at"])) / DAY_S

    gone = [d for d in buyers.values()
            if silent_days(d) > 365 and silent_days(d) > 4 * (d["gap_mean_days"] or 0)]
    assert len(gone) > 200
    not_churned = [d for d in gone if d["lifecycle_stage"] != "churned"]
    assert not not_churned, [(d["customer_id"], d["lifecycle_stage"], d["as_of"],
                              d["last_purchase_at"], d["purchase_count"], d.get("gap_mean_days"))
                             for d in not_churned[:5]]
    assert all(epoch(d["as_of"]) > epoch(d["last_event_at"]) for d in gone)
    recent = [d for d in buyers.values() if clock - epoch(d["last_purchase_at"]) < 3 * DAY_S]
    assert recent and all(d["lifecycle_stage"] not in ("churned", "at_risk") for d in recent)

    # Churn risk separates customers who stopped (ground truth) from those who did not.
    stopped = [int(truth[cid]["stop_at"] is not None and epoch(truth[cid]["stop_at"]) < clock)
               for cid in buyers]
    risk_auc = auc([d["churn_risk"] for d in buyers.values()], stopped)
    print(f"churn_risk AUC vs stopped: {risk_auc:.3f} over {len(buyers)} buyers")
    assert risk_auc > 0.75

    # The models learned from matured labels, and the population statistics are served.
    report = orjson.loads(conn.hget(env.layout.model_report(), "doc"))
    assert report["churn"]["labels"] > 1000
    assert report["btyd"] is not None and report["rfm_boundaries"]["n"] == len(buyers)
    served = [d for d in buyers.values() if d["model_version"] == report["model_version"]]
    assert served, "no document was scored with the published models"
    # The served model changed during the replay (priors, then models): every customer
    # still waiting for an instant was rescored, so no document names a model that no
    # longer serves. Only customers asleep (silent for max_silence_days) keep theirs.
    assert report["model_version"] != "prior:base_rate"  # so it did change
    stale = [(d["customer_id"], d["model_version"], d["as_of"], d["last_purchase_at"])
             for d in buyers.values() if d["model_version"] != report["model_version"]
             and epoch(d["as_of"]) - epoch(d["last_purchase_at"]) < 730 * DAY_S]
    print(f"{len(served)} documents name the served model {report['model_version']}; "
          f"promotions: {[p['version'] for p in report['churn']['promotions']]}")
    assert not stale, stale[:10]
    for d in served:
        assert d["rfm"]["cell"] and d["rfm"]["segment"]
        assert d["p_alive"] is not None and d["clv_predicted"] >= 0.0
    assert sum(d["value_tier"] == "premium" for d in buyers.values()) > 0.05 * len(buyers)
    check_grpc(env, gone[0], report)
    check_alerts(env, conn, docs, gone, recent)


def check_alerts(env: FlowEnv, conn: redis.Redis, docs: dict[str, dict[str, Any]],
                 gone: list[dict[str, Any]], recent: list[dict[str, Any]]) -> None:
    """Alerts on the real topic fire in event time, validate, and are measured."""
    import jsonschema_rs

    from models.alert_rules import KINDS
    from tests.pipeline import read_topic

    schema = orjson.loads(Path("schemas/alert.v1.json").read_bytes())
    validator = jsonschema_rs.validator_for(schema)
    alerts = [orjson.loads(v) for _, _, _, v in read_topic(env.bootstrap, env.alerts, 4)]
    assert len(alerts) > 1000
    for a in alerts:
        validator.validate(a)
        assert a["kind"] in KINDS and a["mode"] == "live"  # shadow rules are never published
    ids = [a["alert_id"] for a in alerts]
    assert len(set(ids)) == len(ids)  # one uninterrupted run: no repeats

    by_customer: dict[str, list[dict[str, Any]]] = {}
    for a in sorted(alerts, key=lambda a: a["occurred_at"]):
        by_customer.setdefault(a["customer_id"], []).append(a)
    # A customer who went silent was alerted churned after their last purchase, in event
    # time: while no event of theirs arrived. (Unless the previous churned alert is
    # within its 30-day cooldown: a quick buyer who came back once and left again.)
    checked = 0
    for d in gone:
        last = epoch(d["last_purchase_at"])
        kinds = [(a["kind"], epoch(a["occurred_at"])) for a in by_customer.get(d["customer_id"], [])
                 if a["kind"].startswith("lifecycle.")]
        if any(k == "lifecycle.churned" and last - 30 * DAY_S < at <= last for k, at in kinds):
            continue
        tail = [k for k, at in kinds if at > last]
        assert tail and tail[-1] == "lifecycle.churned", (d["customer_id"], kinds[-5:])
        assert tail.count("lifecycle.churned") == 1
        checked += 1
    assert checked > 0.8 * len(gone)
    # Customers buying right now are not churned.
    for d in recent:
        last = [a for a in by_customer.get(d["customer_id"], [])
                if a["kind"].startswith("lifecycle.")]
        assert not last or last[-1]["kind"] != "lifecycle.churned", d["customer_id"]
    held = sum(a["holdout"] for a in alerts) / len(alerts)
    assert 0.05 < held < 0.15, held

    # The report counts every alert, shadow rules included, and follows outcomes.
    deadline = time.monotonic() + 10
    while True:
        raw = conn.hget(env.layout.alert_report(), "doc")
        report = orjson.loads(raw)["rules"] if raw else {}
        live = sum(r["alerts"] for r in report.values() if r["mode"] == "live")
        if live == len(alerts) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert live == len(alerts)
    assert any(r["mode"] == "shadow" and r["alerts"] > 0 for r in report.values())
    at_risk = report["lifecycle.at_risk"]
    assert at_risk["treated"]["n"] + at_risk["holdout"]["n"] > 100


def check_grpc(env: FlowEnv, doc: dict[str, Any], report: dict[str, Any]) -> None:
    """GetScore and GetModelReport over real gRPC serve what the flow wrote."""
    with admin_client(env) as client:
        score = client.get_score(doc["customer_id"])
        assert score.lifecycle_stage == "churned"
        assert score.churn_risk == pytest.approx(doc["churn_risk"])
        assert score.strategy.name == doc["strategy"]["name"] == "win_back"
        assert score.as_of.ToMicroseconds() / 1e6 == pytest.approx(epoch(doc["as_of"]))
        served = client.model_report()
        assert served.model_version == report["model_version"]
        assert served.metrics["churn_labels"] >= report["metrics"]["churn_labels"]
