"""E-step of the mixed-supervision EM loop: pseudo labels from patch predictions.

Li et al., "Mixed Supervision Learning for Whole Slide Image Classification",
Algorithm 1.  The patch segmentation net ``theta_1`` gives, for each tile of a
slide, a map ``p`` of per-pixel positive probabilities.  The E-step turns these
maps into training targets for the next M-step:

1. **Confidence filter** (threshold ``T``): a tile whose maximum pixel
   probability ``max(p) < T`` is removed; the others are *kept*.
2. **Positive slides**: each kept tile gets the re-weighted soft target
   ``y+ = clip(V * p, 0, 1)``, with values below ``floor`` set to 0
   (re-weighting factor ``V`` amplifies the typically under-confident
   predictions on weakly labelled slides).
3. **Negative slides**: no pixel of a negative slide is tumour, so each kept
   tile - a tile on which ``theta_1`` is (wrongly) confident - becomes a
   *hard negative* with the all-zero target ``y- = 0``.

All functions are pure numpy and vectorised over a batch of maps of shape
``(N, H, W)`` (any trailing shape works: the reduction is over all axes but
the first).  T, V and floor come from the config (``em.*``, the paper's values by
default) through one :class:`PseudoTargets`, which the E-step hands to the M-step's dataset.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger("wsi_pipeline")

__all__ = [
    "PseudoTargets",
    "EStep",
    "e_step",
    "keep_confident",
    "positive_pseudo_labels",
    "negative_pseudo_labels",
    "e_step_slide",
]


def _check_prob_maps(prob_maps) -> np.ndarray:
    p = np.asarray(prob_maps)
    if p.ndim < 2:
        raise ValueError(f"prob_maps must have shape (N, H, W), got {p.shape}")
    if not np.issubdtype(p.dtype, np.floating):
        raise TypeError(f"prob_maps must be floating point probabilities, got dtype {p.dtype}")
    if p.size and not np.all(np.isfinite(p)):
        raise ValueError("prob_maps contains NaN or infinite values")
    return p


def keep_confident(prob_maps, threshold_T: float) -> np.ndarray:
    """Confidence filter: which tiles survive the threshold ``T``.

    Parameters
    ----------
    prob_maps : ndarray, shape (N, H, W)
        Per-pixel positive probabilities ``p`` in ``[0, 1]`` from ``theta_1``.
    threshold_T : float
        Paper's ``T`` (``em.threshold_T``, 0.4 in the paper).  A tile is removed when its **maximum**
        pixel probability is below ``T``; a tile whose maximum equals ``T``
        is kept.

    Returns
    -------
    keep : ndarray of bool, shape (N,)
    """
    p = _check_prob_maps(prob_maps)
    if p.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    tile_max = p.reshape(p.shape[0], -1).max(axis=1)
    return tile_max >= threshold_T


def positive_pseudo_labels(prob_maps, *, V: float, floor: float) -> np.ndarray:
    """Re-weighted soft targets for tiles of positive slides.

    Parameters
    ----------
    prob_maps : ndarray, shape (N, H, W)
        Per-pixel positive probabilities ``p`` in ``[0, 1]``.
    V : float
        Paper's re-weighting factor ``V`` (``em.reweight_V``, 4 in the paper).
    floor : float
        Re-weighted values ``V * p`` below ``floor`` are set to 0
        (``em.floor``), so near-zero noise does not become a weak positive.

    Returns
    -------
    y_pos : ndarray of float32, same shape
        ``y+ = clip(V * p, 0, 1)``, and 0 where ``V * p < floor``.  E.g. with
        V = 4, floor = 0.01: p = 0.1 -> 0.4, p = 0.3 -> 1.0, p = 0.002 -> 0.
    """
    p = _check_prob_maps(prob_maps)
    if V < 0:
        raise ValueError(f"V must be >= 0, got {V}")
    y = np.clip(p.astype(np.float64) * V, 0.0, 1.0)
    y[y < floor] = 0.0
    return y.astype(np.float32)


def negative_pseudo_labels(shape) -> np.ndarray:
    """All-zero targets ``y- = 0`` for hard negatives.

    Parameters
    ----------
    shape : tuple of int
        Usually ``(N, H, W)``.

    Returns
    -------
    y_neg : ndarray of float32, zeros of ``shape``
    """
    return np.zeros(shape, dtype=np.float32)


def e_step_slide(
    prob_maps,
    slide_label,
    *,
    T: float,
    V: float,
    floor: float,
    materialize_negatives: bool = False,
):
    """Apply the E-step rules to all tiles of one slide.

    Parameters
    ----------
    prob_maps : ndarray, shape (N, H, W)
        ``theta_1`` probabilities for the N tiles of the slide.
    slide_label : int or bool
        Slide-level label: 1/True = positive (tumour), 0/False = negative.
    T : float
        Confidence threshold (see :func:`keep_confident`).
    V : float
        Re-weighting factor (see :func:`positive_pseudo_labels`).
    floor : float
        Small-value cut-off (see :func:`positive_pseudo_labels`).
    materialize_negatives : bool
        For a negative slide, return an all-zero target array instead of
        ``None``.

    Returns
    -------
    kept_idx : ndarray of int64, shape (K,)
        Indices (into the N tiles, ascending) of the tiles that pass the
        ``T`` filter.  On a positive slide these are the pseudo-positive
        tiles; on a negative slide they are the hard negatives.
    targets : ndarray of float32, shape (K, H, W), or None
        Positive slide: ``y+`` of the kept tiles.  Negative slide: ``None``
        (the targets are all zero; see :func:`negative_pseudo_labels`) unless
        ``materialize_negatives``.
    stats : dict
        ``n_tiles``, ``n_kept``, ``n_removed``, ``slide_label`` (0/1) and
        ``pseudo_positive_pixel_fraction``: fraction of the kept tiles'
        pixels with a non-zero target (0.0 on negative slides and when no
        tile is kept).
    """
    p = _check_prob_maps(prob_maps)
    if isinstance(slide_label, (bool, np.bool_)):
        label = int(slide_label)
    else:
        try:
            label = int(slide_label)
        except (TypeError, ValueError):
            raise ValueError(f"slide_label must be 0 or 1, got {slide_label!r}") from None
        if label != slide_label or label not in (0, 1):
            raise ValueError(f"slide_label must be 0 or 1, got {slide_label!r}")

    keep = keep_confident(p, threshold_T=T)
    kept_idx = np.flatnonzero(keep).astype(np.int64)
    kept_maps = p[kept_idx]
    if label == 1:
        targets = positive_pseudo_labels(kept_maps, V=V, floor=floor)
        frac = float(np.count_nonzero(targets) / targets.size) if targets.size else 0.0
    else:
        targets = negative_pseudo_labels(kept_maps.shape) if materialize_negatives else None
        frac = 0.0
    stats = {
        "slide_label": label,
        "n_tiles": int(p.shape[0]),
        "n_kept": int(kept_idx.size),
        "n_removed": int(p.shape[0] - kept_idx.size),
        "pseudo_positive_pixel_fraction": frac,
    }
    return kept_idx, targets, stats


# --------------------------------------------------------------------------- the E-step of a round


@dataclass(frozen=True)
class PseudoTargets:
    """The E-step's rule, carried from the E-step to the M-step's dataset so it is defined once.

    ``probmaps`` is the previous round's ``probmaps.zarr``; :meth:`positive` turns one tile's
    map into its pseudo-positive target ``clip(V p, 0, 1)`` (< floor -> 0).
    """

    T: float
    V: float
    floor: float
    probmaps: str | None = None

    @classmethod
    def from_config(cls, em_cfg, probmaps: str | Path | None = None) -> "PseudoTargets":
        return cls(float(em_cfg.threshold_T), float(em_cfg.reweight_V), float(em_cfg.floor),
                   None if probmaps is None else str(probmaps))

    def positive(self, prob_map: np.ndarray) -> np.ndarray:
        """(H, W) float32 target of one pseudo-positive tile from its (H, W) map."""
        return positive_pseudo_labels(np.asarray(prob_map, np.float32)[None], V=self.V, floor=self.floor)[0]


@dataclass
class EStep:
    """What the E-step of round k hands to the M-step: the tiles, their target rule and statistics."""

    pseudo_positive: object  # pipeline.data.TileItems
    hard_negative: object  # pipeline.data.TileItems
    targets: PseudoTargets
    stats: dict = field(default_factory=dict)


def _empty_stats(rule: PseudoTargets, annotated: set) -> dict:
    side = {"slides": 0, "tiles": 0, "kept": 0, "removed": 0, "kept_share": 0.0}
    return {
        "threshold_T": rule.T, "reweight_V": rule.V, "floor": rule.floor,
        "positive_slides": dict(side), "negative_slides": dict(side),
        "pseudo_positive_tiles": 0, "pseudo_positive_pixel_fraction": 0.0, "pseudo_positive_mean_target": 0.0,
        "hard_negative_tiles": 0, "hard_negative_pools": {"above_T": 0, "top_up_below_T": 0},
        "annotated_slides_excluded": sorted(annotated), "per_slide": {},
    }


def round_threshold(negative_max_probs: Sequence[np.ndarray], em_cfg) -> float:
    """T of this round: the paper's fixed ``em.threshold_T``, or (``threshold_mode: negative_fpr``) the
    lowest T at which at most ``em.negative_fpr`` of the negative slides' tiles pass, never below
    ``threshold_T``."""
    T = float(em_cfg.threshold_T)
    if em_cfg.threshold_mode == "fixed":
        return T
    scores = np.sort(np.concatenate([np.asarray(m, np.float32) for m in negative_max_probs] or [np.zeros(0)]))[::-1]
    allowed = int(np.floor(em_cfg.negative_fpr * len(scores)))
    if allowed >= len(scores):
        return T
    return max(T, float(np.nextafter(np.float32(scores[allowed]), np.float32(np.inf))))


def _cap_positive(kept: np.ndarray, maxp: np.ndarray, cap: float | None) -> np.ndarray:
    """The ``cap`` highest-scoring kept tiles of a positive slide (a count, or a share of its tiles)."""
    if cap is None:
        return kept
    n = int(cap) if cap >= 1 else max(1, int(np.ceil(cap * len(maxp))))
    if len(kept) <= n:
        return kept
    best = kept[np.argsort(-maxp[kept], kind="stable")[:n]]
    return np.sort(best)


def _top_up(negatives: list[tuple[int, np.ndarray]], T: float, n_have: int, n_need: int) -> list[tuple[int, np.ndarray]]:
    """The highest-scoring negative-slide tiles below T that bring the hard negatives to ``n_need``."""
    missing = n_need - n_have
    if missing <= 0:
        return []
    cand = [(i, t, float(m[t])) for i, m in negatives for t in np.flatnonzero(m < T)]
    cand.sort(key=lambda c: (-c[2], c[0], c[1]))
    chosen: dict[int, list[int]] = {}
    for i, t, _ in cand[:missing]:
        chosen.setdefault(i, []).append(int(t))
    return [(i, np.sort(np.asarray(ts, np.int64))) for i, ts in sorted(chosen.items())]


def e_step(prev_maps: str | Path, train: Sequence, annotated: Sequence[str], em_cfg, *,
           min_hard_negatives: int = 0) -> EStep:
    """The E-step: pseudo-positive and hard-negative tiles from a round's probability maps.

    Tiles are filtered on the stored per-tile maximum (``max_prob``); full maps are read
    only for the kept tiles of positive slides (for the target statistics), so memory
    follows the kept tiles, not the slide. ``train`` are the training slides (item
    ``slide`` indices refer to this list); ``annotated`` slides are not pseudo-labelled.

    T is :func:`round_threshold`; positive slides keep at most
    ``em.max_positive_tiles_per_slide``; with ``em.hard_negative_top_up`` and fewer than
    ``min_hard_negatives`` negative-slide tiles at or above T, the highest-scoring ones below T
    fill the gap (``stats["hard_negative_pools"]`` says how many came from each pool).
    """
    from pipeline.data import SOURCE_NEGATIVE, SOURCE_PSEUDO, TileItems
    from pipeline.probmaps import read_maps, read_max_probs

    annotated = set(annotated)
    slides = [(i, s, read_max_probs(prev_maps, s.slide_id, s.n_tiles)) for i, s in enumerate(train)
              if s.slide_id not in annotated]
    T = round_threshold([m for _, s, m in slides if s.label == 0], em_cfg)
    rule = PseudoTargets(T, float(em_cfg.reweight_V), float(em_cfg.floor), str(prev_maps))
    stats = _empty_stats(rule, annotated)
    stats["threshold_mode"] = em_cfg.threshold_mode
    pp, hn, negatives = [], [], []
    nonzero, target_sum, all_pixels = 0.0, 0.0, 0
    for i, s, maxp in slides:
        kept = np.flatnonzero(maxp >= T).astype(np.int64)
        if s.label == 1:
            kept = _cap_positive(kept, maxp, em_cfg.max_positive_tiles_per_slide)
        agg = stats["positive_slides" if s.label == 1 else "negative_slides"]
        agg["slides"] += 1
        agg["tiles"] += len(maxp)
        agg["kept"] += len(kept)
        agg["removed"] += len(maxp) - len(kept)
        per = {"slide_label": int(s.label), "n_tiles": len(maxp), "n_kept": len(kept), "n_removed": len(maxp) - len(kept)}
        if s.label == 1:
            pp.append(TileItems.make(i, kept, SOURCE_PSEUDO))
            y = positive_pseudo_labels(read_maps(prev_maps, s.slide_id, kept), V=rule.V, floor=rule.floor)
            nonzero += float(np.count_nonzero(y))
            target_sum += float(y.sum(dtype=np.float64))
            all_pixels += int(y.size)
            per["pseudo_positive_pixel_fraction"] = float(np.count_nonzero(y) / y.size) if y.size else 0.0
        else:
            hn.append(TileItems.make(i, kept, SOURCE_NEGATIVE))
            negatives.append((i, maxp))
        stats["per_slide"][s.slide_id] = per
    n_above = sum(len(h) for h in hn)
    extra = _top_up(negatives, T, n_above, min_hard_negatives) if em_cfg.hard_negative_top_up else []
    hn += [TileItems.make(i, t, SOURCE_NEGATIVE) for i, t in extra]
    result = EStep(TileItems.concat(pp), TileItems.concat(hn), rule, stats)
    for side in ("positive_slides", "negative_slides"):
        agg = stats[side]
        agg["kept_share"] = agg["kept"] / agg["tiles"] if agg["tiles"] else 0.0
    stats["hard_negative_pools"] = {"above_T": n_above, "top_up_below_T": int(sum(len(t) for _, t in extra))}
    stats["pseudo_positive_tiles"] = len(result.pseudo_positive)
    stats["hard_negative_tiles"] = len(result.hard_negative)
    stats["pseudo_positive_pixel_fraction"] = nonzero / all_pixels if all_pixels else 0.0
    stats["pseudo_positive_mean_target"] = target_sum / all_pixels if all_pixels else 0.0
    stats["pseudo_positive_precision_estimate"] = pseudo_precision_estimate(
        stats["positive_slides"]["kept_share"], stats["negative_slides"]["kept_share"])
    stats["warnings"] = e_step_warnings(stats, em_cfg.min_pseudo_precision)
    for w in stats["warnings"]:
        log.warning("%s", w)
    return result


def pseudo_precision_estimate(positive_share: float, negative_share: float) -> float | None:
    """Share of the positive slides' kept tiles that are lesion, estimated from the negative slides.

    Positive and negative slides carry the same normal tissue, decoys and artefacts, so theta1 keeps
    about ``negative_share`` of a positive slide's tiles for the same wrong reasons; what it keeps
    beyond that is lesion: ``1 - negative_share / positive_share`` (clipped at 0; None when nothing
    was kept). Near 0, the pseudo-positives are as much noise as the tiles of negative slides.
    """
    if positive_share <= 0:
        return None
    return max(0.0, 1.0 - negative_share / positive_share)


def e_step_warnings(stats: dict, min_precision: float) -> list[str]:
    """The E-step's own warnings: no pseudo-positives at all, or pseudo-positives that are mostly noise."""
    pos, neg = stats["positive_slides"], stats["negative_slides"]
    if pos["tiles"] and not pos["kept"]:
        return [f"E-step: theta1 kept no tile of the {pos['slides']} positive slide(s) at T={stats['threshold_T']:.3g}: "
                "this round learns nothing from them (lower em.threshold_T or train round 0 longer)"]
    est = stats.get("pseudo_positive_precision_estimate")
    if est is None or est >= min_precision:
        return []
    return [f"E-step: theta1 kept {pos['kept_share']:.1%} of the positive slides' tiles and {neg['kept_share']:.1%} of "
            f"the negative slides': an estimated {est:.0%} of the pseudo-positives are lesion (below "
            f"em.min_pseudo_precision={min_precision:g}); theta1 does not yet tell lesions from the rest, so the EM "
            "rounds train on noise: annotate more regions, train round 0 longer, or try em.threshold_mode: negative_fpr "
            "with em.max_positive_tiles_per_slide"]
