"""Slide heatmaps from per-tile probability maps, their storage, and their vectorisation to GeoJSON.

No torch here: the model's per-tile maps arrive as numpy arrays.

Geometry
--------
A heatmap lives on the grid of the tile store's thumbnail and tissue mask:
heatmap pixel ``(r, c)`` covers the level-0 box::

    [ox + c * m, ox + (c + 1) * m) x [oy + r * m, oy + (r + 1) * m)

with ``(ox, oy)`` the level-0 corner of the slide's bounds (``origin_level0_xy``)
and ``m`` the level-0 pixels per heatmap pixel (``downsample``, the store's
``mask_downsample``). A tile with level-0 corner ``(x, y)`` covers
``[x, x + T) x [y, y + T)`` (``T = tile_px * tile downsample``); its ``h x h``
probability map splits that box into ``h x h`` equal cells.

A heatmap pixel takes, from every tile whose box contains the pixel's
**centre**, the value of the map cell under that centre (maps finer than the
heatmap are first area-averaged to about the heatmap's pitch), and keeps the
**maximum** over overlapping tiles (``reduce='max'``; ``'mean'`` averages
them). Pixels no tile covers are NaN.

Vectorisation (:func:`heatmap_regions`, :func:`regions_geojson`) thresholds the
heatmap, labels 4-connected regions (OpenCV) and outlines each along its pixel
edges (the union of its pixel squares, holes included), scaled to level 0: the
polygons cover exactly the thresholded heatmap pixels.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from wsi.store import replace_dir

__all__ = [
    "HEATMAP_FORMAT",
    "assemble_heatmap",
    "store_heatmap",
    "heatmap_regions",
    "regions_geojson",
    "write_heatmap_zarr",
    "read_heatmap_zarr",
    "ome_multiscales",
]

HEATMAP_FORMAT = "wsi-pipeline.heatmap"
HEATMAP_FORMAT_VERSION = 1


def assemble_heatmap(
    coords_level0: np.ndarray,
    maps: np.ndarray,
    *,
    tile_level0_px: float,
    origin_level0_xy: Sequence[float],
    downsample: float,
    shape: tuple[int, int],
    reduce: str = "max",
) -> np.ndarray:
    """Paint per-tile probability maps onto a slide-level grid.

    Parameters
    ----------
    coords_level0 : (N, 2) array
        Level-0 ``(x, y)`` of each tile's top-left corner.
    maps : (N, h, h) array
        Per-tile probability maps (any float dtype), each covering its whole tile.
    tile_level0_px : float
        Tile side in level-0 pixels.
    origin_level0_xy : (float, float)
        Level-0 position of heatmap pixel (0, 0)'s top-left corner.
    downsample : float
        Level-0 pixels per heatmap pixel.
    shape : (H, W)
        Heatmap size in pixels.
    reduce : {'max', 'mean'}
        How overlapping tiles combine.

    Returns
    -------
    heat : (H, W) float32
        Probabilities; NaN where no tile covers the pixel's centre.
    """
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    H, W = int(shape[0]), int(shape[1])
    coords = np.asarray(coords_level0, np.float64).reshape(-1, 2)
    maps = np.asarray(maps)
    if maps.ndim != 3 or len(maps) != len(coords):
        raise ValueError(f"maps must be (N, h, w) with N = {len(coords)} tiles, got shape {maps.shape}")
    m = float(downsample)
    if not m > 0:
        raise ValueError(f"downsample must be > 0, got {downsample}")
    T = float(tile_level0_px)
    ox, oy = float(origin_level0_xy[0]), float(origin_level0_xy[1])
    if reduce == "max":
        acc = np.full((H, W), -np.inf, np.float32)
    else:
        acc = np.zeros((H, W), np.float32)
        cnt = np.zeros((H, W), np.float32)
    if len(coords) == 0 or H == 0 or W == 0:
        return np.full((H, W), np.nan, np.float32)
    h = maps.shape[-1]
    # area-average maps much finer than the heatmap down to about its pitch
    h2 = h
    if T / h * 2 <= m:
        h2 = max(1, int(round(T / m)))
    pitch = T / h2
    for (x, y), mp in zip(coords, maps):
        c0 = max(0, int(np.ceil((x - ox) / m - 0.5)))
        c1 = min(W, int(np.ceil((x + T - ox) / m - 0.5)))
        r0 = max(0, int(np.ceil((y - oy) / m - 0.5)))
        r1 = min(H, int(np.ceil((y + T - oy) / m - 0.5)))
        if c1 <= c0 or r1 <= r0:
            continue
        mp = np.asarray(mp, np.float32)
        if h2 != h:
            mp = cv2.resize(mp, (h2, h2), interpolation=cv2.INTER_AREA)
        jc = np.clip(np.floor((ox + (np.arange(c0, c1) + 0.5) * m - x) / pitch).astype(np.int64), 0, h2 - 1)
        jr = np.clip(np.floor((oy + (np.arange(r0, r1) + 0.5) * m - y) / pitch).astype(np.int64), 0, h2 - 1)
        vals = mp[jr[:, None], jc[None, :]]
        if reduce == "max":
            np.maximum(acc[r0:r1, c0:c1], vals, out=acc[r0:r1, c0:c1])
        else:
            acc[r0:r1, c0:c1] += vals
            cnt[r0:r1, c0:c1] += 1
    if reduce == "max":
        acc[np.isneginf(acc)] = np.nan
        return acc
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, acc / np.maximum(cnt, 1), np.nan).astype(np.float32)


# --------------------------------------------------------------------------- vectorisation


def store_heatmap(store, maps: np.ndarray, reduce: str = "max") -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """The heatmap of a tile store's per-tile maps on its thumbnail/mask grid.

    Returns ``(heat, tissue, origin_level0_xy)``: ``heat`` (h, w) float32 (NaN = no tile), the store's
    tissue mask as bool, and the level-0 corner of the slide's bounds.
    """
    bounds = (store.attrs.get("slide") or {}).get("bounds_xywh") or [0, 0, 0, 0]
    origin = (float(bounds[0]), float(bounds[1]))
    tissue = np.asarray(store.mask).astype(bool)
    maps = maps if len(maps) else np.zeros((0, 1, 1), np.float16)
    heat = assemble_heatmap(store.coords, maps, tile_level0_px=store.tile_px * store.downsample,
                            origin_level0_xy=origin, downsample=store.mask_downsample, shape=tissue.shape,
                            reduce=reduce)
    return heat, tissue, origin


def heatmap_regions(
    heat: np.ndarray,
    threshold: float = 0.5,
    *,
    downsample: float,
    origin_level0_xy: Sequence[float] = (0.0, 0.0),
    within: np.ndarray | None = None,
    min_pixels: int = 1,
) -> list[dict]:
    """Connected regions with ``heat >= threshold`` as level-0 polygons.

    Each 4-connected region becomes one polygon whose outline follows the
    pixel edges exactly (holes included): its area is the region's pixel
    count times ``downsample ** 2``.

    Parameters
    ----------
    heat : (H, W) array
        Probabilities (NaN = not scored, never positive).
    within : (H, W) bool array, optional
        Only pixels inside it can be positive (e.g. the tissue mask).
    min_pixels : int
        Regions with fewer heatmap pixels are dropped.

    Returns
    -------
    list of dict
        Per region: ``polygon`` (shapely Polygon, level-0 px), ``n_pixels``,
        ``max_probability``, ``mean_probability``; largest region first.
    """
    import shapely
    from shapely.geometry.polygon import orient

    heat = np.asarray(heat, np.float32)
    binary = np.nan_to_num(heat, nan=-1.0) >= float(threshold)
    if within is not None:
        binary &= np.asarray(within, bool)
    if not binary.any():
        return []
    m = float(downsample)
    ox, oy = float(origin_level0_xy[0]), float(origin_level0_xy[1])
    n_lab, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=4)
    out = []
    for lab in range(1, n_lab):
        x, y, w, h, n_px = (int(v) for v in stats[lab])
        if n_px < min_pixels:
            continue
        sub = labels[y : y + h, x : x + w] == lab
        # runs of consecutive pixels per row -> unit boxes -> exact union
        d = np.diff(np.pad(sub, ((0, 0), (1, 1))).astype(np.int8), axis=1)
        rs, cs = np.nonzero(d == 1)
        _, ce = np.nonzero(d == -1)
        boxes = shapely.box(cs + x, rs + y, ce + x, rs + y + 1)
        geom = shapely.union_all(boxes)
        geom = shapely.transform(geom, lambda p: np.stack([ox + p[:, 0] * m, oy + p[:, 1] * m], axis=1))
        geom = shapely.simplify(geom, 0.0)  # drop collinear vertices
        vals = heat[y : y + h, x : x + w][sub]
        for part in shapely.get_parts(geom):
            if part.geom_type != "Polygon" or part.is_empty:
                continue
            out.append({
                "polygon": orient(part, sign=1.0),
                "n_pixels": n_px,
                "max_probability": float(np.nanmax(vals)),
                "mean_probability": float(np.nanmean(vals)),
            })
    out.sort(key=lambda r: -r["polygon"].area)
    return out


def regions_geojson(
    regions: list[dict],
    *,
    name: str = "Tumor (predicted)",
    color: Sequence[int] = (220, 40, 40),
    properties: dict | None = None,
    decimals: int = 2,
) -> dict:
    """A GeoJSON FeatureCollection QuPath imports (File > Import objects): one Polygon annotation per region.

    Coordinates are level-0 pixels; each feature carries ``classification``
    (``name``, ``color``) and ``measurements`` (area in level-0 px^2, maximum
    and mean probability).
    """
    feats = []
    for r in regions:
        poly = r["polygon"]
        rings = [poly.exterior] + list(poly.interiors)
        coords = [[[round(float(x), decimals), round(float(y), decimals)] for x, y in ring.coords] for ring in rings]
        feats.append({
            "type": "Feature",
            "id": str(uuid.uuid4()),
            "geometry": {"type": "Polygon", "coordinates": coords},
            "properties": {
                "objectType": "annotation",
                "classification": {"name": name, "color": [int(c) for c in color]},
                "isLocked": False,
                "measurements": {
                    "area_level0_px2": round(float(poly.area), 1),
                    "max_probability": round(r["max_probability"], 4),
                    "mean_probability": round(r["mean_probability"], 4),
                },
                **(properties or {}),
            },
        })
    return {"type": "FeatureCollection", "features": feats}


# --------------------------------------------------------------------------- storage


def write_heatmap_zarr(path: str | Path, heat: np.ndarray, tissue: np.ndarray | None, attrs: dict) -> Path:
    """Write a heatmap as a Zarr v3 group, built under a temporary name and renamed into place.

    Layout: ``probability`` (H, W) float32 (NaN = not scored), ``tissue`` (H, W)
    uint8 (1 = tissue), both with ``dimension_names`` ``("y", "x")``; attributes
    ``format``, ``downsample``, ``origin_level0_xy`` and whatever ``attrs`` adds.
    When ``attrs`` gives the slide's level-0 ``mpp`` and the ``downsample``,
    the group also carries OME-NGFF 0.5 multiscale metadata
    (:func:`ome_multiscales`) so viewers (napari, QuPath) place it on the slide.
    """
    import zarr
    from zarr.codecs import ZstdCodec

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        g = zarr.open_group(str(tmp), mode="w-", zarr_format=3)
        heat = np.asarray(heat, np.float32)
        g.create_array("probability", data=heat, compressors=ZstdCodec(level=3), fill_value=np.nan,
                       dimension_names=("y", "x"))
        if tissue is not None:
            g.create_array("tissue", data=np.asarray(tissue, np.uint8), compressors=ZstdCodec(level=3),
                           dimension_names=("y", "x"))
        meta = {"format": HEATMAP_FORMAT, "format_version": HEATMAP_FORMAT_VERSION, **json.loads(json.dumps(attrs, default=str))}
        if meta.get("mpp") and meta.get("downsample"):
            meta["ome"] = ome_multiscales(
                float(meta["mpp"]), float(meta["downsample"]), meta.get("origin_level0_xy") or (0, 0),
                name=str(meta.get("slide_id", path.stem)),
            )
        g.attrs.update(meta)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def ome_multiscales(mpp: float, downsample: float, origin_level0_xy, *, name: str = "probability") -> dict:
    """OME-NGFF 0.5 ``ome`` attributes for a one-level ``probability`` image on the slide's frame.

    Physical coordinates are micrometres with the slide's level-0 pixel ``i``
    centred at ``i * mpp`` (how viewers place the slide at scale ``mpp``). A
    heatmap pixel ``(r, c)`` covers level-0 ``[ox + c*m, ox + (c+1)*m)``, so its
    centre is at ``(ox + (c + 0.5) * m - 0.5) * mpp``: scale ``m * mpp``,
    translation ``(ox + m/2 - 1/2) * mpp`` (``m`` = ``downsample``).
    """
    ox, oy = (float(v) for v in origin_level0_xy)
    m = float(downsample)
    return {
        "version": "0.5",
        "multiscales": [{
            "name": name,
            "axes": [
                {"name": "y", "type": "space", "unit": "micrometer"},
                {"name": "x", "type": "space", "unit": "micrometer"},
            ],
            "datasets": [{
                "path": "probability",
                "coordinateTransformations": [
                    {"type": "scale", "scale": [m * mpp, m * mpp]},
                    {"type": "translation", "translation": [(oy + m / 2 - 0.5) * mpp, (ox + m / 2 - 0.5) * mpp]},
                ],
            }],
        }],
    }


def read_heatmap_zarr(path: str | Path) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """``(probability, tissue or None, attrs)`` of a heatmap written by :func:`write_heatmap_zarr`."""
    import zarr

    path = Path(path)
    try:
        g = zarr.open_group(str(path), mode="r")
        attrs = dict(g.attrs)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable heatmap ({exc}); re-run 'wsi-pipeline classify'") from None
    if attrs.get("format") != HEATMAP_FORMAT:
        raise ValueError(f"{path}: not a wsi-pipeline heatmap (format {attrs.get('format')!r})")
    heat = np.asarray(g["probability"][:], np.float32)
    tissue = np.asarray(g["tissue"][:]).astype(bool) if "tissue" in g else None
    return heat, tissue, attrs
