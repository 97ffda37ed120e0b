"""Delayed-label metrics for one churn model: AUC, log loss, calibration, history.

Each update pairs the probability a model gave *when the prediction was opened* with
the label that matured later (prequential and honest: the model had not seen the label).
Everything is bounded, whatever the stream length:

- ROC AUC from two histograms of scores (one per class) over ``AUC_BINS`` bins uniform
  in logit space (-9..9, i.e. probabilities ~1e-4..1-1e-4, fine where churn scores
  crowd). Pairs falling in the same bin count as ties (half), so the result is the exact
  AUC of the binned scores; with 256 bins it is within ~0.002 of the exact AUC here.
- ``auc`` / ``log_loss`` cover every label since the start; ``recent_auc`` /
  ``recent_log_loss`` weight labels with an exponential decay (half-life ``half_life``
  labels): the promotion rule compares those, so an old lead does not last forever.
  Their standard errors (``recent_auc_se``: Hanley-McNeil; ``recent_log_loss_se``) use
  the effective label count of the decayed window, ``min(labels, (1+r)/(1-r))`` with
  ``r`` the per-label decay (~5,800 labels for a half-life of 2,000).
- Calibration: ``CALIBRATION_BINS`` bins of the predicted probability with their counts,
  mean prediction and observed churn rate (all labels).
- History: a snapshot every ``snapshot_every`` labels into a ring of ``history_len``.

State: ~4 x 256 + 30 floats plus the history (~200 small dicts): ~30 KB pickled.

>>> m = DelayedLabelMetrics(snapshot_every=2)
>>> for p, y, day in [(0.9, 1, 1), (0.2, 0, 2), (0.6, 1, 3), (0.7, 0, 4)]:
...     m.update(p, y, at_us=day)
>>> m.labels, m.positives, round(m.auc, 3), round(m.log_loss, 3)
(4, 2, 0.75, 0.511)
>>> [(h["at_us"], h["labels"]) for h in m.history]
[(2, 2), (4, 4)]
>>> m.calibration()[9]
{'bin': '0.9-1.0', 'count': 1, 'mean_predicted': 0.9, 'observed_rate': 1.0}
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

AUC_BINS = 256
LOGIT_RANGE = 9.0
CALIBRATION_BINS = 10
EPS = 1e-6  # probabilities are clipped to [EPS, 1 - EPS] for log loss
_RESCALE_AT = 1e150


def log_loss(p: float, y: int) -> float:
    """One label's log loss, the probability clipped to [EPS, 1 - EPS]."""
    q = min(max(p, EPS), 1.0 - EPS)
    return -math.log(q) if y else -math.log(1.0 - q)


def effective_labels(labels: int, growth: float) -> float:
    """The number of labels a decayed mean rests on: ``min(labels, (1+r)/(1-r))``, with
    ``r = 1/growth`` the per-label decay."""
    r = 1.0 / growth
    return min(float(labels), (1.0 + r) / (1.0 - r))


def decayed_se(total: float, sq_total: float, weight_total: float,
               effective: float) -> float | None:
    """Standard error of the decayed mean ``total / weight_total`` (weighted sums of the
    values and of their squares) resting on ``effective`` labels; None with no weight."""
    if not weight_total:
        return None
    mean = total / weight_total
    var = sq_total / weight_total - mean * mean
    return math.sqrt(max(var, 0.0) / max(effective, 1.0))


def score_bin(p: float, bins: int = AUC_BINS) -> int:
    """The AUC histogram bin of probability ``p`` (uniform in logit space)."""
    p = min(max(p, EPS), 1.0 - EPS)
    z = math.log(p / (1.0 - p))
    i = int((z + LOGIT_RANGE) / (2 * LOGIT_RANGE) * bins)
    return 0 if i < 0 else bins - 1 if i >= bins else i


def binned_auc(pos: list[float], neg: list[float]) -> float | None:
    """AUC of two score histograms (ties within a bin count half); None if a class is empty."""
    total_pos, total_neg = sum(pos), sum(neg)
    if total_pos <= 0 or total_neg <= 0:
        return None
    area = 0.0
    neg_below = 0.0
    for p_count, n_count in zip(pos, neg, strict=True):
        area += p_count * (neg_below + 0.5 * n_count)
        neg_below += n_count
    return area / (total_pos * total_neg)


