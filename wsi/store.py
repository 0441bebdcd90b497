"""Zarr v3 tile stores: one group per slide, ``STORE_DIR/<slide_id>.zarr``.

Layout
------
``tiles``            (N, T, T, 3) uint8, one tile per chunk, JPEG (``wsi_pipeline.jpeg``) or zstd; S tiles per
                     shard file ``tiles/c.<j>.0.0.0`` (zarr v3 ``sharding_indexed``; S = 1 means one file per tile)
``coords``           (N, 2) int64, level-0 (x, y) of each tile's top-left corner
``grid_colrow``      (N, 2) int64, the tile's (col, row) in the slide's global grid
``tissue_fraction``  (N,) float32
``mask``             (h, w) uint8 tissue mask (1 = tissue) at ``attrs['tissue']['mask_downsample']``
``thumbnail``        (h, w, 3) uint8 RGB rendering at the same scale as the mask

Beside the group, ``STORE_DIR/<slide_id>.overlay.png`` and ``<slide_id>.mask.png`` are pictures for
people (thumbnail + mask + grid; :func:`picture_paths`). Stores written before kept them inside the
group as ``overlay.png`` / ``mask.png``; readers ignore them either way.

Group attributes record the source file (path, size, mtime, fingerprint), the
resolution (mpp, level, downsample), the tiling and mask parameters, the codec,
the config hash, the software version and timings. A store is built under a
temporary name and renamed when complete (``attrs['complete'] is True``);
:class:`TileStore` refuses anything else. At completion every file of the store
(but the root ``zarr.json``, which holds the list) is recorded with its size and
crc32c checksum (``attrs['integrity']``), after the files and folders were
fsynced; opening a store checks that every recorded file is there with its size
(:func:`verify_store`; ``checksums=True`` reads them all), so a deleted or
truncated shard is an error naming the store, never tiles of a fill value. :class:`FastTileReader` reads single
tiles of a JPEG store straight from its files (the same pixels as ``TileStore[i]``,
without Zarr's per-call cost), for random access from training loaders.

Reading needs the ``wsi_pipeline.jpeg`` codec registered: importing this module
does that (see :mod:`wsi.codecs`); without this package, ``pip install ./codecs-dist``
lets stock zarr-python read a store. Every array has ``dimension_names``
(:data:`DIMENSION_NAMES`).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Container, Iterator

import imagecodecs
import numpy as np
import zarr
from zarr.abc.codec import ArrayBytesCodec
from zarr.codecs import BytesCodec, ShardingCodec, ShardingCodecIndexLocation, ZstdCodec
from zarr.storage import LocalStore
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from wsi.atomic import fsync_dir, fsync_file
from wsi.codecs import CODEC_NAME, JpegCodec
from wsi.objstore import is_url

FORMAT_NAME = "wsi-pipeline.tile-store"
FORMAT_VERSION = 2
#: Versions :class:`TileStore` reads. Version 1 stores (one file per tile) hold the same
#: pixels in the same arrays; version 2 groups the tile chunks into shard files.
READABLE_VERSIONS = (1, 2)
STORE_SUFFIX = ".zarr"


class StoreError(Exception):
    """A tile store is missing, incomplete, damaged or from an incompatible version."""


#: What a damaged store's error tells the user to do.
RETILE_HINT = (
    "re-tile the slide: run 'wsi-pipeline tile' (or 'classify' on the slides) again, "
    "which replaces a damaged store"
)


#: Axis names of every array of a store (zarr v3 ``dimension_names``: xarray opens the group
#: as a Dataset). Tiles and mask have their own y/x names: their sizes differ.
DIMENSION_NAMES = {
    "tiles": ("tile", "tile_y", "tile_x", "rgb"),
    "coords": ("tile", "xy"),
    "grid_colrow": ("tile", "colrow"),
    "tissue_fraction": ("tile",),
    "mask": ("mask_y", "mask_x"),
    "thumbnail": ("mask_y", "mask_x", "rgb"),
}


def store_path_for(store_dir: str | Path, slide_id: str) -> Path | str:
    """``store_dir/<slide_id>.zarr``: a Path, or a URL string for a store folder on object storage."""
    if is_url(store_dir):
        from wsi.remote_store import store_url

        return store_url(str(store_dir), slide_id)
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
            "zarr_codec": CODEC_NAME,
            "how_to_read": "each chunk is one baseline JPEG of shape (T, T, 3), grouped into zarr v3 shard files "
            "(chunk bytes, then the shard index); open with stock zarr-python after 'pip install wsi-pipeline-jpeg' "
            "(codecs-dist/ in the wsi-pipeline repository) or with wsi-pipeline installed, "
            "or take a chunk's bytes from its shard index and decode them with any JPEG decoder",
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
    tiles_per_shard: int = 1,
    attrs: dict | None = None,
) -> zarr.Group:
    """Create a new (incomplete) store with everything but the tile pixels.

    The same as :func:`create_tile_array` followed by :func:`write_slide_arrays`.
    """
    create_tile_array(
        path, tile_px=tile_px, n_tiles=len(coords), codec=codec, jpeg_quality=jpeg_quality, zstd_level=zstd_level,
        tiles_per_shard=tiles_per_shard,
    )
    return write_slide_arrays(
        path, coords=coords, cols_rows=cols_rows, tissue_fraction=tissue_fraction, mask=mask,
        thumbnail=thumbnail, attrs=attrs,
    )


def create_tile_array(
    path: str | Path,
    *,
    tile_px: int,
    n_tiles: int,
    codec: str = "jpeg",
    jpeg_quality: int = 90,
    zstd_level: int = 3,
    tiles_per_shard: int = 1,
) -> zarr.Group:
    """Create a new store group holding only the empty ``tiles`` array.

    Enough for :class:`TileWriter` to start writing pixels; the group
    attributes (``complete: False``, the codec) are written here too.

    Parameters
    ----------
    tiles_per_shard : int
        Tiles (chunks) grouped into one shard file. Creating one file per
        tile costs more than encoding the tile on many file systems, and
        network file systems suffer from millions of small files; 1 writes
        one plain chunk file per tile.
    """
    n = int(n_tiles)
    per_shard = int(tiles_per_shard)
    if per_shard < 1:
        raise ValueError(f"tiles_per_shard must be >= 1, got {tiles_per_shard}")
    g = zarr.open_group(str(path), mode="w-", zarr_format=3)
    g.create_array(
        "tiles",
        shape=(n, tile_px, tile_px, 3),
        chunks=(1, tile_px, tile_px, 3),
        shards=(per_shard, tile_px, tile_px, 3) if per_shard > 1 else None,
        dtype="uint8",
        fill_value=255,
        # Flat chunk files (tiles/c.<i>.0.0.0): no directory per tile or shard to create.
        chunk_key_encoding={"name": "default", "separator": "."},
        dimension_names=DIMENSION_NAMES["tiles"],
        **_tile_codecs(codec, jpeg_quality, zstd_level),
    )
    g.attrs.update(
        {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "complete": False,
            "n_tiles": n,
            "tile_px": int(tile_px),
            "tiles_per_shard": per_shard,
            "codec": codec_description(codec, jpeg_quality, zstd_level),
        }
    )
    return g


def _one_chunk_up_to(shape: tuple[int, ...], side: int) -> tuple[int, ...]:
    """Chunks covering the whole array when its first two axes are at most ``side``."""
    return tuple(max(1, min(n, side)) if i < 2 else max(1, n) for i, n in enumerate(shape))


def write_slide_arrays(
    path: str | Path,
    *,
    coords: np.ndarray,
    cols_rows: np.ndarray,
    tissue_fraction: np.ndarray,
    mask: np.ndarray,
    thumbnail: np.ndarray,
    attrs: dict | None = None,
) -> zarr.Group:
    """Add the per-tile and per-slide arrays and attributes to a store made by :func:`create_tile_array`."""
    g = zarr.open_group(str(path), mode="r+")
    n = int(g.attrs["n_tiles"])
    if len(coords) != n:
        raise StoreError(f"{path}: {len(coords)} coordinates for a store of {n} tiles")
    arrays = {
        "coords": np.asarray(coords, np.int64).reshape(n, 2),
        "grid_colrow": np.asarray(cols_rows, np.int64).reshape(n, 2),
        "tissue_fraction": np.asarray(tissue_fraction, np.float32).reshape(n),
        "mask": np.asarray(mask, np.uint8),
        "thumbnail": np.asarray(thumbnail, np.uint8),
    }

    async def write_all() -> None:
        # One trip through zarr's event loop for all five arrays (each sync call costs ~20 ms).
        ag = await zarr.api.asynchronous.open_group(store=str(path), mode="r+")
        await asyncio.gather(
            *(
                ag.create_array(
                    name, data=data, chunks=_one_chunk_up_to(data.shape, 4096), compressors=ZstdCodec(level=3),
                    dimension_names=DIMENSION_NAMES[name],
                )
                for name, data in arrays.items()
            )
        )
        if attrs:
            await ag.update_attributes(attrs)

    sync(write_all())
    return zarr.open_group(str(path), mode="r+")


def is_jpeg_codec(codec) -> bool:
    """Our JPEG codec, whichever module registered it (``wsi.codecs`` or the ``wsi_pipeline_jpeg`` distribution)."""
    return isinstance(codec, JpegCodec) or (
        isinstance(codec, ArrayBytesCodec) and codec.to_dict().get("name") == CODEC_NAME
    )


def _chunk_encoder(codecs):
    """A function encoding one chunk exactly as the array's codec chain would, or None."""
    if len(codecs) == 1 and is_jpeg_codec(codecs[0]):
        return codecs[0].encode_array
    if len(codecs) == 2 and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], ZstdCodec):
        import imagecodecs

        level = codecs[1].level
        # uint8 has no byte order: the bytes codec is the raw buffer, zstd one frame of it.
        return lambda chunk: bytes(imagecodecs.zstd_encode(np.ascontiguousarray(chunk).tobytes(), level=level))
    return None


