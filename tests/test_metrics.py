"""pipeline.metrics against brute force and hand-worked examples."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from pipeline.metrics import (
    dice,
    iou,
    roc_auc,
    roc_curve,
    sensitivity_specificity,
    slide_metrics,
    specificity_at_full_sensitivity,
)


def brute_auc(y, s):
    pos = [b for a, b in zip(y, s) if a == 1]
    neg = [b for a, b in zip(y, s) if a == 0]
    tot = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return tot / (len(pos) * len(neg))


def test_auc_matches_pair_counting_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 40))
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            y[0] = 1 - y[0]
        s = rng.integers(0, 5, n).astype(float)  # many ties
        assert roc_auc(y, s) == pytest.approx(brute_auc(y, s))


def test_auc_edge_cases():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5] * 4) == 0.5
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))
    with pytest.raises(ValueError, match="0/1"):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        roc_auc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="entries"):
        roc_auc([0, 1, 1], [0.1, 0.2])


def test_roc_curve_points_and_area():
    y = [0, 0, 1, 1, 0, 1]
    s = [0.1, 0.4, 0.35, 0.8, 0.4, 0.9]
    fpr, tpr, thr = roc_curve(y, s)
    assert (fpr[0], tpr[0], thr[0]) == (0.0, 0.0, np.inf)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # thresholds are the distinct scores, descending; the tied 0.4s form one point
    np.testing.assert_allclose(thr[1:], [0.9, 0.8, 0.4, 0.35, 0.1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0, 2 / 3, 2 / 3, 1])
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(y, s))


def test_specificity_at_full_sensitivity_hand_example():
    # positives 0.3, 0.7, 0.9 -> threshold 0.3; negatives below it: 0.1, 0.2 of 0.1, 0.2, 0.3, 0.8
    y = [1, 1, 1, 0, 0, 0, 0]
    s = [0.3, 0.7, 0.9, 0.1, 0.2, 0.3, 0.8]
    spec, thr = specificity_at_full_sensitivity(y, s)
    assert thr == 0.3 and spec == pytest.approx(0.5)
    sens, spec2 = sensitivity_specificity(y, s, thr)
    assert sens == 1.0 and spec2 == pytest.approx(spec)
    assert sensitivity_specificity(y, s, 0.75) == (pytest.approx(1 / 3), pytest.approx(0.75))
    # perfect separation: every negative below the lowest positive
    assert specificity_at_full_sensitivity([1, 0, 0], [0.6, 0.1, 0.5]) == (1.0, 0.6)
    spec, thr = specificity_at_full_sensitivity([0, 0], [0.1, 0.2])
    assert math.isnan(spec) and math.isnan(thr)


def test_dice_and_iou_on_hand_masks():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2, :2] = True  # 4 px
    b[1:3, 1:3] = True  # 4 px, overlap 1
    assert dice(a, b) == pytest.approx(2 * 1 / 8)
    assert iou(a, b) == pytest.approx(1 / 7)
    assert dice(a, a) == 1.0 and iou(a, a) == 1.0
    empty = np.zeros((4, 4), bool)
    assert dice(empty, empty) == 1.0 and iou(empty, empty, empty=0.0) == 0.0
    assert dice(a, empty) == 0.0
    with pytest.raises(ValueError, match="shape"):
        dice(a, b[:3])


def test_slide_metrics_block_is_json_clean():
    m = slide_metrics([1, 0, 1, 0], [0.9, 0.2, 0.6, 0.7])
    assert m == {
        "auc": pytest.approx(0.75),
        "specificity_at_full_sensitivity": pytest.approx(0.5),
        "threshold_at_full_sensitivity": pytest.approx(0.6),
        "n_pos": 2,
        "n_neg": 2,
    }
    only_pos = slide_metrics([1, 1], [0.3, 0.4])
    assert only_pos["auc"] is None and only_pos["specificity_at_full_sensitivity"] is None
    assert only_pos["threshold_at_full_sensitivity"] == pytest.approx(0.3)
