"""DLA based models for mixed-supervision WSI classification (Li et al.).

* :class:`DLAUpSeg` -- theta1, the patch segmentation network "DLA34-up": a timm
  DLA backbone (``features_only``) and a DLA-up / IDA-up decoder (iterative deep
  aggregation, as in CenterNet's ``DLASeg``) that fuses every level back up to
  stride 4 (or 2), then a small conv head producing per-pixel logits, upsampled
  bilinearly to the input resolution.
* :class:`DLAClassifier` -- theta2, a DLA with a single logit applied to tiles
  (the top-K tiles of a slide).

Both take float images in ``[0, 1]`` (uint8 in ``[0, 255]`` is also accepted) and
normalise them inside the model (``mean``/``std`` are non-persistent buffers, so
they do not appear in state dicts; they are constructor arguments).

Weights are always randomly initialised here (``pretrained`` is never passed to
timm as True): nothing is downloaded.  Load local weights with
:func:`models.utils.load_state_dict_flexible`.

Narrow variants (``*_tiny``, or any ``width_mult``/explicit ``channels``) are
built from timm's :class:`timm.models.dla.DLA` class directly.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
from timm.layers import make_divisible
from timm.models import build_model_with_cfg
from timm.models.dla import DLA, DlaBasic, DlaBottleneck

from .registry import register_model

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "InputNormalize",
    "IDAUp",
    "DLAUp",
    "DLAUpSeg",
    "DLAClassifier",
    "create_dla_backbone",
    "prior_bias",
    "dla34_up",
    "dla34_up_tiny",
    "dla34_cls",
    "dla34_cls_tiny",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Architectures that can be rebuilt with other widths (mirrors timm's dla.py).
_DLA_ARCHS: Dict[str, dict] = {
    "dla34": dict(levels=(1, 1, 1, 2, 2, 1), channels=(16, 32, 64, 128, 256, 512), block="basic"),
    "dla46_c": dict(levels=(1, 1, 1, 2, 2, 1), channels=(16, 32, 64, 64, 128, 256), block="bottleneck"),
    "dla60": dict(levels=(1, 1, 1, 2, 3, 1), channels=(16, 32, 128, 256, 512, 1024), block="bottleneck"),
}
_BLOCKS = {"basic": DlaBasic, "bottleneck": DlaBottleneck}

# Width of the tiny variants (channels (8, 8, 16, 32, 64, 128) for dla34).
TINY_WIDTH_MULT = 0.25

# Input sides must be multiples of this: every timm DLA downsamples by 2 five times (feature strides 2-32).
DLA_SIZE_DIVISOR = 32


def prior_bias(prior_prob: Optional[float]) -> float:
    """Bias making ``sigmoid(bias) == prior_prob`` (0 for ``None``)."""
    if prior_prob is None:
        return 0.0
    if not 0.0 < prior_prob < 1.0:
        raise ValueError(f"prior_prob must be in (0, 1), got {prior_prob}")
    return -math.log((1.0 - prior_prob) / prior_prob)


def _resolve_mean_std(
    in_chans: int, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]
) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    if mean is None:
        mean = IMAGENET_MEAN if in_chans == 3 else (0.5,) * in_chans
    if std is None:
        std = IMAGENET_STD if in_chans == 3 else (0.5,) * in_chans
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(f"mean/std need {in_chans} values (in_chans), got {len(mean)} and {len(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {std}")
    return mean, std


class InputNormalize(nn.Module):
    """``(x - mean) / std`` per channel; uint8 input is first scaled to [0, 1].

    ``mean``/``std`` are non-persistent buffers: they follow ``.to(device)`` /
    ``.half()`` but are not stored in (nor expected from) state dicts.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
        if x.shape[1] != self.mean.shape[1]:
            raise ValueError(f"expected {self.mean.shape[1]} input channels, got {x.shape[1]}")
        if x.dtype == torch.uint8:
            x = x.to(self.mean.dtype) / 255.0
        else:
            x = x.to(self.mean.dtype)
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={tuple(round(v, 4) for v in self.mean.flatten().tolist())}, " \
               f"std={tuple(round(v, 4) for v in self.std.flatten().tolist())}"