class TileWriter:
    """Writes tile pixels into an existing store, encoding each chunk once.

    Encoding with the array's own codec and writing the chunk (or shard) files
    directly skips zarr's per-call machinery (which costs more than the JPEG
    encode itself) while producing exactly the files ``array[i] = tile``
    would. With sharding, encoded tiles wait in memory until their shard is
    complete and the shard file is then written at once, so one writer must
    be given every tile of each shard it touches (tiling hands each task
    whole shards); :meth:`close` (or leaving the ``with`` block) refuses to
    drop an incomplete shard.

    Examples
    --------
    >>> with TileWriter(tmp_store) as w:                 # doctest: +SKIP
    ...     for i, tile in zip(indices, tiles):
    ...         w.write_tile(i, tile)
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        g = zarr.open_group(str(self.path), mode="r+")
        self._array = g["tiles"]
        meta = self._array.metadata
        self._meta = meta
        self._n = int(meta.shape[0])
        self._store = self._array.store
        self._prefix = self._array.path
        self._local_root = (
            Path(self._store.root) / self._prefix if isinstance(self._store, LocalStore) else None
        )
        layout = _tile_layout(meta)
        self._per_shard = layout[0] if layout else 1
        # None: a layout we don't write by hand, zarr's own pipeline then.
        self._encode = _chunk_encoder(layout[1]) if layout else None
        self._pending: dict[int, dict[int, bytes]] = {}
        self.bytes_written = 0
        #: ``{path in the store: [size, crc32c hex]}`` of every file written by hand (for the
        #: store's integrity record; :func:`finalize_store` reads only the files missing here).
        self.files: dict[str, list] = {}
        self._made: set[Path] = set()

    def write(self, indices: np.ndarray, tiles: np.ndarray) -> None:
        """Write ``tiles[k]`` at index ``indices[k]`` (one tile per chunk)."""
        for i, tile in zip(indices, tiles):
            self.write_tile(int(i), tile)

    def write_tile(self, index: int, tile: np.ndarray) -> int:
        """Encode ``tile`` (T, T, 3) and write it at ``index``; returns the bytes written now.

        ``tile`` may be a strided view (e.g. of a larger canvas). With
        sharding the bytes are written when the tile's shard is complete.
        """
        index = int(index)
        if not 0 <= index < self._n:
            raise IndexError(f"tile index {index} out of range for {self._n} tiles")
        if self._encode is None:
            self._array[index] = tile
            return 0
        data = self._encode(tile[None])
        if self._per_shard == 1:
            return self._put(index, data)
        shard = index // self._per_shard
        pending = self._pending.setdefault(shard, {})
        pending[index - shard * self._per_shard] = data
        if len(pending) == self._shard_len(shard):
            del self._pending[shard]
            return self._put(shard, *_shard_parts(pending, self._per_shard))
        return 0

    def _shard_len(self, shard: int) -> int:
        return min(self._per_shard, self._n - shard * self._per_shard)

    def _put(self, chunk: int, *parts: bytes) -> int:
        """Write one chunk or shard file made of ``parts`` back to back; returns its size."""
        key = self._meta.encode_chunk_key((chunk, 0, 0, 0))
        nbytes = sum(len(p) for p in parts)
        if self._local_root is not None:
            # The store is a temporary directory renamed into place only when complete,
            # so plain file writes are safe (no temporary name per file).
            path = self._local_root / key
            if path.parent not in self._made:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._made.add(path.parent)
            # The parts go to the kernel as they are (no joined copy of a 2 MB shard); one
            # fsync per file, so the store renamed into place later survives a power cut.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                _write_all(fd, parts, nbytes)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.files[f"{self._prefix}/{key}"] = [nbytes, _crc_hex(parts)]
        else:
            proto = default_buffer_prototype()
            sync(self._store.set(f"{self._prefix}/{key}", proto.buffer.from_bytes(b"".join(parts))))
        self.bytes_written += nbytes
        return nbytes

    def close(self) -> None:
        """Check that no shard is left half-filled (its tiles would be lost)."""
        if self._pending:
            shards = sorted(self._pending)
            missing = sum(self._shard_len(j) - len(self._pending[j]) for j in shards)
            self._pending.clear()
            raise StoreError(
                f"{self.path}: shards {shards[:5]}{'...' if len(shards) > 5 else ''} are incomplete "
                f"({missing} tiles never written); a writer must be given every tile of its shards"
            )

    def __enter__(self) -> "TileWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self._pending.clear()


def _tile_layout(meta) -> tuple[int, tuple] | None:
    """``(tiles per file, codecs of one tile)`` when every chunk is one whole tile, stored
    one per file or in shards with zarr's default index at the end; None for any other layout."""
    codecs, outer = tuple(meta.codecs), tuple(meta.chunk_grid.chunk_shape)
    if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
        sh = codecs[0]
        if (
            sh.index_location == ShardingCodecIndexLocation.end
            and [c.to_dict() for c in sh.index_codecs] == _DEFAULT_INDEX_CODECS
            and tuple(sh.chunk_shape) == (1, *meta.shape[1:])
            and tuple(outer[1:]) == tuple(meta.shape[1:])
        ):
            return int(outer[0]), tuple(sh.codecs)
        return None
    if outer == (1, *meta.shape[1:]):
        return 1, codecs
    return None


