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
the first).  Every number is a parameter whose default is the paper's value.
"""

from __future__ import annotations

import numpy as np

__all__ = [
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


def keep_confident(prob_maps, threshold_T: float = 0.4) -> np.ndarray:
    """Confidence filter: which tiles survive the threshold ``T``.

    Parameters
    ----------
    prob_maps : ndarray, shape (N, H, W)
        Per-pixel positive probabilities ``p`` in ``[0, 1]`` from ``theta_1``.
    threshold_T : float
        Paper's ``T`` (default 0.4).  A tile is removed when its **maximum**
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


def positive_pseudo_labels(prob_maps, V: float = 4.0, floor: float = 0.01) -> np.ndarray:
    """Re-weighted soft targets for tiles of positive slides.

    Parameters
    ----------
    prob_maps : ndarray, shape (N, H, W)
        Per-pixel positive probabilities ``p`` in ``[0, 1]``.
    V : float
        Paper's re-weighting factor ``V`` (default 4).
    floor : float
        Re-weighted values ``V * p`` below ``floor`` are set to 0
        (default 0.01), so near-zero noise does not become a weak positive.

    Returns
    -------
    y_pos : ndarray of float32, same shape
        ``y+ = clip(V * p, 0, 1)``, and 0 where ``V * p < floor``.  E.g. with
        the defaults p = 0.1 -> 0.4, p = 0.3 -> 1.0, p = 0.002 -> 0.
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
    T: float = 0.4,
    V: float = 4.0,
    floor: float = 0.01,
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
