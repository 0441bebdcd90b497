"""Tissue detection on a low-resolution RGB rendering of a slide.

Plain arrays in, arrays out. All sizes are given in micrometres (lengths) or
square micrometres (areas) together with the image's ``mpp``, so the same
settings work at any mask resolution and small biopsies are not dropped by a
pixel-count filter tuned for another magnification.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class TissueResult:
    """A tissue mask and how it was obtained."""

    mask: np.ndarray
    """(H, W) bool, True on tissue."""
    threshold: float
    """The threshold applied to the channel (Otsu's, or the floor if higher)."""
    otsu_threshold: float
    """Otsu's threshold before the floor was applied."""

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def stain_channel(rgb: np.ndarray, channel: str = "saturation") -> np.ndarray:
    """A stain-robust single channel in 0-255 where tissue is high and glass is low.

    Parameters
    ----------
    rgb : (H, W, 3) uint8 array
    channel : {'saturation', 'od'}
        ``'saturation'``: HSV saturation (H&E is coloured, glass and dust are grey).
        ``'od'``: mean optical density -log(I/255), scaled so OD 1.0 maps to 255.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    if channel == "saturation":
        return cv2.cvtColor(np.ascontiguousarray(rgb, dtype=np.uint8), cv2.COLOR_RGB2HSV)[..., 1]
    if channel == "od":
        od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0).mean(axis=2)
        return np.clip(od * 255.0, 0, 255).astype(np.uint8)
    raise ValueError(f"unknown channel {channel!r}: use 'saturation' or 'od'")


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of 8-bit values (the same value as ``skimage.filters.threshold_otsu``).

    Parameters
    ----------
    values : uint8 array, any shape
        The channel to threshold (0-255).

    Returns
    -------
    threshold : float
        The value ``t`` maximising the between-class variance of
        ``values <= t`` and ``values > t``. A constant image returns its value.

    Notes
    -----
    Computed from a 256-bin histogram with numpy alone, so the tiling path
    does not import scikit-image (and through it SciPy: ~0.4 s per worker).
    """
    v = np.asarray(values)
    if v.dtype != np.uint8:
        raise ValueError(f"otsu_threshold needs uint8 values, got {v.dtype}")
    if v.size == 0:
        raise ValueError("otsu_threshold needs at least one value")
    counts = np.bincount(v.ravel(), minlength=256).astype(np.float64)
    nz = np.flatnonzero(counts)
    lo, hi = int(nz[0]), int(nz[-1])
    if lo == hi:
        return float(lo)
    counts = counts[lo : hi + 1]
    centers = np.arange(lo, hi + 1, dtype=np.float64)
    w1 = np.cumsum(counts)
    w2 = np.cumsum(counts[::-1])[::-1]
    m1 = np.cumsum(counts * centers) / w1
    m2 = (np.cumsum((counts * centers)[::-1]) / w2[::-1])[::-1]
    between = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    return float(centers[int(np.argmax(between))])


def remove_small_regions(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    """Drop 8-connected True regions with fewer than ``min_area_px`` pixels."""
    if min_area_px <= 1 or not mask.any():
        return mask.copy()
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area_px
    keep[0] = False
    return keep[labels]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions not connected (4-connectivity) to the image border."""
    padded = np.pad(mask.astype(np.uint8), 1)
    flood = padded.copy()
    ff_mask = np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), np.uint8)
    cv2.floodFill(flood, ff_mask, (0, 0), 1, flags=4)
    return (padded | (flood == 0))[1:-1, 1:-1].astype(bool)


def _disk(radius_px: int) -> np.ndarray:
    r = max(0, int(radius_px))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def tissue_mask(
    rgb: np.ndarray,
    mpp: float,
    *,
    channel: str = "saturation",
    blur_um: float = 24.0,
    min_threshold: float = 20.0,
    max_background_value: int = 235,
    close_um: float = 32.0,
    open_um: float = 16.0,
    max_hole_area_um2: float = 250_000.0,
    min_tissue_area_um2: float = 20_000.0,
) -> TissueResult:
    """Otsu tissue mask with clean-up.

    Parameters
    ----------
    rgb : (H, W, 3) uint8 array
        Low-resolution rendering of the slide (transparent areas already white).
    mpp : float
        Micrometres per pixel of ``rgb``.
    channel : {'saturation', 'od'}
        Channel to threshold, see :func:`stain_channel`.
    blur_um : float
        Median blur window (micrometres) applied to the channel first.
    min_threshold : float
        Floor for the threshold in channel units (0-255). On blank glass Otsu
        splits noise; the floor makes such a slide come out empty.
    max_background_value : int
        Pixels whose darkest RGB channel exceeds this are glass whatever their
        saturation.
    close_um, open_um : float
        Radii (micrometres) of the morphological closing then opening.
    max_hole_area_um2 : float
        Holes smaller than this area (um^2) are filled.
    min_tissue_area_um2 : float
        Connected regions smaller than this area (um^2) are removed.

    Returns
    -------
    TissueResult
    """
    if mpp <= 0:
        raise ValueError("mpp must be > 0")
    chan = stain_channel(rgb, channel)
    k = int(round(blur_um / mpp))
    if k >= 3:
        k += 1 - k % 2  # odd window
        chan = cv2.medianBlur(chan, min(k, 255))
    lo, hi = (cv2.minMaxLoc(chan)[:2]) if chan.size else (0, 0)
    otsu = otsu_threshold(chan) if lo != hi else 255.0
    thr = max(otsu, float(min_threshold))
    mask = chan > thr
    darkest = np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    mask &= darkest <= max_background_value
    m8 = mask.astype(np.uint8)
    if close_um > 0:
        m8 = cv2.morphologyEx(m8, cv2.MORPH_CLOSE, _disk(close_um / mpp))
    if open_um > 0:
        m8 = cv2.morphologyEx(m8, cv2.MORPH_OPEN, _disk(open_um / mpp))
    mask = m8.astype(bool)
    px_area_um2 = mpp * mpp
    if max_hole_area_um2 > 0:
        holes = fill_holes(mask) & ~mask
        large_holes = remove_small_regions(holes, max_hole_area_um2 / px_area_um2)
        mask |= holes & ~large_holes
    if min_tissue_area_um2 > 0:
        mask = remove_small_regions(mask, min_tissue_area_um2 / px_area_um2)
    return TissueResult(mask=mask, threshold=thr, otsu_threshold=otsu)
