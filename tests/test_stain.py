"""HED stain jitter (pipeline.stain): identity, stain amounts moved by the drawn values, seeding, range."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.color import hed2rgb, rgb2hed

from pipeline.config import ConfigError, load_config
from pipeline.stain import HEDJitter, hed_jitter

# skimage's stain amounts are decadic optical density / 6
OD = 6.0


def _stained(seed: int = 0, n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image made from known, strictly positive H, E, D amounts (so deconvolution is exact)."""
    rng = np.random.default_rng(seed)
    hed = np.stack([rng.uniform(0.02, 0.08, (n, n)), rng.uniform(0.02, 0.06, (n, n)),
                    rng.uniform(0.005, 0.015, (n, n))], -1)
    return np.rint(hed2rgb(hed) * 255).astype(np.uint8), hed


def test_zero_ranges_and_no_seed_are_the_identity():
    img, _ = _stained()
    np.testing.assert_array_equal(hed_jitter(img, np.ones(3), np.zeros(3)), img)
    assert not HEDJitter().active and HEDJitter(0.0, 0.0)(img, 5) is img
    assert HEDJitter(0.2, 0.05)(img, None) is img  # no augmentation seed: no augmentation
    noise = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(hed_jitter(noise, [1, 1, 1], [0, 0, 0]), noise)


def test_each_stain_moves_by_the_drawn_amount():
    img, hed = _stained()
    before = rgb2hed(img)
    assert np.abs(before - hed).max() < 2e-3  # uint8 quantisation only
    scale, shift = np.array([1.3, 0.8, 1.1]), np.array([0.06, 0.03, -0.02])
    after = rgb2hed(hed_jitter(img, scale, shift))
    expected = before * scale + shift / OD
    assert np.abs(after - expected).max() < 3e-3
    moved = (after - before).mean((0, 1))
    np.testing.assert_allclose(moved, (expected - before).mean((0, 1)), atol=3e-4)
    # one stain at a time: the others stay where they were
    only_e = rgb2hed(hed_jitter(img, [1.0, 1.5, 1.0], [0, 0, 0]))
    np.testing.assert_allclose(only_e[..., 1], before[..., 1] * 1.5, atol=3e-3)
    for c in (0, 2):
        assert np.abs(only_e[..., c] - before[..., c]).max() < 2e-3
    assert (only_e[..., 1] - before[..., 1]).mean() > 0.015


def test_draws_are_seeded_within_range_and_independent_per_stain():
    img, _ = _stained()
    j = HEDJitter(scale=0.2, shift_od=0.05)
    a, b, c = j(img, 7), j(img, 7), j(img, 8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    draws = [j.draw(s) for s in range(400)]
    scales, shifts = np.array([d[0] for d in draws]), np.array([d[1] for d in draws])
    assert scales.shape == shifts.shape == (400, 3)
    assert scales.min() >= 0.8 and scales.max() <= 1.2 and scales.min() < 0.82 and scales.max() > 1.18
    assert np.abs(shifts).max() <= 0.05 and shifts.min() < -0.045 and shifts.max() > 0.045
    assert abs(np.corrcoef(scales[:, 0], scales[:, 1])[0, 1]) < 0.2
    # the stream is not the geometric one (which uses the bare seed)
    assert not np.allclose(j.draw(3)[0], 1 + 0.2 * np.random.default_rng(3).uniform(-1, 1, 3))


def test_uint8_in_and_out_saturates_instead_of_wrapping():
    img, _ = _stained()
    img[0, 0] = 255  # glass
    img[0, 1] = 0
    strong = hed_jitter(img, [0.5, 1.5, 1.5], [-1.0, 1.0, 1.0])
    assert strong.dtype == np.uint8 and strong.shape == img.shape
    dark = hed_jitter(img, [1.5, 1.5, 1.5], [1.0, 1.0, 1.0])
    light = hed_jitter(img, [0.5, 0.5, 0.5], [-1.0, -1.0, -1.0])
    assert dark.mean() < img.mean() < light.mean()
    assert light.max() == 255 and (light.astype(int) >= img.astype(int) - 1).all()  # no wrap-around to 0
    assert (dark.astype(int) <= img.astype(int) + 1).all()
    for bad in (img.astype(np.float32), img[..., :2], img[0]):
        with pytest.raises(ValueError, match="uint8"):
            hed_jitter(bad, np.ones(3), np.zeros(3))


def test_real_tissue_is_unchanged_where_a_plain_round_trip_is_not(shared_slides):
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(str(shared_slides / "cmu-1-small-region.svs")) as s:
        img = np.asarray(s.read_region((600, 600), 0, (256, 256)).convert("RGB"))
    round_trip = np.rint(hed2rgb(rgb2hed(img)) * 255).astype(np.uint8)
    assert np.abs(round_trip.astype(int) - img).max() > 20  # rgb2hed clips negative amounts
    tiny = hed_jitter(img, [1.001, 1.001, 1.001], [0, 0, 0])
    assert np.abs(tiny.astype(int) - img).max() <= 1
    j = hed_jitter(img, [1.2, 0.8, 1.0], [0.02, -0.02, 0.0])
    assert 1.0 < np.abs(j.astype(int) - img).mean() < 30


def test_config_ranges_default_off_and_validated():
    cfg = load_config(None)
    assert (cfg.em.hed_scale, cfg.em.hed_shift) == (0.0, 0.0)
    cfg = load_config(None, {"em.hed_scale": "0.1", "em.hed_shift": 0.02})
    assert (cfg.em.hed_scale, cfg.em.hed_shift) == (0.1, 0.02)
    assert cfg.train_hash() != load_config(None).train_hash()
    with pytest.raises(ConfigError, match=r"em.hed_scale must be in \[0, 1\)"):
        load_config(None, {"em.hed_scale": 1.0})
    with pytest.raises(ConfigError, match="em.hed_shift"):
        load_config(None, {"em.hed_shift": -0.1})
