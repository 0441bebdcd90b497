"""DINO self-distillation (Caron et al. 2021), as ScoreNet pre-trains its ViTs (Stegmüller et al., Sec. 3.1).

A student and a teacher share one architecture (a backbone followed by a
projection head). The teacher sees the two global crops of an image, the
student sees those and ``N`` local crops; the student is trained so that its
output distribution on every crop matches the teacher's on each *other* global
crop (cross-entropy ``-p_t log p_s``). The teacher gets no gradient: after each
step it follows the student by an exponential moving average of the
parameters. Collapse is avoided by *centring* the teacher's outputs (a running
mean, momentum ``center_momentum``) and *sharpening* them with a low
temperature.

Everything here is torch only: the heads, the loss, the EMA update, schedules
and the multi-crop augmentation as batched tensor ops with an explicit
``torch.Generator`` (so a resumed run draws the same crops). Files, configs
and data loading belong to :mod:`pipeline.pretrain`.

Backbones (:func:`backbone_part`) are parts of registered models, so the
teacher's weights load back into that model by name:

* ``scorer`` of ``scorenet*``: the recommendation ViT, pre-trained on images
  downsampled by the model's factor ``s`` (the paper's thumbnails); features =
  its pseudo [CLS] tokens, the ones ScoreNet's head reads.
* ``fine`` of ``scorenet*``: the fine-grained ViT, pre-trained on full-resolution
  crops of one region (``region_px``); features = the mean token, the one
  ScoreNet aggregates.
* ``backbone`` of ``dla34_cls*``: the DLA trunk, features = global average pool.
  (ScoreNet App. C: DINO is biased towards ViTs, the CNN learns worse features.)
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "DINOHead",
    "DINOLoss",
    "BackbonePart",
    "backbone_part",
    "DINO",
    "MultiCrop",
    "ema_update",
    "cosine_schedule",
    "PARTS",
    "teacher_entropy",
    "knn_classify",
    "class_margin",
]


class DINOHead(nn.Module):
    """Projection head: an MLP (``nlayers`` linear layers, GELU) to ``bottleneck_dim``, L2
    normalisation, then a weight-normalised linear layer without bias to ``out_dim``
    prototypes. With ``norm_last_layer`` the prototypes' lengths are fixed to 1 (DINO's
    default for ViTs: stabler training)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int = 3,
                 norm_last_layer: bool = True):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # weight norm: w = g * v / |v| per prototype; g fixed to 1 with norm_last_layer
        self.last_v = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.last_v, std=0.02)
        self.last_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    def last_layer_params(self) -> list[nn.Parameter]:
        return [self.last_v, self.last_g]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        w = self.last_g * F.normalize(self.last_v, dim=-1)
        return F.linear(x, w)


class DINOLoss(nn.Module):
    """Cross-entropy between the sharpened, centred teacher and the student over crop pairs.

    ``forward(student_out, teacher_out, teacher_temp)``: ``student_out`` is
    ``(n_crops * B, K)`` (global crops first), ``teacher_out`` ``(2 * B, K)``.
    Every (teacher global crop i, student crop v != i) pair contributes
    ``sum_k -softmax((t - c) / tau_t) log softmax(s / tau_s)``, averaged over the
    batch and the pairs. :meth:`update_center` then moves the centre towards the
    batch mean of the teacher's outputs.
    """

    def __init__(self, out_dim: int, n_crops: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 n_global: int = 2):
        super().__init__()
        self.n_crops, self.n_global = int(n_crops), int(n_global)
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.stats: dict = {}  # teacher_entropy of the last call's targets (a collapse monitor)

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        s = (student_out.float() / self.student_temp).chunk(self.n_crops)
        t = F.softmax((teacher_out.float() - self.center) / teacher_temp, dim=-1).detach().chunk(self.n_global)
        total, pairs = 0.0, 0
        for i, q in enumerate(t):
            for v, sv in enumerate(s):
                if v == i:
                    continue
                total = total + torch.sum(-q * F.log_softmax(sv, dim=-1), dim=-1).mean()
                pairs += 1
        self.stats = teacher_entropy(torch.cat(t))
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        batch_center = teacher_out.float().mean(dim=0, keepdim=True)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


@torch.no_grad()
def teacher_entropy(p: torch.Tensor) -> dict:
    """How collapsed the teacher's targets ``p`` ``(N, K)`` (rows sum to 1) are, as fractions of ``ln K``.

    ``sample``: the mean entropy of one image's target. Near 1 the targets are
    flat: *uniform collapse* (centring won over sharpening; the student is
    taught nothing about the image). ``batch``: the entropy of the batch's mean
    target. Near 0 every image points at one prototype: *one-dimension
    collapse* (sharpening won). DINO (Caron et al. 2021, Sec. 5.3) monitors
    the same two quantities; a healthy run has a low ``sample`` and a high
    ``batch`` entropy.
    """
    p = p.float().clamp_min(1e-12)
    ln_k = math.log(p.shape[-1])
    sample = float(-(p * p.log()).sum(-1).mean()) / ln_k
    m = p.mean(0)
    return {"sample": sample, "batch": float(-(m * m.log()).sum()) / ln_k}


@torch.no_grad()
def knn_classify(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, n_classes: int,
                 k: int = 20, temperature: float = 0.07) -> torch.Tensor:
    """Weighted k-nearest-neighbour labels of ``queries`` ``(M, D)`` from ``bank`` ``(N, D)``.

    Cosine similarity of L2-normalised features; each of the ``k`` nearest
    votes for its label with weight ``exp(sim / temperature)``. This is the
    evaluation DINO reports (k 20, T 0.07) and ScoreNet uses to judge its
    pre-trained ViTs (App. C, Tables 5-7): no training, so it shows what the
    features alone carry.
    """
    sim = F.normalize(queries.float(), dim=1) @ F.normalize(bank.float(), dim=1).T
    top, idx = sim.topk(min(int(k), bank.shape[0]), dim=1)
    votes = torch.zeros(queries.shape[0], int(n_classes), dtype=torch.float64)
    votes.scatter_add_(1, bank_labels.long()[idx], torch.exp(top.double() / temperature))
    return votes.argmax(1)


@torch.no_grad()
def class_margin(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor,
                 query_labels: torch.Tensor) -> float:
    """Mean over queries of (cosine to the nearest bank item of its own class) minus (cosine to the
    nearest of another class): > 0 when features put like next to like. A continuous companion of
    :func:`knn_classify`'s accuracy, which moves in steps of 1 / queries."""
    sim = F.normalize(queries.float(), dim=1) @ F.normalize(bank.float(), dim=1).T
    same = query_labels.long()[:, None] == bank_labels.long()[None, :]
    own = sim.masked_fill(~same, -2.0).max(1).values
    other = sim.masked_fill(same, -2.0).max(1).values
    return float((own - other).mean())


# --------------------------------------------------------------------------- backbones


class BackbonePart(nn.Module):
    """One part of a registered model as a feature extractor ``(B, 3, H, W) in [0, 1] -> (B, D)``.

    ``module`` is the part itself (its ``state_dict`` keys are the target model's
    with the ``prefix`` removed); ``normalize`` the model's own input normalisation.
    """

    def __init__(self, part: str, prefix: str, module: nn.Module, normalize: nn.Module, out_dim: int,
                 kind: str, min_px: int, size_step: int):
        super().__init__()
        self.part, self.prefix, self.kind = part, prefix, kind
        self.module = module
        self.normalize = normalize
        self.out_dim = int(out_dim)
        self.min_px, self.size_step = int(min_px), int(size_step)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xn = self.normalize(x)
        if self.kind == "vit_cls":
            cls, _, _ = self.module(xn)
            return cls
        if self.kind == "vit_gap":
            _, gap, _ = self.module(xn)
            return gap
        # CNN: DLA trunk, global average pool (the classifier's own pre-logits)
        return self.module.forward_head(self.module.forward_features(xn), pre_logits=True).flatten(1)

    def target_state_dict(self) -> dict:
        """The part's weights under the target model's key names."""
        skip = ()
        if self.kind == "cnn":  # the trunk's own classifier is the target's head, not features
            fc = self.module.get_classifier()
            skip = tuple(f"{n}." for n, m in self.module.named_modules() if m is fc and n)
        return {f"{self.prefix}.{k}": v.detach().clone() for k, v in self.module.state_dict().items()
                if not k.startswith(skip)}


#: Which parts each kind of model offers, and the first one (``auto``).
PARTS = {"scorenet": ("scorer", "fine"), "dla": ("backbone",)}


def backbone_part(model: nn.Module, part: str = "auto") -> BackbonePart:
    """The pre-trainable part ``part`` of a built model (see the module docstring)."""
    from .dla import DLAClassifier
    from .scorenet import ScoreNet

    if isinstance(model, ScoreNet):
        family = "scorenet"
    elif isinstance(model, DLAClassifier):
        family = "dla"
    else:
        raise ValueError(f"DINO pre-training supports ScoreNet and DLA classifiers, not {type(model).__name__}")
    part = PARTS[family][0] if part == "auto" else part
    if part not in PARTS[family]:
        raise ValueError(f"a {family} model has the parts {list(PARTS[family])} to pre-train, not {part!r}")
    if part == "scorer":
        vit = model.scorer
        ncls = vit.encoder.num_cls
        # crops of the downsampled image: whole tokens, at least 2 x 2 of them
        return BackbonePart(part, "scorer", vit, model.normalize, ncls * vit.embed_dim, "vit_cls",
                            2 * vit.token_px, vit.token_px)
    if part == "fine":
        vit = model.fine
        return BackbonePart(part, "fine", vit, model.normalize, vit.embed_dim, "vit_gap", 2 * vit.token_px,
                            vit.token_px)
    trunk = model.backbone
    return BackbonePart(part, "backbone", trunk, model.normalize, model.num_features, "cnn",
                        model.size_divisor, model.size_divisor)


