"""The mixed-supervision EM loop (Li et al., Algorithm 1): ``wsi-pipeline em-round``.

One call of :func:`run_em` makes sure rounds ``0 .. rounds-1`` of a run
directory are complete. Each round ``k``:

1. **theta1** (segmentation, ``seg.pt``)
   - round 0: trained on the annotated tiles only (``em.epochs_init`` epochs);
   - round k >= 1 (``mode mixed``): initialised from round k-1. *E-step*: the
     probability maps of round k-1 (``round_{k-1}/probmaps.zarr``) give, per
     training slide without annotation, the tiles whose maximum probability is
     at least T; on positive slides they become pseudo-positives with targets
     ``clip(V p, 0, 1)`` (< floor -> 0), on negative slides hard negatives with
     all-zero targets. *M-step*: ``em.epochs`` epochs on batches holding
     annotated : pseudo-positive : hard-negative tiles at exactly ``em.ratio``
     (2:1:7) each (:func:`pipeline.sampling.ratio_counts` documents the rounding);
   - ``mode pixel``: round 0 only (no EM); ``mode image``: no annotations,
     each epoch relabels the ``em.mil_top_k`` tiles of every slide that theta1
     ranks highest with the slide label (top-K MIL, Campanella et al. 2019).
2. **Maps**: theta1 predicts every tile of every train and val slide;
   probability maps (``tile_px / model.map_stride_px``, float16) and tile
   maxima go to ``round_k/probmaps.zarr`` -- the next round's E-step input.
3. **Stage 2** (``cls.pt``): per slide the ``stage2.top_k`` tiles with the
   highest maximum probability; theta2 is trained so that the mean of its K
   tile probabilities fits the slide label, positive and negative slides drawn
   equally often. ``stage2_loss`` is the class-balanced mean BCE of the final
   theta2 over the training slides (eval mode, no augmentation).
4. **Report**: validation metrics when a ``val`` split exists, heatmaps,
   ``metrics.json``, then ``DONE``; ``run.json`` and ``best`` are updated
   (best = lowest stage-2 loss, :func:`pipeline.sampling.select_best_round`).

Run directory::

    RUN/run.json                  identity (config, hashes, inputs) and progress
    RUN/best                      {"round": k}
    RUN/round_k/seg.pt, cls.pt    checkpoints (model, optimiser, scheduler, round, config, version)
    RUN/round_k/probmaps.zarr     <slide_id>/maps (N, h, w) float16, <slide_id>/max_prob (N,)
    RUN/round_k/heatmaps/*.png
    RUN/round_k/metrics.json      written last, with DONE
    RUN/round_k/state/            in-progress checkpoints (removed when the round is done)

Crash safety: every file is written under a temporary name and renamed;
training checkpoints after every epoch (``state/seg_train.pt``,
``state/cls_train.pt``), predictions per slide. A re-run resumes at the last
checkpoint and reproduces, on CPU, exactly what an uninterrupted run gives.

Scaling out (not implemented, the shapes allow it): *E-step / predictions* --
each torchrun rank takes ``slides[rank::world]`` (:func:`write_probmaps` works
per slide and each slide is its own Zarr group), rank 0 renames the Zarr when
all ranks are done. *M-step / stage 2* -- wrap the model in
``DistributedDataParallel`` inside the trainer and give each rank the slice
``batch[rank::world]`` of every batch from the same seeded batch sampler (the
2:1:7 mix then holds per global batch); rank 0 writes checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.batch import RunLock, UsageError, atomic_write_json, ensure_writable_dir, utc_now
from pipeline.config import Config, ConfigError
from pipeline.labels import Cohort, SlideEntry, load_cohort
from wsi import __version__

log = logging.getLogger("wsi_pipeline")

__all__ = [
    "EMHooks", "run_em", "round_dir", "read_run", "e_step", "write_probmaps", "compare_runs", "format_comparison",
    "write_comparison",
]

RUN_JSON = "run.json"
BEST_FILE = "best"
PROBMAPS = "probmaps.zarr"
PROBMAPS_FORMAT = "wsi-pipeline.probmaps"
SHARD_TILES = 256


@dataclass
class EMHooks:
    """Callbacks for callers that watch a run (progress UIs, fault-injection tests).

    ``on_checkpoint(round, step, epoch)`` runs after each checkpoint is on disk;
    ``step`` is ``'seg'``, ``'predict'`` (epoch = slides done) or ``'cls'``.
    """

    on_checkpoint: Callable[[int, str, int], None] | None = None

    def checkpoint(self, k: int, step: str, epoch: int) -> None:
        if self.on_checkpoint is not None:
            self.on_checkpoint(k, step, epoch)


def round_dir(run_dir: str | Path, k: int) -> Path:
    return Path(run_dir) / f"round_{k}"


def read_run(run_dir: str | Path) -> dict:
    """``run.json`` of a run directory."""
    p = Path(run_dir) / RUN_JSON
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise UsageError(f"{p}: not found; {run_dir} is not an EM run directory") from None
    except ValueError as exc:
        raise UsageError(f"{p}: unreadable ({exc})") from None


# --------------------------------------------------------------------------- small helpers


def _torch_save_atomic(obj, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load_json(path: Path, default=None):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return default


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _config_diff(old: dict, new: dict) -> list[str]:
    sections = Config.TRAIN_SECTIONS
    a = _flatten({s: old.get(s, {}) for s in sections})
    b = _flatten({s: new.get(s, {}) for s in sections})
    keys = sorted((set(a) | set(b)) - set(Config.TRAIN_EXCLUDE))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def _nan_to_none(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# --------------------------------------------------------------------------- context


@dataclass
class _Ctx:
    cfg: Config
    cohort: Cohort
    run_dir: Path
    annotations: dict  # slide_id -> PixelAnnotation (train slides only)
    device: object
    progress: bool
    hooks: EMHooks
    train: list[SlideEntry] = field(default_factory=list)
    val: list[SlideEntry] = field(default_factory=list)

    @property
    def mode(self) -> str:
        return self.cfg.em.mode

    @property
    def amp(self) -> bool:
        return self.cfg.runtime.amp

    @property
    def predicted(self) -> list[SlideEntry]:
        return self.train + self.val


def _file_sha(path: str | Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _identity(ctx: _Ctx, annotation_paths: Sequence[str | Path]) -> dict:
    cfg, cohort = ctx.cfg, ctx.cohort
    return {
        "format": "wsi-pipeline.em-run",
        "format_version": 1,
        "config": cfg.to_dict(),
        "train_hash": cfg.train_hash(tiling_hash=cohort.tiling["config_hash"]),
        "tiling": dict(cohort.tiling),
        "mode": cfg.em.mode,
        "stores": str(cohort.stores_dir.resolve()),
        "labels": str(cohort.labels_path.resolve()),
        "labels_sha256": cohort.labels_sha256,
        "annotations": {
            sid: [{"path": str(Path(p).resolve()), "sha256": _file_sha(p)} for p in a.sources]
            for sid, a in sorted(ctx.annotations.items())
        },
        "splits": {
            "train": [s.slide_id for s in ctx.train],
            "val": [s.slide_id for s in ctx.val],
        },
        "software_version": __version__,
    }


def _check_compatible(run_dir: Path, meta: dict, ident: dict) -> None:
    where = run_dir / RUN_JSON
    if meta.get("format") != ident["format"]:
        raise UsageError(f"{where}: not an EM run (format {meta.get('format')!r}); choose another --run directory")
    if meta.get("format_version") != ident["format_version"]:
        raise UsageError(
            f"{where}: run format version {meta.get('format_version')}, this software writes "
            f"{ident['format_version']}; start a new --run directory"
        )
    if meta.get("mode") != ident["mode"]:
        raise UsageError(
            f"{run_dir}: this run was trained with --mode {meta.get('mode')}, not {ident['mode']}; "
            "use a separate --run directory per mode"
        )
    if meta.get("tiling", {}).get("config_hash") != ident["tiling"]["config_hash"]:
        raise UsageError(
            f"{run_dir}: the run was trained on stores tiled with {meta.get('tiling')}, the given stores have "
            f"{ident['tiling']}; use the stores it was trained on or a new --run directory"
        )
    if meta.get("train_hash") != ident["train_hash"]:
        diff = _config_diff(meta.get("config", {}), ident["config"])
        shown = "; ".join(diff[:8]) + (f"; ... ({len(diff) - 8} more)" if len(diff) > 8 else "")
        raise UsageError(
            f"{run_dir}: the run was made with a different config ({shown or 'training settings differ'}); "
            f"pass the config it was made with (saved in {where}) or use a new --run directory"
        )
    if meta.get("labels_sha256") != ident["labels_sha256"]:
        raise UsageError(
            f"{ident['labels']}: the labels differ from those the run was trained with ({meta.get('labels')}); "
            "use the same labels or a new --run directory"
        )
    old_ann = {k: [e["sha256"] for e in v] for k, v in meta.get("annotations", {}).items()}
    new_ann = {k: [e["sha256"] for e in v] for k, v in ident["annotations"].items()}
    if old_ann != new_ann:
        raise UsageError(
            f"{run_dir}: the pixel annotations differ from those the run was trained with "
            f"(slides {sorted(old_ann)} before, {sorted(new_ann)} now); use the same --annotations or a new --run directory"
        )


# --------------------------------------------------------------------------- entry point


def run_em(
    stores: str | Path,
    labels: str | Path,
    run_dir: str | Path,
    config: Config,
    *,
    annotations: Sequence[str | Path] = (),
    rounds: int = 1,
    force: bool = False,
    progress: bool = True,
    hooks: EMHooks | None = None,
) -> dict:
    """Make sure rounds ``0 .. rounds-1`` of ``run_dir`` are complete; returns a summary.

    Finished rounds are skipped (``force=True`` deletes every round and starts over);
    an interrupted round resumes from its last checkpoint. ``mode pixel`` has one round.

    Raises
    ------
    UsageError
        Bad labels, stores, annotations, or a run directory made with another config
        or other inputs (one line naming the file and the fix).
    ConfigError
        Config values that cannot train (e.g. tiles not a multiple of 32 px).
    """
    import models
    import torch

    from pipeline.data import load_pixel_annotations
    from pipeline.inference import resolve_device

    cfg = config
    cfg.validate()
    if rounds < 1:
        raise UsageError(f"--rounds must be >= 1, got {rounds}")
    run_dir = Path(run_dir)
    cohort = load_cohort(stores, labels)
    cfg.validate_for_training(tile_px=cohort.tiling["tile_px"], where=f"tile_px of the stores in {cohort.stores_dir}")
    for name, arch in (("seg_arch", cfg.model.seg_arch), ("cls_arch", cfg.model.cls_arch)):
        if not models.is_model(arch):
            near = models.list_models(arch[:5]) or models.list_models()
            raise ConfigError(f"model.{name}={arch!r} is not a registered model; choose one of {near}")
    from pipeline.trainers import list_trainers

    for name in ("seg_trainer", "cls_trainer"):
        if getattr(cfg.model, name) not in list_trainers():
            raise ConfigError(f"model.{name}={getattr(cfg.model, name)!r} is not a trainer; choose one of {list_trainers()}")
    for name, arch, what in (("seg_weights", cfg.model.seg_arch, "theta1"), ("cls_weights", cfg.model.cls_arch, "theta2")):
        w = getattr(cfg.model, name)
        if w is None:
            continue
        if not Path(w).is_file():
            raise UsageError(f"{w}: weights file not found (model.{name} / --weights); give a local file")
        _load_weights(_new_model(arch, 0), w, what)  # fail now, not after an hour of training

    if cohort.unlabelled:
        log.info("%d store(s) without a label are ignored: %s", len(cohort.unlabelled), ", ".join(cohort.unlabelled[:8]))
    train, val = cohort.train, cohort.val
    ann: dict = {}
    if cfg.em.mode in ("mixed", "pixel"):
        if not annotations:
            raise UsageError(
                f"--mode {cfg.em.mode} needs pixel annotations of some positive train slides: pass --annotations "
                "(GeoJSON files / mask images or their folder), or use --mode image"
            )
        ann_all = load_pixel_annotations(
            annotations, cohort.by_id(), positive_classes=cfg.em.positive_classes, mask_downsample=cfg.em.mask_downsample
        )
        split_of = {s.slide_id: s.split for s in cohort.slides}
        skipped = sorted(sid for sid in ann_all if split_of[sid] != "train")
        if skipped:
            log.warning("annotations of non-train slides are not used for training: %s", ", ".join(skipped))
        ann = {sid: a for sid, a in ann_all.items() if split_of[sid] == "train"}
        if not ann:
            raise UsageError(
                "none of the given annotations belongs to a train slide; the annotated slides must have split 'train' "
                f"in {cohort.labels_path}"
            )
    elif annotations:
        log.info("--mode image uses no pixel annotations; the %d given path(s) are ignored", len(annotations))

    if cfg.runtime.torch_threads > 0:
        torch.set_num_threads(cfg.runtime.torch_threads)
    device = resolve_device(cfg.runtime.device)
    ctx = _Ctx(cfg, cohort, run_dir, ann, device, progress, hooks or EMHooks(), train=train, val=val)
    ident = _identity(ctx, annotations)

    ensure_writable_dir(run_dir, "run directory")
    summary = {"run_dir": str(run_dir), "mode": cfg.em.mode, "rounds_run": [], "rounds_skipped": []}
    with RunLock(run_dir, "em-round"):
        meta_path = run_dir / RUN_JSON
        if meta_path.exists():
            meta = read_run(run_dir)
            _check_compatible(run_dir, meta, ident)
        else:
            leftovers = [p.name for p in run_dir.iterdir() if not p.name.startswith(".")]
            if leftovers:
                raise UsageError(
                    f"{run_dir}: the folder is not empty ({', '.join(sorted(leftovers)[:5])}) and is not an EM run; "
                    "choose an empty or new --run directory"
                )
            meta = {**ident, "created_utc": utc_now(), "rounds_completed": [], "best_round": None, "round_losses": {}}
            atomic_write_json(meta_path, meta)
        if force:
            _clear_rounds(run_dir, meta)
        target = 1 if cfg.em.mode == "pixel" else rounds
        if cfg.em.mode == "pixel" and rounds > 1:
            log.warning("--mode pixel has a single round (theta1 from the annotations, no EM); running round 0 only")
        log.info(
            "EM run %s: mode %s, %d train slides (%d annotated), %d val slides, device %s",
            run_dir, cfg.em.mode, len(train), len(ann), len(val), device,
        )
        for k in range(target):
            if (round_dir(run_dir, k) / "DONE").is_file():
                summary["rounds_skipped"].append(k)
                if k not in meta.get("rounds_completed", []):  # finished just before a crash: record it now
                    meta = _record_round(run_dir, meta, k, _load_json(round_dir(run_dir, k) / "metrics.json", {}))
                log.info("round %d is complete; skipped (--force re-runs it)", k)
                continue
            metrics = _run_round(ctx, k)
            meta = _record_round(run_dir, meta, k, metrics)
            summary["rounds_run"].append(k)
        summary.update(
            {
                "rounds_completed": meta["rounds_completed"],
                "best_round": meta["best_round"],
                "round_losses": meta["round_losses"],
                "rounds": {
                    int(k): _load_json(round_dir(run_dir, int(k)) / "metrics.json", {})
                    for k in meta["rounds_completed"]
                },
            }
        )
    return summary


def _clear_rounds(run_dir: Path, meta: dict) -> None:
    for p in sorted(run_dir.glob("round_*")):
        if p.is_dir():
            shutil.rmtree(p)
    (run_dir / BEST_FILE).unlink(missing_ok=True)
    meta.update({"rounds_completed": [], "best_round": None, "round_losses": {}})
    atomic_write_json(run_dir / RUN_JSON, meta)
    log.info("--force: removed the previous rounds of %s", run_dir)


def _record_round(run_dir: Path, meta: dict, k: int, metrics: dict) -> dict:
    from pipeline.sampling import select_best_round

    done = sorted(set(int(r) for r in meta.get("rounds_completed", [])) | {k})
    losses = {str(r): v for r, v in meta.get("round_losses", {}).items()}
    losses[str(k)] = _nan_to_none(metrics.get("stage2_loss"))
    valid = {int(r): v for r, v in losses.items() if v is not None}
    best = select_best_round(valid) if valid else k
    meta = {**meta, "rounds_completed": done, "round_losses": losses, "best_round": best, "updated_utc": utc_now()}
    atomic_write_json(run_dir / RUN_JSON, meta)
    atomic_write_json(run_dir / BEST_FILE, {"round": best})
    return meta


# --------------------------------------------------------------------------- one round


def _seed(cfg: Config, k: int, step: int) -> int:
    return int(cfg.em.seed) * 1_000_003 + k * 1009 + step


def _ckpt(model, trainer, cfg: Config, k: int, kind: str) -> dict:
    d = trainer.state_dict() if trainer is not None else {"model": model.state_dict()}
    return {
        "kind": kind,
        "arch": getattr(model, "model_name", None),
        "arch_kwargs": dict(getattr(model, "model_kwargs", {}) or {}),
        **d,
        "round": k,
        "config": cfg.to_dict(),
        "software_version": __version__,
    }


def _new_model(arch: str, seed: int):
    import models

    from pipeline.inference import build_model

    models.seed_everything(seed)
    return build_model(arch, {"num_classes": 1})


def _load_weights(model, path: str, what: str) -> str:
    import torch

    import models

    try:
        sd = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UsageError(f"{path}: cannot read the {what} weights ({type(exc).__name__}: {exc}); give a torch state dict or checkpoint") from None
    try:
        rep = models.load_state_dict_flexible(model, sd)
    except TypeError as exc:
        raise UsageError(f"{path}: {exc}") from None
    if not rep.loaded_keys:
        raise UsageError(f"{path}: none of its tensors fit the {what} model ({rep}); is it the right architecture?")
    if not rep.ok:
        log.warning("%s weights %s loaded partially: %s", what, path, rep)
    return f"weights {path} ({len(rep.loaded_keys)} tensors)"


def _run_round(ctx: _Ctx, k: int) -> dict:
    cfg, run_dir = ctx.cfg, ctx.run_dir
    rdir = round_dir(run_dir, k)
    state = rdir / "state"
    state.mkdir(parents=True, exist_ok=True)
    prog_path = state / "progress.json"
    prog = _load_json(prog_path, {}) or {}
    prog.setdefault("time_s", {})
    prog.setdefault("started_utc", utc_now())
    t_round = time.perf_counter()
    resuming = any((rdir / f).exists() for f in ("seg.pt", "cls.pt", "state/seg_train.pt", f".{PROBMAPS}.partial"))
    log.info("round %d (%s): %s", k, ctx.mode, "resuming" if resuming else "start")

    def save_prog():
        atomic_write_json(prog_path, prog)

    def add_time(step: str, t0: float):
        prog["time_s"][step] = round(prog["time_s"].get(step, 0.0) + time.perf_counter() - t0, 3)

    # 1. theta1 ---------------------------------------------------------------------
    from pipeline.inference import model_from_checkpoint

    if not (rdir / "seg.pt").is_file():
        t0 = time.perf_counter()
        seg_info = _train_seg(ctx, k, rdir, state)
        prog["seg"] = seg_info
        add_time("m_step" if k else "round0_train", t0)
        save_prog()
    seg_model, seg_ck = model_from_checkpoint(rdir / "seg.pt", ctx.device)
    if "seg" not in prog:  # crashed right after the checkpoint: its own record is complete
        prog["seg"] = {**seg_ck.get("train_info", {}), "epochs": seg_ck.get("history", [])}

    # 2. probability maps ----------------------------------------------------------------
    if not (rdir / PROBMAPS).is_dir():
        t0 = time.perf_counter()
        prog["predict"] = _predict_round(ctx, k, rdir, seg_model)
        add_time("predict", t0)
        save_prog()

    # 3. stage 2 ---------------------------------------------------------------------
    if not (rdir / "cls.pt").is_file():
        t0 = time.perf_counter()
        prog["stage2"] = _train_stage2(ctx, k, rdir, state, seg_model)
        add_time("stage2", t0)
        save_prog()
    cls_model, cls_ck = model_from_checkpoint(rdir / "cls.pt", ctx.device)
    if "stage2" not in prog:
        prog["stage2"] = {**cls_ck.get("train_info", {}), "epochs": cls_ck.get("history", [])}

    # 4. validation, heatmaps, metrics ----------------------------------------------------
    t0 = time.perf_counter()
    val = _validate(ctx, k, rdir, seg_model, cls_model) if ctx.val else None
    add_time("validation", t0)
    t0 = time.perf_counter()
    heatmaps = _write_heatmaps(ctx, rdir)
    add_time("heatmaps", t0)
    prog["time_s"]["total_this_call"] = round(time.perf_counter() - t_round, 3)
    prog["time_s"]["total"] = round(
        sum(v for key, v in prog["time_s"].items() if key not in ("total", "total_this_call")), 3
    )
    metrics = {
        "round": k,
        "mode": ctx.mode,
        "software_version": __version__,
        "started_utc": prog["started_utc"],
        "finished_utc": utc_now(),
        "device": str(ctx.device),
        "seg": prog.get("seg", {}),
        "e_step": prog.get("seg", {}).get("e_step"),
        "predict": prog.get("predict", {}),
        "stage2": prog.get("stage2", {}),
        "stage2_loss": prog.get("stage2", {}).get("stage2_loss"),
        "val": val,
        "heatmaps": heatmaps,
        "time_s": prog["time_s"],
    }
    atomic_write_json(rdir / "metrics.json", metrics)
    (rdir / "DONE").write_text(utc_now() + "\n")
    shutil.rmtree(state, ignore_errors=True)
    vtxt = f", val AUC {val['auc']:.3f}" if val and val.get("auc") is not None else ""
    log.info("round %d done: stage-2 loss %.4f%s (%.0f s)", k, metrics["stage2_loss"] or float("nan"), vtxt,
             time.perf_counter() - t_round)
    return metrics


# --------------------------------------------------------------------------- theta1 training


def _annotated_items(ctx: _Ctx):
    from pipeline.data import SOURCE_ANNOTATED, TileItems

    parts, ann_by_index = [], {}
    for i, s in enumerate(ctx.train):
        if s.slide_id in ctx.annotations:
            parts.append(TileItems.make(i, np.arange(s.n_tiles), SOURCE_ANNOTATED))
            ann_by_index[i] = ctx.annotations[s.slide_id]
    return TileItems.concat(parts), ann_by_index


def e_step(prev_maps: str | Path, train: Sequence[SlideEntry], annotated: Sequence[str], em_cfg) -> tuple:
    """The E-step: pseudo-positive and hard-negative tiles from a round's probability maps.

    Parameters
    ----------
    prev_maps : path
        ``probmaps.zarr`` of the previous round.
    train : list of SlideEntry
        The training slides; item ``slide`` indices refer to this list.
    annotated : slide ids
        Slides with pixel annotations (they are not pseudo-labelled).
    em_cfg : EMConfig
        ``threshold_T``, ``reweight_V``, ``floor``.

    Returns
    -------
    (pseudo_positive, hard_negative, stats)
        Two :class:`pipeline.data.TileItems` (targets are made from the maps by
        :class:`pipeline.data.TileTargetDataset`: ``clip(V p, 0, 1)`` resp. zeros)
        and the statistics recorded in ``metrics.json``.
    """
    import zarr

    from pipeline.data import SOURCE_NEGATIVE, SOURCE_PSEUDO, TileItems
    from pipeline.pseudolabels import e_step_slide

    e = em_cfg
    annotated = set(annotated)
    root = zarr.open_group(str(prev_maps), mode="r")
    pp, hn = [], []
    stats = {
        "threshold_T": e.threshold_T,
        "reweight_V": e.reweight_V,
        "floor": e.floor,
        "positive_slides": {"slides": 0, "tiles": 0, "kept": 0, "removed": 0},
        "negative_slides": {"slides": 0, "tiles": 0, "kept": 0, "removed": 0},
        "pseudo_positive_tiles": 0,
        "pseudo_positive_pixel_fraction": 0.0,
        "pseudo_positive_mean_target": 0.0,
        "hard_negative_tiles": 0,
        "annotated_slides_excluded": sorted(annotated),
        "per_slide": {},
    }
    nz_pixels, target_sum, all_pixels = 0.0, 0.0, 0
    for i, s in enumerate(train):
        if s.slide_id in annotated:
            continue
        maps = np.asarray(root[f"{s.slide_id}/maps"][:], np.float32)
        kept, targets, st = e_step_slide(maps, s.label, T=e.threshold_T, V=e.reweight_V, floor=e.floor)
        key = "positive_slides" if s.label == 1 else "negative_slides"
        agg = stats[key]
        agg["slides"] += 1
        agg["tiles"] += st["n_tiles"]
        agg["kept"] += st["n_kept"]
        agg["removed"] += st["n_removed"]
        stats["per_slide"][s.slide_id] = {k: st[k] for k in ("slide_label", "n_tiles", "n_kept", "n_removed")}
        if s.label == 1:
            pp.append(TileItems.make(i, kept, SOURCE_PSEUDO))
            if targets is not None and targets.size:
                nz_pixels += float(np.count_nonzero(targets))
                target_sum += float(targets.sum(dtype=np.float64))
                all_pixels += int(targets.size)
            stats["per_slide"][s.slide_id]["pseudo_positive_pixel_fraction"] = st["pseudo_positive_pixel_fraction"]
        else:
            hn.append(TileItems.make(i, kept, SOURCE_NEGATIVE))
    pp_items, hn_items = TileItems.concat(pp), TileItems.concat(hn)
    stats["pseudo_positive_tiles"] = len(pp_items)
    stats["hard_negative_tiles"] = len(hn_items)
    stats["pseudo_positive_pixel_fraction"] = nz_pixels / all_pixels if all_pixels else 0.0
    stats["pseudo_positive_mean_target"] = target_sum / all_pixels if all_pixels else 0.0
    return pp_items, hn_items, stats


def _seg_trainer(ctx: _Ctx, model, k: int, epochs: int):
    from pipeline.trainers import ColorJitter, create_trainer

    e = ctx.cfg.em
    jitter = ColorJitter(e.brightness, e.contrast, e.saturation, e.hue)
    return create_trainer(
        ctx.cfg.model.seg_trainer,
        model,
        device=ctx.device,
        lr=e.lr,
        weight_decay=e.weight_decay,
        epochs=epochs,
        lr_schedule=e.lr_schedule,
        amp=ctx.amp,
        jitter=jitter if jitter.active else None,
        seed=_seed(ctx.cfg, k, 11),
        progress=ctx.progress,
        desc=f"round {k} theta1",
    )


def _loader(dataset, batch_sampler, ctx: _Ctx):
    from torch.utils.data import DataLoader

    import models

    from pipeline.data import collate

    w = ctx.cfg.runtime.loader_workers
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=w,
        collate_fn=collate,
        worker_init_fn=models.seed_worker if w else None,
        pin_memory=ctx.device.type == "cuda",
        prefetch_factor=4 if w else None,
    )


def _train_seg(ctx: _Ctx, k: int, rdir: Path, state: Path) -> dict:
    """Train theta1 of round k (resuming from state/seg_train.pt); writes rdir/seg.pt."""
    import torch

    from pipeline.data import SeededBatches, TileItems, TileTargetDataset
    from pipeline.inference import model_from_checkpoint
    from pipeline.sampling import MixedBatchSampler

    cfg, e = ctx.cfg, ctx.cfg.em
    epochs = e.epochs_init if k == 0 else e.epochs
    # initial weights
    if k == 0:
        model = _new_model(cfg.model.seg_arch, _seed(cfg, k, 1))
        init = _load_weights(model, cfg.model.seg_weights, "theta1") if cfg.model.seg_weights else "random"
    else:
        model, _ = model_from_checkpoint(round_dir(ctx.run_dir, k - 1) / "seg.pt", "cpu")
        model.train()
        init = f"round {k - 1}"
    trainer = _seg_trainer(ctx, model, k, epochs)
    ckpt_path = state / "seg_train.pt"
    if ckpt_path.is_file():
        trainer.load_state_dict(torch.load(ckpt_path, map_location="cpu", weights_only=False))
        log.info("round %d: resuming theta1 training after epoch %d/%d", k, trainer.epoch, epochs)

    info: dict = {"init": init, "epochs_planned": epochs, "trainer": cfg.model.seg_trainer}
    augment = e.flip or e.rotate90 or trainer.jitter is not None
    paths = [str(s.store_path) for s in ctx.train]
    ids = [s.slide_id for s in ctx.train]

    def save(tr):
        _torch_save_atomic(_ckpt(tr.model, tr, cfg, k, "seg"), ckpt_path)
        ctx.hooks.checkpoint(k, "seg", tr.epoch)

    if ctx.mode == "image":
        batches_for_epoch, extra = _mil_epochs(ctx, k, trainer, paths, ids)
        info.update(extra)
    else:
        ann_items, ann_by_index = _annotated_items(ctx)
        empty = TileItems.concat([])
        pp, hn, e_stats = empty, empty, None
        if k > 0 and ctx.mode == "mixed":
            pp, hn, e_stats = e_step(round_dir(ctx.run_dir, k - 1) / PROBMAPS, ctx.train, list(ctx.annotations), e)
        items = TileItems.concat([ann_items, pp, hn])
        sizes = (len(ann_items), len(pp), len(hn))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the notes are logged below, once
            sampler = MixedBatchSampler(sizes, e.batch_size, e.ratio, seed=_seed(cfg, k, 2))
            if e.batches_per_epoch is not None and e.batches_per_epoch < len(sampler):
                sampler = MixedBatchSampler(sizes, e.batch_size, e.ratio, num_batches=e.batches_per_epoch, seed=_seed(cfg, k, 2))
        notes = list(sampler.notes)
        for n in notes:
            log.info("round %d sampling: %s", k, n)
        dataset = TileTargetDataset(
            paths, items, slide_ids=ids, annotations=ann_by_index,
            probmaps=round_dir(ctx.run_dir, k - 1) / PROBMAPS if len(pp) else None,
            V=e.reweight_V, floor=e.floor, flip=e.flip, rotate90=e.rotate90,
        )
        flat = sampler.as_flat_indices()
        info.update(
            {
                "e_step": e_stats,
                "sources": {"annotated": sizes[0], "pseudo_positive": sizes[1], "hard_negative": sizes[2]},
                "ratio": list(e.ratio),
                "counts_per_batch": list(sampler.counts),
                "batches_per_epoch": len(sampler),
                "sampling_notes": notes,
            }
        )

        def batches_for_epoch(epoch: int):
            return _loader(dataset, SeededBatches(flat, _seed(cfg, k, 3), epoch, augment=augment), ctx)

    trainer.fit(batches_for_epoch, checkpoint=save)
    info["epochs"] = trainer.history
    final = _ckpt(trainer.model, trainer, cfg, k, "seg")
    final["train_info"] = {kk: v for kk, v in info.items() if kk != "epochs"}
    _torch_save_atomic(final, rdir / "seg.pt")
    ckpt_path.unlink(missing_ok=True)
    return info


def _mil_epochs(ctx: _Ctx, k: int, trainer, paths: list[str], ids: list[str]):
    """Image mode (top-K MIL, Campanella et al. 2019): each epoch re-selects every slide's
    ``em.mil_top_k`` highest-ranked tiles under the current theta1 and trains them with the
    slide label as a constant target."""
    from pipeline.data import SOURCE_CONSTANT, SeededBatches, TileItems, TileTargetDataset
    from pipeline.inference import iter_predictions
    from pipeline.sampling import topk_tiles

    cfg, e = ctx.cfg, ctx.cfg.em
    labels = np.array([s.label for s in ctx.train])
    sources = [(p, None) for p in paths]
    selections: list[dict] = []

    def batches_for_epoch(epoch: int):
        maxp = [np.zeros(s.n_tiles, np.float32) for s in ctx.train]
        for si, idx, mp, _ in iter_predictions(
            trainer.model, sources, batch_size=e.predict_batch_size, device=ctx.device,
            loader_workers=cfg.runtime.loader_workers, out_stride=cfg.model.map_stride_px, amp=ctx.amp,
            with_maps=False, progress=ctx.progress, desc=f"round {k} MIL ranking",
        ):
            maxp[si][idx] = mp
        parts = [TileItems.make(i, topk_tiles(maxp[i], e.mil_top_k), SOURCE_CONSTANT, float(labels[i]))
                 for i in range(len(ids))]
        items = TileItems.concat(parts)
        selections.append({"epoch": epoch + 1, "tiles": len(items)})
        ds = TileTargetDataset(paths, items, slide_ids=ids, flip=e.flip, rotate90=e.rotate90)
        rng = np.random.default_rng(_seed(cfg, k, 4) + epoch)
        order = rng.permutation(len(items))
        batches = [order[a : a + e.batch_size].tolist() for a in range(0, len(order), e.batch_size)]
        if e.batches_per_epoch is not None:
            batches = batches[: e.batches_per_epoch]
        augment = e.flip or e.rotate90 or trainer.jitter is not None
        return _loader(ds, SeededBatches(batches, _seed(cfg, k, 3), epoch, augment=augment), ctx)

    return batches_for_epoch, {"mil_top_k": e.mil_top_k, "mil_selections": selections}


# --------------------------------------------------------------------------- predictions


def _predict_round(ctx: _Ctx, k: int, rdir: Path, seg_model) -> dict:
    """theta1 on every tile of the train and val slides -> rdir/probmaps.zarr (resumable per slide)."""
    cfg = ctx.cfg
    return write_probmaps(
        seg_model, ctx.predicted, rdir / PROBMAPS, tile_px=int(ctx.cohort.tiling["tile_px"]),
        map_stride_px=cfg.model.map_stride_px, batch_size=cfg.em.predict_batch_size, device=ctx.device,
        loader_workers=cfg.runtime.loader_workers, amp=ctx.amp, progress=ctx.progress, desc=f"round {k} predict",
        attrs={"round": k, "seg_arch": cfg.model.seg_arch},
        on_slide=lambda n: ctx.hooks.checkpoint(k, "predict", n),
    )


def write_probmaps(
    seg_model,
    slides: Sequence[SlideEntry],
    out: str | Path,
    *,
    tile_px: int,
    map_stride_px: int = 4,
    batch_size: int = 64,
    device=None,
    loader_workers: int = 0,
    amp: bool = True,
    progress: bool = False,
    desc: str = "predict",
    attrs: dict | None = None,
    on_slide: Callable[[int], None] | None = None,
) -> dict:
    """The E-step's prediction pass: theta1 maps of every tile of ``slides`` into a Zarr.

    Layout: ``out/<slide_id>/maps`` (N, h, w) float16 (chunks of one tile, shards of
    ``SHARD_TILES``) and ``out/<slide_id>/max_prob`` (N,) float32. The Zarr is built as
    ``.<name>.partial`` next to ``out``; slides already complete there are kept (resume),
    and it is renamed to ``out`` when every slide is done. ``on_slide(n_done)`` runs after
    each slide is on disk.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    import zarr
    from zarr.codecs import ZstdCodec

    from pipeline.inference import iter_predictions

    out = Path(out)
    h = tile_px // map_stride_px
    part = out.with_name(f".{out.name}.partial")
    root = zarr.open_group(str(part), mode="a", zarr_format=3)
    if not root.attrs.get("format"):
        root.attrs.update({
            "format": PROBMAPS_FORMAT, "format_version": 1, "tile_px": tile_px, "map_stride_px": map_stride_px,
            "complete": False, **(attrs or {}),
        })

    def complete_in_part(sid: str) -> bool:  # read the group's zarr.json directly: cheap
        meta = _load_json(part / sid / "zarr.json", {}) or {}
        return bool(meta.get("attributes", {}).get("complete"))

    todo = [s for s in slides if not complete_in_part(s.slide_id)]
    t0 = time.perf_counter()
    n_tiles = sum(s.n_tiles for s in todo)
    done_slides = len(slides) - len(todo)

    # All Zarr work runs in order on one background thread, overlapping the forward passes.
    def prepare(s: SlideEntry) -> None:
        if (part / s.slide_id).exists():
            shutil.rmtree(part / s.slide_id)
        g = root.create_group(s.slide_id, attributes={
            "label": s.label, "split": s.split, "n_tiles": s.n_tiles, "complete": False})
        n = s.n_tiles
        g.create_array(
            "maps", shape=(n, h, h), chunks=(1, h, h), shards=(max(1, min(n, SHARD_TILES)), h, h) if n else None,
            dtype="float16", compressors=ZstdCodec(level=1), fill_value=0,
        )
        g.create_array("max_prob", shape=(n,), chunks=(max(1, n),), dtype="float32", fill_value=0)

    def write_maps(s: SlideEntry, a: int, data: np.ndarray) -> None:
        root[s.slide_id]["maps"][a : a + len(data)] = data

    def write_done(s: SlideEntry, maxp: np.ndarray) -> None:
        g = root[s.slide_id]
        if len(maxp):
            g["max_prob"][:] = maxp
        g.attrs.update({"complete": True})

    # Per slide, maps are buffered until a shard is full (a shard is written whole, once);
    # a slide is marked complete only after its maps are written.
    cur: dict = {"slide": None, "buf": [], "start": 0, "maxp": None}
    pending: deque = deque()  # (future, slide finished by it or None)

    def flush(writer, s: SlideEntry, final_flush: bool) -> None:
        if not cur["buf"]:
            return
        data = np.concatenate(cur["buf"])
        n_full = len(data) if final_flush else (len(data) // SHARD_TILES) * SHARD_TILES
        if n_full:
            pending.append((writer.submit(write_maps, s, cur["start"], data[:n_full]), None))
            cur["start"] += n_full
        cur["buf"] = [data[n_full:]] if n_full < len(data) else []

    def poll(block: bool) -> None:
        nonlocal done_slides
        while pending and (block or pending[0][0].done()):
            fut, s = pending.popleft()
            fut.result()
            if s is not None:
                done_slides += 1
                if on_slide is not None:
                    on_slide(done_slides)

    active = [s for s in todo if s.n_tiles]
    with ThreadPoolExecutor(1, thread_name_prefix="probmaps-writer") as writer:
        try:
            for s in todo:
                pending.append((writer.submit(prepare, s), None))
                if s.n_tiles == 0:
                    pending.append((writer.submit(write_done, s, np.zeros(0, np.float32)), s))
            for si, idx, mp, maps in iter_predictions(
                seg_model, [(s.store_path, None) for s in active], batch_size=batch_size, device=device,
                loader_workers=loader_workers, out_stride=map_stride_px, amp=amp, progress=progress, desc=desc,
            ):
                s = active[si]
                if cur["slide"] is not s:
                    cur.update({"slide": s, "buf": [], "start": 0, "maxp": np.zeros(s.n_tiles, np.float32)})
                cur["buf"].append(maps)
                cur["maxp"][idx] = mp
                flush(writer, s, final_flush=False)
                if idx[-1] == s.n_tiles - 1:
                    flush(writer, s, final_flush=True)
                    pending.append((writer.submit(write_done, s, cur["maxp"]), s))
                poll(block=False)
            poll(block=True)
        finally:
            for f, _ in pending:
                f.cancel()
    secs = time.perf_counter() - t0
    root.attrs.update({"complete": True})
    if out.exists():
        shutil.rmtree(out)
    os.replace(part, out)
    return {
        "slides": len(slides),
        "tiles": n_tiles,
        "seconds": round(secs, 3),
        "tiles_per_s": round(n_tiles / secs, 1) if secs > 0 and n_tiles else None,
        "map_px": h,
    }


def _max_probs(rdir: Path, slide_id: str) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_array(str(rdir / PROBMAPS / slide_id / "max_prob"), mode="r")[:], np.float32)


