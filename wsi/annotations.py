"""Pixel-level annotations: QuPath GeoJSON or mask images -> per-tile targets.

This module is the one owner of annotations for training and evaluation:
which files belong to which slide (:func:`match_annotation_files`), reading
one slide's file into a :class:`SlideAnnotation` (:func:`load_slide_annotation`)
and rasterising it onto a tile or a heatmap grid (positive target plus a
labelled weight, see *Region-limited annotations* below).

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

Region-limited annotations
--------------------------
Annotators often outline a few regions and annotate completely only inside
them (QuPath: rectangles of class ``Region*`` with ``Tumor`` polygons in them).
Features of the *region classes* mark where the annotation is complete: there a
pixel is positive (inside a positive polygon) or negative; outside every region
it is **unlabelled** (weight 0), except inside a positive polygon, which is
positive wherever it lies.  Features of *negative classes* (known-benign
tissue) also count as labelled, negative, area.  A file without region and
negative features annotates the whole slide (every pixel labelled).  Mask
images express the same with an *unlabelled value* (``"unlabelled": N`` in the
``<mask>.json`` sidecar): pixels equal to it are unlabelled, other non-zero
pixels positive, zero pixels negative.

File names
----------
A GeoJSON file ``<slide_id>.geojson`` (or ``.json``) belongs to slide
``slide_id``; a mask image ``<slide_id><name>.png`` (or ``.tif`` / ``.tiff``)
with ``<name>`` empty or one of :data:`MASK_NAME_SUFFIXES` (``_lesion_mask``,
``_mask``, ``-mask``, ...).  A ``<mask>.json`` next to ``<mask>.png`` is the
mask's sidecar (``{"downsample": 16}``), not GeoJSON.  A slide uses one file:
its GeoJSON when there is one, else its first mask image in the order of
:data:`MASK_NAME_SUFFIXES`.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import shapely
from shapely.geometry import shape as _shape_from_geojson

__all__ = [
    "AnnotationError",
    "Annotations",
    "SlideAnnotation",
    "GEOJSON_SUFFIXES",
    "MASK_SUFFIXES",
    "MASK_NAME_SUFFIXES",
    "annotation_files",
    "annotation_slide_id",
    "match_annotation_files",
    "load_slide_annotation",
    "read_mask_image",
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
    regions : shapely geometry, optional
        Union of the regions where the annotation is complete (region
        classes, e.g. QuPath ``Region*``), level-0 pixel coordinates.
        Inside them a pixel is positive or negative; outside them and
        outside ``positive`` / ``negative`` it is unlabelled.
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
    regions: Any = None

    def __post_init__(self):
        geoms = {}
        for attr in ("positive", "negative", "regions"):
            g = getattr(self, attr)
            geoms[attr] = shapely.union_all(np.asarray(_polygon_parts(g), dtype=object)) \
                if g is not None else shapely.Polygon()
            object.__setattr__(self, attr, geoms[attr])
        for name, geom in (("pos", geoms["positive"]), ("neg", geoms["negative"]), ("reg", geoms["regions"])):
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
    def has_regions(self) -> bool:
        """True if annotated regions (region classes) were given."""
        return len(self._reg_parts) > 0

    @property
    def complete(self) -> bool:
        """True if the whole slide counts as annotated: no region and no
        known-negative feature, so every pixel outside ``positive`` is negative."""
        return not (self.has_regions or self.has_negative)

    @property
    def positive_area_px(self) -> float:
        """Area of the positive region in level-0 pixels squared."""
        return float(self.positive.area)

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return (f"Annotations(source={self.source!r}, positive_parts={len(self._pos_parts)}, "
                f"negative_parts={len(self._neg_parts)}, region_parts={len(self._reg_parts)}, "
                f"positive_area_px={self.positive_area_px:.0f})")


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


def _class_matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    """Case-insensitive match of a class name against names or shell-style
    patterns (``Region*``)."""
    pats = [str(p).casefold() for p in patterns]
    return lambda name: any(fnmatch.fnmatchcase(name.casefold(), p) for p in pats)


def load_geojson(
    path_or_dict,
    *,
    positive_classes: Iterable[str] = ("Tumor", "Tumour"),
    negative_classes: Iterable[str] = (),
    region_classes: Iterable[str] = (),
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
        Classification names whose regions are positive (case-insensitive;
        shell-style patterns such as ``Tumo*`` allowed).
    negative_classes : iterable of str
        Classification names whose regions are known-negative, i.e. annotated
        benign tissue (case-insensitive, patterns allowed).
    region_classes : iterable of str
        Classification names (patterns allowed, e.g. ``Region*``) of the
        regions inside which the annotation is complete (see *Region-limited
        annotations* in the module docstring).  A feature matching several
        lists is positive before negative before region.  Features of any
        other class are ignored.
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
        If False (default), a file without any positive, negative or region
        feature raises :class:`AnnotationError`; if True an empty
        :class:`Annotations` is returned.
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
    positive_classes, negative_classes, region_classes = (
        list(positive_classes), list(negative_classes), list(region_classes))
    pos_set = {c.casefold() for c in positive_classes}
    neg_set = {c.casefold() for c in negative_classes}
    both = pos_set & neg_set
    if both:
        raise ValueError(f"classes listed as both positive and negative: {sorted(both)}")
    is_pos, is_neg, is_reg = (_class_matcher(c) for c in (positive_classes, negative_classes, region_classes))

    data, src = _read_json(path_or_dict, source)
    feats = _features(data, src)

    class_counts: Counter = Counter()
    found: dict[str, list] = {"positive": [], "negative": [], "region": []}
    for i, feat in enumerate(feats):
        props = feat.get("properties") or {}
        name = _class_name(props if isinstance(props, Mapping) else {})
        class_counts[name] += 1
        if name is None:
            role = "positive" if unclassified_positive else None
        else:
            role = next((r for r, match in (("positive", is_pos), ("negative", is_neg), ("region", is_reg))
                         if match(name)), None)
        if role is None:
            continue
        label = f"{src}: feature #{i}" + (f" (id {feat.get('id')})" if feat.get("id") is not None else "") \
            + f" (class {name!r})"
        poly = _feature_polygon(feat.get("geometry"), label)
        if poly is None:
            continue
        if slide_dimensions is not None:
            _check_inside(poly, label, slide_dimensions, float(outside_tolerance_px))
        found[role].append(poly)

    if not any(found.values()) and not allow_empty:
        seen = ", ".join(f"{k!r}: {v}" for k, v in class_counts.items()) or "no features"
        regions = f", region_classes={region_classes}" if region_classes else ""
        raise AnnotationError(
            f"{src}: no positive annotation (positive_classes={sorted(positive_classes)}{regions}, "
            f"unclassified_positive={unclassified_positive}); classes found: {seen}; give the lesion annotations "
            "one of the positive classes (QuPath: Set class, then export again), add their class to the positive "
            "classes, or leave this file out of the annotations")

    def union(polys):
        return shapely.union_all(np.asarray(polys, dtype=object)) if polys else shapely.Polygon()

    return Annotations(positive=union(found["positive"]), negative=union(found["negative"]), source=src,
                       class_counts=dict(class_counts), regions=union(found["region"]))


def _feature_polygon(gj, label: str):
    """A feature's geometry as a valid (Multi)Polygon with area, or None (skipped with a warning)."""
    if gj is None:
        warnings.warn(f"{label}: no geometry, skipped", stacklevel=3)
        return None
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
        warnings.warn(f"{label}: {geom.geom_type} has no area, skipped", stacklevel=3)
        return None
    if poly.is_empty or poly.area <= 0:
        warnings.warn(f"{label}: polygon with zero area, skipped", stacklevel=3)
        return None
    return poly


