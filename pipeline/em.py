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
   (best: ``em.select_by`` among ``em.select_rounds``, :meth:`pipeline.run.RunDir.select_best`).

The run directory's layout and identity belong to :mod:`pipeline.run`; the
stages to :mod:`pipeline.mstep` (theta1), :mod:`pipeline.probmaps` (maps and
heatmaps) and :mod:`pipeline.stage2` (theta2, validation). This module only
orders them.

Crash safety: every file is written under a temporary name and renamed;
training checkpoints after every epoch (``state/seg_train.pt``,
``state/cls_train.pt``), predictions per slide. A re-run resumes at the last
checkpoint and reproduces, on CPU, exactly what an uninterrupted run gives.

Under torchrun (:mod:`pipeline.distributed`): every rank runs this same code.
*Predictions* (maps of train and val slides, validation, stage-2 loss, MIL ranking)
are sharded by slide; *training* runs in ``DistributedDataParallel`` on each rank's
slice of every global batch of the one seeded sampler (the 2:1:7 mix holds per global
batch); rank 0 alone writes ``run.json``, ``best``, checkpoints, maps' renames,
heatmaps and ``metrics.json`` and makes every decision read from the run directory
(:meth:`~pipeline.distributed.Dist.main_only`), so the ranks never disagree about
where a run stands. Checkpoints hold no trace of the world size: a run resumes with
any number of ranks.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from pipeline.batch import RunLock, UsageError, ensure_writable_dir, utc_now
from pipeline.config import Config, ConfigError
from pipeline.distributed import SINGLE, Dist, session
from pipeline.labels import Cohort, SlideEntry, load_cohort
from pipeline.run import RunDir, load_weights, new_model, run_identity
from wsi import __version__
from wsi.atomic import atomic_write_json
from wsi.store import stores_lock

log = logging.getLogger("wsi_pipeline")

__all__ = ["EMHooks", "run_em"]


@dataclass
class EMHooks:
    """Callbacks for callers that watch a run (progress UIs, fault-injection tests).

    ``on_checkpoint(round, step, epoch)`` runs after each checkpoint is on disk;
    ``step`` is ``'seg'``, ``'predict'`` (epoch = slides done) or ``'cls'``.
    ``on_round_end(round, metrics)`` runs when a round is finished and recorded, with the
    round's ``metrics.json`` content (experiment trackers, :mod:`pipeline.tracking`).
    """

    on_checkpoint: Callable[[int, str, int], None] | None = None
    on_round_end: Callable[[int, dict], None] | None = None

    def checkpoint(self, k: int, step: str, epoch: int) -> None:
        if self.on_checkpoint is not None:
            self.on_checkpoint(k, step, epoch)

    def round_end(self, k: int, metrics: dict) -> None:
        if self.on_round_end is not None:
            self.on_round_end(k, metrics)


@dataclass
class RoundContext:
    """What every step of a round needs: settings, data, where it writes, where it computes."""

    cfg: Config
    cohort: Cohort
    run: RunDir
    annotations: dict  # slide_id -> PixelAnnotation (train slides only)
    device: object
    progress: bool
    hooks: EMHooks
    train: list[SlideEntry] = field(default_factory=list)
    val: list[SlideEntry] = field(default_factory=list)
    dist: Dist = SINGLE
    theta1_from: RunDir | None = None  # --theta1-from: copy each round's theta1 from this run (pipeline.reuse)

    @property
    def mode(self) -> str:
        return self.cfg.em.mode

    @property
    def amp(self) -> bool:
        return self.cfg.runtime.amp

    @property
    def predicted(self) -> list[SlideEntry]:
        return self.train + self.val


# --------------------------------------------------------------------------- checks before any work


