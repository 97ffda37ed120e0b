"""Delayed-label metrics against a batch recomputation of the same labels."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from models.churn_metrics import DelayedLabelMetrics, PairedDifference, binned_auc
from tests.test_churn_e2e import exact_auc


def stream(n: int, seed: int, signal: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.15).astype(int)
    p = 1 / (1 + np.exp(-(rng.normal(-2.0, 1.0, n) + signal * y)))
    return p, y


@pytest.mark.parametrize("seed", range(3))
def test_auc_log_loss_and_calibration_match_a_batch_recomputation(seed: int) -> None:
    p, y = stream(5000, seed)
    m = DelayedLabelMetrics()
    for i, (pi, yi) in enumerate(zip(p.tolist(), y.tolist(), strict=True)):
        m.update(pi, yi, at_us=i)
    assert m.labels == 5000 and m.positives == int(y.sum())
    assert m.auc == pytest.approx(exact_auc(p, y), abs=0.003)
    ll = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert m.log_loss == pytest.approx(ll, rel=1e-9)
    assert m.brier == pytest.approx(np.mean((p - y) ** 2), rel=1e-9)
    table = m.calibration()
    assert sum(row["count"] for row in table) == 5000
    bins = np.minimum((p * 10).astype(int), 9)
    for i, row in enumerate(table):
        inside = bins == i
        assert row["count"] == int(inside.sum())
        if row["count"]:
            assert row["mean_predicted"] == pytest.approx(p[inside].mean())
            assert row["observed_rate"] == pytest.approx(y[inside].mean())


def test_recent_metrics_follow_a_change_the_cumulative_ones_average_away() -> None:
    good_p, good_y = stream(6000, 1, signal=3.0)
    bad_p, bad_y = stream(6000, 2, signal=0.0)
    m = DelayedLabelMetrics(half_life=500)
    for i, (pi, yi) in enumerate(zip(np.r_[good_p, bad_p].tolist(),
                                     np.r_[good_y, bad_y].tolist(), strict=True)):
        m.update(pi, yi, at_us=i)
    assert m.recent_auc == pytest.approx(exact_auc(bad_p[-3000:], bad_y[-3000:]), abs=0.05)
    assert m.auc > m.recent_auc + 0.2


def test_decay_rescaling_keeps_numbers_finite() -> None:
    m = DelayedLabelMetrics(half_life=5)  # the weight overflows every ~2,500 labels
    p, y = stream(20_000, 3)
    for i, (pi, yi) in enumerate(zip(p.tolist(), y.tolist(), strict=True)):
        m.update(pi, yi, at_us=i)
    assert all(math.isfinite(v) for v in m.recent_pos + m.recent_neg)
    assert 0.0 <= m.recent_auc <= 1.0 and math.isfinite(m.recent_log_loss)


def test_history_is_a_bounded_ring_of_snapshots() -> None:
    m = DelayedLabelMetrics(snapshot_every=100, history_len=5)
    p, y = stream(2000, 4)
    for i, (pi, yi) in enumerate(zip(p.tolist(), y.tolist(), strict=True)):
        m.update(pi, yi, at_us=1000 + i)
    assert [h["labels"] for h in m.history] == [1600, 1700, 1800, 1900, 2000]
    assert m.history[-1]["at_us"] == 2999
    assert set(m.history[-1]) >= {"auc", "recent_auc", "log_loss", "recent_log_loss",
                                  "calibration_error", "labels", "positives"}
    blob = pickle.dumps(m)
    assert len(blob) < 40_000
    assert pickle.loads(blob).snapshot() == m.snapshot()


def test_auc_is_undefined_until_both_classes_are_seen() -> None:
    m = DelayedLabelMetrics()
    assert m.auc is None and m.log_loss is None and m.calibration_error() is None
    m.update(0.3, 0, at_us=1)
    assert m.auc is None
    m.update(0.7, 1, at_us=2)
    assert m.auc == 1.0
    assert binned_auc([1.0, 0.0], [1.0, 0.0]) == 0.5  # same bin: a tie


def test_a_paired_difference_rescales_and_stays_finite() -> None:
    d = PairedDifference(half_life=5)  # the weight overflows every ~2,500 differences
    for i in range(20_000):
        d.update(0.1 if i % 2 else -0.1)
    assert d.mean == pytest.approx(0.0, abs=0.02) and math.isfinite(d.se) and d.se > 0
    assert d.labels == 20_000 and pickle.loads(pickle.dumps(d)).mean == d.mean
