import numpy as np
import pytest

from pipeline.pseudolabels import (
    e_step_slide,
    keep_confident,
    negative_pseudo_labels,
    positive_pseudo_labels,
)


def _maps(*maxima, shape=(4, 4)):
    """One map per value, filled with 0.01 except pixel (1, 2) = the value."""
    out = np.full((len(maxima),) + shape, 0.01, dtype=np.float32)
    for k, v in enumerate(maxima):
        out[k, 1, 2] = v
    return out


def test_reweighting_and_clipping_hand_values():
    p = np.array([[[0.1, 0.3], [0.002, 0.0]], [[1.0, 0.25], [0.003, 0.2]]], dtype=np.float32)
    y = positive_pseudo_labels(p, V=4.0, floor=0.01)
    assert y.dtype == np.float32 and y.shape == p.shape
    np.testing.assert_allclose(y, [[[0.4, 1.0], [0.0, 0.0]], [[1.0, 1.0], [0.012, 0.8]]], atol=1e-6)


def test_reweighting_parameters():
    p = np.array([[[0.1, 0.3, 0.02]]], dtype=np.float64)
    np.testing.assert_allclose(positive_pseudo_labels(p, V=2.0, floor=0.05), [[[0.2, 0.6, 0.0]]])
    np.testing.assert_allclose(positive_pseudo_labels(p, V=1.0, floor=0.0), p)


def test_keep_confident_threshold():
    p = _maps(0.39, 0.4, 0.41, 0.9, 0.0)
    np.testing.assert_array_equal(keep_confident(p, 0.4), [False, True, True, True, False])
    np.testing.assert_array_equal(keep_confident(p, threshold_T=0.5), [False, False, False, True, False])
    assert keep_confident(np.zeros((0, 4, 4)), 0.4).shape == (0,)


def test_keep_confident_uses_maximum_not_mean():
    p = np.zeros((2, 8, 8))
    p[0, 0, 0] = 0.5          # one confident pixel: kept
    p[1] = 0.39               # uniformly below T: removed
    np.testing.assert_array_equal(keep_confident(p, 0.4), [True, False])


def test_negative_pseudo_labels_zero():
    z = negative_pseudo_labels((3, 5, 5))
    assert z.dtype == np.float32 and z.shape == (3, 5, 5) and not z.any()


def test_e_step_positive_slide():
    p = _maps(0.1, 0.5, 0.3, 0.45)
    kept, targets, stats = e_step_slide(p, 1, T=0.4, V=4.0, floor=0.01)
    np.testing.assert_array_equal(kept, [1, 3])
    assert targets.shape == (2, 4, 4) and targets.dtype == np.float32
    # background 0.01 * 4 = 0.04 >= floor stays; the peak clips to 1
    np.testing.assert_allclose(targets[0], np.where(np.arange(16).reshape(4, 4) == 6, 1.0, 0.04), atol=1e-6)
    assert stats == {"slide_label": 1, "n_tiles": 4, "n_kept": 2, "n_removed": 2,
                     "pseudo_positive_pixel_fraction": 1.0}


def test_e_step_positive_slide_pixel_fraction():
    p = np.zeros((2, 2, 2), dtype=np.float32)
    p[0] = [[0.5, 0.001], [0.0, 0.0]]   # kept; 1 of 4 pixels positive after floor
    p[1] = [[0.45, 0.2], [0.1, 0.0]]    # kept; 3 of 4
    kept, targets, stats = e_step_slide(p, True, T=0.4, V=4.0, floor=0.01)
    np.testing.assert_array_equal(kept, [0, 1])
    assert stats["pseudo_positive_pixel_fraction"] == pytest.approx(4 / 8)


def test_e_step_negative_slide_hard_negatives():
    p = _maps(0.9, 0.1, 0.6)
    kept, targets, stats = e_step_slide(p, 0, T=0.4, V=4.0, floor=0.01)
    np.testing.assert_array_equal(kept, [0, 2])
    assert targets is None
    assert stats["n_kept"] == 2 and stats["n_removed"] == 1
    assert stats["pseudo_positive_pixel_fraction"] == 0.0
    kept2, zeros, _ = e_step_slide(p, False, T=0.4, V=4.0, floor=0.01, materialize_negatives=True)
    np.testing.assert_array_equal(kept2, kept)
    assert zeros.shape == (2, 4, 4) and zeros.dtype == np.float32 and not zeros.any()


def test_e_step_nothing_kept():
    kept, targets, stats = e_step_slide(np.zeros((3, 4, 4)), 1, T=0.4, V=4.0, floor=0.01)
    assert kept.size == 0 and targets.shape == (0, 4, 4)
    assert stats["n_removed"] == 3 and stats["pseudo_positive_pixel_fraction"] == 0.0


def test_input_validation():
    with pytest.raises(ValueError, match="slide_label"):
        e_step_slide(_maps(0.5), 2, T=0.4, V=4.0, floor=0.01)
    with pytest.raises(ValueError, match="slide_label"):
        e_step_slide(_maps(0.5), "positive", T=0.4, V=4.0, floor=0.01)
    with pytest.raises(ValueError, match="NaN"):
        keep_confident(np.full((1, 2, 2), np.nan), 0.4)
    with pytest.raises(TypeError):
        positive_pseudo_labels(np.ones((1, 2, 2), dtype=np.uint8), V=4.0, floor=0.01)
