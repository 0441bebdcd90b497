import numpy as np
import pytest

from wsi.tissue import remove_small_regions, stain_channel, tissue_mask


def _scene(rng, h=400, w=400):
    img = np.full((h, w, 3), 245, np.uint8)
    img += rng.integers(0, 6, size=img.shape, dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    blob = (yy - 200) ** 2 / 120**2 + (xx - 180) ** 2 / 90**2 < 1
    pink = np.array([220, 140, 190], np.uint8)
    img[blob] = pink + rng.integers(0, 20, size=(blob.sum(), 3), dtype=np.uint8)
    return img, blob


def test_mask_finds_tissue_blob():
    rng = np.random.default_rng(0)
    img, blob = _scene(rng)
    res = tissue_mask(img, mpp=8.0)
    inter = (res.mask & blob).sum()
    union = (res.mask | blob).sum()
    assert inter / union > 0.9
    assert res.threshold >= 20


def test_blank_glass_gives_empty_mask():
    rng = np.random.default_rng(1)
    img = (240 + rng.integers(0, 10, size=(300, 300, 3))).astype(np.uint8)
    res = tissue_mask(img, mpp=8.0)
    assert not res.mask.any()
    assert res.tissue_fraction == 0


def test_small_specks_removed_by_area_in_um2():
    img = np.full((300, 300, 3), 245, np.uint8)
    img[10:14, 10:14] = (200, 80, 160)  # 4x4 px at 8 um/px = 1024 um^2
    img[100:200, 100:200] = (200, 80, 160)  # 100x100 px = 640000 um^2
    res = tissue_mask(img, mpp=8.0, blur_um=0, open_um=0, close_um=0, min_tissue_area_um2=20_000)
    assert not res.mask[10:14, 10:14].any()
    assert res.mask[120:180, 120:180].all()
    # the filter follows um^2, not pixels: at 40 um/px the same 4x4 speck is 25600 um^2 and stays
    res2 = tissue_mask(img, mpp=40.0, blur_um=0, open_um=0, close_um=0, min_tissue_area_um2=20_000)
    assert res2.mask[10:14, 10:14].all()


def test_holes_filled_by_area():
    img = np.full((300, 300, 3), 245, np.uint8)
    img[50:250, 50:250] = (200, 80, 160)
    img[100:104, 100:104] = 245  # tiny hole: filled
    img[150:230, 150:230] = 245  # big lumen: kept
    res = tissue_mask(img, mpp=8.0, blur_um=0, open_um=0, close_um=0, max_hole_area_um2=50_000)
    assert res.mask[101, 101]
    assert not res.mask[190, 190]


def test_od_channel_and_bad_channel():
    img = np.full((10, 10, 3), 255, np.uint8)
    assert stain_channel(img, "od").max() == 0
    with pytest.raises(ValueError):
        stain_channel(img, "hue")


def test_remove_small_regions():
    m = np.zeros((10, 10), bool)
    m[0, 0] = True
    m[5:8, 5:8] = True
    out = remove_small_regions(m, 5)
    assert not out[0, 0] and out[5:8, 5:8].all()


@pytest.mark.parametrize("seed", range(6))
def test_otsu_threshold_matches_scikit_image(seed):
    from skimage.filters import threshold_otsu

    from wsi.tissue import otsu_threshold

    rng = np.random.default_rng(seed)
    # bimodal, skewed and narrow-range channels
    a = np.concatenate([rng.normal(30 + 10 * seed, 8, 4000), rng.normal(150, 20 + seed, 1500 * (seed + 1))])
    values = np.clip(a, 0, 255).astype(np.uint8).reshape(-1, 50)
    assert otsu_threshold(values) == float(threshold_otsu(values))
    narrow = rng.integers(100, 104, (40, 40)).astype(np.uint8)
    assert otsu_threshold(narrow) == float(threshold_otsu(narrow))


def test_otsu_threshold_edge_cases():
    from wsi.tissue import otsu_threshold

    assert otsu_threshold(np.full((5, 5), 77, np.uint8)) == 77.0
    assert otsu_threshold(np.array([0, 255], np.uint8)) == 0.0
    with pytest.raises(ValueError, match="uint8"):
        otsu_threshold(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="at least one"):
        otsu_threshold(np.zeros(0, np.uint8))


def test_tiling_path_does_not_import_scipy():
    """scikit-image pulls SciPy in (~0.4 s per worker); the tile workers must not pay that."""
    import subprocess
    import sys

    code = "import sys, pipeline.tile, wsi.tissue, wsi.fastread, wsi.store; print('scipy' in sys.modules, 'skimage' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