def _check_models(cfg: Config) -> None:
    """Trainers and weights files exist and fit (fail now, not after an hour of training); the
    architectures were checked by ``Config.validate_for_training``."""
    from pipeline.trainers import list_trainers

    for name in ("seg_trainer", "cls_trainer"):
        if getattr(cfg.model, name) not in list_trainers():
            raise ConfigError(f"model.{name}={getattr(cfg.model, name)!r} is not a trainer; choose one of {list_trainers()}")
    m = cfg.model
    for name, arch, kwargs, what in (("seg_weights", m.seg_arch, m.seg_arch_kwargs, "theta1"),
                                     ("cls_weights", m.cls_arch, m.cls_arch_kwargs, "theta2")):
        w = getattr(m, name)
        if w is None:
            continue
        if not Path(w).is_file():
            raise UsageError(f"{w}: weights file not found (model.{name} / --weights); give a local file")
        load_weights(new_model(arch, 0, kwargs), w, what)


def _annotations(cfg: Config, cohort: Cohort, annotations: Sequence[str | Path]) -> dict:
    """The pixel annotations of the labelled slides (``mixed``/``pixel``); none in ``image`` mode."""
    from pipeline.data import load_pixel_annotations

    if cfg.em.mode == "image":
        if annotations:
            log.info("--mode image uses no pixel annotations; the %d given path(s) are ignored", len(annotations))
        return {}
    if not annotations:
        raise UsageError(
            f"--mode {cfg.em.mode} needs pixel annotations of some positive train slides: pass --annotations "
            "(GeoJSON files / mask images or their folder), or use --mode image"
        )
    return load_pixel_annotations(
        annotations, cohort.by_id(), positive_classes=cfg.em.positive_classes,
        region_classes=cfg.em.annotated_region_classes, mask_downsample=cfg.em.mask_downsample,
    )


def _splits(cfg: Config, cohort: Cohort, annotated: set[str]) -> tuple[list[SlideEntry], list[SlideEntry]]:
    """Train and val slides: the labels' splits, or (``em.val_fraction``, no val split) a val split carved
    out of the training patients, never from patients with annotated slides."""
    from pipeline.labels import carve_val_split
    from pipeline.sampling import round_seed

    train, val = cohort.train, cohort.val
    frac = cfg.em.val_fraction
    if frac <= 0:
        return train, val
    if val:
        log.info("%s has a val split; em.val_fraction=%g is not used", cohort.labels_path, frac)
        return train, val
    keep = {s.patient for s in train if s.slide_id in annotated}
    pool = [s for s in train if s.patient not in keep]
    rest, val = carve_val_split(pool, frac, round_seed(cfg.em.seed, 0, 99))
    ids = {s.slide_id for s in val}
    log.info("val split carved out by patient (em.val_fraction=%g): %d slides (%d positive)",
             frac, len(val), sum(s.label for s in val))
    return [s for s in train if s.slide_id not in ids], val


def _check_distributed(cfg: Config, d: Dist) -> None:
    if d.enabled and (cfg.model.seg_mix or cfg.model.cls_mix):
        raise ConfigError("model.seg_mix / model.cls_mix: batch mixers mix items across the whole batch, and under "
                          "torchrun each rank holds a slice of it; run em-round with mixers in one process, or drop them")