# --------------------------------------------------------------------------- EMA and schedules


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``theta_t <- m theta_t + (1 - m) theta_s`` for every parameter; buffers are copied
    (DINO's ViTs have none that learn; BatchNorm statistics follow the student)."""
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.mul_(momentum).add_(ps.detach(), alpha=1.0 - momentum)
    for bt, bs in zip(teacher.buffers(), student.buffers()):
        bt.copy_(bs)


def cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int, warmup_epochs: int = 0,
                    start_warmup: float = 0.0) -> list[float]:
    """Per-step values: linear warm-up from ``start_warmup`` to ``base`` over ``warmup_epochs``,
    then a half cosine from ``base`` to ``final`` (DINO's ``cosine_scheduler``)."""
    warm = min(warmup_epochs, epochs) * steps_per_epoch
    total = epochs * steps_per_epoch
    out = [start_warmup + (base - start_warmup) * i / warm for i in range(warm)]
    rest = total - warm
    out += [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / rest)) for i in range(rest)]
    return out


# --------------------------------------------------------------------------- multi-crop


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


class MultiCrop:
    """DINO's augmentation as batched tensor ops: ``n_global`` crops of ``global_px`` with area
    fraction in ``global_scale`` and ``n_local`` of ``local_px`` in ``local_scale`` (aspect ratio
    in [3/4, 4/3]), each flipped, colour-jittered (probability 0.8), greyed (0.2), blurred
    (global: 1.0 and 0.1, local: 0.5) and the second global crop solarised (0.2).

    ``__call__(x, generator)`` takes ``(B, 3, H, W)`` floats in [0, 1] and returns the list of
    crops, global ones first. All draws come from the CPU ``generator``.
    """

    def __init__(self, global_px: int, local_px: int, n_local: int, global_scale: Sequence[float] = (0.4, 1.0),
                 local_scale: Sequence[float] = (0.05, 0.4), n_global: int = 2, jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
                 p_jitter: float = 0.8, p_grey: float = 0.2, blur: Sequence[float] = (1.0, 0.1, 0.5),
                 p_solarize: float = 0.2):
        self.global_px, self.local_px = int(global_px), int(local_px)
        self.n_global, self.n_local = int(n_global), int(n_local)
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.jitter, self.p_jitter, self.p_grey = tuple(jitter), float(p_jitter), float(p_grey)
        self.blur, self.p_solarize = tuple(blur), float(p_solarize)

    @property
    def n_crops(self) -> int:
        return self.n_global + self.n_local

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        crops = []
        for i in range(self.n_global):
            c = self.resized_crop(x, self.global_px, self.global_scale, generator)
            c = self.photometric(c, generator, p_blur=self.blur[min(i, 1)],
                                 p_solarize=self.p_solarize if i == 1 else 0.0)
            crops.append(c)
        for _ in range(self.n_local):
            c = self.resized_crop(x, self.local_px, self.local_scale, generator)
            crops.append(self.photometric(c, generator, p_blur=self.blur[2], p_solarize=0.0))
        return crops

    @staticmethod
    def resized_crop(x: torch.Tensor, size: int, scale: Sequence[float], g: torch.Generator) -> torch.Tensor:
        """Random-resized crops (one box per image) resampled bilinearly to ``size`` px, random h-flip."""
        b, _, h, w = x.shape
        area = _uniform(b, *scale, g) * h * w
        log_r = _uniform(b, math.log(3 / 4), math.log(4 / 3), g)
        ratio = torch.exp(log_r)
        cw = torch.sqrt(area * ratio).clamp(1, w)
        ch = torch.sqrt(area / ratio).clamp(1, h)
        x0 = _uniform(b, 0, 1, g) * (w - cw)
        y0 = _uniform(b, 0, 1, g) * (h - ch)
        flip = torch.rand(b, generator=g) < 0.5
        # affine grids in normalised coordinates (align_corners=False)
        theta = torch.zeros(b, 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = cw / w * torch.where(flip, -1.0, 1.0).double()
        theta[:, 0, 2] = (2 * x0 + cw) / w - 1
        theta[:, 1, 1] = ch / h
        theta[:, 1, 2] = (2 * y0 + ch) / h - 1
        grid = F.affine_grid(theta.to(x.device, x.dtype), [b, x.shape[1], size, size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def photometric(self, x: torch.Tensor, g: torch.Generator, p_blur: float, p_solarize: float) -> torch.Tensor:
        b = x.shape[0]

        def draw(p: float) -> torch.Tensor:
            return (torch.rand(b, generator=g) < p).to(x.device).view(b, 1, 1, 1)

        def factor(r: float) -> torch.Tensor:
            return (1 + r * (2 * torch.rand(b, generator=g) - 1)).to(x.device, x.dtype).view(b, 1, 1, 1)

        w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        br, co, sa, hu = self.jitter
        jit = draw(self.p_jitter)
        y = x * factor(br)
        grey = (y * w).sum(1, keepdim=True)
        y = (y - grey.mean((2, 3), keepdim=True)) * factor(co) + grey.mean((2, 3), keepdim=True)
        grey = (y * w).sum(1, keepdim=True)
        y = (y - grey) * factor(sa) + grey
        # hue: rotate the chroma plane by up to hu of the colour circle (YIQ)
        theta = ((2 * torch.rand(b, generator=g) - 1) * hu * 2 * math.pi).to(x.device, x.dtype)
        yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                           device=x.device, dtype=x.dtype)
        rot = torch.zeros(b, 3, 3, device=x.device, dtype=x.dtype)
        rot[:, 0, 0] = 1
        rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = theta.cos(), -theta.sin(), theta.sin(), theta.cos()
        y = torch.einsum("nij,njhw->nihw", torch.linalg.inv(yiq) @ rot @ yiq, y).clamp(0, 1)
        x = torch.where(jit, y, x)
        x = torch.where(draw(self.p_grey), (x * w).sum(1, keepdim=True).expand_as(x), x)
        x = torch.where(draw(p_blur), self._blur(x, g), x)
        x = torch.where(draw(p_solarize), torch.where(x >= 0.5, 1 - x, x), x)
        return x.contiguous()

    @staticmethod
    def _blur(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Gaussian blur, sigma in [0.1, 2.0] px (DINO) scaled to the crop: sigma * size / 224."""
        b, c, h, _ = x.shape
        sigma = (_uniform(b, 0.1, 2.0, g) * h / 224).clamp(min=0.05).to(x.device, x.dtype)
        r = max(1, int(math.ceil(3 * float(sigma.max()))))
        t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
        k = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
        k = k / k.sum(1, keepdim=True)  # (b, 2r + 1)
        xp = F.pad(x.reshape(1, b * c, h, -1), (r, r, r, r), mode="replicate")
        kk = k.repeat_interleave(c, 0)
        y = F.conv2d(xp, kk.view(b * c, 1, 1, -1), groups=b * c)
        y = F.conv2d(y, kk.view(b * c, 1, -1, 1), groups=b * c)
        return y.reshape(x.shape)


# --------------------------------------------------------------------------- the pair


class DINO(nn.Module):
    """Student and teacher (backbone + :class:`DINOHead`) and the loss.

    ``loss(crops, teacher_temp)`` runs the teacher on the global crops and the
    student on all of them (crops of one size are batched together) and
    returns the DINO loss; the caller steps the optimiser on the student's
    parameters, then calls :meth:`update_teacher` and the loss's centre is
    already updated.
    """

    def __init__(self, backbone: BackbonePart, out_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int,
                 norm_last_layer: bool, n_crops: int, student_temp: float, center_momentum: float):
        super().__init__()
        head = DINOHead(backbone.out_dim, out_dim, hidden_dim, bottleneck_dim, nlayers, norm_last_layer)
        self.student = nn.ModuleDict({"backbone": backbone, "head": head})
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.criterion = DINOLoss(out_dim, n_crops, student_temp, center_momentum)

    @staticmethod
    def _run(net: nn.ModuleDict, crops: list[torch.Tensor]) -> torch.Tensor:
        outs, i = [], 0
        while i < len(crops):  # consecutive crops of one size in one forward pass
            j = i
            while j < len(crops) and crops[j].shape == crops[i].shape:
                j += 1
            outs.append(net["head"](net["backbone"](torch.cat(crops[i:j]))))
            i = j
        return torch.cat(outs)

    def loss(self, crops: list[torch.Tensor], teacher_temp: float) -> torch.Tensor:
        with torch.no_grad():
            t_out = self._run(self.teacher, crops[: self.criterion.n_global])
        s_out = self._run(self.student, crops)
        loss = self.criterion(s_out, t_out, teacher_temp)
        self.criterion.update_center(t_out)
        return loss

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        ema_update(self.teacher, self.student, momentum)

    def teacher_weights(self) -> dict:
        """The teacher backbone's weights under the target model's key names (what DINO evaluates)."""
        return self.teacher["backbone"].target_state_dict()
