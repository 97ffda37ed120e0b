"""The gRPC API over real TCP against the real Redis: every RPC and every status.

Also home of the helpers the other ``test_serving_*`` files import: score documents
shaped as docs/design.md describes, written as the flow writes them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import orjson
import pytest
import redis
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from crmscore.layout import RedisLayout
from crmscore.settings import Settings
from crmscore.v1.scoring_pb2 import GetScoreRequest
from serving.auth import entry, new_key
from serving.client import ScoringClient
from serving.server import ScoringServer, create_server

READER_KEY = new_key()
ADMIN_KEY = new_key()


def score_doc(customer_id: str, version: int = 1, **extra: Any) -> dict[str, Any]:
    """A score document as the flow writes it (docs/design.md)."""
    doc: dict[str, Any] = {
        "customer_id": customer_id, "version": version, "as_of": "2026-01-02T03:04:05.000006Z",
        "currency": "EUR",
        "first_purchase_at": "2025-06-01T10:00:00.000000Z",
        "last_purchase_at": "2025-12-30T03:04:05.000000Z",
        "last_event_at": "2026-01-02T03:04:05.000006Z",
        "rfm": {"recency_days": 3.2, "frequency": 5, "monetary": 123.45},
        "purchase_count": 5, "gross_monetary": 130.0, "net_monetary": 123.45,
        "refund_count": 1, "refund_total": 6.55, "gap_mean_days": 10.0, "gap_std_days": 2.0,
        "windows": {"30d": {"purchases": 1, "spend": 20.0, "refunds": 0.0},
                    "90d": {"purchases": 2, "spend": 45.0, "refunds": 6.55},
                    "365d": {"purchases": 5, "spend": 130.0, "refunds": 6.55}},
    }
    doc.update(extra)
    return doc


def write_score(conn: redis.Redis, layout: RedisLayout, doc: dict[str, Any],
                publish: bool = False) -> None:
    raw = orjson.dumps(doc)
    conn.hset(layout.score(doc["customer_id"]), mapping={"v": doc["version"], "doc": raw})
    if publish:
        conn.publish(layout.updates(doc["customer_id"]), raw)


def serving_settings(redis_url: str, prefix: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": redis_url, "redis_prefix": prefix, "grpc_address": "127.0.0.1:0",
        "api_keys": f"{entry('reader', READER_KEY)},{entry('admin', ADMIN_KEY)}",
        "metrics_port": 0, "health_interval": 0.2, "grpc_workers": 8, "max_watchers": 4,
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class Running:
    server: ScoringServer
    port: int
    settings: Settings
    layout: RedisLayout

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, api_key: str | None = READER_KEY, **kwargs: Any) -> ScoringClient:
        return ScoringClient(self.address, api_key, **kwargs)


def start(settings: Settings) -> Running:
    server, port = create_server(settings)
    server.start()
    return Running(server, port, settings, RedisLayout(settings.redis_prefix))


def wait_for(predicate: Any, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def status_of(call: Any, *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code(), info.value.details()


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(redis_url: str) -> Iterator[Running]:
    running = start(serving_settings(redis_url, f"t-{uuid.uuid4().hex[:8]}:"))
    yield running
    running.server.stop(0).wait(5)


@pytest.fixture(scope="module")
def conn(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def reader(api: Running) -> Iterator[ScoringClient]:
    with api.client(READER_KEY) as client:
        yield client


@pytest.fixture
def admin(api: Running) -> Iterator[ScoringClient]:
    with api.client(ADMIN_KEY) as client:
        yield client


# -- GetScore ------------------------------------------------------------------------------


def test_get_score_returns_every_document_field(api, conn, reader) -> None:
    doc = score_doc(
        "c-full", version=7, churn_risk=0.25, churn_horizon_days=90, p_alive=0.8,
        expected_purchases=1.5, clv_historic=123.45, clv_predicted=300.0, clv_horizon_days=365,
        lifecycle_stage="active", value_tier="high", model_version="m-1",
        strategy={"name": "upsell", "reason": "high value, recent"},
    )
    doc["rfm"].update(r_score=5, f_score=4, m_score=5, cell="545", segment="champions")
    write_score(conn, api.layout, doc)
    s = reader.get_score("c-full")
    assert (s.customer_id, s.version, s.currency) == ("c-full", 7, "EUR")
    assert (s.as_of.seconds, s.as_of.nanos) == (1767323045, 6000)
    assert (s.rfm.recency_days, s.rfm.frequency, s.rfm.monetary) == (3.2, 5, 123.45)
    assert (s.rfm.r_score, s.rfm.f_score, s.rfm.m_score) == (5, 4, 5)
    assert (s.rfm.cell, s.rfm.segment) == ("545", "champions")
    assert s.first_purchase_at.seconds == 1748772000
    assert s.last_purchase_at.seconds == 1767063845
    assert (s.purchase_count, s.gross_monetary, s.net_monetary) == (5, 130.0, 123.45)
    assert (s.refund_count, s.refund_total) == (1, 6.55)
    assert (s.gap_mean_days, s.gap_std_days) == (10.0, 2.0)
    assert (s.windows.last_30d.purchases, s.windows.last_30d.spend) == (1, 20.0)
    assert s.windows.last_90d.refunds == 6.55
    assert s.windows.last_365d.purchases == 5
    assert (s.churn_risk, s.churn_horizon_days, s.p_alive) == (0.25, 90, 0.8)
    assert (s.expected_purchases, s.clv_historic, s.clv_predicted) == (1.5, 123.45, 300.0)
    assert s.clv_horizon_days == 365
    assert (s.lifecycle_stage, s.value_tier, s.model_version) == ("active", "high", "m-1")
    assert (s.strategy.name, s.strategy.reason) == ("upsell", "high value, recent")


def test_get_score_leaves_missing_and_null_fields_unset(api, conn, reader) -> None:
    doc = score_doc("c-new", first_purchase_at=None, last_purchase_at=None,
                    gap_mean_days=None, gap_std_days=None)
    doc["rfm"]["recency_days"] = None
    write_score(conn, api.layout, doc)
    s = reader.get_score("c-new")
    for field in ("first_purchase_at", "last_purchase_at", "gap_mean_days", "churn_risk",
                  "clv_predicted", "lifecycle_stage", "strategy", "model_version"):
        assert not s.HasField(field), field
    assert not s.rfm.HasField("recency_days") and not s.rfm.HasField("segment")


def test_unknown_customer_is_not_found(reader) -> None:
    code, details = status_of(reader.get_score, "nobody-here")
    assert code == grpc.StatusCode.NOT_FOUND
    assert "nobody-here" in details


@pytest.mark.parametrize(
    ("customer_id", "message"),
    [("", "customer_id is empty"), ("x" * 129, "129 characters long; at most 128")],
)
def test_bad_customer_id_is_invalid_argument(reader, customer_id, message) -> None:
    code, details = status_of(reader.get_score, customer_id)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details


def test_id_of_128_characters_is_accepted(reader) -> None:
    code, _ = status_of(reader.get_score, "x" * 128)
    assert code == grpc.StatusCode.NOT_FOUND


# -- BatchGetScores ------------------------------------------------------------------------


def test_batch_returns_scores_in_order_and_missing_ids(api, conn, reader) -> None:
    for n in range(3):
        write_score(conn, api.layout, score_doc(f"b-{n}", version=n + 1))
    response = reader.batch_get_scores(["b-2", "gone-1", "b-0", "b-2", "b-1", "gone-2"])
    assert [s.customer_id for s in response.scores] == ["b-2", "b-0", "b-1"]
    assert [s.version for s in response.scores] == [3, 1, 2]
    assert list(response.missing_ids) == ["gone-1", "gone-2"]


def test_batch_of_1000_is_served_and_1001_is_invalid(api, conn, reader) -> None:
    ids = [f"many-{n}" for n in range(1000)]
    response = reader.batch_get_scores(ids)
    assert len(response.missing_ids) == 1000
    code, details = status_of(reader.batch_get_scores, [*ids, "one-more"])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "1001 ids; at most 1000" in details


@pytest.mark.parametrize(
    ("ids", "message"),
    [([], "customer_ids is empty"), (["ok", ""], "customer_ids[1] is empty"),
     (["y" * 200], "customer_ids[0] is 200 characters long")],
)
def test_batch_with_a_bad_id_is_invalid_argument(reader, ids, message) -> None:
    code, details = status_of(reader.batch_get_scores, ids)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details


def test_message_size_limit_refuses_huge_requests(api, redis_url) -> None:
    small = start(serving_settings(redis_url, api.settings.redis_prefix,
                                   grpc_max_message_bytes=64 * 1024))
    try:
        with small.client() as client:
            code, _ = status_of(client.batch_get_scores, ["z" * 100] * 1000)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        small.server.stop(0)


# -- status, model report, segments -------------------------------------------------------


def test_pipeline_status_for_admins(api, conn, admin) -> None:
    code, details = status_of(admin.pipeline_status)
    assert code == grpc.StatusCode.NOT_FOUND and "has the flow run" in details
    status = {"events_consumed": 20, "events_applied": 15, "events_rejected": 3,
              "events_duplicate": 2, "stream_clock": "2026-01-02T03:04:05.000000Z",
              "updated_at": "2026-01-03T00:00:00.000000Z",
              "partition_clocks": {"0": "2026-01-02T03:04:05.000000Z",
                                   "3": "2026-02-01T00:00:00.000000Z"},
              "input_lag_seconds": 12.5, "partition_lag_seconds": {"0": 0.0, "3": 12.5}}
    conn.hset(api.layout.status(), mapping={"v": 1, "doc": orjson.dumps(status)})
    s = admin.pipeline_status()
    assert (s.events_consumed, s.events_applied, s.events_rejected, s.events_duplicate) == (
        20, 15, 3, 2)
    assert s.stream_clock.seconds == 1767323045 and s.updated_at.seconds == 1767398400
    assert {p: t.seconds for p, t in s.partition_clocks.items()} == {
        0: 1767323045, 3: 1769904000}
    assert s.input_lag.ToMicroseconds() == 12_500_000
    assert {p: d.ToMicroseconds() for p, d in s.partition_lags.items()} == {
        0: 0, 3: 12_500_000}
    conn.hset(api.layout.status(), mapping={
        "v": 2, "doc": orjson.dumps({**status, "stream_clock": None, "input_lag_seconds": None})})
    assert not admin.pipeline_status().HasField("stream_clock")
    assert not admin.pipeline_status().HasField("input_lag")


def test_model_report_is_empty_until_written(api, conn, admin) -> None:
    assert admin.model_report() == type(admin.model_report())()
    report = {"model_version": "churn-7", "updated_at": "2026-01-02T00:00:00.000000Z",
              "metrics": {"churn_auc": 0.81, "clv_mae": 12.5, "note": "text"},
              "models": {"churn": {"kind": "logistic"}}}
    key = f"{api.layout.prefix}models"
    conn.set(key, orjson.dumps(report))
    r = admin.model_report()
    assert r.model_version == "churn-7" and r.updated_at.seconds == 1767312000
    assert dict(r.metrics) == {"churn_auc": 0.81, "clv_mae": 12.5}
    assert r.report["models"]["churn"]["kind"] == "logistic"
    conn.delete(key)
    conn.hset(key, mapping={"v": 1, "doc": orjson.dumps({**report, "model_version": "h"})})
    assert admin.model_report().model_version == "h"
    conn.delete(key)


def alert_report_doc() -> dict[str, Any]:
    """An alert report as the flow writes it (models/outcomes.py, flows/alerting.py)."""
    empty = {"n": 0, "conversions": 0, "conversion_rate": None, "mean_spend": None}
    return {"updated_at": "2026-01-03T00:00:00.000000Z", "rules": {
        "lifecycle.at_risk": {
            "kind": "lifecycle.at_risk", "mode": "live", "alerts": 120,
            "treated": {"n": 100, "conversions": 30, "conversion_rate": 0.3, "mean_spend": 12.5},
            "holdout": {"n": 12, "conversions": 2, "conversion_rate": 0.1667, "mean_spend": 5.0},
            "conversion_uplift": {"difference": 0.133, "ci95": [-0.05, 0.3]},
            "spend_uplift": {"difference": 7.5, "ci95": [1.0, 14.0]},
            "first_alerts": {
                "treated": {"n": 40, "conversions": 16, "conversion_rate": 0.4,
                            "mean_spend": 20.0},
                "holdout": {"n": 5, "conversions": 1, "conversion_rate": 0.2, "mean_spend": 4.0},
                "conversion_uplift": {"difference": 0.2, "ci95": [-0.1, 0.45]},
                "spend_uplift": None}},
        "churn_risk.high@shadow_0.6": {
            "kind": "churn_risk.high", "mode": "shadow", "alerts": 7,
            "treated": {"n": 1, "conversions": 0, "conversion_rate": 0.0, "mean_spend": 0.0},
            "holdout": empty, "conversion_uplift": None, "spend_uplift": None}}}


def test_alert_report_for_admins(api, conn, admin) -> None:
    def count(code: str) -> float:
        return REGISTRY.get_sample_value(
            "crmscore_grpc_request_seconds_count", {"method": "GetAlertReport", "code": code}
        ) or 0.0

    before_ok, before_missing = count("OK"), count("NOT_FOUND")
    code, details = status_of(admin.alert_report)
    assert code == grpc.StatusCode.NOT_FOUND and "no alert report" in details
    key = api.layout.alert_report()
    conn.hset(key, mapping={"v": 3, "doc": orjson.dumps(alert_report_doc())})
    try:
        r = admin.alert_report()
    finally:
        conn.delete(key)
    assert r.updated_at.seconds == 1767398400
    assert [rule.rule for rule in r.rules] == ["churn_risk.high@shadow_0.6", "lifecycle.at_risk"]
    shadow, live = r.rules
    assert (live.kind, live.mode, live.alerts) == ("lifecycle.at_risk", "live", 120)
    assert (live.treated.n, live.treated.conversions, live.treated.conversion_rate,
            live.treated.mean_spend) == (100, 30, 0.3, 12.5)
    assert (live.holdout.n, live.holdout.conversions, live.holdout.conversion_rate,
            live.holdout.mean_spend) == (12, 2, 0.1667, 5.0)
    u = live.conversion_uplift
    assert (u.difference, u.ci95_low, u.ci95_high) == (0.133, -0.05, 0.3)
    u = live.spend_uplift
    assert (u.difference, u.ci95_low, u.ci95_high) == (7.5, 1.0, 14.0)
    first = live.first_alerts
    assert (first.treated.n, first.holdout.conversions) == (40, 1)
    assert first.conversion_uplift.ci95_high == 0.45 and not first.HasField("spend_uplift")
    assert not shadow.HasField("first_alerts")
    assert (shadow.kind, shadow.mode, shadow.alerts) == ("churn_risk.high", "shadow", 7)
    # A zero is known, a null is not: presence tells them apart.
    assert shadow.treated.HasField("conversion_rate") and shadow.treated.conversion_rate == 0.0
    assert shadow.treated.HasField("mean_spend") and shadow.treated.mean_spend == 0.0
    assert shadow.HasField("holdout") and shadow.holdout.n == 0
    assert not shadow.holdout.HasField("conversion_rate")
    assert not shadow.holdout.HasField("mean_spend")
    assert not shadow.HasField("conversion_uplift") and not shadow.HasField("spend_uplift")
    code, _ = status_of(admin.alert_report)
    assert code == grpc.StatusCode.NOT_FOUND
    assert (count("OK"), count("NOT_FOUND")) == (before_ok + 1, before_missing + 2)


def test_list_segments_counts_every_scored_customer(redis_url, conn) -> None:
    running = start(serving_settings(redis_url, f"seg-{uuid.uuid4().hex[:8]}:"))
    try:
        cells = [("active", "high", "champions")] * 3 + [("at_risk", "low", "at_risk")] * 2
        for n, (stage, tier, segment) in enumerate(cells):
            doc = score_doc(f"s-{n}", lifecycle_stage=stage, value_tier=tier)
            doc["rfm"]["segment"] = segment
            write_score(conn, running.layout, doc)
        write_score(conn, running.layout, score_doc("s-plain"))
        with running.client() as client:
            r = client.list_segments()
        assert r.customers_total == 6
        assert [(c.lifecycle_stage, c.value_tier, c.customers) for c in r.by_stage_tier] == [
            ("active", "high", 3), ("at_risk", "low", 2), ("", "", 1)]
        assert [(c.segment, c.customers) for c in r.by_rfm_segment] == [
            ("champions", 3), ("at_risk", 2), ("", 1)]
        assert r.computed_at.seconds > 1_700_000_000
    finally:
        running.server.stop(0)


# -- auth ----------------------------------------------------------------------------------


def test_missing_key_is_unauthenticated(api) -> None:
    with api.client(api_key=None) as client:
        code, details = status_of(client.get_score, "c-full")
    assert code == grpc.StatusCode.UNAUTHENTICATED and "missing API key" in details


def test_admin_methods_without_key_are_unauthenticated(api) -> None:
    with api.client(api_key=None) as client:
        for call in (client.pipeline_status, client.model_report, client.alert_report):
            code, details = status_of(call)
            assert code == grpc.StatusCode.UNAUTHENTICATED and "missing API key" in details


def test_unknown_key_is_unauthenticated(api) -> None:
    with api.client(api_key=new_key()) as client:
        for call, arg in ((client.get_score, "c-full"), (client.batch_get_scores, ["c-full"])):
            code, details = status_of(call, arg)
            assert code == grpc.StatusCode.UNAUTHENTICATED and details == "unknown API key"


def test_malformed_authorization_is_unauthenticated(api) -> None:
    with api.client(api_key=None) as client:
        code, _ = status_of(
            client.stub.GetScore, GetScoreRequest(customer_id="c-full"),
            metadata=(("authorization", f"Basic {READER_KEY}"),), timeout=5,
        )
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_reader_may_not_read_status_or_reports(reader) -> None:
    for call in (reader.pipeline_status, reader.model_report, reader.alert_report):
        code, details = status_of(call)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "'reader' may not call" in details


def test_admin_may_call_reader_methods(api, conn, admin) -> None:
    write_score(conn, api.layout, score_doc("c-admin"))
    assert admin.get_score("c-admin").customer_id == "c-admin"
    assert admin.list_segments().customers_total >= 1


def test_auth_off_needs_no_key(api, caplog) -> None:
    with caplog.at_level("WARNING"):
        running = start(serving_settings(
            api.settings.redis_url, api.settings.redis_prefix, auth="off", api_keys=""))
    try:
        assert "AUTH IS OFF" in caplog.text
        with running.client(api_key=None) as client:
            assert client.pipeline_status().events_consumed >= 0
    finally:
        running.server.stop(0)


# -- health, reflection, metrics -----------------------------------------------------------


def test_health_is_serving_while_redis_answers(api, reader) -> None:
    wait_for(lambda: reader.health() == "SERVING", what="SERVING")
    assert reader.health("crmscore.v1.Scoring") == "SERVING"


def test_reflection_lists_the_services(api) -> None:
    with grpc.insecure_channel(api.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        names = {s.name for s in response.list_services_response.service}
        assert {"crmscore.v1.Scoring", "grpc.health.v1.Health"} <= names
        request = reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="crmscore.v1.Scoring")
        (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        assert response.file_descriptor_response.file_descriptor_proto


def test_metrics_count_calls_by_method_and_status(api, conn, reader) -> None:
    def count(code: str) -> float:
        return REGISTRY.get_sample_value(
            "crmscore_grpc_request_seconds_count", {"method": "GetScore", "code": code}) or 0.0

    before_ok, before_missing = count("OK"), count("NOT_FOUND")
    write_score(conn, api.layout, score_doc("c-metrics"))
    reader.get_score("c-metrics")
    status_of(reader.get_score, "c-metrics-missing")
    assert count("OK") == before_ok + 1
    assert count("NOT_FOUND") == before_missing + 1
    assert REGISTRY.get_sample_value("crmscore_grpc_in_flight", {"method": "GetScore"}) == 0


# -- WatchCustomer -------------------------------------------------------------------------


def test_watch_sends_the_current_score_then_each_change(api, conn, reader) -> None:
    write_score(conn, api.layout, score_doc("w-1", version=1))
    call = reader.watch("w-1", timeout=10)
    try:
        first = next(call)
        assert (first.customer_id, first.version) == ("w-1", 1)
        for version in (2, 3):
            write_score(conn, api.layout, score_doc("w-1", version=version, net_monetary=version),
                        publish=True)
            update = next(call)
            assert (update.version, update.net_monetary) == (version, version)
    finally:
        call.cancel()


def test_watch_of_a_customer_without_score_waits_for_the_first(api, conn, reader) -> None:
    call = reader.watch("w-later", timeout=10)
    try:
        hub = api.server.hub
        wait_for(lambda: any(e.is_set() for e in hub._ready.values()), what="subscription")
        write_score(conn, api.layout, score_doc("w-later", version=4), publish=True)
        assert next(call).version == 4
    finally:
        call.cancel()


def test_watch_ends_cleanly_when_the_client_cancels(api, conn, reader) -> None:
    write_score(conn, api.layout, score_doc("w-cancel"))
    hub = api.server.hub
    calls = [reader.watch("w-cancel", timeout=10) for _ in range(2)]
    for call in calls:
        assert next(call).customer_id == "w-cancel"
    assert hub._count == 2 and len(hub._watchers[api.layout.updates("w-cancel")]) == 2
    for call in calls:
        call.cancel()
    wait_for(lambda: hub._count == 0, what="watchers to leave")
    assert api.layout.updates("w-cancel") not in hub._watchers


def test_watchers_are_capped(api, conn, reader) -> None:
    write_score(conn, api.layout, score_doc("w-cap"))
    cap = api.settings.max_watchers
    calls = [reader.watch("w-cap", timeout=10) for _ in range(cap)]
    try:
        for call in calls:
            next(call)
        code, details = status_of(lambda: next(reader.watch("w-cap", timeout=5)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "too many watchers" in details
    finally:
        for call in calls:
            call.cancel()
    wait_for(lambda: api.server.hub._count == 0, what="watchers to leave")


def test_open_watch_streams_leave_unary_calls_their_threads(redis_url, conn) -> None:
    """Watchers hold their threads for minutes: they must not take the unary calls' ones
    (serving/threads.py). One unary thread, every watcher slot taken: GetScore answers."""
    running = start(serving_settings(redis_url, f"t-{uuid.uuid4().hex[:8]}:",
                                     grpc_workers=1, max_watchers=3))
    write_score(conn, running.layout, score_doc("w-threads"))
    try:
        with running.client() as client:
            calls = [client.watch("w-threads", timeout=10) for _ in range(3)]
            try:
                for call in calls:
                    assert next(call).customer_id == "w-threads"
                for _ in range(3):
                    assert client.get_score("w-threads", timeout=2).customer_id == "w-threads"
                code, _ = status_of(lambda: next(client.watch("w-threads", timeout=2)))
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED  # refused, not queued
            finally:
                for call in calls:
                    call.cancel()
    finally:
        running.server.stop(0).wait(5)


def test_watch_needs_a_reader_key(api) -> None:
    with api.client(api_key=None) as client:
        code, _ = status_of(lambda: next(client.watch("w-1", timeout=5)))
    assert code == grpc.StatusCode.UNAUTHENTICATED
