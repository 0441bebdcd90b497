"""The ``classify`` command: score slides with a trained EM round, write predictions, heatmaps and a report.

Per slide (Li et al., stage 2): theta1 predicts every tissue tile; the K tiles
with the highest maximum pixel probability go to theta2; the slide probability
is the mean of theta2's K tile probabilities (:func:`pipeline.inference.score_slide`,
the same code the EM loop validates with). A slide is called positive when its
probability is at least the threshold: by default the one the run stored at
100 % sensitivity on its validation split, otherwise ``--threshold``.

Input
-----
* a folder of slides (or one slide, or a list file): tiled first with the
  **run's own** tiling settings into ``OUT/stores`` by :func:`pipeline.tile.run_tile`
  (``--workers`` / ``--scheduler`` parallelise this part; stores already there
  and current are skipped);
* a folder of tile stores (``*.zarr``) or one store: used as they are, but a
  store tiled with other settings than the run's (``config_hash``, tile size,
  resolution) is refused with the difference named.

Where the work runs: tiling goes through the executor of ``tile`` (worker threads,
a Dask LocalCluster of processes, or a Dask cluster);
scoring runs in this process, one slide after another, with batched inference
on the chosen device (CUDA when available) and ``--loader-workers`` DataLoader
processes reading tiles. One GPU is kept busy this way; slides are small work
units for a GPU, so spreading them over tiling workers would mostly duplicate the
models in memory. Under torchrun (``torchrun --nproc-per-node N wsi-pipeline classify ...``)
rank 0 takes the folder's lock and tiles; every rank scores its share of the slides
(balanced by tile count) on its own device and writes their files; rank 0 then gathers
the outcomes and writes ``predictions.csv``, the report and the run report.

Output folder ::

    OUT/predictions.csv           one row per scored slide (rebuilt from slides/*.json every run)
    OUT/report.html               one self-contained page for people
    OUT/classify-report.json      what happened to each slide in the last run and the jobs that ran beside it
                                  (reports/: each run's own)
    OUT/slides/<id>.json          per-slide result, written last (the slide's "done" marker)
    OUT/heatmaps/<id>.png         theta1 probability over the thumbnail
    OUT/heatmaps/<id>.zarr        the same as an array (see wsi.heatmap), with the tissue mask
    OUT/heatmaps/<id>_thumbnail.jpg
    OUT/regions/<id>.geojson      predicted positive regions for QuPath (level-0 px)
    OUT/detections/<id>.geojson   every tissue tile as a QuPath detection with measurements
                                  theta1_max, theta1_mean (and theta2_probability for the top-K)
    OUT/provenance.json           run, round, threshold and config behind predictions.csv
    OUT/tiles/<id>/NN.jpg         the top-K tiles, rank order
    OUT/stores/                   tile stores made from slide input

Object storage: SLIDES may be ``s3://...`` slides (staged, then tiled into
``OUT/stores``) or stores (read through zarr's FsspecStore); with ``--out s3://...``
everything is written in a local work folder under ``stage_dir`` and mirrored there
after each run (:func:`upload_outputs`; docs/design.md, "Object storage").

Re-running is cheap: a slide whose result was made with the same run, round,
store content and output options is skipped. Every file is written under a
temporary name and renamed. Several classify jobs may share OUT: each slide is
claimed with a lease (:mod:`pipeline.leases`) and scored by one of them, and the
folder-wide files are rebuilt by one job at a time from every job's results.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.batch import (
    BatchRun,
    RunReport,
    UsageError,
    ensure_writable_dir,
    record_matches,
    utc_now,
)
from pipeline.config import ClusterConfig, Config
from pipeline.distributed import Dist, session
from pipeline.leases import DEFAULT_TIMEOUT_S
from pipeline.run import RunDir
from wsi import __version__
from wsi.atomic import atomic_path, atomic_write_json, atomic_write_text
from wsi.objstore import as_location, is_url
from wsi.store import replace_dir, store_fingerprint, stores_lock

log = logging.getLogger("wsi_pipeline")

__all__ = ["run_classify", "resolve_threshold", "check_store_compatible", "check_stores_batch", "store_fingerprint",
           "detections_geojson", "RESULT_FORMAT"]

RESULT_FORMAT = "wsi-pipeline.classify-slide"
RESULT_FORMAT_VERSION = 1
REGION_CLASS = "Tumor (predicted)"
TILE_THUMB_PX = 128
#: QuPath classification of the tile detections.
DETECTION_CLASS = "Tile"


# --------------------------------------------------------------------------- run and threshold


def _round_arg(round_) -> str | int:
    r = str(round_).strip().lower()
    if r in ("best", "last"):
        return r
    if r.isdigit():
        return int(r)
    raise UsageError(f"--round {round_!r}: give 'best', 'last' or a round number (0, 1, ...)")


def resolve_threshold(threshold: float | None, run: RunDir, k: int, run_threshold: float | None) -> tuple[float, str]:
    """The decision threshold and a sentence saying where it came from.

    ``--threshold`` wins; otherwise the run's threshold at 100 % sensitivity on
    its validation split. Neither -> :class:`UsageError` (never a silent 0.5).
    """
    if threshold is not None:
        t = float(threshold)
        if not (0.0 <= t <= 1.0) or math.isnan(t):
            raise UsageError(f"--threshold {threshold}: must be a probability between 0 and 1")
        return t, "--threshold (given on the command line)"
    if run_threshold is None or (isinstance(run_threshold, float) and math.isnan(run_threshold)):
        raise UsageError(
            f"{run.round_dir(k) / 'metrics.json'}: the run stored no validation threshold (its labels had "
            "no 'val' split with positive slides); pass --threshold X (a probability, e.g. from your own validation)"
        )
    val = run.metrics(k, required=False).get("val") or {}
    spec = val.get("specificity_at_full_sensitivity")
    detail = f"{val.get('n_pos', '?')} positive / {val.get('n_neg', '?')} negative slides"
    if spec is not None:
        detail += f", specificity {spec:.3f} there"
    return float(run_threshold), f"run validation split, round {k}: 100% sensitivity ({detail})"


def _tiling_config(run: RunDir, meta: dict) -> Config:
    """The Config that tiles new slides exactly as the run's stores were tiled."""
    try:
        cfg = run.config(meta)
    except UsageError as exc:
        raise UsageError(
            f"{exc}; or tile the slides with the version the run was made with and pass the store folder"
        ) from None
    want = (meta.get("tiling") or {}).get("config_hash")
    if cfg.tiling_hash() != want:
        raise UsageError(
            f"{run.meta_path}: the run's stores have tiling hash {want}, but its recorded settings give "
            f"{cfg.tiling_hash()} with this software version {__version__}; tile the slides with the version "
            f"the run was made with ({meta.get('software_version')}) and pass the store folder"
        )
    return cfg


