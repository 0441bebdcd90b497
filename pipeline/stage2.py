"""Stage 2 of an EM round (Li et al.): the slide classifier theta2 on each slide's top-K tiles, and validation.

Per slide the ``stage2.top_k`` tiles with the highest maximum theta1 probability
(read from the round's probability maps) are theta2's input; theta2 is trained so
that the mean of its K tile probabilities fits the slide label, positive and
negative slides drawn equally often. ``stage2_loss`` -- the paper's round-selection
criterion -- is the class-balanced mean BCE of the final theta2 over the training
slides (eval mode, no augmentation).
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.batch import UsageError
from pipeline.config import SLIDE_SCORES
from pipeline.probmaps import read_max_probs
from pipeline.run import checkpoint_payload, load_checkpoint, load_trunk, load_weights, new_model, save_checkpoint
from pipeline.sampling import round_seed
from pipeline.stain import stain_jitter

log = logging.getLogger("wsi_pipeline")

__all__ = ["train_theta2", "validate_round", "slide_bce", "balanced_mean"]


def slide_bce(p: np.ndarray, y: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Per-slide binary cross-entropy of probabilities ``p`` against labels ``y``."""
    p = np.clip(np.asarray(p, np.float64), eps, 1 - eps)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


def balanced_mean(losses: np.ndarray, y: np.ndarray) -> float:
    """Mean of the per-class means (each class counts equally)."""
    parts = [losses[y == c].mean() for c in (0, 1) if (y == c).any()]
    return float(np.mean(parts)) if parts else float("nan")


def _cls_trainer(ctx, model, k: int):
    from pipeline.mixers import create_mixer
    from pipeline.trainers import ColorJitter, create_trainer

    s2, e = ctx.cfg.stage2, ctx.cfg.em
    jitter = ColorJitter(e.brightness, e.contrast, e.saturation, e.hue) if s2.augment else None
    return create_trainer(
        ctx.cfg.model.cls_trainer, model, device=ctx.device, lr=s2.lr, weight_decay=s2.weight_decay, epochs=s2.epochs,
        lr_schedule=e.lr_schedule, optimizer=s2.optimizer, amp=ctx.amp,
        jitter=jitter if jitter is not None and jitter.active else None,
        seed=round_seed(e.seed, 0, 12), progress=ctx.progress,
        mixers=[create_mixer(**m) for m in ctx.cfg.model.cls_mix], desc=f"round {k} theta2", dist=ctx.dist,
    )


def _training_slides(ctx, k: int):
    slides = [s for s in ctx.train if s.n_tiles > 0]
    if len(slides) < len(ctx.train):
        log.warning("stage 2 skips %d train slide(s) without tissue tiles", len(ctx.train) - len(slides))
    labels = np.array([s.label for s in slides])
    if not len(labels) or labels.min() == labels.max():
        raise UsageError("stage 2 needs positive and negative train slides with tissue tiles")
    return slides, labels


def _stage2_loss(ctx, model, slides, topk, labels) -> tuple[float, np.ndarray]:
    """The paper's round criterion: class-balanced BCE of the final theta2 on the training slides."""
    from pipeline.inference import classify_tiles

    def score(part: list) -> list[float]:
        return [float(classify_tiles(model, s.store_path, t, batch_size=ctx.cfg.em.predict_batch_size,
                                     device=ctx.device, amp=ctx.amp).mean()) for s, t in part]

    probs = np.array(ctx.dist.map_shards(list(zip(slides, topk)), score, [len(t) for t in topk],
                                         what="the stage-2 loss"))
    return balanced_mean(slide_bce(probs, labels), labels), probs


def _auc(y, p) -> float | None:
    from pipeline.metrics import roc_auc

    y = np.asarray(y)
    if len(np.unique(y)) < 2:
        return None
    v = roc_auc(y, np.asarray(p, np.float64))
    return None if np.isnan(v) else float(v)


def _fit_warnings(train_auc: float | None, min_auc: float, k: int) -> list[str]:
    if train_auc is not None and train_auc < min_auc:
        return [f"round {k}: theta2 did not fit its training slides (training AUC {train_auc:.3f} < "
                f"{min_auc:g}, stage2.fit_warning_auc): its slide probabilities are not to be trusted; "
                "train longer (stage2.epochs) or use stage2.slide_score: theta1_max"]
    return []


def _init_theta2(ctx, model, k: int) -> str:
    """theta2's starting weights (``stage2.init``, ``model.cls_weights``) over its seeded init; a line for metrics.json."""
    cfg = ctx.cfg
    if cfg.model.cls_weights:
        return load_weights(model, cfg.model.cls_weights, "theta2")
    if cfg.stage2.init == "theta1":
        return load_trunk(model, ctx.run.checkpoint(k, "seg"))
    return "random"


