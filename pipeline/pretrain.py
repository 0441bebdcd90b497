"""Self-supervised pre-training: ``wsi-pipeline pretrain --method dino``.

DINO (:mod:`models.dino`) trains one part of a registered model (``pretrain.arch``,
``pretrain.part``) on unlabelled images: the tiles of a folder of tile stores
(``--stores``) or every image under a folder (``--images``, e.g. an ImageFolder
tree; its labels are not used). ScoreNet's scorer sees the images downsampled by
the model's factor ``s`` (the paper's thumbnails), its fine ViT and a DLA trunk
see them at full resolution.

The output ``--out WEIGHTS.pt`` holds ``{"model": teacher weights under the target
model's key names, "arch", "arch_kwargs", "part", "pretrain": record}``; it loads
with ``--weights`` / ``model.*_weights`` (:func:`pipeline.run.load_weights`). With
``--init`` an earlier weights file is loaded first and its other tensors are
carried into the output, so the scorer and the fine ViT can be pre-trained one
after the other into one file.

Crash safety like ``em-round``: the folder of ``--out`` is locked; training
checkpoints after every epoch to ``.<name>.state.pt`` beside it and a re-run
resumes there (bit-identical on CPU); the output is written under a temporary
name and renamed. A re-run with the same settings and data finds the output and
does nothing; other settings stop with one line (``--force`` or another ``--out``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.batch import RunLock, UsageError, ensure_writable_dir, utc_now
from pipeline.config import Config, ConfigError
from wsi import __version__

log = logging.getLogger("wsi_pipeline")

__all__ = ["METHODS", "ImageSource", "image_source", "run_pretrain"]

METHODS = ("dino",)
FORMAT = "wsi-pipeline.pretrained-weights"


class ImageSource:
    """Unlabelled images of one size: files or ``(store, tile)`` pairs, read in batches as uint8 NHWC."""

    def __init__(self, items: list, side: int, root: str, kind: str):
        self.items, self.side, self.root, self.kind = items, int(side), root, kind

    def __len__(self) -> int:
        return len(self.items)

    def read(self, indices) -> np.ndarray:
        from pipeline.patches import read_image
        from wsi.store import TileStore

        out = np.empty((len(indices), self.side, self.side, 3), np.uint8)
        for j, i in enumerate(indices):
            it = self.items[int(i)]
            out[j] = read_image(it) if isinstance(it, str) else TileStore(it[0])[int(it[1])]
        return out

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.kind}:{self.side}".encode())
        for it in self.items:
            h.update((f"{Path(it).relative_to(self.root)}:{Path(it).stat().st_size}" if isinstance(it, str)
                      else f"{Path(it[0]).name}:{it[1]}").encode())
        return h.hexdigest()[:16]


def image_source(stores: str | Path | None, images: str | Path | None) -> ImageSource:
    """The images of ``--stores`` or ``--images`` (exactly one), checked to share one square size."""
    from pipeline.patches import image_size, list_images
    from wsi.store import TileStore, list_stores

    if (stores is None) == (images is None):
        raise UsageError("pretrain: give exactly one of --stores STORES (tile stores) or --images DIR (image files)")
    if stores is not None:
        paths = list_stores(stores)
        if not paths:
            raise UsageError(f"{stores}: no tile stores (*.zarr) found; run 'wsi-pipeline tile' first or give --images")
        items, side = [], None
        for p in paths:
            st = TileStore(p)
            if side is not None and st.tile_px != side:
                raise UsageError(f"{p}: tiles of {st.tile_px} px, other stores have {side} px; use stores of one "
                                 "tiling")
            side = st.tile_px
            items += [(str(p), i) for i in range(len(st))]
        if not items:
            raise UsageError(f"{stores}: the stores hold no tiles")
        return ImageSource(items, side, str(stores), "stores")
    files = list_images(Path(images)) if Path(images).is_dir() else []
    if not files:
        raise UsageError(f"{images}: no images found (searched recursively for .png/.jpg/.tif); give a folder of "
                         "images")
    first = image_size(files[0])
    for f in files:
        hw = image_size(f)
        if hw != first or hw[0] != hw[1]:
            raise UsageError(f"{f}: image of {hw[0]}x{hw[1]} px, {files[0]} is {first[0]}x{first[1]}; pre-training "
                             "needs square images of one size")
    return ImageSource([str(f) for f in files], first[0], str(images), "images")


# --------------------------------------------------------------------------- the DINO set-up


def _build(cfg: Config, init: str | Path | None):
    """Target model (seeded), its part, the DINO pair, and the carried tensors of ``init``."""
    import models
    from models.dino import DINO, MultiCrop, backbone_part

    from pipeline.run import build_model, load_checkpoint

    p = cfg.pretrain
    models.seed_everything(p.seed)
    model = build_model(p.arch, {**p.arch_kwargs, "num_classes": 1})
    carried = {}
    if init is not None:
        sd = models.unwrap_state_dict(load_checkpoint(init))
        rep = models.load_state_dict_flexible(model, sd)
        if not rep.loaded_keys:
            raise UsageError(f"{init}: none of its tensors fit {p.arch!r} ({rep}); give weights of that model")
        carried = {k: v for k, v in sd.items() if k in set(rep.loaded_keys)}
    try:
        part = backbone_part(model, p.part)
    except ValueError as exc:
        raise ConfigError(f"pretrain.arch={p.arch!r}, pretrain.part={p.part!r}: {exc}") from None
    for name in ("global_crop_px", "local_crop_px"):
        v = getattr(p, name)
        if v % part.size_step or v < part.min_px:
            raise ConfigError(f"pretrain.{name}={v} does not suit the {part.part} of {p.arch!r}: crops must be "
                              f"multiples of {part.size_step} px and at least {part.min_px} px")
    crops = MultiCrop(p.global_crop_px, p.local_crop_px, p.local_crops, p.global_scale, p.local_scale)
    dino = DINO(part, p.out_dim, p.hidden_dim, p.bottleneck_dim, p.head_layers, p.norm_last_layer, crops.n_crops,
                p.student_temp, p.center_momentum)
    downscale = int(getattr(model, "downscale", 1)) if part.part == "scorer" else 1
    return dino, crops, downscale, carried, part


def _optimizer(dino, p):
    """AdamW; no weight decay on biases and norm weights (DINO's ``get_params_groups``)."""
    import torch

    reg, plain = [], []
    for name, prm in dino.student.named_parameters():
        if not prm.requires_grad:
            continue
        (plain if name.endswith(".bias") or prm.ndim == 1 else reg).append(prm)
    return torch.optim.AdamW([{"params": reg}, {"params": plain, "weight_decay": 0.0}], lr=p.lr)


def _schedules(p, steps: int) -> dict:
    from models.dino import cosine_schedule

    lr = p.lr * p.batch_size / 256.0  # linear scaling rule
    temps = list(np.linspace(p.warmup_teacher_temp, p.teacher_temp, p.warmup_teacher_temp_epochs)) + \
        [p.teacher_temp] * (p.epochs - p.warmup_teacher_temp_epochs)
    return {
        "lr": cosine_schedule(lr, p.min_lr, p.epochs, steps, p.warmup_epochs),
        "wd": cosine_schedule(p.weight_decay, p.weight_decay_end, p.epochs, steps),
        "momentum": cosine_schedule(p.momentum_teacher, 1.0, p.epochs, steps),
        "teacher_temp": [float(t) for t in temps[: p.epochs]],
    }


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """A seeded shuffle in full batches (DINO drops the last partial one); one batch if n < batch_size."""
    order = np.random.default_rng([seed, 7, epoch]).permutation(n)
    if n < batch_size:
        return [order]
    return [order[a:a + batch_size] for a in range(0, n - batch_size + 1, batch_size)]


def _step(dino, crops, opt, sched, it: int, epoch: int, x, g, p) -> float:
    import torch

    for i, group in enumerate(opt.param_groups):
        group["lr"] = sched["lr"][it]
        if i == 0:
            group["weight_decay"] = sched["wd"][it]
    loss = dino.loss(crops(x, g), sched["teacher_temp"][epoch])
    if not torch.isfinite(loss):
        raise FloatingPointError(f"pretrain: the DINO loss became {loss.item()} in epoch {epoch + 1}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if p.clip_grad > 0:
        for prm in dino.student.parameters():  # DINO clips each parameter's gradient norm
            if prm.grad is not None:
                norm = prm.grad.detach().norm(2)
                prm.grad.mul_(torch.clamp(p.clip_grad / (norm + 1e-6), max=1.0))
    if epoch < p.freeze_last_layer:
        for prm in dino.student["head"].last_layer_params():
            prm.grad = None
    opt.step()
    dino.update_teacher(sched["momentum"][it])
    return float(loss.detach())


def _to_input(batch: np.ndarray, downscale: int):
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)
    return F.avg_pool2d(x, downscale) if downscale > 1 else x


def _epoch(dino, crops, opt, sched, src: ImageSource, downscale: int, p, epoch: int, steps: int) -> dict:
    """One pass over the images; the epoch's loss and the teacher's target entropies (collapse monitor)."""
    import torch

    t0, losses, sample, batch = time.perf_counter(), [], [], []
    for b, idx in enumerate(_batches(len(src), p.batch_size, p.seed, epoch)):
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([p.seed, epoch, b]).generate_state(1)[0]))
        losses.append(_step(dino, crops, opt, sched, epoch * steps + b, epoch, _to_input(src.read(idx), downscale),
                            g, p))
        sample.append(dino.criterion.stats["sample"])
        batch.append(dino.criterion.stats["batch"])
    rec = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "batches": len(losses),
           "teacher_entropy": round(float(np.mean(sample)), 4), "batch_entropy": round(float(np.mean(batch)), 4),
           "seconds": round(time.perf_counter() - t0, 3)}
    log.info("pretrain epoch %d/%d: DINO loss %.4f, teacher entropy %.2f (per image) %.2f (batch mean) of ln K",
             rec["epoch"], p.epochs, rec["loss"], rec["teacher_entropy"], rec["batch_entropy"])
    return rec


