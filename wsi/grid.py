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

import cv2
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
    # Summed-area table with a zero first row and column (exact: integer counts in float64).
    integral = cv2.integral(np.ascontiguousarray(mask, dtype=np.uint8), sdepth=cv2.CV_64F)
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
    # Group starts without np.unique (its first call imports numpy.ma: 25 ms per worker).
    starts = np.flatnonzero(np.diff(key[order]) != 0) + 1
    return [np.sort(g) for g in np.split(order, starts)]


def group_bands(
    cols_rows: np.ndarray, n_bands: int, *, align: int = 1, weights: np.ndarray | None = None
) -> list[np.ndarray]:
    """Split tiles into at most ``n_bands`` bands of neighbouring grid rows.

    Parameters
    ----------
    cols_rows : (N, 2) int array
        Grid ``(col, row)`` of each tile, in row-major order (as
        :func:`select_tiles` returns them).
    n_bands : int
        Wanted number of bands (fewer when there are fewer non-empty rows).
    align : int
        Band boundaries fall on multiples of ``align`` tile indices (e.g. the
        tiles per shard file, so each band writes whole shards); a grid row
        may then be split between two bands. With ``align=1`` a band is made
        of whole grid rows.
    weights : (n_bands,) array, optional
        Relative tile counts of the bands, first band first (default: equal).
        Decreasing weights leave small bands for the end of a slide, so
        workers that pick tasks as they free up finish at about the same time.

    Returns
    -------
    bands : list of int arrays
        Consecutive index ranges into ``cols_rows``, top band first. Every
        tile is in exactly one band, so neighbouring bands share only the
        source pixels along one tile overlap.
    """
    cr = np.asarray(cols_rows, np.int64).reshape(-1, 2)
    n_tiles = len(cr)
    if n_tiles == 0:
        return []
    key = cr[:, 1] * (int(cr[:, 0].max()) + 1) + cr[:, 0]
    if np.any(np.diff(key) <= 0):
        raise ValueError("group_bands needs tiles in row-major order without repeats")
    align = max(1, int(align))
    row_starts = np.flatnonzero(np.r_[True, np.diff(cr[:, 1]) != 0])
    n = max(1, min(int(n_bands), len(row_starts)))
    if weights is None or n < int(n_bands):
        targets = np.arange(1, n) * n_tiles / n
    else:
        w = np.asarray(weights, np.float64).reshape(-1)
        if len(w) != n or (w <= 0).any():
            raise ValueError(f"weights must be {n} positive numbers, got {weights!r}")
        targets = np.cumsum(w)[:-1] / w.sum() * n_tiles
    if align > 1:
        # Cut at the multiple of `align` closest to each k * N / n.
        cuts = np.rint(targets / align).astype(np.int64) * align
    else:
        # Cut at the row boundary closest to each k * N / n.
        hi = np.clip(np.searchsorted(row_starts, targets), 1, len(row_starts) - 1)
        lo = hi - 1
        cuts = np.where(targets - row_starts[lo] < row_starts[hi] - targets, row_starts[lo], row_starts[hi])
    cuts = cuts[(cuts > 0) & (cuts < n_tiles)]  # non-decreasing: drop repeats
    cuts = cuts[np.r_[True, np.diff(cuts) > 0]] if len(cuts) else cuts
    return [b for b in np.split(np.arange(n_tiles), cuts) if len(b)]
