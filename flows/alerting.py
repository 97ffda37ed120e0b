"""Alerts leave the flow here: live ones to the alerts topic, all of them to the report.

Customers detect alerts and follow up their outcomes (models/alerts.py,
models/outcomes.py); this module turns them into Kafka messages and keeps the
population's campaign report in one ``alert_report`` step, published to Redis
(``{prefix}alerts:report``) every ``publish_seconds`` for ``crmscore report alerts``.
"""

from __future__ import annotations

import pickle
import time
from datetime import datetime
from typing import Any

import orjson
from bytewax.operators import StatefulBatchLogic

from crmscore.layout import RedisLayout
from flows.metrics import ALERTS_PUBLISHED
from flows.redis_sink import PublishThrottle, VersionedDoc
from models.alert_rules import LIVE
from models.alerts import Alert
from models.outcomes import Outcome, UpliftReport
from models.transaction import format_time


def is_published(alert: Alert) -> bool:
    """Shadow rules are measured, never published."""
    return alert.mode == LIVE


def alert_message(alert: Alert) -> tuple[bytes, bytes]:
    """Kafka key (customer id) and value (schemas/alert.v1.json)."""
    ALERTS_PUBLISHED.labels(alert.kind).inc()
    return alert.customer_id.encode(), orjson.dumps(alert.to_json())


class AlertReportLogic(StatefulBatchLogic[Alert | Outcome, VersionedDoc, bytes]):
    """Counts alerts and their matured outcomes per rule; publishes the report."""

    def __init__(self, resume: bytes | None, layout: RedisLayout,
                 publish_seconds: float) -> None:
        if resume is None:
            self.report, self.version = UpliftReport(), 0
        else:
            self.report, self.version = pickle.loads(resume)
        self.layout = layout
        self.throttle = PublishThrottle(publish_seconds, resumed=resume is not None)

    def on_batch(self, values: list[Alert | Outcome]) -> tuple[list[Any], bool]:
        for item in values:
            if isinstance(item, Alert):
                self.report.count_alert(item.rule, item.mode)
            else:
                self.report.add(item)
        self.version += len(values)
        return self._publish(), StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[list[Any], bool]:
        return self._publish(), StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        return self.throttle.retry_at()

    def _publish(self) -> list[VersionedDoc]:
        if not self.throttle.due(self.version):
            return []
        doc = {"rules": self.report.report(), "updated_at": format_time(time.time_ns() // 1000)}
        return [VersionedDoc(self.layout.alert_report(), self.version, orjson.dumps(doc))]

    def snapshot(self) -> bytes:
        return pickle.dumps((self.report, self.version), protocol=pickle.HIGHEST_PROTOCOL)
