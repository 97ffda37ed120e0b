"""JSON documents from Redis (docs/design.md) -> protobuf messages of crmscore.v1.

Pure functions, no I/O. Missing or null fields stay unset, as the design asks of
readers: later issues add score fields to the same documents.

>>> msg = score_message(b'{"customer_id": "c-1", "version": 3, '
...     b'"as_of": "2026-01-02T03:04:05.000006Z", "rfm": {"frequency": 2, "monetary": 9.5}}')
>>> msg.customer_id, msg.version, msg.as_of.seconds, msg.as_of.nanos, msg.rfm.frequency
('c-1', 3, 1767323045, 6000, 2)
>>> msg.HasField("churn_risk"), msg.HasField("first_purchase_at")
(False, False)
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from functools import lru_cache
from typing import Any

import orjson
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from crmscore.v1.scoring_pb2 import (
    CustomerScore,
    ModelReport,
    PipelineStatus,
    WindowStats,
)
from serving.errors import DataError

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_DATE = EPOCH.date()


def timestamp(text: str | None) -> Timestamp | None:
    """RFC 3339 text (``...Z`` or an offset) -> Timestamp; None stays None."""
    if text is None:
        return None
    ts = Timestamp()
    set_time(ts, text)
    return ts


@lru_cache(maxsize=8192)
def _day_start(day: str) -> int:
    return (date.fromisoformat(day) - _EPOCH_DATE).days * 86400


def set_time(ts: Timestamp, text: str) -> None:
    """Set ``ts`` from RFC 3339 text; the flow's ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` fast."""
    if len(text) == 27 and text[10] == "T" and text[26] == "Z" and text[19] == ".":
        ts.seconds = (_day_start(text[:10]) + int(text[11:13]) * 3600
                      + int(text[14:16]) * 60 + int(text[17:19]))
        ts.nanos = int(text[20:26]) * 1000
        return
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    delta = dt - EPOCH
    ts.seconds = delta.days * 86400 + delta.seconds
    ts.nanos = delta.microseconds * 1000


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _set_window(w: WindowStats, d: dict[str, Any] | None) -> None:
    if d:
        w.purchases = int(d.get("purchases") or 0)
        w.spend = d.get("spend") or 0.0
        w.refunds = d.get("refunds") or 0.0


def score_from_dict(d: dict[str, Any]) -> CustomerScore:
    get = d.get
    msg = CustomerScore(
        customer_id=d["customer_id"],
        version=int(get("version") or 0),
        currency=get("currency") or "",
        purchase_count=int(get("purchase_count") or 0),
        gross_monetary=get("gross_monetary") or 0.0,
        net_monetary=get("net_monetary") or 0.0,
        refund_count=int(get("refund_count") or 0),
        refund_total=get("refund_total") or 0.0,
        gap_mean_days=get("gap_mean_days"),
        gap_std_days=get("gap_std_days"),
        churn_risk=get("churn_risk"),
        churn_horizon_days=get("churn_horizon_days"),
        p_alive=get("p_alive"),
        expected_purchases=get("expected_purchases"),
        clv_historic=get("clv_historic"),
        clv_predicted=get("clv_predicted"),
        clv_horizon_days=get("clv_horizon_days"),
        lifecycle_stage=get("lifecycle_stage"),
        value_tier=get("value_tier"),
        model_version=get("model_version"),
    )
    for field in _TIMES:
        text = get(field)
        if text is not None:
            set_time(getattr(msg, field), text)
    rfm = get("rfm")
    if rfm:
        r = msg.rfm
        r.frequency = int(rfm.get("frequency") or 0)
        r.monetary = rfm.get("monetary") or 0.0
        for field in _RFM_OPTIONAL:
            value = rfm.get(field)
            if value is not None:
                setattr(r, field, value)
    windows = get("windows")
    if windows:
        w = msg.windows
        _set_window(w.last_30d, windows.get("30d"))
        _set_window(w.last_90d, windows.get("90d"))
        _set_window(w.last_365d, windows.get("365d"))
    strategy = get("strategy")
    if strategy:
        msg.strategy.name = strategy.get("name") or ""
        msg.strategy.reason = strategy.get("reason") or ""
    return msg


_TIMES = ("as_of", "first_purchase_at", "last_purchase_at", "last_event_at")
_RFM_OPTIONAL = ("recency_days", "r_score", "f_score", "m_score", "cell", "segment")


def score_message(raw: bytes) -> CustomerScore:
    """One score document -> CustomerScore; a broken document is a DataError."""
    try:
        return score_from_dict(orjson.loads(raw))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataError(f"unreadable score document in Redis: {exc!r}") from exc


def status_message(raw: bytes) -> PipelineStatus:
    try:
        d = orjson.loads(raw)
        return PipelineStatus(
            events_consumed=int(d.get("events_consumed") or 0),
            events_applied=int(d.get("events_applied") or 0),
            events_rejected=int(d.get("events_rejected") or 0),
            events_duplicate=int(d.get("events_duplicate") or 0),
            stream_clock=timestamp(d.get("stream_clock")),
            updated_at=timestamp(d.get("updated_at")),
        )
    except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError) as exc:
        raise DataError(f"unreadable pipeline status document in Redis: {exc!r}") from exc


def model_report_message(raw: bytes | None) -> ModelReport:
    """The model report document; None (no report yet) gives an empty report."""
    if raw is None:
        return ModelReport()
    try:
        d = orjson.loads(raw)
        metrics = d.get("metrics") or {}
        report = ModelReport(
            model_version=d.get("model_version"),
            updated_at=timestamp(d.get("updated_at")),
            metrics={
                k: float(v) for k, v in metrics.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            },
        )
        json_format.ParseDict(d, report.report)
        return report
    except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError,
            json_format.ParseError) as exc:
        raise DataError(f"unreadable model report document in Redis: {exc!r}") from exc
