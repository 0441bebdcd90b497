"""Differentiable top-k region selection with the perturbed-maximum gradient.

Selecting the k best-scored regions is piecewise constant in the scores, so it
passes no gradient.  Perturbed optimizers (Berthet et al. 2020), as used for
patch selection by Cordonnier et al. 2021 and ScoreNet (Stegmüller et al.,
Eq. 5-6), smooth it with Gaussian noise::

    Y_sigma(s) = E_Z[ topk_indicators(s + sigma Z) ]
    dY_sigma / ds = E_Z[ topk_indicators(s + sigma Z) Z^T ] / sigma

and estimate both by Monte Carlo over ``num_samples`` draws of Z.

Indicators are ``(B, k, N)`` one-hot rows: ``Y[b, j, n] = 1`` when slot ``j``
holds region ``n``.  The k selected regions fill the slots in ascending region
index (as in Cordonnier et al.), so a slot's content only changes when the
selected *set* changes, never with the order of the scores inside it.

* eval, or no gradient needed: plain ``torch.topk`` (no noise is drawn).
* training, ``hard=True`` (default): the forward returns the hard indicators of
  the unperturbed scores; the backward is the Jacobian of ``Y_sigma`` (a
  straight-through perturbed estimator: the regions handed on are exact pixels).
  ``hard=False`` returns the Monte-Carlo ``Y_sigma`` itself, as Eq. 5 of the
  ScoreNet paper writes it (with sigma = 1e-3 the two rarely differ).

Everything runs in float32 with autocast off.  The noise is drawn on the CPU
(from ``generator`` or the global CPU RNG, which the trainers checkpoint), so
the draws are the same on every device and a resumed CPU run repeats them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

__all__ = ["PerturbedTopK", "num_selected", "perturbed_topk", "topk_indicators"]


def num_selected(num_regions: int, fraction: float) -> int:
    """``ceil(fraction * num_regions)``, at least 1 (robust to float error: 0.1 * 30 -> 3)."""
    if num_regions < 1:
        raise ValueError(f"need at least one region, got {num_regions}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the selected fraction must be in (0, 1], got {fraction}")
    return max(1, min(num_regions, math.ceil(fraction * num_regions - 1e-9)))


def _sorted_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores along the last dim, in ascending index order."""
    return torch.topk(scores, k, dim=-1, sorted=False).indices.sort(dim=-1).values


def _indicators(idx: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``(B, k, N)`` one-hot rows of ``(B, k)`` indices, or the mean over samples of ``(B, S, k)``
    indices (counted in place: no ``(B, S, k, N)`` tensor is built)."""
    if idx.dim() == 2:
        return torch.zeros(*idx.shape, n, dtype=dtype, device=idx.device).scatter_(2, idx[..., None], 1.0)
    b, s, k = idx.shape
    counts = torch.zeros(b, k, n, dtype=torch.float32, device=idx.device)  # exact up to 2**24 draws
    counts.scatter_add_(2, idx.transpose(1, 2), torch.ones(b, k, s, dtype=torch.float32, device=idx.device))
    return counts.div_(s).to(dtype)


def topk_indicators(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Hard ``(B, k, N)`` indicators of the k largest of ``(B, N)`` scores (``torch.topk``)."""
    return _indicators(_sorted_topk(scores, k), scores.shape[-1], scores.dtype)


class _PerturbedTopKFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, k, sigma, num_samples, hard, baseline, generator):
        b, n = scores.shape
        noise = torch.randn(b, num_samples, n, generator=generator, dtype=torch.float32)
        noise = noise.to(scores.device)
        idx = _sorted_topk(scores[:, None, :] + sigma * noise, k)  # (B, S, k)
        idx0 = _sorted_topk(scores, k)  # (B, k)
        out = _indicators(idx0 if hard else idx, n, scores.dtype)
        ctx.save_for_backward(noise, idx, idx0)
        ctx.sigma, ctx.baseline = sigma, baseline
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # grad_s[m] = sum_{j,n} g[j, n] dY[j, n]/ds[m] = E_Z[<g, Y(s + sigma Z)> Z[m]] / sigma.
        # The full Jacobian of Eq. 6 (every score moves every indicator); the released
        # ScoreNet code contracts only its diagonal (d Y[j, n] / d s[n]).
        noise, idx, idx0 = ctx.saved_tensors
        g = grad_out.float()  # (B, k, N)
        w = g.gather(2, idx.transpose(1, 2)).sum(dim=1)  # (B, S): <g, Y_z>
        if ctx.baseline:
            # E[<g, Y(s)> Z] = 0: subtracting it leaves the expectation unchanged and
            # removes the noise term that dominates when no draw changes the selection.
            w = w - g.gather(2, idx0[:, :, None]).sum(dim=(1, 2))[:, None]
        grad = torch.einsum("bs,bsn->bn", w, noise) / (noise.shape[1] * ctx.sigma)
        return grad, None, None, None, None, None, None