def collapse_verdict(history: list[dict], max_entropy: float) -> str | None:
    """``"uniform"`` when the last epoch's per-image teacher targets are flatter than ``max_entropy``
    (of ln K), ``"one-prototype"`` when the batch-mean target has under ``1 - max_entropy`` of it,
    else ``None``. See :func:`models.dino.teacher_entropy`."""
    last = history[-1] if history else {}
    if "teacher_entropy" not in last:
        return None
    if last["teacher_entropy"] >= max_entropy:
        return "uniform"
    if last["batch_entropy"] <= 1.0 - max_entropy:
        return "one-prototype"
    return None


def _probe_set(root, side: int):
    """The labelled train/val images of ``--probe`` (an ImageFolder tree of the pre-training size)."""
    from pipeline.patches import image_size, load_image_folder

    ps = load_image_folder(root)
    for split in ("train", "val"):
        hw = image_size(ps.sources[split][0])
        if hw != (side, side):
            raise UsageError(f"{ps.sources[split][0]}: --probe images are {hw[0]}x{hw[1]} px, the pre-training "
                             f"images {side}x{side}; give a probe set of the same size")
    return ps


def _features(dinos: list, files: list[str], downscale: int, batch_size: int) -> list:
    """Teacher features of ``files`` under each of ``dinos``; every image is read and decoded once."""
    import torch

    from pipeline.patches import read_image

    nets = [d.teacher["backbone"] for d in dinos]
    was = [n.training for n in nets]
    out: list[list] = [[] for _ in nets]
    for n in nets:
        n.eval()
    with torch.no_grad():
        for a in range(0, len(files), batch_size):
            x = _to_input(np.stack([read_image(f) for f in files[a:a + batch_size]]), downscale)
            for feats, n in zip(out, nets):
                feats.append(n(x).float())
    for n, w in zip(nets, was):
        n.train(w)
    return [torch.cat(f) for f in out]


