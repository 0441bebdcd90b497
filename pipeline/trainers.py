"""Trainers: the optimisation loop around one model, by name, so new methods plug in.

A trainer owns a model, its optimiser, scheduler and gradient scaler, and runs
epochs over batches that a data pipeline produces. The EM loop
(:mod:`pipeline.em`) only talks to this interface:

``trainer.fit(batches_for_epoch, checkpoint=...)``
    run the remaining epochs (``trainer.epoch`` counts the finished ones);
    ``batches_for_epoch(epoch)`` returns an iterable of batch dicts (a
    DataLoader); after every epoch ``on_epoch_end(record)`` runs, then
    ``checkpoint(trainer)``.
``trainer.state_dict()`` / ``load_state_dict()``
    everything needed to resume bit-for-bit on CPU (model, optimiser,
    scheduler, scaler, epoch, per-epoch history, and what a subclass keeps
    through ``get_extra_state()`` / ``set_extra_state()``).
``trainer.compute_loss(batch, generator)``
    the only method a new trainer must write.
``mixers=[...]`` (:mod:`pipeline.mixers`)
    batch mixers (CellMix, ScoreMix) that ``compute_loss`` applies after colour
    jitter through :meth:`Trainer.mix`, with the trainer's ``target_kind``
    (``soft_bce``: ``dense``, ``topk_mean``: ``bag``); after every epoch ``fit()``
    gives each mixer the epoch loss and keeps what it returns in
    ``record["mix"]``; their state is part of :meth:`Trainer.state_dict`.

Extension hooks (for subclasses and mixins; each calls ``super()``):
``on_epoch_end(record)`` may add entries to the epoch's record (it is the
dict kept in ``history`` and written to ``metrics.json``) and update state,
e.g. a curriculum; any state that changes later epochs must be returned by
``get_extra_state()`` (a picklable dict) and restored by
``set_extra_state(state)``, so that a run resumed from ``state_dict()``
repeats the uninterrupted one exactly. The optimiser is chosen by name
(``optimizer='adam' | 'adamw' | 'sgd'``, see :data:`OPTIMIZERS`).

Registered trainers
-------------------
``soft_bce``  theta1: pixel-wise soft-label BCE of the upsampled logits against
              ``batch["target"]`` (annotation masks, pseudo labels, zeros).
``tile_lse_bce`` theta1 in image mode (top-K MIL): BCE of each tile's pooled
              logit (log-sum-exp, a smooth maximum) against its label.
``topk_mean`` theta2: BCE of the mean of a slide's K tile probabilities
              against the slide label (``batch["tiles"]`` (B, K, T, T, 3)).

Batch mixers (CellMix, ScoreMix) are not trainers: any trainer takes them
through ``mixers=`` (``model.seg_mix`` / ``model.cls_mix``, see
:mod:`pipeline.mixers`). ScoreNet is a tile model (``models.scorenet``) that
``topk_mean`` trains unchanged.

Mixed precision: on CUDA (and ``amp=True``) the forward pass runs under
``torch.autocast(float16)`` with a ``GradScaler``; losses are computed in
float32 (see :mod:`models.losses`). On CPU everything is float32.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from models.losses import soft_bce_with_logits, topk_mean_bce

log = logging.getLogger("wsi_pipeline")

__all__ = [
    "OPTIMIZERS",
    "ColorJitter",
    "Trainer",
    "SoftBCESegTrainer",
    "TopKMeanSlideTrainer",
    "register_trainer",
    "create_trainer",
    "list_trainers",
    "trainer_target_kind",
    "autocast",
    "images_to_float",
]

_TRAINERS: dict[str, type] = {}

SGD_MOMENTUM = 0.9

# name -> (params, lr, weight_decay) -> optimiser. Names match pipeline.config.OPTIMIZERS.
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": lambda params, lr, wd: torch.optim.Adam(params, lr=lr, weight_decay=wd),
    "adamw": lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
    "sgd": lambda params, lr, wd: torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, weight_decay=wd),
}


def register_trainer(name: str):
    """Class decorator: make a :class:`Trainer` subclass available as ``name``."""

    def deco(cls):
        if name in _TRAINERS and _TRAINERS[name] is not cls:
            raise ValueError(f"trainer {name!r} is already registered by {_TRAINERS[name].__qualname__}")
        _TRAINERS[name] = cls
        cls.name = name
        return cls

    return deco


def list_trainers() -> list[str]:
    return sorted(_TRAINERS)


def trainer_target_kind(name: str) -> str | None:
    """The target kind of a registered trainer ('dense', 'bag', ...), None for an unknown name."""
    cls = _TRAINERS.get(name)
    return None if cls is None else cls.target_kind


def create_trainer(name: str, model: torch.nn.Module, **kwargs) -> "Trainer":
    if name not in _TRAINERS:
        raise ValueError(f"unknown trainer {name!r}; known: {', '.join(list_trainers())}")
    return _TRAINERS[name](model, **kwargs)


def autocast(device: torch.device, enabled: bool):
    """float16 autocast on CUDA when ``enabled``; a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def images_to_float(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, H, W, 3) uint8 (channels last, as stored) -> (B, 3, H, W) float in [0, 1] on ``device``."""
    x = images.to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).float().div_(255.0)


class ColorJitter:
    """Batched brightness / contrast / saturation / hue jitter of (N, 3, H, W) images in [0, 1].

    Each image gets its own factors, drawn from ``generator`` (a CPU
    ``torch.Generator``, so the draws are the same on every device). Hue is
    rotated in YIQ space (a linear map per image).
    """

    def __init__(self, brightness: float = 0.1, contrast: float = 0.1, saturation: float = 0.1, hue: float = 0.02):
        self.b, self.c, self.s, self.h = brightness, contrast, saturation, hue

    @property
    def active(self) -> bool:
        return any(v > 0 for v in (self.b, self.c, self.s, self.h))

    def __call__(self, x: torch.Tensor, generator: torch.Generator, rows: tuple | None = None) -> torch.Tensor:
        """Jitter ``x``; ``rows = (positions, size)``: ``x`` holds these rows of a global batch of
        ``size`` images (a torchrun rank's slice), which get exactly the draws they get in the whole batch."""
        if not self.active:
            return x
        with torch.autocast(device_type=x.device.type, enabled=False):  # colour maths in float32
            return self._jitter(x.float(), generator, rows)

    def _jitter(self, x: torch.Tensor, generator: torch.Generator, rows: tuple | None = None) -> torch.Tensor:
        n = x.shape[0]

        def draw() -> torch.Tensor:
            if rows is None:
                return torch.rand(n, generator=generator)
            return torch.rand(int(rows[1]), generator=generator)[rows[0]]

        def factors(r: float) -> torch.Tensor:
            u = draw() * 2 - 1
            return (1 + r * u).to(x.device, x.dtype).view(n, 1, 1, 1)

        fb, fc, fs = factors(self.b), factors(self.c), factors(self.s)
        theta = ((draw() * 2 - 1) * self.h * 2 * math.pi).to(x.device, x.dtype)
        w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        x = x * fb
        grey = (x * w).sum(1, keepdim=True)
        x = (x - grey.mean((2, 3), keepdim=True)) * fc + grey.mean((2, 3), keepdim=True)
        grey = (x * w).sum(1, keepdim=True)
        x = (x - grey) * fs + grey
        if self.h > 0:
            to_yiq = torch.tensor(
                [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=x.device, dtype=x.dtype
            )
            from_yiq = torch.linalg.inv(to_yiq)
            cos, sin = torch.cos(theta), torch.sin(theta)
            rot = torch.zeros(n, 3, 3, device=x.device, dtype=x.dtype)
            rot[:, 0, 0] = 1
            rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
            m = from_yiq @ rot @ to_yiq  # (n, 3, 3)
            x = torch.einsum("nij,njhw->nihw", m, x)
        return x.clamp_(0.0, 1.0)


class Trainer:
    """Base class: epoch loop, optimiser, scheduler, AMP, hooks and checkpoint state.

    Parameters
    ----------
    model : torch.nn.Module
    device : torch.device
    lr, weight_decay : float
        Optimiser settings.
    optimizer : {'adam', 'adamw', 'sgd'}
        Adam (the paper's), AdamW (decoupled weight decay) or SGD with momentum 0.9.
    epochs : int
        Total epochs of this training (the scheduler spans them).
    lr_schedule : {'constant', 'cosine'}
    amp : bool
        Mixed precision on CUDA.
    jitter : ColorJitter, optional
        Colour augmentation applied on the device (None: off).
    seed : int
        Base of the per-batch colour-jitter seeds (seed, epoch, batch).
    progress : bool
        Show a tqdm bar per epoch.
    desc : str
        Label for the progress bar and logs.
    mixers : sequence of pipeline.mixers.BatchMixer
        Batch mixers applied in order after colour jitter (a ConfigError when one cannot
        label this trainer's ``target_kind`` exactly).
    dist : pipeline.distributed.Dist, optional
        Under torchrun (``dist.world > 1``): the model is wrapped in ``DistributedDataParallel``
        (``self.net``; ``self.model`` stays the bare module, so state dicts do not depend on the
        world size), batches are this rank's slice of each global batch
        (:class:`pipeline.distributed.ShardedBatches`), and each step is :meth:`_step_distributed`.
    """

    name = "base"
    target_kind: str | None = None
    """What the targets are, for batch mixers: 'dense' (pixel targets), 'bag' (one label per
    slide of K tiles), 'label' (one label per image); None: no mixer can be used."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        device: torch.device,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        epochs: int = 1,
        lr_schedule: str = "constant",
        optimizer: str = "adam",
        amp: bool = True,
        jitter: ColorJitter | None = None,
        seed: int = 0,
        progress: bool = True,
        desc: str = "train",
        mixers: Sequence = (),
        dist=None,
    ):
        self.device = torch.device(device)
        self.dist = dist if dist is not None and dist.enabled else None
        if self.dist is not None and mixers:
            raise ValueError(f"{desc}: batch mixers mix items across the whole batch, and under torchrun each rank "
                             "holds a slice of it; train with mixers in one process (model.seg_mix / model.cls_mix)")
        self.model = model.to(self.device) if self.dist is None else self.dist.prepare_model(model.to(self.device))
        self.epochs = int(epochs)
        self.amp = bool(amp) and self.device.type == "cuda"
        self.jitter = jitter
        self.seed = int(seed)
        self.progress = progress
        self.desc = desc
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
        self.optimizer_name = optimizer
        self.optimizer = OPTIMIZERS[optimizer](self.model.parameters(), lr, weight_decay)
        if lr_schedule == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(1, self.epochs))
        elif lr_schedule == "constant":
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _e: 1.0)
        else:
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.epoch = 0
        self.history: list[dict] = []
        self.mixers = [m.setup(self.target_kind, self.epochs, self.model) for m in mixers]
        self.net = self.model if self.dist is None else self.dist.wrap(self.model)
        """What ``compute_loss`` calls: the model, or its ``DistributedDataParallel`` wrapper."""

    # -- what subclasses provide ----------------------------------------------
    def compute_loss(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, int]:
        """(mean loss of the batch, number of items)."""
        raise NotImplementedError

    def loss_terms(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Under torchrun: ``(sum, count)`` of this rank's slice such that the loss of the global batch
        is ``sum over ranks of sum / sum over ranks of count`` (what :meth:`compute_loss` gives for
        the whole batch in one process). Items of weight 0 (:meth:`item_weights`) count for nothing."""
        raise NotImplementedError(f"trainer {self.name!r} cannot train under torchrun (no loss_terms)")

    def item_weights(self, batch: dict) -> torch.Tensor:
        """(B,) float: 1 for this rank's items, 0 for the stand-in item of an empty slice."""
        return (batch["pos"] >= 0).to(self.device, torch.float32)

    def jitter_rows(self, batch: dict, per_item: int = 1) -> tuple | None:
        """``(positions, size)`` of this slice's images in the global batch (``per_item`` images per
        item), for :class:`ColorJitter`; None in one process."""
        if "pos" not in batch:
            return None
        pos = batch["pos"].clamp_min(0).to(torch.int64)
        rows = (pos[:, None] * per_item + torch.arange(per_item)).reshape(-1)
        return rows, int(batch["total"][0]) * per_item

    def image_batch(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, targets)`` of a one-image-per-item batch on the device: floats in [0, 1], colour
        jitter, then the batch mixers (every draw from ``generator``)."""
        x = images_to_float(batch["image"], self.device)
        if self.jitter is not None:
            x = self.jitter(x, generator, self.jitter_rows(batch))
        y = batch["target"].to(self.device, non_blocking=True).float()
        if self.mixers:
            x, y = self.mix(x, y, generator)
        return x, y

    def mix(self, x: torch.Tensor, y, generator: torch.Generator):
        """Apply the batch mixers in order (after colour jitter); every draw from ``generator``."""
        for m in self.mixers:
            x, y = m(x, y, kind=self.target_kind, model=self.model, generator=generator)
        return x, y

    # -- hooks (subclasses and mixins extend these, calling super()) ---------------
    def on_epoch_end(self, record: dict) -> None:
        """Called after each epoch, before the checkpoint; may add entries to ``record``."""

    def get_extra_state(self) -> dict:
        """State of hooks that later epochs depend on (saved in :meth:`state_dict`)."""
        return {}

    def set_extra_state(self, state: dict) -> None:
        """Restore what :meth:`get_extra_state` returned."""

    # -- loop ---------------------------------------------------------------------
    def _generator(self, epoch: int, batch: int) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + epoch * 10_007 + batch) % (2**63))
        return g

    def train_epoch(self, batches: Iterable[dict]) -> dict:
        from tqdm.auto import tqdm

        self.net.train()
        t0 = time.perf_counter()
        total, n_items, n_batches = 0.0, 0, 0
        bar = tqdm(
            batches,
            total=len(batches) if hasattr(batches, "__len__") else None,
            desc=f"{self.desc} epoch {self.epoch + 1}/{self.epochs}",
            unit="batch",
            disable=True if not self.progress else None,
            leave=False,
        )
        for b, (batch, failure) in enumerate(self._batches(bar)):
            g = self._generator(self.epoch, b)
            if self.dist is None:
                loss, n = self._step(batch, g, b)
            else:
                loss, n = self._step_distributed(batch, g, b, failure)
            total += loss * n
            n_items += n
            n_batches += 1
            bar.set_postfix_str(f"loss {total / max(n_items, 1):.4f}")
        bar.close()
        self.scheduler.step()
        self.epoch += 1
        rec = {
            "epoch": self.epoch,
            "loss": (total / n_items) if n_items else None,
            "batches": n_batches,
            "items": n_items,
            "seconds": round(time.perf_counter() - t0, 3),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
        }
        self.history.append(rec)
        log.info("%s epoch %d/%d: loss %s (%d items, %.1f s)", self.desc, self.epoch, self.epochs,
                 f"{rec['loss']:.4f}" if rec["loss"] is not None else "n/a", n_items, rec["seconds"])
        return rec

    def _batches(self, bar):
        """``(batch, None)`` per batch; under torchrun a batch that fails to load gives
        ``(None, error)`` and ends the epoch, so the step can tell every rank before raising."""
        if self.dist is None:
            for batch in bar:
                yield batch, None
            return
        it = iter(bar)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 -- raised by the step, after every rank knows
                yield None, exc
                return
            yield batch, None

    def _step(self, batch: dict, g: torch.Generator, b: int) -> tuple[float, int]:
        """One optimiser step in one process; (loss of the batch, items)."""
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp):
            loss, n = self.compute_loss(batch, g)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.desc}: the loss became {loss.item()} in epoch {self.epoch + 1}, batch {b}")
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach()), n

    def _step_distributed(self, batch, g: torch.Generator, b: int, failure: BaseException | None) -> tuple[float, int]:
        """One optimiser step of one rank; (loss of the global batch, its items).

        Every rank first says whether its slice loaded (DDP's forward pass holds collectives of its
        own -- buffer broadcasts, bucket rebuilds -- so no rank may enter it alone). Then one all-reduce
        before the backward pass carries the slice's loss sum, its count, its items and an error flag.
        The backward pass runs on ``sum * world / global count``: DDP averages the ranks' gradients, so
        the gradient is that of the global batch's mean loss, whatever the slices' sizes. A rank whose
        batch failed (or a non-finite global loss) stops every rank at this step.
        """
        self.optimizer.zero_grad(set_to_none=True)
        self._agree_step(failure, b, "load its batch")
        part = None
        try:
            with autocast(self.device, self.amp):
                part, count = self.loss_terms(batch, g)
            n = int((batch["pos"] >= 0).sum())
        except Exception as exc:  # noqa: BLE001 -- raised below, after every rank knows
            failure = exc
        stats = torch.zeros(4, dtype=torch.float64, device=self.dist.device)
        if failure is None:
            stats[0], stats[1], stats[2] = part.detach().double(), count.detach().double(), float(n)
        else:
            stats[3] = 1.0
        self.dist.all_reduce_sum(stats)
        self._raise_if_failed(failure, float(stats[3]), b, "compute its loss")
        den = max(float(stats[1]), torch.finfo(torch.float32).tiny)
        loss = float(stats[0]) / den
        if not math.isfinite(loss):
            raise FloatingPointError(f"{self.desc}: the loss became {loss} in epoch {self.epoch + 1}, batch {b}")
        self.scaler.scale(part * (self.dist.world / den)).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss, int(stats[2])

    def _agree_step(self, failure: BaseException | None, b: int, what: str) -> None:
        flag = torch.tensor([0.0 if failure is None else 1.0], dtype=torch.float64, device=self.dist.device)
        self.dist.all_reduce_sum(flag)
        self._raise_if_failed(failure, float(flag[0]), b, what)

    def _raise_if_failed(self, failure: BaseException | None, failed_ranks: float, b: int, what: str) -> None:
        from pipeline.distributed import RankFailed

        if failure is not None:
            raise failure
        if failed_ranks > 0:
            raise RankFailed(f"{self.desc}: another rank could not {what} in epoch {self.epoch + 1}, batch {b} (its "
                             "log says why); this rank stops too")

    def fit(
        self,
        batches_for_epoch: Callable[[int], Iterable[dict]],
        checkpoint: Callable[["Trainer"], None] | None = None,
    ) -> list[dict]:
        """Run epochs ``self.epoch .. self.epochs - 1``; after each, :meth:`on_epoch_end`, then ``checkpoint``."""
        while self.epoch < self.epochs:
            record = self.train_epoch(batches_for_epoch(self.epoch))
            if self.dist is not None:
                self.dist.sync_buffers(self.model)  # every rank holds the model rank 0 checkpoints
            if self.mixers:
                record["mix"] = [m.end_epoch(record["loss"]) for m in self.mixers]
            self.on_epoch_end(record)
            if checkpoint is not None:
                checkpoint(self)
        return self.history

    # -- state ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "trainer": self.name,
            "optimizer_name": self.optimizer_name,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "epochs": self.epochs,
            "history": list(self.history),
            "torch_rng": torch.get_rng_state(),
            "extra": self.get_extra_state(),
            "mixers": [m.state_dict() for m in self.mixers],
        }

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("optimizer_name", "adam")
        if saved != self.optimizer_name:
            raise ValueError(f"{self.desc}: the saved state is of a {saved!r} optimiser, this trainer uses "
                             f"{self.optimizer_name!r}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.history = list(state.get("history", []))
        if state.get("torch_rng") is not None:
            torch.set_rng_state(state["torch_rng"])
        self.set_extra_state(state.get("extra") or {})
        saved_mixers = state.get("mixers") or []
        if [s.get("name") for s in saved_mixers] != [m.name for m in self.mixers]:
            raise ValueError(f"{self.desc}: the saved state has mixers {[s.get('name') for s in saved_mixers]}, "
                             f"this trainer has {[m.name for m in self.mixers]}")
        for m, s in zip(self.mixers, saved_mixers):
            m.load_state_dict(s)


@register_trainer("soft_bce")
class SoftBCESegTrainer(Trainer):
    """theta1: per-pixel soft-label BCE; logits upsampled to the tile size.

    Batches: ``{"image": (B, T, T, 3) uint8, "target": (B, T, T) float in [0, 1], ...}``; a NaN
    target marks an unlabelled pixel (outside a region-limited annotation), which gets loss weight 0.
    """

    target_kind = "dense"

    def _logits(self, batch, generator):
        x, y = self.image_batch(batch, generator)
        logits = self.net(x)
        if logits.shape[-2:] != y.shape[-2:]:
            logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
        return x, y, logits

    def compute_loss(self, batch, generator):
        x, y, logits = self._logits(batch, generator)
        unlabelled = torch.isnan(y)
        if bool(unlabelled.any()):
            return soft_bce_with_logits(logits, y.nan_to_num(0.0), (~unlabelled).float()), int(x.shape[0])
        return soft_bce_with_logits(logits, y), int(x.shape[0])

    def loss_terms(self, batch, generator):
        """Sum and count of the labelled pixels' BCE (the weighted mean over the global batch)."""
        _, y, logits = self._logits(batch, generator)
        w = (~torch.isnan(y)).float() * self.item_weights(batch)[:, None, None]
        return soft_bce_with_logits(logits, y.nan_to_num(0.0), w, reduction="sum"), w.sum()


@register_trainer("tile_lse_bce")
class TileLSEBCETrainer(SoftBCESegTrainer):
    """theta1 in image mode (top-K MIL): one label per tile, read through a smooth maximum of its map.

    Top-K MIL (Campanella et al. 2019) trains a tile classifier with the slide label; theta1 is a
    segmentation model, so a tile's logit is the log-sum-exp pool of its logit map,
    ``(1/r) log mean exp(r z)`` (Pinheiro & Collobert 2015): the maximum as r grows, the mean as
    r -> 0. A positive label says only that *some* pixel is lesion. Two measured reasons for not
    using the alternatives (``tests/test_trainers.py``): the slide label on every pixel
    (``soft_bce`` on the constant target) teaches that the normal tissue around a small lesion is
    lesion, and theta1 flags every tile; the hard maximum gives one pixel per tile a gradient, so a
    randomly initialised theta1 never moves its maximum onto the lesion and learns nothing.

    Batches as :class:`SoftBCESegTrainer`; a tile's label is the maximum of its target map
    (after a mixer, the label of the most positive content it holds).

    Parameters
    ----------
    lse_r : float
        Sharpness r of the pool (``em.mil_lse_r``).
    """

    def __init__(self, model, *, lse_r: float = 5.0, **kwargs):
        if not lse_r > 0:
            raise ValueError(f"lse_r must be > 0, got {lse_r}")
        self.lse_r = float(lse_r)
        super().__init__(model, **kwargs)

    def _tile_losses(self, batch, generator):
        x, y = self.image_batch(batch, generator)
        z = self.net(x).float().flatten(1)  # (B, pixels) logits
        pooled = (torch.logsumexp(self.lse_r * z, dim=1) - math.log(z.shape[1])) / self.lse_r
        t = y.nan_to_num(0.0).flatten(1).amax(dim=1).clamp(0.0, 1.0)
        return F.binary_cross_entropy_with_logits(pooled, t, reduction="none")

    def compute_loss(self, batch, generator):
        losses = self._tile_losses(batch, generator)
        return losses.mean(), int(losses.shape[0])

    def loss_terms(self, batch, generator):
        w = self.item_weights(batch)
        return (self._tile_losses(batch, generator) * w).sum(), w.sum()


@register_trainer("topk_mean")
class TopKMeanSlideTrainer(Trainer):
    """theta2: BCE of the mean tile probability of each slide's top-K tiles against its label.

    Batches: ``{"tiles": (B, K, T, T, 3) uint8, "mask": (B, K) bool, "label": (B,) float}``.
    """

    target_kind = "bag"

    def _logits(self, batch, generator):
        tiles = batch["tiles"]
        b, k = tiles.shape[:2]
        x = images_to_float(tiles.reshape(b * k, *tiles.shape[2:]), self.device)
        if self.jitter is not None:
            x = self.jitter(x, generator, self.jitter_rows(batch, per_item=k))
        mask = batch["mask"].to(self.device)
        y = batch["label"].to(self.device).float()
        if self.mixers:
            from pipeline.mixers import BagTargets

            bag, _ = self.mix(x.reshape(b, k, *x.shape[1:]), BagTargets(y, mask), generator)
            x = bag.reshape(b * k, *x.shape[1:])
        return self.net(x).reshape(b, k), y, mask

    def compute_loss(self, batch, generator):
        logits, y, mask = self._logits(batch, generator)
        return topk_mean_bce(logits, y, mask=mask), int(logits.shape[0])

    def loss_terms(self, batch, generator):
        logits, y, mask = self._logits(batch, generator)
        w = self.item_weights(batch)
        return (topk_mean_bce(logits, y, mask=mask, reduction="none") * w).sum(), w.sum()


@register_trainer("soft_ce")
class SoftCETrainer(Trainer):
    """Patch / ROI classification: multi-class cross-entropy against soft labels.

    Batches: ``{"image": (B, T, T, 3) uint8, "target": (B, C) float}``; each target row is a
    distribution over the C classes (one-hot for a plain label; a mixer's soft label, e.g.
    ``f * y_a + (1 - f) * y_b``, is used as it is). Loss: ``mean_b sum_c -y_bc log softmax(z_b)_c``.
    Target kind ``label``: one label per image, so a mixer that can say how much of each
    image went into a mixed one can label it exactly.
    """

    target_kind = "label"

    def _logits(self, batch, generator):
        x, y = self.image_batch(batch, generator)
        logits = self.net(x)
        if logits.dim() != 2 or logits.shape != y.shape:
            raise ValueError(f"{self.desc}: the model gives logits of shape {tuple(logits.shape)} for targets of shape "
                             f"{tuple(y.shape)}; build it with num_classes={y.shape[-1]}")
        return x, y, logits

    def compute_loss(self, batch, generator):
        x, y, logits = self._logits(batch, generator)
        with torch.autocast(device_type=x.device.type, enabled=False):
            loss = torch.sum(-y * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        return loss, int(x.shape[0])

    def loss_terms(self, batch, generator):
        x, y, logits = self._logits(batch, generator)
        w = self.item_weights(batch)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return (torch.sum(-y * F.log_softmax(logits.float(), dim=-1), dim=-1) * w).sum(), w.sum()
