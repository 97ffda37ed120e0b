"""bench/evaluate_churn.py's statistics: the AUC by ranks and the paired bootstrap of a
lead, on one run and averaged over several (how the note judges "beats")."""

import numpy as np
import pytest

from bench.evaluate_churn import auc, auc_lead


def brute_force_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def noisy_run(seed: int, n: int = 600) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, a score that sees them through a little noise, one that sees them through
    more (rounded, so that ties occur)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    good = labels + rng.normal(0, 1.0, n)
    worse = np.round(labels + rng.normal(0, 2.5, n), 1)
    return good, worse, labels


def test_auc_by_ranks_counts_every_pair_and_halves_ties():
    good, worse, labels = noisy_run(1)
    assert auc(worse, labels) == pytest.approx(brute_force_auc(worse, labels), abs=1e-12)
    assert auc(good, labels) == pytest.approx(brute_force_auc(good, labels), abs=1e-12)


def test_a_clear_lead_has_an_interval_above_zero_and_a_score_has_none_over_itself():
    good, worse, labels = noisy_run(2)
    lead, lo, hi = auc_lead([(good, worse, labels)])
    assert lead == pytest.approx(auc(good, labels) - auc(worse, labels))
    assert 0 < lo < lead < hi
    assert auc_lead([(good, good, labels)]) == (0.0, 0.0, 0.0)


def test_leads_averaged_over_runs_are_their_mean_with_a_narrower_interval():
    runs = [noisy_run(seed) for seed in (3, 4, 5, 6)]
    alone = [auc_lead([run]) for run in runs]
    lead, lo, hi = auc_lead(runs)
    assert lead == pytest.approx(np.mean([a[0] for a in alone]))
    assert lo < lead < hi
    # four runs' worth of customers: about half as wide as one run's interval
    assert hi - lo < 0.7 * np.mean([a[2] - a[1] for a in alone])
