"""Zarr v3 tile stores: one group per slide, ``STORE_DIR/<slide_id>.zarr``.

Layout
------
``tiles``            (N, T, T, 3) uint8, one tile per chunk (file ``tiles/c.<i>.0.0.0``), JPEG (``wsi_pipeline.jpeg``) or zstd
``coords``           (N, 2) int64, level-0 (x, y) of each tile's top-left corner
``grid_colrow``      (N, 2) int64, the tile's (col, row) in the slide's global grid
``tissue_fraction``  (N,) float32
``mask``             (h, w) uint8 tissue mask (1 = tissue) at ``attrs['tissue']['mask_downsample']``
``thumbnail``        (h, w, 3) uint8 RGB rendering at the same scale as the mask
``overlay.png``, ``mask.png``  pictures for people (thumbnail + mask + grid)

Group attributes record the source file (path, size, mtime, fingerprint), the
resolution (mpp, level, downsample), the tiling and mask parameters, the codec,
the config hash, the software version and timings. A store is built under a
temporary name and renamed when complete (``attrs['complete'] is True``);
:class:`TileStore` refuses anything else.

Reading needs the ``wsi_pipeline.jpeg`` codec registered: importing this module
does that (see :mod:`wsi.codecs`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import zarr
from zarr.codecs import BytesCodec, ZstdCodec
from zarr.storage import LocalStore
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from wsi.codecs import JpegCodec

FORMAT_NAME = "wsi-pipeline.tile-store"
FORMAT_VERSION = 1
STORE_SUFFIX = ".zarr"


class StoreError(Exception):
    """A tile store is missing, incomplete or from an incompatible version."""


def store_path_for(store_dir: str | Path, slide_id: str) -> Path:
    return Path(store_dir) / f"{slide_id}{STORE_SUFFIX}"


def temp_store_path(store_dir: str | Path, slide_id: str) -> Path:
    """A hidden sibling name for a store being built (never trusted by readers)."""
    return Path(store_dir) / f".tmp-{slide_id}-{os.getpid()}-{uuid.uuid4().hex[:8]}{STORE_SUFFIX}"


def _tile_codecs(codec: str, jpeg_quality: int, zstd_level: int) -> dict:
    if codec == "jpeg":
        return {"serializer": JpegCodec(quality=jpeg_quality), "compressors": None}
    if codec == "zstd":
        return {"serializer": BytesCodec(), "compressors": ZstdCodec(level=zstd_level)}
    raise ValueError(f"unknown codec {codec!r}")


def codec_description(codec: str, jpeg_quality: int, zstd_level: int) -> dict:
    if codec == "jpeg":
        return {
            "name": "jpeg",
            "quality": int(jpeg_quality),
            "zarr_codec": "wsi_pipeline.jpeg",
            "how_to_read": "each chunk file is one baseline JPEG of shape (T, T, 3); "
            "install wsi-pipeline (or import wsi.codecs) and open with zarr, or decode chunk files with any JPEG decoder",
        }
    return {"name": "zstd", "level": int(zstd_level), "how_to_read": "plain zarr v3 (bytes + zstd)"}


def create_store(
    path: str | Path,
    *,
    tile_px: int,
    coords: np.ndarray,
    cols_rows: np.ndarray,
    tissue_fraction: np.ndarray,
    mask: np.ndarray,
    thumbnail: np.ndarray,
    codec: str = "jpeg",
    jpeg_quality: int = 90,
    zstd_level: int = 3,
    attrs: dict | None = None,
) -> zarr.Group:
    """Create a new (incomplete) store with everything but the tile pixels."""
    path = Path(path)
    n = int(len(coords))
    g = zarr.open_group(str(path), mode="w-", zarr_format=3)
    g.create_array(
        "tiles",
        shape=(n, tile_px, tile_px, 3),
        chunks=(1, tile_px, tile_px, 3),
        dtype="uint8",
        fill_value=255,
        # Flat chunk files (tiles/c.<i>.0.0.0): no directory per tile to create.
        chunk_key_encoding={"name": "default", "separator": "."},
        **_tile_codecs(codec, jpeg_quality, zstd_level),
    )
    small = {"compressors": ZstdCodec(level=3)}
    g.create_array("coords", data=np.asarray(coords, np.int64).reshape(n, 2), **small)
    g.create_array("grid_colrow", data=np.asarray(cols_rows, np.int64).reshape(n, 2), **small)
    g.create_array("tissue_fraction", data=np.asarray(tissue_fraction, np.float32).reshape(n), **small)
    g.create_array("mask", data=np.asarray(mask, np.uint8), **small)
    g.create_array("thumbnail", data=np.asarray(thumbnail, np.uint8), **small)
    g.attrs.update(
        {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "complete": False,
            "n_tiles": n,
            "tile_px": int(tile_px),
            "codec": codec_description(codec, jpeg_quality, zstd_level),
            **(attrs or {}),
        }
    )
    return g


def _chunk_encoder(codecs):
    """A function encoding one chunk exactly as the array's codec chain would, or None."""
    if len(codecs) == 1 and isinstance(codecs[0], JpegCodec):
        return codecs[0].encode_array
    if len(codecs) == 2 and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], ZstdCodec):
        import imagecodecs

        level = codecs[1].level
        # uint8 has no byte order: the bytes codec is the raw buffer, zstd one frame of it.
        return lambda chunk: bytes(imagecodecs.zstd_encode(np.ascontiguousarray(chunk).tobytes(), level=level))
    return None


