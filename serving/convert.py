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

from datetime import UTC, datetime
from typing import Any

import orjson
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from crmscore.doc_codec import load
from crmscore.v1.scoring_pb2 import AlertReport, CustomerScore, ModelReport, PipelineStatus
from serving.errors import DataError

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _time(text: str | None) -> dict[str, int] | None:
    """RFC 3339 text (``...Z`` or an offset; none means UTC) -> Timestamp fields, or None."""
    if text is None:
        return None
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    delta = dt - EPOCH
    return {"seconds": delta.days * 86400 + delta.seconds, "nanos": delta.microseconds * 1000}


def timestamp(text: str | None) -> Timestamp | None:
    """RFC 3339 text -> Timestamp; None stays None."""
    fields = _time(text)
    return None if fields is None else Timestamp(**fields)


def duration(seconds: float | None) -> Duration | None:
    """Seconds -> Duration (to the microsecond); None stays None."""
    if seconds is None:
        return None
    d = Duration()
    d.FromMicroseconds(round(float(seconds) * 1_000_000))
    return d


def _window(d: dict[str, Any] | None) -> dict[str, Any] | None:
    if not d:
        return None
    return {"purchases": int(d.get("purchases") or 0), "spend": d.get("spend") or 0.0,
            "refunds": d.get("refunds") or 0.0}


def _windows(d: dict[str, Any] | None) -> dict[str, Any] | None:
    if not d:
        return None
    windows = {"last_30d": _window(d.get("30d")), "last_90d": _window(d.get("90d")),
               "last_365d": _window(d.get("365d"))}
    return windows if any(windows.values()) else None


def _rfm(d: dict[str, Any] | None) -> dict[str, Any] | None:
    if not d:
        return None
    rfm = {k: v for k in _RFM_OPTIONAL if (v := d.get(k)) is not None}
    rfm["frequency"] = int(d.get("frequency") or 0)
    rfm["monetary"] = d.get("monetary") or 0.0
    return rfm


_RFM_OPTIONAL = ("recency_days", "r_score", "f_score", "m_score", "cell", "segment")


def score_from_dict(d: dict[str, Any]) -> CustomerScore:
    # One constructor call with dicts for the sub-messages: protobuf fills them in C,
    # about a third faster than assigning field by field.
    get = d.get
    strategy = get("strategy")
    return CustomerScore(
        customer_id=d["customer_id"],
        version=int(get("version") or 0),
        as_of=_time(get("as_of")),
        currency=get("currency") or "",
        first_purchase_at=_time(get("first_purchase_at")),
        last_purchase_at=_time(get("last_purchase_at")),
        last_event_at=_time(get("last_event_at")),
        rfm=_rfm(get("rfm")),
        purchase_count=int(get("purchase_count") or 0),
        gross_monetary=get("gross_monetary") or 0.0,
        net_monetary=get("net_monetary") or 0.0,
        refund_count=int(get("refund_count") or 0),
        refund_total=get("refund_total") or 0.0,
        gap_mean_days=get("gap_mean_days"),
        gap_std_days=get("gap_std_days"),
        windows=_windows(get("windows")),
        churn_risk=get("churn_risk"),
        churn_horizon_days=get("churn_horizon_days"),
        p_alive=get("p_alive"),
        expected_purchases=get("expected_purchases"),
        clv_historic=get("clv_historic"),
        clv_predicted=get("clv_predicted"),
        clv_horizon_days=get("clv_horizon_days"),
        lifecycle_stage=get("lifecycle_stage"),
        value_tier=get("value_tier"),
        strategy={"name": strategy.get("name") or "", "reason": strategy.get("reason") or ""}
        if strategy else None,
        model_version=get("model_version"),
    )


def score_message(raw: bytes) -> CustomerScore:
    """One stored score document (crmscore/doc_codec.py) -> CustomerScore; a broken
    document is a DataError."""
    try:
        return score_from_dict(load(raw))
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
            partition_clocks={int(p): ts for p, t in (d.get("partition_clocks") or {}).items()
                              if (ts := timestamp(t)) is not None},
            input_lag=duration(d.get("input_lag_seconds")),
            partition_lags={int(p): lag for p, s in
                            (d.get("partition_lag_seconds") or {}).items()
                            if (lag := duration(s)) is not None},
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


def _alert_group(d: dict[str, Any] | None) -> dict[str, Any]:
    d = d or {}
    return {"n": int(d.get("n") or 0), "conversions": int(d.get("conversions") or 0),
            "conversion_rate": d.get("conversion_rate"), "mean_spend": d.get("mean_spend")}


def _uplift(d: dict[str, Any] | None) -> dict[str, Any] | None:
    if d is None:
        return None
    low, high = d["ci95"]
    return {"difference": d["difference"], "ci95_low": low, "ci95_high": high}


def _comparison(c: dict[str, Any] | None) -> dict[str, Any] | None:
    if c is None:
        return None
    return {"treated": _alert_group(c.get("treated")), "holdout": _alert_group(c.get("holdout")),
            "conversion_uplift": _uplift(c.get("conversion_uplift")),
            "spend_uplift": _uplift(c.get("spend_uplift"))}


def alert_report_message(raw: bytes) -> AlertReport:
    """The alert report document (models/outcomes.py) -> AlertReport, rules by name.

    >>> r = alert_report_message(b'{"updated_at": "2026-01-02T00:00:00Z", "rules": {"x": '
    ...     b'{"kind": "x", "mode": "live", "alerts": 1, "treated": {"n": 0, "conversions": 0, '
    ...     b'"conversion_rate": null, "mean_spend": null}, "holdout": {"n": 0, "conversions": 0},'
    ...     b' "conversion_uplift": null, "spend_uplift": null}}}')
    >>> r.rules[0].rule, r.rules[0].treated.HasField("conversion_rate"), r.rules[0].HasField(
    ...     "conversion_uplift")
    ('x', False, False)
    """
    try:
        d = orjson.loads(raw)
        rules = d.get("rules") or {}
        return AlertReport(
            updated_at=timestamp(d.get("updated_at")),
            rules=[
                {"rule": name, "kind": r.get("kind") or "", "mode": r.get("mode") or "",
                 "alerts": int(r.get("alerts") or 0),
                 "treated": _alert_group(r.get("treated")),
                 "holdout": _alert_group(r.get("holdout")),
                 "conversion_uplift": _uplift(r.get("conversion_uplift")),
                 "spend_uplift": _uplift(r.get("spend_uplift")),
                 "first_alerts": _comparison(r.get("first_alerts"))}
                for name, r in sorted(rules.items())
            ],
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataError(f"unreadable alert report document in Redis: {exc!r}") from exc
