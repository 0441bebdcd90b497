"""Synthetic H&E whole-slide images: demo cohorts, test fixtures, benchmarks.

A slide is described by a small *scene* (tissue pieces, lesion polygons,
stain vectors, a seed) defined in level-0 micrometre coordinates.  Pixels are
rendered procedurally from the scene for any region at any downsample, so
every pyramid level is drawn at its own resolution and the full level-0 image
never has to exist in memory.  All randomness is counter-based (hashes of the
seed and integer lattice / cell coordinates), so a pixel's value does not
depend on the order in which tiles are rendered.

The slides are written as pyramidal, tiled, JPEG-compressed TIFF files that
OpenSlide opens with its ``generic-tiff`` backend: every level is its own
tiled IFD in the main IFD chain, largest first, the lower levels flagged as
reduced-resolution images (``NewSubfileType = 1``; OpenSlide ignores tiled
IFDs without that flag).  The pixel size is stored in the ``XResolution`` /
``YResolution`` tags with ``ResolutionUnit = CENTIMETER``; OpenSlide (4.0)
derives ``openslide.mpp-x`` / ``openslide.mpp-y`` from these tags.

Public functions
----------------
make_scene
    Build the scene description of one slide.
render_region
    Render an RGB region of a scene at any downsample.
write_slide
    Write a scene as a pyramidal TIFF (+ lesion GeoJSON / mask PNG).
make_cohort
    Write a small labelled cohort of slides (``difficulty='easy'`` or
    ``'realistic'``: small texture-only lesions, decoys, confounders).
default_downsamples, lesion_geojson, rasterize_polygons
    Helpers.
"""

from __future__ import annotations

import csv
import json
import math
import os
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import cv2
import imagecodecs
import numpy as np
import tifffile

__all__ = [
    "BLOB_PARAM_RANGES",
    "LESION_KIND_BANDS",
    "DEFAULT_TEXTURE_SOURCE",
    "DIFFICULTIES",
    "SlideSpec",
    "SynthScene",
    "TISSUE_KINDS",
    "default_downsamples",
    "lesion_geojson",
    "make_cohort",
    "make_patch_set",
    "make_scene",
    "rasterize_polygons",
    "render_region",
    "write_slide",
]

#: Accepted values of the ``tissue`` argument.
TISSUE_KINDS = ("normal", "small", "faint", "none")

#: Pixel size used to lay out the scene when a slide is written without mpp.
_FALLBACK_MPP = 0.5

#: Edge (px) of the square blocks that write_slide renders at once.
_BLOCK_PX = 512

#: RGB of empty slide glass (also the colour of every background tile).
_GLASS_RGB = (244.0, 243.0, 246.0)

# Optical-density stain vectors (R, G, B), unit length.  Typical
# haematoxylin / eosin directions as estimated from real H&E slides.
_H_VEC = np.array([0.58, 0.73, 0.36])
_E_VEC = np.array([0.11, 0.86, 0.49])
_H_VEC = _H_VEC / np.linalg.norm(_H_VEC)
_E_VEC = _E_VEC / np.linalg.norm(_E_VEC)

_M32 = 0xFFFFFFFF
_NOISE_STD = 0.28  # std of the raw B-spline value noise with U(-1, 1) lattice

# Nuclear density (nuclei per um^2) of the different compartments.
_DENS_STROMA = 0.0010
_DENS_LYMPH_BG = 0.0002
_DENS_LYMPH = 0.016
_DENS_TUMOUR = 0.0105
_CELL_UM = 12.0  # side of the cells that hold nucleus candidates
_CELL_K = 4  # candidates per cell (one per 2x2 quadrant)
_MAX_NUC_SEMI_UM = 9.0  # largest nucleus semi-axis (um)
_DRAW_NUCLEI_MAX_PX_UM = 2.6  # draw nuclei as ellipses up to this pixel size
_HOLE_UM = 70.0  # feature size of tissue tears / fat holes
_HOLE_THR = 2.0  # noise level (in std) above which tissue is torn
# Unresolved nuclei (low-resolution levels): mean area (um^2) and darkness of
# fibroblast, lymphocyte and tumour nuclei; fraction of gland epithelium
# covered by nuclei (times their darkness).
_NUC_MEAN_AREA = np.array([math.pi * 6.0 * 1.55, math.pi * 2.9 * 2.7, math.pi * 6.0 * 4.65])
_NUC_MEAN_DARK = np.array([1.1, 1.6, 1.37])
_EPI_COVERAGE = 0.4


# ----------------------------------------------------------------------------
# counter-based hashing and value noise
# ----------------------------------------------------------------------------


_HASH_MULT = (0x9E3779B1, 0x7FEB352D, 0x846CA68B, 0xD35A2D97)


def _fmix(h: np.ndarray) -> np.ndarray:
    """Murmur3 32-bit finaliser (uint32 arrays, wrapping arithmetic)."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


def _hash(key: int, *coords) -> np.ndarray:
    """Hash integer coordinates (arrays, broadcast together) with ``key``.

    Returns uint32 values; negative coordinates wrap modulo 2**32.
    """
    arrs = [np.asarray(c) for c in coords]
    shape = np.broadcast_shapes(*(a.shape for a in arrs)) if arrs else ()
    h = np.full(shape if shape else (1,), key & _M32, np.uint32)
    for i, c in enumerate(arrs):
        if c.dtype.kind == "f":
            c = c.astype(np.int64)
        c = np.atleast_1d(c).astype(np.uint32)  # copies; negative values wrap
        c *= _HASH_MULT[i % 4]
        c += 0x632BE5AB + i
        h = _fmix(h ^ c)
    return h.reshape(shape)


def _uniform(key: int, *coords) -> np.ndarray:
    """Uniform float64 in [0, 1) keyed by integer coordinates."""
    return (_hash(key, *coords) >> 8).astype(np.float64) * (1.0 / (1 << 24))


def _subkey(seed: int, name: str) -> int:
    """Derive a 32-bit key for one random stream from a seed and a name."""
    s = int(seed)
    lo, hi = s & _M32, (s >> 32) & _M32
    h = _hash(zlib.crc32(name.encode()), lo, hi)
    return int(h)


def _bspline(t: np.ndarray):
    """Integer lattice index and the 4 cubic B-spline weights for ``t``."""
    i = np.floor(t)
    f = t - i
    f2 = f * f
    f3 = f2 * f
    w = (
        (1.0 - 3.0 * f + 3.0 * f2 - f3) / 6.0,
        (4.0 - 6.0 * f2 + 3.0 * f3) / 6.0,
        (1.0 + 3.0 * f + 3.0 * f2 - 3.0 * f3) / 6.0,
        f3 / 6.0,
    )
    return i.astype(np.int64), w


def _taps(t: np.ndarray):
    """Lattice origin, per-sample tap offsets (relative) and weights (B-spline)."""
    i, w = _bspline(t)
    g0 = int(i.min()) - 1
    n = int(i.max()) + 3 - g0
    return g0, n, i - 1 - g0, w


def _separable(lat: np.ndarray, iy, wy, ix, wx) -> np.ndarray:
    """``sum_ab wy[b] wx[a] lat[iy + b, ix + a]`` on the grid, by gathers.

    (Deliberately not a matrix product: small BLAS calls are pathologically
    slow with a multi-threaded OpenBLAS on few cores.)
    """
    tmp = wx[0][None, :] * lat[:, ix]
    for a in range(1, len(wx)):
        tmp += wx[a][None, :] * lat[:, ix + a]
    out = wy[0][:, None] * tmp[iy]
    for b in range(1, len(wy)):
        out += wy[b][:, None] * tmp[iy + b]
    return out


def _noise_grid(key: int, spacing_um: float, xs_um: np.ndarray, ys_um: np.ndarray) -> np.ndarray:
    """Smooth value noise on the grid ``ys_um x xs_um``, approx. unit std.

    Parameters
    ----------
    key : int
        Random stream key.
    spacing_um : float
        Lattice spacing in micrometres (feature size of the noise).
    xs_um, ys_um : ndarray
        1-D sample coordinates (um) of the columns and rows.

    Returns
    -------
    ndarray, float32, shape (len(ys_um), len(xs_um))
    """
    gx0, nx, ix, wx = _taps(np.asarray(xs_um, np.float64) / spacing_um)
    gy0, ny, iy, wy = _taps(np.asarray(ys_um, np.float64) / spacing_um)
    gx = np.arange(gx0, gx0 + nx)
    gy = np.arange(gy0, gy0 + ny)
    lat = (_uniform(key, gx[None, :], gy[:, None]) * (2.0 / _NOISE_STD)
           - 1.0 / _NOISE_STD).astype(np.float32)
    wx = [w.astype(np.float32) for w in wx]
    wy = [w.astype(np.float32) for w in wy]
    return _separable(lat, iy, wy, ix, wx)


def _noise_points(key: int, spacing_um: float, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
    """Same noise field as :func:`_noise_grid`, evaluated at scattered points."""
    x_um = np.asarray(x_um, np.float64)
    if x_um.size == 0:
        return np.zeros(x_um.shape)
    ix, wx = _bspline(x_um / spacing_um)
    iy, wy = _bspline(np.asarray(y_um, np.float64) / spacing_um)
    gx0, gy0 = int(ix.min()) - 1, int(iy.min()) - 1
    gx = np.arange(gx0, int(ix.max()) + 3)
    gy = np.arange(gy0, int(iy.max()) + 3)
    off = np.arange(4)
    if gx.size * gy.size <= 16 * ix.size + 4096:
        lat = _uniform(key, gx[None, :], gy[:, None]) * 2.0 - 1.0
        vals = lat[(iy - 1 - gy0)[None, None, :] + off[:, None, None],
                   (ix - 1 - gx0)[None, None, :] + off[None, :, None]]
    else:  # widely scattered points: hash each tap
        vals = _uniform(key, ix[None, None, :] - 1 + off[None, :, None],
                        iy[None, None, :] - 1 + off[:, None, None]) * 2.0 - 1.0
    wx = np.stack(wx)
    wy = np.stack(wy)
    acc = ((vals * wx[None, :, :]).sum(1) * wy).sum(0)
    return acc * (1.0 / _NOISE_STD)


def _fade(spacing_um: float, pixel_um: float) -> float:
    """Band-limiting factor: 1 for noise well resolved by the pixel grid, 0 if not."""
    r = spacing_um / pixel_um
    return float(np.clip((r - 1.0) / 1.5, 0.0, 1.0))


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


# ----------------------------------------------------------------------------
# scene description
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Piece:
    cx_um: float
    cy_um: float
    a_um: float
    b_um: float
    angle: float
    harm_amp: tuple
    harm_phase: tuple

    def field(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Approximate signed distance (um) to the piece outline, > 0 inside."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dy = x_um - self.cx_um, y_um - self.cy_um
        u = (c * dx + s * dy) / self.a_um
        v = (-s * dx + c * dy) / self.b_um
        rho = np.hypot(u, v)
        th = np.arctan2(v, u)
        r = np.ones_like(rho)
        for k, (amp, ph) in enumerate(zip(self.harm_amp, self.harm_phase), start=2):
            r += amp * np.cos(k * th + ph)
        return (1.0 - rho / r) * math.sqrt(self.a_um * self.b_um) * r


@dataclass(frozen=True, eq=False)
class SynthScene:
    """Procedural description of one synthetic slide.

    Build it with :func:`make_scene`; render pixels with :func:`render_region`.
    All lengths ending in ``_um`` are micrometres in level-0 coordinates,
    ``_px`` are level-0 pixels.
    """

    width_px: int
    height_px: int
    mpp: float | None
    seed: int
    tissue: str
    pieces: tuple
    raster: np.ndarray  # tissue signed-distance field (um) on a coarse grid
    raster_um: float  # grid spacing of ``raster`` (um); node (i, j) at (j*g, i*g)
    lesions_px: tuple  # tuple of (N, 2) float arrays, level-0 px, closed=False
    h_vec: np.ndarray
    e_vec: np.ndarray
    stain_scale: float
    edge_octaves: tuple = ((60.0, 22.0), (20.0, 7.0), (6.0, 2.0))
    keys: dict = field(default_factory=dict)

    @property
    def render_mpp(self) -> float:
        """Pixel size (um) used to lay out the scene (``mpp`` or 0.5)."""
        return float(self.mpp) if self.mpp else _FALLBACK_MPP

    @property
    def tissue_fraction(self) -> float:
        """Approximate fraction of the slide area covered by tissue."""
        return float((self.raster > 0).mean()) if self.raster.size else 0.0


def _tissue_field_points(scene: SynthScene, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
    """Tissue signed distance (um) at scattered points (raster + edge noise)."""
    g = scene.raster_um
    r = scene.raster
    tx = np.clip(x_um / g, 0, r.shape[1] - 1.000001)
    ty = np.clip(y_um / g, 0, r.shape[0] - 1.000001)
    i0 = np.floor(tx).astype(np.int64)
    j0 = np.floor(ty).astype(np.int64)
    fx, fy = tx - i0, ty - j0
    f = (r[j0, i0] * (1 - fx) * (1 - fy) + r[j0, i0 + 1] * fx * (1 - fy)
         + r[j0 + 1, i0] * (1 - fx) * fy + r[j0 + 1, i0 + 1] * fx * fy)
    for k, (sp, amp) in enumerate(scene.edge_octaves):
        f = f + amp * _noise_points(scene.keys[f"edge{k}"], sp, x_um, y_um)
    return f


def _linear_taps(t: np.ndarray, n: int):
    t = np.clip(t, 0, n - 1.000001)
    i = np.floor(t).astype(np.int64)
    f = t - i
    lo = int(i.min())
    hi = int(i.max()) + 2
    return lo, hi, i - lo, [(1 - f).astype(np.float32), f.astype(np.float32)]


def _tissue_field_grid(scene: SynthScene, xs_um, ys_um, pixel_um: float,
                       octaves: Sequence[int] = (0, 1, 2)) -> np.ndarray:
    """Tissue signed distance (um) on a pixel grid (raster + faded edge noise)."""
    r = scene.raster
    g = scene.raster_um
    x0, x1, ix, wx = _linear_taps(np.asarray(xs_um) / g, r.shape[1])
    y0, y1, iy, wy = _linear_taps(np.asarray(ys_um) / g, r.shape[0])
    f = _separable(np.ascontiguousarray(r[y0:y1, x0:x1]), iy, wy, ix, wx)
    for k in octaves:
        sp, amp = scene.edge_octaves[k]
        fd = _fade(sp, pixel_um)
        if fd > 0:
            f += (amp * fd) * _noise_grid(scene.keys[f"edge{k}"], sp, xs_um, ys_um)
    return f


def _make_keys(seed: int) -> dict:
    names = ["edge0", "edge1", "edge2", "coarse", "hole", "cell", "lymph", "nest", "emid", "emid2",
             "fibw0", "fibw1", "fibw2", "fiboff", "gland", "lobule", "gnuc", "nuc", "ves", "grain", "hvar"]
    return {n: _subkey(seed, n) for n in names}


def _deformed_outline(rng: np.random.Generator, n_harm: int, strength: float):
    amps = tuple(float(strength * rng.uniform(0.3, 1.0) / k ** 0.9) for k in range(2, 2 + n_harm))
    phases = tuple(float(rng.uniform(0, 2 * math.pi)) for _ in range(n_harm))
    return amps, phases


def _layout_pieces(rng, w_um: float, h_um: float, tissue: str) -> list:
    pieces = []
    if tissue == "none":
        return pieces
    if tissue in ("small", "faint"):
        area = w_um * h_um * rng.uniform(0.03, 0.05)
        ratio = rng.uniform(1.0, 1.6)
        a = math.sqrt(area / math.pi * ratio)
        b = a / ratio
        cx = rng.uniform(0.3, 0.7) * w_um
        cy = rng.uniform(0.3, 0.7) * h_um
        amps, ph = _deformed_outline(rng, 4, 0.25)
        return [_Piece(cx, cy, a, b, float(rng.uniform(0, math.pi)), amps, ph)]
    n = int(rng.integers(1, 4)) if max(w_um, h_um) < 4000 else int(rng.integers(2, 5))
    long_is_x = w_um >= h_um
    L, S = (w_um, h_um) if long_is_x else (h_um, w_um)
    cell = L / n
    for i in range(n):
        c_long = (i + 0.5 + rng.uniform(-0.08, 0.08)) * cell
        c_short = S * rng.uniform(0.42, 0.58)
        a = 0.5 * min(cell, S) * rng.uniform(0.62, 0.82)  # along long axis
        b = 0.5 * S * rng.uniform(0.55, 0.78) if n > 1 else 0.5 * S * rng.uniform(0.5, 0.7)
        if n == 1:
            a = 0.5 * L * rng.uniform(0.55, 0.72)
        ang = rng.uniform(-0.25, 0.25)
        if not long_is_x:
            ang += math.pi / 2
        amps, ph = _deformed_outline(rng, 5, 0.35)
        cx, cy = (c_long, c_short) if long_is_x else (c_short, c_long)
        pieces.append(_Piece(float(cx), float(cy), float(a), float(b), float(ang), amps, ph))
    return pieces


def _build_raster(pieces, keys, w_um: float, h_um: float):
    g = max(4.0, max(w_um, h_um) / 1024.0)
    nx = int(math.ceil(w_um / g)) + 2
    ny = int(math.ceil(h_um / g)) + 2
    xs = np.arange(nx) * g
    ys = np.arange(ny) * g
    if not pieces:
        return np.full((ny, nx), -1000.0, np.float32), g
    X, Y = np.meshgrid(xs, ys)
    f = np.max([p.field(X, Y) for p in pieces], axis=0)
    rad = float(np.median([math.sqrt(p.a_um * p.b_um) for p in pieces]))
    f = f + 0.12 * rad * _noise_grid(keys["coarse"], 0.3 * rad, xs, ys)
    border = np.minimum(np.minimum(X, w_um - X), np.minimum(Y, h_um - Y)) - 25.0
    f = np.minimum(f, border)
    return f.astype(np.float32), g


def _point_in_polygon(x: np.ndarray, y: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon test (vectorised over points)."""
    inside = np.zeros(np.shape(x), bool)
    px, py = poly[:, 0], poly[:, 1]
    qx, qy = np.roll(px, -1), np.roll(py, -1)
    for x1, y1, x2, y2 in zip(px, py, qx, qy):
        cond = (y1 > y) != (y2 > y)
        if not cond.any():
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        inside ^= cond & (x < xint)
    return inside


