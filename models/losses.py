"""Losses for mixed-supervision training.

* :func:`soft_bce_with_logits` -- pixel-wise BCE against soft masks (theta1).
* :func:`topk_mean_bce` -- BCE of the mean of a slide's K tile probabilities
  against the slide label (theta2).

Both compute in float32 whatever the logits' dtype, so they are safe under
CUDA autocast.  :func:`load_state_dict_flexible` is re-exported here from
:mod:`models.utils`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .utils import LoadReport, load_state_dict_flexible  # noqa: F401  (re-export)

__all__ = ["soft_bce_with_logits", "topk_mean_bce", "load_state_dict_flexible", "LoadReport"]

_REDUCTIONS = ("mean", "sum", "none")


def _match_target(t: torch.Tensor, logits: torch.Tensor, what: str) -> torch.Tensor:
    if t.shape == logits.shape:
        return t
    # (B, H, W) targets for (B, 1, H, W) logits
    if t.dim() == logits.dim() - 1 and logits.dim() >= 2 and logits.shape[1] == 1:
        t = t.unsqueeze(1)
    if what == "targets" and t.shape != logits.shape:
        raise ValueError(f"targets of shape {tuple(t.shape)} do not fit logits of shape {tuple(logits.shape)}")
    return t


def soft_bce_with_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Pixel-wise binary cross-entropy between ``logits`` and soft ``targets``.

    ``l = -(t * log(sigmoid(x)) + (1 - t) * log(1 - sigmoid(x)))`` computed stably
    from the logits; ``t`` may be any value in [0, 1] (soft pseudo-labels).

    Args:
        logits: e.g. ``(B, 1, H, W)``.
        targets: same shape as ``logits``, or ``(B, H, W)`` for ``(B, 1, H, W)``
            logits.
        weight: optional per-element weights broadcastable to ``logits`` (a
            ``(B, H, W)`` weight is treated like the targets); e.g. 0 to ignore
            pixels.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.  With a ``weight``,
            ``'mean'`` is the *weighted* mean ``sum(w * l) / sum(w)`` (0 if all
            weights are 0) -- unlike ``torch``'s ``mean(w * l)`` -- so ignored
            pixels do not dilute the loss.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    x = logits.float()
    t = _match_target(targets, logits, "targets").to(x.dtype)
    loss = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    if weight is None:
        if reduction == "mean":
            return loss.mean()
        return loss.sum() if reduction == "sum" else loss
    w = _match_target(weight, logits, "weight").to(x.dtype)
    loss = loss * w
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / w.expand_as(loss).sum().clamp_min(torch.finfo(x.dtype).tiny)


def topk_mean_bce(
    tile_logits: torch.Tensor,
    slide_labels: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    reduction: str = "mean",
) -> torch.Tensor:
    """BCE between the mean of each slide's K tile probabilities and its label.

    ``p_b = mean_k sigmoid(tile_logits[b, k])`` and
    ``loss_b = -(y_b * log(p_b) + (1 - y_b) * log(1 - p_b))``.

    Numerical safety: ``log p`` and ``log(1 - p)`` are evaluated from the logits
    with log-sum-exp of log-sigmoids (no ``log(0)``, no cancellation in
    ``1 - p``), then clamped to ``[log(eps), log(1 - eps)]`` -- i.e. ``p`` is
    clamped to ``[eps, 1 - eps]`` as in the naive formula -- so one slide's loss
    is at most ``-log(eps)`` (13.8 for the default 1e-6).  As with any clamp, a slide whose ``p`` is past the clamp
    gets no gradient from that term.

    Args:
        tile_logits: ``(B, K)`` (or ``(B, K, 1)``) logits of each slide's K tiles.
        slide_labels: ``(B,)`` labels in [0, 1] (soft labels allowed).
        mask: optional ``(B, K)`` bool, True for real tiles, for slides with fewer
            than K tiles (each slide needs at least one).
        eps: probability clamp.
        reduction: ``'mean'`` (over slides), ``'sum'`` or ``'none'`` (``(B,)``).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    x = tile_logits.float()
    if x.dim() == 3 and x.shape[-1] == 1:
        x = x.squeeze(-1)
    if x.dim() != 2:
        raise ValueError(f"tile_logits must be (B, K), got shape {tuple(tile_logits.shape)}")
    y = slide_labels.to(device=x.device, dtype=x.dtype).reshape(-1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{y.shape[0]} slide labels for {x.shape[0]} slides")
    log_p = F.logsigmoid(x)  # log sigmoid(x)
    log_q = F.logsigmoid(-x)  # log (1 - sigmoid(x))
    if mask is None:
        log_k = torch.full_like(y, math.log(x.shape[1]))
    else:
        mask = mask.to(device=x.device, dtype=torch.bool)
        if mask.shape != x.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != tile_logits shape {tuple(x.shape)}")
        log_p = log_p.masked_fill(~mask, float("-inf"))
        log_q = log_q.masked_fill(~mask, float("-inf"))
        log_k = mask.sum(1).to(x.dtype).log()  # a slide with no tile gives nan
    log_mean_p = torch.logsumexp(log_p, dim=1) - log_k
    log_mean_q = torch.logsumexp(log_q, dim=1) - log_k
    lo, hi = math.log(eps), math.log1p(-eps)  # p (and 1 - p) in [eps, 1 - eps]
    loss = -(y * log_mean_p.clamp(lo, hi) + (1 - y) * log_mean_q.clamp(lo, hi))
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss
