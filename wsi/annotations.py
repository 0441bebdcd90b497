"""Pixel-level annotations: QuPath GeoJSON or mask images -> per-tile targets.

Coordinate conventions
----------------------
All geometry lives in **level-0 pixel coordinates** of the slide: ``x`` grows to
the right, ``y`` grows downwards, and level-0 pixel ``(col, row)`` covers the
square ``[col, col + 1) x [row, row + 1)``.  This is what QuPath writes when it
exports annotations as GeoJSON.

A tile is described, as in the Zarr tile store, by ``level0_xy`` (the level-0
``(x, y)`` of its top-left corner), ``tile_px`` (its side in tile pixels) and
``downsample`` (level-0 pixels per tile pixel), so it covers the level-0 box::

    [x, x + tile_px * downsample) x [y, y + tile_px * downsample)

A target of ``out_px x out_px`` pixels for that tile uses the pixel size
``d = tile_px * downsample / out_px`` (level-0 pixels).  Output pixel
``(i, j)`` (row ``i``, column ``j``) covers the level-0 box
``[x + j*d, x + (j+1)*d) x [y + i*d, y + (i+1)*d)`` and takes the value of the
region at its **centre** ``(x + (j + 0.5)*d, y + (i + 0.5)*d)``.

Centres that fall exactly on a polygon edge follow the half-open rule
``left/top inclusive, right/bottom exclusive``: an axis-aligned rectangle
``[x0, x1) x [y0, y1)`` (level 0) sets exactly the pixels whose centres satisfy
``x0 <= cx < x1`` and ``y0 <= cy < y1``, so two rectangles sharing an edge
never both claim, nor both miss, a pixel.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import shapely
from shapely.geometry import shape as _shape_from_geojson

__all__ = [
    "AnnotationError",
    "Annotations",
    "load_geojson",
    "rasterize_tile",
    "rasterize_tile_labels",
    "rasterize_tiles",
    "rasterize_mask",
    "tiles_touching",
    "positive_fraction",
]

log = logging.getLogger(__name__)

_POLYGONAL = ("Polygon", "MultiPolygon")


class AnnotationError(ValueError):
    """An annotation file cannot be used as written (bad geometry, wrong
    coordinate frame, no usable features...)."""


# --------------------------------------------------------------------------
# Annotations container
# --------------------------------------------------------------------------


def _polygon_parts(geom) -> np.ndarray:
    """Polygon parts (object array of shapely Polygons) of a polygonal geometry."""
    if geom is None or shapely.is_empty(geom):
        return np.empty(0, dtype=object)
    parts = shapely.get_parts(geom)
    return np.asarray([p for p in parts if p.geom_type == "Polygon" and not p.is_empty], dtype=object)


def _ring_edges(parts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All ring edges of ``parts`` as an ``(E, 4)`` float64 array
    ``(x0, y0, x1, y1)`` plus ``offsets`` (len(parts) + 1) so that the edges of
    part ``k`` are ``edges[offsets[k]:offsets[k + 1]]``."""
    if len(parts) == 0:
        return np.empty((0, 4)), np.zeros(1, dtype=np.int64)
    edges_per_part = []
    for poly in parts:
        rings = shapely.get_rings(poly)
        xy, ring_id = shapely.get_coordinates(rings, return_index=True)
        same = ring_id[1:] == ring_id[:-1]
        edges_per_part.append(np.concatenate([xy[:-1][same], xy[1:][same]], axis=1))
    counts = np.array([len(e) for e in edges_per_part], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return np.concatenate(edges_per_part, axis=0).astype(np.float64), offsets


@dataclass(frozen=True, eq=False)
class Annotations:
    """Positive (and optionally known-negative) regions of one slide.

    Parameters
    ----------
    positive : shapely geometry
        Union of all positive regions, level-0 pixel coordinates.  Polygonal
        (Polygon / MultiPolygon) or empty.
    negative : shapely geometry, optional
        Union of the regions annotated as known-negative (benign), level-0
        pixel coordinates.  Where it overlaps ``positive``, positive wins.
    source : str
        Where the annotations came from (file name), used in messages.
    class_counts : mapping of str to int
        Number of features per classification name found in the source
        (``None`` key for unclassified features), for diagnostics.

    Notes
    -----
    Build it with :func:`load_geojson` or directly from shapely geometries.
    Spatial indexes (``shapely.STRtree``) over the polygon parts are built at
    construction.
    """

    positive: Any
    negative: Any = None
    source: str = "<annotations>"
    class_counts: Mapping[Any, int] = field(default_factory=dict)

    def __post_init__(self):
        pos = shapely.union_all(np.asarray(_polygon_parts(self.positive), dtype=object)) \
            if self.positive is not None else shapely.Polygon()
        neg = shapely.union_all(np.asarray(_polygon_parts(self.negative), dtype=object)) \
            if self.negative is not None else shapely.Polygon()
        object.__setattr__(self, "positive", pos)
        object.__setattr__(self, "negative", neg)
        for name, geom in (("pos", pos), ("neg", neg)):
            parts = _polygon_parts(geom)
            shapely.prepare(parts)  # speeds up the containment tests of positive_fraction
            edges, offsets = _ring_edges(parts)
            object.__setattr__(self, f"_{name}_parts", parts)
            object.__setattr__(self, f"_{name}_tree", shapely.STRtree(parts))
            object.__setattr__(self, f"_{name}_edges", edges)
            object.__setattr__(self, f"_{name}_offsets", offsets)

    @property
    def is_empty(self) -> bool:
        """True if there is no positive region."""
        return len(self._pos_parts) == 0

    @property
    def has_negative(self) -> bool:
        """True if known-negative regions were given."""
        return len(self._neg_parts) > 0

    @property
    def positive_area_px(self) -> float:
        """Area of the positive region in level-0 pixels squared."""
        return float(self.positive.area)

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return (f"Annotations(source={self.source!r}, positive_parts={len(self._pos_parts)}, "
                f"negative_parts={len(self._neg_parts)}, positive_area_px={self.positive_area_px:.0f})")


# --------------------------------------------------------------------------
# GeoJSON loading
# --------------------------------------------------------------------------


def _read_json(path_or_dict, source: str | None) -> tuple[Any, str]:
    if isinstance(path_or_dict, (str, os.PathLike)):
        path = os.fspath(path_or_dict)
        try:
            with open(path, "r", encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise AnnotationError(f"{path}: not valid JSON ({exc})") from exc
        except OSError as exc:
            raise AnnotationError(f"{path}: cannot read annotation file ({exc})") from exc
        return data, source or path
    return path_or_dict, source or "<geojson>"


def _features(data, source: str) -> list[dict]:
    """Normalise the accepted GeoJSON layouts to a list of Feature dicts."""
    if isinstance(data, list):
        feats = data
    elif isinstance(data, Mapping):
        kind = data.get("type")
        if kind == "FeatureCollection":
            feats = data.get("features")
            if not isinstance(feats, list):
                raise AnnotationError(f"{source}: FeatureCollection without a 'features' list")
        elif kind == "Feature":
            feats = [data]
        elif kind in _POLYGONAL or kind == "GeometryCollection":
            feats = [{"type": "Feature", "geometry": data, "properties": {}}]
        else:
            raise AnnotationError(
                f"{source}: expected a GeoJSON FeatureCollection, Feature or list of Features, "
                f"got type {kind!r}")
    else:
        raise AnnotationError(f"{source}: expected GeoJSON (dict or list), got {type(data).__name__}")
    for i, f in enumerate(feats):
        if not isinstance(f, Mapping):
            raise AnnotationError(f"{source}: feature #{i} is not a JSON object")
    return list(feats)


def _class_name(props: Mapping) -> str | None:
    """QuPath classification name: ``{"name": ...}`` dict, a plain string, a
    ``{"names": [...]}`` derived class, or missing (None)."""
    cls = props.get("classification")
    if cls is None:
        return None
    if isinstance(cls, str):
        return cls or None
    if isinstance(cls, Mapping):
        name = cls.get("name")
        if name:
            return str(name)
        names = cls.get("names")
        if isinstance(names, (list, tuple)) and names:
            return ": ".join(str(n) for n in names)
    return None


def _polygonal_part(geom):
    """The polygonal content of ``geom`` (Polygon/MultiPolygon), or None."""
    if geom.geom_type in _POLYGONAL:
        return geom
    if geom.geom_type == "GeometryCollection":
        polys = [g for g in shapely.get_parts(geom) if g.geom_type in _POLYGONAL]
        # nested collections (rare) are flattened through get_parts recursively
        nested = [g for g in shapely.get_parts(geom) if g.geom_type == "GeometryCollection"]
        for g in nested:
            p = _polygonal_part(g)
            if p is not None:
                polys.append(p)
        if polys:
            return shapely.union_all(np.asarray(polys, dtype=object))
    return None


def load_geojson(
    path_or_dict,
    *,
    positive_classes: Iterable[str] = ("Tumor", "Tumour"),
    negative_classes: Iterable[str] = (),
    unclassified_positive: bool = False,
    slide_dimensions: tuple[int, int] | None = None,
    outside_tolerance_px: float = 8.0,
    allow_empty: bool = False,
    source: str | None = None,
) -> Annotations:
    """Load QuPath GeoJSON annotations (level-0 pixel coordinates).

    Parameters
    ----------
    path_or_dict : str, os.PathLike, dict or list
        A ``.geojson`` / ``.json`` file, or already-parsed GeoJSON: a
        FeatureCollection, a bare list of Features, a single Feature (all
        three are produced by QuPath exports) or a bare Polygon/MultiPolygon
        geometry (treated as one unclassified feature).
    positive_classes : iterable of str
        Classification names whose regions are positive (case-insensitive).
    negative_classes : iterable of str
        Classification names whose regions are known-negative, i.e. annotated
        benign tissue (case-insensitive).  Features of any other class are
        ignored.
    unclassified_positive : bool
        Whether features without a classification count as positive
        (default: ignored).  The classification is read from
        ``properties.classification.name``; a plain string
        ``properties.classification`` is also accepted.
    slide_dimensions : (int, int), optional
        Level-0 ``(width, height)`` of the slide in pixels.  When given, every
        used polygon must lie within ``[0, width] x [0, height]`` up to
        ``outside_tolerance_px``; otherwise :class:`AnnotationError` is raised
        (the usual cause is GeoJSON exported in another coordinate frame,
        e.g. a downsampled image or micrometres).
    outside_tolerance_px : float
        How far (level-0 pixels) a polygon may stick out of the slide.
    allow_empty : bool
        If False (default), a file without any positive region raises
        :class:`AnnotationError`; if True an empty :class:`Annotations` is
        returned.
    source : str, optional
        Name used in error messages (defaults to the path, or ``"<geojson>"``).

    Returns
    -------
    Annotations

    Raises
    ------
    AnnotationError
        Unreadable file, unparseable or unrepairable geometry (message names
        the file and ``feature #i``), a polygon outside the slide, or no
        positive feature.

    Notes
    -----
    Polygons and MultiPolygons with holes are supported.  Invalid geometry
    (self-intersections, ...) is repaired with :func:`shapely.make_valid`;
    only its polygonal part is kept.  Point and line features carry no area
    and are skipped with a warning.
    """
    pos_set = {c.casefold() for c in positive_classes}
    neg_set = {c.casefold() for c in negative_classes}
    both = pos_set & neg_set
    if both:
        raise ValueError(f"classes listed as both positive and negative: {sorted(both)}")

    data, src = _read_json(path_or_dict, source)
    feats = _features(data, src)

    class_counts: Counter = Counter()
    positives, negatives = [], []
    for i, feat in enumerate(feats):
        props = feat.get("properties") or {}
        if not isinstance(props, Mapping):
            props = {}
        name = _class_name(props)
        class_counts[name] += 1
        if name is None:
            role = "positive" if unclassified_positive else None
        elif name.casefold() in pos_set:
            role = "positive"
        elif name.casefold() in neg_set:
            role = "negative"
        else:
            role = None
        if role is None:
            continue

        label = f"{src}: feature #{i}"
        if feat.get("id") is not None:
            label += f" (id {feat.get('id')})"
        label += f" (class {name!r})"

        gj = feat.get("geometry")
        if gj is None:
            warnings.warn(f"{label}: no geometry, skipped", stacklevel=2)
            continue
        try:
            geom = _shape_from_geojson(gj)
        except Exception as exc:  # shapely raises several types for bad GeoJSON
            raise AnnotationError(f"{label}: cannot parse geometry ({exc})") from exc

        xy = shapely.get_coordinates(geom)
        if xy.size and not np.all(np.isfinite(xy)):
            raise AnnotationError(f"{label}: geometry has non-finite coordinates")

        if not geom.is_valid:
            reason = shapely.is_valid_reason(geom)
            fixed = _polygonal_part(shapely.make_valid(geom))
            if fixed is None or fixed.is_empty or fixed.area <= 0:
                raise AnnotationError(
                    f"{label}: invalid {geom.geom_type} ({reason}) that make_valid could not "
                    "repair into a polygon with non-zero area")
            log.info("%s: repaired invalid geometry (%s)", label, reason)
            geom = fixed
        poly = _polygonal_part(geom)
        if poly is None:
            warnings.warn(f"{label}: {geom.geom_type} has no area, skipped", stacklevel=2)
            continue
        if poly.is_empty or poly.area <= 0:
            warnings.warn(f"{label}: polygon with zero area, skipped", stacklevel=2)
            continue

        if slide_dimensions is not None:
            w, h = slide_dimensions
            minx, miny, maxx, maxy = poly.bounds
            tol = float(outside_tolerance_px)
            if minx < -tol or miny < -tol or maxx > w + tol or maxy > h + tol:
                raise AnnotationError(
                    f"{label}: polygon bounds x=[{minx:.1f}, {maxx:.1f}], y=[{miny:.1f}, {maxy:.1f}] "
                    f"lie outside the slide of {w} x {h} level-0 pixels (tolerance {tol:g} px); "
                    "annotation coordinates must be level-0 pixels (QuPath export of the full-"
                    "resolution image, not a downsampled image or micrometres)")

        (positives if role == "positive" else negatives).append(poly)

    if not positives and not allow_empty:
        found = ", ".join(f"{k!r}: {v}" for k, v in class_counts.items()) or "no features"
        raise AnnotationError(
            f"{src}: no positive annotation (positive_classes={sorted(positive_classes)}, "
            f"unclassified_positive={unclassified_positive}); classes found: {found}. "
            "Pass allow_empty=True to accept slides without positive regions.")

    pos = shapely.union_all(np.asarray(positives, dtype=object)) if positives else shapely.Polygon()
    neg = shapely.union_all(np.asarray(negatives, dtype=object)) if negatives else shapely.Polygon()
    return Annotations(positive=pos, negative=neg, source=src, class_counts=dict(class_counts))


# --------------------------------------------------------------------------
# Rasterisation
# --------------------------------------------------------------------------


def _tile_geometry(level0_xy, tile_px, downsample, out_px):
    x0, y0 = (float(v) for v in level0_xy)
    tile_px = int(tile_px)
    downsample = float(downsample)
    out_px = tile_px if out_px is None else int(out_px)
    if tile_px <= 0 or out_px <= 0:
        raise ValueError(f"tile_px and out_px must be positive, got {tile_px}, {out_px}")
    if not np.isfinite(downsample) or downsample <= 0:
        raise ValueError(f"downsample must be a positive number, got {downsample}")
    span = tile_px * downsample
    return x0, y0, span, out_px, span / out_px


def _scanline_fill(edges: np.ndarray, x0: float, y0: float, d: float, n: int) -> np.ndarray:
    """Even-odd scanline fill of ring edges on an ``n x n`` grid.

    ``edges`` are level-0 ``(x0, y0, x1, y1)``.  Pixel ``(i, j)`` is set when
    its centre ``(j + 0.5, i + 0.5)`` (grid units) has an odd number of edge
    crossings strictly to its right on its row.  An edge crosses row ``i``
    when ``min(v0, v1) <= i + 0.5 < max(v0, v1)`` (half-open, so vertices and
    horizontal edges are counted consistently).
    """
    out = np.zeros((n, n), dtype=np.uint8)
    if len(edges) == 0:
        return out
    u0 = (edges[:, 0] - x0) / d
    v0 = (edges[:, 1] - y0) / d
    u1 = (edges[:, 2] - x0) / d
    v1 = (edges[:, 3] - y0) / d
    vmin = np.minimum(v0, v1)
    vmax = np.maximum(v0, v1)
    row_start = np.clip(np.ceil(vmin - 0.5), 0, n).astype(np.int64)
    row_stop = np.clip(np.ceil(vmax - 0.5), 0, n).astype(np.int64)
    nrows = np.maximum(row_stop - row_start, 0)
    total = int(nrows.sum())
    if total == 0:
        return out
    eidx = np.repeat(np.arange(len(edges)), nrows)
    first = np.repeat(np.cumsum(nrows) - nrows, nrows)
    rows = row_start[eidx] + (np.arange(total) - first)
    yc = rows + 0.5
    t = (yc - v0[eidx]) / (v1[eidx] - v0[eidx])
    xc = u0[eidx] + t * (u1[eidx] - u0[eidx])
    # crossing at xc toggles the pixels whose centre j + 0.5 < xc, i.e. j < k
    k = np.clip(np.ceil(xc - 0.5), 0, n).astype(np.int64)
    counts = np.zeros((n, n + 1), dtype=np.int32)
    np.add.at(counts, (rows, k), 1)
    # number of crossings with k > j, for each pixel j
    suffix = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1]
    out[:] = suffix[:, 1:] & 1
    return out


def _rasterize_parts(ann: Annotations, which: str, x0, y0, span, out_px, d) -> np.ndarray:
    tree = getattr(ann, f"_{which}_tree")
    edges = getattr(ann, f"_{which}_edges")
    offsets = getattr(ann, f"_{which}_offsets")
    if len(edges) == 0:
        return np.zeros((out_px, out_px), dtype=np.uint8)
    hits = tree.query(shapely.box(x0, y0, x0 + span, y0 + span))
    if len(hits) == 0:  # fast path: the tile misses every polygon's bounds
        return np.zeros((out_px, out_px), dtype=np.uint8)
    hits = np.sort(hits)
    sel = np.concatenate([edges[offsets[k]:offsets[k + 1]] for k in hits], axis=0)
    return _scanline_fill(sel, x0, y0, d, out_px)


def rasterize_tile(
    annotations: Annotations,
    level0_xy: Sequence[float],
    tile_px: int,
    downsample: float,
    *,
    out_px: int | None = None,
) -> np.ndarray:
    """Binary positive mask of one tile.

    Parameters
    ----------
    annotations : Annotations
        Regions in level-0 pixel coordinates.
    level0_xy : (float, float)
        Level-0 pixel ``(x, y)`` of the tile's top-left corner.
    tile_px : int
        Tile side in tile pixels.
    downsample : float
        Level-0 pixels per tile pixel; the tile covers
        ``tile_px * downsample`` level-0 pixels per side.
    out_px : int, optional
        Side of the returned mask in pixels (default ``tile_px``), e.g. the
        output resolution of a segmentation net.

    Returns
    -------
    mask : ndarray of uint8, shape (out_px, out_px)
        1 where the output pixel's centre is inside a positive region, else 0
        (see the module docstring for the exact convention; exact for
        axis-aligned rectangles).

    Notes
    -----
    Tiles whose box does not intersect any positive polygon's bounding box
    (``shapely.STRtree`` query) return zeros without rasterising.
    """
    x0, y0, span, out_px, d = _tile_geometry(level0_xy, tile_px, downsample, out_px)
    return _rasterize_parts(annotations, "pos", x0, y0, span, out_px, d)


def rasterize_tile_labels(
    annotations: Annotations,
    level0_xy: Sequence[float],
    tile_px: int,
    downsample: float,
    *,
    out_px: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Positive labels plus the annotated-region mask of one tile.

    Parameters are those of :func:`rasterize_tile`.

    Returns
    -------
    labels : ndarray of uint8, shape (out_px, out_px)
        1 = positive, 0 = known-negative or unannotated.
    annotated : ndarray of uint8, shape (out_px, out_px)
        1 where the pixel is inside a positive *or* known-negative region,
        i.e. where ``labels`` is trustworthy (use it as a loss mask when the
        annotations only cover part of the tissue).
    """
    x0, y0, span, out_px, d = _tile_geometry(level0_xy, tile_px, downsample, out_px)
    labels = _rasterize_parts(annotations, "pos", x0, y0, span, out_px, d)
    negative = _rasterize_parts(annotations, "neg", x0, y0, span, out_px, d)
    return labels, (labels | negative).astype(np.uint8)


def rasterize_tiles(
    annotations: Annotations,
    coords: np.ndarray,
    tile_px: int,
    downsample: float,
    *,
    out_px: int | None = None,
) -> np.ndarray:
    """:func:`rasterize_tile` for many tiles.

    Parameters
    ----------
    coords : ndarray, shape (N, 2)
        Level-0 ``(x, y)`` of each tile's top-left corner.
    tile_px, downsample, out_px
        As in :func:`rasterize_tile`.

    Returns
    -------
    masks : ndarray of uint8, shape (N, out_px, out_px)
    """
    coords = _check_coords(coords)
    n = int(tile_px) if out_px is None else int(out_px)
    out = np.zeros((len(coords), n, n), dtype=np.uint8)
    for k, xy in enumerate(coords):
        out[k] = rasterize_tile(annotations, xy, tile_px, downsample, out_px=n)
    return out


def rasterize_mask(
    mask_image: np.ndarray,
    mask_downsample: float,
    level0_xy: Sequence[float],
    tile_px: int,
    downsample: float,
    out_px: int | None = None,
) -> np.ndarray:
    """Per-tile target from a whole-slide binary mask image.

    Parameters
    ----------
    mask_image : ndarray, shape (H, W)
        Whole-slide mask at ``mask_downsample``; non-zero = positive.  Mask
        pixel ``(r, c)`` covers level-0
        ``[c*m, (c+1)*m) x [r*m, (r+1)*m)`` with ``m = mask_downsample``.
    mask_downsample : float
        Level-0 pixels per mask pixel.
    level0_xy, tile_px, downsample, out_px
        As in :func:`rasterize_tile`.

    Returns
    -------
    mask : ndarray of uint8, shape (out_px, out_px)
        Nearest-neighbour sample of the mask at each output pixel's centre;
        centres outside the mask image are 0.
    """
    mask_image = np.asarray(mask_image)
    if mask_image.ndim == 3 and mask_image.shape[2] == 1:
        mask_image = mask_image[..., 0]
    if mask_image.ndim != 2:
        raise ValueError(f"mask_image must be 2-D (H, W), got shape {mask_image.shape}")
    m = float(mask_downsample)
    if not np.isfinite(m) or m <= 0:
        raise ValueError(f"mask_downsample must be a positive number, got {mask_downsample}")
    x0, y0, _, out_px, d = _tile_geometry(level0_xy, tile_px, downsample, out_px)
    centres = np.arange(out_px) + 0.5
    cols = np.floor((x0 + centres * d) / m).astype(np.int64)
    rows = np.floor((y0 + centres * d) / m).astype(np.int64)
    h, w = mask_image.shape
    col_ok = (cols >= 0) & (cols < w)
    row_ok = (rows >= 0) & (rows < h)
    sampled = mask_image[np.clip(rows, 0, h - 1)[:, None], np.clip(cols, 0, w - 1)[None, :]] != 0
    sampled &= row_ok[:, None] & col_ok[None, :]
    return sampled.astype(np.uint8)


# --------------------------------------------------------------------------
# Tile-level summaries
# --------------------------------------------------------------------------


def _check_coords(coords) -> np.ndarray:
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must have shape (N, 2), got {coords.shape}")
    return coords


def positive_fraction(
    annotations: Annotations,
    coords: np.ndarray,
    tile_px: int,
    downsample: float,
) -> np.ndarray:
    """Fraction of each tile's area covered by positive regions.

    Parameters
    ----------
    annotations : Annotations
    coords : ndarray, shape (N, 2)
        Level-0 ``(x, y)`` of each tile's top-left corner.
    tile_px : int
        Tile side in tile pixels.
    downsample : float
        Level-0 pixels per tile pixel.

    Returns
    -------
    fraction : ndarray of float64, shape (N,)
        Exact geometric area fraction in ``[0, 1]`` (not a pixel count).
    """
    coords = _check_coords(coords)
    _, _, span, _, _ = _tile_geometry((0, 0), tile_px, downsample, None)
    frac = np.zeros(len(coords), dtype=np.float64)
    if len(coords) == 0 or annotations.is_empty:
        return frac
    boxes = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + span, coords[:, 1] + span)
    tile_idx, part_idx = annotations._pos_tree.query(boxes, predicate="intersects")
    if len(tile_idx):
        parts = annotations._pos_parts[part_idx]
        inside = shapely.contains(parts, boxes[tile_idx])  # cheap with prepared parts
        areas = np.full(len(tile_idx), span * span)
        edge = ~inside
        areas[edge] = shapely.area(shapely.intersection(boxes[tile_idx[edge]], parts[edge]))
        np.add.at(frac, tile_idx, areas)
    return np.clip(frac / (span * span), 0.0, 1.0)


def tiles_touching(
    annotations: Annotations,
    coords: np.ndarray,
    tile_px: int,
    downsample: float,
    *,
    min_fraction: float = 0.0,
) -> np.ndarray:
    """Which tiles overlap a positive region.

    Parameters
    ----------
    annotations, coords, tile_px, downsample
        As in :func:`positive_fraction`.
    min_fraction : float
        A tile counts when its positive area fraction is strictly greater
        than this (default 0: any overlap with non-zero area; tiles that only
        share an edge or a corner with a region do not count).

    Returns
    -------
    touching : ndarray of bool, shape (N,)
    """
    return positive_fraction(annotations, coords, tile_px, downsample) > float(min_fraction)
