"""The tiling stage: slides -> tissue mask -> tile grid -> Zarr tile stores.

Per slide the work splits into three kinds of task, all run where the slide
is readable (a Dask worker, or this process):

1. :func:`plan_slide`   open the slide, find its resolution, compute the tissue
   mask on a low-resolution level, lay the global grid, keep tissue tiles, and
   create the store under a temporary name (everything but the pixels);
2. :func:`tile_block`   for a block of neighbouring tiles, read the source
   pixels once (fast TIFF path or OpenSlide), cut, encode and write the tiles;
3. :func:`finalize_slide` mark the store complete and rename it into place.

The driver (:func:`run_tile`) only moves small dicts around, keeps the run
report, and makes a failed slide fail alone.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.batch import (
    RunLock,
    RunReport,
    SlideOutcome,
    UsageError,
    check_unique_ids,
    discover_slides,
    ensure_writable_dir,
    utc_now,
)
from pipeline.config import Config
from pipeline.executor import future_error, make_executor
from wsi import __version__
from wsi.grid import group_blocks, make_grid, select_tiles, tissue_fractions
from wsi.preview import draw_tissue_overlay, save_png
from wsi.slide import (
    LevelChoice,
    SlideError,
    choose_level,
    file_fingerprint,
    file_stat,
    open_slide,
    read_lowres,
    read_region_rgb,
    slide_id_for,
    slide_info,
)
from wsi.store import (
    FORMAT_NAME,
    FORMAT_VERSION,
    TileWriter,
    create_store,
    finalize_store,
    read_store_attrs,
    store_bytes,
    store_path_for,
    temp_store_path,
)

log = logging.getLogger("wsi_pipeline")

FAILED_MARKER = ".failed"


@dataclass(frozen=True)
class TileJob:
    """Everything a worker needs to tile one slide (small and picklable)."""

    path: str
    slide_id: str
    store_dir: str
    config: Config
    mpp_overrides: dict | None = None
    assume_mpp: float | None = None


# --------------------------------------------------------------------------- errors


def describe_error(exc: BaseException, path: str) -> str:
    """One line that names the file and what to do."""
    import openslide

    if isinstance(exc, SlideError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"{path}: no space left on the device while writing its store; free space or choose another --out"
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EROFS):
        return f"{path}: permission denied ({exc.filename}); check the output folder is writable"
    if isinstance(exc, openslide.OpenSlideError):
        return (
            f"{path}: reading pixels failed ({exc}); the slide file is damaged or truncated: "
            "re-export or re-scan it"
        )
    try:
        from wsi.fastread import TileDecodeError

        if isinstance(exc, TileDecodeError):
            return f"{exc}; the slide file is damaged or truncated: re-export or re-scan it"
    except ImportError:  # pragma: no cover
        pass
    return f"{path}: {type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- worker tasks


def _existing_store_is_current(job: TileJob, config_hash: str) -> tuple[bool, dict | None]:
    final = store_path_for(job.store_dir, job.slide_id)
    attrs = read_store_attrs(final)
    if not attrs or not attrs.get("complete") or attrs.get("format") != FORMAT_NAME:
        return False, None
    if attrs.get("format_version") != FORMAT_VERSION or attrs.get("config_hash") != config_hash:
        return False, None
    src = attrs.get("slide", {})
    size, mtime = file_stat(job.path)
    if src.get("size_bytes") != size:
        return False, None
    if src.get("mtime") == mtime:
        return True, attrs
    # Touched or copied: trust the content, not the clock.
    return src.get("fingerprint") == file_fingerprint(job.path), attrs


def _open_fast_reader(path: str, level_dims: tuple[int, int]):
    from wsi.fastread import TiffLevelReader, UnsupportedSlide

    try:
        return TiffLevelReader.open(path, level_dims), None
    except UnsupportedSlide as exc:
        return None, str(exc)


def plan_slide(job: TileJob) -> dict:
    """Mask, grid and an empty store under a temporary name (or 'skipped')."""
    t0 = time.perf_counter()
    cfg = job.config
    tcfg, mcfg, scfg = cfg.tiling, cfg.tissue, cfg.store
    config_hash = cfg.tiling_hash()
    current, attrs = _existing_store_is_current(job, config_hash)
    if current:
        return {"status": "skipped", "n_tiles": attrs.get("n_tiles", 0), "reason": "unchanged slide and tiling config"}

    size, mtime = file_stat(job.path)
    slide = open_slide(job.path)
    try:
        info = slide_info(slide, job.path, mpp_overrides=job.mpp_overrides, assume_mpp=job.assume_mpp)
        choice = choose_level(info.mpp, info.level_downsamples, tcfg.mpp, tolerance=tcfg.mpp_tolerance)
        lowres, mask_ds = read_lowres(slide, info, mcfg.mask_mpp)
    finally:
        slide.close()
    fingerprint = file_fingerprint(job.path)
    tissue = _tissue(lowres, info.mpp * mask_ds, cfg)

    grid = make_grid(info.bounds_xywh, choice.downsample, tcfg.tile_px, tcfg.stride_px)
    fractions_grid = tissue_fractions(tissue.mask, mask_ds, grid)
    cols_rows = select_tiles(fractions_grid, tcfg.min_tissue_fraction) if tissue.mask.any() else np.empty((0, 2), np.int64)
    coords = grid.level0_xy(cols_rows)
    fractions = fractions_grid[cols_rows[:, 1], cols_rows[:, 0]] if len(cols_rows) else np.empty(0, np.float32)

    read_path, fallback_reason = "openslide", ""
    if tcfg.fast_read and len(coords):
        reader, fallback_reason = _open_fast_reader(job.path, info.level_dimensions[choice.level])
        if reader is not None:
            reader.close()
            read_path = "fast-tiff"

    attrs = {
        "slide": {
            **info.to_dict(),
            "size_bytes": size,
            "mtime": mtime,
            "fingerprint": fingerprint,
        },
        "tiling": {
            "target_mpp": tcfg.mpp,
            "effective_mpp": choice.effective_mpp,
            "level": choice.level,
            "level_downsample": choice.level_downsample,
            "scale": choice.scale,
            "downsample": choice.downsample,
            "tile_px": tcfg.tile_px,
            "overlap_px": tcfg.overlap_px,
            "stride_px": tcfg.stride_px,
            "min_tissue_fraction": tcfg.min_tissue_fraction,
            "pad_value": tcfg.pad_value,
            "grid": grid.to_dict(),
            "read_path": read_path,
            "fast_read_fallback_reason": fallback_reason,
        },
        "tissue": {
            **{k: getattr(mcfg, k) for k in mcfg.__dataclass_fields__},
            "mask_downsample": mask_ds,
            "threshold": tissue.threshold,
            "otsu_threshold": tissue.otsu_threshold,
            "tissue_fraction": tissue.tissue_fraction,
        },
        "config_hash": config_hash,
        "software": {"name": "wsi-pipeline", "version": __version__},
        "created_utc": utc_now(),
    }
    tmp = temp_store_path(job.store_dir, job.slide_id)
    create_store(
        tmp,
        tile_px=tcfg.tile_px,
        coords=coords,
        cols_rows=cols_rows,
        tissue_fraction=fractions,
        mask=tissue.mask,
        thumbnail=lowres,
        codec=scfg.codec,
        jpeg_quality=scfg.jpeg_quality,
        zstd_level=scfg.zstd_level,
        attrs=attrs,
    )
    boxes = np.concatenate(
        [(coords - np.asarray(info.bounds_xywh[:2])) / mask_ds, np.full((len(coords), 2), grid.tile_level0 / mask_ds)], axis=1
    ) if len(coords) else None
    save_png(tmp / "overlay.png", draw_tissue_overlay(lowres, tissue.mask, boxes), max_side=4096)
    save_png(tmp / "mask.png", tissue.mask, max_side=4096)
    blocks = [b.tolist() for b in group_blocks(cols_rows, tcfg.block_tiles)]
    return {
        "status": "planned",
        "tmp": str(tmp),
        "blocks": blocks,
        "n_tiles": int(len(coords)),
        "choice": choice,
        "read_path": read_path,
        "level_dimensions": info.level_dimensions[choice.level],
        "mpp": info.mpp,
        "mpp_source": info.mpp_source,
        "seconds": time.perf_counter() - t0,
    }


def _tissue(lowres: np.ndarray, mpp: float, cfg: Config):
    from wsi.tissue import tissue_mask

    m = cfg.tissue
    return tissue_mask(
        lowres,
        mpp,
        channel=m.channel,
        blur_um=m.blur_um,
        min_threshold=m.min_threshold,
        max_background_value=m.max_background_value,
        close_um=m.close_um,
        open_um=m.open_um,
        max_hole_area_um2=m.max_hole_area_um2,
        min_tissue_area_um2=m.min_tissue_area_um2,
    )


def read_tiles(
    path: str,
    coords: np.ndarray,
    choice: LevelChoice,
    tile_px: int,
    *,
    pad_value: int = 255,
    read_path: str = "openslide",
    level_dimensions: tuple[int, int] | None = None,
) -> np.ndarray:
    """Read tiles at level-0 ``coords`` as (n, tile_px, tile_px, 3) uint8.

    Each tile is the level ``choice.level`` region of ``round(tile_px * scale)``
    pixels from the tile's level-0 corner, resized to ``tile_px`` when the level
    does not match the target resolution. Pixels beyond the slide are
    ``pad_value``. ``read_path='fast-tiff'`` decodes the source tiles directly,
    each once for the whole call; it needs the level's ``level_dimensions``
    (width, height), looked up with OpenSlide when not given.
    """
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    size_l = max(1, int(round(tile_px * choice.scale)))
    lxy = np.rint(coords / choice.level_downsample).astype(np.int64)
    n = len(coords)
    out = np.empty((n, tile_px, tile_px, 3), np.uint8)
    if n == 0:
        return out
    regions: list[np.ndarray]
    if read_path == "fast-tiff":
        from wsi.fastread import TiffLevelReader

        dims = level_dimensions
        if dims is None:
            import openslide

            with openslide.OpenSlide(path) as s:
                dims = s.level_dimensions[choice.level]
        with TiffLevelReader.open(path, tuple(dims)) as reader:
            regions = reader.read_regions([(int(x), int(y), size_l, size_l) for x, y in lxy], fill=pad_value)
    else:
        slide = open_slide(path)
        try:
            regions = _openslide_regions(slide, coords, lxy, choice, size_l, pad_value)
        finally:
            slide.close()
    for k, reg in enumerate(regions):
        if size_l != tile_px:
            interp = cv2.INTER_AREA if size_l > tile_px else cv2.INTER_LINEAR
            reg = cv2.resize(reg, (tile_px, tile_px), interpolation=interp)
        out[k] = reg
    return out


def _openslide_regions(slide, coords, lxy, choice: LevelChoice, size_l: int, pad_value: int) -> list[np.ndarray]:
    """Per-tile reads, or one read of the block's bounding box when tiles cover most of it."""
    x0, y0 = lxy.min(axis=0)
    x1, y1 = lxy.max(axis=0) + size_l
    bbox_area = float(x1 - x0) * float(y1 - y0)
    if len(lxy) * size_l * size_l < bbox_area:
        return [
            read_region_rgb(slide, (int(cx), int(cy)), choice.level, (size_l, size_l), background=pad_value)
            for cx, cy in coords
        ]
    origin0 = (int(round(x0 * choice.level_downsample)), int(round(y0 * choice.level_downsample)))
    big = read_region_rgb(slide, origin0, choice.level, (int(x1 - x0), int(y1 - y0)), background=pad_value)
    return [big[y - y0 : y - y0 + size_l, x - x0 : x - x0 + size_l] for x, y in lxy]