class TileWriter:
    """Writes tile pixels into an existing store, encoding each chunk once.

    Going through ``store.set`` with the array's own codec skips zarr's
    per-call machinery (which costs more than the JPEG encode itself) while
    producing exactly the chunks ``array[i] = tile`` would.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        g = zarr.open_group(str(self.path), mode="r+")
        self._array = g["tiles"]
        meta = self._array.metadata
        self._encode = _chunk_encoder(meta.codecs)
        self._store = self._array.store
        self._prefix = self._array.path
        self._meta = meta
        self._local_root = (
            Path(self._store.root) / self._prefix if isinstance(self._store, LocalStore) else None
        )
        self.bytes_written = 0

    def write(self, indices: np.ndarray, tiles: np.ndarray) -> None:
        """Write ``tiles[k]`` at index ``indices[k]`` (one tile per chunk)."""
        if self._encode is None:  # a codec chain we don't special-case: zarr's own pipeline
            for i, tile in zip(indices, tiles):
                self._array[int(i)] = tile
            return
        if self._local_root is not None:
            # The store is a temporary directory renamed into place only when complete,
            # so plain file writes are safe; zarr's LocalStore would fsync-rename each chunk.
            made: set[Path] = set()
            for i, tile in zip(indices, tiles):
                data = self._encode(tile[None])
                path = self._local_root / self._meta.encode_chunk_key((int(i), 0, 0, 0))
                if path.parent not in made:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    made.add(path.parent)
                path.write_bytes(data)
                self.bytes_written += len(data)
            return
        proto = default_buffer_prototype()
        writes = []
        for i, tile in zip(indices, tiles):
            data = self._encode(tile[None])
            key = f"{self._prefix}/{self._meta.encode_chunk_key((int(i), 0, 0, 0))}"
            writes.append(self._store.set(key, proto.buffer.from_bytes(data)))
            self.bytes_written += len(data)
        sync(_gather(writes))


async def _gather(coros) -> None:
    await asyncio.gather(*coros)


def finalize_store(tmp_path: str | Path, final_path: str | Path, attrs: dict) -> None:
    """Mark a store complete and move it into place atomically.

    An existing store at ``final_path`` (an outdated one) is moved aside first
    and deleted only after the new one is in place.
    """
    tmp_path, final_path = Path(tmp_path), Path(final_path)
    g = zarr.open_group(str(tmp_path), mode="r+")
    g.attrs.update({**attrs, "complete": True})
    replace_dir(tmp_path, final_path)


def replace_dir(tmp_path: str | Path, final_path: str | Path) -> None:
    """Move a finished directory into place; an existing one is moved aside first and
    deleted only after the new one is in place (readers never see a half-written tree)."""
    tmp_path, final_path = Path(tmp_path), Path(final_path)
    old = None
    if final_path.exists():
        old = final_path.with_name(f".old-{final_path.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final_path, old)
    os.replace(tmp_path, final_path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def store_bytes(path: str | Path, sub: str = "tiles") -> int:
    """Bytes on disk under ``path/sub``."""
    root = Path(path) / sub
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def read_store_attrs(path: str | Path) -> dict | None:
    """A store's attributes, or None when there is no readable group there."""
    try:
        return dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:  # missing or not a zarr group: no store
        return None