def _place_lesions(rng, scene_wo: SynthScene, n: int) -> list:
    """Lesion outlines (level-0 px) fully inside tissue and not overlapping."""
    if n <= 0:
        return []
    if not scene_wo.pieces:
        raise ValueError("cannot place lesions on a slide without tissue")
    mpp = scene_wo.render_mpp
    g = scene_wo.raster_um
    rad = float(np.median([math.sqrt(p.a_um * p.b_um) for p in scene_wo.pieces]))
    placed: list[tuple[float, float, float, np.ndarray]] = []
    r = scene_wo.raster
    for _ in range(n):
        radius = float(np.clip(rad * rng.uniform(0.2, 0.32), 70.0, 1500.0))
        radius = min(radius, 0.45 * float(r.max()))
        ok = False
        for attempt in range(60):
            if attempt and attempt % 15 == 0:
                radius = max(35.0, radius * 0.8)
            cand = np.argwhere(r > radius * 1.2 + 25.0)
            if len(cand) == 0:
                continue
            j, i = cand[rng.integers(len(cand))]
            cx = (i + rng.uniform(-0.5, 0.5)) * g
            cy = (j + rng.uniform(-0.5, 0.5)) * g
            amps, ph = _deformed_outline(rng, 4, 0.35)
            ratio = rng.uniform(1.0, 1.5)
            ang = rng.uniform(0, math.pi)
            th = np.linspace(0, 2 * math.pi, 96, endpoint=False)
            rr = np.ones_like(th)
            for k, (a_, p_) in enumerate(zip(amps, ph), start=2):
                rr += a_ * np.cos(k * th + p_)
            u = radius * math.sqrt(ratio) * rr * np.cos(th)
            v = radius / math.sqrt(ratio) * rr * np.sin(th)
            x = cx + math.cos(ang) * u - math.sin(ang) * v
            y = cy + math.sin(ang) * u + math.cos(ang) * v
            ext = float(np.max(np.hypot(x - cx, y - cy)))
            if any(math.hypot(cx - qx, cy - qy) < 1.1 * (ext + qe) for qx, qy, qe, _ in placed):
                continue
            if np.min(_tissue_field_points(scene_wo, x, y)) < 15.0:
                continue
            poly = np.round(np.stack([x, y], 1) / mpp, 2)
            placed.append((cx, cy, ext, poly))
            ok = True
            break
        if not ok:
            break
    return [p[3] for p in placed]


def _stain_vectors(rng, jitter: float):
    h, e = _H_VEC.copy(), _E_VEC.copy()
    if jitter > 0:
        h = h + rng.normal(0, 0.08 * jitter, 3)
        e = e + rng.normal(0, 0.08 * jitter, 3)
        h = np.abs(h) / np.linalg.norm(h)
        e = np.abs(e) / np.linalg.norm(e)
    return h, e


def make_scene(width_px: int, height_px: int, *, mpp: float | None = 0.5, seed: int = 0,
               tissue: str = "normal", lesions: int = 0, stain_jitter: float = 0.0) -> SynthScene:
    """Build the procedural description of a synthetic H&E slide.

    Parameters
    ----------
    width_px, height_px : int
        Level-0 size in pixels.
    mpp : float or None
        Level-0 pixel size in micrometres per pixel.  ``None`` lays the scene
        out at 0.5 um/px but marks the slide as having no known pixel size.
    seed : int
        Random seed; the same arguments always give the same scene.
    tissue : {'normal', 'small', 'faint', 'none'}
        ``'normal'``: 1-4 irregular tissue pieces covering roughly 20-50 % of
        the slide.  ``'small'``: one small piece (3-5 % of the area).
        ``'faint'``: one small, very pale piece.  ``'none'``: blank glass.
    lesions : int
        Number of lesion regions to place inside the tissue (fewer are placed
        if the tissue has no room; see ``len(scene.lesions_px)``).
    stain_jitter : float
        Slide-to-slide stain variation (0 = reference H&E colours, 1 = strong).

    Returns
    -------
    SynthScene
    """
    if tissue not in TISSUE_KINDS:
        raise ValueError(f"tissue must be one of {TISSUE_KINDS}, got {tissue!r}")
    if width_px < 1 or height_px < 1:
        raise ValueError("width_px and height_px must be positive")
    if mpp is not None and not mpp > 0:
        raise ValueError("mpp must be positive or None")
    if lesions and tissue == "none":
        raise ValueError("lesions need tissue (tissue='none' given)")
    rng = np.random.default_rng([int(seed) & _M32, int(seed) >> 32, 0x5EED])
    keys = _make_keys(seed)
    mpp_r = float(mpp) if mpp else _FALLBACK_MPP
    w_um, h_um = width_px * mpp_r, height_px * mpp_r
    pieces = _layout_pieces(rng, w_um, h_um, tissue)
    raster, g = _build_raster(pieces, keys, w_um, h_um)
    h_vec, e_vec = _stain_vectors(rng, stain_jitter)
    stain_scale = 0.3 if tissue == "faint" else float(np.exp(rng.normal(0, 0.1 * stain_jitter)))
    scene = SynthScene(int(width_px), int(height_px), None if mpp is None else float(mpp), int(seed),
                       tissue, tuple(pieces), raster, g, (), h_vec, e_vec, stain_scale, keys=keys)
    lesion_polys = _place_lesions(rng, scene, int(lesions))
    return SynthScene(scene.width_px, scene.height_px, scene.mpp, scene.seed, tissue, scene.pieces,
                      raster, g, tuple(lesion_polys), h_vec, e_vec, stain_scale, keys=keys)


# ----------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------

_GRAIN_CACHE: dict = {}
_FIB_CACHE: dict = {}


_GRAIN_PX = 1024  # period of the white-noise bank
_GRAIN_PAD = 512  # wrap-around margin stored with the bank


def _grain_bank(key: int) -> np.ndarray:
    """A periodic white-noise bank, stored with a wrap-around margin."""
    bank = _GRAIN_CACHE.get(key)
    if bank is None:
        rng = np.random.default_rng(key)
        core = rng.standard_normal((_GRAIN_PX, _GRAIN_PX), dtype=np.float32)
        bank = np.pad(core, ((0, _GRAIN_PAD), (0, _GRAIN_PAD)), mode="wrap")
        if len(_GRAIN_CACHE) > 4:
            _GRAIN_CACHE.clear()
        _GRAIN_CACHE[key] = bank
    return bank


def _grain(key: int, level_code: int, gx0: int, gy0: int, h: int, w: int) -> np.ndarray:
    """White noise (unit std) at the level pixels ``[gy0, gy0 + h) x [gx0, gx0 + w)``.

    A function of the global pixel position only (a periodic bank, shifted
    per level), so blocks of any size and order agree.
    """
    bank = _grain_bank(key)
    hv = int(_hash(key, level_code))
    ox = (gx0 + hv) % _GRAIN_PX
    oy = (gy0 + (hv >> 11)) % _GRAIN_PX
    if h <= _GRAIN_PAD and w <= _GRAIN_PAD:
        return bank[oy:oy + h, ox:ox + w]
    rows = (oy + np.arange(h)) % _GRAIN_PX
    cols = (ox + np.arange(w)) % _GRAIN_PX
    return bank[rows][:, cols]


# --- collagen fibres: a periodic texture bank, generated once per pixel size
_FIB_BANK_PX = 1024
_FIB_ANGLES = (0.35, 0.35 + math.pi / 3, 0.35 + 2 * math.pi / 3)


def _fibre_bank(mpp: float, d: float) -> list:
    """Three periodic fibre textures (values in [0, 1]) at pixel size ``d * mpp``.

    Oriented band-pass filtered noise (bundles ~5 um apart plus fine fibrils)
    through a ridge transform.  The period is ``_FIB_BANK_PX * mpp`` um.
    Textures for ``d > 1`` are area-downsampled from the ``d = 1`` texture, so
    all levels agree.
    """
    key = (round(mpp, 6), round(d, 4))
    if key in _FIB_CACHE:
        return _FIB_CACHE[key]
    if d != 1:
        base = _fibre_bank(mpp, 1)
        nd = max(4, int(round(_FIB_BANK_PX / d)))
        out = [cv2.resize(t, (nd, nd), interpolation=cv2.INTER_AREA) for t in base]
    else:
        n = _FIB_BANK_PX
        rng = np.random.default_rng(0xF1B4E5)
        spec = np.fft.rfft2(rng.standard_normal((n, n)))
        fy = np.fft.fftfreq(n)[:, None] / mpp
        fx = np.fft.rfftfreq(n)[None, :] / mpp
        fr = np.hypot(fx, fy)

        def band(ang, period_um, rel_width, ang_spread):
            c, s = math.cos(ang), math.sin(ang)
            phi = np.arctan2(c * fx + s * fy, np.abs(-s * fx + c * fy))
            g = (np.exp(-0.5 * (phi / ang_spread) ** 2)
                 * np.exp(-0.5 * ((fr * period_um - 1.0) / rel_width) ** 2))
            t = np.fft.irfft2(spec * g, s=(n, n))
            return t / (t.std() + 1e-12)

        out = []
        for ang in _FIB_ANGLES:
            bundles = band(ang, 15.0, 0.55, 0.33)  # wavy bundles; zero crossings = clefts
            fine = band(ang, 2.6, 0.6, 0.4)  # fibrils
            cleft = _smoothstep(np.abs(bundles) / 0.28)
            tex = cleft * (0.82 + 0.08 * fine) * (0.86 + 0.14 * np.tanh(bundles))
            out.append(np.clip(tex, 0.0, 1.0).astype(np.float32))
    if len(_FIB_CACHE) > 16:
        _FIB_CACHE.clear()
    _FIB_CACHE[key] = out
    return out


def _sample_periodic(tex: np.ndarray, period_um: float, x0_um: float, y0_um: float, p_um: float,
                     w: int, h: int) -> np.ndarray:
    """Sample a periodic texture at the pixel centres of a region (bilinear, wrapped)."""
    n = tex.shape[1]
    s = n / period_um
    ox = ((x0_um + 0.5 * p_um) % period_um) * s - 0.5
    oy = ((y0_um + 0.5 * p_um) % period_um) * s - 0.5
    if abs(p_um * s - 1.0) < 1e-9 and w <= n and h <= n:
        ix, iy = round(ox), round(oy)
        if abs(ix - ox) < 1e-6 and abs(iy - oy) < 1e-6:  # pixel-aligned: a view of the 2x2 tiling
            t2 = _tiled2(tex)
            ix, iy = ix % n, iy % n
            return t2[iy:iy + h, ix:ix + w]
    m = np.array([[p_um * s, 0.0, ox], [0.0, p_um * s, oy]])
    return cv2.warpAffine(tex, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_WRAP)


_TILED_CACHE: dict = {}


def _tiled2(tex: np.ndarray) -> np.ndarray:
    key = id(tex)
    t2 = _TILED_CACHE.get(key)
    if t2 is None or t2[0] is not tex:
        if len(_TILED_CACHE) > 24:
            _TILED_CACHE.clear()
        t2 = (tex, np.tile(tex, (2, 2)))
        _TILED_CACHE[key] = t2
    return t2[1]


# --- glands: one optional gland per cell of a coarse lattice, keyed by the cell
_GLAND_CELL_UM = 85.0
_LOBULE_UM = 380.0  # feature size of gland-rich lobules


def _gland_probability(lobule_v):
    return 0.03 + 0.9 * _smoothstep((lobule_v + 0.1) / 1.0)

_GLAND_MAX_R_UM = 40.0
_GLAND_NUC_STEP_UM = 6.2


def _glands_near(scene: SynthScene, x0_um: float, y0_um: float, x1_um: float, y1_um: float) -> dict:
    """Glands whose outline may reach the box ``[x0, x1) x [y0, y1)`` (um).

    A gland is a lumen surrounded by a ring of epithelium, with a slightly
    wobbly elliptical outline.  Glands exist only in normal tissue (not in
    lesions, not near the tissue edge).
    """
    k = scene.keys["gland"]
    g = _GLAND_CELL_UM
    m = _GLAND_MAX_R_UM
    gi = np.arange(math.floor((x0_um - m) / g), math.floor((x1_um + m) / g) + 1)
    gj = np.arange(math.floor((y0_um - m) / g), math.floor((y1_um + m) / g) + 1)
    GI, GJ = (a.ravel() for a in np.meshgrid(gi, gj))
    u = [_uniform(k, GI, GJ, j) for j in range(9)]
    lob = _noise_points(scene.keys["lobule"], _LOBULE_UM, (GI + 0.5) * g, (GJ + 0.5) * g)
    ok = u[0] < _gland_probability(lob)
    cx = (GI + 0.3 + 0.4 * u[1]) * g
    cy = (GJ + 0.3 + 0.4 * u[2]) * g
    la = 5.0 + 16.0 * u[3] ** 1.5
    lb = la * (0.5 + 0.45 * u[4])
    te = 8.0 + 4.0 * u[5]
    ang = u[6] * math.pi
    ph2, ph3 = u[7] * 2 * math.pi, u[8] * 2 * math.pi
    ok &= (cx + la + te > x0_um - 2) & (cx - la - te < x1_um + 2)
    ok &= (cy + la + te > y0_um - 2) & (cy - la - te < y1_um + 2)
    idx = np.flatnonzero(ok)
    if idx.size:
        tis = _tissue_field_points(scene, cx[idx], cy[idx])
        keep = tis > (la[idx] + te[idx] + 12.0)
        idx = idx[keep]
    if idx.size and scene.lesions_px:
        th = np.linspace(0, 2 * math.pi, 12, endpoint=False)
        r_out = 1.3 * (la[idx] + te[idx])
        px = (cx[idx][:, None] + r_out[:, None] * np.cos(th)[None]).ravel()
        py = (cy[idx][:, None] + r_out[:, None] * np.sin(th)[None]).ravel()
        px = np.concatenate([px, cx[idx]])
        py = np.concatenate([py, cy[idx]])
        hit = _lesion_points(scene, px, py)
        hit_g = hit[: idx.size * 12].reshape(idx.size, 12).any(1) | hit[idx.size * 12:]
        idx = idx[~hit_g]
    return {"gi": GI[idx], "gj": GJ[idx], "cx": cx[idx], "cy": cy[idx], "la": la[idx], "lb": lb[idx],
            "te": te[idx], "ang": ang[idx], "ph2": ph2[idx], "ph3": ph3[idx]}


def _gland_radius(gl: dict, th: np.ndarray, i=None) -> np.ndarray:
    """Outline modulation r(theta) (~1) of glands (all, or gland ``i``)."""
    sel = slice(None) if i is None else i
    return 1.0 + 0.07 * np.cos(2 * th + gl["ph2"][sel]) + 0.05 * np.cos(3 * th + gl["ph3"][sel])


