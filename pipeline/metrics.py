"""Slide- and pixel-level metrics (pure numpy): ROC, AUC, specificity at full sensitivity, Dice, IoU.

Conventions
-----------
``y_true`` holds 0/1 labels (1 = positive), ``scores`` any real numbers where
higher means "more positive". A slide is called positive when
``score >= threshold``.

These functions serve the EM loop's validation (``em-round``) and the
``evaluate`` command alike; none of them imports torch.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "roc_curve",
    "roc_auc",
    "specificity_at_full_sensitivity",
    "sensitivity_specificity",
    "dice",
    "iou",
    "slide_metrics",
]


def _check(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"y_true has {y.size} entries but scores has {s.size}")
    if y.size and not np.all(np.isin(y, (0, 1))):
        raise ValueError("y_true must hold 0/1 labels")
    if s.size and not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite (no NaN or infinity)")
    return y.astype(np.int64), s


def roc_curve(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve.

    Returns
    -------
    fpr, tpr, thresholds : ndarray
        For each distinct score ``t`` (descending), the false- and true-positive
        rates of the rule ``score >= t``. The first point is ``(0, 0)`` with
        threshold ``+inf``. Rates are NaN for a class that is absent.
    """
    y, s = _check(y_true, scores)
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    # last index of each run of equal scores
    distinct = np.flatnonzero(np.diff(s_sorted)) if s.size else np.empty(0, np.int64)
    ends = np.concatenate([distinct, [s.size - 1]]) if s.size else np.empty(0, np.int64)
    tps = np.cumsum(y_sorted)[ends] if s.size else np.empty(0)
    fps = (ends + 1) - tps
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    tps = np.concatenate([[0], tps]).astype(np.float64)
    fps = np.concatenate([[0], fps]).astype(np.float64)
    thresholds = np.concatenate([[np.inf], s_sorted[ends]]) if s.size else np.array([np.inf])
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tps / n_pos if n_pos else np.full_like(tps, np.nan)
        fpr = fps / n_neg if n_neg else np.full_like(fps, np.nan)
    return fpr, tpr, thresholds


def roc_auc(y_true, scores) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative, ties counting one half (Mann-Whitney U). NaN when a class is absent."""
    y, s = _check(y_true, scores)
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # average ranks handle ties exactly
    order = np.argsort(s, kind="stable")
    ranks = np.empty(s.size, np.float64)
    s_sorted = s[order]
    i = 0
    while i < s.size:
        j = i
        while j + 1 < s.size and s_sorted[j + 1] == s_sorted[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def specificity_at_full_sensitivity(y_true, scores) -> tuple[float, float]:
    """Specificity of the highest threshold that still calls every positive positive.

    Returns
    -------
    specificity, threshold : float
        ``threshold`` is the lowest positive score (every positive has
        ``score >= threshold``); ``specificity`` is the fraction of negatives
        with ``score < threshold``. Both NaN when there is no positive;
        specificity NaN when there is no negative.
    """
    y, s = _check(y_true, scores)
    if not (y == 1).any():
        return float("nan"), float("nan")
    t = float(s[y == 1].min())
    neg = s[y == 0]
    spec = float((neg < t).mean()) if neg.size else float("nan")
    return spec, t


def sensitivity_specificity(y_true, scores, threshold: float) -> tuple[float, float]:
    """Sensitivity and specificity of the rule ``score >= threshold`` (NaN for an absent class)."""
    y, s = _check(y_true, scores)
    pred = s >= float(threshold)
    pos, neg = y == 1, y == 0
    sens = float(pred[pos].mean()) if pos.any() else float("nan")
    spec = float((~pred[neg]).mean()) if neg.any() else float("nan")
    return sens, spec


def _binary_pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
    p, t = np.asarray(pred), np.asarray(target)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} != target shape {t.shape}")
    return p.astype(bool), t.astype(bool)


def dice(pred, target, empty: float = 1.0) -> float:
    """Dice coefficient ``2 |P & T| / (|P| + |T|)`` of two binary masks (``empty`` when both are empty)."""
    p, t = _binary_pair(pred, target)
    denom = int(p.sum()) + int(t.sum())
    if denom == 0:
        return float(empty)
    return 2.0 * int((p & t).sum()) / denom


def iou(pred, target, empty: float = 1.0) -> float:
    """Intersection over union ``|P & T| / |P | T|`` of two binary masks (``empty`` when both are empty)."""
    p, t = _binary_pair(pred, target)
    union = int((p | t).sum())
    if union == 0:
        return float(empty)
    return int((p & t).sum()) / union


def slide_metrics(y_true, scores) -> dict:
    """The validation block of an EM round: AUC, specificity at 100 % sensitivity and its threshold.

    Returns ``{"auc", "specificity_at_full_sensitivity", "threshold_at_full_sensitivity",
    "n_pos", "n_neg"}`` (NaN values become None so the dict is valid JSON).
    """
    y, s = _check(y_true, scores)
    spec, thr = specificity_at_full_sensitivity(y, s)

    def clean(v: float):
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    return {
        "auc": clean(roc_auc(y, s)),
        "specificity_at_full_sensitivity": clean(spec),
        "threshold_at_full_sensitivity": clean(thr),
        "n_pos": int((y == 1).sum()),
        "n_neg": int((y == 0).sum()),
    }