def _check_inside(poly, label: str, slide_dimensions: tuple[int, int], tol: float) -> None:
    """A polygon must lie on the slide (level-0 px, up to ``tol``): the usual mistake is another frame."""
    w, h = slide_dimensions
    minx, miny, maxx, maxy = poly.bounds
    if minx < -tol or miny < -tol or maxx > w + tol or maxy > h + tol:
        raise AnnotationError(
            f"{label}: polygon bounds x=[{minx:.1f}, {maxx:.1f}], y=[{miny:.1f}, {maxy:.1f}] "
            f"lie outside the slide of {w} x {h} level-0 pixels (tolerance {tol:g} px); "
            "annotation coordinates must be level-0 pixels (QuPath export of the full-"
            "resolution image, not a downsampled image or micrometres)")


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
        1 where the pixel is inside a positive, known-negative *or* annotated
        region, i.e. where ``labels`` is trustworthy (use it as a loss mask
        when the annotations only cover part of the tissue).  This does not
        look at :attr:`Annotations.complete`; :meth:`SlideAnnotation.tile_labels`
        does.
    """
    x0, y0, span, out_px, d = _tile_geometry(level0_xy, tile_px, downsample, out_px)
    labels = _rasterize_parts(annotations, "pos", x0, y0, span, out_px, d)
    negative = _rasterize_parts(annotations, "neg", x0, y0, span, out_px, d)
    regions = _rasterize_parts(annotations, "reg", x0, y0, span, out_px, d)
    return labels, (labels | negative | regions).astype(np.uint8)


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


# --------------------------------------------------------------------------
# One slide's annotation: which file, reading it, targets on tiles and grids
# --------------------------------------------------------------------------

GEOJSON_SUFFIXES = (".geojson", ".json")
"""File suffixes of GeoJSON annotations (case-insensitive)."""
MASK_SUFFIXES = (".png", ".tif", ".tiff")
"""File suffixes of annotation mask images (case-insensitive)."""
MASK_NAME_SUFFIXES = ("_lesion_mask", "_mask", ".mask", "-mask", "_labels", "-labels")
"""Name endings between the slide id and the suffix of a mask image, in order of preference
(a mask named exactly ``<slide_id>.png`` comes after all of them)."""
DEFAULT_POSITIVE_CLASSES = ("Tumor", "Tumour")
DEFAULT_REGION_CLASSES = ("Region*",)


def _is_geojson(path: Path) -> bool:
    return path.suffix.lower() in GEOJSON_SUFFIXES


def _is_mask(path: Path) -> bool:
    return path.suffix.lower() in MASK_SUFFIXES


def annotation_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The annotation files among ``paths``: files as given, folders by their
    GeoJSON and mask images (not recursive, hidden files skipped), sorted.

    A ``<mask>.json`` next to a ``<mask>.png`` (or ``.tif``) is that mask's
    sidecar and is left out.  A file given twice is listed once.

    Raises
    ------
    AnnotationError
        A path that does not exist, or a file that is neither GeoJSON nor a
        mask image.
    """
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files += [f for f in sorted(p.iterdir())
                      if f.is_file() and not f.name.startswith(".") and (_is_geojson(f) or _is_mask(f))]
        elif p.is_file():
            if not (_is_geojson(p) or _is_mask(p)):
                raise AnnotationError(
                    f"{p}: not an annotation file; give QuPath GeoJSON ({', '.join(GEOJSON_SUFFIXES)}) "
                    f"or a mask image ({', '.join(MASK_SUFFIXES)})")
            files.append(p)
        else:
            raise AnnotationError(f"{p}: no such annotation file or folder; check the path")
    images = {f.with_suffix("") for f in files if _is_mask(f)}
    out, seen = [], set()
    for f in files:
        key = f.resolve()
        if key in seen or (f.suffix.lower() == ".json" and f.with_suffix("") in images):
            continue
        seen.add(key)
        out.append(f)
    return out