def _gland_outlines(gl: dict, which: str, n_vert: int = 40) -> np.ndarray:
    """(n_glands, n_vert, 2) outline vertices (um) of the lumens or outer rings."""
    th = np.linspace(0, 2 * math.pi, n_vert, endpoint=False)[None, :]
    r = _gland_radius(gl, th, (slice(None), None)) if gl["cx"].size else np.zeros((0, n_vert))
    extra = gl["te"][:, None] if which == "outer" else 0.0
    u = (gl["la"][:, None] + extra) * r * np.cos(th)
    v = (gl["lb"][:, None] + extra) * r * np.sin(th)
    c, s = np.cos(gl["ang"])[:, None], np.sin(gl["ang"])[:, None]
    x = gl["cx"][:, None] + c * u - s * v
    y = gl["cy"][:, None] + s * u + c * v
    return np.stack([x, y], -1)


def _gland_nuclei(scene: SynthScene, gl: dict):
    """Epithelial nuclei lining the glands: centres (um), semi-axes, angle, darkness."""
    xs, ys, a, b, ang, dark = [], [], [], [], [], []
    k = scene.keys["gnuc"]
    for i in range(gl["cx"].size):
        la_m = gl["la"][i] + 0.62 * gl["te"][i]
        lb_m = gl["lb"][i] + 0.62 * gl["te"][i]
        perim = math.pi * (3 * (la_m + lb_m) - math.sqrt((3 * la_m + lb_m) * (la_m + 3 * lb_m)))
        n = max(6, int(perim / _GLAND_NUC_STEP_UM))
        j = np.arange(n)
        r = [_uniform(k, gl["gi"][i], gl["gj"][i], j * 8 + q) for q in range(5)]
        keep = r[4] < 0.93  # a few gaps
        th = 2 * math.pi * (j + 0.35 * (r[0] - 0.5)) / n
        rad = _gland_radius(gl, th, i) * (1.0 + 0.06 * (r[1] - 0.5))
        u = la_m * rad * np.cos(th)
        v = lb_m * rad * np.sin(th)
        c, s = math.cos(gl["ang"][i]), math.sin(gl["ang"][i])
        x = gl["cx"][i] + c * u - s * v
        y = gl["cy"][i] + s * u + c * v
        xs.append(x[keep])
        ys.append(y[keep])
        a.append((3.6 + 1.0 * r[2])[keep])
        b.append((2.3 + 0.5 * r[3])[keep])
        ang.append(np.degrees(np.arctan2(y - gl["cy"][i], x - gl["cx"][i]))[keep])
        dark.append((0.85 + 0.25 * r[3])[keep])
    if not xs:
        z = np.zeros(0)
        return z, z, z, z, z, z
    return tuple(np.concatenate(v) for v in (xs, ys, a, b, ang, dark))


# --- nuclear densities of the stroma / lymphoid / tumour compartments
def _nuclear_density(les, cell_v, lymph_v, nest_v, lob):
    """Nuclei per um^2 (fibroblast, lymphocyte, tumour) from local field values.

    Works on point arrays and pixel grids alike (``les`` is 0/1 or soft).
    """
    normal = 1.0 - les
    fib = normal * _DENS_STROMA * np.clip(1.0 + 0.6 * cell_v + 1.2 * lob, 0.2, 3.5)
    lym_zone = _smoothstep((lymph_v - 1.8) / 0.5)
    lym = normal * (_DENS_LYMPH_BG + _DENS_LYMPH * lym_zone)
    tum = les * _DENS_TUMOUR * np.clip(0.8 + 0.3 * nest_v, 0.3, 1.4)
    return fib, lym, tum


def _hole_threshold(les):
    return _HOLE_THR + 1.0 * les


def _lesion_tile_mask(scene: SynthScene, ox_px: float, oy_px: float, w: int, h: int,
                      d: float) -> np.ndarray:
    """Lesion membership of the pixels of a level region (uint8 0/1)."""
    m = np.zeros((h, w), np.uint8)
    x_lo, y_lo = ox_px, oy_px
    x_hi, y_hi = ox_px + w * d, oy_px + h * d
    polys = [poly for poly in scene.lesions_px
             if not (poly[:, 0].max() < x_lo or poly[:, 0].min() > x_hi
                     or poly[:, 1].max() < y_lo or poly[:, 1].min() > y_hi)]
    if polys:
        _fill_polys(m, polys, ox_px, oy_px, d)
    return m


def _fill_polys(m: np.ndarray, polys, ox_px: float, oy_px: float, d: float, value=1,
                line=cv2.LINE_8) -> None:
    """Fill polygons (level-0 px) into ``m`` whose pixel (0, 0) starts at ``ox, oy``.

    A pixel is set when its centre lies inside a polygon (cv2 convention:
    integer coordinates are pixel centres).
    """
    shift = 4
    pts = []
    for poly in polys:
        p = ((np.asarray(poly, np.float64) - (ox_px, oy_px)) / d - 0.5) * (1 << shift)
        pts.append(np.round(p).astype(np.int32))
    cv2.fillPoly(m, pts, value, lineType=line, shift=shift)