def _train_annotations(ann_all: dict, train: Sequence[SlideEntry], cohort: Cohort, mode: str) -> dict:
    """Only train slides' annotations train theta1; say which were left out."""
    if mode == "image":
        return {}
    train_ids = {s.slide_id for s in train}
    skipped = sorted(sid for sid in ann_all if sid not in train_ids)
    if skipped:
        log.warning("annotations of non-train slides are not used for training: %s", ", ".join(skipped))
    ann = {sid: a for sid, a in ann_all.items() if sid in train_ids}
    if not ann:
        raise UsageError(
            "none of the given annotations belongs to a train slide; the annotated slides must have split 'train' "
            f"in {cohort.labels_path}"
        )
    return ann


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
    allow_restore: bool = False,
    progress: bool = True,
    hooks: EMHooks | None = None,
    theta1_from: str | Path | None = None,
) -> dict:
    """Make sure rounds ``0 .. rounds-1`` of ``run_dir`` are complete; returns a summary.

    Finished rounds are skipped (``force=True`` deletes every round and starts over);
    an interrupted round resumes from its last checkpoint. ``mode pixel`` has one round.
    A tile store whose content changed since the run read it is refused, unless
    ``allow_restore=True``: then every round (each one read all train and val stores) is
    trained again on the stores as they are, and ``run.json`` records their new content.
    ``theta1_from``: a finished run of the same inputs and theta1 settings whose rounds' theta1 (weights and
    probability maps) this run copies instead of training; only stage 2 is trained (:mod:`pipeline.reuse`).

    Raises
    ------
    UsageError
        Bad labels, stores, annotations, or a run directory made with another config
        or other inputs (one line naming the file and the fix).
    ConfigError
        Config values that cannot train (e.g. tiles not a multiple of 32 px).
    """
    import torch

    cfg = config
    cfg.validate()
    if rounds < 1:
        raise UsageError(f"--rounds must be >= 1, got {rounds}")
    cohort = load_cohort(stores, labels)
    cfg.validate_for_training(tile_px=cohort.tiling["tile_px"], where=f"tile_px of the stores in {cohort.stores_dir}")
    _check_models(cfg)
    if cohort.unlabelled:
        log.info("%d store(s) without a label are ignored: %s", len(cohort.unlabelled), ", ".join(cohort.unlabelled[:8]))
    ann_all = _annotations(cfg, cohort, annotations)
    train, val = _splits(cfg, cohort, set(ann_all))
    ann = _train_annotations(ann_all, train, cohort, cfg.em.mode)
    if cfg.runtime.torch_threads > 0:
        torch.set_num_threads(cfg.runtime.torch_threads)
    run = RunDir(run_dir)
    with session(cfg.runtime.device, cfg.runtime.dist_timeout_s) as (d, device):
        _check_distributed(cfg, d)
        ctx = RoundContext(cfg, cohort, run, ann, device, progress and d.is_main,
                           (hooks or EMHooks()) if d.is_main else EMHooks(), train=train, val=val, dist=d,
                           theta1_from=RunDir(theta1_from) if theta1_from is not None else None)
        ensure_writable_dir(run.path, "run directory", "--run")
        with d.held_by_main(lambda: RunLock(run.path, "em-round")), stores_lock(cohort.stores_dir, exclusive=False):
            return _run_rounds(ctx, rounds, force, allow_restore)


def _open_run(ctx: RoundContext, rounds: int, force: bool, allow_restore: bool = False) -> dict:
    """run.json: created, or checked against this call's inputs; ``--force`` clears the rounds and
    ``--allow-restore`` the rounds trained on stores that changed since."""
    from pipeline.reuse import check_source

    cfg, run = ctx.cfg, ctx.run
    ident = run_identity(cfg, ctx.cohort, ctx.annotations, ctx.train, ctx.val)
    if ctx.theta1_from is not None:
        ident["theta1_from"] = check_source(ctx.theta1_from, ident, rounds)
    if run.exists():
        meta = run.read_meta()
        changed = run.check_compatible(meta, ident, allow_restore=allow_restore)
        if changed:
            meta = run.restore_stores(meta, ident, changed)
    else:
        meta = run.create(ident)
    if force:
        meta = run.clear_rounds(meta)
    return run.select_best(meta, cfg)  # the rule may have changed since the last call: re-sync run.json and best


def _run_rounds(ctx: RoundContext, rounds: int, force: bool, allow_restore: bool = False) -> dict:
    cfg, run, d = ctx.cfg, ctx.run, ctx.dist
    target = 1 if cfg.em.mode == "pixel" else rounds
    meta = d.main_only(lambda: _open_run(ctx, target, force, allow_restore), what="rank 0 opening the run")
    if cfg.em.mode == "pixel" and rounds > 1:
        log.warning("--mode pixel has a single round (theta1 from the annotations, no EM); running round 0 only")
    log.info("EM run %s: mode %s, %d train slides (%d annotated), %d val slides, device %s",
             run.path, cfg.em.mode, len(ctx.train), len(ctx.annotations), len(ctx.val), ctx.device)
    summary = {"run_dir": str(run.path), "mode": cfg.em.mode, "rounds_run": [], "rounds_skipped": []}
    for k in range(target):
        if d.main_only(lambda: run.is_done(k)):
            summary["rounds_skipped"].append(k)
            if k not in meta.get("rounds_completed", []):  # finished just before a crash: record it now
                meta = d.main_only(lambda: run.record_round(meta, k, run.metrics(k, required=False), cfg))
            log.info("round %d is complete; skipped (--force re-runs it)", k)
            continue
        metrics = _run_round(ctx, k)
        meta = d.main_only(lambda: _record(ctx, meta, k, metrics), what="rank 0 recording the round")
        summary["rounds_run"].append(k)
    d.main_only(run.empty_trash)  # rounds an earlier --force / --allow-restore moved aside: the new ones are complete
    summary.update({
        "rounds_completed": meta["rounds_completed"],
        "best_round": meta["best_round"],
        "round_losses": meta["round_losses"],
        "rounds": d.main_only(lambda: {int(k): run.metrics(int(k), required=False) for k in meta["rounds_completed"]}),
    })
    return summary


