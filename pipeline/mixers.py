"""Batch mixers: augmentations that recombine the images of a training batch (timm-style registry).

A trainer applies its mixers inside ``compute_loss``, after colour jitter::

    x, y = mixer(x, y, kind=trainer.target_kind, model=trainer.model, generator=g)

and after every epoch ``fit()`` calls ``mixer.end_epoch(loss)`` and keeps the dict it
returns in the epoch's record (``record["mix"]`` -> ``metrics.json``). A mixer's
``state_dict()`` is part of the trainer's, so a resumed run repeats the uninterrupted
one. Every random draw comes from ``generator`` (a CPU ``torch.Generator``).

Target kinds (what ``y`` is; a mixer refuses a kind it cannot label exactly):

``dense``  ``x`` (B, C, H, W), ``y`` pixel targets (B, H, W) or (B, c, H, W); targets
           travel with their pixels, so labels stay exact (theta1, ``soft_bce``).
``bag``    ``x`` (B, K, C, H, W): B slides x K tiles, ``y`` a :class:`BagTargets` (one
           label per slide and the mask of real tiles). Pixels only move between the
           tiles of one slide, or (``cross_slide``) between tiles of negative slides,
           so each slide's label stays exact (theta2, ``topk_mean``).
``label``  ``x`` (B, C, H, W), ``y`` per-image labels (B,) or (B, n_classes); the mixed
           label is the label mass of where the pixels came from (tile-label trainers).

Registered mixers: ``cellmix`` (Zhang et al., CellMix) and ``scoremix`` (Stegmüller et
al., ScoreNet). Build one with ``create_mixer(name, **options)``; an unknown name or
option is a :class:`~pipeline.config.ConfigError` with a did-you-mean.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, _suggest

__all__ = [
    "KINDS",
    "BagTargets",
    "BatchMixer",
    "CellMix",
    "ScoreMix",
    "create_mixer",
    "list_mixers",
    "register_mixer",
    "patch_sizes",
]

KINDS = ("dense", "bag", "label")

_MIXERS: dict[str, type] = {}


class BagTargets(NamedTuple):
    """Targets of a ``bag`` batch: ``label`` (B,) slide labels, ``mask`` (B, K) real (not padding) tiles."""

    label: torch.Tensor
    mask: torch.Tensor


def register_mixer(name: str):
    """Class decorator: make a :class:`BatchMixer` subclass available as ``name``."""

    def deco(cls):
        if name in _MIXERS and _MIXERS[name] is not cls:
            raise ValueError(f"mixer {name!r} is already registered by {_MIXERS[name].__qualname__}")
        _MIXERS[name] = cls
        cls.name = name
        return cls

    return deco


def list_mixers() -> list[str]:
    return sorted(_MIXERS)


def mixer_options(name: str) -> list[str]:
    """The option names ``create_mixer(name, ...)`` accepts."""
    sig = inspect.signature(_MIXERS[name].__init__)
    return [p for p in sig.parameters if p != "self"]


def create_mixer(name: str | None = None, where: str = "mixer", **options) -> "BatchMixer":
    """A mixer by registry name with its options (a config entry ``{name: cellmix, p: 0.5}``)."""
    if not name:
        raise ConfigError(f"{where}: every mixer needs a name, one of {list_mixers()}")
    if name not in _MIXERS:
        raise ConfigError(f"{where}: unknown mixer {name!r}{_suggest(str(name), _MIXERS)}; known: {list_mixers()}")
    known = mixer_options(name)
    for key in options:
        if key not in known:
            raise ConfigError(f"{where}: mixer {name!r} has no option {key!r}{_suggest(key, known)}; options: {known}")
    try:
        return _MIXERS[name](**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: mixer {name!r}: {exc}") from None


# --------------------------------------------------------------------------- base


class BatchMixer:
    """Base class. Subclasses implement :meth:`mix` and list the ``kinds`` they label exactly.

    ``p``: probability that a batch is mixed (one draw per batch from the generator;
    ``p = 0`` draws nothing, so a run equals one without the mixer bit for bit).
    """

    name = "base"
    kinds: tuple[str, ...] = ()
    needs_saliency = False

    def __init__(self, p: float = 0.5):
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p!r}")
        self.p = float(p)
        self.epochs = 1
        self.kind: str | None = None
        self.batches_mixed = 0

    def setup(self, kind: str | None, epochs: int = 1, model: torch.nn.Module | None = None) -> "BatchMixer":
        """Bind to a trainer: its target kind and its number of epochs (a ConfigError if unfit)."""
        self.check(kind, model)
        self.kind, self.epochs = kind, max(1, int(epochs))
        return self

    def check(self, kind: str | None, model: torch.nn.Module | None = None) -> None:
        if kind not in self.kinds:
            raise ConfigError(
                f"mixer {self.name!r} cannot label {kind!r} targets exactly (it mixes {list(self.kinds)}); "
                f"remove it from the trainer's model.*_mix list"
            )
        if self.needs_saliency and model is not None and not callable(getattr(model, "saliency", None)):
            raise ConfigError(f"mixer {self.name!r} needs a model with a saliency(x) map (e.g. scorenet, "
                              f"scorenet_tiny), not {type(model).__name__}")

    def __call__(self, x: torch.Tensor, y: Any, *, kind: str, model: torch.nn.Module | None = None,
                 generator: torch.Generator) -> tuple[torch.Tensor, Any]:
        self.observe(x)
        if self.p <= 0.0:
            return x, y
        if self.p < 1.0 and float(torch.rand((), generator=generator)) >= self.p:
            return x, y
        self.check(kind, model)
        self.batches_mixed += 1
        return self.mix(x, y, kind=kind, model=model, generator=generator)

    def observe(self, x: torch.Tensor) -> None:
        """Sees every batch, mixed or not (no random draws): e.g. the tile size."""

    def mix(self, x, y, *, kind, model, generator):
        raise NotImplementedError

    def end_epoch(self, loss: float | None) -> dict:
        """Called once after every epoch with its mean loss; returns the epoch's record entry."""
        out = {"name": self.name, "batches_mixed": self.batches_mixed}
        self.batches_mixed = 0
        return out

    def state_dict(self) -> dict:
        return {"name": self.name, "batches_mixed": self.batches_mixed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"saved mixer state is of {state.get('name')!r}, this mixer is {self.name!r}")
        self.batches_mixed = int(state.get("batches_mixed", 0))