#: zarr's default shard index codecs (little-endian uint64 pairs + crc32c), the only ones written by hand.
_DEFAULT_INDEX_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
_EMPTY = np.uint64(2**64 - 1)


def _write_all(fd: int, parts, nbytes: int) -> None:
    """``os.writev`` until all ``nbytes`` of ``parts`` are written (it may write less at once)."""
    views = [memoryview(p) for p in parts]
    done = 0
    while done < nbytes:
        n = os.writev(fd, views[:1024])  # IOV_MAX
        if n <= 0:
            raise OSError(f"writev wrote nothing with {nbytes - done} bytes left")
        done += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]


def _shard_parts(chunks: dict[int, bytes], per_shard: int) -> list[bytes]:
    """A zarr v3 ``sharding_indexed`` shard, in pieces: the chunks back to back, then the index.

    The index holds ``(offset, nbytes)`` as little-endian uint64 for each of
    the shard's ``per_shard`` chunk slots (``2**64 - 1`` twice for an empty
    slot), followed by its crc32c checksum (4 bytes, little-endian).
    """
    import google_crc32c

    index = np.full((per_shard, 2), _EMPTY, dtype="<u8")
    parts = []
    offset = 0
    for slot in sorted(chunks):
        data = chunks[slot]
        index[slot] = (offset, len(data))
        parts.append(data)
        offset += len(data)
    index_bytes = index.tobytes()
    crc = int(google_crc32c.value(index_bytes)).to_bytes(4, "little")
    return parts + [index_bytes, crc]