def _record(ctx: RoundContext, meta: dict, k: int, metrics: dict) -> dict:
    meta = ctx.run.record_round(meta, k, metrics, ctx.cfg)
    ctx.hooks.round_end(k, metrics)
    return meta


# --------------------------------------------------------------------------- one round


class _Progress:
    """A round's in-progress record (``state/progress.json``): step results and time per step."""

    def __init__(self, path: Path, dist: Dist = SINGLE):
        self.path, self.dist = path, dist
        try:
            self.data = json.loads(path.read_text())
        except (OSError, ValueError):
            self.data = {}
        self.data.setdefault("time_s", {})
        self.data.setdefault("started_utc", utc_now())

    def record(self, step: str, timing: str, fn: Callable[[], dict]) -> None:
        t0 = time.perf_counter()
        self.data[step] = fn()
        self.add_time(timing, t0)
        self.dist.main_only(lambda: atomic_write_json(self.path, self.data), what="rank 0 saving progress")

    def add_time(self, step: str, t0: float) -> None:
        times = self.data["time_s"]
        times[step] = round(times.get(step, 0.0) + time.perf_counter() - t0, 3)

    def total(self, t_call: float) -> dict:
        times = self.data["time_s"]
        times["total_this_call"] = round(time.perf_counter() - t_call, 3)
        times["total"] = round(sum(v for key, v in times.items() if key not in ("total", "total_this_call")), 3)
        return times


def _run_round(ctx: RoundContext, k: int) -> dict:
    """theta1, its maps, theta2, validation and heatmaps of round k; each step resumes where it stopped."""
    from pipeline.mstep import train_theta1
    from pipeline.probmaps import write_round_heatmaps
    from pipeline.reuse import copy_theta1
    from pipeline.run import model_from_checkpoint
    from pipeline.stage2 import train_theta2, validate_round

    run, d = ctx.run, ctx.dist
    d.main_only(lambda: run.state_dir(k).mkdir(parents=True, exist_ok=True))
    prog = _Progress(run.state_dir(k) / "progress.json", d)
    t_round = time.perf_counter()
    have = d.main_only(lambda: _round_state(run, k))
    log.info("round %d (%s): %s", k, ctx.mode, "resuming" if have["resuming"] else "start")

    if not have["seg"] and ctx.theta1_from is not None:
        prog.record("theta1_from", "theta1_copy",
                    lambda: d.main_only(lambda: copy_theta1(ctx.theta1_from, run, k), what="rank 0 copying theta1"))
        have = d.main_only(lambda: _round_state(run, k))
    if not have["seg"]:
        prog.record("seg", "m_step" if k else "round0_train", lambda: train_theta1(ctx, k))
    seg_model, seg_ck = model_from_checkpoint(run.checkpoint(k, "seg"), ctx.device)
    prog.data.setdefault("seg", {**seg_ck.get("train_info", {}), "epochs": seg_ck.get("history", [])})
    if not have["maps"]:
        prog.record("predict", "predict", lambda: _predict_round(ctx, k, seg_model))
    if not have["cls"]:
        prog.record("stage2", "stage2", lambda: train_theta2(ctx, k))
    cls_model, cls_ck = model_from_checkpoint(run.checkpoint(k, "cls"), ctx.device)
    prog.data.setdefault("stage2", {**cls_ck.get("train_info", {}), "epochs": cls_ck.get("history", [])})

    t0 = time.perf_counter()
    val = validate_round(ctx, k, seg_model, cls_model) if ctx.val else None
    prog.add_time("validation", t0)
    t0 = time.perf_counter()
    heat_dir = run.round_dir(k) / "heatmaps"
    heatmaps = d.main_only(lambda: write_round_heatmaps(ctx.val + ctx.train, run.probmaps(k), heat_dir,
                                                        ctx.cfg.em.heatmap_slides), what="rank 0 writing heatmaps")
    prog.add_time("heatmaps", t0)
    metrics = _round_metrics(ctx, k, prog, val, [str(p.relative_to(run.round_dir(k))) for p in heatmaps], t_round)
    d.main_only(lambda: run.finish_round(k, metrics), what="rank 0 finishing the round")
    vtxt = f", val AUC {val['auc']:.3f}" if val and val.get("auc") is not None else ""
    log.info("round %d done: stage-2 loss %.4f%s (%.0f s)", k, metrics["stage2_loss"] or float("nan"), vtxt,
             time.perf_counter() - t_round)
    return metrics


