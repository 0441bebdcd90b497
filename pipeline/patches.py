"""Patch / ROI classification: ``wsi-pipeline train-patches`` (ScoreNet's and CellMix's own setting).

A multi-class classifier (``model.cls_arch`` with one logit per class) is
trained by a trainer of :mod:`pipeline.trainers` (``patches.trainer``,
default ``soft_ce``) on labelled images, given as either

* an ImageFolder tree ``DIR/train/<class>/*.png|jpg``, ``DIR/val/<class>/...``
  and optionally ``DIR/test/<class>/...`` (classes = the folders of ``train``), or
* a folder of tile stores plus a CSV ``slide_id,tile_index,label[,split]``
  (split ``train`` by default; ``val`` rows are required).

The run directory (one owner of its layout: this module)::

    RUN/run.json            identity: config, classes, data fingerprint, software version
    RUN/state/train.pt      in-progress trainer checkpoint (every epoch; removed when done)
    RUN/model.pt            the trained model (arch, arch_kwargs, classes, weights, config)
    RUN/report/<split>.json accuracy, macro-F1, per-class recall, confusion matrix
    RUN/report/<split>_confusion.png
    RUN/metrics.json        training history and the reports, written last, then DONE
    RUN/predictions.csv     per-image class probabilities of --predict DIR

Re-running the same command resumes from the last epoch (bit-identical on
CPU) or, when DONE, only re-does ``--predict``; another config or other data
in the same ``--run`` stops with one line (use the same settings, a new
``--run`` or ``--force``). Every file is written under a temporary name and
renamed.

Mixers (``model.cls_mix``, issue #12) act inside the trainer's
``compute_loss`` on the ``{"image", "target"}`` batches this module makes:
targets are already distributions over the classes (one-hot rows), so a
mixer's soft labels need no change here.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.batch import RunLock, UsageError, ensure_writable_dir, utc_now
from pipeline.leases import LEASES_DIR
from pipeline.config import Config, ConfigError
from wsi import __version__
from wsi.atomic import atomic_path, atomic_write_json, atomic_write_text

log = logging.getLogger("wsi_pipeline")

__all__ = [
    "IMAGE_EXTENSIONS", "PatchSet", "PatchRun", "list_images", "load_image_folder", "load_store_labels",
    "load_patch_set", "classification_report", "draw_confusion_png", "run_train_patches", "predict_folder",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
RUN_FORMAT = "wsi-pipeline.patch-run"
RUN_FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------- data


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted, hidden names skipped)."""
    return sorted(p for p in Path(folder).rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


@dataclass
class PatchSet:
    """Labelled images: per split, the sources and integer labels; ``classes`` names them.

    A source is an image path (``str``) or ``(store_path, tile_index)``.
    """

    classes: list[str]
    sources: dict[str, list] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    kind: str = "folder"
    root: str = ""

    def fingerprint(self) -> str:
        """Hash of the classes, every source and its label (and an image file's size)."""
        h = hashlib.sha256(json.dumps(self.classes).encode())
        for split in SPLITS:
            for src, y in zip(self.sources.get(split, []), self.labels.get(split, [])):
                if isinstance(src, str):
                    key = f"{split}:{Path(src).relative_to(self.root)}:{Path(src).stat().st_size}:{int(y)}"
                else:
                    key = f"{split}:{Path(src[0]).name}:{int(src[1])}:{int(y)}"
                h.update(key.encode())
        return h.hexdigest()[:16]

    def counts(self) -> dict:
        return {s: {c: int((self.labels[s] == i).sum()) for i, c in enumerate(self.classes)}
                for s in SPLITS if s in self.sources}


def load_image_folder(root: str | Path) -> PatchSet:
    """An ImageFolder tree (see the module docstring); :class:`UsageError` naming what is wrong."""
    root = Path(root)
    fix = f"lay it out as {root}/train/<class>/*.png and {root}/val/<class>/*.png (optional test/)"
    if not root.is_dir():
        raise UsageError(f"{root}: no such folder; {fix}")
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        missing = [s for s in ("train", "val") if not (root / s).is_dir()]
        raise UsageError(f"{root}: no {' or '.join(s + '/' for s in missing)} folder; {fix}")
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise UsageError(f"{root / 'train'}: {len(classes)} class folder(s), need at least 2; {fix}")
    ps = PatchSet(classes=classes, kind="folder", root=str(root))
    for split in SPLITS:
        d = root / split
        if not d.is_dir():
            continue
        stray = sorted(p.name for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if stray:
            raise UsageError(f"{d}: images directly in {split}/ ({stray[0]}, ...); put each in its class folder, {fix}")
        sub = sorted(x.name for x in d.iterdir() if x.is_dir() and not x.name.startswith("."))
        unknown = sorted(set(sub) - set(classes))
        if unknown:
            raise UsageError(f"{d}: class folder(s) {unknown} not in train/ (classes {classes}); rename or add them "
                             "to train/")
        srcs, ys = [], []
        for i, c in enumerate(classes):
            files = list_images(d / c) if (d / c).is_dir() else []
            if split == "train" and not files:
                raise UsageError(f"{d / c}: no images ({', '.join(IMAGE_EXTENSIONS)}); every class needs "
                                 "training images")
            srcs += [str(f) for f in files]
            ys += [i] * len(files)
        if not srcs:
            raise UsageError(f"{d}: no images in any class folder; {fix}")
        ps.sources[split], ps.labels[split] = srcs, np.asarray(ys, np.int64)
    return ps


def load_store_labels(stores: str | Path, labels_csv: str | Path) -> PatchSet:
    """Tile stores and a CSV ``slide_id,tile_index,label[,split]`` (split ``train`` by default)."""
    from wsi.store import TileStore, store_path_for

    stores, labels_csv = Path(stores), Path(labels_csv)
    if not labels_csv.is_file():
        raise UsageError(f"{labels_csv}: tile label CSV not found; give a CSV slide_id,tile_index,label[,split]")
    with open(labels_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    need = {"slide_id", "tile_index", "label"}
    if not rows or not need <= set(rows[0]):
        raise UsageError(f"{labels_csv}: expected a header with columns slide_id,tile_index,label[,split] "
                         f"and at least one row")
    classes = sorted({r["label"].strip() for r in rows})
    if len(classes) < 2:
        raise UsageError(f"{labels_csv}: {len(classes)} distinct label(s), need at least 2 classes")
    ps = PatchSet(classes=classes, kind="stores", root=str(stores))
    sizes: dict[str, int] = {}
    by_split: dict[str, tuple[list, list]] = {}
    for n, r in enumerate(rows, start=2):
        split = (r.get("split") or "train").strip() or "train"
        if split not in SPLITS:
            raise UsageError(f"{labels_csv} line {n}: split {split!r} is not one of {list(SPLITS)}")
        sid = r["slide_id"].strip()
        path = store_path_for(stores, sid)
        if sid not in sizes:
            if not path.is_dir():
                raise UsageError(f"{labels_csv} line {n}: no tile store {path} for slide {sid!r}; tile the slide "
                                 f"into {stores} first")
            sizes[sid] = len(TileStore(path))
        try:
            idx = int(r["tile_index"])
        except ValueError:
            raise UsageError(f"{labels_csv} line {n}: tile_index {r['tile_index']!r} is not an integer") from None
        if not 0 <= idx < sizes[sid]:
            raise UsageError(f"{labels_csv} line {n}: tile_index {idx} outside 0..{sizes[sid] - 1} of {path}")
        srcs, ys = by_split.setdefault(split, ([], []))
        srcs.append((str(path), idx))
        ys.append(classes.index(r["label"].strip()))
    if "train" not in by_split or "val" not in by_split:
        raise UsageError(f"{labels_csv}: needs rows of split train and val (a 'split' column; rows without one are "
                         "train)")
    for split, (srcs, ys) in by_split.items():
        ps.sources[split], ps.labels[split] = srcs, np.asarray(ys, np.int64)
    return ps


def load_patch_set(data: str | Path, labels_csv: str | Path | None = None) -> PatchSet:
    return load_image_folder(data) if labels_csv is None else load_store_labels(data, labels_csv)


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 ``(H, W, 3)`` of an image file (:class:`UsageError` if unreadable)."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise UsageError(f"{path}: not a readable image; remove it or replace it with a PNG/JPEG")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file's header."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as exc:
        raise UsageError(f"{path}: not a readable image ({exc}); remove it or replace it with a PNG/JPEG") from None
    return h, w


def source_size(src) -> tuple[int, int]:
    if isinstance(src, str):
        return image_size(src)
    from wsi.store import TileStore

    t = TileStore(src[0]).tile_px
    return t, t


def check_sizes(ps: PatchSet, image_px: int | None, divisor: int, arch: str) -> int:
    """The side every image is given to the model; one line for images of mixed sizes or a size the
    architecture cannot take."""
    if image_px is None:
        first = None
        for split in SPLITS:
            for src in ps.sources.get(split, []):
                hw = source_size(src)
                if first is None:
                    first = (hw, src)
                elif hw != first[0] or hw[0] != hw[1]:
                    raise UsageError(f"{src if isinstance(src, str) else src[0]}: image of {hw[0]}x{hw[1]} px, "
                                     f"{first[1]} is {first[0][0]}x{first[0][1]}; images must be square and of one "
                                     f"size, or set patches.image_px to resize them all")
                if not isinstance(src, str):
                    break  # every tile of a store has its size
        side = first[0][0]
    else:
        side = int(image_px)
    if side % divisor:
        lo, hi = (side // divisor) * divisor, (side // divisor + 1) * divisor
        raise ConfigError(f"images of {side} px do not suit model.cls_arch={arch!r}, whose input side must be a "
                          f"multiple of {divisor}; set patches.image_px={lo or hi} or {hi}")
    return side


class PatchDataset:
    """``(index, seed)`` -> ``{"image": (S, S, 3) uint8, "target": (C,) float32 one-hot, "index"}``;
    flips / 90 degree rotations from the item's seed (``None``: none)."""

    def __init__(self, sources: Sequence, labels: np.ndarray, n_classes: int, side: int, flip: bool = False,
                 rotate90: bool = False):
        from pipeline.data import StoreCache

        self.sources, self.labels = list(sources), np.asarray(labels)
        self.n_classes, self.side, self.flip, self.rotate90 = int(n_classes), int(side), flip, rotate90
        self.cache = StoreCache()

    def __len__(self) -> int:
        return len(self.sources)

    def image(self, i: int) -> np.ndarray:
        import cv2

        src = self.sources[i]
        img = read_image(src) if isinstance(src, str) else self.cache.tiles(src[0])[int(src[1])]
        if img.shape[0] != self.side or img.shape[1] != self.side:
            img = cv2.resize(img, (self.side, self.side), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(img)

    def __getitem__(self, key):
        from pipeline.data import _split_key, augment_geometric

        i, seed = _split_key(key)
        (img,) = augment_geometric(seed, [self.image(i)], flip=self.flip, rotate90=self.rotate90)
        target = np.zeros(self.n_classes, np.float32)
        if len(self.labels):
            target[int(self.labels[i])] = 1.0
        return {"image": img, "target": target, "index": i}


# --------------------------------------------------------------------------- metrics and pictures


def classification_report(y_true, probs, classes: Sequence[str]) -> dict:
    """Accuracy, macro-F1 (over classes present in the truth or the predictions), per-class recall
    (``None`` without support) and the confusion matrix (rows: true class, columns: predicted)."""
    y = np.asarray(y_true, np.int64)
    pred = np.asarray(probs).argmax(axis=1) if len(y) else np.zeros(0, np.int64)
    c = len(classes)
    cm = np.zeros((c, c), np.int64)
    np.add.at(cm, (y, pred), 1)
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    recall = [float(tp[i] / support[i]) if support[i] else None for i in range(c)]
    f1 = []
    for i in range(c):
        if support[i] + predicted[i] == 0:
            continue
        f1.append(2 * tp[i] / (support[i] + predicted[i]))
    return {
        "n": int(len(y)),
        "accuracy": float((pred == y).mean()) if len(y) else None,
        "macro_f1": float(np.mean(f1)) if f1 else None,
        "per_class_recall": dict(zip(classes, recall)),
        "support": dict(zip(classes, support.tolist())),
        "classes": list(classes),
        "confusion_matrix": cm.tolist(),
    }


def draw_confusion_png(path: str | Path, cm, classes: Sequence[str], title: str) -> Path:
    """The confusion matrix as a PNG: counts, cells shaded by the row (true class) fraction."""
    from PIL import Image, ImageDraw

    from pipeline.evaluate import _font

    cm = np.asarray(cm)
    c = len(classes)
    cell = 64
    left, top = 130, 90
    w, h = left + c * cell + 20, top + c * cell + 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    f_small, f_big = _font(12), _font(15)
    d.text((w / 2, 14), title, fill="black", font=f_big, anchor="mt")
    d.text((left + c * cell / 2, 40), "predicted", fill="black", font=f_small, anchor="mt")
    rows = cm.sum(1, keepdims=True).clip(min=1)
    for i in range(c):
        d.text((left - 8, top + i * cell + cell / 2), str(classes[i])[:16], fill="black", font=f_small, anchor="rm")
        d.text((left + i * cell + cell / 2, top - 8), str(classes[i])[:9], fill="black", font=f_small, anchor="mb")
        for j in range(c):
            frac = float(cm[i, j] / rows[i, 0])
            shade = tuple(int(255 - frac * (255 - v)) for v in (31, 94, 180))
            box = [left + j * cell, top + i * cell, left + (j + 1) * cell, top + (i + 1) * cell]
            d.rectangle(box, fill=shade, outline=(200, 200, 200))
            d.text((box[0] + cell / 2, box[1] + cell / 2), str(int(cm[i, j])),
                   fill="white" if frac > 0.5 else "black", font=f_big, anchor="mm")
    d.text((12, top + c * cell + 12), "rows: true class", fill="black", font=f_small)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        img.save(str(tmp), format="PNG")
    return path


# --------------------------------------------------------------------------- the run directory


class PatchRun:
    """A train-patches run directory (layout in the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    meta_path = property(lambda self: self.path / "run.json")
    state_path = property(lambda self: self.path / "state" / "train.pt")
    model_path = property(lambda self: self.path / "model.pt")
    done_path = property(lambda self: self.path / "DONE")
    report_dir = property(lambda self: self.path / "report")

    def read_meta(self) -> dict | None:
        if not self.meta_path.is_file():
            return None
        try:
            meta = json.loads(self.meta_path.read_text())
        except ValueError as exc:
            raise UsageError(f"{self.meta_path}: unreadable ({exc}); use a new --run directory") from None
        if meta.get("format") != RUN_FORMAT:
            raise UsageError(f"{self.meta_path}: not a train-patches run (format {meta.get('format')!r}); choose "
                             "another --run directory")
        return meta

    def start(self, ident: dict, force: bool) -> dict:
        """Create the run, or check that an existing one was made from the same settings and data."""
        meta = self.read_meta()
        if meta is None:
            leftovers = [p.name for p in self.path.iterdir() if not p.name.startswith(".")]
            if leftovers:
                raise UsageError(f"{self.path}: the folder is not empty ({', '.join(sorted(leftovers)[:5])}) and is "
                                 "not a train-patches run; choose an empty or new --run directory")
        elif force:
            self.clear()
            meta = None
        elif meta.get("train_hash") != ident["train_hash"]:
            diff = _diff(meta.get("train_settings", {}), ident["train_settings"])
            raise UsageError(f"{self.path}: the run was made with other settings ({'; '.join(diff[:6])}); pass the "
                             f"config saved in {self.meta_path}, use a new --run directory or --force")
        elif meta.get("data", {}).get("fingerprint") != ident["data"]["fingerprint"]:
            raise UsageError(f"{self.path}: the run was trained on other images ({meta['data'].get('root')}, "
                             f"classes {meta['data'].get('classes')}); use the same --data, a new --run or --force")
        if meta is None:
            meta = {**ident, "created_utc": utc_now()}
            atomic_write_json(self.meta_path, meta)
        return meta

    def clear(self) -> None:
        for p in self.path.iterdir():
            if p.name.startswith((RunLock.NAME, LEASES_DIR)):  # this run's own lock (or lease, without flock)
                continue
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        log.info("--force: removed the previous run in %s", self.path)


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def train_settings(cfg: Config) -> dict:
    """What changes a train-patches result: the model section, the patches section (less
    performance knobs) and the em.* augmentation it borrows."""
    import dataclasses

    p = dataclasses.asdict(cfg.patches)
    p.pop("predict_batch_size", None)
    e = cfg.em
    aug = {k: getattr(e, k) for k in ("flip", "rotate90", "brightness", "contrast", "saturation", "hue")}
    return {"model": dataclasses.asdict(cfg.model), "patches": p, "augment": aug}


def run_identity(cfg: Config, ps: PatchSet) -> dict:
    ts = train_settings(cfg)
    return {
        "format": RUN_FORMAT,
        "format_version": RUN_FORMAT_VERSION,
        "config": cfg.to_dict(),
        "train_settings": ts,
        "train_hash": hashlib.sha256(json.dumps(ts, sort_keys=True, default=str).encode()).hexdigest()[:16],
        "data": {"kind": ps.kind, "root": str(Path(ps.root).resolve()), "classes": ps.classes,
                 "counts": ps.counts(), "fingerprint": ps.fingerprint()},
        "software_version": __version__,
    }


# --------------------------------------------------------------------------- training


def _device(cfg: Config):
    import torch

    dev = cfg.runtime.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(dev)


def _build_model(cfg: Config, n_classes: int):
    import models

    from pipeline.run import build_model, load_weights

    models.seed_everything(cfg.patches.seed)
    model = build_model(cfg.model.cls_arch, {**cfg.model.cls_arch_kwargs, "num_classes": n_classes})
    init = "random"
    if cfg.model.cls_weights:
        if not Path(cfg.model.cls_weights).is_file():
            raise UsageError(f"{cfg.model.cls_weights}: weights file not found (model.cls_weights / --weights); "
                             "give a local file")
        init = load_weights(model, cfg.model.cls_weights, "patch classifier")
    return model, init


def _trainer(cfg: Config, model, device, progress: bool):
    from pipeline.mixers import create_mixer
    from pipeline.trainers import ColorJitter, create_trainer, list_trainers

    p, e = cfg.patches, cfg.em
    if p.trainer not in list_trainers():
        raise ConfigError(f"patches.trainer={p.trainer!r} is not a trainer; choose one of {list_trainers()}")
    jitter = ColorJitter(e.brightness, e.contrast, e.saturation, e.hue) if p.augment else None
    return create_trainer(
        p.trainer, model, device=device, lr=p.lr, weight_decay=p.weight_decay, epochs=p.epochs,
        lr_schedule=p.lr_schedule, optimizer=p.optimizer, amp=cfg.runtime.amp,
        jitter=jitter if jitter is not None and jitter.active else None, seed=p.seed, progress=progress,
        mixers=[create_mixer(**m) for m in cfg.model.cls_mix], desc="train-patches",
    )


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """A seeded shuffle of ``n`` items in batches (a last batch of one is dropped: BatchNorm)."""
    order = np.random.default_rng([seed, 3, epoch]).permutation(n)
    batches = [order[a:a + batch_size].tolist() for a in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()
    return batches


def predict_probs(model, dataset: PatchDataset, device, batch_size: int, amp: bool = False) -> np.ndarray:
    """Softmax probabilities ``(N, C)`` of every item, eval mode, no augmentation."""
    import torch

    from pipeline.data import make_loader
    from pipeline.trainers import autocast, images_to_float

    model.eval()
    batches = [[(i, None) for i in range(a, min(a + batch_size, len(dataset)))]
               for a in range(0, len(dataset), batch_size)]
    out = []
    with torch.no_grad():
        for batch in make_loader(dataset, batches, loader_workers=0, device=device):
            with autocast(device, amp):
                logits = model(images_to_float(batch["image"], device))
            out.append(torch.softmax(logits.float().reshape(len(batch["image"]), -1), dim=-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _evaluate(run: PatchRun, model, ps: PatchSet, side: int, device, cfg: Config) -> dict:
    reports = {}
    for split in ("val", "test"):
        if split not in ps.sources:
            continue
        ds = PatchDataset(ps.sources[split], ps.labels[split], len(ps.classes), side)
        probs = predict_probs(model, ds, device, cfg.patches.predict_batch_size, cfg.runtime.amp)
        rep = classification_report(ps.labels[split], probs, ps.classes)
        png = draw_confusion_png(run.report_dir / f"{split}_confusion.png", rep["confusion_matrix"], ps.classes,
                                 f"{split}: accuracy {rep['accuracy']:.3f}, macro-F1 {rep['macro_f1']:.3f}")
        rep["confusion_png"] = str(png)
        atomic_write_json(run.report_dir / f"{split}.json", rep)
        reports[split] = rep
    return reports


def _train(run: PatchRun, cfg: Config, ps: PatchSet, side: int, progress: bool,
           on_checkpoint: Callable[[int], None] | None) -> dict:
    from pipeline.data import SeededBatches, make_loader
    from pipeline.run import load_checkpoint, save_checkpoint

    device = _device(cfg)
    model, init = _build_model(cfg, len(ps.classes))
    trainer = _trainer(cfg, model, device, progress)
    if run.state_path.is_file():
        trainer.load_state_dict(load_checkpoint(run.state_path))
        log.info("train-patches: resuming after epoch %d/%d", trainer.epoch, trainer.epochs)
    p, e = cfg.patches, cfg.em
    ds = PatchDataset(ps.sources["train"], ps.labels["train"], len(ps.classes), side,
                      flip=p.augment and e.flip, rotate90=p.augment and e.rotate90)

    def batches_for_epoch(epoch: int):
        seeded = SeededBatches(_epoch_batches(len(ds), p.batch_size, p.seed, epoch), p.seed, epoch,
                               augment=p.augment)
        return make_loader(ds, seeded, loader_workers=cfg.runtime.loader_workers, device=device)

    def payload(tr) -> dict:
        return {**tr.state_dict(), "arch": cfg.model.cls_arch,
                "arch_kwargs": {**cfg.model.cls_arch_kwargs, "num_classes": len(ps.classes)},
                "classes": ps.classes, "image_px": side, "config": cfg.to_dict(), "software_version": __version__}

    def save(tr) -> None:
        save_checkpoint(payload(tr), run.state_path)
        if on_checkpoint is not None:
            on_checkpoint(tr.epoch)

    run.state_path.parent.mkdir(parents=True, exist_ok=True)
    trainer.fit(batches_for_epoch, checkpoint=save)
    final = payload(trainer)
    for k in ("optimizer", "scheduler", "scaler", "torch_rng"):
        final.pop(k, None)
    final["init"] = init
    save_checkpoint(final, run.model_path)
    return {"init": init, "history": trainer.history, "model": trainer.model, "device": device}


def load_patch_model(path: str | Path, device="cpu"):
    """The model of a finished run and its checkpoint record."""
    from pipeline.run import model_from_checkpoint

    model, ckpt = model_from_checkpoint(path, device)
    return model, ckpt


def predict_folder(run_dir: str | Path, folder: str | Path, out_csv: str | Path | None = None,
                   device=None, batch_size: int = 64) -> Path:
    """Per-image class probabilities of every image under ``folder`` into a CSV
    ``path,predicted,prob_<class>...`` (default ``RUN/predictions.csv``)."""
    import torch

    run = PatchRun(run_dir)
    if not run.done_path.is_file():
        raise UsageError(f"{run.path}: training is not finished (no DONE); run 'wsi-pipeline train-patches' first")
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder; --predict takes a folder of images")
    files = list_images(folder)
    if not files:
        raise UsageError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) found (searched recursively)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, ckpt = load_patch_model(run.model_path, device)
    side, classes = int(ckpt["image_px"]), list(ckpt["classes"])
    resize = ckpt.get("config", {}).get("patches", {}).get("image_px") is not None
    if not resize:
        for f in files:
            if image_size(f) != (side, side):
                h, w = image_size(f)
                raise UsageError(f"{f}: image of {h}x{w} px, the model was trained on {side}x{side} px; give images "
                                 "of that size (or train with patches.image_px to resize)")
    probs = predict_probs(model, PatchDataset([str(f) for f in files], np.zeros(0), len(classes), side), device,
                          batch_size)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "predicted", *[f"prob_{c}" for c in classes]])
    for f, p in zip(files, probs):
        w.writerow([str(f.relative_to(folder)), classes[int(p.argmax())], *[f"{v:.6f}" for v in p]])
    out = Path(out_csv) if out_csv is not None else run.path / "predictions.csv"
    atomic_write_text(out, buf.getvalue())
    return out


def run_train_patches(data: str | Path, run_dir: str | Path, cfg: Config, *, labels_csv: str | Path | None = None,
                      predict: str | Path | None = None, predictions: str | Path | None = None, force: bool = False,
                      progress: bool = True, on_checkpoint: Callable[[int], None] | None = None) -> dict:
    """Train (or resume, or skip when done) a patch classifier in ``run_dir``; then ``--predict``.

    Returns ``{"run", "skipped", "classes", "reports", "history", "predictions"}``.
    """
    import torch

    import models

    ps = load_patch_set(data, labels_csv)
    if not models.is_model(cfg.model.cls_arch):
        raise ConfigError(f"model.cls_arch={cfg.model.cls_arch!r} is not a registered model; choose one of "
                          f"{models.list_models()}")
    divisor = models.get_size_divisor(cfg.model.cls_arch, **cfg.model.cls_arch_kwargs)
    side = check_sizes(ps, cfg.patches.image_px, divisor, cfg.model.cls_arch)
    run = PatchRun(ensure_writable_dir(run_dir, "run directory", "--run"))
    if cfg.runtime.torch_threads:
        torch.set_num_threads(cfg.runtime.torch_threads)
    with RunLock(run.path, "train-patches"):
        ident = run_identity(cfg, ps)
        run.start(ident, force)
        skipped = run.done_path.is_file()
        if skipped:
            metrics = json.loads((run.path / "metrics.json").read_text())
            log.info("train-patches: %s is complete; nothing to train", run.path)
        else:
            res = _train(run, cfg, ps, side, progress, on_checkpoint)
            reports = _evaluate(run, res["model"], ps, side, res["device"], cfg)
            metrics = {"classes": ps.classes, "image_px": side, "init": res["init"], "epochs": res["history"],
                       "reports": reports, "finished_utc": utc_now()}
            atomic_write_json(run.path / "metrics.json", metrics)
            atomic_write_json(run.done_path, {"finished_utc": utc_now()})
            shutil.rmtree(run.state_path.parent, ignore_errors=True)
        out_csv = None
        if predict is not None:
            out_csv = predict_folder(run.path, predict, predictions, device=_device(cfg),
                                     batch_size=cfg.patches.predict_batch_size)
    return {"run": str(run.path), "skipped": skipped, "classes": ps.classes, "reports": metrics["reports"],
            "history": metrics["epochs"], "predictions": None if out_csv is None else str(out_csv)}