class RawChunks:
    """The encoded bytes of single tile chunks, read straight from a local store's files.

    Zarr's per-call machinery costs more than decoding a small JPEG tile, so
    random single-tile reads (training loaders) go to the files directly:
    one file per chunk, or a zarr v3 shard (index at the end, zarr's default
    index codecs), whose index is read and checked once per shard. Anything
    else has ``supported`` False; read through zarr then.

    Parameters
    ----------
    tiles_dir : path
        The store's ``tiles`` array directory.
    meta : zarr ArrayV3Metadata
        That array's metadata.
    """

    def __init__(self, tiles_dir: str | Path, meta) -> None:
        self.root = Path(tiles_dir)
        self.meta = meta
        self.n = int(meta.shape[0])
        layout = _tile_layout(meta)
        self.supported = layout is not None
        self.per_shard, self.codecs = layout if layout else (1, tuple(meta.codecs))
        self._index: dict[int, np.ndarray | None] = {}

    def _shard_index(self, shard: int) -> np.ndarray | None:
        if shard not in self._index:
            import google_crc32c

            path = self.root / self.meta.encode_chunk_key((shard, 0, 0, 0))
            size = self.per_shard * 16 + 4
            try:
                with open(path, "rb") as f:
                    f.seek(-size, os.SEEK_END)
                    raw = f.read(size)
            except FileNotFoundError:
                self._index[shard] = None
                return None
            body, crc = raw[:-4], raw[-4:]
            if len(raw) != size or int(google_crc32c.value(body)).to_bytes(4, "little") != crc:
                raise StoreError(f"{path}: shard index checksum mismatch; the store is damaged: {RETILE_HINT}")
            self._index[shard] = np.frombuffer(body, "<u8").reshape(self.per_shard, 2)
        return self._index[shard]

    def read(self, index: int) -> bytes | None:
        """The encoded bytes of tile ``index``, or None if it was never written (fill value)."""
        i = int(index)
        if not 0 <= i < self.n:
            raise IndexError(f"tile {i} out of range for {self.n} tiles")
        if self.per_shard == 1:
            try:
                return (self.root / self.meta.encode_chunk_key((i, 0, 0, 0))).read_bytes()
            except FileNotFoundError:
                return None
        shard, slot = divmod(i, self.per_shard)
        index = self._shard_index(shard)
        if index is None:
            return None
        offset, nbytes = (int(v) for v in index[slot])
        if offset == 2**64 - 1:
            return None
        with open(self.root / self.meta.encode_chunk_key((shard, 0, 0, 0)), "rb") as f:
            f.seek(offset)
            return f.read(nbytes)


#: Pictures a tiling leaves in its temporary store, moved beside the finished store by
#: :func:`finalize_store` (inside the group, stock zarr warns about them on every listing).
PICTURE_NAMES = ("overlay.png", "mask.png")


def picture_paths(store_path: str | Path) -> dict[str, Path]:
    """Where the pictures of a store live: ``{"overlay.png": <dir>/<slide_id>.overlay.png, ...}``."""
    store_path = Path(store_path)
    stem = store_path.name[: -len(STORE_SUFFIX)] if store_path.name.endswith(STORE_SUFFIX) else store_path.name
    return {name: store_path.with_name(f"{stem}.{name}") for name in PICTURE_NAMES}