class DelayedLabelMetrics:
    """Prequential metrics of one model on matured labels. Picklable, bounded."""

    def __init__(self, half_life: float = 2000.0, snapshot_every: int = 500,
                 history_len: int = 200) -> None:
        self.labels = 0
        self.positives = 0
        self.last_at_us: int | None = None
        self.pos = [0.0] * AUC_BINS
        self.neg = [0.0] * AUC_BINS
        self.log_loss_sum = 0.0
        self.brier_sum = 0.0
        # decayed copies: the k-th label weighs growth**k; rescaled before overflowing
        self.growth = 2.0 ** (1.0 / half_life)
        self.weight = 1.0
        self.recent_pos = [0.0] * AUC_BINS
        self.recent_neg = [0.0] * AUC_BINS
        self.recent_log_loss_sum = 0.0
        self.recent_log_loss_sq_sum = 0.0
        self.recent_weight_sum = 0.0
        self.cal_count = [0] * CALIBRATION_BINS
        self.cal_pred = [0.0] * CALIBRATION_BINS
        self.cal_pos = [0] * CALIBRATION_BINS
        self.snapshot_every = snapshot_every
        self.history: deque[dict[str, Any]] = deque(maxlen=history_len)

    def update(self, p: float, y: int, at_us: int) -> None:
        """Add one matured label ``y`` for the probability ``p`` given at open time."""
        self.labels += 1
        self.positives += y
        self.last_at_us = at_us
        loss = log_loss(p, y)
        self.log_loss_sum += loss
        self.brier_sum += (p - y) ** 2
        b = score_bin(p)
        (self.pos if y else self.neg)[b] += 1.0
        w = self.weight
        (self.recent_pos if y else self.recent_neg)[b] += w
        self.recent_log_loss_sum += w * loss
        self.recent_log_loss_sq_sum += w * loss * loss
        self.recent_weight_sum += w
        self.weight = w * self.growth
        if self.weight > _RESCALE_AT:
            self._rescale()
        c = min(int(p * CALIBRATION_BINS), CALIBRATION_BINS - 1)
        self.cal_count[c] += 1
        self.cal_pred[c] += p
        self.cal_pos[c] += y
        if self.labels % self.snapshot_every == 0:
            self.history.append(self.snapshot())

    def _rescale(self) -> None:
        s = 1.0 / self.weight
        self.recent_pos = [v * s for v in self.recent_pos]
        self.recent_neg = [v * s for v in self.recent_neg]
        self.recent_log_loss_sum *= s
        self.recent_log_loss_sq_sum *= s
        self.recent_weight_sum *= s
        self.weight = 1.0

    @property
    def auc(self) -> float | None:
        return binned_auc(self.pos, self.neg)

    @property
    def recent_auc(self) -> float | None:
        return binned_auc(self.recent_pos, self.recent_neg)

    @property
    def log_loss(self) -> float | None:
        return self.log_loss_sum / self.labels if self.labels else None

    @property
    def recent_log_loss(self) -> float | None:
        if not self.recent_weight_sum:
            return None
        return self.recent_log_loss_sum / self.recent_weight_sum

    @property
    def recent_labels(self) -> float:
        """Effective number of labels behind the recent metrics (decay-weighted)."""
        return effective_labels(self.labels, self.growth)

    @property
    def recent_auc_se(self) -> float | None:
        """Hanley-McNeil standard error of ``recent_auc`` at the effective label count."""
        auc = self.recent_auc
        if auc is None:
            return None
        share = sum(self.recent_pos) / (sum(self.recent_pos) + sum(self.recent_neg))
        n_pos = max(self.recent_labels * share, 1.0)
        n_neg = max(self.recent_labels * (1.0 - share), 1.0)
        q1, q2 = auc / (2.0 - auc), 2.0 * auc * auc / (1.0 + auc)
        var = (auc * (1.0 - auc) + (n_pos - 1.0) * (q1 - auc * auc)
               + (n_neg - 1.0) * (q2 - auc * auc)) / (n_pos * n_neg)
        return math.sqrt(max(var, 0.0))

    @property
    def recent_log_loss_se(self) -> float | None:
        """Standard error of ``recent_log_loss`` at the effective label count."""
        return decayed_se(self.recent_log_loss_sum, self.recent_log_loss_sq_sum,
                          self.recent_weight_sum, self.recent_labels)

    @property
    def brier(self) -> float | None:
        return self.brier_sum / self.labels if self.labels else None

    def calibration(self) -> list[dict[str, Any]]:
        """Per probability decile: count, mean predicted probability, observed churn rate."""
        rows = []
        for i, n in enumerate(self.cal_count):
            rows.append({
                "bin": f"{i / CALIBRATION_BINS:.1f}-{(i + 1) / CALIBRATION_BINS:.1f}",
                "count": n,
                "mean_predicted": self.cal_pred[i] / n if n else None,
                "observed_rate": self.cal_pos[i] / n if n else None,
            })
        return rows

    def calibration_error(self) -> float | None:
        """Expected calibration error: count-weighted |mean predicted - observed rate|."""
        if not self.labels:
            return None
        gap = sum(abs(self.cal_pred[i] - self.cal_pos[i]) for i in range(CALIBRATION_BINS))
        return gap / self.labels

    def snapshot(self) -> dict[str, Any]:
        """The metrics now, as a JSON-able dict."""
        return {
            "at_us": self.last_at_us,
            "labels": self.labels,
            "positives": self.positives,
            "auc": self.auc,
            "recent_auc": self.recent_auc,
            "log_loss": self.log_loss,
            "recent_log_loss": self.recent_log_loss,
            "recent_labels": self.recent_labels,
            "recent_auc_se": self.recent_auc_se,
            "recent_log_loss_se": self.recent_log_loss_se,
            "brier": self.brier,
            "calibration_error": self.calibration_error(),
        }