# --------------------------------------------------------------------------- stores


def check_store_compatible(store, run_tiling: dict) -> str | None:
    """None when the store was tiled as the run's stores were; else one line naming the difference."""
    what = _tiling_difference(store, run_tiling)
    if what is None:
        return None
    return f"{store.path}: tiled with other settings than the run's models expect: {what}; {_RETILE}"


_RETILE = ("pass the slides instead of the stores (classify then tiles them with the run's settings) "
           "or re-tile with the run's config")


def _tiling_difference(store, run_tiling: dict) -> str | None:
    """None when ``store`` was tiled with the run's settings; else what differs (without the store's name)."""
    a = store.attrs
    t = a.get("tiling") or {}
    have = {
        "config_hash": a.get("config_hash"),
        "tile_px": int(store.tile_px),
        "mpp": float(t.get("target_mpp", store.mpp)),
        "overlap_px": int(t.get("overlap_px", 0)),
    }
    want = {k: run_tiling.get(k) for k in have}
    if have["config_hash"] == want["config_hash"]:
        return None
    diffs = [f"{k} {have[k]} (run: {want[k]})" for k in ("tile_px", "mpp", "overlap_px") if want[k] is not None and have[k] != want[k]]
    return ", ".join(diffs) if diffs else f"tiling config hash {have['config_hash']} (run: {want['config_hash']}; tissue/codec settings differ)"


def check_stores_batch(src: Path, stores: list[Path], run_tiling: dict) -> None:
    """One :class:`UsageError` when every store fails the same compatibility check (a whole-batch
    mistake: the folder was tiled with other settings); stores that cannot be opened, or a mix of
    compatible and incompatible stores, are left to fail one by one."""
    from wsi.store import TileStore

    whats = set()
    for p in stores:
        try:
            what = _tiling_difference(TileStore(p), run_tiling)
        except Exception:  # a damaged store fails alone later, with its own reason
            return
        if what is None:
            return
        whats.add(what)
    if len(whats) == 1:
        raise UsageError(f"{src}: all {len(stores)} store(s) were tiled with other settings than the run's models "
                         f"expect: {whats.pop()}; {_RETILE}")


def _gather_stores(src: Path) -> list[Path] | None:
    """Stores named by ``src`` (a store or a folder of stores), or None when ``src`` names slides."""
    from wsi.slide import SLIDE_EXTENSIONS
    from wsi.store import STORE_SUFFIX, list_stores

    if is_url(src):
        return _gather_remote_stores(src)
    if not src.exists():
        raise UsageError(f"{src}: no such file or folder")
    if src.is_dir() and src.name.endswith(STORE_SUFFIX):
        return [src]
    if not src.is_dir():
        return None
    stores = list_stores(src)
    if not stores:
        return None
    slides = [p for p in src.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_EXTENSIONS]
    if slides:
        raise UsageError(
            f"{src}: holds both slides ({slides[0].name}, ...) and tile stores ({stores[0].name}, ...); "
            "pass a folder of one kind"
        )
    return stores


def _gather_remote_stores(src: str) -> list[str] | None:
    """:func:`_gather_stores` for object storage: a store, a prefix of stores, or None (slides there)."""
    from wsi.remote_store import store_exists
    from wsi.store import STORE_SUFFIX, list_stores

    if src.endswith(STORE_SUFFIX):
        if not store_exists(src):
            raise UsageError(f"{src}: no tile store here (no zarr.json)")
        return [src]
    return list_stores(src) or None