# --------------------------------------------------------------------------- shared helpers


def derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation without fixed points (n >= 2; identity for n < 2): a random
    cyclic order, each element taking its successor's place."""
    if n < 2:
        return torch.arange(n)
    order = torch.randperm(n, generator=generator)
    out = torch.empty(n, dtype=torch.long)
    out[order] = order.roll(-1)
    return out


def bag_pools(bag: BagTargets, cross_slide: bool) -> list[torch.Tensor]:
    """Groups of flat tile indices (slide * K + tile) whose pixels may be exchanged with exact labels:
    the real tiles of each slide; with ``cross_slide`` all real tiles of the negative slides form one group."""
    label, mask = bag.label.detach().cpu(), bag.mask.detach().cpu().bool()
    b, k = mask.shape
    flat = torch.arange(b * k).reshape(b, k)
    pools = []
    neg = [flat[i][mask[i]] for i in range(b) if cross_slide and float(label[i]) == 0.0]
    if neg:
        pools.append(torch.cat(neg))
    for i in range(b):
        if not (cross_slide and float(label[i]) == 0.0):
            pools.append(flat[i][mask[i]])
    return [p for p in pools if len(p) > 1]


def to_tokens(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C, p, p) tokens in row-major order."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c, p, p)


def from_tokens(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, n, c, p, _ = t.shape
    return t.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def _dense_y(y: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Pixel targets as (B, c, H, W); True when they came as (B, H, W)."""
    return (y.unsqueeze(1), True) if y.dim() == 3 else (y, False)


def _mix_labels(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``weights`` (B, B): the share of image i's pixels that came from image j; y (B,) or (B, n)."""
    flat = y.reshape(y.shape[0], -1).float()
    return (weights.to(flat.device, flat.dtype) @ flat).reshape(y.shape).to(y.dtype)


def patch_sizes(edge_px: int, multiple: int = 16) -> list[int]:
    """CellMix's patch-size list: divisors of the tile edge that are multiples of ``multiple``,
    smaller than the tile, largest first (512 -> 256, 128, 64, 32, 16; 128 -> 64, 32, 16)."""
    return [d for d in range(edge_px - 1, 0, -1) if edge_px % d == 0 and d % multiple == 0]


# --------------------------------------------------------------------------- CellMix


@register_mixer("cellmix")
class CellMix(BatchMixer):
    """CellMix (Zhang et al.): in-place shuffle of patches with fixed-position tokens and a
    loss-driven curriculum.

    Per mixed batch the images are cut into P x P patches (tokens); ``floor(N * f)`` position
    tokens, drawn once for the batch, stay; the other (relation) tokens are exchanged across
    the batch, each keeping its position. ``group`` (the paper's CellMix-group): all relation
    tokens of an image come from one other image; ``split``: each relation position is
    permuted on its own.

    Curriculum (Sec. 3.2, once per epoch, restarting with every trainer, i.e. every round):
    P walks down :func:`patch_sizes` of the tile edge in equal shares of the epochs; the fix
    ratio falls linearly from ``min(ratio_high * b, ratio_cap)`` to ``max(ratio_low * b,
    ratio_floor)``. Loss-drive: an epoch whose loss is below ``T`` makes the next epoch one
    level harder than the schedule (next smaller P, ratio x ``harder_factor``) and sets
    ``T <- T_decay * T``; otherwise ``drive='hold'`` (the paper's Loss-hold) keeps the
    scheduled level and ``'back'`` (Loss-back) makes it one level easier (next larger P,
    ratio x ``easier_factor``).

    Options (defaults = the paper's where it gives one):
        p: probability a batch is mixed (0.5: "every online augmentation is triggered by 50% chance").
        strategy: 'group' (default, best in Table 4) or 'split'.
        drive: 'hold' (default, best in Table 4) or 'back'.
        T0: the loss threshold, a number or 'auto' = the mean loss of the first epoch
            (released code: a fixed 4.0, which a pixel BCE near 0.1 always meets, so the
            loss-drive would become a fixed offset).
        b: the base of the fix-ratio range (0.5).
        ratio_high, ratio_cap, ratio_low, ratio_floor: range min(3b, 0.9) .. max(0.5b, 0.2).
        harder_factor / easier_factor: ratio multipliers of a harder / easier level (0.9 / 1.1).
        T_decay: threshold factor after a met threshold (0.933).
        patch_multiple: patch sizes are multiples of this (16 px, the ViT token).
        cross_slide: ``bag`` only: also exchange tokens among the tiles of all negative
            slides of the batch (default: only among the K tiles of one slide).
    """

    kinds = KINDS

    def __init__(
        self,
        p: float = 0.5,
        strategy: str = "group",
        drive: str = "hold",
        T0: float | str = "auto",
        b: float = 0.5,
        ratio_high: float = 3.0,
        ratio_cap: float = 0.9,
        ratio_low: float = 0.5,
        ratio_floor: float = 0.2,
        harder_factor: float = 0.9,
        easier_factor: float = 1.1,
        T_decay: float = 0.933,
        patch_multiple: int = 16,
        cross_slide: bool = False,
    ):
        super().__init__(p)
        if strategy not in ("group", "split"):
            raise ValueError(f"strategy must be 'group' or 'split', got {strategy!r}")
        if drive not in ("hold", "back"):
            raise ValueError(f"drive must be 'hold' or 'back', got {drive!r}")
        if not (T0 == "auto" or (isinstance(T0, (int, float)) and not isinstance(T0, bool) and T0 > 0)):
            raise ValueError(f"T0 must be 'auto' or a positive number, got {T0!r}")
        if patch_multiple < 1:
            raise ValueError(f"patch_multiple must be >= 1, got {patch_multiple}")
        self.strategy, self.drive, self.T0 = strategy, drive, T0
        self.ratio_start = min(ratio_high * b, ratio_cap)
        self.ratio_end = max(ratio_low * b, ratio_floor)
        if not 0.0 <= self.ratio_end <= self.ratio_start <= 1.0:
            raise ValueError(f"the fix ratio must fall within [0, 1]; got {self.ratio_start} .. {self.ratio_end}")
        self.harder_factor, self.easier_factor, self.T_decay = float(harder_factor), float(easier_factor), float(T_decay)
        self.patch_multiple, self.cross_slide = int(patch_multiple), bool(cross_slide)
        # curriculum state (saved by state_dict)
        self.epoch = 0        # finished epochs
        self.shift = 0        # levels beyond the schedule for the current epoch: +1 harder, -1 easier
        self.T: float | None = None if T0 == "auto" else float(T0)
        self.edge_px: int | None = None  # the tile edge seen in the batches

    # -- curriculum -----------------------------------------------------------------
    def scheduled_ratio(self, epoch: int) -> float:
        t = epoch / (self.epochs - 1) if self.epochs > 1 else 0.0
        return self.ratio_start + (self.ratio_end - self.ratio_start) * min(t, 1.0)

    def current(self, edge_px: int | None = None) -> tuple[int | None, float]:
        """(patch size, fix ratio) of the current epoch (patch size None while no tile edge is known)."""
        edge = edge_px or self.edge_px
        ratio = self.scheduled_ratio(self.epoch)
        if self.shift > 0:
            ratio *= self.harder_factor
        elif self.shift < 0:
            ratio *= self.easier_factor
        ratio = min(max(ratio, 0.0), 1.0)
        if edge is None:
            return None, ratio
        sizes = patch_sizes(edge, self.patch_multiple)
        if not sizes:
            raise ValueError(f"cellmix: the tile edge {edge} px has no divisor that is a multiple of "
                             f"{self.patch_multiple} px (patch_multiple); use a tile size such as 128 or 512")
        level = min(self.epoch * len(sizes) // self.epochs, len(sizes) - 1)
        level = min(max(level + self.shift, 0), len(sizes) - 1)
        return sizes[level], ratio

    def end_epoch(self, loss):
        patch, ratio = self.current()
        out = super().end_epoch(loss)
        if loss is None or not math.isfinite(loss):
            move = "hold"
        elif self.T is None:  # T0: auto
            self.T, move = float(loss), "start"
        elif loss < self.T:
            self.T, move = self.T * self.T_decay, "harder"
        else:
            move = self.drive
        self.shift = {"harder": 1, "back": -1}.get(move, 0)
        self.epoch += 1
        out.update({"patch_px": patch, "fix_ratio": round(ratio, 6), "loss": loss, "move": move,
                    "T": self.T, "strategy": self.strategy})
        return out

    def state_dict(self):
        return {**super().state_dict(), "epoch": self.epoch, "shift": self.shift, "T": self.T, "edge_px": self.edge_px}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.epoch, self.shift, self.T, self.edge_px = int(state["epoch"]), int(state["shift"]), state["T"], state["edge_px"]

    # -- the shuffle -----------------------------------------------------------------
    def sources(self, n_images: int, n_tokens: int, ratio: float, pools: Sequence[torch.Tensor],
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``src`` (n_images, n_tokens): the image each output token comes from (same position),
        and the fixed positions. Images outside every pool keep their tokens."""
        fixed = torch.randperm(n_tokens, generator=generator)[: int(math.floor(n_tokens * ratio))]
        relation = torch.ones(n_tokens, dtype=torch.bool)
        relation[fixed] = False
        rel = relation.nonzero().flatten()
        src = torch.arange(n_images).unsqueeze(1).repeat(1, n_tokens)
        for pool in pools:
            if self.strategy == "group":
                perm = pool[derangement(len(pool), generator)]
                src[pool.unsqueeze(1), rel.unsqueeze(0)] = perm.unsqueeze(1)
            else:
                for r in rel.tolist():
                    src[pool, r] = pool[torch.randperm(len(pool), generator=generator)]
        return src, fixed

    def observe(self, x):
        self.edge_px = math.gcd(*x.shape[-2:])

    def mix(self, x, y, *, kind, model, generator):
        lead = x.shape[:-3]
        h, w = x.shape[-2:]
        patch, ratio = self.current()
        flat = x.reshape(-1, *x.shape[-3:])
        n_img, n_tok = flat.shape[0], (h // patch) * (w // patch)
        if kind == "bag":
            pools = bag_pools(y, self.cross_slide)
        else:
            pools = [torch.arange(n_img)]
        src, _ = self.sources(n_img, n_tok, ratio, pools, generator)
        src_dev, pos = src.to(x.device), torch.arange(n_tok, device=x.device).unsqueeze(0)
        out = from_tokens(to_tokens(flat, patch)[src_dev, pos], h, w).reshape(*lead, *x.shape[-3:])
        if kind == "dense":
            yd, squeeze = _dense_y(y)
            ym = from_tokens(to_tokens(yd, patch)[src_dev, pos], h, w)
            return out, (ym[:, 0] if squeeze else ym)
        if kind == "label":
            weights = F.one_hot(src, n_img).float().mean(dim=1)  # (B, B): share of tokens from each image
            # the paper's soft label is f*y_self + (1 - f)*y_other; floor(N f) / N is the share that
            # actually stays, so the label matches the pixels exactly when N f is not an integer
            return out, _mix_labels(y, weights)
        return out, y


# --------------------------------------------------------------------------- ScoreMix


def box_shape(cells: int, grid: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of the smallest box of at least ``cells`` grid cells that fits the grid, as square
    (relative to the grid) as possible."""
    gh, gw = grid
    cells = min(max(int(cells), 1), gh * gw)
    best = min(((a * math.ceil(cells / a), abs(a / gh - math.ceil(cells / a) / gw), a) for a in range(1, gh + 1)
                if math.ceil(cells / a) <= gw))
    return best[2], math.ceil(cells / best[2])


def box_distribution(saliency: torch.Tensor, box: tuple[int, int]) -> torch.Tensor:
    """Eq. 9: the saliency mass of every box position (top-left corner), (B, gh - bh + 1, gw - bw + 1),
    normalised to sum to 1 per image."""
    mass = F.avg_pool2d(saliency.unsqueeze(1).double(), box, stride=1).squeeze(1)
    return mass / mass.sum(dim=(1, 2), keepdim=True).clamp_min(1e-300)


def _sample(weights: torch.Tensor, generator: torch.Generator) -> tuple[int, int]:
    """A (row, col) drawn with probability proportional to ``weights`` (uniform where all are 0)."""
    flat = weights.flatten().clamp_min(0)
    if float(flat.sum()) <= 0:
        flat = torch.ones_like(flat)
    i = int(torch.multinomial(flat.float(), 1, generator=generator))
    return divmod(i, weights.shape[1])


@register_mixer("scoremix")
class ScoreMix(BatchMixer):
    """ScoreMix (Stegmüller et al., Sec. 3.3): a box of ``ceil(lambda N)`` regions, lambda ~ Beta(alpha, beta),
    is cut from a source image where the source's semantic distribution is high and pasted where
    the target's is low (Eq. 7: the cut site ~ P_source, the paste site ~ 1 - P_target, both at box
    resolution, Eq. 9). Needs a model with ``saliency(x) -> (B, h, w)`` (ScoreNet); its regions are the
    box cells.

    ``dense``: box pixels and their targets are pasted from a random other image of the batch.
    ``bag``: boxes are swapped between two tiles of one slide (the slide keeps its pixels and
    label), with ``cross_slide`` also between tiles of negative slides. ``label``: the label is
    mixed by the pasted share (paper: lambda y_t + (1 - lambda) y_s).

    Released code: the cut site is sampled from the target's distribution; this follows the
    paper (the source's). The paste site follows Eq. 7 literally: weights 1 - P_bbox of the
    target, a mild preference for its least salient positions.

    Options: p (0.5), alpha / beta of the box-size distribution (paper: 1 - lambda ~ U[0, 1],
    i.e. Beta(1, 1)), cross_slide (``bag``; default False).
    """

    kinds = KINDS
    needs_saliency = True

    def __init__(self, p: float = 0.5, alpha: float = 1.0, beta: float = 1.0, cross_slide: bool = False):
        super().__init__(p)
        if alpha <= 0 or beta <= 0:
            raise ValueError(f"alpha and beta must be > 0, got {alpha} and {beta}")
        self.alpha, self.beta, self.cross_slide = float(alpha), float(beta), bool(cross_slide)
        self._cells = 0.0

    def _saliency(self, model, flat: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device_type=flat.device.type, enabled=False):
            return model.saliency(flat.float()).detach().float().cpu()

    def _lambda(self, generator: torch.Generator) -> float:
        # torch's Beta sampler takes no generator: Beta(1, 1) is the uniform; otherwise Johnk's method.
        if self.alpha == 1.0 and self.beta == 1.0:
            return float(torch.rand((), generator=generator, dtype=torch.float64))
        while True:
            u, v = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
            a, b = u ** (1 / self.alpha), v ** (1 / self.beta)
            if 0 < a + b <= 1:
                return a / (a + b)

    def pairs(self, kind, y, n_img: int, generator) -> list[tuple[int, int]]:
        """(source, target) image pairs; ``bag`` pairs are disjoint (each pair swaps)."""
        if kind != "bag":
            perm = derangement(n_img, generator)
            return [(int(perm[i]), i) for i in range(n_img) if int(perm[i]) != i]
        out = []
        for pool in bag_pools(y, self.cross_slide):
            order = pool[torch.randperm(len(pool), generator=generator)].tolist()
            out += [(order[j], order[j + 1]) for j in range(0, len(order) - 1, 2)]
        return out

    def mix(self, x, y, *, kind, model, generator):
        flat = x.reshape(-1, *x.shape[-3:])
        sal = self._saliency(model, flat)  # (n, gh, gw)
        grid = tuple(sal.shape[1:])
        ch, cw = flat.shape[-2] // grid[0], flat.shape[-1] // grid[1]
        out = flat.clone()
        yd = squeeze = None
        if kind == "dense":
            yd, squeeze = _dense_y(y)
            ym = yd.clone()
        weights = torch.eye(flat.shape[0])
        for s, t in self.pairs(kind, y, flat.shape[0], generator):
            n = math.ceil(self._lambda(generator) * grid[0] * grid[1])
            bh, bw = box_shape(n, grid)
            dist = box_distribution(sal[[s, t]], (bh, bw))
            rs, cs = _sample(dist[0], generator)
            rt, ct = _sample(1.0 - dist[1], generator)
            src = (slice(rs * ch, (rs + bh) * ch), slice(cs * cw, (cs + bw) * cw))
            dst = (slice(rt * ch, (rt + bh) * ch), slice(ct * cw, (ct + bw) * cw))
            out[t][(slice(None), *dst)] = flat[s][(slice(None), *src)]
            if kind == "bag":  # a swap: the source gets the target's box, so the slide keeps its pixels
                out[s][(slice(None), *src)] = flat[t][(slice(None), *dst)]
            if yd is not None:
                ym[t][(slice(None), *dst)] = yd[s][(slice(None), *src)]
            share = bh * bw / (grid[0] * grid[1])
            weights[t, t] -= share
            weights[t, s] += share
            self._cells += share
        out = out.reshape(x.shape)
        if kind == "dense":
            return out, (ym[:, 0] if squeeze else ym)
        if kind == "label":
            return out, _mix_labels(y, weights)
        return out, y

    def end_epoch(self, loss):
        out = super().end_epoch(loss)
        out["box_share_sum"] = round(self._cells, 6)  # pasted area this epoch, in images
        self._cells = 0.0
        return out

    def state_dict(self):
        return {**super().state_dict(), "box_share_sum": self._cells}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._cells = float(state.get("box_share_sum", 0.0))
