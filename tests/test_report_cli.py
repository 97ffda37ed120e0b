"""``crmscore report alerts`` prints the first-alert comparison of each rule."""

from __future__ import annotations

from crmscore.report import format_report
from models.outcomes import Outcome, UpliftReport


def test_rows_show_the_first_alert_uplift_with_its_interval() -> None:
    report = UpliftReport()
    for i in range(200):
        report.count_alert("lifecycle.at_risk", "live")
        holdout, first = i % 10 == 0, i < 100
        converted = i % 3 == 0 if holdout else i % 2 == 0
        report.add(Outcome("lifecycle.at_risk", "live", holdout, converted, 10_000_000, first))
    rows = format_report(report.report()).splitlines()
    assert len(rows) == 2
    first = report.report()["lifecycle.at_risk"]["first_alerts"]
    assert first["treated"]["n"] + first["holdout"]["n"] == 100
    diff = first["conversion_uplift"]["difference"] * 100
    assert rows[1].startswith("lifecycle.at_risk") and f"{diff:+.1f}pp [" in rows[1]
    assert f"{first['treated']['n']:8d}" in rows[1]