def finalize_store(tmp_path: str | Path, final_path: str | Path, attrs: dict, files: dict | None = None) -> None:
    """Record the store's files, mark it complete, make it durable and move it into place.

    ``files`` (``{path in the store: [size, crc32c hex]}``, e.g. :attr:`TileWriter.files`
    gathered from every writer) saves reading back what the writers already checksummed and
    fsynced; every other file is read, checksummed and fsynced here. Every tile chunk (or
    shard) file must exist: a store with tiles never written is refused. An existing store at
    ``final_path`` (an outdated one) is replaced by :func:`replace_dir`. Pictures written into
    the temporary store (:data:`PICTURE_NAMES`) move beside it first (:func:`picture_paths`).
    """
    tmp_path, final_path = Path(tmp_path), Path(final_path)
    g = zarr.open_group(str(tmp_path), mode="r+")
    for name, dest in picture_paths(final_path).items():  # beside the store: stock zarr warns about extras
        if (tmp_path / name).is_file():
            os.replace(tmp_path / name, dest)
    missing = _missing_tile_files(tmp_path, g["tiles"].metadata)
    if missing:
        raise StoreError(
            f"{tmp_path}: {len(missing)} tile file(s) never written ({missing[0]}, ...); the store cannot be completed"
        )
    manifest = store_manifest(tmp_path, files)
    g.attrs.update({**attrs, "integrity": {"checksum": "crc32c", "files": manifest}, "complete": True})
    fsync_file(tmp_path / "zarr.json")
    for folder in sorted({(tmp_path / rel).parent for rel in manifest} | {tmp_path}, reverse=True):
        fsync_dir(folder)
    replace_dir(tmp_path, final_path)


def _crc_hex(parts) -> str:
    import google_crc32c

    crc = 0
    for part in parts:
        crc = google_crc32c.extend(crc, part if isinstance(part, bytes) else bytes(part))
    return f"{crc:08x}"


def file_crc32c(path: str | Path, *, fsync: bool = False) -> str:
    """crc32c of a file's content as 8 hex digits (read in 4 MiB pieces); ``fsync`` flushes it too."""
    import google_crc32c

    crc = 0
    with open(path, "rb") as fh:
        while piece := fh.read(4 << 20):
            crc = google_crc32c.extend(crc, piece)
        if fsync:
            os.fsync(fh.fileno())
    return f"{crc:08x}"


def _store_files(path: Path) -> dict[str, int]:
    """``{path in the store: size}`` of every file of a store but the root ``zarr.json``."""
    out = {}
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in names:
            full = Path(root) / name
            rel = full.relative_to(path).as_posix()
            if rel != "zarr.json":
                out[rel] = full.stat().st_size
    return out


def store_manifest(path: str | Path, known: dict | None = None) -> dict[str, list]:
    """``{path in the store: [size, crc32c hex]}`` for every file of the store but the root
    ``zarr.json``; files in ``known`` with the same size are taken from there (their writer
    checksummed and fsynced them), the others are read and fsynced."""
    path = Path(path)
    known = known or {}
    out = {}
    for rel, size in sorted(_store_files(path).items()):
        k = known.get(rel)
        if k is not None and int(k[0]) == size:
            out[rel] = [size, str(k[1])]
        else:
            out[rel] = [size, file_crc32c(path / rel, fsync=True)]
    return out


def _missing_tile_files(path: Path, meta) -> list[str]:
    """Chunk (or shard) files of the ``tiles`` array that do not exist (tiles are always written)."""
    layout = _tile_layout(meta)
    per_file = layout[0] if layout else int(meta.chunk_grid.chunk_shape[0])
    n_files = -(-int(meta.shape[0]) // per_file)
    root = path / "tiles"
    try:
        have = set(os.listdir(root))
    except FileNotFoundError:
        have = set()
    keys = (meta.encode_chunk_key((j, 0, 0, 0)) for j in range(n_files))
    return [f"tiles/{k}" for k in keys if k not in have]


def verify_store(path: str | Path, attrs: dict | None = None, *, checksums: bool = False) -> list[str]:
    """What is wrong with a complete store's files: empty when every file recorded at completion
    is there with its size (and, with ``checksums``, its crc32c). Each problem is a short phrase
    (``"tiles/c.3.0.0.0 is missing"``). A store made before stores recorded their files gets
    ``"it has no record of its files ..."`` and only the presence of its tile files is checked."""
    if attrs is None:
        attrs = read_store_attrs(path) or {}
    if is_url(path):
        from wsi.remote_store import verify_store as remote_verify

        return remote_verify(str(path), attrs, checksums=checksums)
    path = Path(path)
    record = (attrs.get("integrity") or {}).get("files")
    if not isinstance(record, dict):
        try:
            meta = zarr.open_array(str(path / "tiles"), mode="r").metadata
        except Exception as exc:
            return [f"its tiles array cannot be opened ({type(exc).__name__})"]
        missing = _missing_tile_files(path, meta)
        return [f"{m} is missing" for m in missing[:3]] + [NO_RECORD]
    problems = []
    sizes: dict[str, dict[str, int]] = {}
    for rel, (size, crc) in record.items():
        folder, _, name = rel.rpartition("/")
        if folder not in sizes:
            try:
                with os.scandir(path / folder) as it:
                    sizes[folder] = {e.name: e.stat().st_size for e in it if e.is_file()}
            except OSError:
                sizes[folder] = {}
        have = sizes[folder].get(name)
        if have is None:
            problems.append(f"{rel} is missing")
        elif have != int(size):
            problems.append(f"{rel} is {have} bytes, {int(size)} when it was written")
        elif checksums and file_crc32c(path / rel) != crc:
            problems.append(f"{rel} does not match its checksum")
    return problems


#: :func:`verify_store`'s problem for a store made before stores recorded their files.
NO_RECORD = "it has no record of its files' sizes and checksums (made by an older version)"


def describe_damage(path: str | Path, problems: list[str], slide_id: str | None = None) -> str:
    """One line naming a damaged store, its slide, what is wrong and the fix."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    slide = f" of slide {slide_id}" if slide_id else ""
    return f"{path}: the tile store{slide} is damaged: {problems[0]}{more}; {RETILE_HINT}"


# --------------------------------------------------------------------------- swapping stores

_RENAME_EXCHANGE = 2
_renameat2 = None


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    platform or file system cannot, and the caller falls back to two renames."""
    global _renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError):  # glibc < 2.28, musl ...
            _renameat2 = False
            return False
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        _renameat2 = fn
    if _renameat2 is False:
        return False
    at_fdcwd = -100
    if _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _old_name(final_path: Path) -> Path:
    return final_path.with_name(f".old-{final_path.name}-{uuid.uuid4().hex[:8]}")