def knn_probe(dinos: list, ps, downscale: int, p) -> list[dict]:
    """Per network of ``dinos``: weighted k-NN accuracy and macro-F1 of ``ps``'s val images on its
    teacher's features (bank: train), and the features' class margin (:func:`models.dino.class_margin`)."""
    import torch

    from models.dino import class_margin, knn_classify
    from pipeline.patches import classification_report

    banks = _features(dinos, ps.sources["train"], downscale, p.batch_size)
    queries = _features(dinos, ps.sources["val"], downscale, p.batch_size)
    bank_y, query_y = torch.from_numpy(ps.labels["train"]), torch.from_numpy(ps.labels["val"])
    out = []
    for bank, query in zip(banks, queries):
        pred = knn_classify(bank, bank_y, query, len(ps.classes), p.knn_k, p.knn_temperature).numpy()
        rep = classification_report(ps.labels["val"], np.eye(len(ps.classes))[pred], ps.classes)
        out.append({"accuracy": round(float(rep["accuracy"]), 4), "macro_f1": round(float(rep["macro_f1"]), 4),
                    "margin": class_margin(bank, bank_y, query, query_y),
                    "images": {"train": len(ps.sources["train"]), "val": len(ps.sources["val"])}})
    return out


def _warn_if_learned_nothing(record: dict) -> None:
    """A pre-training whose teacher collapsed, or whose features classify no better than at
    initialisation, must not look like a working one: one warning each, and in the record."""
    warnings = []
    last = record["history"][-1]
    if record["collapse"] == "uniform":
        warnings.append(f"the teacher's targets collapsed to uniform (entropy {last['teacher_entropy']:.2f} of "
                        "ln K per image): the student was taught nothing about its images; use more images, "
                        "epochs or a larger batch (ScoreNet: >= 128)")
    elif record["collapse"] == "one-prototype":
        warnings.append(f"the teacher's targets collapsed onto one prototype (batch entropy "
                        f"{last['batch_entropy']:.2f} of ln K): sharpening won over centring; lower "
                        "pretrain.center_momentum (the centre follows faster) or raise pretrain.teacher_temp")
    probe = record.get("probe")
    if probe and probe["final"]["accuracy"] <= probe["init"]["accuracy"]:
        warnings.append(f"k-NN accuracy on {probe['root']} is {probe['final']['accuracy']:.3f} after pre-training, "
                        f"{probe['init']['accuracy']:.3f} at initialisation: the features did not improve")
    record["warnings"] = warnings
    for w in warnings:
        log.warning("pretrain: %s", w)