def perturbed_topk(
    scores: torch.Tensor,
    k: int,
    *,
    sigma: float = 1e-3,
    num_samples: int = 100,
    hard: bool = True,
    baseline: bool = True,
    training: bool = True,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """``(B, k, N)`` top-k indicators of ``(B, N)`` scores, differentiable in training.

    Args:
        scores: ``(B, N)``, cast to float32.
        k: regions to select (1 <= k <= N).
        sigma: standard deviation of the Gaussian perturbation (ScoreNet: 1e-3).
        num_samples: Monte-Carlo draws per image (ScoreNet: 100).
        hard: forward returns hard indicators (else the Monte-Carlo mean, Eq. 5).
        baseline: subtract ``<g, Y(s)>`` in the gradient estimate (same expectation,
            lower variance); ``False`` is the plain estimator of Eq. 6.
        training: ``False`` gives plain ``torch.topk`` indicators, no noise.
        generator: a CPU generator for the noise (default: the global CPU RNG).

    Without ``training``, or when ``scores`` needs no gradient, no noise is drawn.
    """
    if scores.dim() != 2:
        raise ValueError(f"expected (B, N) scores, got shape {tuple(scores.shape)}")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be in [1, {scores.shape[1]}] (the number of regions), got {k}")
    if sigma <= 0 or num_samples < 1:
        raise ValueError(f"need sigma > 0 and num_samples >= 1, got {sigma} and {num_samples}")
    with torch.autocast(device_type=scores.device.type, enabled=False):
        scores = scores.float()
        if not (training and torch.is_grad_enabled() and scores.requires_grad):
            return topk_indicators(scores.detach(), k)
        return _PerturbedTopKFn.apply(scores, int(k), float(sigma), int(num_samples), bool(hard),
                                      bool(baseline), generator)


class PerturbedTopK(nn.Module):
    """:func:`perturbed_topk` as a module: the perturbed gradient in ``train()`` mode,
    plain ``torch.topk`` in ``eval()`` mode.  ``forward(scores, k, generator=None)``."""

    def __init__(self, sigma: float = 1e-3, num_samples: int = 100, hard: bool = True, baseline: bool = True):
        super().__init__()
        if sigma <= 0 or num_samples < 1:
            raise ValueError(f"need sigma > 0 and num_samples >= 1, got {sigma} and {num_samples}")
        self.sigma, self.num_samples = float(sigma), int(num_samples)
        self.hard, self.baseline = bool(hard), bool(baseline)

    def forward(self, scores: torch.Tensor, k: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return perturbed_topk(
            scores, k, sigma=self.sigma, num_samples=self.num_samples, hard=self.hard,
            baseline=self.baseline, training=self.training, generator=generator,
        )

    def extra_repr(self) -> str:
        return f"sigma={self.sigma:g}, num_samples={self.num_samples}, hard={self.hard}, baseline={self.baseline}"
