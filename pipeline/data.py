"""Tiles and targets for training and inference: torch Datasets over the Zarr tile stores.

Everything here is lazy: a dataset holds store *paths* and small index arrays;
each process (the main one or a DataLoader worker) opens the stores it needs
on first use (:class:`StoreCache`) and reads one tile per item. Pixel targets
are made per item too:

* annotated tiles: the slide's GeoJSON polygons or mask image rasterised
  onto the tile (:class:`wsi.annotations.SlideAnnotation`, the paper's ``y_p``);
* pseudo-positive tiles: ``clip(V * p, 0, 1)`` (values < floor -> 0) of the
  tile's E-step probability map, read from the round's ``probmaps.zarr`` and
  upsampled bilinearly to the tile size;
* hard negatives: all zeros; image-level MIL tiles: the slide label everywhere.

Geometric augmentation (flips, 90 degree rotations) is applied here, to tile
and target alike, in numpy, and so is the optional stain jitter
(:class:`pipeline.stain.HEDJitter`, scikit-image); colour jitter runs batched on
the training device (:class:`pipeline.trainers.ColorJitter`). Each item's augmentation is drawn
from its own seed, which the batch sampler hands in with the index
(``dataset[(index, seed)]``), so results do not depend on the number of
loader workers and a resumed epoch repeats exactly.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.batch import UsageError
from pipeline.pseudolabels import PseudoTargets
from pipeline.stain import HEDJitter
from wsi.annotations import (
    AnnotationError,
    SlideAnnotation,
    annotation_files,
    load_slide_annotation,
    match_annotation_files,
)
from wsi.store import FastTileReader, TileStore

log = logging.getLogger("wsi_pipeline")

__all__ = [
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

PixelAnnotation = SlideAnnotation
"""One slide's pixel annotation (:class:`wsi.annotations.SlideAnnotation`; the name training code uses)."""