def tile_block(job: TileJob, plan: dict, indices: list[int]) -> dict:
    """Read, encode and write one block of tiles into the temporary store."""
    tmp = Path(plan["tmp"])
    if (tmp / FAILED_MARKER).exists():
        return {"n": 0, "bytes": 0, "seconds": 0.0, "skipped": True}
    t0 = time.perf_counter()
    import zarr

    idx = np.asarray(indices, np.int64)
    coords = np.asarray(zarr.open_array(str(tmp / "coords"), mode="r")[:])[idx]
    tiles = read_tiles(
        job.path,
        coords,
        plan["choice"],
        job.config.tiling.tile_px,
        pad_value=job.config.tiling.pad_value,
        read_path=plan["read_path"],
        level_dimensions=plan["level_dimensions"],
    )
    writer = TileWriter(tmp)
    writer.write(idx, tiles)
    return {"n": int(len(idx)), "bytes": writer.bytes_written, "seconds": time.perf_counter() - t0}


def finalize_slide(job: TileJob, plan: dict, stats: dict) -> dict:
    tmp = Path(plan["tmp"])
    final = store_path_for(job.store_dir, job.slide_id)
    nbytes = store_bytes(tmp)
    n = plan["n_tiles"]
    finalize_store(
        tmp,
        final,
        {
            "timings": {k: round(float(v), 3) for k, v in stats.items()},
            "tile_bytes": nbytes,
            "bytes_per_tile": (nbytes / n) if n else 0.0,
            "finished_utc": utc_now(),
        },
    )
    return {"store": str(final), "bytes": nbytes}


