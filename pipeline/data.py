"""Tiles and targets for training and inference: torch Datasets over the Zarr tile stores.

Everything here is lazy: a dataset holds store *paths* and small index arrays;
each process (the main one or a DataLoader worker) opens the stores it needs
on first use (:class:`StoreCache`) and reads one tile per item. Pixel targets
are made per item too:

* annotated tiles: the slide's GeoJSON polygons and/or mask image rasterised
  onto the tile (:class:`PixelAnnotation`, the paper's ``y_p``);
* pseudo-positive tiles: ``clip(V * p, 0, 1)`` (values < floor -> 0) of the
  tile's E-step probability map, read from the round's ``probmaps.zarr`` and
  upsampled bilinearly to the tile size;
* hard negatives: all zeros; image-level MIL tiles: the slide label everywhere.

Geometric augmentation (flips, 90 degree rotations) is applied here, to tile
and target alike, in numpy; colour jitter runs batched on the training device
(:class:`pipeline.trainers.ColorJitter`). Each item's augmentation is drawn
from its own seed, which the batch sampler hands in with the index
(``dataset[(index, seed)]``), so results do not depend on the number of
loader workers and a resumed epoch repeats exactly.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.batch import UsageError
from pipeline.pseudolabels import positive_pseudo_labels
from wsi.annotations import AnnotationError, Annotations, load_geojson, rasterize_mask, rasterize_tile
from wsi.store import FastTileReader, TileStore

log = logging.getLogger("wsi_pipeline")

__all__ = [
    "FastTileReader",
    "StoreCache",
    "PixelAnnotation",
    "load_pixel_annotations",
    "TileItems",
    "SOURCE_ANNOTATED",
    "SOURCE_PSEUDO",
    "SOURCE_NEGATIVE",
    "SOURCE_CONSTANT",
    "TileTargetDataset",
    "StoreTilesDataset",
    "SlideTopKDataset",
    "SeededBatches",
    "item_seeds",
    "augment_geometric",
]

SOURCE_ANNOTATED, SOURCE_PSEUDO, SOURCE_NEGATIVE, SOURCE_CONSTANT = 0, 1, 2, 3

GEOJSON_SUFFIXES = (".geojson", ".json")
MASK_SUFFIXES = (".png", ".tif", ".tiff")
MASK_NAME_SUFFIXES = ("_lesion_mask", "_mask", ".mask", "-mask", "_labels", "-labels")


# --------------------------------------------------------------------------- lazy stores


class StoreCache:
    """Opens each tile store (and probability-map Zarr) once per process.

    Safe across ``fork``: a worker that inherits a filled cache from its parent
    starts afresh (open Zarr handles are not shared between processes).
    """

    def __init__(self):
        self._pid = os.getpid()
        self._stores: dict[str, TileStore] = {}
        self._arrays: dict[tuple[str, str], object] = {}

    def _check_pid(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._stores, self._arrays = {}, {}

    def store(self, path: str | Path) -> TileStore:
        self._check_pid()
        key = str(path)
        st = self._stores.get(key)
        if st is None:
            st = self._stores[key] = TileStore(key)
        return st

    def tiles(self, path: str | Path) -> FastTileReader:
        """Fast single-tile reader of the store at ``path`` (see :class:`FastTileReader`)."""
        self._check_pid()
        key = ("tiles", str(path))
        r = self._arrays.get(key)
        if r is None:
            r = self._arrays[key] = FastTileReader(self.store(path))
        return r

    def array(self, root: str | Path, name: str):
        """``zarr.open_array(root/name)``, read-only, cached."""
        self._check_pid()
        key = (str(root), name)
        arr = self._arrays.get(key)
        if arr is None:
            import zarr

            arr = self._arrays[key] = zarr.open_array(str(Path(root) / name), mode="r")
        return arr

    def __getstate__(self):  # datasets are pickled to spawn-started workers: send no handles
        return {"_pid": -1, "_stores": {}, "_arrays": {}}


# --------------------------------------------------------------------------- annotations


@dataclass
class PixelAnnotation:
    """Positive regions of one slide: GeoJSON polygons and/or a mask image (union of both)."""

    slide_id: str
    sources: list[str] = field(default_factory=list)
    geo: Annotations | None = None
    mask: np.ndarray | None = None
    mask_downsample: float | None = None

    def tile_target(self, level0_xy, tile_px: int, downsample: float, out_px: int | None = None) -> np.ndarray:
        """(out_px, out_px) uint8, 1 = positive (see :mod:`wsi.annotations` for the pixel rule)."""
        n = tile_px if out_px is None else out_px
        out = np.zeros((n, n), np.uint8)
        if self.geo is not None:
            out |= rasterize_tile(self.geo, level0_xy, tile_px, downsample, out_px=n)
        if self.mask is not None:
            out |= rasterize_mask(self.mask, self.mask_downsample, level0_xy, tile_px, downsample, out_px=n)
        return out


def _slide_for_mask(stem: str, known: Iterable[str]) -> str | None:
    known = set(known)
    if stem in known:
        return stem
    for suf in MASK_NAME_SUFFIXES:
        if stem.endswith(suf) and stem[: -len(suf)] in known:
            return stem[: -len(suf)]
    return None


def _expand_annotation_paths(paths: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for f in sorted(p.iterdir()):
                if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in GEOJSON_SUFFIXES + MASK_SUFFIXES:
                    files.append(f)
        elif p.is_file():
            files.append(p)
        else:
            raise UsageError(f"{p}: no such annotation file or folder")
    # a '<mask>.json' next to '<mask>.png' describes the mask; it is not GeoJSON
    images = {f.with_suffix("") for f in files if f.suffix.lower() in MASK_SUFFIXES}
    return [f for f in files if not (f.suffix.lower() == ".json" and f.with_suffix("") in images)]


def _mask_downsample(path: Path, mask: np.ndarray, slide_wh: tuple[int, int], override: float | None) -> float:
    if override is not None:
        return float(override)
    side = path.with_suffix(".json")
    if side.is_file():
        try:
            meta = json.loads(side.read_text())
            return float(meta["downsample"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{side}: expected JSON with a 'downsample' number ({exc}); fix it or set em.mask_downsample") from None
    w, h = slide_wh
    ds_x, ds_y = w / mask.shape[1], h / mask.shape[0]
    if abs(ds_x - ds_y) > max(ds_x, ds_y) / min(mask.shape) * 1.5:
        raise UsageError(
            f"{path}: mask of {mask.shape[1]}x{mask.shape[0]} px does not have the slide's aspect "
            f"({w}x{h} level-0 px); give its downsample in {side.name} ({{\"downsample\": N}}) or em.mask_downsample"
        )
    return float(ds_x)


def load_pixel_annotations(
    paths: Sequence[str | Path],
    slides: dict,
    *,
    positive_classes: Sequence[str] = ("Tumor", "Tumour"),
    mask_downsample: float | None = None,
) -> dict[str, PixelAnnotation]:
    """Read annotation files and check them against the labelled slides.

    Parameters
    ----------
    paths : sequence of paths
        Files or folders. GeoJSON: ``<slide_id>.geojson`` (or ``.json``), level-0 pixel
        coordinates as QuPath exports them. Mask images: ``<slide_id>[_mask|_lesion_mask].png``
        (or ``.tif``), non-zero = positive, at a downsample given by a ``<mask>.json`` sidecar
        (``{"downsample": 16}``), ``mask_downsample``, or the slide width / mask width.
    slides : dict
        ``slide_id -> SlideEntry`` of the labelled slides (:mod:`pipeline.labels`).

    Raises
    ------
    UsageError
        An annotation for a slide that is not labelled, for a negative slide, outside
        its slide, or without any region of ``positive_classes``; each message names the file.
    """
    out: dict[str, PixelAnnotation] = {}
    problems: list[str] = []
    for f in _expand_annotation_paths(paths):
        suffix = f.suffix.lower()
        sid = f.stem if suffix in GEOJSON_SUFFIXES else _slide_for_mask(f.stem, slides)
        entry = slides.get(sid) if sid else None
        if entry is None:
            problems.append(
                f"{f}: no labelled slide {sid or f.stem!r}; annotation files must be named after a slide id of the "
                "labels CSV (<slide_id>.geojson or <slide_id>_mask.png)"
            )
            continue
        if entry.label != 1:
            problems.append(f"{f}: slide {sid!r} is labelled negative (0) but has a tumour annotation; fix the label or drop the file")
            continue
        st = TileStore(entry.store_path)
        slide = st.attrs.get("slide", {})
        wh = (int(slide.get("width", 0)), int(slide.get("height", 0)))
        ann = out.setdefault(sid, PixelAnnotation(sid))
        try:
            if suffix in GEOJSON_SUFFIXES:
                ann.geo = load_geojson(f, positive_classes=positive_classes, slide_dimensions=wh if all(wh) else None)
            else:
                mask = _read_mask(f)
                ds = _mask_downsample(f, mask, wh, mask_downsample)
                if all(wh) and (mask.shape[1] * ds > wh[0] + 2 * ds or mask.shape[0] * ds > wh[1] + 2 * ds):
                    raise UsageError(
                        f"{f}: the mask covers {mask.shape[1] * ds:.0f}x{mask.shape[0] * ds:.0f} level-0 px at "
                        f"downsample {ds:g}, larger than the slide ({wh[0]}x{wh[1]}): wrong downsample or wrong slide"
                    )
                if not mask.any():
                    raise UsageError(f"{f}: the mask has no positive (non-zero) pixel")
                ann.mask, ann.mask_downsample = mask, ds
            ann.sources.append(str(f))
        except AnnotationError as exc:
            hint = "" if "outside" in str(exc) else f" (em.positive_classes={list(positive_classes)})"
            problems.append(f"{exc}{hint}")
        except UsageError as exc:
            problems.append(str(exc))
    if problems:
        head = "; ".join(problems[:6]) + (f"; ... and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise UsageError(f"annotations: {head}")
    return {k: v for k, v in out.items() if v.sources}


def _read_mask(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise UsageError(f"{path}: cannot read the mask image (PNG or TIFF expected)")
    if img.ndim == 3:
        img = img[..., :3].max(axis=2) if img.shape[2] >= 3 else img[..., 0]
    return (img != 0).astype(np.uint8)


# --------------------------------------------------------------------------- augmentation


def item_seeds(*key: int, n: int) -> np.ndarray:
    """``n`` reproducible 32-bit seeds derived from integer ``key`` (e.g. seed, round, epoch, batch)."""
    return np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(n, dtype=np.uint32)


def augment_geometric(seed: int | None, arrays: Sequence[np.ndarray], *, flip: bool, rotate90: bool) -> list[np.ndarray]:
    """Apply the same random flips / 90 degree rotation to each (H, W[, C]) array."""
    if seed is None or not (flip or rotate90):
        return list(arrays)
    rng = np.random.default_rng(int(seed))
    k = int(rng.integers(4)) if rotate90 else 0
    fh = bool(rng.integers(2)) if flip else False
    fv = bool(rng.integers(2)) if flip else False
    out = []
    for a in arrays:
        if k:
            a = np.rot90(a, k, axes=(0, 1))
        if fh:
            a = a[:, ::-1]
        if fv:
            a = a[::-1]
        out.append(np.ascontiguousarray(a))
    return out


def _split_key(key) -> tuple[int, int | None]:
    if isinstance(key, (tuple, list)):
        return int(key[0]), (None if key[1] is None else int(key[1]))
    return int(key), None


# --------------------------------------------------------------------------- datasets


@dataclass
class TileItems:
    """Which tiles a training set holds: parallel int arrays, one entry per item.

    ``slide`` indexes ``store_paths``; ``tile`` is the tile index in that store;
    ``source`` is one of ``SOURCE_*``; ``value`` is the constant target of
    ``SOURCE_CONSTANT`` items (0 or 1).
    """

    slide: np.ndarray
    tile: np.ndarray
    source: np.ndarray
    value: np.ndarray

    @classmethod
    def make(cls, slide, tile, source, value=0.0) -> "TileItems":
        tile = np.asarray(tile, np.int64).reshape(-1)
        n = len(tile)
        return cls(
            np.broadcast_to(np.asarray(slide, np.int64), (n,)).copy(),
            tile,
            np.broadcast_to(np.asarray(source, np.int64), (n,)).copy(),
            np.broadcast_to(np.asarray(value, np.float32), (n,)).copy(),
        )

    @classmethod
    def concat(cls, parts: Sequence["TileItems"]) -> "TileItems":
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.make(0, [], SOURCE_NEGATIVE)
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("slide", "tile", "source", "value")))

    def __len__(self) -> int:
        return int(len(self.tile))


class TileTargetDataset(Dataset):
    """Tiles with per-pixel targets for training theta1 (all sources in one index space).

    Items are ``dataset[i]`` or ``dataset[(i, seed)]`` (seed: augmentation; None = none) and give
    ``{"image": (T, T, 3) uint8, "target": (T, T) float16, "source": int}``.

    Parameters
    ----------
    store_paths : list of str
        Tile stores; ``items.slide`` indexes this list.
    items : TileItems
    annotations : dict, optional
        ``slide index -> PixelAnnotation`` for ``SOURCE_ANNOTATED`` items.
    probmaps : path, optional
        ``probmaps.zarr`` of the previous round (``SOURCE_PSEUDO`` items read
        ``<probmaps>/<slide_id>/maps[tile]``); ``slide_ids`` names the groups.
    """

    def __init__(
        self,
        store_paths: Sequence[str | Path],
        items: TileItems,
        *,
        slide_ids: Sequence[str] | None = None,
        annotations: dict[int, PixelAnnotation] | None = None,
        probmaps: str | Path | None = None,
        V: float = 4.0,
        floor: float = 0.01,
        flip: bool = True,
        rotate90: bool = True,
    ):
        self.store_paths = [str(p) for p in store_paths]
        self.items = items
        self.slide_ids = list(slide_ids) if slide_ids is not None else None
        self.annotations = annotations or {}
        self.probmaps = None if probmaps is None else str(probmaps)
        self.V, self.floor = float(V), float(floor)
        self.flip, self.rotate90 = bool(flip), bool(rotate90)
        self.cache = StoreCache()
        if (items.source == SOURCE_PSEUDO).any() and (self.probmaps is None or self.slide_ids is None):
            raise ValueError("pseudo-positive items need probmaps and slide_ids")

    def __len__(self) -> int:
        return len(self.items)

    def target(self, i: int, store: TileStore) -> np.ndarray:
        it = self.items
        s, t, src = int(it.slide[i]), int(it.tile[i]), int(it.source[i])
        T = store.tile_px
        if src == SOURCE_ANNOTATED:
            ann = self.annotations[s]
            return ann.tile_target(store.coords[t], T, store.downsample).astype(np.float32)
        if src == SOURCE_PSEUDO:
            pmap = np.asarray(self.cache.array(self.probmaps, f"{self.slide_ids[s]}/maps")[t], np.float32)
            y = positive_pseudo_labels(pmap[None], V=self.V, floor=self.floor)[0]
            if y.shape != (T, T):
                y = cv2.resize(y, (T, T), interpolation=cv2.INTER_LINEAR)
            return y
        if src == SOURCE_CONSTANT:
            return np.full((T, T), float(it.value[i]), np.float32)
        return np.zeros((T, T), np.float32)

    def __getitem__(self, key):
        i, seed = _split_key(key)
        path = self.store_paths[int(self.items.slide[i])]
        store = self.cache.store(path)
        tile = self.cache.tiles(path)[int(self.items.tile[i])]
        target = self.target(i, store)
        tile, target = augment_geometric(seed, (tile, target), flip=self.flip, rotate90=self.rotate90)
        return {"image": tile, "target": target.astype(np.float16), "source": int(self.items.source[i])}


class StoreTilesDataset(Dataset):
    """Plain tiles for inference: item ``k`` is tile ``indices[k]`` of store ``slides[k]``.

    Gives ``{"image": (T, T, 3) uint8, "slide": int, "index": int}``; batches may span slides.
    """

    def __init__(self, store_paths: Sequence[str | Path], slides: np.ndarray, indices: np.ndarray):
        self.store_paths = [str(p) for p in store_paths]
        self.slides = np.asarray(slides, np.int64)
        self.indices = np.asarray(indices, np.int64)
        self.cache = StoreCache()

    def __len__(self) -> int:
        return int(len(self.indices))

    def __getitem__(self, k):
        s, i = int(self.slides[k]), int(self.indices[k])
        return {"image": self.cache.tiles(self.store_paths[s])[i], "slide": s, "index": i}


class SlideTopKDataset(Dataset):
    """Stage 2: one item per slide, its top-K tiles (padded to K) and its label.

    Gives ``{"tiles": (K, T, T, 3) uint8, "mask": (K,) bool, "label": float32, "slide": int}``;
    ``dataset[(i, seed)]`` augments each tile with its own seed derived from ``seed``.
    """

    def __init__(
        self,
        store_paths: Sequence[str | Path],
        topk: Sequence[np.ndarray],
        labels: Sequence[int],
        k: int,
        *,
        flip: bool = True,
        rotate90: bool = True,
    ):
        if not (len(store_paths) == len(topk) == len(labels)):
            raise ValueError("store_paths, topk and labels differ in length")
        self.store_paths = [str(p) for p in store_paths]
        self.topk = [np.asarray(t, np.int64) for t in topk]
        self.labels = np.asarray(labels, np.float32)
        self.k = int(k)
        self.flip, self.rotate90 = flip, rotate90
        self.cache = StoreCache()

    def __len__(self) -> int:
        return len(self.store_paths)

    def __getitem__(self, key):
        i, seed = _split_key(key)
        store = self.cache.store(self.store_paths[i])
        reader = self.cache.tiles(self.store_paths[i])
        idx = self.topk[i][: self.k]
        T = store.tile_px
        tiles = np.full((self.k, T, T, 3), 255, np.uint8)
        mask = np.zeros(self.k, bool)
        seeds = item_seeds(seed, i, n=len(idx)) if seed is not None else [None] * len(idx)
        for j, t in enumerate(idx):
            tiles[j] = augment_geometric(seeds[j], (reader[int(t)],), flip=self.flip, rotate90=self.rotate90)[0]
            mask[j] = True
        return {"tiles": tiles, "mask": mask, "label": self.labels[i], "slide": i}


class SeededBatches:
    """Wrap a batch sampler so each index travels with its augmentation seed.

    ``inner`` yields lists of ints and has ``set_epoch`` (or is re-iterable); this yields
    ``[(index, seed), ...]`` with seeds from ``(base_seed, epoch, batch, position)``, so a
    batch's augmentation depends only on where it sits in the run, not on worker scheduling.
    ``augment=False`` yields ``(index, None)``.
    """

    def __init__(self, inner, base_seed: int, epoch: int, augment: bool = True):
        self.inner, self.base_seed, self.epoch, self.augment = inner, int(base_seed), int(epoch), augment
        if hasattr(inner, "set_epoch"):
            inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        for b, batch in enumerate(self.inner):
            batch = [int(i) for i in batch]
            if not self.augment:
                yield [(i, None) for i in batch]
                continue
            seeds = item_seeds(self.base_seed, self.epoch, b, n=len(batch))
            yield [(i, int(s)) for i, s in zip(batch, seeds)]


def collate(batch: list[dict]) -> dict:
    """Stack numpy fields into tensors (uint8 images stay uint8: 4x less to move to the GPU)."""
    out = {}
    for key in batch[0]:
        vals = [b[key] for b in batch]
        if isinstance(vals[0], np.ndarray):
            out[key] = torch.from_numpy(np.stack(vals))
        else:
            out[key] = torch.as_tensor(np.asarray(vals))
    return out
