import numpy as np
import pytest

from wsi.grid import group_bands, group_blocks, make_grid, select_tiles, tissue_fractions
from wsi.slide import choose_level, composite_on_white


def test_grid_covers_bounds_with_stride():
    g = make_grid((0, 0, 1000, 600), downsample=1.0, tile_px=512, stride_px=384)
    # columns: 0, 384, 768 (768+512 >= 1000); rows: 0, 384
    assert (g.n_cols, g.n_rows) == (3, 2)
    xy = g.level0_xy(np.array([[0, 0], [2, 1]]))
    assert xy.tolist() == [[0, 0], [768, 384]]


def test_grid_anchor_and_downsample():
    g = make_grid((100, 50, 4000, 4000), downsample=2.0, tile_px=512, stride_px=384)
    assert g.tile_level0 == 1024 and g.stride_level0 == 768
    assert g.level0_xy(np.array([[1, 2]])).tolist() == [[100 + 768, 50 + 1536]]
    # a small slide still gets one tile
    assert make_grid((0, 0, 10, 10), 1.0, 512, 384).n_cols == 1


def test_grid_ids_stable_across_tissue():
    """The grid depends only on bounds and tiling settings, never on the mask."""
    g1 = make_grid((0, 0, 5000, 5000), 1.0, 512, 384)
    g2 = make_grid((0, 0, 5000, 5000), 1.0, 512, 384)
    assert g1 == g2


def test_tissue_fractions_hand_computed():
    # mask at downsample 64: one mask pixel = 64 level-0 px; tile 128 px at ds 1 = 2x2 mask px
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True  # quarter of tile (0,0)
    mask[2:4, 2:4] = True  # all of tile at (col 2*?...)
    g = make_grid((0, 0, 256, 256), downsample=1.0, tile_px=128, stride_px=128)
    f = tissue_fractions(mask, 64.0, g)
    assert f.shape == (2, 2)
    assert f[0, 0] == pytest.approx(0.25)
    assert f[1, 1] == pytest.approx(1.0)
    assert f[0, 1] == 0 and f[1, 0] == 0
    sel = select_tiles(f, 0.25)
    assert sel.tolist() == [[0, 0], [1, 1]]
    assert select_tiles(f, 0.5).tolist() == [[1, 1]]


def test_tissue_fraction_beyond_mask_counts_as_background():
    mask = np.ones((2, 2), bool)  # 128 x 128 level-0 px of tissue
    g = make_grid((0, 0, 128, 128), downsample=1.0, tile_px=256, stride_px=256)
    f = tissue_fractions(mask, 64.0, g)
    assert f[0, 0] == pytest.approx(0.25)


def test_group_blocks_partition():
    cr = np.array([[c, r] for r in range(5) for c in range(7)])
    blocks = group_blocks(cr, 4)
    allidx = np.sort(np.concatenate(blocks))
    assert allidx.tolist() == list(range(len(cr)))
    assert len(blocks) == 4
    for b in blocks:
        bc = cr[b] // 4
        assert (bc == bc[0]).all()


def test_group_bands_whole_rows_and_balanced():
    # a triangle of tissue: row r has r + 1 tiles
    cr = np.array([[c, r] for r in range(12) for c in range(r + 1)])
    for n in (1, 2, 3, 4, 7):
        bands = group_bands(cr, n)
        assert np.concatenate(bands).tolist() == list(range(len(cr)))  # consecutive, each tile once
        assert len(bands) <= n
        rows = [set(cr[b, 1]) for b in bands]
        assert all(not (a & b) for i, a in enumerate(rows) for b in rows[i + 1 :])  # rows never split
    sizes = [len(b) for b in group_bands(cr, 3)]
    assert max(sizes) - min(sizes) <= 12  # within one row of equal
    assert len(group_bands(cr, 100)) <= 12
    assert group_bands(np.zeros((0, 2), int), 4) == []


def test_group_bands_aligned_to_shards():
    cr = np.array([[c, r] for r in range(10) for c in range(37)])
    bands = group_bands(cr, 4, align=32)
    assert np.concatenate(bands).tolist() == list(range(len(cr)))
    assert all(b[0] % 32 == 0 for b in bands)
    assert max(len(b) for b in bands[:-1]) - min(len(b) for b in bands[:-1]) <= 32
    with pytest.raises(ValueError, match="row-major"):
        group_bands(cr[::-1], 2)


@pytest.mark.parametrize(
    "mpp0, downs, target, level, scale",
    [
        (0.25, (1, 4, 16), 0.5, 0, 2.0),  # 40x slide -> 20x: read level 0, shrink 2x
        (0.5, (1, 4, 16), 0.5, 0, 1.0),
        (0.499, (1,), 0.5, 0, 1.0),  # within tolerance: no resize
        (0.25, (1, 4, 16), 1.0, 1, 1.0),  # level 1 is exactly 1.0
        (0.25, (1, 4, 16), 2.0, 1, 2.0),  # 1.0 -> 2.0
        (0.5, (1, 4, 16), 0.25, 0, 0.5),  # finer than level 0: upsample
    ],
)
def test_choose_level(mpp0, downs, target, level, scale):
    c = choose_level(mpp0, downs, target, tolerance=0.05)
    assert c.level == level
    assert c.scale == pytest.approx(scale)
    assert c.downsample == pytest.approx(downs[level] * scale)
    if scale == 1.0:
        assert c.effective_mpp == pytest.approx(mpp0 * downs[level])
    else:
        assert c.effective_mpp == pytest.approx(target)


def test_composite_on_white_premultiplied():
    rgba = np.array([[[0, 0, 0, 0], [100, 50, 20, 255], [50, 25, 10, 128]]], np.uint8)
    rgb = composite_on_white(rgba)
    assert rgb[0, 0].tolist() == [255, 255, 255]  # transparent -> white, never black
    assert rgb[0, 1].tolist() == [100, 50, 20]
    assert rgb[0, 2].tolist() == [50 + 127, 25 + 127, 10 + 127]


def test_group_bands_weights_taper_towards_the_end():
    cr = np.array([[c, r] for r in range(40) for c in range(30)])
    bands = group_bands(cr, 6, align=32, weights=np.arange(6, 0, -1))
    sizes = [len(b) for b in bands]
    assert np.concatenate(bands).tolist() == list(range(len(cr)))
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 3 * sizes[-1]
    with pytest.raises(ValueError, match="weights"):
        group_bands(cr, 3, weights=[1, 2])