def _lesion_points(scene: SynthScene, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
    """Whether points (um) lie inside a lesion polygon."""
    mpp = scene.render_mpp
    x = np.asarray(x_um) / mpp
    y = np.asarray(y_um) / mpp
    inside = np.zeros(x.shape, bool)
    if x.size == 0:
        return inside
    for poly in scene.lesions_px:
        near = ((x >= poly[:, 0].min()) & (x <= poly[:, 0].max())
                & (y >= poly[:, 1].min()) & (y <= poly[:, 1].max()))
        if near.any():
            idx = np.flatnonzero(near)
            inside[idx] |= _point_in_polygon(x[idx], y[idx], poly)
    return inside


def _streams(h0: np.ndarray, n: int) -> list:
    """``n`` independent uniforms in [0, 1) derived from one hash array."""
    out = []
    for j in range(n):
        h = h0 ^ np.uint32((0x27D4EB2F * (j + 1)) & _M32)
        out.append((_fmix(h) >> 8).astype(np.float64) * (1.0 / (1 << 24)))
    return out


def _nuclei(scene: SynthScene, x0_um: float, y0_um: float, w: int, h: int, p_um: float, gl: dict):
    """All nuclei that may touch a region: arrays (x, y, a, b, angle_deg, dark, kind).

    ``kind``: 0 fibroblast, 1 lymphocyte, 2 tumour, 3 epithelial.  Nuclei
    are candidates on a lattice of ``_CELL_UM`` cells (one per cell quadrant);
    smooth fields are evaluated at cell centres, tissue and lesion membership
    at each candidate.  Every value is a pure function of global positions,
    so neighbouring regions agree.
    """
    k = scene.keys
    C = _CELL_UM
    margin = _MAX_NUC_SEMI_UM + 2 * p_um
    cx0 = math.floor((x0_um - margin) / C)
    cy0 = math.floor((y0_um - margin) / C)
    cx1 = math.floor((x0_um + w * p_um + margin) / C)
    cy1 = math.floor((y0_um + h * p_um + margin) / C)
    GY, GX = np.meshgrid(np.arange(cy0, cy1 + 1), np.arange(cx0, cx1 + 1), indexing="ij")
    ccx, ccy = (GX + 0.5) * C, (GY + 0.5) * C
    Fc = _tissue_field_points(scene, ccx.ravel(), ccy.ravel()).reshape(GX.shape)
    alive_cell = Fc > -2 * C
    # candidate positions (one per cell quadrant)
    h0 = _hash(k["nuc"], GX[..., None], GY[..., None], np.arange(_CELL_K)[None, None, :])
    ux, uy, utype, r3, r4, r5, r6 = _streams(h0, 7)
    KK = np.arange(_CELL_K)[None, None, :]
    px = GX[..., None] * C + (KK % 2) * (C / 2) + (0.1 + 0.8 * ux) * (C / 2)
    py = GY[..., None] * C + (KK // 2) * (C / 2) + (0.1 + 0.8 * uy) * (C / 2)
    alive = np.broadcast_to(alive_cell[..., None], px.shape).copy()
    # exact tissue test where the cell straddles the tissue edge
    edge = alive & (Fc[..., None] < 2 * C)
    if edge.any():
        alive[edge] = _tissue_field_points(scene, px[edge], py[edge]) > 0
    # glands push the stroma away
    for i in range(gl["cx"].size):
        rr = 1.1 * (gl["la"][i] + gl["te"][i]) * 1.15
        i0 = max(math.floor((gl["cx"][i] - rr) / C) - cx0, 0)
        i1 = min(math.floor((gl["cx"][i] + rr) / C) - cx0 + 1, GX.shape[1])
        j0 = max(math.floor((gl["cy"][i] - rr) / C) - cy0, 0)
        j1 = min(math.floor((gl["cy"][i] + rr) / C) - cy0 + 1, GX.shape[0])
        if i0 >= i1 or j0 >= j1:
            continue
        sub = (slice(j0, j1), slice(i0, i1))
        dx, dy = px[sub] - gl["cx"][i], py[sub] - gl["cy"][i]
        c, s_ = math.cos(gl["ang"][i]), math.sin(gl["ang"][i])
        u = (c * dx + s_ * dy) / (gl["la"][i] + gl["te"][i])
        v = (-s_ * dx + c * dy) / (gl["lb"][i] + gl["te"][i])
        inside = np.hypot(u, v) < 1.08 * _gland_radius(gl, np.arctan2(v, u), i)
        alive[sub] &= ~inside
    if alive.any():
        jj, ii, qq = np.nonzero(alive)
        cid = jj * GX.shape[1] + ii  # cell index of each candidate
        cells, inv = np.unique(cid, return_inverse=True)
        ex, ey = ccx.ravel()[cells], ccy.ravel()[cells]
        hole_c = _noise_points(k["hole"], _HOLE_UM, ex, ey)[inv]
        cell_c = _noise_points(k["cell"], 90.0, ex, ey)[inv]
        lymph_c = _noise_points(k["lymph"], 110.0, ex, ey)[inv]
        nest_c = _noise_points(k["nest"], 35.0, ex, ey)[inv]
        lob_c = _smoothstep((_noise_points(k["lobule"], _LOBULE_UM, ex, ey) + 0.1) / 1.0)[inv]
        sel = (jj, ii, qq)
        px, py = px[sel], py[sel]
        les = _lesion_points(scene, px, py).astype(np.float64)
        dens = np.stack(_nuclear_density(les, cell_c, lymph_c, nest_c, lob_c), 0)
        cum = np.cumsum(dens * (C * C / _CELL_K), 0)
        u = utype[sel]
        typ = np.full(u.shape, -1)
        for t in range(2, -1, -1):
            typ = np.where(u < cum[t], t, typ)
        keep = (typ >= 0) & (hole_c < _hole_threshold(les) - 0.1)
        px, py, typ = px[keep], py[keep], typ[keep]
        r3, r4, r5, r6 = (r[sel][keep] for r in (r3, r4, r5, r6))
        cells_keep = cells[inv[keep]]
    else:
        px = py = r3 = r4 = r5 = r6 = np.zeros(0)
        typ = np.zeros(0, int)
        cells_keep = np.zeros(0, int)
    n = typ.size
    a = np.empty(n)
    b = np.empty(n)
    ang = r5 * 180.0
    dark = np.empty(n)
    t0 = typ == 0  # fibroblasts: spindles along the dominant fibre direction
    if t0.any():
        a[t0] = 4.5 + 3.0 * r3[t0]
        b[t0] = 1.2 + 0.7 * r4[t0]
        cl = cells_keep[t0]
        cu, cinv = np.unique(cl, return_inverse=True)
        ex, ey = ccx.ravel()[cu], ccy.ravel()[cu]
        wv = np.stack([_noise_points(k[f"fibw{i}"], 140.0, ex, ey) for i in range(3)])
        dom = np.argmax(wv, 0)[cinv]
        ang[t0] = np.degrees(np.take(_FIB_ANGLES, dom)) + (r5[t0] - 0.5) * 30.0
        dark[t0] = 0.9 + 0.4 * r6[t0]
    t1 = typ == 1  # lymphocytes: small, round, very dark
    if t1.any():
        a[t1] = 2.5 + 0.8 * r3[t1]
        b[t1] = a[t1] * (0.85 + 0.15 * r4[t1])
        dark[t1] = 1.5 + 0.3 * r6[t1]
    t2 = typ == 2  # tumour: large, pleomorphic, hyperchromatic
    if t2.any():
        a[t2] = 4.4 + 3.8 * r3[t2] ** 1.5
        b[t2] = a[t2] * (0.6 + 0.35 * r4[t2])
        dark[t2] = 1.1 + 0.55 * r6[t2]
    gx, gy, ga, gb, gang, gdark = _gland_nuclei(scene, gl)
    return (np.concatenate([px, gx]), np.concatenate([py, gy]), np.concatenate([a, ga]),
            np.concatenate([b, gb]), np.concatenate([ang, gang]), np.concatenate([dark, gdark]),
            np.concatenate([typ, np.full(gx.size, 3)]))


def _draw_nuclei(nuc, x0_um: float, y0_um: float, w: int, h: int, p_um: float, vesicular_key: int):
    """Rasterise nuclei into an H optical-density map and a nucleolus map."""
    x, y, a, b, ang, dark, kind = nuc
    shift = 4
    S = 1 << shift
    m = int(math.ceil((_MAX_NUC_SEMI_UM + 2 * p_um) / p_um)) + 1
    cx = ((x - x0_um) / p_um - 0.5 + m) * S
    cy = ((y - y0_um) / p_um - 0.5 + m) * S
    inside = (cx > -S) & (cy > -S) & (cx < (w + 2 * m) * S) & (cy < (h + 2 * m) * S)
    ax = np.maximum(a / p_um, 0.5) * S
    bx = np.maximum(b / p_um, 0.5) * S
    canvas = np.zeros((h + 2 * m, w + 2 * m), np.uint8)
    extra = np.zeros_like(canvas)
    scale = 255.0 / 2.2
    col = np.clip(dark * scale, 1, 255)
    hollow = np.clip(dark * 0.5 * scale, 1, 255)
    detail = p_um <= 1.2
    ves = (kind == 2) & (_uniform(vesicular_key, np.round(x * 16), np.round(y * 16)) < 0.45)
    rim = max(1, int(round(0.9 / p_um)))
    rr = int(max(0.9 / p_um, 0.7) * S)
    for i in np.flatnonzero(inside):
        c = (int(cx[i]), int(cy[i]))
        axes = (int(ax[i]), int(bx[i]))
        if ves[i] and detail:
            cv2.ellipse(canvas, c, axes, float(ang[i]), 0, 360, float(hollow[i]), -1, cv2.LINE_AA, shift)
            cv2.ellipse(canvas, c, axes, float(ang[i]), 0, 360, float(col[i]), rim, cv2.LINE_AA, shift)
            cv2.circle(extra, c, rr, 220, -1, cv2.LINE_AA, shift)
        else:
            cv2.ellipse(canvas, c, axes, float(ang[i]), 0, 360, float(col[i]), -1, cv2.LINE_AA, shift)
    return (canvas[m:m + h, m:m + w].astype(np.float32) * (1.0 / scale),
            extra[m:m + h, m:m + w].astype(np.float32) * (1.0 / 255.0))


# noise fields evaluated on a coarse grid and interpolated: (name, spacing_um)
_COARSE_NOISE = (("lobule", _LOBULE_UM), ("hole", None), ("cell", 90.0), ("lymph", 110.0), ("nest", 35.0), ("emid", 60.0),
                 ("emid2", 14.0), ("fibw0", 140.0), ("fibw1", 140.0), ("fibw2", 140.0))


def _coarse_fields(scene: SynthScene, ox_px: float, oy_px: float, d: float, xs: np.ndarray,
                   ys: np.ndarray, w: int, h: int):
    """Tissue field, smooth noises and derived stain terms at pixel centres.

    Evaluated on a grid ``f`` times coarser than the pixels (aligned to
    multiples of ``f`` pixels, so neighbouring blocks agree) and linearly
    interpolated.
    """
    p_um = d * scene.render_mpp
    f = 1
    while f < 8 and 2 * f * p_um <= 4.0:
        f *= 2
    if f == 1:
        cxs, cys = xs, ys
        les = _lesion_tile_mask(scene, ox_px, oy_px, w, h, d)
    else:
        nx, ny = -(-w // f) + 2, -(-h // f) + 2
        x0 = xs[0] - 0.5 * p_um
        y0 = ys[0] - 0.5 * p_um
        cxs = x0 + (f * (np.arange(nx) - 1) + (f - 1) / 2 + 0.5) * p_um
        cys = y0 + (f * (np.arange(ny) - 1) + (f - 1) / 2 + 0.5) * p_um
        # coarse pixel c covers level-0 [ox - f*d + c*f*d, ...): a level of downsample f*d
        les = _lesion_tile_mask(scene, ox_px - f * d, oy_px - f * d, nx, ny, f * d)
    c = {"F": _tissue_field_grid(scene, cxs, cys, p_um, octaves=(0, 1))}
    for name, sp in _COARSE_NOISE:
        sp = _HOLE_UM if sp is None else sp
        fd = _fade(sp, p_um)
        if fd > 0:
            c[name] = fd * _noise_grid(scene.keys[name], sp, cxs, cys)
        else:
            c[name] = np.zeros((cys.size, cxs.size), np.float32)
    # derived terms: eosin = eA + sum_i eB_i * fibre_texture_i ; H background
    lob = _smoothstep((c["lobule"] + 0.1) / 1.0)  # loose, cellular stroma in lobules
    emod = 1.0 + 0.16 * c["emid"] + 0.08 * c["emid2"]
    fw = [np.exp(2.5 * c[f"fibw{i}"]) for i in range(3)]
    eb = 0.62 * emod * (1 - 0.35 * lob) / (fw[0] + fw[1] + fw[2])
    names = ["F", "les", "hole", "cell", "lymph", "nest", "emid2", "lob", "eA", "eB0", "eB1", "eB2", "hA"]
    chans = [c["F"], les, c["hole"], c["cell"], c["lymph"], c["nest"], c["emid2"], lob,
             0.62 * 0.12 * emod, eb * fw[0], eb * fw[1], eb * fw[2], 0.035 + 0.012 * c["emid"]]
    out = {}
    for n, ch in zip(names, chans):
        ch = np.asarray(ch, np.float32)
        if f > 1:  # per-plane resize: much faster than one many-channel resize in cv2
            ch = cv2.resize(ch, (ch.shape[1] * f, ch.shape[0] * f),
                            interpolation=cv2.INTER_LINEAR)[f:f + h, f:f + w]
        out[n] = ch
    out["any_lesion"] = bool(les.any())
    return out


_GLASS_BLOCKS: dict = {}


def _glass_block(w: int, h: int) -> np.ndarray:
    """A cached (h, w, 3) uint8 block of slide-glass colour (do not modify)."""
    b = _GLASS_BLOCKS.get((w, h))
    if b is None:
        b = np.empty((h, w, 3), np.uint8)
        b[:] = np.round(np.array(_GLASS_RGB)).astype(np.uint8)
        if len(_GLASS_BLOCKS) > 16:
            _GLASS_BLOCKS.clear()
        _GLASS_BLOCKS[(w, h)] = b
    return b


def _render(scene: SynthScene, ox_px: float, oy_px: float, w: int, h: int, d: float) -> np.ndarray:
    """Render pixels ``[0, w) x [0, h)`` of a level with downsample ``d``.

    Pixel (0, 0) covers level-0 area ``[ox, ox + d) x [oy, oy + d)``.
    """
    glass = np.array(_GLASS_RGB, np.float32)
    out = _glass_block(w, h).copy()
    if not scene.pieces:
        return out
    mpp = scene.render_mpp
    p_um = d * mpp
    x0_um, y0_um = ox_px * mpp, oy_px * mpp
    xs = x0_um + (np.arange(w) + 0.5) * p_um
    ys = y0_um + (np.arange(h) + 0.5) * p_um
    # quick rejection with the coarse raster and a bound on the edge noise
    g = scene.raster_um
    r = scene.raster
    i0 = max(int(xs[0] / g) - 1, 0)
    i1 = min(int(xs[-1] / g) + 2, r.shape[1] - 1)
    j0 = max(int(ys[0] / g) - 1, 0)
    j1 = min(int(ys[-1] / g) + 2, r.shape[0] - 1)
    bound = sum(a for _, a in scene.edge_octaves) * 5.0
    if i0 > i1 or j0 > j1 or float(r[j0:j1 + 1, i0:i1 + 1].max()) + bound < 0:
        return out
    k = scene.keys
    gpos = (int(round(d * 16)), int(math.floor(ox_px / d + 1e-6)), int(math.floor(oy_px / d + 1e-6)))
    cf = _coarse_fields(scene, ox_px, oy_px, d, xs, ys, w, h)
    F = cf["F"]
    sp2, amp2 = scene.edge_octaves[2]
    fd = _fade(sp2, p_um)
    f_min = float(F.min())
    if fd > 0 and f_min < 6 * amp2 + p_um:
        if p_um < 1.0:  # at half resolution (aligned to even pixels), then interpolated
            hx = xs[0] - 0.5 * p_um + (2 * (np.arange(-(-w // 2) + 2) - 1) + 1.0) * p_um
            hy = ys[0] - 0.5 * p_um + (2 * (np.arange(-(-h // 2) + 2) - 1) + 1.0) * p_um
            e2 = _noise_grid(k["edge2"], sp2, hx, hy)
            e2 = cv2.resize(e2, (e2.shape[1] * 2, e2.shape[0] * 2),
                            interpolation=cv2.INTER_LINEAR)[2:2 + h, 2:2 + w]
        else:
            e2 = _noise_grid(k["edge2"], sp2, xs, ys)
        F = F + (amp2 * fd) * e2
        f_min = float(F.min())
    if float(F.max()) <= -p_um:
        return out
    beyond = xs[-1] > scene.width_px * mpp or ys[-1] > scene.height_px * mpp
    if f_min > p_um and not beyond:  # all tissue: scalars save full-size arithmetic
        tissue = tissue_in = 1.0
    else:
        tissue = np.clip(F * (1.0 / p_um) + 0.5, 0.0, 1.0)
        tissue_in = (F > 0).astype(np.float32)
        if beyond:
            tissue *= (ys < scene.height_px * mpp)[:, None] * (xs < scene.width_px * mpp)[None, :]

    les = cf["les"] if cf["any_lesion"] else 0.0
    hole_thr = _hole_threshold(les)
    if float(cf["hole"].max()) > _HOLE_THR - 0.5:
        hole = _smoothstep((cf["hole"] - hole_thr) * (1.0 / (0.04 * max(p_um, 0.5))) + 0.5)
    else:
        hole = 0.0

    # glands (lumen + epithelial ring)
    gl = _glands_near(scene, x0_um, y0_um, x0_um + w * p_um, y0_um + h * p_um)
    if gl["cx"].size:
        cv_out = np.zeros((h, w), np.uint8)
        cv_lum = np.zeros((h, w), np.uint8)
        _fill_polys(cv_out, list(_gland_outlines(gl, "outer") / mpp), ox_px, oy_px, d, 255, cv2.LINE_AA)
        _fill_polys(cv_lum, list(_gland_outlines(gl, "lumen") / mpp), ox_px, oy_px, d, 255, cv2.LINE_AA)
        lumen = cv_lum.astype(np.float32) * (1 / 255.0)
        epi = np.clip(cv_out.astype(np.float32) * (1 / 255.0) - lumen, 0, 1)
    else:
        lumen = epi = None

    # eosin: collagen fibres (periodic texture bank) with patchy intensity
    period = _FIB_BANK_PX * mpp
    offx, offy = (float(np.floor(_uniform(k["fiboff"], j) * _FIB_BANK_PX)) * mpp for j in (0, 1))
    E = cf["eA"].copy()
    for i, tex in enumerate(_fibre_bank(mpp, d)):
        E += cf[f"eB{i}"] * _sample_periodic(tex, period, x0_um + offx, y0_um + offy, p_um, w, h)
    H = cf["hA"].copy()
    if epi is not None:  # epithelium: pink-purple cytoplasm
        E += epi * (0.40 * (1 + 0.08 * cf["emid2"]) - E)
        H += epi * 0.12
    if cf["any_lesion"]:  # tumour: basophilic cytoplasm
        E += les * (0.30 * (1 + 0.1 * cf["emid2"]) - E)
        H += les * (0.14 * (1 + 0.2 * cf["nest"]))
    if lumen is not None:
        E += lumen * (0.05 - E)

    # nuclei: drawn when resolved, else their expected optical density
    if p_um <= _DRAW_NUCLEI_MAX_PX_UM:
        nuc = _nuclei(scene, x0_um, y0_um, w, h, p_um, gl)
        if nuc[0].size:
            nmap, nucleoli = _draw_nuclei(nuc, x0_um, y0_um, w, h, p_um, k["ves"])
            if p_um < 1.0:
                chrom = cv2.GaussianBlur(_grain(k["hvar"], *gpos, h, w), (0, 0), 0.5 / p_um)
                np.clip(chrom, -0.7, 0.7, out=chrom)
                nmap *= 1.0 + chrom
                nmap = cv2.GaussianBlur(nmap, (0, 0), 0.3 / p_um)
            nmap += 0.9 * nucleoli
            if not isinstance(tissue_in, float):
                nmap *= tissue_in
            H += nmap
            E *= 1 - 0.6 * np.minimum(nmap, 1.0)
    else:
        free = tissue_in * (cf["hole"] < hole_thr - 0.1)
        if epi is not None:
            free = free * (1 - np.clip(epi + lumen, 0, 1))
        dens = _nuclear_density(les, cf["cell"], cf["lymph"], cf["nest"], cf["lob"])
        cov = sum((1 - np.exp(-dt * _NUC_MEAN_AREA[t])) * _NUC_MEAN_DARK[t] for t, dt in enumerate(dens))
        cov = cov * free
        if epi is not None:
            cov += epi * _EPI_COVERAGE
        H += cov
        E *= 1 - 0.5 * np.clip(cov, 0, 1)

    density = tissue * (1.0 - 0.95 * hole) * scene.stain_scale
    if not isinstance(density, float):
        H *= density
        E *= density
    elif density != 1.0:
        H *= np.float32(density)
        E *= np.float32(density)
    # Beer-Lambert: RGB = glass * exp(-(H * h_vec + E * e_vec)) + sensor noise
    noise = _grain(k["grain"], *gpos, h, w) * (1.8 * tissue)
    noise += 0.5
    planes = []
    for c in range(3):
        od = H * np.float32(-scene.h_vec[c])
        od -= E * np.float32(scene.e_vec[c])
        ch = cv2.exp(od)
        ch *= glass[c]
        ch += noise
        np.clip(ch, 0, 255, out=ch)
        planes.append(ch.astype(np.uint8))
    return cv2.merge(planes)


def render_region(scene: SynthScene, level0_xy: tuple = (0, 0), size_px: tuple | None = None,
                  downsample: float = 1.0) -> np.ndarray:
    """Render an RGB region of a synthetic slide.

    Parameters
    ----------
    scene : SynthScene
        Slide description from :func:`make_scene`.
    level0_xy : (int, int)
        Top-left corner of the region in level-0 pixels (as in OpenSlide's
        ``read_region``).
    size_px : (int, int) or None
        ``(width, height)`` of the output in pixels of the rendered level.
        ``None`` renders the whole slide at ``downsample``.
    downsample : float
        Level-0 pixels per output pixel.

    Returns
    -------
    ndarray, uint8, shape (height, width, 3)
    """
    d = float(downsample)
    if size_px is None:
        size_px = (math.ceil((scene.width_px - level0_xy[0]) / d),
                   math.ceil((scene.height_px - level0_xy[1]) / d))
    w, h = int(size_px[0]), int(size_px[1])
    out = np.empty((h, w, 3), np.uint8)
    step = 512
    for y in range(0, h, step):
        for x in range(0, w, step):
            ww, hh = min(step, w - x), min(step, h - y)
            out[y:y + hh, x:x + ww] = _render(scene, level0_xy[0] + x * d, level0_xy[1] + y * d,
                                              ww, hh, d)
    return out


# ----------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------


def default_downsamples(width_px: int, height_px: int, min_size_px: int = 512) -> list:
    """Default pyramid: downsamples 1, 4, 16, 64 while the level's longer side >= ``min_size_px``."""
    out = [1]
    for d in (4, 16, 64):
        if max(width_px, height_px) / d >= min_size_px:
            out.append(d)
    return out


@dataclass
class SlideSpec:
    """What :func:`write_slide` wrote.  ``to_dict()`` gives a JSON-able dict."""

    path: str
    width_px: int
    height_px: int
    mpp: float | None
    tile_px: int
    downsamples: list
    level_dimensions: list
    jpeg_quality: int
    photometric: str
    seed: int
    tissue: str
    tissue_fraction: float
    n_lesions: int
    lesions_level0_px: list
    geojson_path: str | None = None
    mask_path: str | None = None
    mask_json_path: str | None = None
    mask_downsample: int | None = None
    file_bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def lesion_geojson(polygons_level0_px: Sequence[np.ndarray], *, name: str = "Tumor",
                   color: Sequence[int] = (200, 0, 0)) -> dict:
    """QuPath-style GeoJSON FeatureCollection of lesion polygons.

    Parameters
    ----------
    polygons_level0_px : sequence of (N, 2) arrays
        Polygon vertices ``(x, y)`` in level-0 pixels (open rings).
    name, color : str, (r, g, b)
        Classification written to each feature.

    Returns
    -------
    dict
    """
    feats = []
    for poly in polygons_level0_px:
        ring = [[float(x), float(y)] for x, y in np.asarray(poly)]
        ring.append(list(ring[0]))
        feats.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "annotation",
                           "classification": {"name": name, "color": [int(c) for c in color]}},
        })
    return {"type": "FeatureCollection", "features": feats}


def rasterize_polygons(polygons_level0_px: Sequence[np.ndarray], width_px: int, height_px: int,
                       downsample: int) -> np.ndarray:
    """Binary mask of polygons at a downsample.

    Mask pixel ``(i, j)`` covers level-0 ``[j*ds, (j+1)*ds) x [i*ds, (i+1)*ds)``
    and is set when its centre lies inside a polygon.

    Returns
    -------
    ndarray, bool, shape (ceil(height_px / ds), ceil(width_px / ds))
    """
    ds = int(downsample)
    m = np.zeros((math.ceil(height_px / ds), math.ceil(width_px / ds)), np.uint8)
    if len(polygons_level0_px):
        _fill_polys(m, [np.asarray(p, np.float64) for p in polygons_level0_px], 0.0, 0.0, float(ds))
    return m.astype(bool)


def _jpeg_args(photometric: str, quality: int) -> tuple[dict, dict]:
    """(tifffile write kwargs, imagecodecs encode kwargs) for a photometric."""
    if photometric == "ycbcr":
        enc = dict(level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2))
        tw = dict(photometric="rgb", subsampling=(2, 2),
                  compressionargs=dict(level=quality, outcolorspace="YCBCR"))
    elif photometric == "rgb":
        enc = dict(level=quality, colorspace="RGB", outcolorspace="RGB", subsampling=(1, 1))
        tw = dict(photometric="rgb", subsampling=(1, 1),
                  compressionargs=dict(level=quality, outcolorspace="RGB"))
    else:
        raise ValueError("photometric must be 'rgb' or 'ycbcr'")
    return tw, enc


def _ordered_map(func, items: Iterable, workers: int, ahead: int) -> Iterator:
    """``map(func, items)`` computed by a thread pool, results in order, bounded look-ahead."""
    if workers <= 1:
        for it in items:
            yield func(it)
        return
    it = iter(items)
    with ThreadPoolExecutor(workers) as ex:
        q: deque = deque()
        for x in it:
            q.append(ex.submit(func, x))
            if len(q) >= ahead:
                break
        while q:
            res = q.popleft().result()
            for x in it:
                q.append(ex.submit(func, x))
                break
            yield res


def write_slide(path, width_px: int, height_px: int, *, mpp: float | None = 0.5, tile_px: int = 256,
                levels: Sequence[int] | None = None, jpeg_quality: int = 85, seed: int = 0,
                tissue: str = "normal", lesions: int = 0, photometric: str = "ycbcr",
                stain_jitter: float = 0.0, annotations_dir=None, mask_downsample: int = 16,
                workers: int | None = None, scene: SynthScene | None = None) -> SlideSpec:
    """Write a synthetic H&E slide as a pyramidal tiled JPEG TIFF.

    The image is streamed tile by tile (memory use does not grow with the
    slide size); every level is rendered procedurally at its own resolution.
    Identical arguments give byte-identical files.

    Parameters
    ----------
    path : str or Path
        Output ``.tif`` file.
    width_px, height_px : int
        Level-0 size in pixels.
    mpp : float or None
        Level-0 pixel size (um/px), stored in the TIFF resolution tags
        (``ResolutionUnit = CENTIMETER``).  ``None`` writes no resolution.
    tile_px : int
        TIFF tile edge in pixels (multiple of 16).
    levels : sequence of int or None
        Downsample factors of the pyramid, starting with 1.  Default:
        :func:`default_downsamples`.
    jpeg_quality : int
        JPEG quality (1-100).
    seed : int
        Random seed of the scene.
    tissue : {'normal', 'small', 'faint', 'none'}
        Tissue layout, see :func:`make_scene`.
    lesions : int
        Number of lesions to place in the tissue.
    photometric : {'ycbcr', 'rgb'}
        JPEG colour model: ``'ycbcr'`` (4:2:0 subsampled YCbCr, as most
        scanners write) or ``'rgb'`` (JPEG in RGB, no subsampling).
    stain_jitter : float
        Slide-to-slide stain variation, see :func:`make_scene`.
    annotations_dir : str, Path or None
        Where lesion annotations go (default: next to the slide).  For a
        slide ``<stem>.tif`` with lesions, writes ``<stem>.geojson``
        (QuPath-style, level-0 px), ``<stem>_lesion_mask.png`` (0/255 at
        ``mask_downsample``) and ``<stem>_lesion_mask.json`` (its downsample
        and sizes).  Nothing is written for slides without lesions.
    mask_downsample : int
        Downsample of the lesion mask PNG.
    workers : int or None
        Rendering threads (default: number of CPUs).
    scene : SynthScene or None
        Write this scene instead of building one from
        ``seed / tissue / lesions / stain_jitter / mpp``.

    Returns
    -------
    SlideSpec
    """
    path = Path(path)
    if tile_px % 16 or tile_px < 16:
        raise ValueError("tile_px must be a positive multiple of 16")
    if not 1 <= int(jpeg_quality) <= 100:
        raise ValueError("jpeg_quality must be in 1..100")
    if scene is None:
        scene = make_scene(width_px, height_px, mpp=mpp, seed=seed, tissue=tissue, lesions=lesions,
                           stain_jitter=stain_jitter)
    elif (scene.width_px, scene.height_px) != (int(width_px), int(height_px)):
        raise ValueError("scene size does not match width_px/height_px")
    mpp = scene.mpp
    ds = list(levels) if levels is not None else default_downsamples(width_px, height_px)
    if not ds or ds[0] != 1 or any(int(b) <= int(a) for a, b in zip(ds, ds[1:])):
        raise ValueError("levels must start with 1 and increase strictly")
    ds = [int(v) for v in ds]
    tw_kw, enc_kw = _jpeg_args(photometric, int(jpeg_quality))
    workers = int(workers or os.cpu_count() or 1)

    glass_tile = np.empty((tile_px, tile_px, 3), np.uint8)
    glass_tile[:] = np.round(np.array(_GLASS_RGB)).astype(np.uint8)
    glass_bytes = bytes(imagecodecs.jpeg8_encode(glass_tile, **enc_kw))

    dims = [(math.ceil(width_px / d), math.ceil(height_px / d)) for d in ds]
    bigtiff = width_px * height_px * 3 > 2 ** 31
    path.parent.mkdir(parents=True, exist_ok=True)

    bt = max(1, _BLOCK_PX // tile_px)  # tiles per side of a rendering block
    block_px = bt * tile_px

    def block_bytes(job):
        """Render one block of bt x bt tiles; return rows of encoded tiles."""
        li, bx, by, ntx, nty = job
        d = ds[li]
        rows = []
        if not scene.pieces:
            arr = None
        else:
            arr = _render(scene, bx * block_px * d, by * block_px * d, block_px, block_px, float(d))
        for r in range(bt):
            ty = by * bt + r
            if ty >= nty:
                break
            row = []
            for c in range(bt):
                tx = bx * bt + c
                if tx >= ntx:
                    break
                if arr is None:
                    row.append(glass_bytes)
                    continue
                t = arr[r * tile_px:(r + 1) * tile_px, c * tile_px:(c + 1) * tile_px]
                if t[0, 0, 0] == glass_tile[0, 0, 0] and np.array_equal(t, glass_tile):
                    row.append(glass_bytes)
                else:
                    row.append(bytes(imagecodecs.jpeg8_encode(np.ascontiguousarray(t), **enc_kw)))
            rows.append(row)
        return rows

    def level_tiles(li, ntx, nty):
        nbx, nby = -(-ntx // bt), -(-nty // bt)
        jobs = ((li, bx, by, ntx, nty) for by in range(nby) for bx in range(nbx))
        results = _ordered_map(block_bytes, jobs, workers, ahead=max(4, 3 * workers))
        for _by in range(nby):
            blocks = [next(results) for _ in range(nbx)]
            for r in range(len(blocks[0])):
                for blk in blocks:
                    yield from blk[r]

    if scene.pieces:  # build the shared texture banks once, before the worker threads start
        for d in ds:
            _fibre_bank(scene.render_mpp, float(d))
        _grain_bank(scene.keys["grain"])
        _grain_bank(scene.keys["hvar"])
    tmp = path.with_name(path.name + ".partial")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
            for li, (d, (lw, lh)) in enumerate(zip(ds, dims)):
                nty, ntx = math.ceil(lh / tile_px), math.ceil(lw / tile_px)
                kw = dict(tw_kw)
                if mpp is not None:
                    px_per_cm = 1e4 / (mpp * d)
                    kw.update(resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
                tw.write(level_tiles(li, ntx, nty), shape=(lh, lw, 3), dtype=np.uint8,
                         tile=(tile_px, tile_px), compression="jpeg", subfiletype=0 if li == 0 else 1,
                         metadata=None, software="wsi-pipeline synth", **kw)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()

    spec = SlideSpec(
        path=str(path), width_px=int(width_px), height_px=int(height_px), mpp=mpp, tile_px=int(tile_px),
        downsamples=ds, level_dimensions=[list(x) for x in dims], jpeg_quality=int(jpeg_quality),
        photometric=photometric, seed=int(scene.seed), tissue=scene.tissue,
        tissue_fraction=round(scene.tissue_fraction, 4), n_lesions=len(scene.lesions_px),
        lesions_level0_px=[np.asarray(p).tolist() for p in scene.lesions_px],
        file_bytes=path.stat().st_size,
    )
    if scene.lesions_px:
        adir = Path(annotations_dir) if annotations_dir is not None else path.parent
        gj, mp, mj = _write_truth(adir, path, scene.lesions_px, width_px, height_px, mpp, mask_downsample)
        spec.geojson_path, spec.mask_path, spec.mask_json_path = str(gj), str(mp), str(mj)
        spec.mask_downsample = int(mask_downsample)
    return spec


def _write_truth(adir: Path, slide_path: Path, polys, width_px: int, height_px: int, mpp,
                 mask_downsample: int, geojson: bool = True) -> tuple:
    """Write a slide's lesion truth: ``<stem>.geojson`` (unless ``geojson=False``),
    ``<stem>_lesion_mask.png`` (0/255 at ``mask_downsample``) and its ``.json`` sidecar."""
    adir.mkdir(parents=True, exist_ok=True)
    stem = slide_path.stem
    gj = adir / f"{stem}.geojson"
    if geojson:
        gj.write_text(json.dumps(lesion_geojson(polys)))
    mask = rasterize_polygons(polys, width_px, height_px, mask_downsample)
    mp = adir / f"{stem}_lesion_mask.png"
    ok = cv2.imwrite(str(mp), mask.astype(np.uint8) * 255)
    if not ok:
        raise OSError(f"could not write {mp}")
    mj = adir / f"{stem}_lesion_mask.json"
    mj.write_text(json.dumps({
        "slide": slide_path.name, "downsample": int(mask_downsample),
        "level0_size_px": [int(width_px), int(height_px)],
        "mask_size_px": [int(mask.shape[1]), int(mask.shape[0])],
        "mpp": mpp, "values": {"0": "background", "255": "Tumor"},
        "rule": "mask pixel (i, j) covers level-0 [j*ds, (j+1)*ds) x [i*ds, (i+1)*ds); "
                "set when its centre is inside a lesion polygon",
    }, indent=1))
    return (gj if geojson else None), mp, mj


# ----------------------------------------------------------------------------
# cohorts
# ----------------------------------------------------------------------------


def _split_counts(n: int, fractions: Sequence[float]) -> list:
    """Largest-remainder allocation of ``n`` items; every split with a positive
    fraction gets at least one item when ``n`` allows it."""
    f = np.asarray(fractions, float)
    f = f / f.sum()
    raw = f * n
    cnt = np.floor(raw).astype(int)
    rem = raw - cnt
    for i in np.argsort(-rem, kind="stable")[: n - cnt.sum()]:
        cnt[i] += 1
    pos = np.flatnonzero(f > 0)
    if n >= len(pos):
        for i in pos:
            if cnt[i] == 0:
                j = int(np.argmax(cnt))
                cnt[j] -= 1
                cnt[i] += 1
    return cnt.tolist()


def _cohort_plan(n_positive: int, n_negative: int, seed: int, split_names: Sequence[str],
                 fracs: Sequence[float], annotate: int, lesion_range: tuple):
    """Labels, splits, pixel-annotated indices and lesion counts of a cohort.

    Labels are shuffled over the slide ids; splits are assigned per label
    (stratified); the pixel-annotated slides are the first ``annotate``
    positives (by id) of the first split.
    """
    n = n_positive + n_negative
    rng = np.random.default_rng([int(seed) & _M32, int(seed) >> 32, 0xC0407])
    labels = np.array([1] * n_positive + [0] * n_negative)
    labels = labels[rng.permutation(n)]
    splits = [""] * n
    for lab in (1, 0):
        idx = np.flatnonzero(labels == lab)
        idx = idx[rng.permutation(len(idx))]
        cnt = _split_counts(len(idx), fracs)
        pos = 0
        for s_name, c in zip(split_names, cnt):
            for i in idx[pos:pos + c]:
                splits[int(i)] = s_name
            pos += c
    train_name = split_names[0]
    train_pos = [i for i in range(n) if labels[i] == 1 and splits[i] == train_name]
    if annotate > len(train_pos):
        raise ValueError(f"annotate={annotate} but only {len(train_pos)} positive slides in the "
                         f"'{train_name}' split")
    annotated = set(train_pos[:annotate])
    n_les = rng.integers(lesion_range[0], lesion_range[1] + 1, size=n)
    return labels, splits, annotated, n_les


def make_cohort(out_dir, *, n_positive: int, n_negative: int, width_px: int, height_px: int,
                mpp: float | None = 0.5, seed: int = 0, annotate: int = 0,
                split: Sequence[float] | dict = (0.6, 0.2, 0.2), lesions_per_slide: tuple = (1, 3),
                tile_px: int = 256, levels: Sequence[int] | None = None, jpeg_quality: int = 85,
                photometric: str = "ycbcr", stain_jitter: float = 0.15, mask_downsample: int = 16,
                workers: int | None = None, difficulty: str = "easy", texture_source="auto",
                on_slide: Callable[[dict], None] | None = None) -> dict:
    """Write a small labelled cohort of synthetic slides.

    Positive slides contain lesions, negative slides do not.  Labels are
    assigned to ``slide_000 ... slide_NNN`` in a seeded random order, splits
    are stratified by label.

    ``difficulty='easy'`` (the default, for fast tests and the demo): lesions
    are large, dark, purple regions that any colour feature finds.
    ``difficulty='realistic'``: lesions are a few small blobs (1-5 % of the
    tissue) that differ from normal tissue by nuclear size, density,
    pleomorphism, chromatin and nucleoli only, their mean colour matched to the
    tissue they replace; every slide has normal-tissue decoy blobs of the same
    sizes; confounders (pen, folds, blur patches, regional stain shifts,
    debris), per-slide stain (H&E ratio and vectors), brightness and focus are
    drawn per (positive, negative) pair of a split, so both classes get them
    at the same rates; test-split lesions are of a kind no training lesion
    has: their nuclear parameters lie in the gap between the two kinds the
    other splits draw (:data:`LESION_KIND_BANDS`), and, with a real texture
    source, their background texture comes from the other half of the
    source image.  Normal tissue comes from ``texture_source`` (a real H&E
    slide read with OpenSlide, quilted into the tissue outline) or is
    procedural; ``cohort.json`` records which.

    Files written in ``out_dir``:

    - ``slide_XXX.tif`` - the slides;
    - ``labels.csv`` - columns ``slide_id,label,split`` (label 1/0);
    - ``annotations/<slide_id>.geojson``, ``<slide_id>_lesion_mask.png`` and
      ``<slide_id>_lesion_mask.json`` - lesion ground truth, positives only;
    - ``pixel_annotated.txt`` - the pixel-annotated slide ids, one per line:
      the first ``annotate`` positive slides (by id) of the train split;
    - ``cohort.json`` - all of the above plus each slide's :class:`SlideSpec`.

    A realistic cohort also writes ``annotations/<slide_id>_lesion_mask.png``
    (all zero) and ``.json`` for the negative slides, and, for the
    pixel-annotated slides, ``region_annotations/<slide_id>.geojson``: what an
    annotator would export from QuPath, ``Region*`` rectangles marking where
    the annotation is complete and the ``Tumor`` polygons clipped to them
    (other lesions of the slide lie outside every rectangle).  Pass that
    folder, not ``annotations/`` (the full truth, for ``evaluate``), to
    ``em-round --annotations``.  Each slide entry of ``cohort.json`` lists its
    blobs (kind, nuclear parameters, outline), confounders and nuisances.

    Parameters
    ----------
    out_dir : str or Path
        Output folder (created).
    n_positive, n_negative : int
        Number of slides with / without lesions.
    width_px, height_px : int
        Level-0 size of every slide.
    mpp : float or None
        Level-0 pixel size (um/px).
    seed : int
        Cohort seed; slide seeds, labels and splits derive from it.
    annotate : int
        Number of pixel-annotated positive slides (taken from the train split).
    split : (train, val, test) fractions or dict {'train': f, 'val': f, 'test': f}
        Split fractions, applied per label (stratified).
    lesions_per_slide : (int, int)
        Inclusive range of the number of lesions of a positive slide.
    tile_px, levels, jpeg_quality, photometric, mask_downsample, workers
        Passed to :func:`write_slide`.
    stain_jitter : float
        Slide-to-slide stain variation (easy cohorts).
    difficulty : {'easy', 'realistic'}
        Which kind of cohort, see above.
    texture_source : 'auto', str, Path or None
        Realistic cohorts: a slide whose level 0 is the normal-tissue texture;
        ``'auto'`` uses :data:`DEFAULT_TEXTURE_SOURCE` when that file exists,
        ``None`` (or ``'procedural'``) the procedural tissue.
    on_slide : callable, optional
        Called with each slide's entry (see Returns) once the slide is written, e.g. to show progress.

    Returns
    -------
    dict
        ``{'out_dir', 'labels_csv', 'slides': [...], 'pixel_annotated': [...], ...}``;
        each slide entry has ``slide_id, label, split, path, pixel_annotated,
        geojson, mask, n_lesions``.
    """
    out = Path(out_dir)
    if n_positive < 0 or n_negative < 0 or n_positive + n_negative == 0:
        raise ValueError("need at least one slide")
    split_names, fracs = _split_fractions(split)
    lo, hi = int(lesions_per_slide[0]), int(lesions_per_slide[1])
    if lo < 1 or hi < lo:
        raise ValueError("lesions_per_slide must be (min, max) with 1 <= min <= max")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
    labels, splits, annotated, n_les = _cohort_plan(n_positive, n_negative, seed, split_names, fracs,
                                                    int(annotate), (lo, hi))
    out.mkdir(parents=True, exist_ok=True)
    ann_dir = out / "annotations"
    written = on_slide or (lambda entry: None)
    extra = {}
    if difficulty == "realistic":
        if mpp is None:
            raise ValueError("a realistic cohort needs mpp")
        texture, extra["tissue_texture"] = _resolve_texture(texture_source, float(mpp))
        plan = _realistic_plan(labels, splits, annotated, seed, (lo, hi), split_names[-1])
        jobs = [(sl, out, ann_dir, out / "region_annotations", int(width_px), int(height_px), float(mpp),
                 tile_px, levels, jpeg_quality, photometric, mask_downsample, texture) for sl in plan]
        nw = max(1, min(int(workers or os.cpu_count() or 1), len(labels)))
        slides = [_report(written, e) for e in _ordered_map(_realistic_slide, jobs, nw, ahead=nw)]
        extra["region_annotations_dir"] = str(out / "region_annotations")
        extra["blob_param_ranges"] = {g: {k: list(v) for k, v in r.items()} for g, r in BLOB_PARAM_RANGES.items()}
        extra["lesion_kind_bands"] = {g: [list(b) for b in bands] for g, bands in LESION_KIND_BANDS.items()}
    else:
        kw = dict(width_px=width_px, height_px=height_px, mpp=mpp, tile_px=tile_px, levels=levels,
                  jpeg_quality=jpeg_quality, photometric=photometric, stain_jitter=stain_jitter,
                  annotations_dir=ann_dir, mask_downsample=mask_downsample, workers=workers)
        slides = [_report(written, _easy_slide(out, i, seed, labels[i], splits[i], i in annotated, int(n_les[i]), kw))
                  for i in range(len(labels))]
    result = {
        "out_dir": str(out), "labels_csv": str(out / "labels.csv"), "annotations_dir": str(ann_dir),
        "pixel_annotated": [s["slide_id"] for s in slides if s["pixel_annotated"]],
        "pixel_annotated_txt": str(out / "pixel_annotated.txt"),
        "seed": int(seed), "mpp": mpp, "width_px": int(width_px), "height_px": int(height_px),
        "split_fractions": dict(zip(split_names, fracs)), "difficulty": difficulty, **extra, "slides": slides,
    }
    _write_cohort_files(out, result)
    return result


def _split_fractions(split) -> tuple[list, list]:
    """(split names, fractions) from a tuple of (train, val, test) fractions or a {name: fraction} dict."""
    if isinstance(split, dict):
        names = list(split.keys())
        fracs = [float(split[s]) for s in names]
    else:
        names = ["train", "val", "test"][: len(split)]
        fracs = [float(s) for s in split]
    if len(fracs) != len(names) or min(fracs) < 0 or sum(fracs) <= 0:
        raise ValueError("invalid split fractions")
    return names, fracs


def _report(callback, entry: dict) -> dict:
    callback(entry)
    return entry


def _easy_slide(out: Path, i: int, seed: int, label: int, split: str, annotated: bool, n_lesions: int,
                kw: dict) -> dict:
    """Write slide ``i`` of an easy cohort; its entry in ``cohort.json``."""
    sid = f"slide_{i:03d}"
    slide_seed = int(_hash(_subkey(seed, "cohort"), i))
    spec = write_slide(out / f"{sid}.tif", seed=slide_seed, tissue="normal", lesions=n_lesions if label == 1 else 0,
                       **kw)
    if label == 1 and spec.n_lesions == 0:
        raise RuntimeError(f"could not place a lesion on {sid}")
    return {
        "slide_id": sid, "label": int(label), "split": split, "path": spec.path,
        "pixel_annotated": annotated, "geojson": spec.geojson_path, "mask": spec.mask_path,
        "mask_downsample": spec.mask_downsample, "n_lesions": spec.n_lesions, "seed": slide_seed,
        "spec": spec.to_dict(),
    }


def _write_cohort_files(out: Path, result: dict) -> None:
    """``labels.csv``, ``pixel_annotated.txt`` and ``cohort.json`` of a written cohort."""
    with open(out / "labels.csv", "w", newline="") as fh:
        wr = csv.writer(fh, lineterminator="\n")
        wr.writerow(["slide_id", "label", "split"])
        for s in result["slides"]:
            wr.writerow([s["slide_id"], s["label"], s["split"]])
    (out / "pixel_annotated.txt").write_text("".join(f"{p}\n" for p in result["pixel_annotated"]))
    (out / "cohort.json").write_text(json.dumps(result, indent=1))


# ----------------------------------------------------------------------------
# realistic cohorts
# ----------------------------------------------------------------------------
#
# A realistic slide is rendered at level 0 in memory and post-processed as a
# whole (the blurs and stain operations need neighbourhoods), then written
# with its pyramid levels area-downsampled from level 0, as a scanner does.
# Steps: normal tissue (procedural, or quilted from a real H&E slide) ->
# blobs (lesions and normal-tissue decoys, each colour-matched to the tissue
# it replaces) -> per-slide stain and regional confounders in optical density
# -> focus, blur patches and brightness in intensity.

#: Accepted values of :func:`make_cohort`'s ``difficulty``.
DIFFICULTIES = ("easy", "realistic")

#: Real H&E texture that realistic cohorts use when it is present (``../shared`` beside the checkout).
DEFAULT_TEXTURE_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "slides" / "cmu-1-small-region.svs"

#: Nuclear parameters of the blobs of a realistic cohort: per group, a ``(low, high)`` range per
#: parameter, drawn uniformly per blob.  ``radius_um``: mean semi-major axis (um); ``density``:
#: nuclei per 1000 um^2; ``pleomorphism``: log-sd of nuclear size; ``elongation``: mean minor /
#: major axis; ``chromatin``: coarse, marginated chromatin (0 = smooth and solid); ``nucleoli``:
#: share of nuclei with a visible nucleolus; ``darkness``: nuclear haematoxylin optical density.
#: ``lesion`` spans every kind of lesion, from the first value of each pair to the second (they may
#: run downwards); see :data:`LESION_KIND_BANDS` for which part of it each split draws from.
#: Decoys (normal tissue) overlap the lesions' first end in density and darkness.
BLOB_PARAM_RANGES = {
    "decoy": dict(radius_um=(2.4, 3.4), density=(9.0, 16.0), pleomorphism=(0.04, 0.12),
                  elongation=(0.5, 0.92), chromatin=(0.0, 0.2), nucleoli=(0.0, 0.05), darkness=(0.9, 1.3)),
    "lesion": dict(radius_um=(4.0, 6.0), density=(9.5, 5.0), pleomorphism=(0.18, 0.38),
                   elongation=(0.85, 0.56), chromatin=(0.35, 0.72), nucleoli=(0.25, 0.7),
                   darkness=(0.85, 0.5)),
}

#: Where along each ``lesion`` range (0 = first value, 1 = second) a blob's parameters are drawn:
#: training and validation lesions are of two kinds at the two ends (each blob picks one, every
#: parameter then drawn in that band), test lesions of a third kind in the gap between them, which
#: no training lesion has.  The held-out kind is an interpolation of the seen ones: a model has to
#: generalise over the nuclear features, not memorise two kinds.  (An earlier version put the test
#: kind beyond the training range in all seven parameters at once, an extrapolation no mode learned.)
LESION_KIND_BANDS = {
    "lesion_train": ((0.0, 0.35), (0.65, 1.0)),
    "lesion_test": ((0.42, 0.58),),
}

#: Total lesion area of a positive slide, as a fraction of its tissue area.
_LESION_FRACTION = (0.015, 0.035)
#: Decoys per slide (on top of the blob count of the lesions they stand in for).
_DECOYS = (1, 2)
#: Tissue fraction of the slide area.
_TISSUE_FRACTION = (0.2, 0.4)
#: Ink optical densities (R, G, B) of pen marks: blue, green, black.
_INKS = ((0.95, 0.55, 0.12), (0.85, 0.22, 0.65), (0.85, 0.85, 0.8))


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng([int(k) & _M32 for k in key])


def _draw_params(rng, group: str) -> dict:
    """One blob's nuclear parameters: a decoy's from its ranges, a lesion's from one band of its group."""
    if group == "decoy":
        return {k: round(float(rng.uniform(lo, hi)), 4) for k, (lo, hi) in BLOB_PARAM_RANGES["decoy"].items()}
    bands = LESION_KIND_BANDS[group]
    u0, u1 = bands[int(rng.integers(len(bands)))]
    return {k: round(float(a + rng.uniform(u0, u1) * (b - a)), 4) for k, (a, b) in BLOB_PARAM_RANGES["lesion"].items()}


def _nuisance(rng, lesion_range: tuple, min_lesions: int) -> dict:
    """Everything about a slide that must not depend on its label.

    Drawn once per (positive, negative) pair of a split, so both classes get
    the same stain, brightness, focus, tissue amount, confounders and blob
    sizes (case-control matching); the lesions of the positive are decoys on
    the negative.
    """
    n_les = max(int(rng.integers(lesion_range[0], lesion_range[1] + 1)), min_lesions)
    les_area = float(rng.uniform(*_LESION_FRACTION)) * rng.dirichlet([3.0] * n_les)
    dec_area = []
    for _ in range(int(rng.integers(_DECOYS[0], _DECOYS[1] + 1))):  # sized like a lesion
        m = int(rng.integers(lesion_range[0], lesion_range[1] + 1))
        dec_area.append(float(rng.uniform(*_LESION_FRACTION)) * float(rng.dirichlet([3.0] * m)[0]))
    h, e = _stain_vectors(rng, 1.0)
    return {
        "tissue_fraction": round(float(rng.uniform(*_TISSUE_FRACTION)), 4),
        "stain_h": round(float(np.exp(rng.uniform(math.log(0.7), math.log(1.35)))), 4),
        "stain_e": round(float(np.exp(rng.uniform(math.log(0.7), math.log(1.35)))), 4),
        "h_vec": [round(float(v), 4) for v in h], "e_vec": [round(float(v), 4) for v in e],
        "brightness": round(float(rng.uniform(0.92, 1.05)), 4),
        "focus_sigma_px": round(float(max(0.0, rng.uniform(-0.3, 1.3))), 3),
        "confounders": {"pen": int(rng.random() < 0.4), "fold": int(rng.random() < 0.4),
                        "blur": int(rng.integers(0, 3)), "stain_patch": int(rng.random() < 0.5),
                        "debris": int(rng.integers(0, 9))},
        "n_lesions": n_les,
        "blob_tissue_fractions": [round(float(a), 5) for a in list(les_area) + dec_area],
    }


# --- texture source ----------------------------------------------------------

_TEXTURE_CACHE: dict = {}
_QUILT_PX = 448  # patch edge of the texture quilt
_QUILT_OVERLAP = 112


@dataclass(eq=False)
class _Texture:
    """A real H&E image resampled to the cohort's pixel size, and where its tissue patches are."""

    path: str
    rgb: np.ndarray
    positions: dict  # 'all' / 'left' / 'right' -> (N, 2) top-left corners (x, y) of tissue patches
    source_mpp: float

    def describe(self) -> dict:
        h, w = self.rgb.shape[:2]
        return {"kind": "real", "source": self.path, "source_mpp": self.source_mpp,
                "lesion_texture": {"lesion_train": f"left half (x < {w // 2} px at the cohort's mpp)",
                                   "lesion_test": f"right half (x >= {w // 2} px)",
                                   "decoy": "whole image", "normal tissue": "whole image"}}


def _load_texture(path, mpp: float) -> _Texture:
    """Read a real slide's level 0 as texture (cached per path and mpp)."""
    import openslide

    key = (str(path), round(mpp, 6))
    if key in _TEXTURE_CACHE:
        return _TEXTURE_CACHE[key]
    try:
        with openslide.OpenSlide(str(path)) as s:
            rgb = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
            src_mpp = float(s.properties.get(openslide.PROPERTY_NAME_MPP_X) or mpp)
    except openslide.OpenSlideError as exc:
        raise ValueError(f"{path}: cannot read the texture source ({exc})") from None
    if abs(src_mpp / mpp - 1) > 0.05:
        f = src_mpp / mpp
        rgb = cv2.resize(rgb, (round(rgb.shape[1] * f), round(rgb.shape[0] * f)), interpolation=cv2.INTER_AREA)
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    tis = ((sat > 30) & (rgb.min(2) < 225)).astype(np.float64)
    ii = np.pad(tis.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    p = _QUILT_PX
    ys, xs = np.mgrid[0:rgb.shape[0] - p:8, 0:rgb.shape[1] - p:8]
    cover = (ii[ys + p, xs + p] - ii[ys, xs + p] - ii[ys + p, xs] + ii[ys, xs]) / (p * p)
    ok = cover >= 0.85
    pos = np.stack([xs[ok], ys[ok]], 1)
    half = rgb.shape[1] // 2
    positions = {"all": pos, "left": pos[pos[:, 0] + p <= half], "right": pos[pos[:, 0] >= half]}
    if min(len(v) for v in positions.values()) < 4:
        raise ValueError(f"{path}: too little tissue for a texture source (need {p} px patches in both halves)")
    tex = _Texture(str(path), rgb, positions, src_mpp)
    _TEXTURE_CACHE[key] = tex
    return tex


def _quilt(rng, tex: _Texture, which: str, w: int, h: int, needed: np.ndarray | None = None) -> np.ndarray:
    """A (h, w, 3) float32 texture: randomly placed, rotated and flipped tissue patches, feathered.

    ``needed`` (bool, any resolution covering the ``w x h`` area): patches
    over none of it stay glass-coloured (they are not drawn).
    """
    p, o = _QUILT_PX, _QUILT_OVERLAP
    step = p - o
    nx, ny = max(1, -(-(w - o) // step)), max(1, -(-(h - o) // step))
    acc = np.zeros((ny * step + o, nx * step + o, 3), np.float32)
    wsum = np.full(acc.shape[:2], 1e-6, np.float32)
    r = np.minimum(1.0, np.minimum(np.arange(p) + 0.5, p - np.arange(p) - 0.5) / o).astype(np.float32)
    win = r[:, None] * r[None, :]
    win3 = np.repeat(win[..., None], 3, 2)
    pos = tex.positions[which]
    for j in range(ny):
        for i in range(nx):
            x, y = pos[rng.integers(len(pos))]  # drawn for every patch: the texture does not depend on `needed`
            k, flip = int(rng.integers(4)), rng.random() < 0.5
            if needed is not None:
                fy, fx = needed.shape[0] / h, needed.shape[1] / w
                sub = needed[int(j * step * fy):int(math.ceil((j * step + p) * fy)),
                             int(i * step * fx):int(math.ceil((i * step + p) * fx))]
                if not sub.any():
                    continue
            patch = np.rot90(tex.rgb[y:y + p, x:x + p], k)
            if flip:
                patch = patch[:, ::-1]
            patch = np.ascontiguousarray(patch, dtype=np.float32)
            patch *= win3
            acc[j * step:j * step + p, i * step:i * step + p] += patch
            wsum[j * step:j * step + p, i * step:i * step + p] += win
    acc /= wsum[..., None]
    return acc[:h, :w]


# --- geometry ------------------------------------------------------------------


def _with_tissue_fraction(scene: SynthScene, target: float) -> SynthScene:
    """The scene with its tissue grown or shrunk (a constant offset of the distance field) to ``target``."""
    from dataclasses import replace

    r = scene.raster
    lo, hi = float(r.min()), float(r.max())
    for _ in range(40):
        c = 0.5 * (lo + hi)
        if (r > c).mean() > target:
            lo = c
        else:
            hi = c
    return replace(scene, raster=(r - np.float32(0.5 * (lo + hi))).astype(np.float32))


def _tissue_area_px(scene: SynthScene) -> float:
    return float((scene.raster > 0).sum()) * (scene.raster_um / scene.render_mpp) ** 2


def _polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _place_blobs(rng, scene: SynthScene, areas_px: Sequence[float]) -> list:
    """Non-overlapping smooth blob outlines (level-0 px) of the given areas, inside the tissue."""
    mpp = scene.render_mpp
    g = scene.raster_um
    placed = []
    th = np.linspace(0, 2 * math.pi, 96, endpoint=False)
    for area in areas_px:
        ok = False
        for _ in range(400):
            amps, ph = _deformed_outline(rng, 4, 0.3)
            ratio = rng.uniform(1.0, 1.6)
            ang = rng.uniform(0, math.pi)
            rr = np.ones_like(th)
            for k, (a_, p_) in enumerate(zip(amps, ph), start=2):
                rr += a_ * np.cos(k * th + p_)
            u, v = math.sqrt(ratio) * rr * np.cos(th), rr * np.sin(th) / math.sqrt(ratio)
            unit = np.stack([math.cos(ang) * u - math.sin(ang) * v, math.sin(ang) * u + math.cos(ang) * v], 1)
            unit *= math.sqrt(area / _polygon_area(unit))  # level-0 px, centred at 0
            ext_um = float(np.hypot(unit[:, 0], unit[:, 1]).max()) * mpp
            cand = np.argwhere(scene.raster > 0.5 * ext_um + 10.0)
            if len(cand) == 0:
                continue
            j, i = cand[rng.integers(len(cand))]
            cx, cy = (i + rng.uniform(-0.5, 0.5)) * g / mpp, (j + rng.uniform(-0.5, 0.5)) * g / mpp
            if any(math.hypot(cx - qx, cy - qy) * mpp < ext_um + qe + 20.0 for qx, qy, qe, _ in placed):
                continue
            poly = unit + (cx, cy)
            if np.min(_tissue_field_points(scene, poly[:, 0] * mpp, poly[:, 1] * mpp)) < 8.0:
                continue
            placed.append((cx, cy, ext_um, np.round(poly, 2)))
            ok = True
            break
        if not ok:
            raise ValueError(f"no room for a blob of {area:.0f} px in the tissue of the slide with seed "
                             f"{scene.seed}: the slides are too small")
    return [p[3] for p in placed]


def _crop_box(pts: np.ndarray, pad: float, w: int, h: int):
    x0 = max(int(math.floor(pts[:, 0].min() - pad)), 0)
    y0 = max(int(math.floor(pts[:, 1].min() - pad)), 0)
    x1 = min(int(math.ceil(pts[:, 0].max() + pad)) + 1, w)
    y1 = min(int(math.ceil(pts[:, 1].max() + pad)) + 1, h)
    return x0, y0, x1, y1


def _soft(mask_u8: np.ndarray, sigma_px: float) -> np.ndarray:
    """A 0/255 mask as float32 0..1, Gaussian-feathered by ``sigma_px`` (wide ones at a lower resolution)."""
    m = mask_u8.astype(np.float32) * (1 / 255.0)
    if sigma_px <= 0.3:
        return m
    f = int(sigma_px // 4)
    if f < 2:
        return cv2.GaussianBlur(m, (0, 0), sigma_px)
    h, w = m.shape
    small = cv2.resize(m, (max(1, w // f), max(1, h // f)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma_px / f)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _random_tissue_point(rng, scene: SynthScene, margin_um: float = 30.0) -> tuple:
    cand = np.argwhere(scene.raster > margin_um)
    if len(cand) == 0:
        cand = np.argwhere(scene.raster > 0)
    j, i = cand[rng.integers(len(cand))]
    return i * scene.raster_um / scene.render_mpp, j * scene.raster_um / scene.render_mpp


# --- blobs: lesions and decoys --------------------------------------------------


def _blob_nuclei(rng, mask: np.ndarray, p: dict, mpp: float):
    """Nuclei of a blob: haematoxylin OD map and nucleolus map (float32, like ``mask``)."""
    h, w = mask.shape
    sp = 1.0 / math.sqrt(p["density"] / 1000.0) / mpp
    gy, gx = np.meshgrid(np.arange(0.5 * sp, h, sp), np.arange(0.5 * sp, w, sp), indexing="ij")
    x = np.round(gx.ravel() + rng.uniform(-0.45, 0.45, gx.size) * sp).astype(int)
    y = np.round(gy.ravel() + rng.uniform(-0.45, 0.45, gy.size) * sp).astype(int)
    keep = (x >= 0) & (y >= 0) & (x < w) & (y < h) & (rng.random(x.size) > 0.08)
    x, y = x[keep], y[keep]
    x, y = x[mask[y, x] > 0], y[mask[y, x] > 0]
    n = x.size
    pl = p["pleomorphism"]
    a = p["radius_um"] / mpp * np.exp(rng.normal(0, pl, n))
    b = a * np.clip(p["elongation"] * np.exp(rng.normal(0, 0.7 * pl, n)), 0.3, 1.0)
    ang = rng.uniform(0, 180, n)
    dark = p["darkness"] * np.exp(rng.normal(0, 0.5 * pl, n))
    nucleolus = rng.random(n) < p["nucleoli"]
    nr = rng.uniform(0.5, 0.9, n) / mpp
    off = rng.uniform(-0.3, 0.3, (n, 2)) * b[:, None]
    shift, S = 4, 16
    scale = 255.0 / 2.5
    canvas = np.zeros((h, w), np.uint8)
    nuc2 = np.zeros((h, w), np.uint8)
    rim = max(1, int(round(0.5 / mpp)))
    hollow = 1.0 - 0.55 * p["chromatin"]
    for i in range(n):
        c = (int(x[i] * S), int(y[i] * S))
        axes = (int(max(a[i], 0.6) * S), int(max(b[i], 0.6) * S))
        col = float(np.clip(dark[i] * scale, 1, 255))
        cv2.ellipse(canvas, c, axes, float(ang[i]), 0, 360, col * hollow, -1, cv2.LINE_AA, shift)
        cv2.ellipse(canvas, c, axes, float(ang[i]), 0, 360, col, rim, cv2.LINE_AA, shift)
        if nucleolus[i]:
            cv2.circle(nuc2, (int((x[i] + off[i, 0]) * S), int((y[i] + off[i, 1]) * S)), int(nr[i] * S), 230,
                       -1, cv2.LINE_AA, shift)
    od = canvas.astype(np.float32) * (1.0 / scale)
    grain = cv2.GaussianBlur(rng.standard_normal((h, w), dtype=np.float32), (0, 0), 0.45 / mpp)
    grain *= 1.0 / (float(grain.std()) + 1e-6)
    od *= 1.0 + 0.8 * p["chromatin"] * np.clip(grain, -1.5, 1.5)
    od = cv2.GaussianBlur(od, (0, 0), 0.35)
    return od, nuc2.astype(np.float32) * (0.9 / 255.0)


def _remove_nuclei(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """Tissue with its nuclei (pixels darker than their surroundings) filled in from the nearby stroma."""
    lum = rgb.mean(2)
    dark = (lum < 0.9 * cv2.GaussianBlur(lum, (0, 0), 4.0 / mpp)).astype(np.uint8)
    k = 2 * int(round(0.8 / mpp)) + 1
    keep = 1.0 - cv2.dilate(dark, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))).astype(np.float32)
    sig = 2.5 / mpp
    fill = cv2.GaussianBlur(rgb * keep[..., None], (0, 0), sig)
    fill /= np.maximum(cv2.GaussianBlur(keep, (0, 0), sig), 1e-3)[..., None]
    return rgb * keep[..., None] + fill * (1.0 - keep[..., None])


def _composite_blob(img: np.ndarray, src: np.ndarray, box: tuple, poly: np.ndarray, p: dict, rng,
                    mpp: float) -> tuple:
    """Replace the tissue under ``poly`` (in place) by a blob of nuclei with parameters ``p``.

    ``src`` is the blob's background over ``box`` (level-0 ``x0, y0, x1, y1``),
    used with its own nuclei removed (:func:`_remove_nuclei`), lightened or darkened
    per channel so that the blob's mean colour equals the mean colour of the
    tissue it replaces: the blob differs from its surroundings by texture, not
    by colour or darkness.  Returns the density scales of the background and the nuclei.
    """
    x0, y0, x1, y1 = box
    crop = img[y0:y1, x0:x1]
    mask = np.zeros(crop.shape[:2], np.uint8)
    _fill_polys(mask, [poly], x0, y0, 1.0, 255, cv2.LINE_AA)
    inside = mask > 127
    if not inside.any():
        return
    bg = _remove_nuclei(np.ascontiguousarray(src, np.float32), mpp)
    glass = np.array(_GLASS_RGB, np.float32)
    bg_od = np.maximum(-np.log(np.maximum(bg, 1.0) / glass), 0.0)
    hmap, nucleoli = _blob_nuclei(rng, mask, p, mpp)
    nuc_od = hmap[..., None] * _H_VEC.astype(np.float32) + nucleoli[..., None] * (
        0.7 * _H_VEC + 0.3 * _E_VEC).astype(np.float32)
    target = crop[inside].mean(0)
    sub = np.flatnonzero(inside.ravel())[::3]
    b_od, n_od = bg_od.reshape(-1, 3)[sub], nuc_od.reshape(-1, 3)[sub]

    def solve(f, lo, hi):  # the x in [lo, hi] where the mean brightness f(x) (decreasing) meets the target
        for _ in range(22):
            x = 0.5 * (lo + hi)
            lo, hi = (x, hi) if float(f(x).mean(0).sum()) > float(target.sum()) else (lo, x)
        return 0.5 * (lo + hi)

    # brightness: first the background's density, then (pale tissue) the nuclei's
    s = solve(lambda x: glass * np.exp(-(x * b_od + n_od)), 0.4, 2.0)
    t = 1.0 if s > 0.401 else solve(lambda x: glass * np.exp(-(s * b_od + x * n_od)), 0.2, 1.0)
    blob = glass * np.exp(-(s * bg_od + t * nuc_od))
    blob *= target / blob[inside].mean(0)  # ... then the colour difference that remains
    alpha = _soft(mask, 1.0 / mpp)[..., None]
    crop += alpha * (blob - crop)
    return s, t


# --- confounders ------------------------------------------------------------------


def _stain_matrix(h_vec, e_vec, k_h: float, k_e: float, h_to=None, e_to=None) -> np.ndarray:
    """3x3 ``A`` with ``od @ A``: unmix with (h, e, residual), scale H and E, remix with (h_to, e_to)."""
    h, e = np.asarray(h_vec, float), np.asarray(e_vec, float)
    r = np.cross(h, e)
    r /= np.linalg.norm(r)
    m = np.stack([h, e, r])
    h2 = np.asarray(h if h_to is None else h_to, float)
    e2 = np.asarray(e if e_to is None else e_to, float)
    m2 = np.stack([h2, e2, r])
    return np.linalg.inv(m) @ np.diag([k_h, k_e, 1.0]) @ m2


def _apply_od_matrix(od: np.ndarray, a: np.ndarray) -> np.ndarray:
    return cv2.transform(od, a.T.astype(np.float32))


def _pen(rng, logt, scene, mpp) -> dict:
    h, w = logt.shape[:2]
    n = int(rng.uniform(0.25, 0.6) * max(w, h) / (8.0 / mpp))
    heading = rng.uniform(0, 2 * math.pi) + np.cumsum(rng.normal(0, 0.06, n))
    pts = np.array([rng.uniform(0, w), rng.uniform(0, h)]) + np.cumsum(
        np.stack([np.cos(heading), np.sin(heading)], 1) * (8.0 / mpp), 0)
    thick = rng.uniform(15, 35) / mpp
    ink = np.array(_INKS[int(rng.integers(len(_INKS)))], np.float32) * rng.uniform(0.5, 1.0)
    x0, y0, x1, y1 = _crop_box(pts, thick, w, h)
    if x1 <= x0 or y1 <= y0:
        return {"kind": "pen", "visible": False}
    m = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.polylines(m, [np.round((pts - (x0, y0)) * 16).astype(np.int32)], False, 255, int(thick),
                  cv2.LINE_AA, 4)
    m = _soft(m, 1.5)
    m *= 1.0 + 0.15 * cv2.resize(rng.standard_normal((8, 8), dtype=np.float32), (x1 - x0, y1 - y0))
    logt[y0:y1, x0:x1] -= m[..., None] * ink
    return {"kind": "pen", "bbox_level0_px": [x0, y0, x1, y1], "ink_od": [round(float(v), 3) for v in ink]}


def _fold(rng, logt, scene, mpp) -> dict:
    h, w = logt.shape[:2]
    cx, cy = _random_tissue_point(rng, scene)
    ang, L = rng.uniform(0, math.pi), rng.uniform(150, 600) / mpp
    bend = rng.normal(0, 0.15)
    t = np.linspace(-0.5, 0.5, 9)[:, None]
    d = np.array([math.cos(ang), math.sin(ang)])
    nrm = np.array([-d[1], d[0]])
    pts = np.array([cx, cy]) + t * L * d + (t ** 2 - 0.25) * L * bend * nrm
    wid = rng.uniform(15, 45) / mpp
    x0, y0, x1, y1 = _crop_box(pts, wid, w, h)
    m = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.polylines(m, [np.round((pts - (x0, y0)) * 16).astype(np.int32)], False, 255, int(wid), cv2.LINE_AA, 4)
    m = _soft(m, 0.2 * wid)
    logt[y0:y1, x0:x1] *= 1.0 + 0.85 * m[..., None]  # two layers of tissue: twice the density
    return {"kind": "fold", "bbox_level0_px": [x0, y0, x1, y1]}


def _ellipse_mask(rng, scene, w, h, r_um: tuple, mpp: float, soft: float):
    cx, cy = _random_tissue_point(rng, scene)
    ra, rb = rng.uniform(*r_um) / mpp, rng.uniform(*r_um) / mpp
    pad = max(ra, rb) * (1 + 2 * soft)
    x0, y0, x1, y1 = _crop_box(np.array([[cx, cy]]), pad, w, h)
    m = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.ellipse(m, (int(cx - x0), int(cy - y0)), (int(ra), int(rb)), float(rng.uniform(0, 180)), 0, 360, 255, -1)
    return (x0, y0, x1, y1), _soft(m, soft * min(ra, rb))


def _stain_patch(rng, logt, scene, mpp, h_vec, e_vec) -> dict:
    h, w = logt.shape[:2]
    (x0, y0, x1, y1), m = _ellipse_mask(rng, scene, w, h, (150, 450), mpp, 0.3)
    kh, ke = float(np.exp(rng.uniform(-0.45, 0.45))), float(np.exp(rng.uniform(-0.45, 0.45)))
    crop = logt[y0:y1, x0:x1]
    shifted = _apply_od_matrix(np.ascontiguousarray(crop), _stain_matrix(h_vec, e_vec, kh, ke))
    crop += m[..., None] * (shifted - crop)
    return {"kind": "stain_patch", "bbox_level0_px": [x0, y0, x1, y1], "stain_h": round(kh, 3),
            "stain_e": round(ke, 3)}


def _debris(rng, logt, scene, mpp) -> dict:
    h, w = logt.shape[:2]
    if rng.random() < 0.5:
        cx, cy = _random_tissue_point(rng, scene, 0.0)
    else:
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    r = rng.uniform(3, 18) / mpp
    amps, ph = _deformed_outline(rng, 5, 0.6)
    th = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    rr = r * (1 + sum(a_ * np.cos(k * th + p_) for k, (a_, p_) in enumerate(zip(amps, ph), start=2)))
    pts = np.stack([cx + rr * np.cos(th), cy + rr * np.sin(th)], 1)
    x0, y0, x1, y1 = _crop_box(pts, 3, w, h)
    if x1 <= x0 or y1 <= y0:
        return {"kind": "debris", "visible": False}
    m = np.zeros((y1 - y0, x1 - x0), np.uint8)
    _fill_polys(m, [pts], x0, y0, 1.0, 255, cv2.LINE_AA)
    col = (np.array([0.55, 0.8, 1.0]) if rng.random() < 0.5 else np.ones(3)) * rng.uniform(0.7, 1.8)
    logt[y0:y1, x0:x1] -= _soft(m, 0.8)[..., None] * col.astype(np.float32)
    return {"kind": "debris", "bbox_level0_px": [x0, y0, x1, y1]}


def _blur_patch(rng, img, scene, mpp) -> dict:
    h, w = img.shape[:2]
    (x0, y0, x1, y1), m = _ellipse_mask(rng, scene, w, h, (100, 350), mpp, 0.25)
    sig = float(rng.uniform(1.5, 4.0))
    crop = img[y0:y1, x0:x1]
    crop += m[..., None] * (cv2.GaussianBlur(crop, (0, 0), sig) - crop)
    return {"kind": "blur", "bbox_level0_px": [x0, y0, x1, y1], "sigma_px": round(sig, 2)}


# --- one slide ----------------------------------------------------------------------


def _tissue_alpha(scene: SynthScene) -> np.ndarray:
    """Level-0 tissue coverage (float32 0..1) of a scene, from its distance field at downsample 4."""
    mpp = scene.render_mpp
    w4, h4 = -(-scene.width_px // 4), -(-scene.height_px // 4)
    xs = (np.arange(w4) + 0.5) * 4 * mpp
    ys = (np.arange(h4) + 0.5) * 4 * mpp
    f = _tissue_field_grid(scene, xs, ys, 4 * mpp)
    f = cv2.resize(f, (w4 * 4, h4 * 4), interpolation=cv2.INTER_LINEAR)[:scene.height_px, :scene.width_px]
    return np.clip(f * (1.0 / mpp) + 0.5, 0.0, 1.0)


def _render_realistic(slide: dict, width_px: int, height_px: int, mpp: float, texture: _Texture | None):
    """Render one realistic slide at level 0: (uint8 RGB, blobs, confounders, tissue area px)."""
    nz = slide["nuisance"]
    rng = _rng(slide["seed"], 0x4EA1)
    scene = make_scene(width_px, height_px, mpp=mpp, seed=slide["seed"], tissue="normal")
    scene = _with_tissue_fraction(scene, nz["tissue_fraction"])
    glass = np.array(_GLASS_RGB, np.float32)
    if texture is None:
        img = render_region(scene, downsample=1).astype(np.float32)
    else:
        alpha = _tissue_alpha(scene)[..., None]
        img = _quilt(rng, texture, "all", width_px, height_px, needed=scene.raster > -40.0)
        img -= glass
        img *= alpha
        img += glass
        del alpha
    tissue_px = _tissue_area_px(scene)
    # blobs: lesions (positives only) and decoys, all colour-matched to the tissue they replace
    polys = _place_blobs(rng, scene, [a * tissue_px for a in nz["blob_tissue_fractions"]])
    blobs = []
    for j, poly in enumerate(polys):
        lesion = slide["label"] == 1 and j < nz["n_lesions"]
        group = slide["lesion_group"] if lesion else "decoy"
        p = _draw_params(rng, group)
        box = _crop_box(poly, 6.0 / mpp, width_px, height_px)
        if texture is None:  # the blob's background: the tissue it replaces
            src = img[box[1]:box[3], box[0]:box[2]].copy()
        else:  # ... or tissue from the group's part of the texture source
            which = {"decoy": "all", "lesion_train": "left", "lesion_test": "right"}[group]
            src = _quilt(rng, texture, which, box[2] - box[0], box[3] - box[1])
        bscale, nscale = _composite_blob(img, src, box, poly, p, rng, mpp)
        blobs.append({"kind": "lesion" if lesion else "decoy", "group": group, "params": p,
                      "background_density_scale": round(bscale, 3), "nuclear_density_scale": round(nscale, 3),
                      "area_px": round(_polygon_area(poly), 1), "polygon_level0_px": poly.tolist()})
    # log transmittance (minus the optical density): per-slide stain, folds, stain patches, debris, pen
    np.maximum(img, 1.0, out=img)
    cv2.log(img, img)
    a = _stain_matrix(_H_VEC, _E_VEC, nz["stain_h"], nz["stain_e"], nz["h_vec"], nz["e_vec"]).T
    affine = np.concatenate([a, -(a @ np.log(glass))[:, None]], 1).astype(np.float32)
    logt = cv2.transform(img, affine)  # = stain(log(img / glass)), linear in the optical density
    del img
    conf = []
    cc = nz["confounders"]
    for _ in range(cc["fold"]):
        conf.append(_fold(rng, logt, scene, mpp))
    for _ in range(cc["stain_patch"]):
        conf.append(_stain_patch(rng, logt, scene, mpp, nz["h_vec"], nz["e_vec"]))
    for _ in range(cc["debris"]):
        conf.append(_debris(rng, logt, scene, mpp))
    for _ in range(cc["pen"]):
        conf.append(_pen(rng, logt, scene, mpp))
    logt += np.log(glass * np.float32(nz["brightness"]))
    img = cv2.exp(logt, logt)
    # optics: focus, local blur
    if nz["focus_sigma_px"] >= 0.3:
        cv2.GaussianBlur(img, (0, 0), nz["focus_sigma_px"], dst=img)
    for _ in range(cc["blur"]):
        conf.append(_blur_patch(rng, img, scene, mpp))
    rgb = cv2.convertScaleAbs(img)  # rounds and saturates to uint8
    return rgb, blobs, conf, tissue_px


def _write_pyramid(path: Path, rgb: np.ndarray, mpp: float | None, tile_px: int, levels, jpeg_quality: int,
                   photometric: str) -> tuple:
    """Write a level-0 image as a pyramidal tiled JPEG TIFF (levels area-downsampled); (downsamples, dims)."""
    h, w = rgb.shape[:2]
    ds = [int(v) for v in (levels if levels is not None else default_downsamples(w, h))]
    if not ds or ds[0] != 1 or any(b <= a for a, b in zip(ds, ds[1:])):
        raise ValueError("levels must start with 1 and increase strictly")
    tw_kw, enc_kw = _jpeg_args(photometric, int(jpeg_quality))
    glass = np.round(np.array(_GLASS_RGB)).astype(np.uint8)

    def tiles(arr):
        lh, lw = arr.shape[:2]
        for y in range(0, lh, tile_px):
            for x in range(0, lw, tile_px):
                t = arr[y:y + tile_px, x:x + tile_px]
                if t.shape[:2] != (tile_px, tile_px):
                    full = np.empty((tile_px, tile_px, 3), np.uint8)
                    full[:] = glass
                    full[:t.shape[0], :t.shape[1]] = t
                    t = full
                yield bytes(imagecodecs.jpeg8_encode(np.ascontiguousarray(t), **enc_kw))

    dims = [(math.ceil(w / d), math.ceil(h / d)) for d in ds]
    tmp = path.with_name(path.name + ".partial")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=w * h * 3 > 2 ** 31) as tw:
            arr = rgb
            for li, (d, (lw, lh)) in enumerate(zip(ds, dims)):
                if li:
                    arr = cv2.resize(arr, (lw, lh), interpolation=cv2.INTER_AREA)
                kw = dict(tw_kw)
                if mpp is not None:
                    px_per_cm = 1e4 / (mpp * d)
                    kw.update(resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
                tw.write(tiles(arr), shape=(lh, lw, 3), dtype=np.uint8, tile=(tile_px, tile_px),
                         compression="jpeg", subfiletype=0 if li == 0 else 1, metadata=None,
                         software="wsi-pipeline synth", **kw)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return ds, dims


def _region_annotation(rng, lesions: list, decoys: list, width_px: int, height_px: int) -> dict:
    """QuPath-style GeoJSON of a partly annotated slide: ``Region*`` rectangles where the annotation is
    complete and the ``Tumor`` polygons clipped to them.

    One rectangle cuts through the first lesion (its polygon is clipped), one
    holds a decoy (annotated normal tissue); the other lesions stay outside
    every rectangle (unannotated tumour).
    """
    import shapely
    from shapely.geometry import Polygon, box

    les = [Polygon(p) for p in lesions]
    others = shapely.unary_union(les[1:]) if len(les) > 1 else Polygon()
    rects = []
    x0, y0, x1, y1 = les[0].bounds
    bw, bh = x1 - x0, y1 - y0
    m = 0.4 * max(bw, bh)
    cut = rng.uniform(0.55, 0.8)
    side = int(rng.integers(4))  # which side of the lesion the rectangle cuts through
    r = [x0 - m, y0 - m, x1 + m, y1 + m]
    r[side] = (x0 + cut * bw, y0 + cut * bh, x1 - cut * bw, y1 - cut * bh)[side]
    rect = box(*r)
    while rect.intersects(others) and m > 1:
        m *= 0.5
        r = [x0 - m, y0 - m, x1 + m, y1 + m]
        r[side] = (x0 + cut * bw, y0 + cut * bh, x1 - cut * bw, y1 - cut * bh)[side]
        rect = box(*r)
    rects.append(rect)
    if decoys:
        d = Polygon(decoys[0])
        dx0, dy0, dx1, dy1 = d.bounds
        md = 0.3 * max(dx1 - dx0, dy1 - dy0)
        drect = box(dx0 - md, dy0 - md, dx1 + md, dy1 + md)
        if not drect.intersects(shapely.unary_union(les)):
            rects.append(drect)
    frame = box(0, 0, width_px, height_px)
    rects = [rc.intersection(frame) for rc in rects]
    feats = []
    for i, rc in enumerate(rects):
        ring = [[round(float(x), 2), round(float(y), 2)] for x, y in rc.exterior.coords]
        feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                      "properties": {"objectType": "annotation", "name": f"Region {i + 1}",
                                     "classification": {"name": "Region*", "color": [0, 0, 180]}}})
    area = shapely.unary_union(rects)
    for lp in les:
        part = lp.intersection(area)
        for g in getattr(part, "geoms", [part]):
            if g.geom_type != "Polygon" or g.is_empty or g.area < 1.0:
                continue
            feats.append(lesion_geojson([np.asarray(g.exterior.coords)[:-1]])["features"][0])
    return {"type": "FeatureCollection", "features": feats}


def _realistic_slide(job) -> dict:
    (slide, out, ann_dir, reg_dir, width_px, height_px, mpp, tile_px, levels, jpeg_quality, photometric,
     mask_downsample, texture) = job
    sid = slide["slide_id"]
    path = out / f"{sid}.tif"
    rgb, blobs, conf, tissue_px = _render_realistic(slide, width_px, height_px, mpp, texture)
    ds, dims = _write_pyramid(path, rgb, mpp, tile_px, levels, jpeg_quality, photometric)
    del rgb
    lesions = [np.asarray(b["polygon_level0_px"]) for b in blobs if b["kind"] == "lesion"]
    decoys = [np.asarray(b["polygon_level0_px"]) for b in blobs if b["kind"] == "decoy"]
    gj, mp, mj = _write_truth(ann_dir, path, lesions, width_px, height_px, mpp, mask_downsample,
                              geojson=bool(lesions))
    region = None
    if slide["pixel_annotated"]:
        reg_dir.mkdir(parents=True, exist_ok=True)
        region = reg_dir / f"{sid}.geojson"
        gjr = _region_annotation(_rng(slide["seed"], 0x4E610), lesions, decoys, width_px, height_px)
        region.write_text(json.dumps(gjr))
    les_px = sum(b["area_px"] for b in blobs if b["kind"] == "lesion")
    spec = SlideSpec(
        path=str(path), width_px=int(width_px), height_px=int(height_px), mpp=mpp, tile_px=int(tile_px),
        downsamples=ds, level_dimensions=[list(x) for x in dims], jpeg_quality=int(jpeg_quality),
        photometric=photometric, seed=int(slide["seed"]), tissue="normal",
        tissue_fraction=round(tissue_px / (width_px * height_px), 4), n_lesions=len(lesions),
        lesions_level0_px=[p.tolist() for p in lesions], geojson_path=str(gj) if gj else None,
        mask_path=str(mp), mask_json_path=str(mj), mask_downsample=int(mask_downsample),
        file_bytes=path.stat().st_size,
    )
    return {
        "slide_id": sid, "label": slide["label"], "split": slide["split"], "path": str(path),
        "pixel_annotated": slide["pixel_annotated"], "geojson": spec.geojson_path, "mask": str(mp),
        "mask_downsample": int(mask_downsample), "n_lesions": len(lesions), "seed": slide["seed"],
        "region_geojson": str(region) if region else None, "lesion_group": slide["lesion_group"],
        "lesion_fraction_of_tissue": round(les_px / tissue_px, 5), "nuisance": slide["nuisance"],
        "blobs": blobs, "confounders": conf, "spec": spec.to_dict(),
    }


def _realistic_plan(labels, splits, annotated, seed: int, lesion_range: tuple, test_split: str) -> list:
    """Per-slide seeds, lesion groups and label-independent nuisances (matched pos/neg pairs per split)."""
    n = len(labels)
    key = _subkey(seed, "realistic")
    plan = [None] * n
    for sp in dict.fromkeys(splits):
        pos = [i for i in range(n) if splits[i] == sp and labels[i] == 1]
        neg = [i for i in range(n) if splits[i] == sp and labels[i] == 0]
        for k in range(max(len(pos), len(neg))):
            members = [lst[k] for lst in (pos, neg) if k < len(lst)]
            rng = _rng(key, zlib.crc32(sp.encode()), k)
            nz = _nuisance(rng, lesion_range, 2 if any(i in annotated for i in members) else 1)
            for i in members:
                plan[i] = nz
    return [{"slide_id": f"slide_{i:03d}", "label": int(labels[i]), "split": splits[i],
             "pixel_annotated": i in annotated, "seed": int(_hash(key, i)), "nuisance": plan[i],
             "lesion_group": "lesion_test" if splits[i] == test_split else "lesion_train"}
            for i in range(n)]


def _resolve_texture(texture_source, mpp: float):
    """(``_Texture`` or None, description for cohort.json)."""
    if texture_source == "auto":
        texture_source = DEFAULT_TEXTURE_SOURCE if DEFAULT_TEXTURE_SOURCE.is_file() else None
    if texture_source is None or texture_source == "procedural":
        return None, {"kind": "procedural",
                      "lesion_texture": "procedural tissue; test lesions differ by their parameter ranges"}
    p = Path(texture_source)
    if not p.is_file():
        raise ValueError(f"texture source {p} does not exist")
    tex = _load_texture(p, mpp)
    return tex, tex.describe()


# ----------------------------------------------------------------------------
# patch sets (patch / ROI classification)
# ----------------------------------------------------------------------------

#: Classes of :func:`make_patch_set`, in order; ``n_classes`` takes the first n.
PATCH_CLASSES = ("normal", "stroma", "tumour", "lymphocytes", "adipose")
PATCH_SPLITS = ("train", "val", "test")


def _patch_stains(rng, px: int):
    """Per-image haematoxylin and eosin amounts (optical density per unit stain) and a soft
    eosin background: stain strength and brightness vary the same way in every class."""
    yy, xx = np.mgrid[0:px, 0:px].astype(np.float32) / px
    ph = rng.uniform(0, 2 * np.pi, 2)
    bg = 0.35 + 0.08 * np.sin(2 * np.pi * rng.uniform(0.5, 1.5) * xx + ph[0]) * np.cos(2 * np.pi * yy + ph[1])
    return np.zeros((px, px), np.float32), bg.astype(np.float32)


def _patch_nuclei(rng, h: np.ndarray, density: float, r_px: tuple, dark: tuple, elong: tuple = (1.0, 1.4),
                 angle: float | None = None) -> None:
    px = h.shape[0]
    n = rng.poisson(density * px * px)
    for _ in range(n):
        cx, cy = rng.uniform(0, px, 2)
        r = rng.uniform(*r_px)
        e = rng.uniform(*elong)
        a = rng.uniform(0, 180) if angle is None else angle + rng.normal(0, 8)
        layer = np.zeros_like(h)
        cv2.ellipse(layer, (int(cx * 16), int(cy * 16)), (max(1, int(r * e * 16)), max(1, int(r / e * 16))),
                    a, 0, 360, float(rng.uniform(*dark)), -1, cv2.LINE_AA, 4)
        np.maximum(h, layer, out=h)


def _render_patch(rng, cls: str, px: int) -> np.ndarray:
    """One RGB uint8 patch of class ``cls``: classes differ in nuclear size, density and shape,
    fibres and fat vacuoles (texture), not in mean stain colour, which varies per image."""
    s = px / 64.0  # feature sizes are given for a 64 px patch
    h, e = _patch_stains(rng, px)
    if cls == "normal":
        _patch_nuclei(rng, h, 0.0025 / s**2, (1.8 * s, 2.6 * s), (0.9, 1.2))
    elif cls == "tumour":
        _patch_nuclei(rng, h, 0.0065 / s**2, (3.0 * s, 5.0 * s), (0.7, 1.3), elong=(1.0, 1.8))
        e = e * 1.1
    elif cls == "lymphocytes":
        _patch_nuclei(rng, h, 0.02 / s**2, (1.3 * s, 1.9 * s), (1.3, 1.7))
    elif cls == "stroma":
        ang = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:px, 0:px].astype(np.float32)
        u = xx * np.cos(ang) + yy * np.sin(ang)
        v = -xx * np.sin(ang) + yy * np.cos(ang)
        period = rng.uniform(4.0, 6.5) * s
        wave = np.sin(2 * np.pi * (u + 2.0 * s * np.sin(2 * np.pi * v / (px * 0.7))) / period)
        e = e * (0.55 + 0.75 * (wave > 0.2))
        _patch_nuclei(rng, h, 0.0009 / s**2, (2.0 * s, 2.6 * s), (0.9, 1.2), elong=(2.2, 3.0), angle=np.degrees(ang) + 90)
    elif cls == "adipose":
        e = e * 0.9
        holes = np.zeros_like(e)
        n = int(rng.integers(4, 8))
        for _ in range(n):
            cx, cy = rng.uniform(0, px, 2)
            r = rng.uniform(9, 15) * s
            cv2.circle(holes, (int(cx), int(cy)), int(r), 1.0, -1, cv2.LINE_AA)
        edge = cv2.morphologyEx(holes, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
        e = e * (1 - 0.92 * holes) + 0.4 * edge
        _patch_nuclei(rng, h, 0.0006 / s**2, (1.8 * s, 2.4 * s), (0.9, 1.1))
    else:
        raise ValueError(f"unknown patch class {cls!r}; known: {list(PATCH_CLASSES)}")
    h = cv2.GaussianBlur(h, (0, 0), 0.6 * s)
    k_h, k_e = rng.uniform(0.75, 1.25, 2)
    od = (k_h * h)[..., None] * _H_VEC + (k_e * e)[..., None] * _E_VEC
    od = od + rng.normal(0, 0.03, od.shape)
    rgb = 255.0 * np.exp(-od) * rng.uniform(0.92, 1.0)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def make_patch_set(out_dir, *, n_classes: int = 4, per_class: Sequence[int] = (40, 12, 12), size_px: int = 64,
                   seed: int = 0) -> dict:
    """Write a small multi-class patch set as an ImageFolder tree ``OUT/{train,val,test}/<class>/*.png``.

    Classes (the first ``n_classes`` of :data:`PATCH_CLASSES`) differ by texture: nuclear
    size, density and shape, fibres, fat vacuoles; stain strength and brightness are drawn
    per image in the same ranges for every class. ``per_class`` = images per class in
    train, val and test. Each image depends only on (seed, split, class, index). Also
    writes ``OUT/patch_set.json`` (classes, counts, size, seed). Returns that record.
    """
    from wsi.atomic import atomic_write_bytes, atomic_write_json

    if not 2 <= n_classes <= len(PATCH_CLASSES):
        raise ValueError(f"n_classes must be in [2, {len(PATCH_CLASSES)}], got {n_classes}")
    if len(per_class) != 3 or min(per_class) < 0 or per_class[0] < 1:
        raise ValueError(f"per_class must be (train >= 1, val >= 0, test >= 0) images per class, got {per_class}")
    if size_px < 16:
        raise ValueError(f"size_px must be >= 16, got {size_px}")
    out = Path(out_dir)
    classes = list(PATCH_CLASSES[:n_classes])
    for si, split in enumerate(PATCH_SPLITS):
        for ci, cls in enumerate(classes):
            folder = out / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class[si]):
                rng = np.random.default_rng([int(seed), si, ci, i])
                rgb = _render_patch(rng, cls, size_px)
                ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
                atomic_write_bytes(folder / f"{cls}_{i:04d}.png", buf.tobytes(), durable=False)
    info = {"format": "wsi-pipeline.patch-set", "classes": classes, "size_px": int(size_px), "seed": int(seed),
            "per_class": dict(zip(PATCH_SPLITS, map(int, per_class)))}
    atomic_write_json(out / "patch_set.json", info)
    return info
