"""ScoreNet (Stegmüller et al.): a tile classifier that looks closely at a few regions.

1. Recommendation: the tile, downscaled by ``s``, goes through a ViT (the scorer)
   with tokens of ``token_px``.  Each token is a ``region_px = s * token_px``
   region of the tile.  The attention logits of the last block's [CLS] query
   over the region tokens, mixed over heads by learnable weights and put
   through a softmax, give the *semantic distribution* (Eq. 3, :meth:`ScoreNet.saliency`).
2. The k = ceil(0.1 N) best regions are cut out at full resolution
   (:mod:`models.topk`: hard top-k, perturbed-maximum gradient in training).
3. Fine-grained attention: a second ViT of the same shape embeds each region
   (global average of its tokens).
4. Coarse attention: a transformer encoder lets the k region embeddings attend
   to each other.
5. The last [CLS] tokens of the scorer and of the coarse encoder are
   concatenated and a projection head gives the logits.

Both ViTs use conditional (depthwise-conv) position encoding and pseudo [CLS]
tokens (CPVT-GAP, paper App. C): the mean token is prepended before the last
``m`` blocks and read out after each of them.

Input: ``(B, 3, H, W)`` floats in [0, 1] (uint8 accepted), normalised inside the
model like :mod:`models.dla`; H and W must be multiples of ``region_px``
(``model.size_divisor``).  ``forward`` returns ``(B,)`` logits for
``num_classes == 1`` (else ``(B, num_classes)``), like ``dla34_cls``.

Where the released code (github.com/stegmuel/ScoreNet) differs from the paper,
this follows the paper; each place is marked "released code:".
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dla import InputNormalize, _resolve_mean_std, prior_bias
from .registry import register_model
from .topk import PerturbedTopK, num_selected

__all__ = [
    "ConvViT",
    "ScoreNet",
    "TokenEncoder",
    "scorenet",
    "scorenet_size_divisor",
    "scorenet_tiny",
    "scorenet_tiny_size_divisor",
]

# The paper's model (App. B.1 and Sec. 4); scorenet_tiny changes only the scale.
SCORENET_DEFAULTS = dict(downscale=8, token_px=16)
SCORENET_TINY_DEFAULTS = dict(downscale=4, token_px=8)


class Attention(nn.Module):
    """Multi-head self-attention; optionally also returns the pre-softmax logits of
    the first token's query over the others, ``(B, heads, n - 1)`` in float32."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, first_logits: bool = False):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        logits = None
        if first_logits:
            with torch.autocast(device_type=x.device.type, enabled=False):
                logits = (q[:, :, :1].float() @ k[:, :, 1:].float().transpose(-2, -1))[:, :, 0] * self.scale
        return self.proj(out), logits


class Block(nn.Module):
    """Pre-norm transformer block (attention + GELU MLP)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, first_logits: bool = False):
        y, logits = self.attn(self.norm1(x), first_logits)
        x = x + y
        return x + self.mlp(self.norm2(x)), logits


class ConvPosEnc(nn.Module):
    """CPVT's position encoding generator: tokens + depthwise 3x3 conv over the token grid."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        b, n, d = tokens.shape
        fmap = tokens.transpose(1, 2).reshape(b, d, *grid)
        # released code: the residual is computed and then overwritten (tokens = conv(tokens)),
        # and the conv sits before the first block; CPVT adds it after the first block.
        return tokens + self.conv(fmap).flatten(2).transpose(1, 2)