def annotation_slide_id(path: str | os.PathLike, slide_ids: Iterable[str]) -> str | None:
    """The slide an annotation file belongs to, or None (see *File names* in the
    module docstring): ``<slide_id>.geojson`` / ``.json``, or
    ``<slide_id>[<name>].png`` / ``.tif`` / ``.tiff`` with ``<name>`` one of
    :data:`MASK_NAME_SUFFIXES`.  An exact slide id wins over a stripped one."""
    path = Path(path)
    known = slide_ids if isinstance(slide_ids, (set, frozenset, dict)) else set(slide_ids)
    stem = path.stem
    if _is_geojson(path):
        return stem if stem in known else None
    if not _is_mask(path):
        return None
    if stem in known:
        return stem
    for name in MASK_NAME_SUFFIXES:
        if stem.endswith(name) and stem[: -len(name)] in known:
            return stem[: -len(name)]
    return None


def _preference(path: Path, slide_id: str) -> tuple:
    suffix = path.suffix.lower()
    if suffix in GEOJSON_SUFFIXES:
        return (0, GEOJSON_SUFFIXES.index(suffix), 0, path.name)
    name = path.stem[len(slide_id):]
    rank = MASK_NAME_SUFFIXES.index(name) if name in MASK_NAME_SUFFIXES else len(MASK_NAME_SUFFIXES)
    return (1, rank, MASK_SUFFIXES.index(suffix), path.name)


def match_annotation_files(
    files: Iterable[str | os.PathLike], slide_ids: Iterable[str]
) -> tuple[dict[str, list[Path]], list[Path]]:
    """Group annotation files by the slide they belong to.

    Parameters
    ----------
    files : iterable of paths
        Annotation files, e.g. from :func:`annotation_files`.
    slide_ids : iterable of str
        The slides that may have annotations.

    Returns
    -------
    by_slide : dict of str to list of Path
        Each slide's files, the one to use first (GeoJSON before mask images,
        masks in the order of :data:`MASK_NAME_SUFFIXES`); the others are
        not used.
    unmatched : list of Path
        Files named after none of ``slide_ids``.
    """
    known = set(slide_ids)
    by_slide: dict[str, list[Path]] = {}
    unmatched: list[Path] = []
    for f in files:
        f = Path(f)
        sid = annotation_slide_id(f, known)
        if sid is None:
            unmatched.append(f)
        else:
            by_slide.setdefault(sid, []).append(f)
    return {sid: sorted(fs, key=lambda f: _preference(f, sid)) for sid, fs in by_slide.items()}, unmatched


def read_mask_image(path: str | os.PathLike) -> np.ndarray:
    """A mask image's values as a 2-D array (PNG or TIFF; colour images: the
    largest of R, G, B; grey + alpha: the grey channel)."""
    import cv2

    img = cv2.imread(os.fspath(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise AnnotationError(f"{path}: cannot read the mask image; give a PNG or TIFF image")
    if img.ndim == 3:
        img = img[..., :3].max(axis=2) if img.shape[2] >= 3 else img[..., 0]
    return img


def _mask_sidecar(path: Path) -> tuple[Path, dict]:
    side = path.with_suffix(".json")
    if not side.is_file():
        return side, {}
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AnnotationError(f"{side}: cannot read the mask's sidecar ({exc}); write JSON like "
                              '{"downsample": 16}') from None
    if not isinstance(meta, Mapping):
        raise AnnotationError(f"{side}: the mask's sidecar must be a JSON object like {{\"downsample\": 16}}")
    return side, dict(meta)


def _sidecar_number(side: Path, meta: dict, key: str, kind=float):
    if meta.get(key) is None:
        return None
    try:
        value = kind(meta[key])
        if kind is int and value != float(meta[key]):
            raise ValueError("not an integer")
    except (TypeError, ValueError):
        raise AnnotationError(f"{side}: {key!r} must be a number, got {meta[key]!r}; fix the sidecar") from None
    return value


def _mask_downsample(path: Path, shape: tuple[int, int], side: Path, meta: dict,
                     slide_dimensions: tuple[int, int] | None, override: float | None) -> float:
    """Level-0 px per mask px: ``override``, else the sidecar's ``downsample``, else slide size / mask size."""
    if override is not None:
        ds = float(override)
    else:
        ds = _sidecar_number(side, meta, "downsample")
    if ds is not None:
        if not np.isfinite(ds) or ds <= 0:
            raise AnnotationError(f"{path}: mask downsample {ds} must be a positive number; fix {side.name}")
        return ds
    fix = f"give its downsample in {side.name} ({{\"downsample\": N}})"
    w, h = slide_dimensions if slide_dimensions is not None else (None, None)
    if not w:
        raise AnnotationError(f"{path}: the mask's downsample is unknown (no slide size to compare with); {fix}")
    ds_x = w / shape[1]
    if h:
        ds_y = h / shape[0]
        if abs(ds_x - ds_y) > max(ds_x, ds_y) / min(shape) * 1.5:
            raise AnnotationError(
                f"{path}: mask of {shape[1]}x{shape[0]} px does not have the slide's aspect "
                f"({w}x{h} level-0 px); {fix}")
    return float(ds_x)


@dataclass(frozen=True, eq=False)
class SlideAnnotation:
    """One slide's annotation, read from one file by :func:`load_slide_annotation`.

    Exactly one of ``geo`` (GeoJSON polygons) and ``mask`` (a mask image) is set.

    Attributes
    ----------
    slide_id : str
    source : str
        The file it was read from.
    geo : Annotations or None
        Positive, known-negative and annotated regions, level-0 pixels.
    mask : ndarray of uint8, shape (H, W), or None
        1 = positive, at ``mask_downsample`` (mask pixel ``(r, c)`` covers
        level-0 ``[c*m, (c+1)*m) x [r*m, (r+1)*m)``).
    mask_downsample : float or None
        Level-0 pixels per mask pixel.
    mask_unlabelled : ndarray of uint8, shape (H, W), or None
        1 = unlabelled (the mask's unlabelled value); None = every pixel labelled.
    """

    slide_id: str
    source: str
    geo: Annotations | None = None
    mask: np.ndarray | None = None
    mask_downsample: float | None = None
    mask_unlabelled: np.ndarray | None = None

    @property
    def sources(self) -> list[str]:
        """The files used (one)."""
        return [self.source]

    @property
    def complete(self) -> bool:
        """True if the whole slide is annotated (every pixel positive or negative)."""
        if self.geo is not None:
            return self.geo.complete
        return self.mask_unlabelled is None

    @property
    def has_positive(self) -> bool:
        """True if some pixel is positive."""
        if self.geo is not None:
            return not self.geo.is_empty
        return bool(self.mask is not None and self.mask.any())

    def tile_target(self, level0_xy, tile_px: int, downsample: float, out_px: int | None = None) -> np.ndarray:
        """Positive target of one tile: ``(out_px, out_px)`` uint8, 1 = positive
        (pixel centres, see the module docstring); unlabelled pixels are 0."""
        if self.geo is not None:
            return rasterize_tile(self.geo, level0_xy, tile_px, downsample, out_px=out_px)
        return rasterize_mask(self.mask, self.mask_downsample, level0_xy, tile_px, downsample, out_px=out_px)

    def tile_labels(self, level0_xy, tile_px: int, downsample: float,
                    out_px: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Target and weight of one tile, both ``(out_px, out_px)`` uint8.

        ``target`` is 1 where positive; ``weight`` is 1 where the pixel is
        labelled (positive or negative) and 0 where it is unlabelled (outside
        the annotated regions, or the mask's unlabelled value).  A tile has
        three states per pixel: positive (1, 1), negative (0, 1), unlabelled (0, 0).
        """
        n = int(tile_px) if out_px is None else int(out_px)
        if self.geo is not None:
            if self.geo.complete:
                return rasterize_tile(self.geo, level0_xy, tile_px, downsample, out_px=n), np.ones((n, n), np.uint8)
            return rasterize_tile_labels(self.geo, level0_xy, tile_px, downsample, out_px=n)
        target = rasterize_mask(self.mask, self.mask_downsample, level0_xy, tile_px, downsample, out_px=n)
        if self.mask_unlabelled is None:
            return target, np.ones((n, n), np.uint8)
        unl = rasterize_mask(self.mask_unlabelled, self.mask_downsample, level0_xy, tile_px, downsample, out_px=n)
        return target, (1 - unl).astype(np.uint8)

    def grid_labels(self, shape: tuple[int, int], origin_level0_xy: Sequence[float],
                    downsample: float) -> tuple[np.ndarray, np.ndarray]:
        """Target and weight (bool, ``shape``) on a heatmap grid whose pixel
        ``(r, c)`` covers level-0 ``[ox + c*m, ox + (c+1)*m) x [oy + r*m, oy + (r+1)*m)``
        (``m = downsample``, see :mod:`wsi.heatmap`), by pixel centre."""
        H, W = int(shape[0]), int(shape[1])
        side = max(H, W, 1)
        target, weight = self.tile_labels(origin_level0_xy, side, downsample, out_px=side)
        return target[:H, :W].astype(bool), weight[:H, :W].astype(bool)

    def labelled_tiles(self, coords: np.ndarray, tile_px: int, downsample: float) -> np.ndarray:
        """Which tiles hold labelled pixels (bool, ``(N,)``): all of them for a
        complete annotation; else, for polygons, tiles overlapping the labelled
        area (positive, negative or region) and, for masks, tiles with a
        labelled pixel on a grid of at most 32 x 32 centres.  Tiles without a
        labelled pixel are not annotated tiles."""
        coords = _check_coords(coords)
        if self.complete:
            return np.ones(len(coords), bool)
        if self.geo is not None:
            g = self.geo
            labelled = Annotations(shapely.union_all(np.asarray([g.positive, g.negative, g.regions], dtype=object)))
            return positive_fraction(labelled, coords, tile_px, downsample) > 0
        n = min(int(tile_px), 32)
        return np.array([self.tile_labels(xy, tile_px, downsample, out_px=n)[1].any() for xy in coords], bool)

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        kind = "geojson" if self.geo is not None else f"mask at downsample {self.mask_downsample:g}"
        return f"SlideAnnotation({self.slide_id!r}, {self.source!r}, {kind}, complete={self.complete})"


def load_slide_annotation(
    path: str | os.PathLike,
    slide_id: str | None = None,
    *,
    positive_classes: Iterable[str] = DEFAULT_POSITIVE_CLASSES,
    region_classes: Iterable[str] = DEFAULT_REGION_CLASSES,
    slide_dimensions: tuple[int, int] | None = None,
    mask_downsample: float | None = None,
    mask_unlabelled_value: int | None = None,
    allow_empty: bool = False,
) -> SlideAnnotation:
    """Read one slide's annotation file: QuPath GeoJSON or a mask image.

    Parameters
    ----------
    path : path
        ``.geojson`` / ``.json`` (level-0 pixel coordinates, see
        :func:`load_geojson`) or ``.png`` / ``.tif`` / ``.tiff`` mask image:
        0 = negative, the unlabelled value (if any) = unlabelled, any other
        value = positive.  A ``<mask>.json`` sidecar may give ``downsample``
        (level-0 px per mask px) and ``unlabelled`` (the unlabelled value).
    slide_id : str, optional
        The slide it belongs to (default: the file's stem).
    positive_classes, region_classes : iterable of str
        GeoJSON classification names (case-insensitive, shell patterns such as
        ``Region*`` allowed) of positive regions and of the regions inside
        which the annotation is complete (see the module docstring).
    slide_dimensions : (int, int), optional
        Level-0 ``(width, height)`` of the slide (``height`` may be None):
        polygons and masks must fit in it, and a mask without a known
        downsample gets ``width / mask width``.
    mask_downsample : float, optional
        Level-0 px per mask px; overrides the sidecar.
    mask_unlabelled_value : int, optional
        Mask value meaning unlabelled; overrides the sidecar's ``unlabelled``.
    allow_empty : bool
        Accept a file with nothing positive (evaluation of negative slides);
        otherwise a GeoJSON without positive, negative or region features and
        a mask without positive or unlabelled pixels raise.

    Raises
    ------
    AnnotationError
        One line naming the file and the fix.
    """
    path = Path(path)
    sid = path.stem if slide_id is None else str(slide_id)
    if _is_geojson(path):
        geo = load_geojson(path, positive_classes=positive_classes, region_classes=region_classes,
                           slide_dimensions=_dims(slide_dimensions), allow_empty=allow_empty)
        return SlideAnnotation(sid, str(path), geo=geo)
    if not _is_mask(path):
        raise AnnotationError(f"{path}: not an annotation file; give QuPath GeoJSON ({', '.join(GEOJSON_SUFFIXES)}) "
                              f"or a mask image ({', '.join(MASK_SUFFIXES)})")
    img = read_mask_image(path)
    side, meta = _mask_sidecar(path)
    ds = _mask_downsample(path, img.shape, side, meta, slide_dimensions, mask_downsample)
    w, h = slide_dimensions if slide_dimensions is not None else (None, None)
    if (w and img.shape[1] * ds > w + 2 * ds) or (h and img.shape[0] * ds > h + 2 * ds):
        raise AnnotationError(
            f"{path}: the mask covers {img.shape[1] * ds:.0f}x{img.shape[0] * ds:.0f} level-0 px at downsample "
            f"{ds:g}, larger than the slide ({w}x{h}): wrong downsample or wrong slide")
    value = mask_unlabelled_value if mask_unlabelled_value is not None else _sidecar_number(side, meta, "unlabelled", int)
    if value is not None and value <= 0:
        raise AnnotationError(f"{path}: the unlabelled value must be > 0 (0 means negative), got {value}; fix {side.name}")
    unlabelled = None if value is None else (img == value)
    positive = img != 0 if unlabelled is None else (img != 0) & ~unlabelled
    if not allow_empty and not positive.any() and (unlabelled is None or not unlabelled.any()):
        raise AnnotationError(f"{path}: the mask has no positive (non-zero) pixel; give the lesion mask of a "
                              "positive slide")
    return SlideAnnotation(sid, str(path), mask=positive.astype(np.uint8), mask_downsample=ds,
                           mask_unlabelled=None if unlabelled is None else unlabelled.astype(np.uint8))


def _dims(slide_dimensions):
    """``(w, h)`` for :func:`load_geojson`'s bounds check when both are known."""
    if slide_dimensions is None or not all(slide_dimensions):
        return None
    return int(slide_dimensions[0]), int(slide_dimensions[1])
