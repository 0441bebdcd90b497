"""Reading the pixels of a slide: tiles at a chosen pyramid level, padded beyond its edge.

Two paths read the same pixels (see :mod:`wsi.fastread`):

* ``"fast-tiff"``: the level's compressed source tiles are decoded directly,
  every source tile once per call, canvas by canvas; for tiled TIFF-family
  files that :class:`wsi.fastread.TiffLevelReader` accepts;
* ``"openslide"``: ``read_region``, the universal path, per tile or one read
  per square of neighbouring tiles.

:func:`pick_read_path` chooses between them for one level of one file;
:func:`iter_tiles` and :func:`read_tiles` read tiles by their level-0
corners. Each thread keeps the fast readers it opened, keyed by the file's
identity (path, size, mtime) and the level, so the bands of one slide don't
re-parse the TIFF; a read error drops them (:func:`forget_reader`).
"""

from __future__ import annotations

import collections
import os
import threading

import cv2
import numpy as np
import openslide

from wsi.fastread import TiffLevelReader, UnsupportedSlide, iter_canvases
from wsi.grid import group_blocks
from wsi.slide import LevelChoice, open_slide, read_region_rgb

__all__ = ["fast_reader", "forget_reader", "iter_tiles", "pick_read_path", "read_tiles"]

# --------------------------------------------------------------------------- per-thread reader cache

_cache = threading.local()
#: Fast readers kept open per thread (least recently used closed first).
_MAX_CACHED = 2


def _lru(name: str) -> collections.OrderedDict:
    d = getattr(_cache, name, None)
    if d is None:
        d = collections.OrderedDict()
        setattr(_cache, name, d)
    return d


def _close_quietly(obj) -> None:
    close = getattr(obj, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            pass


def fast_reader(path: str, level_dimensions: tuple[int, int]) -> TiffLevelReader:
    """This thread's fast reader for one level of ``path``, opened once and kept.

    Keyed by the file's identity (path, size, mtime) and the level, so a
    replaced slide is opened afresh. Raises
    :class:`wsi.fastread.UnsupportedSlide` (remembered too) when the fast path
    cannot read that level.
    """
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, tuple(int(v) for v in level_dimensions))
    readers = _lru("readers")
    if key in readers:
        readers.move_to_end(key)
    else:
        try:
            readers[key] = TiffLevelReader.open(path, key[3])
        except UnsupportedSlide as exc:
            readers[key] = exc
        while len(readers) > _MAX_CACHED:
            _close_quietly(readers.popitem(last=False)[1])
    got = readers[key]
    if isinstance(got, Exception):
        raise UnsupportedSlide(str(got))
    return got


def forget_reader(path: str) -> None:
    """Close and drop this thread's cached readers of ``path`` (after a read error)."""
    readers = _lru("readers")
    ap = os.path.abspath(path)
    for key in [k for k in readers if k[0] == ap]:
        _close_quietly(readers.pop(key))


def pick_read_path(path: str, level_dimensions: tuple[int, int]) -> tuple[str, str]:
    """``("fast-tiff", "")`` if the fast path reads this level of ``path``, else ``("openslide", why not)``.

    The fast reader opened to decide stays in this thread's cache for the
    reads that follow.
    """
    if os.path.isdir(path):
        return "openslide", "a DICOM folder (read through OpenSlide's DICOM driver)"
    try:
        fast_reader(path, level_dimensions)
    except UnsupportedSlide as exc:
        return "openslide", str(exc)
    return "fast-tiff", ""


# --------------------------------------------------------------------------- tiles


