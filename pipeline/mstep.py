"""theta1 training of one EM round: round 0, the M-step, and the image-only MIL baseline.

* round 0 (``mixed``, ``pixel``): the annotated tiles only, ``em.epochs_init`` epochs;
* round k >= 1 (``mixed``): initialised from round k-1; the E-step
  (:func:`pipeline.pseudolabels.e_step`) on round k-1's maps gives pseudo-positive and
  hard-negative tiles; ``em.epochs`` epochs on batches holding annotated :
  pseudo-positive : hard-negative tiles at exactly ``em.ratio`` (2:1:7) each;
* ``image``: no annotations; each epoch relabels the ``em.mil_top_k`` tiles of every
  slide that theta1 ranks highest with the slide label (top-K MIL, Campanella et al. 2019),
  trained as a tile label through a smooth maximum of the map (``em.mil_loss``);
  ``em.mil_epochs`` epochs per round when set (each one ranks every training tile).

Training checkpoints after every epoch (``state/seg_train.pt``) and resumes from there;
the finished model goes to ``round_k/seg.pt``. Under torchrun every rank trains its slice
of each batch (:mod:`pipeline.distributed`) and rank 0 writes the checkpoints.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from pipeline.run import checkpoint_payload, load_checkpoint, load_weights, model_from_checkpoint, new_model, save_checkpoint
from pipeline.sampling import round_seed
from pipeline.stain import stain_jitter

log = logging.getLogger("wsi_pipeline")

__all__ = ["train_theta1", "seg_trainer"]


def seg_trainer(ctx, model, k: int, epochs: int):
    """theta1's trainer with the ``em.*`` optimisation and augmentation settings."""
    from pipeline.mixers import create_mixer
    from pipeline.trainers import ColorJitter, create_trainer

    e = ctx.cfg.em
    jitter = ColorJitter(e.brightness, e.contrast, e.saturation, e.hue)
    name, extra = ctx.cfg.model.seg_trainer, {}
    if e.mode == "image" and e.mil_loss == "tile":
        name, extra = "tile_lse_bce", {"lse_r": e.mil_lse_r}
    return create_trainer(
        name, model, **extra, device=ctx.device, lr=e.lr, weight_decay=e.weight_decay, epochs=epochs,
        lr_schedule=e.lr_schedule, optimizer=e.optimizer, amp=ctx.amp, jitter=jitter if jitter.active else None,
        seed=round_seed(e.seed, k, 11), progress=ctx.progress,
        mixers=[create_mixer(**m) for m in ctx.cfg.model.seg_mix], desc=f"round {k} theta1", dist=ctx.dist,
    )


def _initial_model(ctx, k: int):
    cfg = ctx.cfg
    if k == 0:
        model = new_model(cfg.model.seg_arch, round_seed(cfg.em.seed, k, 1), cfg.model.seg_arch_kwargs)
        init = load_weights(model, cfg.model.seg_weights, "theta1") if cfg.model.seg_weights else "random"
        return model, init
    model, _ = model_from_checkpoint(ctx.run.checkpoint(k - 1, "seg"), "cpu")
    model.train()
    return model, f"round {k - 1}"


def train_theta1(ctx, k: int) -> dict:
    """Train theta1 of round k (resuming from its state checkpoint); writes ``round_k/seg.pt``."""
    cfg, e = ctx.cfg, ctx.cfg.em
    epochs = e.theta1_epochs(k)
    model, init = _initial_model(ctx, k)
    trainer = seg_trainer(ctx, model, k, epochs)
    ckpt_path = ctx.run.state_dir(k) / "seg_train.pt"
    d = ctx.dist
    if d.main_only(ckpt_path.is_file):
        trainer.load_state_dict(load_checkpoint(ckpt_path))
        log.info("round %d: resuming theta1 training after epoch %d/%d", k, trainer.epoch, epochs)

    def save(tr):
        def write():
            save_checkpoint(checkpoint_payload(tr.model, tr, cfg, k, "seg"), ckpt_path)
            ctx.hooks.checkpoint(k, "seg", tr.epoch)

        d.main_only(write, what="rank 0 saving the theta1 checkpoint")

    info: dict = {"init": init, "epochs_planned": epochs, "trainer": cfg.model.seg_trainer}
    plan = _mil_epochs if ctx.mode == "image" else _mixed_epochs
    batches_for_epoch, extra = plan(ctx, k, trainer)
    info.update(extra)
    trainer.fit(batches_for_epoch, checkpoint=save)
    info["epochs"] = trainer.history
    final = checkpoint_payload(trainer.model, trainer, cfg, k, "seg")
    final["train_info"] = {kk: v for kk, v in info.items() if kk != "epochs"}

    def finish():
        save_checkpoint(final, ctx.run.checkpoint(k, "seg"))
        ckpt_path.unlink(missing_ok=True)

    d.main_only(finish, what="rank 0 saving theta1")
    return info


def _augments(e, trainer) -> bool:
    return bool(e.flip or e.rotate90 or trainer.jitter is not None or stain_jitter(e) is not None)


def _annotated_items(ctx):
    """The annotated tiles: every tile of a fully annotated slide, the tiles holding labelled
    pixels of a region-limited one (``em.annotated_region_classes``)."""
    from pipeline.data import SOURCE_ANNOTATED, TileItems
    from wsi.store import TileStore

    parts, ann_by_index = [], {}
    for i, s in enumerate(ctx.train):
        ann = ctx.annotations.get(s.slide_id)
        if ann is None:
            continue
        st = TileStore(s.store_path)
        parts.append(TileItems.make(i, np.flatnonzero(ann.labelled_tiles(st.coords, st.tile_px, st.downsample)),
                                    SOURCE_ANNOTATED))
        ann_by_index[i] = ann
    return TileItems.concat(parts), ann_by_index