def _round_state(run: RunDir, k: int) -> dict:
    """Which steps of round k are on disk (rank 0 reads it; every rank acts on the same answer)."""
    partial = run.probmaps(k).with_name(".probmaps.zarr.partial")
    have = {"seg": run.checkpoint(k, "seg").is_file(), "maps": run.probmaps(k).is_dir(),
            "cls": run.checkpoint(k, "cls").is_file()}
    started = (run.checkpoint(k, "seg"), run.checkpoint(k, "cls"), run.state_dir(k) / "seg_train.pt", partial)
    return {**have, "resuming": any(p.exists() for p in started)}


def _round_metrics(ctx: RoundContext, k: int, prog: _Progress, val, heatmaps: list[str], t_round: float) -> dict:
    out = _metrics_record(ctx, k, prog, val, heatmaps, t_round)
    if ctx.dist.enabled:
        out["distributed"] = ctx.dist.describe()
    return out


def _metrics_record(ctx: RoundContext, k: int, prog: _Progress, val, heatmaps: list[str], t_round: float) -> dict:
    d = prog.data
    return {
        "round": k,
        "mode": ctx.mode,
        "software_version": __version__,
        "started_utc": d["started_utc"],
        "finished_utc": utc_now(),
        "device": str(ctx.device),
        "seg": d.get("seg", {}),
        "theta1_from": d.get("theta1_from"),
        "e_step": d.get("seg", {}).get("e_step"),
        "predict": d.get("predict", {}),
        "stage2": d.get("stage2", {}),
        "stage2_loss": d.get("stage2", {}).get("stage2_loss"),
        "val": val,
        "warnings": (((d.get("seg", {}).get("e_step") or {}).get("warnings") or [])
                     + d.get("stage2", {}).get("warnings", []) + ((val or {}).get("warnings") or [])),
        "heatmaps": heatmaps,
        "time_s": prog.total(t_round),
    }


def _predict_round(ctx: RoundContext, k: int, seg_model) -> dict:
    """theta1 on every tile of the train and val slides -> round_k/probmaps.zarr (resumable per slide)."""
    from pipeline.probmaps import write_probmaps

    cfg = ctx.cfg
    return write_probmaps(
        seg_model, ctx.predicted, ctx.run.probmaps(k), tile_px=int(ctx.cohort.tiling["tile_px"]),
        map_stride_px=cfg.model.map_stride_px, batch_size=cfg.em.predict_batch_size, device=ctx.device,
        loader_workers=cfg.runtime.loader_workers, amp=ctx.amp, progress=ctx.progress, desc=f"round {k} predict",
        attrs={"round": k, "seg_arch": cfg.model.seg_arch},
        on_slide=lambda n: ctx.hooks.checkpoint(k, "predict", n), dist=ctx.dist,
    )