# --------------------------------------------------------------------------- stage 2


def _slide_bce(p: np.ndarray, y: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), eps, 1 - eps)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


def _balanced_mean(losses: np.ndarray, y: np.ndarray) -> float:
    parts = [losses[y == c].mean() for c in (0, 1) if (y == c).any()]
    return float(np.mean(parts)) if parts else float("nan")


def _train_stage2(ctx: _Ctx, k: int, rdir: Path, state: Path, seg_model) -> dict:
    import torch

    from pipeline.data import SeededBatches, SlideTopKDataset
    from pipeline.inference import classify_tiles
    from pipeline.sampling import balanced_slide_sampler, topk_tiles
    from pipeline.trainers import ColorJitter, create_trainer

    cfg, s2, e = ctx.cfg, ctx.cfg.stage2, ctx.cfg.em
    slides = [s for s in ctx.train if s.n_tiles > 0]
    if len(slides) < len(ctx.train):
        log.warning("stage 2 skips %d train slide(s) without tissue tiles", len(ctx.train) - len(slides))
    topk = [topk_tiles(_max_probs(rdir, s.slide_id), s2.top_k) for s in slides]
    labels = np.array([s.label for s in slides])
    if labels.min() == labels.max():
        raise UsageError("stage 2 needs positive and negative train slides with tissue tiles")
    model = _new_model(cfg.model.cls_arch, _seed(cfg, k, 5))
    init = _load_weights(model, cfg.model.cls_weights, "theta2") if cfg.model.cls_weights else "random"
    jitter = ColorJitter(e.brightness, e.contrast, e.saturation, e.hue) if s2.augment else None
    trainer = create_trainer(
        cfg.model.cls_trainer, model, device=ctx.device, lr=s2.lr, weight_decay=s2.weight_decay, epochs=s2.epochs,
        lr_schedule=e.lr_schedule, amp=ctx.amp, jitter=jitter if jitter is not None and jitter.active else None,
        seed=_seed(cfg, k, 12), progress=ctx.progress, desc=f"round {k} theta2",
    )
    ckpt_path = state / "cls_train.pt"
    if ckpt_path.is_file():
        trainer.load_state_dict(torch.load(ckpt_path, map_location="cpu", weights_only=False))
        log.info("round %d: resuming theta2 training after epoch %d/%d", k, trainer.epoch, s2.epochs)
    flip, rot = (e.flip, e.rotate90) if s2.augment else (False, False)
    ds = SlideTopKDataset([s.store_path for s in slides], topk, labels, s2.top_k, flip=flip, rotate90=rot)
    n_per_epoch = s2.slides_per_epoch or 2 * int(max(labels.sum(), len(labels) - labels.sum()))
    augment = flip or rot or trainer.jitter is not None

    def batches_for_epoch(epoch: int):
        order = balanced_slide_sampler(labels, n_per_epoch, seed=_seed(cfg, k, 6) + epoch)
        batches = [order[a : a + s2.batch_slides].tolist() for a in range(0, len(order), s2.batch_slides)]
        return _loader(ds, SeededBatches(batches, _seed(cfg, k, 7), epoch, augment=augment), ctx)

    def save(tr):
        _torch_save_atomic(_ckpt(tr.model, tr, cfg, k, "cls"), ckpt_path)
        ctx.hooks.checkpoint(k, "cls", tr.epoch)

    trainer.fit(batches_for_epoch, checkpoint=save)
    # the stage-2 loss of this round: final theta2 on every train slide, no augmentation
    probs = np.array([
        float(classify_tiles(trainer.model, s.store_path, t, batch_size=e.predict_batch_size, device=ctx.device,
                             amp=ctx.amp).mean())
        for s, t in zip(slides, topk)
    ])
    losses = _slide_bce(probs, labels)
    stage2_loss = _balanced_mean(losses, labels)
    info = {
        "init": init,
        "trainer": cfg.model.cls_trainer,
        "top_k": s2.top_k,
        "n_pos": int(labels.sum()),
        "n_neg": int(len(labels) - labels.sum()),
        "slides_per_epoch": n_per_epoch,
        "epochs": trainer.history,
        "stage2_loss": stage2_loss,
        "stage2_loss_definition": "class-balanced mean BCE of mean theta2 probability over the top-K tiles, train slides, eval mode",
        "train_slide_probabilities": {s.slide_id: float(p) for s, p in zip(slides, probs)},
    }
    final = _ckpt(trainer.model, trainer, cfg, k, "cls")
    final["train_info"] = {kk: v for kk, v in info.items() if kk != "epochs"}
    _torch_save_atomic(final, rdir / "cls.pt")
    ckpt_path.unlink(missing_ok=True)
    return info