def _describe(exc: BaseException, where: str) -> str:
    """One line naming the store and what to do."""
    import errno

    from wsi.store import StoreError

    if isinstance(exc, (StoreError, UsageError)):
        return str(exc)
    msg = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"{where}: no space left on the device while writing its results; free space or choose another --out"
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EROFS):
        return f"{where}: permission denied ({exc.filename}); check the output folder is writable"
    if isinstance(exc, MemoryError) or "out of memory" in msg.lower():
        return f"{where}: out of memory while scoring ({msg or type(exc).__name__}); lower --batch-size"
    name = type(exc).__name__.lower()
    if any(k in name for k in ("jpeg", "decode", "codec")) or any(k in msg.lower() for k in ("jpeg", "decode", "corrupt")):
        return (
            f"{where}: reading tiles failed ({type(exc).__name__}: {msg}); the store is damaged: "
            "delete it and re-run (slide input re-tiles it) or re-run 'wsi-pipeline tile'"
        )
    return f"{where}: scoring failed ({type(exc).__name__}: {msg})"


# --------------------------------------------------------------------------- per slide


@dataclass
class _Ctx:
    run_dir: Path
    meta: dict
    rm: object  # RoundModels
    run_fp: str
    out: Path
    region_threshold: float
    geojson: bool
    batch_size: int
    loader_workers: int
    progress: bool

    @property
    def options(self) -> dict:
        return {"region_threshold": self.region_threshold, "geojson": self.geojson, "heatmap_reduce": "max",
                "detections": self.geojson}


def _rel(ctx: _Ctx, p: Path | None) -> str | None:
    return None if p is None else str(Path(p).relative_to(ctx.out))


def _result_path(out: Path, sid: str) -> Path:
    return out / "slides" / f"{sid}.json"


def _is_current(ctx: _Ctx, sid: str, fp: str) -> bool:
    res = _read_json_quiet(_result_path(ctx.out, sid))
    if not record_matches(res, RESULT_FORMAT, (RESULT_FORMAT_VERSION,), run_fingerprint=ctx.run_fp,
                          store_fingerprint=fp, options=ctx.options):
        return False
    files = [res.get("heatmap", {}).get(k) for k in ("png", "zarr", "thumbnail")]
    files += [t.get("image") for t in res.get("topk", [])]
    if ctx.geojson:
        files.append((res.get("regions") or {}).get("geojson"))
        files.append((res.get("detections") or {}).get("geojson"))
    return all(f and (ctx.out / f).exists() for f in files)


def _drop_result(out: Path, sid: str) -> None:
    """A slide that failed now loses its earlier result: otherwise it would come back in
    predictions.csv as a normal result once the slide leaves the input (its pictures stay
    until it is scored again)."""
    path = _result_path(out, sid)
    if path.exists():
        path.unlink()
        from wsi.atomic import fsync_dir

        fsync_dir(path.parent)
        log.warning("%s: removed its earlier result %s, as scoring it failed now", sid, path)


