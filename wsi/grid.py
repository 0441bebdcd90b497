"""The global tile grid and per-tile tissue fractions.

One grid per slide, anchored at the origin of the slide's bounds in level-0
pixels (``(0, 0)`` for most formats, OpenSlide's bounds for MRXS), so a tile's
grid index ``(col, row)`` and its level-0 coordinates are stable across re-runs
and do not depend on where tissue was found. Tiles may extend past the slide's
edge; the missing pixels are padded with background when read.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    """A regular grid of square tiles over a slide.

    Attributes
    ----------
    origin_level0_xy : (int, int)
        Level-0 position of tile (0, 0).
    downsample : float
        Level-0 pixels per tile pixel.
    tile_px, stride_px : int
        Tile side and step at the tile resolution.
    n_cols, n_rows : int
        Grid size; the grid covers the whole bounds.
    """

    origin_level0_xy: tuple[int, int]
    downsample: float
    tile_px: int
    stride_px: int
    n_cols: int
    n_rows: int

    @property
    def tile_level0(self) -> float:
        """Tile side in level-0 pixels."""
        return self.tile_px * self.downsample

    @property
    def stride_level0(self) -> float:
        return self.stride_px * self.downsample

    def level0_xy(self, cols_rows: np.ndarray) -> np.ndarray:
        """Level-0 (x, y) of the top-left corner of tiles given as (col, row) rows."""
        cr = np.asarray(cols_rows, dtype=np.float64).reshape(-1, 2)
        xy = np.rint(cr * self.stride_level0) + np.asarray(self.origin_level0_xy, np.float64)
        return xy.astype(np.int64)

    def to_dict(self) -> dict:
        return asdict(self)


def make_grid(
    bounds_xywh: tuple[int, int, int, int], downsample: float, tile_px: int, stride_px: int
) -> Grid:
    """The grid that covers ``bounds_xywh`` (level-0 pixels) with tiles of ``tile_px``.

    ``downsample`` is level-0 pixels per tile pixel; ``stride_px`` the step
    between tiles in tile pixels (``tile_px - overlap_px``).
    """
    if stride_px <= 0 or tile_px <= 0:
        raise ValueError("tile_px and stride_px must be positive")
    bx, by, bw, bh = bounds_xywh
    w_px = bw / downsample
    h_px = bh / downsample

    def count(extent: float) -> int:
        if extent <= tile_px:
            return 1
        return int(math.ceil((extent - tile_px) / stride_px)) + 1

    return Grid((int(bx), int(by)), float(downsample), int(tile_px), int(stride_px), count(w_px), count(h_px))


def tissue_fractions(mask: np.ndarray, mask_downsample: float, grid: Grid) -> np.ndarray:
    """Fraction of each grid tile's area covered by tissue.

    Parameters
    ----------
    mask : (H, W) bool array
        Tissue mask whose pixel (0, 0) sits at the grid origin.
    mask_downsample : float
        Level-0 pixels per mask pixel.
    grid : Grid

    Returns
    -------
    (n_rows, n_cols) float32 array in [0, 1]; area beyond the mask counts as no tissue.
    """
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), np.float64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.float64), axis=0), axis=1)
    scale = grid.downsample / mask_downsample  # mask px per tile px
    cols = np.arange(grid.n_cols)
    rows = np.arange(grid.n_rows)
    x0 = cols * grid.stride_px * scale
    y0 = rows * grid.stride_px * scale
    size = grid.tile_px * scale
    xi0 = np.clip(np.rint(x0), 0, w).astype(int)
    xi1 = np.clip(np.rint(x0 + size), 0, w).astype(int)
    yi0 = np.clip(np.rint(y0), 0, h).astype(int)
    yi1 = np.clip(np.rint(y0 + size), 0, h).astype(int)
    area = max(size * size, 1e-9)
    s = (
        integral[yi1[:, None], xi1[None, :]]
        - integral[yi0[:, None], xi1[None, :]]
        - integral[yi1[:, None], xi0[None, :]]
        + integral[yi0[:, None], xi0[None, :]]
    )
    # Rounding the box can make tiny boxes cover more pixels than `size`^2.
    return np.clip(s / area, 0.0, 1.0).astype(np.float32)


def select_tiles(fractions: np.ndarray, min_fraction: float) -> np.ndarray:
    """Grid indices ``(col, row)`` of tiles with at least ``min_fraction`` tissue, row-major order."""
    rows, cols = np.nonzero(fractions >= min_fraction)
    if min_fraction <= 0:
        rows, cols = np.nonzero(np.ones_like(fractions, bool))
    return np.stack([cols, rows], axis=1).astype(np.int64)


def group_blocks(cols_rows: np.ndarray, block_tiles: int) -> list[np.ndarray]:
    """Split tiles into square blocks of ``block_tiles`` x ``block_tiles`` grid cells.

    Returns a list of index arrays into ``cols_rows`` (row-major block order,
    each block's indices ascending). Blocks are the unit of parallel work: a
    worker decodes the source pixels a block touches once and cuts its tiles.
    """
    if len(cols_rows) == 0:
        return []
    b = np.asarray(cols_rows) // int(block_tiles)
    key = b[:, 1] * (int(b[:, 0].max()) + 1) + b[:, 0]
    order = np.argsort(key, kind="stable")
    _, starts = np.unique(key[order], return_index=True)
    return [np.sort(g) for g in np.split(order, starts[1:])]