class PairedDifference:
    """The decayed mean of one per-label difference between two models scored on the
    same labels (e.g. the first one's log loss minus the second's), and its standard error.

    Two models' metrics on the same labels are strongly correlated: where one is wrong
    the other mostly is too. The difference of their means, each with its own standard
    error, hides a steady lead in that shared noise; the standard error of the per-label
    differences does not (a paired test). Same decay as :class:`DelayedLabelMetrics`.

    >>> d = PairedDifference(half_life=1000.0)
    >>> for i in range(400):
    ...     d.update(0.05 + (0.01 if i % 2 else -0.01))
    >>> round(d.mean, 3), round(d.se, 4), d.labels
    (0.05, 0.0005, 400)
    """

    __slots__ = ("growth", "weight", "labels", "sum", "sq_sum", "weight_sum")

    def __init__(self, half_life: float = 2000.0) -> None:
        self.growth = 2.0 ** (1.0 / half_life)
        self.weight = 1.0  # the k-th difference weighs growth**k; rescaled before overflowing
        self.labels = 0
        self.sum = self.sq_sum = self.weight_sum = 0.0

    def __getstate__(self) -> tuple[float, ...]:
        return (self.growth, self.weight, self.labels, self.sum, self.sq_sum, self.weight_sum)

    def __setstate__(self, state: tuple[float, ...]) -> None:
        (self.growth, self.weight, labels, self.sum, self.sq_sum, self.weight_sum) = state
        self.labels = int(labels)

    def update(self, difference: float) -> None:
        w = self.weight
        self.labels += 1
        self.sum += w * difference
        self.sq_sum += w * difference * difference
        self.weight_sum += w
        self.weight = w * self.growth
        if self.weight > _RESCALE_AT:
            s = 1.0 / self.weight
            self.sum *= s
            self.sq_sum *= s
            self.weight_sum *= s
            self.weight = 1.0

    @property
    def mean(self) -> float | None:
        return self.sum / self.weight_sum if self.weight_sum else None

    @property
    def se(self) -> float | None:
        return decayed_se(self.sum, self.sq_sum, self.weight_sum,
                          effective_labels(self.labels, self.growth))