def create_dla_backbone(
    variant: str = "dla34",
    *,
    width_mult: float = 1.0,
    levels: Optional[Sequence[int]] = None,
    channels: Optional[Sequence[int]] = None,
    block: Optional[str] = None,
    features_only: bool = False,
    out_indices: Sequence[int] = (1, 2, 3, 4, 5),
    **kwargs,
) -> nn.Module:
    """A randomly initialised timm DLA (never pretrained).

    With the default width and no overrides this is exactly
    ``timm.create_model(variant, pretrained=False, ...)``; otherwise the timm
    :class:`~timm.models.dla.DLA` class is built with ``levels``/``channels``/
    ``block`` (defaults from ``variant``; channels scaled by ``width_mult`` and
    rounded to multiples of 8).  ``features_only=True`` returns timm's feature
    extractor over ``out_indices`` (index i is stride 2**i; index 0, stride 1,
    is rarely useful).  Extra ``kwargs`` (``in_chans``, ``num_classes``,
    ``drop_rate``, ``global_pool`` ...) go to timm.
    """
    if kwargs.pop("pretrained", False):
        raise ValueError("pretrained weights are never downloaded; load a local file instead")
    feat_kwargs = dict(features_only=True, out_indices=tuple(out_indices)) if features_only else {}
    custom = width_mult != 1.0 or levels is not None or channels is not None or block is not None
    if not custom:
        return timm.create_model(variant, pretrained=False, **feat_kwargs, **kwargs)
    if variant not in _DLA_ARCHS:
        raise ValueError(
            f"width_mult/levels/channels/block overrides support {sorted(_DLA_ARCHS)}, got {variant!r}"
        )
    arch = _DLA_ARCHS[variant]
    levels = tuple(int(v) for v in (levels if levels is not None else arch["levels"]))
    if channels is None:
        channels = tuple(make_divisible(c * width_mult, 8) for c in arch["channels"])
    elif width_mult != 1.0:
        raise ValueError("give either explicit channels or width_mult, not both")
    channels = tuple(int(c) for c in channels)
    if len(levels) != 6 or len(channels) != 6:
        raise ValueError(f"DLA needs 6 levels and 6 channels, got {levels} and {channels}")
    block_name = block if block is not None else arch["block"]
    if block_name not in _BLOCKS:
        raise ValueError(f"block must be one of {sorted(_BLOCKS)}, got {block_name!r}")
    build_kwargs = dict(kwargs)
    if features_only:
        build_kwargs["features_only"] = True
    return build_model_with_cfg(
        DLA,
        variant,  # only names the (unused) pretrained cfg
        pretrained=False,
        feature_cfg=dict(out_indices=tuple(out_indices)),
        levels=levels,
        channels=channels,
        block=_BLOCKS[block_name],
        **build_kwargs,
    )


def _init_conv_bn(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ConvBnAct(nn.Sequential):
    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3):
        super().__init__(
            nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.ReLU(inplace=True),
        )


