"""Ranking metrics against scikit-learn and scipy."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from ranking.metrics import log_loss, mean_std, normalized_logloss, paired_p_value, roc_auc, slice_metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_and_logloss_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 500)
    probs = np.clip(rng.random(500) * 0.5 + labels * 0.3, 0.01, 0.99)
    probs[:100] = np.round(probs[:100], 1)  # ties
    assert roc_auc(labels, probs) == pytest.approx(roc_auc_score(labels, probs), abs=1e-12)
    assert log_loss(labels, probs) == pytest.approx(sk_log_loss(labels, probs), rel=1e-7)
    base = labels.mean() * 0.9
    expected = sk_log_loss(labels, probs) / sk_log_loss(labels, np.full(500, base))
    assert normalized_logloss(labels, probs, base) == pytest.approx(expected, rel=1e-7)


def test_auc_of_one_class_is_nan_and_constant_prediction_normalises_to_one():
    assert math.isnan(roc_auc(np.ones(5), np.arange(5)))
    labels = np.array([0, 1, 0, 0])
    assert normalized_logloss(labels, np.full(4, 0.25), 0.25) == pytest.approx(1.0)


def test_slices_split_by_history():
    labels = np.array([0, 1, 0, 1, 1, 0])
    probs = np.array([0.1, 0.9, 0.4, 0.3, 0.8, 0.2])
    hist = np.array([True, True, True, False, False, False])
    out = slice_metrics(labels, probs, hist, 0.5)
    assert out["nw"]["impressions"] == 6 and out["nw_hist"]["impressions"] == 3 and out["nw_nohist"]["clicks"] == 2
    assert out["nw_hist"]["auc"] == pytest.approx(roc_auc_score(labels[:3], probs[:3]))
    assert out["nw_nohist"]["auc"] == pytest.approx(roc_auc_score(labels[3:], probs[3:]))


def test_paired_p_value_and_mean_std():
    a, b = [0.71, 0.72, 0.74, 0.70, 0.73], [0.70, 0.70, 0.71, 0.69, 0.70]
    assert paired_p_value(a, b) == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert paired_p_value([0.7], [0.6]) is None
    assert paired_p_value(b, b) is None  # zero variance of the differences: undefined
    assert mean_std(a) == pytest.approx((np.mean(a), np.std(a, ddof=1)))
    assert mean_std([0.5]) == (0.5, 0.0)