def train_theta2(ctx, k: int) -> dict:
    """Train theta2 of round k on the top-K tiles of round k's maps (resumable); writes ``round_k/cls.pt``.

    Its initial weights, slide order and augmentation draws do not depend on k: rounds differ only by
    theta1 (through the top-K tiles it picks, and its trunk with ``stage2.init: theta1``), so the round
    choice compares theta1s, not seeds."""
    from pipeline.data import SeededBatches, SlideTopKDataset, make_loader
    from pipeline.sampling import balanced_slide_sampler, topk_tiles

    cfg, s2, e = ctx.cfg, ctx.cfg.stage2, ctx.cfg.em
    slides, labels = _training_slides(ctx, k)
    topk = [topk_tiles(read_max_probs(ctx.run.probmaps(k), s.slide_id, s.n_tiles), s2.top_k) for s in slides]
    model = new_model(cfg.model.cls_arch, round_seed(e.seed, 0, 5), cfg.model.cls_arch_kwargs)
    init = _init_theta2(ctx, model, k)
    trainer = _cls_trainer(ctx, model, k)
    ckpt_path = ctx.run.state_dir(k) / "cls_train.pt"
    d = ctx.dist
    if d.main_only(ckpt_path.is_file):
        trainer.load_state_dict(load_checkpoint(ckpt_path))
        log.info("round %d: resuming theta2 training after epoch %d/%d", k, trainer.epoch, s2.epochs)
    flip, rot = (e.flip, e.rotate90) if s2.augment else (False, False)
    stain = stain_jitter(e) if s2.augment else None
    ds = SlideTopKDataset([s.store_path for s in slides], topk, labels, s2.top_k, flip=flip, rotate90=rot, stain=stain)
    n_per_epoch = s2.slides_per_epoch or 2 * int(max(labels.sum(), len(labels) - labels.sum()))
    augment = flip or rot or trainer.jitter is not None or stain is not None

    def batches_for_epoch(epoch: int):
        order = balanced_slide_sampler(labels, n_per_epoch, seed=round_seed(e.seed, 0, 6) + epoch)
        batches = [order[a : a + s2.batch_slides].tolist() for a in range(0, len(order), s2.batch_slides)]
        seeded = SeededBatches(batches, round_seed(e.seed, 0, 7), epoch, augment=augment)
        return make_loader(ds, seeded, loader_workers=cfg.runtime.loader_workers, device=ctx.device, dist=d)

    def save(tr):
        def write():
            save_checkpoint(checkpoint_payload(tr.model, tr, cfg, k, "cls"), ckpt_path)
            ctx.hooks.checkpoint(k, "cls", tr.epoch)

        d.main_only(write, what="rank 0 saving the theta2 checkpoint")

    trainer.fit(batches_for_epoch, checkpoint=save)
    loss, probs = _stage2_loss(ctx, trainer.model, slides, topk, labels)
    train_auc = _auc(labels, probs)
    info = {
        "init": init,
        "trainer": cfg.model.cls_trainer,
        "top_k": s2.top_k,
        "n_pos": int(labels.sum()),
        "n_neg": int(len(labels) - labels.sum()),
        "slides_per_epoch": n_per_epoch,
        "epochs": trainer.history,
        "stage2_loss": loss,
        "stage2_loss_definition": "class-balanced mean BCE of mean theta2 probability over the top-K tiles, train slides, eval mode",
        "train_slide_probabilities": {s.slide_id: float(p) for s, p in zip(slides, probs)},
        "train_auc": train_auc,
        "warnings": _fit_warnings(train_auc, s2.fit_warning_auc, k),
    }
    for w in info["warnings"]:
        log.warning("%s", w)
    final = checkpoint_payload(trainer.model, trainer, cfg, k, "cls")
    final["train_info"] = {kk: v for kk, v in info.items() if kk != "epochs"}

    def finish():
        save_checkpoint(final, ctx.run.checkpoint(k, "cls"))
        ckpt_path.unlink(missing_ok=True)

    d.main_only(finish, what="rank 0 saving theta2")
    return info


def validate_round(ctx, k: int, seg_model, cls_model) -> dict:
    """Slide metrics of round k on the validation split, scored as ``classify`` scores (theta1's maps reused)."""
    from pipeline.inference import RoundModels, score_slide
    from pipeline.metrics import slide_metrics

    cfg = ctx.cfg
    rm = RoundModels.for_config(seg_model, cls_model, cfg, ctx.cohort.tiling, round=k, device=ctx.device)
    ys, ps, per = [], [], {}
    for s in ctx.val:
        if s.n_tiles == 0:
            log.warning("val slide %s has no tissue tiles; left out of the validation metrics", s.slide_id)
    slides = [s for s in ctx.val if s.n_tiles]

    def score(part: list) -> list[dict]:
        out = []
        for s in part:
            r = score_slide(rm, s.store_path, batch_size=cfg.em.predict_batch_size,
                            tile_max_probs=read_max_probs(ctx.run.probmaps(k), s.slide_id, s.n_tiles))
            out.append({"probability": r["probability"], "slide_scores": r["slide_scores"]})
        return out

    for s, r in zip(slides, ctx.dist.map_shards(slides, score, [min(s.n_tiles, cfg.stage2.top_k) for s in slides],
                                                 what="validation")):
        ys.append(s.label)
        ps.append(r["probability"])
        per[s.slide_id] = {"label": s.label, "probability": r["probability"], "scores": r["slide_scores"]}
    out = slide_metrics(ys, ps) if ys else {"auc": None, "specificity_at_full_sensitivity": None,
                                              "threshold_at_full_sensitivity": None, "n_pos": 0, "n_neg": 0}
    y = np.asarray(ys)
    out["slide_score"] = cfg.stage2.slide_score
    out["loss"] = balanced_mean(slide_bce(np.asarray(ps), y), y) if ys else None
    out["score_aucs"] = {name: _auc(ys, [per[sid]["scores"][name] for sid in per]) for name in SLIDE_SCORES}
    out["warnings"] = _val_warnings(out, k)
    for w in out["warnings"]:
        log.warning("%s", w)
    out["slides"] = per
    return out


def _val_warnings(val: dict, k: int) -> list[str]:
    if val.get("n_pos", 0) < 3:
        return [f"round {k}: the validation threshold comes from {val.get('n_pos', 0)} positive slide(s) (< 3): "
                "it is not a reliable operating point; add positive val slides or pass classify --threshold"]
    return []