def load_pixel_annotations(
    paths: Sequence[str | Path],
    slides: dict,
    *,
    positive_classes: Sequence[str] = ("Tumor", "Tumour"),
    region_classes: Sequence[str] = ("Region*",),
    mask_downsample: float | None = None,
) -> dict[str, SlideAnnotation]:
    """Read annotation files and check them against the labelled slides.

    Which file belongs to which slide, and how it is read, is :mod:`wsi.annotations`'
    rule (the same as ``evaluate``'s): GeoJSON ``<slide_id>.geojson`` (or ``.json``), level-0
    pixel coordinates as QuPath exports them; mask images ``<slide_id>[_mask|-mask|_lesion_mask|...].png``
    (or ``.tif``), non-zero = positive, at a downsample given by a ``<mask>.json`` sidecar
    (``{"downsample": 16}``), ``mask_downsample``, or the slide width / mask width. A slide with
    several files uses its GeoJSON (else its first mask) and the log names the others.

    Parameters
    ----------
    paths : sequence of paths
        Files or folders.
    slides : dict
        ``slide_id -> SlideEntry`` of the labelled slides (:mod:`pipeline.labels`).
    positive_classes, region_classes : sequence of str
        ``em.positive_classes`` and ``em.annotated_region_classes`` (see :func:`wsi.annotations.load_slide_annotation`).

    Raises
    ------
    UsageError
        An annotation for a slide that is not labelled, for a negative slide, outside
        its slide, or without any region of ``positive_classes``; each message names the file.
    """
    try:
        files = annotation_files(paths)
    except AnnotationError as exc:
        raise UsageError(str(exc)) from None
    by_slide, unmatched = match_annotation_files(files, slides)
    problems = [
        f"{f}: no labelled slide {f.stem!r}; annotation files must be named after a slide id of the "
        "labels CSV (<slide_id>.geojson or <slide_id>_mask.png)"
        for f in unmatched
    ]
    out: dict[str, SlideAnnotation] = {}
    for sid, fs in by_slide.items():
        f = fs[0]
        if len(fs) > 1:
            log.info("slide %s: annotation %s used; not used: %s", sid, f.name, ", ".join(x.name for x in fs[1:]))
        entry = slides[sid]
        if entry.label != 1:
            problems.append(f"{f}: slide {sid!r} is labelled negative (0) but has a tumour annotation; fix the label or drop the file")
            continue
        slide = TileStore(entry.store_path).attrs.get("slide", {})
        wh = (int(slide.get("width", 0)) or None, int(slide.get("height", 0)) or None)
        try:
            out[sid] = load_slide_annotation(f, sid, positive_classes=positive_classes, region_classes=region_classes,
                                             slide_dimensions=wh, mask_downsample=mask_downsample)
        except AnnotationError as exc:
            problems.append(f"{exc}{_annotation_hint(str(exc), positive_classes)}")
    if problems:
        head = "; ".join(problems[:6]) + (f"; ... and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise UsageError(f"annotations: {head}")
    if out:
        partial = sum(not a.complete for a in out.values())
        log.log(logging.INFO if partial else logging.DEBUG,"annotations: %d slide(s) annotated only inside their regions (%s), %d whole slide (no region feature)",
                 partial, ", ".join(region_classes) or "no region classes", len(out) - partial)
    return out


def _annotation_hint(msg: str, positive_classes: Sequence[str]) -> str:
    """The config setting that fixes an annotation error, where there is one."""
    if "no positive annotation" in msg:
        example = ", ".join([*positive_classes, "<lesion class>"])
        return (f" (the positive classes are the config's em.positive_classes={list(positive_classes)}: "
                f'add a class with --set "em.positive_classes=[{example}]" or in the --config file)')
    if "downsample" in msg:
        return " (or set em.mask_downsample)"
    return ""


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
    pseudo : PseudoTargets, optional
        The E-step's target rule and the previous round's ``probmaps.zarr``
        (``SOURCE_PSEUDO`` items read ``<probmaps>/<slide_id>/maps[tile]``);
        ``slide_ids`` names the groups.
    stain : HEDJitter, optional
        Stain jitter of the image, drawn from the item's seed (None: off).
    """

    def __init__(
        self,
        store_paths: Sequence[str | Path],
        items: TileItems,
        *,
        slide_ids: Sequence[str] | None = None,
        annotations: dict[int, PixelAnnotation] | None = None,
        pseudo: PseudoTargets | None = None,
        flip: bool = True,
        rotate90: bool = True,
        stain: HEDJitter | None = None,
    ):
        self.store_paths = [str(p) for p in store_paths]
        self.items = items
        self.stain = stain
        self.slide_ids = list(slide_ids) if slide_ids is not None else None
        self.annotations = annotations or {}
        self.pseudo = pseudo
        self.flip, self.rotate90 = bool(flip), bool(rotate90)
        self.cache = StoreCache()
        if (items.source == SOURCE_PSEUDO).any() and (pseudo is None or pseudo.probmaps is None or self.slide_ids is None):
            raise ValueError("pseudo-positive items need the E-step's PseudoTargets (with probmaps) and slide_ids")

    def __len__(self) -> int:
        return len(self.items)

    def target(self, i: int, store: TileStore) -> np.ndarray:
        it = self.items
        s, t, src = int(it.slide[i]), int(it.tile[i]), int(it.source[i])
        T = store.tile_px
        if src == SOURCE_ANNOTATED:
            y, w = self.annotations[s].tile_labels(store.coords[t], T, store.downsample)
            y = y.astype(np.float32)
            y[w == 0] = np.nan  # unlabelled (outside the annotated regions): no loss there
            return y
        if src == SOURCE_PSEUDO:
            y = self.pseudo.positive(self.cache.array(self.pseudo.probmaps, f"{self.slide_ids[s]}/maps")[t])
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
        if self.stain is not None:
            tile = self.stain(tile, seed)
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
    ``dataset[(i, seed)]`` augments each tile (flips, rotations, ``stain`` jitter) with its own
    seed derived from ``seed``.
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
        stain: HEDJitter | None = None,
    ):
        if not (len(store_paths) == len(topk) == len(labels)):
            raise ValueError("store_paths, topk and labels differ in length")
        self.store_paths = [str(p) for p in store_paths]
        self.topk = [np.asarray(t, np.int64) for t in topk]
        self.labels = np.asarray(labels, np.float32)
        self.k = int(k)
        self.flip, self.rotate90 = flip, rotate90
        self.stain = stain
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
            tile = reader[int(t)]
            if self.stain is not None:
                tile = self.stain(tile, seeds[j])
            tiles[j] = augment_geometric(seeds[j], (tile,), flip=self.flip, rotate90=self.rotate90)[0]
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


class PositionedDataset(Dataset):
    """A dataset read with keys ``(index, seed, pos, size)`` (:class:`pipeline.distributed.ShardedBatches`):
    its item for ``(index, seed)`` plus ``pos`` (the item's place in the global batch, -1 for the
    stand-in of an empty slice) and ``total`` (the global batch's size)."""

    def __init__(self, inner: Dataset):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, key):
        index, seed, pos, total = key
        return {**self.inner[(index, seed)], "pos": int(pos), "total": int(total)}


def make_loader(dataset, batch_sampler, *, loader_workers: int, device, dist=None) -> "torch.utils.data.DataLoader":
    """The training DataLoader: ``loader_workers`` seeded worker processes (0 = in this process),
    this module's collate, pinned memory on CUDA. Under torchrun (``dist.world > 1``) it loads only
    this rank's slice of every global batch, each item with its position (:class:`PositionedDataset`)."""
    from torch.utils.data import DataLoader

    import models

    if dist is not None and dist.enabled:
        from pipeline.distributed import ShardedBatches

        dataset, batch_sampler = PositionedDataset(dataset), ShardedBatches(batch_sampler, dist.rank, dist.world)
    w = int(loader_workers)
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=w,
        collate_fn=collate,
        worker_init_fn=models.seed_worker if w else None,
        pin_memory=torch.device(device).type == "cuda",
        prefetch_factor=4 if w else None,
    )