def _read_json_quiet(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _atomic_image(path: Path, img: np.ndarray, quality: int = 88) -> None:
    from PIL import Image

    with atomic_path(path, durable=False) as tmp:
        im = Image.fromarray(np.ascontiguousarray(img))
        if path.suffix.lower() in (".jpg", ".jpeg"):
            im.convert("RGB").save(str(tmp), format="JPEG", quality=quality)
        else:
            im.save(str(tmp), format="PNG", compress_level=3)


def _score_one(ctx: _Ctx, sid: str, store_path: Path, source: str) -> dict:
    """Score one store and write all its outputs; returns the result (also written to slides/<id>.json)."""
    import cv2

    from pipeline.inference import score_slide
    from wsi.heatmap import heatmap_regions, regions_geojson, store_heatmap, write_heatmap_zarr
    from wsi.preview import overlay_upscale, render_heatmap_overlay
    from wsi.store import TileStore

    t0 = time.perf_counter()
    st = TileStore(store_path)
    reason = check_store_compatible(st, ctx.meta.get("tiling") or {})
    if reason:
        raise UsageError(reason)
    fp = store_fingerprint(st)
    rm = ctx.rm
    r = score_slide(rm, st, batch_size=ctx.batch_size, loader_workers=ctx.loader_workers, progress=ctx.progress)
    out = ctx.out
    slide_attrs = st.attrs.get("slide") or {}
    m = st.mask_downsample
    thumb = st.thumbnail
    tile_l0 = st.tile_px * st.downsample
    maps = r["prob_maps"] if r["prob_maps"] is not None else np.zeros((0, 1, 1), np.float16)
    heat, tissue, origin = store_heatmap(st, maps)

    # top-K tiles
    tiles_dir = out / "tiles" / sid
    tmp_tiles = out / "tiles" / f".tmp-{sid}-{uuid.uuid4().hex[:8]}"
    topk = []
    idx = np.asarray(r["topk_indices"], np.int64)
    imgs = st.read(idx) if len(idx) else []
    for rank, (i, img) in enumerate(zip(idx, imgs), start=1):
        small = cv2.resize(img, (TILE_THUMB_PX, TILE_THUMB_PX), interpolation=cv2.INTER_AREA) if img.shape[0] > TILE_THUMB_PX else img
        _atomic_image(tmp_tiles / f"{rank:02d}.jpg", small, quality=85)
        x, y = (int(v) for v in st.coords[i])
        topk.append({
            "rank": rank,
            "tile_index": int(i),
            "x_level0_px": x,
            "y_level0_px": y,
            "size_level0_px": round(float(tile_l0), 3),
            "theta1_max": float(r["topk_max_probs"][rank - 1]),
            "theta2_probability": float(r["topk_scores"][rank - 1]),
            "image": _rel(ctx, tiles_dir / f"{rank:02d}.jpg"),
        })
    tmp_tiles.mkdir(parents=True, exist_ok=True)
    replace_dir(tmp_tiles, tiles_dir)

    # heatmap pictures and array
    hdir = out / "heatmaps"
    png, thumb_path, zpath = hdir / f"{sid}.png", hdir / f"{sid}_thumbnail.jpg", hdir / f"{sid}.zarr"
    f = overlay_upscale(thumb)
    big = cv2.resize(thumb, (thumb.shape[1] * f, thumb.shape[0] * f), interpolation=cv2.INTER_CUBIC) if f > 1 else thumb
    _atomic_image(thumb_path, big, quality=88)
    _atomic_image(png, render_heatmap_overlay(thumb, heat, tissue, ctx.region_threshold))
    covered = ~np.isnan(heat)
    heat_t = np.where(tissue & covered, heat, np.nan)
    pos_px = int((np.nan_to_num(heat_t, nan=0.0) >= ctx.region_threshold).sum())
    tissue_px = int(tissue.sum())
    hattrs = {
        "slide_id": sid,
        "downsample": m,
        "origin_level0_xy": list(origin),
        "slide_width_px": slide_attrs.get("width"),
        "slide_height_px": slide_attrs.get("height"),
        "mpp": slide_attrs.get("mpp"),
        "value": "theta1 positive probability, maximum over overlapping tiles; NaN = no tile",
        "pixel_rule": "pixel (r, c) covers level-0 [ox + c*downsample, ox + (c+1)*downsample) x [oy + r*downsample, ...)",
        "run_dir": str(ctx.run_dir.resolve()),
        "round": rm.round,
        "software_version": __version__,
    }
    write_heatmap_zarr(zpath, heat, tissue, hattrs)

    # positive regions for QuPath
    regions_info = {"threshold": ctx.region_threshold, "geojson": None, "n_regions": 0, "area_level0_px2": 0.0}
    if ctx.geojson:
        regs = heatmap_regions(heat, ctx.region_threshold, downsample=m, origin_level0_xy=origin, within=tissue)
        gj = regions_geojson(regs, name=REGION_CLASS)
        gpath = out / "regions" / f"{sid}.geojson"
        atomic_write_text(gpath, json.dumps(gj))
        regions_info.update({
            "geojson": _rel(ctx, gpath),
            "n_regions": len(regs),
            "area_level0_px2": round(float(sum(x["polygon"].area for x in regs)), 1),
        })
    detections_info = {"geojson": None, "n_detections": 0}
    if ctx.geojson:
        tile_means = maps.reshape(len(maps), -1).astype(np.float32).mean(axis=1) if len(maps) else np.zeros(0)
        theta2 = {int(i): float(v) for i, v in zip(idx, r["topk_scores"])}
        dj = detections_geojson(st.coords, tile_l0, r["tile_max_probs"], tile_means, theta2)
        dpath = out / "detections" / f"{sid}.geojson"
        atomic_write_text(dpath, json.dumps(dj, separators=(",", ":")))
        detections_info = {"geojson": _rel(ctx, dpath), "n_detections": len(dj["features"])}

    prob = r["probability"]
    result = {
        "format": RESULT_FORMAT,
        "format_version": RESULT_FORMAT_VERSION,
        "slide_id": sid,
        "source": source,
        "store": str(store_path) if is_url(store_path) else str(Path(store_path).resolve()),
        "store_fingerprint": fp,
        "run_dir": str(ctx.run_dir.resolve()),
        "run_fingerprint": ctx.run_fp,
        "round": rm.round,
        "options": ctx.options,
        "status": "scored" if r["n_tiles"] else "no tissue",
        "probability": None if prob is None or math.isnan(prob) else float(prob),  # full precision: compared with >=
        "n_tiles": r["n_tiles"],
        "top_k": rm.top_k,
        "topk": topk,
        "tile_px": st.tile_px,
        "mpp": st.mpp,
        "heatmap": {
            "png": _rel(ctx, png),
            "zarr": _rel(ctx, zpath),
            "thumbnail": _rel(ctx, thumb_path),
            "downsample": m,
            "origin_level0_xy": list(origin),
            "shape": list(heat.shape),
            "max_probability": None if not covered.any() else round(float(np.nanmax(heat)), 6),
            "positive_fraction_of_tissue": round(pos_px / tissue_px, 6) if tissue_px else 0.0,
        },
        "regions": regions_info,
        "detections": detections_info,
        "device": str(rm.device),
        "seconds": round(time.perf_counter() - t0, 3),
        "scored_utc": utc_now(),
        "software_version": __version__,
    }
    atomic_write_json(_result_path(out, sid), result)
    return result


def detections_geojson(coords_level0_xy, tile_size_level0_px: float, theta1_max, theta1_mean,
                       theta2_by_tile: dict[int, float] | None = None, *, name: str = DETECTION_CLASS) -> dict:
    """Every tile as a QuPath detection (File > Import objects): a square in level-0 px with measurements
    ``theta1_max``, ``theta1_mean`` and, for the tiles theta2 scored (the top-K), ``theta2_probability``,
    so QuPath's Measurement Maps can colour them."""
    theta2_by_tile = theta2_by_tile or {}
    s = float(tile_size_level0_px)
    feats = []
    for i, ((x, y), mx, mn) in enumerate(zip(np.asarray(coords_level0_xy).tolist(), np.asarray(theta1_max).tolist(),
                                             np.asarray(theta1_mean).tolist())):
        x, y = float(x), float(y)
        meas = {"theta1_max": round(float(mx), 4), "theta1_mean": round(float(mn), 4)}
        if i in theta2_by_tile:
            meas["theta2_probability"] = round(theta2_by_tile[i], 4)
        feats.append({
            "type": "Feature",
            "id": str(uuid.uuid4()),
            "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]]},
            "properties": {"objectType": "detection", "classification": {"name": name, "color": [90, 90, 200]},
                           "isLocked": False, "tile_index": i, "measurements": meas},
        })
    return {"type": "FeatureCollection", "features": feats}


# --------------------------------------------------------------------------- entry point


def run_classify(
    slides: str | Path,
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    round_: str | int = "best",
    threshold: float | None = None,
    device: str | None = "auto",
    batch_size: int | None = None,
    loader_workers: int | None = None,
    workers: int | None = None,
    processes: bool | None = None,
    scheduler: str | None = None,
    cluster: str = "local",
    cluster_config: ClusterConfig | None = None,
    mpp_overrides: dict | None = None,
    assume_mpp: float | None = None,
    region_threshold: float = 0.5,
    geojson: bool = True,
    labels: str | Path | None = None,
    quiet: bool = False,
    progress: bool = True,
    lease_timeout: float | None = None,
    stage_dir: str | Path | None = None,
    stage_cache_gb: float | None = None,
) -> RunReport:
    """Classify every slide (or store) in ``slides`` with a round of ``run_dir``; outputs go to ``out_dir``.

    ``round_`` is ``'best'`` (default), ``'last'`` or a round number; ``threshold``
    overrides the run's validation threshold. ``labels`` (a labels CSV) adds the truth,
    the ROC with AUC and the confusion counts at the threshold to ``report.html``.

    Returns the run report (also written as ``OUT/classify-report.json``); slides
    that failed are in it with one line each and never stop the others. Several runs may
    share ``out_dir``: each slide is claimed with a lease (:mod:`pipeline.leases`;
    ``lease_timeout`` seconds without a refresh make another run's lease stale), a slide
    another live run holds is left to it (``"busy"``), and ``predictions.csv`` and
    ``report.html`` are rebuilt from every result under the folder's mutex. ``slides`` and ``out_dir``
    may be object storage URLs; ``stage_dir`` / ``stage_cache_gb`` say where this machine stages
    slides and keeps the local copy of an object storage ``out_dir`` (default ``~/.cache/wsi-pipeline``, 100 GB).

    Tiling runs as :func:`pipeline.tile.run_tile` runs it (``workers``, ``processes``, ``scheduler``,
    ``cluster``); ``cluster="slurm"`` starts SLURM jobs of ``cluster_config`` (default: the cluster
    section's defaults, never the run's: where to run belongs to this machine, not to the run).

    Raises
    ------
    UsageError
        No run / unfinished round / no threshold available, no inputs, an
        unwritable or locked output folder.
    """
    from pipeline.inference import load_round

    t_run = time.perf_counter()
    run_dir, out = Path(run_dir), as_location(out_dir)
    if not 0.0 < region_threshold <= 1.0:
        raise UsageError(f"--region-threshold {region_threshold}: must be in (0, 1]")
    # cheap checks first, the models last
    src = as_location(slides)
    stores = _gather_stores(src)
    which = _round_arg(round_)
    label_of = _read_labels(labels) if labels is not None else None
    run = RunDir(run_dir)
    meta = run.read_meta()
    cfg = run.config(meta)
    tiling_cfg = _tiling_config(run, meta) if stores is None else None
    if tiling_cfg is not None:
        tiling_cfg.cluster = cluster_config if cluster_config is not None else ClusterConfig()
    if stores is not None:
        check_stores_batch(src, stores, meta.get("tiling") or {})
    bs = int(batch_size if batch_size is not None else cfg.em.predict_batch_size)
    lw = int(loader_workers if loader_workers is not None else cfg.runtime.loader_workers)
    if bs < 1 or lw < 0:
        raise UsageError("--batch-size must be >= 1 and --loader-workers >= 0")
    with session(device or "auto", cfg.runtime.dist_timeout_s) as (d, dev):
        rm = load_round(run_dir, which, device=dev)
        thr, thr_source = resolve_threshold(threshold, run, rm.round, rm.threshold_at_full_sensitivity)
        stage = _stage_options(stage_dir, stage_cache_gb)
        out, remote_out = d.main_only(lambda: _local_out(out, stage))
        show = progress and not quiet and d.is_main
        settings = {
            "input": str(src),
            "input_kind": "stores" if stores is not None else "slides",
            "run_dir": str(run_dir.resolve()),
            "round": rm.round,
            "round_requested": str(round_),
            "threshold": thr,
            "threshold_source": thr_source,
            "region_threshold": region_threshold,
            "device": str(rm.device),
            "batch_size": bs,
            "loader_workers": lw,
            "workers": workers,
            "scheduler": scheduler,
            "cluster": cluster,
            "out": remote_out or str(out),
            **({"work_dir": str(out)} if remote_out else {}),
        }
        if d.enabled:
            settings["world_size"] = d.world
        timeout = DEFAULT_TIMEOUT_S if lease_timeout is None else float(lease_timeout)
        job = _Job(src, stores, tiling_cfg, out, dict(workers=workers, processes=processes, scheduler=scheduler,
                                                      cluster=cluster, mpp_overrides=mpp_overrides,
                                                      assume_mpp=assume_mpp, quiet=quiet, progress=progress,
                                                      lease_timeout=timeout, **stage), remote_out)

        def new_batch(**kw):
            return BatchRun("classify", out, settings, lease_timeout=timeout, **kw)

        with d.held_by_main(lambda: new_batch(progress=show, t0=t_run)) as batch:
            # other ranks claim their slides' leases (refreshed while they score) but are not a job of their own
            batch = batch if d.is_main else new_batch(progress=False)
            with contextlib.nullcontext() if d.is_main else batch.leases:
                run_fp = run.fingerprint(rm.round, meta)
                todo = d.main_only(lambda: _prepare(job, batch), what="rank 0 preparing the slides")
                ctx = _Ctx(run_dir, meta, rm, run_fp, out, float(region_threshold), bool(geojson), bs, lw, show)
                log.info("scoring %d slide(s) with round %d of %s on %s (threshold %.4f: %s)",
                         len(todo), rm.round, run_dir, rm.device, thr, thr_source)
                _score_shard(ctx, batch, todo, d)
            d.main_only(lambda: _write_outputs(batch, run, meta, rm, thr, thr_source, round_, out, run_fp, labels,
                                               label_of, remote_out), what="rank 0 writing predictions.csv and the report")
        return d.main_only(lambda: batch.report)


@dataclass
class _Job:
    """What rank 0 needs to turn the input into stores to score."""

    src: Path
    stores: list[Path] | None
    tiling_cfg: Config | None
    out: Path
    tile_options: dict
    remote_out: str | None = None


def _prepare(job: _Job, batch: BatchRun) -> list[tuple[str, Path, str]]:
    """Rank 0: clean what a stopped run left, tile slide input with the run's settings; the stores to score
    as ``(slide_id, store, source)``."""
    batch.clean(".", "slides", "heatmaps", "regions", "detections", "tiles")  # leftovers of an interrupted run (never stores/)
    if job.stores is None:
        return _tile_first(batch, job.src, job.out, job.tiling_cfg, job.tile_options, job.remote_out)
    from wsi.remote_store import slide_id_of

    return [(slide_id_of(str(p)), p, str(p)) for p in job.stores]


def _local_out(out, stage: dict) -> tuple[Path, str | None]:
    """The local output folder, and the object storage URL it is mirrored to (None for a local ``--out``);
    see docs/design.md, "Object storage"."""
    if not is_url(out):
        return ensure_writable_dir(out, "output folder", "--out"), None
    from pipeline.tile import work_dir_for
    from wsi.objstore import Remote

    Remote(out).check_writable()
    return ensure_writable_dir(work_dir_for(out, stage["stage_dir"]), "local work folder", "--stage-dir"), out


def _tile_count(store_path: Path) -> int:
    """A store's tile count, for sharing slides between ranks (0 when it cannot be read: it fails alone later)."""
    from wsi.store import TileStore

    try:
        return len(TileStore(store_path))
    except Exception:  # noqa: BLE001 -- a damaged store is reported by the rank that scores it
        return 0


def _score_shard(ctx: _Ctx, batch: BatchRun, todo: list[tuple[str, Path, str]], d: Dist) -> None:
    """Score this rank's share of ``todo`` (all of it in one process); rank 0's report gets every outcome."""
    mine = d.shard(todo, [_tile_count(sp) for _, sp, _ in todo] if d.enabled else None)
    batch.start(len(mine))
    with d.agree("scoring slides"):
        _score_all(ctx, batch, mine)
    others = d.gather([] if d.is_main else batch.report.slides)
    if d.is_main:
        for outcomes in others[1:]:
            batch.report.slides.extend(outcomes)
    batch.report.slides.sort(key=lambda s: s.slide_id)


def _write_outputs(batch: BatchRun, run: RunDir, meta: dict, rm, thr: float, thr_source: str, round_, out: Path,
                   run_fp: str, labels, label_of, remote_out: str | None = None) -> None:
    """Rank 0: the folder's files from every job's results, one job at a time (then mirrored to ``remote_out``)."""
    provenance = _provenance(run, meta, rm, thr, thr_source, round_)
    if labels is not None:
        provenance["labels"] = str(Path(labels).resolve())
    with batch.mutex():
        _write_folder_outputs(batch, out, run_fp, provenance, label_of)
        if remote_out:
            upload_outputs(out, remote_out)
            for key, name in (("predictions", "predictions.csv"), ("report_html", "report.html")):
                batch.report.settings[key] = f"{remote_out}/{name}"


def _stage_options(stage_dir, stage_cache_gb) -> dict:
    """Where object storage work goes on this machine: ``--stage-dir`` / ``--stage-cache-gb``, else the
    built-in defaults (never the run's recorded runtime settings: those are the training machine's)."""
    from pipeline.config import RuntimeConfig
    from wsi.staging import default_cache_root

    return {"stage_dir": Path(stage_dir).expanduser() if stage_dir else default_cache_root(),
            "stage_cache_gb": RuntimeConfig().stage_cache_gb if stage_cache_gb is None else float(stage_cache_gb)}


#: Uploaded in this order, so that a reader of the object storage folder never finds a result (or
#: predictions.csv) whose pictures are not there yet: pictures, then slides/<id>.json, then the folder files.
_UPLOAD_LAST = ("slides/",)
UPLOADED_RECORD = ".uploaded.json"


def upload_outputs(out: Path, remote_url: str) -> int:
    """Mirror ``out``'s outputs (hidden names, leases and temporaries excluded) to ``remote_url``: files new
    or changed since the last upload are uploaded, files gone since are deleted there; returns files uploaded."""
    from wsi.objstore import Remote

    record_path = out / UPLOADED_RECORD
    before = _read_json_quiet(record_path) or {}
    now = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_file() and not any(part.startswith(".") for part in rel.split("/")):
            st = p.stat()
            now[rel] = [st.st_size, st.st_mtime_ns]
    changed = [rel for rel, v in now.items() if before.get(rel) != v]
    tiers = ([r for r in changed if "/" in r and not r.startswith(_UPLOAD_LAST)],
             [r for r in changed if r.startswith(_UPLOAD_LAST)], [r for r in changed if "/" not in r])
    r = Remote(remote_url)
    r.rm(sorted(set(before) - set(now)))
    for tier in tiers:
        r.put([(out / rel, rel) for rel in tier])
    atomic_write_json(record_path, now)
    return len(changed)


def _tile_first(batch: BatchRun, src, out: Path, tiling_cfg: Config, options: dict,
                remote_out: str | None = None) -> list[tuple[str, Path | str, str]]:
    """Tile the slides into ``out/stores`` (``remote_out/stores`` for an object storage ``--out``) with the
    run's settings; returns ``(slide_id, store, source)`` to score. Slides whose tiling failed are recorded
    as failed, those another job is tiling as busy."""
    from pipeline.tile import run_tile
    from wsi.store import store_path_for

    stores_dir = f"{remote_out}/stores" if remote_out else out / "stores"
    log.info("tiling the slides of %s into %s with the run's tiling settings", src, stores_dir)
    try:
        trep = run_tile(src, stores_dir, tiling_cfg, **options)
    except UsageError as exc:
        if "no slides found" in str(exc):
            raise UsageError(f"{exc}; or pass a folder of tile stores (*.zarr)") from None
        raise
    batch.report.settings["tiling_report"] = f"{stores_dir}/tile-report.json"
    todo = []
    for o in trep.slides:
        if o.status == "failed":
            with _holding(batch, o.slide_id) as ours:
                if ours:
                    _drop_result(out, o.slide_id)
            batch.outcome(o.slide_id, o.path, "failed", f"tiling failed: {o.reason}", o.seconds)
        elif o.status == "busy":
            batch.outcome(o.slide_id, o.path, "busy", f"tiling: {o.reason}")
        else:
            todo.append((o.slide_id, store_path_for(stores_dir, o.slide_id), o.path))
    return todo


@contextlib.contextmanager
def _holding(batch: BatchRun, sid: str):
    """Claim ``sid`` for the block; yields whether this run holds it (then it is released after)."""
    got = batch.claim(sid)
    try:
        yield got.ok
    finally:
        if got.ok:
            batch.release(sid)


def _write_folder_outputs(batch: BatchRun, out: Path, run_fp: str, provenance: dict, label_of) -> None:
    """``predictions.csv``, ``provenance.json``, ``report.html`` and ``classify-report.json`` from every
    result in ``out/slides`` and the outcomes of the runs that overlapped this one (call under the mutex)."""
    from pipeline.report import write_predictions_csv, write_report_html

    report = batch.report
    failures = [(s["slide_id"], s["reason"]) for s in batch.merged()["slides"] if s["status"] == "failed"]
    results, others = collect_results(out, run_fp)
    # a slide that failed now is listed as failed, not with an older result of a previous file/store
    failed_now = {sid for sid, _ in failures}
    results = [r for r in results if r["slide_id"] not in failed_now]
    if others:
        log.warning("%d earlier result(s) in %s/slides were made with another run or round and are left out of "
                    "predictions.csv and report.html: %s", len(others), out, ", ".join(others[:5]))
    plain = {k: v for k, v in provenance.items() if k != "labels"}
    write_predictions_csv(out / "predictions.csv", results, plain["threshold"], plain["threshold_source"], plain)
    atomic_write_json(out / "provenance.json", plain)
    write_report_html(out / "report.html", results, provenance, out, failures=failures, labels=label_of)
    report.settings["predictions"] = str(out / "predictions.csv")
    report.settings["report_html"] = str(out / "report.html")
    report.settings["slides_in_predictions"] = len(results)
    batch.publish()


def _read_labels(path: str | Path) -> dict[str, int]:
    """slide_id -> 0/1 from a labels CSV (split ignored: the report shows every labelled slide)."""
    from pipeline.labels import read_labels_csv

    return {sid: int(y) for sid, y, _ in read_labels_csv(path)}



def _score_all(ctx: _Ctx, batch: BatchRun, todo: list[tuple[str, Path, str]]) -> None:
    """Score each store in turn; one bad slide never stops the others, and a slide another job holds is left to it.

    Each slide is read under its store folder's shared lock, so a cron ``tile`` into the same
    folder waits for that slide instead of swapping its store midway."""
    for sid, store_path, source in todo:
        got = batch.claim(sid)
        if not got.ok:
            batch.outcome(sid, source, "busy", f"being scored by another job ({got.holder})")
            continue
        try:
            with stores_lock(_parent(store_path), exclusive=False):
                _score_or_skip(ctx, batch, sid, store_path, source)
        finally:
            batch.release(sid)


def _parent(store_path):
    return store_path.rsplit("/", 1)[0] if is_url(store_path) else Path(store_path).parent


def _score_or_skip(ctx: _Ctx, batch: BatchRun, sid: str, store_path: Path, source: str) -> None:
    t0 = time.perf_counter()
    try:
        from wsi.store import TileStore

        st = TileStore(store_path)
        if _is_current(ctx, sid, store_fingerprint(st)):
            res = _read_json_quiet(_result_path(ctx.out, sid))
            batch.outcome(sid, source, "skipped", "already scored with this run, round and store",
                          time.perf_counter() - t0, probability=res.get("probability"))
            return
        res = _score_one(ctx, sid, store_path, source)
        secs = time.perf_counter() - t0
        batch.outcome(sid, source, "done", "" if res["n_tiles"] else "no tissue tiles", secs,
                      probability=res["probability"], n_tiles=res["n_tiles"])
        log.info("scored %s: probability %s (%d tiles, %.1f s)", sid,
                 "n/a" if res["probability"] is None else f"{res['probability']:.4f}", res["n_tiles"], secs)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # one bad slide never stops the others
        _drop_result(ctx.out, sid)
        batch.outcome(sid, source, "failed", _describe(exc, str(store_path)), time.perf_counter() - t0)


def collect_results(out: Path, run_fp: str) -> tuple[list[dict], list[str]]:
    """Per-slide results in ``out/slides`` made with ``run_fp`` (sorted by probability, highest first),
    and the ids of results from another run or round."""
    keep, others = [], []
    for p in sorted((Path(out) / "slides").glob("*.json")):
        if p.name.startswith("."):
            continue
        res = _read_json_quiet(p)
        if not res or res.get("format") != RESULT_FORMAT:
            continue
        if res.get("run_fingerprint") == run_fp:
            keep.append(res)
        else:
            others.append(res.get("slide_id", p.stem))
    keep.sort(key=lambda r: (r.get("probability") is None, -(r.get("probability") or 0.0), r["slide_id"]))
    return keep, others


def _provenance(run: RunDir, meta: dict, rm, thr: float, thr_source: str, round_requested) -> dict:
    metrics = run.metrics(rm.round, required=False)
    return {
        "software_version": __version__,
        "generated_utc": utc_now(),
        "run_dir": str(run.path.resolve()),
        "run_created_utc": meta.get("created_utc"),
        "run_software_version": meta.get("software_version"),
        "run_mode": meta.get("mode"),
        "run_train_hash": meta.get("train_hash"),
        "round": rm.round,
        "round_requested": str(round_requested),
        "best_round": meta.get("best_round"),
        "threshold": thr,
        "threshold_source": thr_source,
        "top_k": rm.top_k,
        "seg_arch": rm.config.model.seg_arch,
        "cls_arch": rm.config.model.cls_arch,
        "tiling": meta.get("tiling"),
        "validation": {k: v for k, v in (metrics.get("val") or {}).items() if k != "slides"},
        "stage2_loss": metrics.get("stage2_loss"),
        "slide_score": rm.config.stage2.slide_score,
        "warnings": list(metrics.get("warnings") or []),
        "device": str(rm.device),
        "config": rm.config.to_dict(),
    }