# --------------------------------------------------------------------------- validation and pictures


def _validate(ctx: _Ctx, k: int, rdir: Path, seg_model, cls_model) -> dict:
    from pipeline.inference import RoundModels, score_slide
    from pipeline.metrics import slide_metrics

    cfg = ctx.cfg
    rm = RoundModels(
        seg_model=seg_model, cls_model=cls_model, top_k=cfg.stage2.top_k, tile_px=int(ctx.cohort.tiling["tile_px"]),
        tiling_hash=str(ctx.cohort.tiling["config_hash"]), threshold_at_full_sensitivity=None, round=k,
        config=cfg.to_dict(), device=ctx.device, map_stride_px=cfg.model.map_stride_px, amp=ctx.amp,
    )
    ys, ps, per = [], [], {}
    for s in ctx.val:
        if s.n_tiles == 0:
            log.warning("val slide %s has no tissue tiles; left out of the validation metrics", s.slide_id)
            continue
        r = score_slide(rm, s.store_path, batch_size=cfg.em.predict_batch_size, tile_max_probs=_max_probs(rdir, s.slide_id))
        ys.append(s.label)
        ps.append(r["probability"])
        per[s.slide_id] = {"label": s.label, "probability": r["probability"]}
    out = slide_metrics(ys, ps) if ys else {"auc": None, "specificity_at_full_sensitivity": None,
                                              "threshold_at_full_sensitivity": None, "n_pos": 0, "n_neg": 0}
    out["slides"] = per
    return out