class BilinearDeconv(nn.ConvTranspose2d):
    """Learnable depthwise x``factor`` upsampling, initialised to bilinear
    interpolation (kernel 2f, stride f, padding f/2: output is exactly f times
    the input size for even f)."""

    def __init__(self, chs: int, factor: int):
        if factor < 2 or factor % 2:
            raise ValueError(f"deconv upsampling needs an even factor >= 2, got {factor}")
        super().__init__(chs, chs, 2 * factor, stride=factor, padding=factor // 2, groups=chs, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        k = self.kernel_size[0]
        f = math.ceil(k / 2)
        c = (2 * f - 1 - f % 2) / (2.0 * f)
        t = torch.arange(k, dtype=torch.float32)
        w1 = 1 - torch.abs(t / f - c)
        with torch.no_grad():
            self.weight.copy_((w1[:, None] * w1[None, :]).expand_as(self.weight))


class Upsample(nn.Module):
    """Fixed bilinear x``factor`` upsampling."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = int(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.factor, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


def _make_up(chs: int, factor: int, mode: str) -> nn.Module:
    if factor == 1:
        return nn.Identity()
    if mode == "deconv":
        return BilinearDeconv(chs, factor)
    if mode == "bilinear":
        return Upsample(factor)
    raise ValueError(f"upsample must be 'deconv' or 'bilinear', got {mode!r}")


class IDAUp(nn.Module):
    """Iterative deep aggregation of a list of feature maps onto the first one.

    ``xs[0]`` has ``out_chs`` channels and the target resolution; ``xs[i]``
    (i >= 1) has ``in_chs[i]`` channels at ``1 / up_factors[i]`` of it.  Each is
    projected (1x1 conv-BN-ReLU when the channel count differs), upsampled and
    merged into the running aggregate by a 3x3 conv-BN-ReLU node::

        y_0 = xs[0];   y_i = node_i(up_i(proj_i(xs[i])) + y_{i-1})

    Returns ``[y_0, y_1, ..., y_n]`` (the last is the full aggregate).
    """

    def __init__(self, out_chs: int, in_chs: Sequence[int], up_factors: Sequence[int], upsample: str = "deconv"):
        super().__init__()
        if len(in_chs) != len(up_factors) or len(in_chs) < 2:
            raise ValueError("IDAUp needs >= 2 inputs and one up factor per input")
        self.out_chs = out_chs
        self.proj = nn.ModuleList()
        self.up = nn.ModuleList()
        self.node = nn.ModuleList()
        for c, f in zip(in_chs[1:], up_factors[1:]):
            self.proj.append(ConvBnAct(c, out_chs, 1) if c != out_chs else nn.Identity())
            self.up.append(_make_up(out_chs, int(f), upsample))
            self.node.append(ConvBnAct(out_chs, out_chs, 3))

    def forward(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        ys = [xs[0]]
        for i, (proj, up, node) in enumerate(zip(self.proj, self.up, self.node)):
            ys.append(node(up(proj(xs[i + 1])) + ys[-1]))
        return ys


class DLAUp(nn.Module):
    """DLA-up: IDA stages from the coarsest level down to the finest.

    Stage s aggregates level ``j = n - 2 - s`` with everything above it (which
    the previous stage already brought to level ``j + 1``'s resolution with
    ``chs[j + 1]`` channels), leaving them all at level j.  The output is a
    pyramid ``[agg_0, agg_1, ..., agg_{n-2}, x_{n-1}]`` where ``agg_j`` has
    ``chs[j]`` channels at level j's resolution and has seen every deeper level.
    """

    def __init__(self, chs: Sequence[int], scales: Sequence[int], upsample: str = "deconv"):
        super().__init__()
        chs, scales = list(chs), list(scales)
        self.n = len(chs)
        in_chs, cur_scales = list(chs), list(scales)
        self.ida = nn.ModuleList()
        for s in range(self.n - 1):
            j = self.n - 2 - s
            factors = [cur_scales[k] // cur_scales[j] for k in range(j, self.n)]
            self.ida.append(IDAUp(chs[j], in_chs[j:], factors, upsample))
            # after this stage levels j.. are at level j's resolution with chs[j] channels
            for k in range(j + 1, self.n):
                in_chs[k] = chs[j]
                cur_scales[k] = cur_scales[j]

    def forward(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        layers = list(xs)
        out = [layers[-1]]
        for s, ida in enumerate(self.ida):
            j = self.n - 2 - s
            ys = ida(layers[j:])
            layers = layers[:j] + ys
            out.insert(0, ys[-1])
        return out


class DLAUpSeg(nn.Module):
    """DLA backbone + DLA-up/IDA-up decoder + per-pixel logit head (theta1).

    Args:
        backbone: timm DLA variant name (``dla34``; ``dla46_c``, ``dla60`` ... work too).
        num_classes: output channels (1: a positive-probability logit).
        in_chans: input channels.
        out_stride: resolution of the fused decoder map (4, the DLA34-up
            default, or 2 for finer maps; 8/16 are allowed).
        upsample: ``'deconv'`` (learnable depthwise transposed conv initialised
            to bilinear, as in CenterNet) or ``'bilinear'`` (fixed interpolation).
        head_chs: width of the 3x3 conv of the head (0: a single 1x1 conv).
        drop_rate: dropout (channel-wise) before the final 1x1 conv.
        prior_prob: initial foreground probability; sets the final bias to
            ``-log((1 - p) / p)`` (``None``: zero bias).
        width_mult / levels / channels / block: narrow or custom backbones.
        mean / std: input normalisation (ImageNet for 3 channels by default).

    ``forward(x)`` maps ``(B, C, H, W)`` images in [0, 1] (H, W multiples of 32)
    to logits ``(B, num_classes, H, W)``; ``forward(x, upsample=False)`` returns
    the logits at ``out_stride`` instead.
    """

    def __init__(
        self,
        backbone: str = "dla34",
        num_classes: int = 1,
        in_chans: int = 3,
        out_stride: int = 4,
        upsample: str = "deconv",
        head_chs: int = 256,
        drop_rate: float = 0.0,
        prior_prob: Optional[float] = 0.01,
        width_mult: float = 1.0,
        levels: Optional[Sequence[int]] = None,
        channels: Optional[Sequence[int]] = None,
        block: Optional[str] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.normalize = InputNormalize(*_resolve_mean_std(in_chans, mean, std))
        self.backbone = create_dla_backbone(
            backbone, width_mult=width_mult, levels=levels, channels=channels, block=block,
            features_only=True, out_indices=(1, 2, 3, 4, 5), in_chans=in_chans,
        )
        feat_chs = list(self.backbone.feature_info.channels())
        feat_red = list(self.backbone.feature_info.reduction())
        if out_stride not in feat_red[:-1]:
            raise ValueError(f"out_stride must be one of {feat_red[:-1]}, got {out_stride}")
        self.first_level = feat_red.index(out_stride)
        self.output_stride = out_stride
        self.size_divisor = max(feat_red)
        chs = feat_chs[self.first_level:]
        scales = [r // out_stride for r in feat_red[self.first_level:]]
        self.dla_up = DLAUp(chs, scales, upsample)
        # final IDA over the aggregated pyramid except its coarsest (raw) level
        self.ida_up = IDAUp(chs[0], chs[:-1], scales[:-1], upsample)
        self.num_features = chs[0]
        if head_chs > 0:
            self.head = nn.Sequential(
                nn.Conv2d(chs[0], head_chs, 3, padding=1, bias=True),
                nn.ReLU(inplace=True),
            )
            cls_in = head_chs
        else:
            self.head = nn.Identity()
            cls_in = chs[0]
        self.head_drop = nn.Dropout2d(drop_rate) if drop_rate > 0 else nn.Identity()
        self.classifier = nn.Conv2d(cls_in, num_classes, 1, bias=True)

        # (deconvs are not Conv2d: they keep their bilinear initialisation)
        _init_conv_bn(self.dla_up)
        _init_conv_bn(self.ida_up)
        _init_conv_bn(self.head)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.constant_(self.classifier.bias, prior_bias(prior_prob))

    def check_input_size(self, x: torch.Tensor) -> None:
        h, w = x.shape[-2:]
        d = self.size_divisor
        if h % d or w % d:
            raise ValueError(
                f"input height and width must be multiples of {d}, got {h}x{w} (HxW); "
                f"pad or crop the tile (e.g. to {math.ceil(h / d) * d}x{math.ceil(w / d) * d})"
            )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Fused decoder features ``(B, num_features, H/out_stride, W/out_stride)``."""
        self.check_input_size(x)
        feats = self.backbone(self.normalize(x))[self.first_level:]
        pyramid = self.dla_up(feats)
        return self.ida_up(pyramid[:-1])[-1]

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits at ``out_stride`` from :meth:`forward_features` output."""
        return self.classifier(self.head_drop(self.head(features)))

    def forward(self, x: torch.Tensor, upsample: bool = True) -> torch.Tensor:
        logits = self.forward_head(self.forward_features(x))
        if upsample and self.output_stride > 1:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits


class DLAClassifier(nn.Module):
    """A timm DLA image classifier with in-model normalisation (theta2).

    ``forward(x)`` maps ``(B, C, H, W)`` in [0, 1] to logits ``(B,)`` when
    ``num_classes == 1`` (else ``(B, num_classes)``).  :meth:`forward_tiles`
    takes ``(B, K, C, H, W)`` (K tiles per slide) and returns ``(B, K)``.
    """

    def __init__(
        self,
        backbone: str = "dla34",
        num_classes: int = 1,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        prior_prob: Optional[float] = None,
        width_mult: float = 1.0,
        levels: Optional[Sequence[int]] = None,
        channels: Optional[Sequence[int]] = None,
        block: Optional[str] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.normalize = InputNormalize(*_resolve_mean_std(in_chans, mean, std))
        self.backbone = create_dla_backbone(
            backbone, width_mult=width_mult, levels=levels, channels=channels, block=block,
            num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate, global_pool=global_pool,
        )
        self.num_features = self.backbone.num_features
        self.size_divisor = int(self.backbone.feature_info[-1]["reduction"])
        # timm's DLA initialises its 1x1-conv classifier like any conv, with
        # std sqrt(2 / num_classes) (1.41 for one class): initial logits of
        # +-10 saturate a BCE loss.  Use a small normal init and a prior bias.
        fc = self.backbone.get_classifier()
        if isinstance(fc, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(fc.weight, std=0.01)
            if fc.bias is not None:
                nn.init.constant_(fc.bias, prior_bias(prior_prob))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled last-level features ``(B, num_features, H/32, W/32)``."""
        return self.backbone.forward_features(self.normalize(x))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        out = self.backbone.forward_head(features, pre_logits=pre_logits)
        if not pre_logits and self.num_classes == 1:
            out = out.reshape(out.shape[0])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """``(B, K, C, H, W)`` tiles -> ``(B, K)`` logits (``(B, K, num_classes)`` if > 1)."""
        if tiles.dim() != 5:
            raise ValueError(f"expected (B, K, C, H, W) tiles, got shape {tuple(tiles.shape)}")
        b, k = tiles.shape[:2]
        out = self.forward(tiles.reshape(b * k, *tiles.shape[2:]))
        return out.reshape(b, k, *out.shape[1:])


def _tiny_defaults(kwargs: dict) -> dict:
    if "channels" not in kwargs and "width_mult" not in kwargs:
        kwargs["width_mult"] = TINY_WIDTH_MULT
    return kwargs


@register_model("dla34_up", size_divisor=DLA_SIZE_DIVISOR)
def dla34_up(**kwargs) -> DLAUpSeg:
    """DLA34-up (theta1): dla34 + DLA-up/IDA-up decoder to stride 4, 1 logit per pixel."""
    kwargs.setdefault("backbone", "dla34")
    return DLAUpSeg(**kwargs)


@register_model("dla34_up_tiny", size_divisor=DLA_SIZE_DIVISOR)
def dla34_up_tiny(**kwargs) -> DLAUpSeg:
    """DLA34-up at a quarter width (backbone channels 8/8/16/32/64/128, decoder
    16/32/64, head 16): for CPU tests and demos."""
    kwargs.setdefault("backbone", "dla34")
    kwargs.setdefault("head_chs", 16)
    return DLAUpSeg(**_tiny_defaults(kwargs))


@register_model("dla34_cls", size_divisor=DLA_SIZE_DIVISOR)
def dla34_cls(**kwargs) -> DLAClassifier:
    """DLA34 tile classifier (theta2), one logit per tile."""
    kwargs.setdefault("backbone", "dla34")
    return DLAClassifier(**kwargs)


@register_model("dla34_cls_tiny", size_divisor=DLA_SIZE_DIVISOR)
def dla34_cls_tiny(**kwargs) -> DLAClassifier:
    """DLA34 tile classifier at a quarter width: for CPU tests and demos."""
    kwargs.setdefault("backbone", "dla34")
    return DLAClassifier(**_tiny_defaults(kwargs))
