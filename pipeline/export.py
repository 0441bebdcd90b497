"""``wsi-pipeline export``: tile stores in the formats other tools read.

Three formats, each written per slide under ``OUT/<format>/`` (a file or folder
built under a temporary name and renamed when complete, replacing an older one):

``h5``
    ``h5/<slide_id>.h5`` in the CLAM / TRIDENT patch layout: dataset ``coords``
    (N, 2) int64, the level-0 (x, y) of each tile's top-left corner in store
    order, with attributes ``patch_level`` (the pyramid level the tiles were
    read from) and ``patch_size`` (the side read at that level), so their
    feature extractors read the same regions with ``read_region(xy,
    patch_level, (patch_size, patch_size))`` (resized to ``tile_px`` when the
    tiling resized, ``scale != 1``). Also ``patch_size_level0``, ``tile_px``,
    ``mpp`` (of the tiles), ``downsample``, ``level_dim`` and ``name``.
    Needs h5py (``pip install 'wsi-pipeline[export]'``).
``imagefolder``
    ``imagefolder/<class>/<slide_id>/<slide_id>_<x>_<y>.<ext>`` for
    ``torchvision.datasets.ImageFolder`` (which searches class folders
    recursively). The class is the slide's label from ``--labels`` (``0`` /
    ``1``) or ``unlabelled``.
``webdataset``
    ``webdataset/<slide_id>.tar``, one WebDataset shard per slide: per tile the
    members ``<slide_id>/<index>.<ext>`` and ``<slide_id>/<index>.json``
    (slide id, index, level-0 x/y, tile mpp, label) and ``.cls`` when labelled.

Tile images: a JPEG store's tiles are its own JPEG streams, copied byte for byte
(no second lossy encoding); a zstd store's tiles are written as lossless PNG.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import zarr

from pipeline.batch import UsageError
from wsi.atomic import atomic_path
from wsi.store import RawChunks, StoreError, TileStore, is_jpeg_codec, list_stores, replace_dir

log = logging.getLogger("wsi_pipeline")

FORMATS = ("h5", "imagefolder", "webdataset")
UNLABELLED = "unlabelled"


def resolve_stores(stores: str | Path) -> list[Path]:
    """One store (``<slide_id>.zarr``) or a folder of stores, or :class:`UsageError`."""
    stores = Path(stores)
    if (stores / "zarr.json").is_file():
        return [stores]
    found = list_stores(stores)
    if not found:
        raise UsageError(f"{stores}: no tile stores here; give a store folder (the --out of 'wsi-pipeline tile') or one <slide_id>.zarr")
    return found


def iter_tile_images(store: TileStore) -> Iterator[tuple[int, bytes, str]]:
    """``(index, encoded image, extension)`` of every tile: a JPEG store's own bytes, else PNG."""
    arr = zarr.open_array(str(store.path / "tiles"), mode="r")
    raw = RawChunks(store.path / "tiles", arr.metadata)
    if raw.supported and len(raw.codecs) == 1 and is_jpeg_codec(raw.codecs[0]):
        for i in range(len(store)):
            data = raw.read(i)
            if data is None:  # never written: zarr's fill value, encoded like any tile
                data = bytes(cv2.imencode(".jpg", store[i][..., ::-1])[1])
            yield i, data, "jpg"
        return
    for idx, tiles in store.iter_batches(64):
        for i, tile in zip(idx, tiles):
            ok, png = cv2.imencode(".png", np.ascontiguousarray(tile[..., ::-1]))
            yield int(i), bytes(png), "png"


def _tile_name(store: TileStore, i: int) -> str:
    x, y = store.coords[i]
    return f"{store.slide_id}_{int(x)}_{int(y)}"


# --------------------------------------------------------------------------- formats


def h5_attributes(store: TileStore) -> dict:
    """The ``coords`` attributes of a CLAM / TRIDENT patch file for this store."""
    t, s = store.attrs["tiling"], store.attrs["slide"]
    level = int(t["level"])
    return {
        "patch_level": level,
        "patch_size": int(max(1, round(store.tile_px * float(t["scale"])))),
        "patch_size_level0": int(round(store.tile_px * store.downsample)),
        "tile_px": store.tile_px,
        "mpp": store.mpp,
        "downsample": store.downsample,
        "level_dim": [int(v) for v in s["level_dimensions"][level]],
        "name": store.slide_id,
    }


def write_h5(store: TileStore, path: Path) -> Path:
    try:
        import h5py
    except ModuleNotFoundError:
        raise UsageError("export --format h5 needs h5py: pip install 'wsi-pipeline[export]'") from None
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset("coords", data=np.asarray(store.coords, np.int64))
            for k, v in h5_attributes(store).items():
                ds.attrs[k] = v
    return path


def write_imagefolder(store: TileStore, folder: Path, label: str) -> Path:
    dest = folder / label / store.slide_id
    for other in folder.glob(f"*/{store.slide_id}"):  # the slide's label changed since the last export
        if other != dest and other.is_dir():
            shutil.rmtree(other)
    tmp = dest.with_name(f".tmp-{store.slide_id}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        for i, data, ext in iter_tile_images(store):
            (tmp / f"{_tile_name(store, i)}.{ext}").write_bytes(data)
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(store: TileStore, path: Path, label: int | None) -> Path:
    now = time.time()
    with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
        for i, data, ext in iter_tile_images(store):
            key = f"{store.slide_id}/{i:07d}"
            x, y = (int(v) for v in store.coords[i])
            meta = {"slide_id": store.slide_id, "index": i, "x": x, "y": y, "mpp": store.mpp, "label": label}
            _add(tar, f"{key}.{ext}", data, now)
            _add(tar, f"{key}.json", json.dumps(meta).encode(), now)
            if label is not None:
                _add(tar, f"{key}.cls", str(label).encode(), now)
    return path


# --------------------------------------------------------------------------- command


@dataclass
class ExportResult:
    slides: int
    tiles: int
    written: dict[str, list[str]]


def run_export(stores: str | Path, out_dir: str | Path, formats: list[str], *, labels_csv: str | Path | None = None) -> ExportResult:
    """Export every store of ``stores`` in each of ``formats`` under ``out_dir``."""
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UsageError(f"export formats must be among {', '.join(FORMATS)}, got {', '.join(bad) or 'none'}")
    labels: dict[str, int] = {}
    if labels_csv is not None:
        from pipeline.labels import read_labels_csv

        labels = {sid: lab for sid, lab, _ in read_labels_csv(labels_csv)}
    paths = resolve_stores(stores)
    out = Path(out_dir)
    written: dict[str, list[str]] = {f: [] for f in formats}
    n_tiles = 0
    for p in paths:
        try:
            store = TileStore(p)
        except StoreError as exc:
            raise UsageError(str(exc)) from None
        label = labels.get(store.slide_id)
        for fmt in dict.fromkeys(formats):
            if fmt == "h5":
                dest = write_h5(store, out / "h5" / f"{store.slide_id}.h5")
            elif fmt == "imagefolder":
                dest = write_imagefolder(store, out / "imagefolder", UNLABELLED if label is None else str(label))
            else:
                dest = write_webdataset(store, out / "webdataset" / f"{store.slide_id}.tar", label)
            written[fmt].append(str(dest))
        n_tiles += len(store)
        log.info("exported %s (%d tiles)", store.slide_id, len(store))
    return ExportResult(slides=len(paths), tiles=n_tiles, written=written)