def replace_dir(tmp_path: str | Path, final_path: str | Path) -> None:
    """Move a finished directory into place without a moment with neither copy.

    Where the platform can, the new and the existing directory are exchanged atomically
    and the old one (now under the temporary name) is renamed ``.old-*`` and deleted;
    elsewhere the existing one is renamed ``.old-*`` first. Either way the old copy is
    deleted only after the new one is in place and the folder is fsynced, and a run
    killed in between leaves what :func:`recover_swaps` puts right.
    """
    tmp_path, final_path = Path(tmp_path), Path(final_path)
    parent = final_path.parent
    old = None
    if final_path.exists():
        if _rename_exchange(tmp_path, final_path):
            fsync_dir(parent)
            old = _old_name(final_path)
            os.replace(tmp_path, old)
        else:
            old = _old_name(final_path)
            os.replace(final_path, old)
            os.replace(tmp_path, final_path)
    else:
        os.replace(tmp_path, final_path)
    fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_OLD_STORE = re.compile(rf"^\.old-(?P<name>.+{re.escape(STORE_SUFFIX)})-[0-9a-f]{{8}}$")
_TMP_STORE = re.compile(rf"^\.tmp-(?P<slide_id>.+)-\d+-[0-9a-f]+{re.escape(STORE_SUFFIX)}$")


def _store_temporaries(store_dir: str | Path) -> dict[str, list[tuple[int, Path]]]:
    """``{slide_id: [(0, new store being built) or (1, old store being replaced), ...]}`` in a store folder."""
    out: dict[str, list[tuple[int, Path]]] = {}
    for p in Path(store_dir).glob(".*"):
        m_old, m_tmp = _OLD_STORE.match(p.name), _TMP_STORE.match(p.name)
        if m_tmp:
            out.setdefault(m_tmp.group("slide_id"), []).append((0, p))
        elif m_old:
            out.setdefault(m_old.group("name")[: -len(STORE_SUFFIX)], []).append((1, p))
    return out


def stray_store_ids(store_dir: str | Path) -> list[str]:
    """The slides that have a store under a temporary name in ``store_dir`` (being built or replaced, or
    left so by a run that stopped)."""
    return sorted(_store_temporaries(store_dir))


def remove_store_temporaries(store_dir: str | Path, slide_id: str) -> bool:
    """Remove what is left of one slide's store under temporary names (call while holding the slide, after
    :func:`recover_swaps`); True when a new store being built was among them (its run stopped mid-slide)."""
    found = _store_temporaries(store_dir).get(slide_id, [])
    for _, p in found:
        shutil.rmtree(p, ignore_errors=True)
    return any(kind == 0 for kind, _ in found)


def recover_swaps(store_dir: str | Path, slide_ids: Container[str] | None = None) -> list[str]:
    """Put back the stores a run killed inside a swap left without their final name.

    For every ``<slide_id>.zarr`` (of ``slide_ids``, default all) that is missing while
    a complete, undamaged copy of it is still there under a temporary name, that copy is
    renamed into place: a finished new store (``.tmp-*``) first, else the old one
    (``.old-*``). Call only while no other process works on those slides, before their
    temporaries are removed; returns the slide ids put back.
    """
    d = Path(store_dir)
    candidates = {f"{sid}{STORE_SUFFIX}": paths for sid, paths in _store_temporaries(d).items()
                  if slide_ids is None or sid in slide_ids}
    restored = []
    for name, paths in sorted(candidates.items()):
        final = d / name
        if final.exists():
            continue
        for _, p in sorted(paths, key=lambda t: (t[0], -t[1].stat().st_mtime)):
            attrs = read_store_attrs(p)
            if attrs and attrs.get("format") == FORMAT_NAME and attrs.get("complete") and not [
                x for x in verify_store(p, attrs) if x != NO_RECORD
            ]:
                os.replace(p, final)
                fsync_dir(d)
                restored.append(name[: -len(STORE_SUFFIX)])
                break
    return restored