class TokenEncoder(nn.Module):
    """Transformer blocks with ``num_cls`` pseudo [CLS] tokens and an optional PEG.

    Before block ``depth - num_cls`` the mean token is prepended; the normalised
    first token after each of the last ``num_cls`` blocks is read out.
    ``forward`` returns ``(cls, gap, logits)``: the read-out tokens concatenated
    ``(B, num_cls * dim)`` (``None`` when ``num_cls == 0``), the mean of the
    normalised non-[CLS] tokens ``(B, dim)``, and (with ``first_logits``) the
    last block's [CLS] attention logits ``(B, heads, n)``.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float, num_cls: int, peg: bool):
        super().__init__()
        if not 0 <= num_cls <= depth:
            raise ValueError(f"pseudo [CLS] tokens must be in [0, depth={depth}], got {num_cls}")
        self.depth, self.num_cls = depth, num_cls
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.peg = ConvPosEnc(dim) if peg else None
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, grid: Optional[Tuple[int, int]] = None, first_logits: bool = False):
        if first_logits and self.num_cls < 1:
            raise ValueError("[CLS] attention logits need at least one pseudo [CLS] token")
        start = self.depth - self.num_cls
        n_cls, outs, logits = 0, [], None
        for i, blk in enumerate(self.blocks):
            if i == start:
                x, n_cls = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1), 1
            x, logits = blk(x, first_logits and i == self.depth - 1)
            if i == 0 and self.peg is not None:
                x = torch.cat([x[:, :n_cls], self.peg(x[:, n_cls:], grid)], dim=1)
            if i >= start:
                outs.append(self.norm(x[:, 0]))
        cls = torch.cat(outs, dim=-1) if outs else None
        return cls, self.norm(x[:, n_cls:]).mean(dim=1), logits


class ConvViT(nn.Module):
    """ViT with conditional position encoding: ``(B, C, H, W)`` -> :class:`TokenEncoder` outputs.

    Also the "plain ViT of the same width" baseline of ``bench/scorenet_bench.py``.
    """

    def __init__(self, token_px: int, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float,
                 num_cls: int = 0, in_chans: int = 3):
        super().__init__()
        self.token_px = token_px
        self.embed_dim = embed_dim
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, token_px, stride=token_px)
        self.encoder = TokenEncoder(embed_dim, depth, num_heads, mlp_ratio, num_cls, peg=True)

    def forward(self, x: torch.Tensor, first_logits: bool = False):
        fmap = self.patch_embed(x)
        tokens = fmap.flatten(2).transpose(1, 2)
        return self.encoder(tokens, fmap.shape[-2:], first_logits)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class ScoreNet(nn.Module):
    """ScoreNet tile classifier (see the module docstring).

    Args:
        num_classes: logits per tile (1: ``forward`` returns ``(B,)``).
        downscale: factor ``s`` between the tile and the scorer's input (paper: 8).
        token_px: the scorer's token size ``P_l`` in the downscaled image (paper: 16);
            one token is one ``s * token_px`` region of the tile.
        fine_token_px: token size ``P_a`` of the fine-grained ViT in full-resolution
            pixels (``None``: ``token_px``, as the paper uses in practice).
        embed_dim / depth / num_heads / mlp_ratio: both ViTs (App. B.1: 96 / 8 / 4 / 2).
        agg_depth / agg_num_heads / agg_mlp_ratio: the coarse-attention encoder (5 / 4 / 2).
        scorer_cls_tokens: pseudo [CLS] tokens read from the scorer (ScoreNet/4/3: 4).
        agg_cls_tokens: pseudo [CLS] tokens read from the coarse encoder (ScoreNet/4/3: 3,
            the paper's best, Table 1; released code: 2 and 1).
        topk_fraction: regions kept, ``k = ceil(fraction * N)`` (paper: K = 20 of ~238
            regions of a BRACS image; released code: ceil(0.1 N)).
        topk_sigma / topk_samples: perturbation of the top-k in training (the paper gives no
            values; 1e-3 and 100 are the released code's).
        topk_forward: ``"hard"`` (exact regions, perturbed gradient; issue #12's choice and the
            released code's straight-through form) or ``"expected"`` (the Monte-Carlo mean
            indicators of Eq. 5, which Eq. 4 then uses to blend regions, as the paper writes it).
        head_hidden: hidden width of the projection head (released code: 128; 0: linear).
        drop_rate: dropout before the last linear layer.
        prior_prob: initial positive probability of a one-logit head (``None``: zero bias).
        in_chans / mean / std: input channels and normalisation (ImageNet by default).
    """

    def __init__(
        self,
        num_classes: int = 1,
        downscale: int = 8,
        token_px: int = 16,
        fine_token_px: Optional[int] = None,
        embed_dim: int = 96,
        depth: int = 8,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        agg_depth: int = 5,
        agg_num_heads: int = 4,
        agg_mlp_ratio: float = 2.0,
        scorer_cls_tokens: int = 4,
        agg_cls_tokens: int = 3,
        topk_fraction: float = 0.1,
        topk_sigma: float = 1e-3,
        topk_samples: int = 100,
        topk_forward: str = "hard",
        head_hidden: int = 128,
        drop_rate: float = 0.0,
        prior_prob: Optional[float] = None,
        in_chans: int = 3,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if downscale < 1 or token_px < 1:
            raise ValueError(f"downscale and token_px must be >= 1, got {downscale} and {token_px}")
        if topk_forward not in ("hard", "expected"):
            raise ValueError(f"topk_forward must be 'hard' or 'expected', got {topk_forward!r}")
        if scorer_cls_tokens < 1:
            raise ValueError(f"the scorer needs at least one [CLS] token, got scorer_cls_tokens={scorer_cls_tokens}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.downscale = downscale
        self.region_px = self.size_divisor = downscale * token_px
        fine_token_px = token_px if fine_token_px is None else fine_token_px
        if fine_token_px < 1 or self.region_px % fine_token_px:
            raise ValueError(f"fine_token_px {fine_token_px} must divide the region size {self.region_px} px")
        self.topk_fraction = topk_fraction
        num_selected(1, topk_fraction)  # validates the fraction

        self.normalize = InputNormalize(*_resolve_mean_std(in_chans, mean, std))
        self.scorer = ConvViT(token_px, embed_dim, depth, num_heads, mlp_ratio, scorer_cls_tokens, in_chans)
        # weight of each head's [CLS] attention logits in the semantic distribution (paper Sec. 3.2);
        # released code: a min-max normalised 1x1 conv over the heads' softmaxed attention
        self.head_weights = nn.Parameter(torch.zeros(num_heads))
        self.topk = PerturbedTopK(topk_sigma, topk_samples, hard=topk_forward == "hard")
        self.fine = ConvViT(fine_token_px, embed_dim, depth, num_heads, mlp_ratio, 0, in_chans)
        self.aggregator = TokenEncoder(embed_dim, agg_depth, agg_num_heads, agg_mlp_ratio, agg_cls_tokens, peg=False)
        self.num_features = embed_dim * (scorer_cls_tokens + agg_cls_tokens)
        if head_hidden > 0:
            self.head = nn.Sequential(nn.Linear(self.num_features, head_hidden), nn.ReLU(inplace=True),
                                      nn.Dropout(drop_rate), nn.Linear(head_hidden, num_classes))
        else:
            self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(self.num_features, num_classes))
        self.apply(_init_weights)
        nn.init.normal_(self.head[-1].weight, std=0.01)
        nn.init.constant_(self.head[-1].bias, prior_bias(prior_prob) if num_classes == 1 else 0.0)

    # ------------------------------------------------------------------ stages

    def check_input_size(self, x: torch.Tensor) -> None:
        h, w = x.shape[-2:]
        r = self.region_px
        if h % r or w % r or h == 0 or w == 0:
            raise ValueError(
                f"ScoreNet: tile size {h}x{w} px (HxW) is not a multiple of the region size {r} px "
                f"(downscale {self.downscale} x token {r // self.downscale} px); use a tile size "
                f"divisible by {r}, e.g. {max(1, round(h / r)) * r}x{max(1, round(w / r)) * r}"
            )

    def grid(self, x: torch.Tensor) -> Tuple[int, int]:
        """Regions along (H, W) of an input batch."""
        return x.shape[-2] // self.region_px, x.shape[-1] // self.region_px

    def _score(self, xn: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Semantic distribution ``(B, N)`` (float32) and the scorer's [CLS] tokens of normalised ``xn``."""
        # paper: "downsampled by a factor s"; area averaging (released code: bicubic, no anti-aliasing)
        thumb = F.avg_pool2d(xn, self.downscale) if self.downscale > 1 else xn
        cls, _, logits = self.scorer(thumb, first_logits=True)  # logits (B, heads, N), float32
        with torch.autocast(device_type=xn.device.type, enabled=False):
            w = torch.softmax(self.head_weights.float(), dim=0)
            scores = torch.softmax((w[:, None] * logits).sum(dim=1), dim=-1)
        return scores, cls

    def saliency(self, x: torch.Tensor) -> torch.Tensor:
        """The semantic distribution over regions, ``(B, h, w)`` float32 summing to 1 per image."""
        self.check_input_size(x)
        scores, _ = self._score(self.normalize(x))
        return scores.reshape(x.shape[0], *self.grid(x))

    def regions(self, xn: torch.Tensor, indicators: torch.Tensor) -> torch.Tensor:
        """``(B, k, C, R, R)`` regions picked by ``(B, k, N)`` indicators (Eq. 4: X = Y^T P), in float32."""
        r = self.region_px
        (b, c), (gh, gw) = xn.shape[:2], self.grid(xn)
        # (B, gh, gw, C, R, R) view of the tile (no copy); region n is (n // gw, n % gw)
        view = xn.reshape(b, c, gh, r, gw, r).permute(0, 2, 4, 1, 3, 5)
        if not indicators.requires_grad:  # one-hot rows: copy out only the chosen regions
            n = indicators.argmax(dim=-1)
            return view[torch.arange(b, device=xn.device)[:, None], n // gw, n % gw].float()
        with torch.autocast(device_type=xn.device.type, enabled=False):
            return torch.einsum("bkhw,bhwcij->bkcij", indicators.float().reshape(b, -1, gh, gw), view.float())

    def forward_features(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Concatenated scorer and coarse-encoder [CLS] tokens ``(B, num_features)``.

        ``generator``: a CPU generator for the top-k noise in training (default: global CPU RNG).
        """
        self.check_input_size(x)
        xn = self.normalize(x)
        scores, scorer_cls = self._score(xn)
        k = num_selected(scores.shape[1], self.topk_fraction)
        regions = self.regions(xn, self.topk(scores, k, generator))
        b = x.shape[0]
        _, emb, _ = self.fine(regions.flatten(0, 1).to(xn.dtype))
        agg_cls, _, _ = self.aggregator(emb.reshape(b, k, -1))
        return torch.cat([scorer_cls, agg_cls], dim=-1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        out = self.head(features)
        return out.reshape(out.shape[0]) if self.num_classes == 1 else out

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, generator))


# ---------------------------------------------------------------------- registry


def _size_divisor(defaults: dict, kwargs: dict) -> int:
    return int(kwargs.get("downscale", defaults["downscale"])) * int(kwargs.get("token_px", defaults["token_px"]))


def scorenet_size_divisor(**kwargs) -> int:
    """Region size in input pixels of ``scorenet(**kwargs)``: tile sides must be multiples of it."""
    return _size_divisor(SCORENET_DEFAULTS, kwargs)


def scorenet_tiny_size_divisor(**kwargs) -> int:
    """Region size in input pixels of ``scorenet_tiny(**kwargs)``."""
    return _size_divisor(SCORENET_TINY_DEFAULTS, kwargs)


@register_model("scorenet", size_divisor=scorenet_size_divisor)
def scorenet(**kwargs) -> ScoreNet:
    """ScoreNet/4/3: downscale 8, 16 px tokens, 128 px regions (16 per 512 px tile)."""
    return ScoreNet(**{**SCORENET_DEFAULTS, **kwargs})


@register_model("scorenet_tiny", size_divisor=scorenet_tiny_size_divisor)
def scorenet_tiny(**kwargs) -> ScoreNet:
    """ScoreNet at a quarter of the scale: downscale 4, 8 px tokens, 32 px regions
    (16 per 128 px tile, the tiny preset's tile size)."""
    return ScoreNet(**{**SCORENET_TINY_DEFAULTS, **kwargs})
