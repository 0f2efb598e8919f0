"""Ranking metrics of the paper's Table 2: ROC-AUC and normalized logloss on three slices.

Slices of the evaluation week ("NW" = impressions with ``ts >= max_ts - 7 days``):

* ``nw``: every NW impression;
* ``nw_hist``: NW impressions whose user has at least one purchase in the 84 days strictly
  before the impression (``impression_ts - 84 d <= purchase_ts < impression_ts``), i.e. a
  non-empty ``purchase_history_84d`` bag before the length cap;
* ``nw_nohist``: the other NW impressions.

Normalized logloss = logloss of the model / logloss of always predicting the *training* click
rate, on the same impressions (< 1 means better than the constant predictor).
Across seeds: mean and sample std (ddof 1), and a paired t-test on per-seed AUC against ``dcn``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats

SLICE_TITLES: dict[str, str] = {"nw": "NW (all users)", "nw_hist": "NW, users with purchase history",
                                 "nw_nohist": "NW, users without"}
SLICES: tuple[str, ...] = tuple(SLICE_TITLES)  # ("nw", "nw_hist", "nw_nohist")
_EPS = 1e-7


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN when only one class."""
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary cross-entropy; probabilities clipped to ``[1e-7, 1 - 1e-7]``."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1 - _EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def normalized_logloss(labels: np.ndarray, probs: np.ndarray, base_rate: float) -> float:
    """``log_loss(labels, probs) / log_loss(labels, base_rate everywhere)``."""
    base = log_loss(labels, np.full(len(labels), base_rate))
    return log_loss(labels, probs) / base if base > 0 else float("nan")


def slice_masks(has_history: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks of the three slices over the evaluation impressions."""
    has_history = np.asarray(has_history, dtype=bool)
    return {"nw": np.ones_like(has_history), "nw_hist": has_history, "nw_nohist": ~has_history}


def slice_metrics(labels: np.ndarray, probs: np.ndarray, has_history: np.ndarray,
                  train_click_rate: float) -> dict[str, dict[str, float]]:
    """``{slice: {auc, norm_logloss, logloss, impressions, clicks}}`` for one trained model."""
    out: dict[str, dict[str, float]] = {}
    for name, mask in slice_masks(has_history).items():
        y, p = np.asarray(labels)[mask], np.asarray(probs)[mask]
        out[name] = {"auc": roc_auc(y, p), "norm_logloss": normalized_logloss(y, p, train_click_rate),
                     "logloss": log_loss(y, p) if len(y) else float("nan"),
                     "impressions": int(mask.sum()), "clicks": int(np.asarray(y).sum())}
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def paired_p_value(values: Sequence[float], baseline: Sequence[float]) -> float | None:
    """Two-sided paired t-test (``scipy.stats.ttest_rel``) of per-seed values against the
    baseline's on the same seeds; None with fewer than 2 pairs or an undefined statistic."""
    if len(values) != len(baseline):
        raise ValueError(f"paired test needs equal lengths, got {len(values)} and {len(baseline)}")
    if len(values) < 2:
        return None
    p = float(stats.ttest_rel(values, baseline).pvalue)
    return None if math.isnan(p) else p