def store_bytes(path: str | Path, sub: str = "tiles") -> int:
    """Bytes of the chunk (or shard) files under ``path/sub``, metadata (``zarr.json``) excluded."""
    root = Path(path) / sub
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and f.name != "zarr.json")


def read_store_attrs(path: str | Path) -> dict | None:
    """A store's attributes, or None when there is no readable group there."""
    if is_url(path):
        from wsi.remote_store import read_store_attrs as remote_attrs

        return remote_attrs(str(path))
    try:
        return dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:  # missing or not a zarr group: no store
        return None


class TileStore:
    """Read access to one slide's tiles.

    Parameters
    ----------
    path : str or Path
        ``<slide_id>.zarr`` directory written by ``wsi-pipeline tile``, or its object storage URL
        (``s3://bucket/stores/<slide_id>.zarr``, read through zarr's ``FsspecStore``; ``remote`` is True).

    Examples
    --------
    >>> store = TileStore("stores/slide_000.zarr")      # doctest: +SKIP
    >>> tile = store[0]                                  # (T, T, 3) uint8
    >>> batch = store.read([3, 1, 4])                    # (3, T, T, 3)
    >>> for idx, tiles in store.iter_batches(64): ...    # in order
    >>> lazy = store.as_dask()                           # dask array (N, T, T, 3)
    """

    def __init__(self, path: str | Path):
        self.remote = is_url(path)
        self.path = str(path).rstrip("/") if self.remote else Path(path)
        if not self._exists():
            raise StoreError(f"{self.path}: no tile store here; run 'wsi-pipeline tile' first")
        try:
            self._group = self._open_group()
        except Exception as exc:
            raise StoreError(f"{self.path}: not a readable Zarr group ({exc}); re-run 'wsi-pipeline tile'") from None
        attrs = dict(self._group.attrs)
        if attrs.get("format") != FORMAT_NAME:
            raise StoreError(f"{self.path}: not a wsi-pipeline tile store (no '{FORMAT_NAME}' format attribute)")
        version = attrs.get("format_version")
        if version not in READABLE_VERSIONS:
            raise StoreError(
                f"{self.path}: tile store format version {version}, this software reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}; re-tile the slide with 'wsi-pipeline tile' (it replaces the store)"
            )
        if not attrs.get("complete"):
            raise StoreError(f"{self.path}: the store is incomplete (its tiling did not finish); re-run 'wsi-pipeline tile'")
        self.attrs = attrs
        # A missing or truncated file would read as tiles (or coordinates) of the fill value.
        problems = [x for x in verify_store(self.path, attrs) if x != NO_RECORD]
        if problems:
            raise StoreError(describe_damage(self.path, problems, self._slide_id_or_none()))
        try:
            self._tiles = self._group["tiles"]
            self.coords = np.asarray(self._group["coords"][:], np.int64).reshape(-1, 2)
            self.grid_colrow = np.asarray(self._group["grid_colrow"][:], np.int64).reshape(-1, 2)
            self.tissue_fraction = np.asarray(self._group["tissue_fraction"][:], np.float32)
        except Exception as exc:
            raise self._damaged("its per-tile arrays", exc) from None

    def _exists(self) -> bool:
        if not self.remote:
            return self.path.exists()
        from wsi.remote_store import store_exists

        return store_exists(self.path)

    def _open_group(self):
        if not self.remote:
            return zarr.open_group(str(self.path), mode="r")
        from wsi.remote_store import open_group

        return open_group(self.path)

    def _slide_id_or_none(self) -> str | None:
        return (self.attrs.get("slide") or {}).get("slide_id")

    def _damaged(self, what: str, exc: BaseException) -> StoreError:
        """One line for data that cannot be read or decoded: the store, its slide, what, why, the fix."""
        if isinstance(exc, StoreError):
            return exc
        why = (str(exc).strip().splitlines() or [""])[0][:200]
        return StoreError(describe_damage(self.path, [f"{what} could not be read ({type(exc).__name__}: {why})"],
                                          self._slide_id_or_none()))

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
            return self._get(i, f"tile {i}")
        if isinstance(index, slice):
            return self._get(index, f"tiles {index.start}:{index.stop}")
        return self.read(index)

    def _get(self, selection, what: str) -> np.ndarray:
        try:
            return np.asarray(self._tiles[selection])
        except Exception as exc:
            raise self._damaged(what, exc) from None

    def read(self, indices) -> np.ndarray:
        """Tiles at ``indices`` (any order, repeats allowed) as (n, T, T, 3) uint8."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            return np.empty((0, self.tile_px, self.tile_px, 3), np.uint8)
        if idx.min() < 0 or idx.max() >= len(self):
            raise IndexError(f"tile indices out of range for {len(self)} tiles")
        uniq, inverse = np.unique(idx, return_inverse=True)
        # One slice per run of consecutive indices: zarr 3.1's integer-array
        # selection on a sharded array takes seconds per batch (it is slow
        # per chunk), while a slice reads each shard once.
        breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
        runs = np.split(uniq, breaks)
        parts = [self._get(slice(int(r[0]), int(r[-1]) + 1), f"tiles {int(r[0])}..{int(r[-1])}") for r in runs]
        data = parts[0] if len(parts) == 1 else np.concatenate(parts)
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


class FastTileReader:
    """Reads single tiles of a local JPEG tile store straight from their files.

    A tile store keeps one tile per chunk, each chunk one baseline JPEG (see
    :mod:`wsi.codecs`), in chunk files or shard files; reading the bytes
    (:class:`RawChunks`) and decoding them directly skips Zarr's per-call
    machinery, which costs more than the decode for small tiles. Any other
    layout (zstd codec, several tiles per chunk) falls back to
    ``TileStore[i]``. Pixels are identical either way.

    Examples
    --------
    >>> reader = FastTileReader(TileStore("stores/slide_000.zarr"))  # doctest: +SKIP
    >>> tile = reader[0]                                              # same pixels as store[0]
    """

    def __init__(self, store: TileStore):
        self.store = store
        self.T = store.tile_px
        if getattr(store, "remote", False):  # object storage: read through zarr (FsspecStore)
            self.fast = False
            return
        arr = zarr.open_array(str(Path(store.path) / "tiles"), mode="r")
        meta = arr.metadata
        self._raw = RawChunks(Path(store.path) / "tiles", meta)
        self.fast = (
            self._raw.supported
            and len(self._raw.codecs) == 1
            and is_jpeg_codec(self._raw.codecs[0])
            and tuple(meta.shape[1:]) == (self.T, self.T, 3)
        )

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> np.ndarray:
        if not self.fast:
            return self.store[int(i)]
        i = int(i)
        try:
            try:
                data = self._raw.read(i)
            except StoreError:
                raise self.store._damaged(f"tile {i}", ValueError("its shard index does not match its checksum")) from None
            if data is None:  # a complete store has every tile: its file went missing
                raise StoreError(describe_damage(self.store.path, [f"tile {i} is missing"], self.store._slide_id_or_none()))
            img = np.asarray(imagecodecs.jpeg8_decode(data))
            return img.reshape(self.T, self.T, 3)
        except (IndexError, StoreError):
            raise
        except Exception as exc:  # undecodable bytes, a truncated file
            raise self.store._damaged(f"tile {i}", exc) from None


def list_stores(store_dir: str | Path) -> list[Path]:
    """Complete-looking stores in a folder (temporary and hidden names excluded), sorted; URL strings for a
    folder on object storage."""
    if is_url(store_dir):
        from wsi.remote_store import list_stores as remote_list

        return remote_list(str(store_dir))
    d = Path(store_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob(f"*{STORE_SUFFIX}") if p.is_dir() and not p.name.startswith("."))


def store_fingerprint(store) -> str:
    """Identity of a store's content: tiling hash, source file fingerprint, creation and tile count.

    A re-tiled or replaced store gets a new one (its creation time changes), so a run or a classify
    result can tell that the data it read is no longer there."""
    a = store.attrs
    key = {
        "config_hash": a.get("config_hash"),
        "slide_fingerprint": (a.get("slide") or {}).get("fingerprint"),
        "slide_size": (a.get("slide") or {}).get("size_bytes"),
        "created_utc": a.get("created_utc"),
        "finished_utc": a.get("finished_utc"),
        "n_tiles": len(store),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


#: The stores folder's reader/writer lock file (``flock``; the kernel drops it when a process dies).
STORES_LOCK = ".wsi-pipeline.stores-lock"
#: What ``flock`` raises on a file system that does not support it (some NFS and Lustre mounts).
FLOCK_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS)
_told_no_flock: set[str] = set()


def _no_flock(store_dir, why: str = "the file system does not support flock", level: int = logging.WARNING) -> None:
    """Say once per folder that its stores are read without the reader/writer lock."""
    if str(store_dir) not in _told_no_flock:
        _told_no_flock.add(str(store_dir))
        logging.getLogger("wsi_pipeline").log(level,
            "%s: %s, so a tile run may swap a store while em-round or classify "
            "reads it; run tile when nothing reads the stores", store_dir, why)


@contextmanager
def stores_lock(store_dir: str | Path, *, exclusive: bool, on_wait=None) -> Iterator[bool]:
    """Readers of a stores folder (``em-round``, ``classify`` on stores) hold this shared for as long as
    they read; ``tile`` holds it exclusively only around each store swap. So a cron ``tile`` that would
    replace a store under a training run waits for the run instead of changing its data midway.

    Blocks until the lock is granted (``on_wait()`` is called once first when it has to wait). Yields
    whether a lock is held: a folder this process cannot write to (read-only shares: no writer there
    either) or a file system without ``flock`` gets none.
    """
    import fcntl

    if is_url(store_dir):  # object storage has no locks: see docs/design.md, "Object storage"
        _no_flock(store_dir, "object storage has no locks", logging.INFO)
        yield False
        return
    path = Path(store_dir) / STORES_LOCK
    try:
        fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield False
        return
    op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    try:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, op)
        except OSError as exc:
            if exc.errno not in FLOCK_UNSUPPORTED:
                raise
            _no_flock(store_dir)
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