def discard_temp(tmp: str | Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def clean_stale_temps(store_dir: Path) -> int:
    """Remove temporaries left by crashed runs (call only while holding the run lock)."""
    n = 0
    for p in list(store_dir.glob(".tmp-*")) + list(store_dir.glob(".old-*")):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        n += 1
    return n


# --------------------------------------------------------------------------- driver


@dataclass
class _SlideState:
    job: TileJob
    t0: float
    plan: dict | None = None
    outstanding: int = 0
    failed: str = ""
    tiles_done: int = 0
    read_seconds: float = 0.0
    finalizing: bool = False


def run_tile(
    slides: str | Path | list,
    out_dir: str | Path,
    config: Config,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    mpp_overrides: dict | None = None,
    assume_mpp: float | None = None,
    quiet: bool = False,
    progress: bool = True,
) -> RunReport:
    """Tile every slide in ``slides`` into ``out_dir``; returns the run report (also written to disk).

    Parameters
    ----------
    slides : path or list of paths
        A folder (searched recursively), a slide, a list file, or paths.
    out_dir : path
        The store folder: ``<slide_id>.zarr`` per slide, ``reports/``, ``tile-report.json``.
    workers : int, optional
        Dask worker processes (default ``config.runtime.workers``; 0 = this process).
    scheduler : str, optional
        An existing Dask scheduler's address (takes precedence over ``workers``).
    """
    t_run = time.perf_counter()
    paths = [Path(p) for p in slides] if isinstance(slides, (list, tuple)) else discover_slides(slides)
    if not paths:
        raise UsageError("no slides given")
    out = ensure_writable_dir(out_dir, "store folder")
    workers = config.runtime.workers if workers is None else workers
    report = RunReport(
        command="tile",
        settings={
            "out": str(out),
            "config": config.to_dict(),
            "config_hash": config.tiling_hash(),
            "workers": workers,
            "scheduler": scheduler,
        },
    )
    with RunLock(out, "tile"):
        removed = clean_stale_temps(out)
        if removed:
            log.info("removed %d temporary stores left by an interrupted run", removed)
        usable, dups = check_unique_ids(paths)
        for p, reason in dups.items():
            report.add(SlideOutcome(slide_id_for(p), str(p), "failed", reason))
        t_ex = time.perf_counter()
        with make_executor(workers, scheduler, quiet=quiet) as ex:
            report.settings["executor_start_s"] = round(time.perf_counter() - t_ex, 3)
            log.info("tiling %d slides into %s (%s)", len(usable), out, ex.description)
            _drive(ex, usable, out, config, mpp_overrides, assume_mpp, report, progress and not quiet)
        report.finished_utc = utc_now()
        report.seconds = round(time.perf_counter() - t_run, 3)
        report.write(out, "tile")
    return report


def _drive(ex, paths, out, config, mpp_overrides, assume_mpp, report, show_progress) -> None:
    from tqdm.auto import tqdm

    states: dict[str, _SlideState] = {}
    meta: dict = {}
    bar = tqdm(total=len(paths), unit="slide", desc="tile", disable=True if not show_progress else None, leave=True, mininterval=0.5)
    tiles_total = 0
    t_start = time.perf_counter()
    for p in paths:
        job = TileJob(str(p), slide_id_for(p), str(out), config, mpp_overrides, assume_mpp)
        states[job.slide_id] = _SlideState(job, time.perf_counter())
        meta[ex.submit(plan_slide, job)] = ("plan", job.slide_id)

    def finish(st: _SlideState, status: str, reason: str = "", **details) -> None:
        secs = time.perf_counter() - st.t0
        report.add(SlideOutcome(st.job.slide_id, st.job.path, status, reason, round(secs, 3), details))
        bar.update(1)
        if status == "failed":
            log.warning("FAILED %s: %s", st.job.slide_id, reason)
        else:
            log.info("%s %s: %s tiles in %.1f s", status, st.job.slide_id, details.get("n_tiles", 0), secs)

    def fail(st: _SlideState, exc: BaseException) -> None:
        if not st.failed:
            st.failed = describe_error(exc, st.job.path)
            if st.plan and st.plan.get("tmp"):
                try:
                    (Path(st.plan["tmp"]) / FAILED_MARKER).touch()
                except OSError:
                    pass
        if st.outstanding == 0:
            if st.plan and st.plan.get("tmp"):
                discard_temp(st.plan["tmp"])
            finish(st, "failed", st.failed)

    for fut in ex.completed():
        kind, sid = meta.pop(fut)
        st = states[sid]
        err = future_error(fut)
        if kind == "plan":
            if err is not None:
                fail(st, err)
                continue
            plan = fut.result()
            st.plan = plan
            if plan["status"] == "skipped":
                finish(st, "skipped", plan["reason"], n_tiles=plan["n_tiles"])
                continue
            if not plan["blocks"]:
                st.finalizing = True
                st.outstanding = 1
                meta[ex.submit(finalize_slide, st.job, plan, {"plan_s": plan["seconds"]})] = ("final", sid)
                continue
            st.outstanding = len(plan["blocks"])
            for block in plan["blocks"]:
                meta[ex.submit(tile_block, st.job, plan, block)] = ("block", sid)
        elif kind == "block":
            st.outstanding -= 1
            if err is not None:
                fail(st, err)
                continue
            res = fut.result()
            st.tiles_done += res["n"]
            st.read_seconds += res["seconds"]
            tiles_total += res["n"]
            elapsed = time.perf_counter() - t_start
            bar.set_postfix_str(f"{tiles_total} tiles, {tiles_total / max(elapsed, 1e-9):.0f} tiles/s")
            if st.failed:
                fail(st, RuntimeError(st.failed))
            elif st.outstanding == 0:
                st.finalizing = True
                st.outstanding = 1
                stats = {"plan_s": st.plan["seconds"], "block_cpu_s": st.read_seconds}
                meta[ex.submit(finalize_slide, st.job, st.plan, stats)] = ("final", sid)
        else:  # final
            st.outstanding -= 1
            if err is not None:
                fail(st, err)
                continue
            res = fut.result()
            secs = time.perf_counter() - st.t0
            n = st.plan["n_tiles"]
            finish(
                st,
                "done",
                "" if n else "no tissue found",
                n_tiles=n,
                store=res["store"],
                tile_bytes=res["bytes"],
                bytes_per_tile=round(res["bytes"] / n, 1) if n else 0,
                tiles_per_s=round(n / secs, 1) if secs > 0 else None,
                mpp=st.plan["mpp"],
                mpp_source=st.plan["mpp_source"],
                effective_mpp=st.plan["choice"].effective_mpp,
                level=st.plan["choice"].level,
                read_path=st.plan["read_path"],
            )
    bar.close()
    report.slides.sort(key=lambda s: s.slide_id)