def _resume(state: Path, ident: dict, dino, opt) -> tuple[int, list]:
    """Load an interrupted run's checkpoint into ``dino`` and ``opt``; its epoch and history."""
    import torch

    from pipeline.run import load_checkpoint

    st = load_checkpoint(state)
    if st.get("hash") != ident["hash"] or st.get("fingerprint") != ident["data"]["fingerprint"]:
        raise UsageError(f"{state}: an interrupted pre-training with other settings or images; delete it, "
                         "pass --force or choose another --out")
    dino.load_state_dict(st["dino"])
    opt.load_state_dict(st["optimizer"])
    torch.set_rng_state(st["torch_rng"])
    log.info("pretrain: resuming after epoch %d", int(st["epoch"]))
    return int(st["epoch"]), list(st["history"])


# --------------------------------------------------------------------------- entry point


def _identity(cfg: Config, src: ImageSource, method: str, init) -> dict:
    trained = {k: v for k, v in dataclasses.asdict(cfg.pretrain).items() if k not in cfg.pretrain.EVALUATION_FIELDS}
    settings = {"method": method, "pretrain": trained,
                "init": None if init is None else str(Path(init).resolve())}
    return {
        "settings": settings,
        "hash": hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16],
        "data": {"kind": src.kind, "root": str(Path(src.root).resolve()), "images": len(src), "side_px": src.side,
                 "fingerprint": src.fingerprint()},
    }