def iter_tiles(
    path: str,
    coords: np.ndarray,
    cols_rows: np.ndarray,
    choice: LevelChoice,
    tile_px: int,
    *,
    pad_value: int = 255,
    read_path: str = "openslide",
    level_dimensions: tuple[int, int] | None = None,
    block_tiles: int = 4,
):
    """Yield ``(k, tile)`` for every tile ``k`` of ``coords``, canvas by canvas.

    The tiles are grouped into squares of ``block_tiles`` x ``block_tiles``
    grid cells (``cols_rows``) read one after another: with
    ``read_path='fast-tiff'`` every source tile is decoded once for the whole
    call (see :func:`wsi.fastread.iter_canvases`) and each tile is a view of
    the canvas, valid until the next one is yielded; with OpenSlide each
    square is one ``read_region`` of its bounding box (or one per tile when
    the square is sparse). Each tile is the level ``choice.level`` region of
    ``round(tile_px * scale)`` pixels from its level-0 corner, resized to
    ``tile_px`` when the level does not match the target resolution; pixels
    beyond the slide are ``pad_value``.
    """
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    if len(coords) == 0:
        return
    size_l = max(1, int(round(tile_px * choice.scale)))
    lxy = np.rint(coords / choice.level_downsample).astype(np.int64)
    cells = group_blocks(np.asarray(cols_rows, np.int64).reshape(-1, 2), block_tiles)

    def fit(reg: np.ndarray) -> np.ndarray:
        if size_l == tile_px:
            return reg
        interp = cv2.INTER_AREA if size_l > tile_px else cv2.INTER_LINEAR
        return cv2.resize(reg, (tile_px, tile_px), interpolation=interp)

    if read_path == "fast-tiff":
        dims = level_dimensions
        if dims is None:
            with openslide.OpenSlide(path) as s:
                dims = s.level_dimensions[choice.level]
        reader = fast_reader(path, tuple(dims))
        regions = [[(int(x), int(y), size_l, size_l) for x, y in lxy[cell]] for cell in cells]
        try:
            for cell, (canvas, (x0, y0)) in zip(cells, iter_canvases(reader, regions, fill=pad_value)):
                for k in cell:
                    x, y = lxy[k] - (x0, y0)
                    yield int(k), fit(canvas[y : y + size_l, x : x + size_l])
        except Exception:
            forget_reader(path)  # never reuse a handle after an error
            raise
        return
    slide = open_slide(path)
    try:
        for cell in cells:
            for k, reg in zip(cell, _openslide_regions(slide, coords[cell], lxy[cell], choice, size_l, pad_value)):
                yield int(k), fit(reg)
    finally:
        slide.close()


def read_tiles(
    path: str,
    coords: np.ndarray,
    choice: LevelChoice,
    tile_px: int,
    *,
    pad_value: int = 255,
    read_path: str = "openslide",
    level_dimensions: tuple[int, int] | None = None,
) -> np.ndarray:
    """Read tiles at level-0 ``coords`` as one (n, tile_px, tile_px, 3) uint8 array.

    See :func:`iter_tiles` for how the pixels are read; here the tiles are
    grouped into squares by their position alone.
    """
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    out = np.empty((len(coords), tile_px, tile_px, 3), np.uint8)
    size_l = max(1, int(round(tile_px * choice.scale)))
    pseudo_grid = np.rint(coords / choice.level_downsample).astype(np.int64) // size_l
    for k, tile in iter_tiles(
        path, coords, pseudo_grid, choice, tile_px,
        pad_value=pad_value, read_path=read_path, level_dimensions=level_dimensions,
    ):
        out[k] = tile
    return out


def _openslide_regions(slide, coords, lxy, choice: LevelChoice, size_l: int, pad_value: int) -> list[np.ndarray]:
    """Per-tile reads, or one read of the block's bounding box when tiles cover most of it."""
    x0, y0 = lxy.min(axis=0)
    x1, y1 = lxy.max(axis=0) + size_l
    bbox_area = float(x1 - x0) * float(y1 - y0)
    if len(lxy) * size_l * size_l < bbox_area:
        return [
            read_region_rgb(slide, (int(cx), int(cy)), choice.level, (size_l, size_l), background=pad_value)
            for cx, cy in coords
        ]
    origin0 = (int(round(x0 * choice.level_downsample)), int(round(y0 * choice.level_downsample)))
    big = read_region_rgb(slide, origin0, choice.level, (int(x1 - x0), int(y1 - y0)), background=pad_value)
    return [big[y - y0 : y - y0 + size_l, x - x0 : x - x0 + size_l] for x, y in lxy]