def _sampler(ctx, k: int, sizes: tuple[int, int, int]):
    from pipeline.sampling import MixedBatchSampler

    e = ctx.cfg.em
    seed = round_seed(e.seed, k, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the notes are logged by the caller, once
        sampler = MixedBatchSampler(sizes, e.batch_size, e.ratio, seed=seed)
        if e.batches_per_epoch is not None and e.batches_per_epoch < len(sampler):
            sampler = MixedBatchSampler(sizes, e.batch_size, e.ratio, num_batches=e.batches_per_epoch, seed=seed)
    return sampler


def _hard_negatives_per_batch(e) -> int:
    """Hard-negative tiles one M-step batch holds (its 7/10 share): the E-step tops the pool up to at least
    this many distinct tiles, so the share is never handed to the other sources nor filled by repeats
    within a batch."""
    from pipeline.sampling import ratio_counts

    return ratio_counts(e.batch_size, e.ratio)[2]


def _mixed_epochs(ctx, k: int, trainer):
    """Round 0 / M-step batches: annotated, pseudo-positive and hard-negative tiles at ``em.ratio``."""
    from pipeline.data import SeededBatches, TileItems, TileTargetDataset, make_loader
    from pipeline.pseudolabels import EStep, PseudoTargets, e_step

    e = ctx.cfg.em
    ann_items, ann_by_index = _annotated_items(ctx)
    empty = TileItems.concat([])
    est = EStep(empty, empty, PseudoTargets.from_config(e), None)
    if k > 0 and ctx.mode == "mixed":
        est = e_step(ctx.run.probmaps(k - 1), ctx.train, list(ctx.annotations), e,
                     min_hard_negatives=_hard_negatives_per_batch(e))
    sizes = (len(ann_items), len(est.pseudo_positive), len(est.hard_negative))
    sampler = _sampler(ctx, k, sizes)
    for n in sampler.notes:
        log.info("round %d sampling: %s", k, n)
    dataset = TileTargetDataset(
        [str(s.store_path) for s in ctx.train], TileItems.concat([ann_items, est.pseudo_positive, est.hard_negative]),
        slide_ids=[s.slide_id for s in ctx.train], annotations=ann_by_index, pseudo=est.targets,
        flip=e.flip, rotate90=e.rotate90, stain=stain_jitter(e),
    )
    flat, augment = sampler.as_flat_indices(), _augments(e, trainer)

    def batches_for_epoch(epoch: int):
        batches = SeededBatches(flat, round_seed(e.seed, k, 3), epoch, augment=augment)
        return make_loader(dataset, batches, loader_workers=ctx.cfg.runtime.loader_workers, device=ctx.device,
                           dist=ctx.dist)

    return batches_for_epoch, {
        "e_step": est.stats,
        "sources": {"annotated": sizes[0], "pseudo_positive": sizes[1], "hard_negative": sizes[2]},
        "ratio": list(e.ratio),
        "counts_per_batch": list(sampler.counts),
        "batches_per_epoch": len(sampler),
        "sampling_notes": list(sampler.notes),
    }


def _mil_epochs(ctx, k: int, trainer):
    """Image mode (top-K MIL, Campanella et al. 2019): each epoch re-selects every slide's
    ``em.mil_top_k`` highest-ranked tiles under the current theta1 and trains them with the
    slide label as a constant target."""
    from pipeline.data import SOURCE_CONSTANT, SeededBatches, TileItems, TileTargetDataset, make_loader
    from pipeline.inference import iter_predictions
    from pipeline.sampling import topk_tiles

    cfg, e = ctx.cfg, ctx.cfg.em
    paths, ids = [str(s.store_path) for s in ctx.train], [s.slide_id for s in ctx.train]
    labels = np.array([s.label for s in ctx.train])
    selections: list[dict] = []

    def rank(slides: list[int]) -> list[np.ndarray]:
        maxp = [np.zeros(ctx.train[i].n_tiles, np.float32) for i in slides]
        for si, idx, mp, _ in iter_predictions(
            trainer.model, [(paths[i], None) for i in slides], batch_size=e.predict_batch_size, device=ctx.device,
            loader_workers=cfg.runtime.loader_workers, out_stride=cfg.model.map_stride_px, amp=ctx.amp,
            with_maps=False, progress=ctx.progress, desc=f"round {k} MIL ranking",
        ):
            maxp[si][idx] = mp
        return maxp

    def batches_for_epoch(epoch: int):
        maxp = ctx.dist.map_shards(list(range(len(paths))), rank, [s.n_tiles for s in ctx.train], what="MIL ranking")
        items = TileItems.concat([TileItems.make(i, topk_tiles(maxp[i], e.mil_top_k), SOURCE_CONSTANT, float(labels[i]))
                                  for i in range(len(ids))])
        selections.append({"epoch": epoch + 1, "tiles": len(items)})
        ds = TileTargetDataset(paths, items, slide_ids=ids, flip=e.flip, rotate90=e.rotate90, stain=stain_jitter(e))
        order = np.random.default_rng(round_seed(e.seed, k, 4) + epoch).permutation(len(items))
        batches = [order[a : a + e.batch_size].tolist() for a in range(0, len(order), e.batch_size)]
        if e.batches_per_epoch is not None:
            batches = batches[: e.batches_per_epoch]
        seeded = SeededBatches(batches, round_seed(e.seed, k, 3), epoch, augment=_augments(e, trainer))
        return make_loader(ds, seeded, loader_workers=cfg.runtime.loader_workers, device=ctx.device, dist=ctx.dist)

    return batches_for_epoch, {"mil_top_k": e.mil_top_k, "mil_selections": selections}