def _existing(out: Path, ident: dict, force: bool):
    """The finished output when it was made with these settings and data; refuse other ones."""
    from pipeline.run import RunFormatError, load_checkpoint

    if not out.exists() or force:
        return None
    try:
        ck = load_checkpoint(out)
    except RunFormatError as exc:
        raise UsageError(f"{exc}; it is not a pretrain output: choose another --out or pass --force") from None
    rec = ck.get("pretrain") or {}
    if ck.get("format") != FORMAT:
        raise UsageError(f"{out}: exists and is not a pretrain output; choose another --out or pass --force")
    if rec.get("hash") != ident["hash"] or rec.get("data", {}).get("fingerprint") != ident["data"]["fingerprint"]:
        raise UsageError(f"{out}: was pre-trained with other settings or images; pass the same config and data, "
                         "another --out or --force")
    return ck


def run_pretrain(out: str | Path, cfg: Config, *, method: str = "dino", stores: str | Path | None = None,
                 images: str | Path | None = None, init: str | Path | None = None, force: bool = False,
                 progress: bool = True, on_checkpoint: Callable[[int], None] | None = None,
                 probe: str | Path | None = None) -> dict:
    """Pre-train ``pretrain.part`` of ``pretrain.arch`` with DINO; writes ``out``. Returns its record.

    ``probe``: an ImageFolder tree (``train/<class>/``, ``val/<class>/``) whose val images are
    classified by a weighted k-NN over the train images' teacher features, before and after
    training (``record["probe"]``); the labels judge the features, they never train them.
    """
    import torch

    from pipeline.run import save_checkpoint

    if method not in METHODS:
        raise UsageError(f"pretrain: unknown --method {method!r}; known: {list(METHODS)}")
    if init is not None and not Path(init).is_file():
        raise UsageError(f"{init}: --init weights file not found; give a local file")
    out = Path(out)
    src = image_source(stores, images)
    probe_set = _probe_set(probe, src.side) if probe is not None else None
    ensure_writable_dir(out.parent, "output folder")
    state = out.with_name(f".{out.name}.state.pt")
    if cfg.runtime.torch_threads:
        torch.set_num_threads(cfg.runtime.torch_threads)
    p = cfg.pretrain
    with RunLock(out.parent, "pretrain"):
        ident = _identity(cfg, src, method, init)
        done = _existing(out, ident, force)
        if done is not None:
            log.info("pretrain: %s is already pre-trained with these settings; nothing to do", out)
            return {**done["pretrain"], "skipped": True, "out": str(out)}
        dino, crops, downscale, carried, part = _build(cfg, init)
        steps = len(_batches(len(src), p.batch_size, p.seed, 0))
        opt, sched = _optimizer(dino, p), _schedules(p, steps)
        epoch, history = _resume(state, ident, dino, opt) if state.is_file() and not force else (0, [])
        dino.train()
        while epoch < p.epochs:
            history.append(_epoch(dino, crops, opt, sched, src, downscale, p, epoch, steps))
            epoch += 1
            save_checkpoint({"dino": dino.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                             "history": history, "torch_rng": torch.get_rng_state(), "hash": ident["hash"],
                             "fingerprint": ident["data"]["fingerprint"]}, state)
            if on_checkpoint is not None:
                on_checkpoint(epoch)
        record = {**ident, "method": method, "arch": p.arch, "part": part.part, "prefix": part.prefix,
                  "downscale": downscale, "history": history, "finished_utc": utc_now(),
                  "collapse": collapse_verdict(history, p.collapse_entropy)}
        if probe_set is not None:
            untrained = _build(cfg, init)[0]  # seeded: the very network training started from
            before, after = knn_probe([untrained, dino], probe_set, downscale, p)
            record["probe"] = {"root": str(Path(probe).resolve()), "k": p.knn_k, "temperature": p.knn_temperature,
                               "init": before, "final": after}
        _warn_if_learned_nothing(record)
        weights = {**carried, **dino.teacher_weights()}
        save_checkpoint({"format": FORMAT, "model": weights, "arch": p.arch,
                         "arch_kwargs": dict(p.arch_kwargs), "part": part.part, "pretrain": record,
                         "software_version": __version__}, out)
        state.unlink(missing_ok=True)
    return {**record, "skipped": False, "out": str(out)}