class TileStore:
    """Read access to one slide's tiles.

    Parameters
    ----------
    path : str or Path
        ``<slide_id>.zarr`` directory written by ``wsi-pipeline tile``.

    Examples
    --------
    >>> store = TileStore("stores/slide_000.zarr")      # doctest: +SKIP
    >>> tile = store[0]                                  # (T, T, 3) uint8
    >>> batch = store.read([3, 1, 4])                    # (3, T, T, 3)
    >>> for idx, tiles in store.iter_batches(64): ...    # in order
    >>> lazy = store.as_dask()                           # dask array (N, T, T, 3)
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"{self.path}: no tile store here; run 'wsi-pipeline tile' first")
        try:
            self._group = zarr.open_group(str(self.path), mode="r")
        except Exception as exc:
            raise StoreError(f"{self.path}: not a readable Zarr group ({exc}); re-run 'wsi-pipeline tile'") from None
        attrs = dict(self._group.attrs)
        if attrs.get("format") != FORMAT_NAME:
            raise StoreError(f"{self.path}: not a wsi-pipeline tile store (no '{FORMAT_NAME}' format attribute)")
        version = attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(
                f"{self.path}: tile store format version {version}, this software reads version "
                f"{FORMAT_VERSION}; re-tile the slide with 'wsi-pipeline tile' (it replaces the store)"
            )
        if not attrs.get("complete"):
            raise StoreError(f"{self.path}: the store is incomplete (its tiling did not finish); re-run 'wsi-pipeline tile'")
        self.attrs = attrs
        self._tiles = self._group["tiles"]
        self.coords = np.asarray(self._group["coords"][:], np.int64).reshape(-1, 2)
        self.grid_colrow = np.asarray(self._group["grid_colrow"][:], np.int64).reshape(-1, 2)
        self.tissue_fraction = np.asarray(self._group["tissue_fraction"][:], np.float32)

    # -- facts ---------------------------------------------------------------
    @property
    def slide_id(self) -> str:
        return self.attrs["slide"]["slide_id"]

    @property
    def tile_px(self) -> int:
        return int(self.attrs["tile_px"])

    @property
    def mpp(self) -> float:
        """Effective micrometres per pixel of the tiles."""
        return float(self.attrs["tiling"]["effective_mpp"])

    @property
    def downsample(self) -> float:
        """Level-0 pixels per tile pixel."""
        return float(self.attrs["tiling"]["downsample"])

    @property
    def mask_downsample(self) -> float:
        """Level-0 pixels per pixel of ``mask`` and ``thumbnail``."""
        return float(self.attrs["tissue"]["mask_downsample"])

    @property
    def mask(self) -> np.ndarray:
        return np.asarray(self._group["mask"][:]).astype(bool)

    @property
    def thumbnail(self) -> np.ndarray:
        return np.asarray(self._group["thumbnail"][:])

    def __len__(self) -> int:
        return int(self._tiles.shape[0])

    def __repr__(self) -> str:
        return f"TileStore({str(self.path)!r}, n_tiles={len(self)}, tile_px={self.tile_px}, mpp={self.mpp:.3f})"

    # -- pixels --------------------------------------------------------------
    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            i = int(index)
            if i < 0:
                i += len(self)
            if not 0 <= i < len(self):
                raise IndexError(f"tile {index} out of range for {len(self)} tiles")
            return np.asarray(self._tiles[i])
        if isinstance(index, slice):
            return np.asarray(self._tiles[index])
        return self.read(index)

    def read(self, indices) -> np.ndarray:
        """Tiles at ``indices`` (any order, repeats allowed) as (n, T, T, 3) uint8."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            return np.empty((0, self.tile_px, self.tile_px, 3), np.uint8)
        if idx.min() < 0 or idx.max() >= len(self):
            raise IndexError(f"tile indices out of range for {len(self)} tiles")
        uniq, inverse = np.unique(idx, return_inverse=True)
        data = np.asarray(self._tiles.get_orthogonal_selection((uniq,)))
        return data[inverse]

    def iter_batches(self, batch_size: int = 64, indices=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(indices, tiles)`` in order, ``batch_size`` tiles at a time."""
        idx = np.arange(len(self)) if indices is None else np.asarray(indices, np.int64)
        for start in range(0, len(idx), batch_size):
            sel = idx[start : start + batch_size]
            yield sel, self.read(sel)

    def as_dask(self):
        """A lazy dask array view of the tiles, one tile per dask chunk."""
        import dask.array as da

        return da.from_zarr(self._tiles)


def list_stores(store_dir: str | Path) -> list[Path]:
    """Complete-looking stores in a folder (temporary and hidden names excluded), sorted."""
    d = Path(store_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob(f"*{STORE_SUFFIX}") if p.is_dir() and not p.name.startswith("."))