def _heat_canvas(store, maps: np.ndarray, max_side: int = 1024):
    import cv2

    thumb = store.thumbnail
    mds = store.mask_downsample
    bx, by = store.attrs.get("slide", {}).get("bounds_xywh", (0, 0, 0, 0))[:2]
    tile_l0 = store.tile_px * store.downsample
    map_l0 = tile_l0 / maps.shape[-1] if maps.size else tile_l0
    H0, W0 = thumb.shape[0] * mds, thumb.shape[1] * mds
    scale = max(map_l0, max(H0, W0) / max_side)
    ch, cw = max(1, int(math.ceil(H0 / scale))), max(1, int(math.ceil(W0 / scale)))
    heat = np.zeros((ch, cw), np.float32)
    valid = np.zeros((ch, cw), np.float32)
    size = max(1, int(round(tile_l0 / scale)))
    for (x, y), m in zip(store.coords, maps):
        x0, y0 = int(round((x - bx) / scale)), int(round((y - by) / scale))
        mm = cv2.resize(np.asarray(m, np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + size, cw), min(y0 + size, ch)
        if xb <= xa or yb <= ya:
            continue
        sub = mm[ya - y0 : yb - y0, xa - x0 : xb - x0]
        heat[ya:yb, xa:xb] = np.maximum(heat[ya:yb, xa:xb], sub)
        valid[ya:yb, xa:xb] = 1
    base = cv2.resize(thumb, (cw, ch), interpolation=cv2.INTER_AREA if scale > mds else cv2.INTER_LINEAR)
    return base, heat, valid


def _write_heatmaps(ctx: _Ctx, rdir: Path) -> list[str]:
    import zarr

    from wsi.preview import heatmap_overlay, save_png
    from wsi.store import TileStore

    n = ctx.cfg.em.heatmap_slides
    if n <= 0:
        return []
    pool = [s for s in ctx.val + ctx.train if s.n_tiles > 0]
    pos = [s for s in pool if s.label == 1]
    neg = [s for s in pool if s.label == 0]
    chosen = pos[: (n + 1) // 2] + neg[: n // 2]
    chosen += [s for s in pool if s not in chosen][: n - len(chosen)]
    out_dir = rdir / "heatmaps"
    out_dir.mkdir(exist_ok=True)
    root = zarr.open_group(str(rdir / PROBMAPS), mode="r")
    written = []
    for s in chosen:
        store = TileStore(s.store_path)
        maps = np.asarray(root[f"{s.slide_id}/maps"][:], np.float32)
        base, heat, valid = _heat_canvas(store, maps)
        img = heatmap_overlay(base, heat, valid=valid)
        path = out_dir / f"{s.slide_id}.png"
        tmp = out_dir / f".{s.slide_id}.tmp.png"
        save_png(tmp, img)
        os.replace(tmp, path)
        written.append(str(path.relative_to(rdir)))
    return written


# --------------------------------------------------------------------------- comparison of runs


def compare_runs(run_dirs: Sequence[str | Path]) -> list[dict]:
    """One row per run: mode, best round, its stage-2 loss and validation metrics."""
    rows = []
    for d in run_dirs:
        meta = read_run(d)
        best = meta.get("best_round")
        m = _load_json(round_dir(d, best) / "metrics.json", {}) if best is not None else {}
        val = m.get("val") or {}
        rows.append({
            "run": str(d),
            "mode": meta.get("mode"),
            "rounds": len(meta.get("rounds_completed", [])),
            "best_round": best,
            "stage2_loss": m.get("stage2_loss"),
            "val_auc": val.get("auc"),
            "val_specificity_at_full_sensitivity": val.get("specificity_at_full_sensitivity"),
            "val_threshold_at_full_sensitivity": val.get("threshold_at_full_sensitivity"),
            "n_pos": val.get("n_pos"),
            "n_neg": val.get("n_neg"),
            "train_seconds": sum((_load_json(round_dir(d, r) / "metrics.json", {}).get("time_s", {}).get("total") or 0)
                                 for r in meta.get("rounds_completed", [])),
        })
    return rows


def format_comparison(rows: list[dict]) -> str:
    def f(v, nd=3):
        return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    head = f"{'mode':<7} {'rounds':>6} {'best':>4} {'stage2 loss':>11} {'val AUC':>7} {'spec@100%sens':>13} {'thr':>6} {'pos/neg':>7} {'train s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['mode']:<7} {r['rounds']:>6} {f(r['best_round']):>4} {f(r['stage2_loss'], 4):>11} {f(r['val_auc']):>7} "
            f"{f(r['val_specificity_at_full_sensitivity']):>13} {f(r['val_threshold_at_full_sensitivity']):>6} "
            f"{str(r['n_pos']) + '/' + str(r['n_neg']):>7} {r['train_seconds']:>8.0f}"
        )
    return "\n".join(lines)


def write_comparison(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Write ``comparison.json`` and ``comparison.txt`` (the table) into ``out_dir``."""
    from pipeline.batch import atomic_write_text

    rows = compare_runs(run_dirs)
    out = Path(out_dir)
    atomic_write_json(out / "comparison.json", rows)
    atomic_write_text(out / "comparison.txt", format_comparison(rows) + "\n")
    return out / "comparison.txt"
