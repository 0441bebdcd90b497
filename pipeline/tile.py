"""The tiling stage: slides -> tissue mask -> tile grid -> Zarr tile stores.

Per slide the work splits into four kinds of task, all run where the slide
is readable (a Dask worker, or this process):

1. :func:`plan_slide`   open the slide, find its resolution, compute the tissue
   mask on a low-resolution level, lay the global grid, keep tissue tiles,
   create the store's ``tiles`` array under a temporary name and cut the
   tiles into bands of consecutive grid rows, at least four per worker, each
   writing whole shard files (the short serial part);
2. :func:`tile_band`    for one band, read its tiles with :mod:`wsi.reader` (every
   source tile it touches decoded once on the fast TIFF path, canvas by
   canvas, or read with OpenSlide), and encode and write them;
3. :func:`store_extras` meanwhile: the fingerprint, coordinates, mask,
   thumbnail, pictures and attributes of the store;
4. :func:`finalize_slide` check the slide file did not change meanwhile, record
   the store's files (size + crc32c), fsync, mark it complete and swap it into place.

The driver (:func:`run_tile`) only moves small dicts around, keeps the run
report, and makes a failed slide fail alone. Each worker thread keeps the
slide level readers it opened (:func:`wsi.reader.fast_reader`), so the bands
of one slide don't re-parse the TIFF.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import logging
import math
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.batch import (
    BatchRun,
    RunReport,
    UsageError,
    check_unique_ids,
    discover_slides,
    ensure_writable_dir,
    record_matches,
    utc_now,
)
from pipeline.config import Config
from pipeline.executor import cluster_section, future_error, make_executor, resolve_workers
from wsi import __version__
from wsi.atomic import atomic_write_json
from wsi.objstore import Remote, RemoteError, as_location, is_url
from wsi.grid import group_bands, make_grid, select_tiles, tissue_fractions
from wsi.preview import draw_tissue_overlay, save_png
from wsi.reader import iter_tiles, pick_read_path
from wsi.slide import (
    SlideError,
    check_readable,
    choose_level,
    file_fingerprint,
    open_slide,
    read_lowres,
    slide_id_for,
    slide_info,
)
from wsi.store import (
    FORMAT_NAME,
    NO_RECORD,
    READABLE_VERSIONS,
    TileWriter,
    create_tile_array,
    describe_damage,
    finalize_store,
    read_store_attrs,
    recover_swaps,
    remove_store_temporaries,
    stray_store_ids,
    verify_store,
    store_bytes,
    store_path_for,
    stores_lock,
    temp_store_path,
    write_slide_arrays,
)

log = logging.getLogger("wsi_pipeline")

FAILED_MARKER = ".failed"
#: Longest side of overlay.png, the picture for people (the full-size thumbnail and
#: mask are arrays in the store); PNG-encoding a 3000 px overlay alone took 0.5 s.
PREVIEW_MAX_PX = 2048


@dataclass(frozen=True)
class TileJob:
    """Everything a worker needs to tile one slide (small and picklable)."""

    path: str
    slide_id: str
    store_dir: str
    config: Config
    mpp_overrides: dict | None = None
    assume_mpp: float | None = None
    n_workers: int = 1
    verify: bool = False
    """Skip check: also compare every file of an existing store with its recorded crc32c."""
    verify_content: bool = False
    """Skip check: compare the whole slide file's content (crc32c of every byte), not its stat."""
    publish_to: str | None = None
    """A store folder on object storage: the store is built in ``store_dir`` (local), then uploaded there."""
    source: dict | None = None
    """A slide staged from object storage: its URL, size, ETag and mtime (``path`` is the staged copy)."""

    @property
    def shown(self) -> str:
        """The slide as the user named it (its URL for a staged slide)."""
        return self.source["url"] if self.source else self.path


# --------------------------------------------------------------------------- errors


def _killed_worker(exc: BaseException) -> bool:
    """Whether the call failed because its worker process died (``distributed.scheduler.KilledWorker``)."""
    return type(exc).__name__ == "KilledWorker"


def describe_error(exc: BaseException, path: str) -> str:
    """One line that names the file and what to do."""
    import openslide

    if isinstance(exc, (SlideError, RemoteError)):
        return str(exc)
    if _killed_worker(exc):
        tries = exc.args[2] + 1 if len(exc.args) > 2 and isinstance(exc.args[2], int) else None
        times = f" {tries} times" if tries and tries > 1 else ""
        return (
            f"{path}: the worker process tiling it died{times} (a crash inside a native library on this "
            "file, or out of memory); check that the file opens in OpenSlide or QuPath, re-export or re-scan it"
        )
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{path}: no space left on the device while writing its store; free space or choose another --out"
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return (f"{path}: a file of its store grew beyond the file size limit ({exc.filename or 'ulimit -f'}); "
                "raise the limit or choose another --out")
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


# --------------------------------------------------------------------------- source identity and skip check


def source_stat(path: str | Path) -> dict:
    """What a stat of the slide file says about its identity: size, mtime and ctime (ns), inode.

    ``cp -p``, ``rsync -t`` and ``tar x`` keep the mtime, but they change the ctime (or the
    inode): any difference here makes the skip check compare content instead.
    """
    st = os.stat(path)
    if Path(path).is_dir():  # a DICOM scan: its instance files together
        files = [os.stat(f) for f in sorted(Path(path).iterdir()) if f.is_file()]
        return {"size_bytes": sum(int(f.st_size) for f in files), "files": len(files),
                "mtime_ns": max([int(f.st_mtime_ns) for f in files], default=0),
                "ctime_ns": max([int(f.st_ctime_ns) for f in files], default=0), "inode": int(st.st_ino)}
    return {"size_bytes": int(st.st_size), "mtime_ns": int(st.st_mtime_ns), "ctime_ns": int(st.st_ctime_ns),
            "inode": int(st.st_ino)}


def source_stat_of(identity: dict) -> dict:
    """The :func:`source_stat` part of a recorded source identity (which also holds the fingerprint)."""
    return {k: v for k, v in identity.items() if k in ("size_bytes", "files", "mtime_ns", "ctime_ns", "inode")}


def content_crc32c(path: str | Path) -> str:
    """crc32c of every byte of the slide file (and of an MRXS slide's data folder, or a DICOM scan's
    folder, file by file)."""
    from wsi.store import file_crc32c

    path = Path(path)
    if path.is_dir():  # a DICOM scan: every instance file
        return ",".join(f"{f.name}:{file_crc32c(f)}" for f in sorted(path.iterdir()) if f.is_file())
    parts = [file_crc32c(path)]
    sibling = path.with_suffix("")
    if path.suffix.lower() == ".mrxs" and sibling.is_dir():
        parts += [f"{f.name}:{file_crc32c(f)}" for f in sorted(sibling.iterdir()) if f.is_file()]
    return parts[0] if len(parts) == 1 else ",".join(parts)


def _identify_source(path: str) -> dict:
    """The slide file's stat and sampled fingerprint, taken together; a file that changes
    meanwhile (still being copied) is an error."""
    check_readable(path)
    before = source_stat(path)
    fingerprint = file_fingerprint(path)
    if source_stat(path) != before:
        raise SlideError(f"{path}: the file changed while it was being read (still being copied?); "
                         "run again when it is complete")
    return {**before, "fingerprint": fingerprint}


def _existing_store_is_current(job: TileJob, config_hash: str) -> tuple[bool, dict | None, str]:
    """``(current, attrs, why not)``: whether the slide's store can be kept, and when a store
    is there but cannot, the reason to give (empty for an ordinary change of slide or settings)."""
    final = store_path_for(job.publish_to or job.store_dir, job.slide_id)
    if not is_url(final) and not final.exists():
        return False, None, ""
    attrs = read_store_attrs(final)
    if attrs is None:
        return False, None, ("" if is_url(final) else
                             f"re-tiled: the existing store {final} was unreadable (its zarr.json is missing or damaged)")
    if not record_matches(attrs, FORMAT_NAME, READABLE_VERSIONS, complete=True, config_hash=config_hash):
        return False, None, ""
    src = attrs.get("slide", {})
    check_readable(job.path)
    now = source_stat(job.path)
    if src.get("size_bytes") != now["size_bytes"]:
        return False, None, ""
    if job.verify_content:
        if src.get("content_crc32c") != content_crc32c(job.path):
            return False, None, ("re-tiled: --verify-content found the slide's content differs from the tiled one"
                                 if src.get("content_crc32c") else "")
    elif any(src.get(k) != now[k] for k in ("mtime_ns", "ctime_ns", "inode")):
        # Touched, copied or replaced: trust the content, not the clock.
        if src.get("fingerprint") != file_fingerprint(job.path):
            return False, None, ""
    problems = verify_store(final, attrs, checksums=job.verify)
    if problems == [NO_RECORD]:
        return False, None, f"re-tiled: the existing store {final} has no record of its files' sizes and checksums"
    if problems:
        return False, None, "re-tiled: " + describe_damage(final, problems, job.slide_id).split("; ")[0]
    return True, attrs, ""


# --------------------------------------------------------------------------- worker tasks


def _save_npy(path: Path, arr: np.ndarray) -> None:
    """``np.save`` through a Python write: numpy's own short-write error has no errno (disk full?)."""
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    path.write_bytes(buf.getbuffer())


def _plan_files(tmp: Path) -> tuple[Path, Path]:
    return tmp / ".plan-thumbnail.npy", tmp / ".plan-mask.npy"


def plan_slide(job: TileJob) -> dict:
    """Mask, grid, bands and an empty ``tiles`` array under a temporary name (or 'skipped')."""
    t0 = time.perf_counter()
    cfg = job.config
    tcfg, mcfg, scfg = cfg.tiling, cfg.tissue, cfg.store
    config_hash = cfg.tiling_hash()
    current, attrs, retile_reason = _existing_store_is_current(job, config_hash)
    if current:
        checked = "checksums verified" if job.verify else "store files present"
        return {"status": "skipped", "n_tiles": attrs.get("n_tiles", 0),
                "reason": f"unchanged slide and tiling config; {checked}"}
    if retile_reason:
        log.warning("%s: %s", job.slide_id, retile_reason)

    source = _identify_source(job.path)
    slide = open_slide(job.path)
    try:
        info = slide_info(slide, job.path, mpp_overrides=job.mpp_overrides, assume_mpp=job.assume_mpp)
        choice = choose_level(info.mpp, info.level_downsamples, tcfg.mpp, tolerance=tcfg.mpp_tolerance)
        lowres, mask_ds = read_lowres(slide, info, mcfg.mask_mpp, fast_path=job.path if tcfg.fast_read else None)
    finally:
        slide.close()
    tissue = _tissue(lowres, info.mpp * mask_ds, cfg)

    grid = make_grid(info.bounds_xywh, choice.downsample, tcfg.tile_px, tcfg.stride_px)
    fractions_grid = tissue_fractions(tissue.mask, mask_ds, grid)
    cols_rows = select_tiles(fractions_grid, tcfg.min_tissue_fraction) if tissue.mask.any() else np.empty((0, 2), np.int64)
    coords = grid.level0_xy(cols_rows)
    fractions = fractions_grid[cols_rows[:, 1], cols_rows[:, 0]] if len(cols_rows) else np.empty(0, np.float32)

    level_dims = tuple(info.level_dimensions[choice.level])
    read_path, fallback_reason = "openslide", ""
    if tcfg.fast_read and len(coords):  # the fast reader stays open for this worker's first band
        read_path, fallback_reason = pick_read_path(job.path, level_dims)

    attrs = {
        "slide": {**info.to_dict(), **source, "mtime": source["mtime_ns"] / 1e9,
                  **({"remote": dict(job.source)} if job.source else {})},
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
    try:
        create_tile_array(
            tmp, tile_px=tcfg.tile_px, n_tiles=len(coords), codec=scfg.codec,
            jpeg_quality=scfg.jpeg_quality, zstd_level=scfg.zstd_level, tiles_per_shard=scfg.tiles_per_shard,
        )
        thumb_file, mask_file = _plan_files(tmp)
        _save_npy(thumb_file, lowres)
        _save_npy(mask_file, tissue.mask)
    except BaseException:
        discard_temp(tmp)  # the driver never learns this name: clean up here
        raise
    # At least four bands per worker, shrinking towards the end of the slide (weights n..1):
    # workers take the next band as they free up, and small last bands even out their finish
    # (idle worker time on the 20000 px bench slide: 3.9 % with four, 7 % with three per
    # worker; more bands decode more source tiles twice along their borders).
    n_bands = max(4 * job.n_workers, math.ceil(len(coords) / tcfg.task_tiles))
    bands = [
        {"indices": b, "coords": coords[b], "cols_rows": cols_rows[b]}
        for b in group_bands(
            cols_rows, n_bands, align=scfg.tiles_per_shard, weights=np.arange(n_bands, 0, -1)
        )  # each band writes whole shards
    ]
    return {
        "status": "planned",
        "retile_reason": retile_reason,
        "source_stat": source_stat_of(source),
        "tmp": str(tmp),
        "bands": bands,
        "n_tiles": int(len(coords)),
        "coords": coords,
        "cols_rows": cols_rows,
        "tissue_fraction": fractions,
        "mask_downsample": mask_ds,
        "tile_level0": grid.tile_level0,
        "bounds_xy": list(info.bounds_xywh[:2]),
        "attrs": attrs,
        "choice": choice,
        "read_path": read_path,
        "level_dimensions": level_dims,
        "mpp": info.mpp,
        "mpp_source": info.mpp_source,
        "seconds": time.perf_counter() - t0,
    }


def store_extras(job: TileJob, plan: dict) -> dict:
    """Everything in the store but the pixels, written while the bands are being tiled."""
    t0 = time.perf_counter()
    tmp = Path(plan["tmp"])
    thumb_file, mask_file = _plan_files(tmp)
    lowres, mask = np.load(thumb_file), np.load(mask_file)
    coords = np.asarray(plan["coords"], np.int64).reshape(-1, 2)
    attrs = dict(plan["attrs"])
    attrs["slide"] = {**attrs["slide"], "content_crc32c": content_crc32c(job.path)}
    write_slide_arrays(
        tmp,
        coords=coords,
        cols_rows=np.asarray(plan["cols_rows"], np.int64).reshape(-1, 2),
        tissue_fraction=np.asarray(plan["tissue_fraction"], np.float32),
        mask=mask,
        thumbnail=lowres,
        attrs=attrs,
    )
    side = plan["tile_level0"] / plan["mask_downsample"]
    boxes = np.concatenate(
        [(coords - np.asarray(plan["bounds_xy"])) / plan["mask_downsample"], np.full((len(coords), 2), side)], axis=1
    ) if len(coords) else None
    overlay = draw_tissue_overlay(lowres, mask, boxes)
    save_png(tmp / "overlay.png", overlay, max_side=PREVIEW_MAX_PX)
    save_png(tmp / "mask.png", mask, max_side=4096)
    thumb_file.unlink()
    mask_file.unlink()
    return {"seconds": time.perf_counter() - t0}


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


def tile_band(job: TileJob, plan: dict, band: dict) -> dict:
    """Read, encode and write one band of tiles into the temporary store."""
    tmp = Path(plan["tmp"])
    if (tmp / FAILED_MARKER).exists():
        return {"n": 0, "bytes": 0, "seconds": 0.0, "skipped": True}
    t0 = time.perf_counter()
    idx = np.asarray(band["indices"], np.int64)
    with TileWriter(tmp) as writer:
        nbytes = _write_band(job, plan, band, idx, writer)
    return {"n": int(len(idx)), "bytes": nbytes, "seconds": time.perf_counter() - t0, "files": writer.files}


def _write_band(job: TileJob, plan: dict, band: dict, idx: np.ndarray, writer: TileWriter) -> int:
    tcfg = job.config.tiling
    nbytes = 0
    for k, tile in iter_tiles(
        job.path,
        np.asarray(band["coords"], np.int64),
        np.asarray(band["cols_rows"], np.int64),
        plan["choice"],
        tcfg.tile_px,
        pad_value=tcfg.pad_value,
        read_path=plan["read_path"],
        level_dimensions=plan["level_dimensions"],
        block_tiles=tcfg.block_tiles,
    ):
        nbytes += writer.write_tile(int(idx[k]), tile)
    return nbytes


_PLAN_CORE = ("status", "tmp", "n_tiles", "choice", "read_path", "level_dimensions", "mpp", "mpp_source", "seconds",
              "source_stat")


#: Store swaps of this process's worker threads, one at a time: flock locks belong to open files, so
#: two threads of one process would otherwise wait on each other's folder lock.
_SWAPS = threading.Lock()


def finalize_slide(job: TileJob, plan: dict, stats: dict, files: dict | None = None) -> dict:
    """Check the slide file is still the one planned, then finish the store (see :func:`wsi.store.finalize_store`);
    ``files`` are the writers' ``{path: [size, crc32c]}``."""
    tmp = Path(plan["tmp"])
    final = store_path_for(job.store_dir, job.slide_id)
    if source_stat(job.path) != plan["source_stat"]:
        raise SlideError(f"{job.path}: the file changed while it was being tiled (size, mtime, ctime or inode); "
                         "its store was not kept: run again once the file is complete")
    nbytes = store_bytes(tmp)
    n = plan["n_tiles"]
    extra = {"timings": {k: round(float(v), 3) for k, v in stats.items()}, "tile_bytes": nbytes,
             "bytes_per_tile": (nbytes / n) if n else 0.0, "finished_utc": utc_now()}
    with _SWAPS, stores_lock(job.store_dir, exclusive=True, on_wait=lambda: log.warning(
            "%s: waiting for the lock on %s before swapping its store in (held by a run reading the stores, "
            "e.g. em-round or classify, or by another tiling process)", job.slide_id, job.store_dir)):
        finalize_store(tmp, final, extra, files)
    if job.publish_to:
        return {"store": _publish(final, job), "bytes": nbytes}
    return {"store": str(final), "bytes": nbytes}


def _publish(local: Path, job: TileJob) -> str:
    """Upload a finished local store to the job's object storage folder, complete marker last, and remove
    the local copy (see :func:`wsi.remote_store.publish_store`); returns the store's URL."""
    from wsi.remote_store import publish_store
    from wsi.store import picture_paths

    url = store_path_for(job.publish_to, job.slide_id)
    pictures = {str(p): f"{job.slide_id}.{name}" for name, p in picture_paths(local).items()}
    t0 = time.perf_counter()
    nbytes = publish_store(local, url, pictures)
    log.info("%s: uploaded its store to %s (%.1f MB in %.1f s)", job.slide_id, url, nbytes / 1e6,
             time.perf_counter() - t0)
    shutil.rmtree(local, ignore_errors=True)
    for p in pictures:
        Path(p).unlink(missing_ok=True)
    return url


def discard_temp(tmp: str | Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def clean_stale_temps(store_dir: Path, run: BatchRun) -> list[str]:
    """For every slide with a store under a temporary name that no live job holds: put back a store
    a run killed inside its swap left without its name, then remove the slide's temporaries. Returns
    the ids of the slides a stopped run was building (a live job's slides are left alone)."""
    interrupted = []
    for sid in stray_store_ids(store_dir):
        if not run.claim(sid).ok:
            continue
        try:
            for restored in recover_swaps(store_dir, {sid}):
                log.warning("%s: put its store back in place (a run stopped while swapping it)", restored)
            if remove_store_temporaries(store_dir, sid):
                interrupted.append(sid)
        finally:
            run.release(sid)
    return interrupted


class _Stager:
    """Slides given as object storage URLs, for the driver: a slide whose store is current (same remote
    size and ETag/mtime as recorded at tiling, store files present) is skipped without a download; any
    other is staged into the :class:`wsi.staging.SlideCache` and pinned until its outcome."""

    #: Formats whose pixels are in more than one file: not staged (one object per slide).
    MULTI_FILE = (".mrxs", ".dcm", ".vms", ".vmu")

    def __init__(self, cache, store_dir, config_hash: str, verify=(False, False)):
        self.cache, self.store_dir, self.config_hash = cache, store_dir, config_hash
        self.verify, self.verify_content = verify

    def prepare(self, sid: str, url: str) -> tuple[str, object, dict]:
        """``("skipped", reason, identity)`` or ``("staged", local path, identity)``."""
        from wsi.objstore import RemoteError, remote_identity

        if url.lower().endswith(self.MULTI_FILE):
            raise RemoteError(f"{url}: this format keeps its pixels in several files; slides on object storage "
                              "must be single files (.svs, .tif, .ndpi, ...): copy it to a local folder")
        ident = remote_identity(url)
        if not self.verify_content:
            attrs = read_store_attrs(store_path_for(self.store_dir, sid))
            if self._current(attrs, ident, sid):
                checked = "checksums verified" if self.verify else "store files present"
                return "skipped", f"unchanged slide (same size and ETag or mtime on object storage) and tiling config; {checked}", \
                    {**ident, "n_tiles": attrs.get("n_tiles", 0)}
        return "staged", self.cache.stage(url, ident), ident

    def _current(self, attrs: dict | None, ident: dict, sid: str) -> bool:
        if not record_matches(attrs, FORMAT_NAME, READABLE_VERSIONS, complete=True, config_hash=self.config_hash):
            return False
        had = (attrs.get("slide") or {}).get("remote") or {}
        if had.get("url") != ident["url"] or had.get("size") != ident["size"]:
            return False
        if (had.get("etag") or ident["etag"]) and had.get("etag") != ident["etag"]:
            return False
        if not (had.get("etag") or ident["etag"]) and had.get("mtime") != ident["mtime"]:
            return False
        return not verify_store(store_path_for(self.store_dir, sid), attrs, checksums=self.verify)


# --------------------------------------------------------------------------- suspect slides

#: Slides that were being tiled when a run died, or that killed a worker process: a run
#: that includes one uses worker processes. A suspect is cleared once it is tiled, skipped
#: or fails with an ordinary error (it then did not bring the process down).
SUSPECTS_FILE = ".suspect-slides.json"
_INTERRUPTED = "it was being tiled when an earlier run on this folder stopped without finishing"


def load_suspects(store_dir: Path) -> dict[str, str]:
    """``{slide_id: why}`` from the store folder's suspects file (empty if none or unreadable)."""
    try:
        data = json.loads((Path(store_dir) / SUSPECTS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def save_suspects(store_dir: Path, suspects: dict[str, str]) -> None:
    path = Path(store_dir) / SUSPECTS_FILE
    if suspects:
        atomic_write_json(path, dict(sorted(suspects.items())))
    else:
        path.unlink(missing_ok=True)


def _update_suspects(suspects: dict[str, str], report: RunReport) -> dict[str, str]:
    """The suspects after this run: those that killed their worker process again stay, with the
    reason; those this run finished in any other way (tiled, skipped, failed cleanly) go; those
    another job held stay as they are."""
    out = dict(suspects)
    for o in report.slides:
        if o.slide_id in out and o.status != "busy":
            if o.status == "failed" and o.details.get("worker_died"):
                out[o.slide_id] = o.reason
            else:
                del out[o.slide_id]
    return out


# --------------------------------------------------------------------------- driver


def check_mpp_options(assume_mpp: float | None, mpp_overrides: dict | None) -> None:
    """``--assume-mpp`` and ``--mpp-csv`` values must be finite µm/px > 0 (0 is not 'unset')."""
    if assume_mpp is not None and not (math.isfinite(assume_mpp) and assume_mpp > 0):
        raise UsageError(f"--assume-mpp {assume_mpp}: must be a number of µm/px > 0, e.g. 0.25")
    for sid, mpp in (mpp_overrides or {}).items():
        if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
            raise UsageError(f"--mpp-csv: slide {sid!r} has mpp {mpp}; it must be a number of µm/px > 0")


@dataclass
class _SlideState:
    job: TileJob
    t0: float
    plan: dict | None = None
    outstanding: int = 0
    failed: str = ""
    tiles_done: int = 0
    read_seconds: float = 0.0
    extras_seconds: float = 0.0
    finalizing: bool = False
    worker_died: bool = False
    retile_reason: str = ""
    files: dict | None = None


def run_tile(
    slides: str | Path | list,
    out_dir: str | Path,
    config: Config,
    *,
    workers: int | None = None,
    processes: bool | None = None,
    scheduler: str | None = None,
    cluster: str = "local",
    shard: tuple[int, int] | None = None,
    mpp_overrides: dict | None = None,
    assume_mpp: float | None = None,
    quiet: bool = False,
    progress: bool = True,
    verify: bool = False,
    verify_content: bool = False,
    lease_timeout: float | None = None,
    stage_dir: str | Path | None = None,
    stage_cache_gb: float | None = None,
) -> RunReport:
    """Tile every slide in ``slides`` into ``out_dir``; returns the run report (also written to disk).

    Several runs may work on one ``out_dir`` at once: each slide is claimed with a lease
    (:mod:`pipeline.leases`) before it is planned, and a slide another live run holds is
    left to it (outcome ``"busy"``).

    Parameters
    ----------
    slides : path or list of paths
        A folder (searched recursively), a slide, a list file, or paths.
    out_dir : path
        The store folder: ``<slide_id>.zarr`` per slide, ``reports/``, ``tile-report.json``.
    workers : int, optional
        Parallel workers (default ``config.runtime.workers``; -1 = one per core, 0 = one task at a
        time in this thread).
    processes : bool, optional
        The workers as a Dask LocalCluster of spawned processes instead of threads of this
        process (default ``config.runtime.processes``; see :func:`pipeline.executor.make_executor`).
    scheduler : str, optional
        An existing Dask scheduler's address (takes precedence over ``workers``).
    cluster : str
        ``"local"`` (the above) or ``"slurm"``: a dask-jobqueue SLURMCluster of
        ``config.cluster`` (:mod:`pipeline.slurm`), closed when the run ends; ``workers`` and
        ``processes`` are then not used.
    shard : (int, int), optional
        ``(i, n)``: tile only slides ``i, i + n, i + 2n, ...`` of ``slides`` (one task of a job array of
        ``n``); slide ids are still checked for repeats across all of them.
    verify : bool
        Before skipping a slide, compare every file of its store with the crc32c recorded when
        it was written (default: their presence and sizes only).
    verify_content : bool
        Before skipping a slide, compare a crc32c of every byte of the slide file with the one
        recorded at tiling (default: its stat, and the sampled fingerprint when the stat differs).
    lease_timeout : float, optional
        Seconds without a refresh after which another run's lease on a slide is stale
        (default ``config.runtime.lease_timeout_s``).
    stage_dir, stage_cache_gb : optional
        Object storage work folder and stage cache size (default ``config.runtime``'s): slides given as
        URLs are staged to ``stage_dir/slides``; with ``out_dir`` a URL, stores are built (and leases and
        reports kept) in a local folder under ``stage_dir/outputs`` and uploaded (see docs/design.md).
    """
    t_run = time.perf_counter()
    check_mpp_options(assume_mpp, mpp_overrides)
    paths = [as_location(p) for p in slides] if isinstance(slides, (list, tuple)) else discover_slides(slides)
    if not paths:
        raise UsageError("no slides given")
    if stage_cache_gb is not None and not (math.isfinite(stage_cache_gb) and stage_cache_gb > 0):
        raise UsageError(f"stage cache size {stage_cache_gb} GB: must be a number of GB > 0, e.g. 100")
    stage_root = _stage_root(config, stage_dir)
    remote_out = str(out_dir).rstrip("/") if is_url(out_dir) else None
    if remote_out:
        Remote(remote_out).check_writable()
        out = ensure_writable_dir(work_dir_for(remote_out, stage_root), "local work folder (runtime.stage_dir)",
                                  "runtime.stage_dir")
    else:
        out = ensure_writable_dir(out_dir, "store folder")
    cache = None
    if any(is_url(p) for p in paths):
        from wsi.staging import GB, SlideCache

        gb = config.runtime.stage_cache_gb if stage_cache_gb is None else float(stage_cache_gb)
        cache = SlideCache(stage_root / "slides", int(gb * GB))
    workers = resolve_workers(config.runtime.workers if workers is None else workers)
    processes = config.runtime.processes if processes is None else bool(processes)
    slurm = cluster_section(cluster, scheduler, config)
    timeout = config.runtime.lease_timeout_s if lease_timeout is None else float(lease_timeout)
    settings = {
        "out": remote_out or str(out),
        **({"work_dir": str(out)} if remote_out else {}),
        "config": config.to_dict(),
        "config_hash": config.tiling_hash(),
        "workers": workers,
        "processes": processes,
        "scheduler": scheduler,
        "cluster": cluster,
        "shard": f"{shard[0]}/{shard[1]}" if shard else None,
    }
    with BatchRun("tile", out, settings, progress=progress and not quiet, t0=t_run, lease_timeout=timeout) as run:
        report = run.report
        suspects = _start_suspects(run, out)
        usable, dups = select_shard(paths, shard)
        for p, reason in dups.items():
            run.outcome(slide_id_for(p), p, "failed", reason)
        flagged = sorted({slide_id_for(p) for p in usable} & suspects.keys())
        if flagged and not processes and not scheduler and slurm is None and workers > 0:
            # A thread that crashes in a native library takes the whole run with it, and the
            # next cron run would crash on the same slide: worker processes isolate it.
            processes = True
            report.settings["processes"] = True
            report.settings["processes_reason"] = f"suspect slides: {', '.join(flagged)}"
            log.warning(
                "%s: %s; tiling with worker processes this time, so a slide that crashes a native "
                "library fails alone (--processes always does this)",
                ", ".join(flagged), suspects[flagged[0]] if len(flagged) == 1 else "earlier runs did not finish them",
            )
        t_ex = time.perf_counter()
        with make_executor(workers, scheduler, processes=processes, warm=("pipeline.tile",), slurm=slurm) as ex:
            report.settings["executor_start_s"] = round(time.perf_counter() - t_ex, 3)
            report.settings["executor"] = ex.description
            log.info("tiling %d slides into %s (%s)", len(usable), out, ex.description)
            _drive(ex, usable, out, config, mpp_overrides, assume_mpp, run, (bool(verify), bool(verify_content)),
                   remote_out, cache)
            t_stop = time.perf_counter()
        report.settings["executor_stop_s"] = round(time.perf_counter() - t_stop, 3)
        with run.mutex():  # other jobs update the same file: read, change and write it in one go
            save_suspects(out, _update_suspects(load_suspects(out), report))
    if remote_out:  # for people: the folder report beside the stores (the work folder keeps the bookkeeping)
        Remote(remote_out).put([(out / "tile-report.json", "tile-report.json")])
    return report


def _stage_root(config: Config, stage_dir: str | Path | None) -> Path:
    from wsi.staging import default_cache_root

    d = stage_dir if stage_dir is not None else config.runtime.stage_dir
    return Path(d).expanduser() if d else default_cache_root()


def work_dir_for(url: str, stage_root: Path) -> Path:
    """The local folder where a run with ``--out URL`` keeps its bookkeeping and builds its stores:
    ``stage_root/outputs/<readable URL>-<hash>`` (one per URL, shared by the jobs on this machine)."""
    import hashlib
    import re

    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", url)[-80:].strip("_.")
    return stage_root / "outputs" / f"{slug}-{hashlib.sha256(url.encode()).hexdigest()[:10]}"

def select_shard(paths: list[Path], shard: tuple[int, int] | None) -> tuple[list[Path], dict[Path, str]]:
    """:func:`check_unique_ids` over every slide, then the part of slides ``i, i + n, ...`` for ``shard=(i, n)``:
    a slide id repeated across shards is caught in the shard that holds the repeat, as in one run."""
    usable, dups = check_unique_ids(paths)
    if shard is None:
        return usable, dups
    i, n = shard
    if not 0 <= i < n:
        raise UsageError(f"--shard {i}/{n}: expected I/N with 0 <= I < N")
    mine = {id(p) for p in paths[i::n]}
    log.info("shard %d/%d: %d of %d slides", i, n, len(mine), len(paths))
    return [p for p in usable if id(p) in mine], {p: r for p, r in dups.items() if id(p) in mine}


def _start_suspects(run: BatchRun, out: Path) -> dict[str, str]:
    """Clean up after runs that stopped without finishing and return the suspect slides, with the
    slides such a run was building added (see :data:`SUSPECTS_FILE`)."""
    interrupted = clean_stale_temps(out, run)
    if interrupted:
        log.info("removed the temporary stores of %s, left by a run that stopped without finishing",
                 ", ".join(interrupted))
    run.clean()  # other temporaries (reports, the suspects file), when no other job works here
    with run.mutex():
        suspects = load_suspects(out)
        for sid in interrupted:
            suspects.setdefault(sid, _INTERRUPTED)
        save_suspects(out, suspects)
    return suspects


#: Which queued task a free worker takes first: finish slides already started before
#: planning new ones, so stores land one after another (and a stopped run keeps them).
_PRIORITY = {"final": 3, "extras": 2, "band": 1, "plan": 0}


def _drive(ex, paths, out, config, mpp_overrides, assume_mpp, run: BatchRun, verify=(False, False),
           remote_out: str | None = None, cache=None) -> None:
    driver = _Driver(ex, paths, out, config, mpp_overrides, assume_mpp, run, verify)
    driver.job_kw = {"publish_to": remote_out}
    driver.stager = _Stager(cache, remote_out or out, config.tiling_hash(), verify) if cache is not None else None
    driver.run()


class _Driver:
    """Hands the tasks of the slides to the executor and records each slide's outcome.

    A slide is claimed (:meth:`BatchRun.claim`) only when its plan is about to be queued, and
    at most one plan per worker slot waits or runs at a time: a run holds the leases of the
    slides it is working on, not of every slide it was given, so jobs started side by side
    share the slides. A slide another job holds is recorded as ``"busy"``; every lease is
    released when its slide has an outcome.
    """

    def __init__(self, ex, paths, out, config, mpp_overrides, assume_mpp, run: BatchRun, verify=(False, False)):
        self.ex, self.batch, self.out, self.config = ex, run, out, config
        self.job_args = (mpp_overrides, assume_mpp, ex.n_workers, *verify)
        self.pending = collections.deque(paths)
        self.lookahead = max(1, int(getattr(ex, "in_flight", 1)))
        self.states: dict[str, _SlideState] = {}
        self.meta: dict = {}
        self.planning = 0
        self.tiles_total = 0
        self.tile_bars: dict = {}  # slide id -> the bar over the tiles of a slide being tiled (band by band)
        self.job_kw: dict = {}
        self.stager: _Stager | None = None
        self.t_start = time.perf_counter()
        run.start(len(paths), leave=True, mininterval=0.5)

    def run(self) -> None:
        self.start_next()
        for fut in self.ex.completed():
            kind, sid = self.meta.pop(fut)
            err = future_error(fut)
            if isinstance(err, KeyboardInterrupt):  # Ctrl-C inside a task run in this thread: stop the run
                raise err
            st = self.states[sid]
            if kind == "plan":
                self.planning -= 1
                self.on_plan(st, fut, err)
            else:
                st.outstanding -= 1
                getattr(self, f"on_{kind}")(st, fut, err)
            self.start_next()

    def submit(self, kind: str, sid: str, fn, *args) -> None:
        self.meta[self.ex.submit(fn, *args, priority=_PRIORITY[kind])] = (kind, sid)

    def start_next(self) -> None:
        """Claim and queue the plans of the next slides, up to one per worker slot."""
        while self.pending and self.planning < self.lookahead:
            p = self.pending.popleft()
            sid = slide_id_for(p)
            got = self.batch.claim(sid)
            if not got.ok:
                self.batch.outcome(sid, p, "busy", f"being processed by another job ({got.holder})")
                continue
            kw = dict(self.job_kw)
            if is_url(p):
                staged = self._stage(sid, p)
                if staged is None:
                    continue
                p, kw["source"] = staged
            job = TileJob(str(p), sid, str(self.out), self.config, *self.job_args, **kw)
            self.states[sid] = _SlideState(job, time.perf_counter())
            self.planning += 1
            self.submit("plan", sid, plan_slide, job)

    def _stage(self, sid: str, url: str) -> tuple[Path, dict] | None:
        """Stage a slide given as a URL; None when it needs no tiling (its store is current) or failed."""
        t0 = time.perf_counter()
        try:
            kind, value, ident = self.stager.prepare(sid, url)
        except Exception as exc:
            self.batch.outcome(sid, url, "failed", describe_error(exc, url), time.perf_counter() - t0)
            self.batch.release(sid)
            return None
        if kind == "skipped":
            self.batch.outcome(sid, url, "skipped", value, time.perf_counter() - t0,
                               n_tiles=ident.pop("n_tiles", 0))
            self.batch.release(sid)
            return None
        return value, ident

    def finish(self, st: _SlideState, status: str, reason: str = "", **details) -> None:
        if (bar := self.tile_bars.pop(st.job.slide_id, None)) is not None:
            bar.close()
        secs = time.perf_counter() - st.t0
        self.batch.outcome(st.job.slide_id, st.job.shown, status, reason, secs, **details)
        self.batch.release(st.job.slide_id)
        if st.job.source and self.stager is not None:
            self.stager.cache.unpin(st.job.source["url"])
        if status != "failed":
            log.info("%s %s: %s tiles in %.1f s", status, st.job.slide_id, details.get("n_tiles", 0), secs)

    def fail(self, st: _SlideState, exc: BaseException) -> None:
        st.worker_died |= _killed_worker(exc)
        tmp = st.plan.get("tmp") if st.plan else None
        if not st.failed:
            st.failed = describe_error(exc, st.job.shown)
            if tmp:
                try:
                    (Path(tmp) / FAILED_MARKER).touch()
                except OSError:
                    pass
        if st.outstanding == 0:
            if tmp:
                discard_temp(tmp)
            self.finish(st, "failed", st.failed, **({"worker_died": True} if st.worker_died else {}))

    def next_step(self, st: _SlideState) -> None:
        """After a band or the extras: fail the slide if a task of it failed, finalize it once all are done."""
        if st.failed:
            self.fail(st, RuntimeError(st.failed))
        elif st.outstanding == 0:
            st.finalizing = True
            st.outstanding = 1
            stats = {"plan_s": st.plan["seconds"], "bands_s": st.read_seconds, "extras_s": st.extras_seconds}
            self.submit("final", st.job.slide_id, finalize_slide, st.job, st.plan, stats, st.files)

    def on_plan(self, st: _SlideState, fut, err) -> None:
        if err is not None:
            return self.fail(st, err)
        plan = fut.result()
        if plan["status"] == "skipped":
            st.plan = plan
            return self.finish(st, "skipped", plan["reason"], n_tiles=plan["n_tiles"])
        # Band tasks get only what they need; the coordinates travel once, to store_extras.
        st.plan = {k: plan[k] for k in _PLAN_CORE}
        st.retile_reason = plan.get("retile_reason", "")
        st.files = {}
        st.outstanding = len(plan["bands"]) + 1
        # The extras go first: while one worker writes them the others start on the bands,
        # which balances the workers better than leaving them for the end.
        sid = st.job.slide_id
        if plan["bands"]:
            self.tile_bars[sid] = self.batch.sub_bar(plan["n_tiles"], sid, "tile")
        self.submit("extras", sid, store_extras, st.job, plan)
        for band in plan["bands"]:
            self.submit("band", sid, tile_band, st.job, st.plan, band)

    def on_extras(self, st: _SlideState, fut, err) -> None:
        if err is not None:
            return self.fail(st, err)
        st.extras_seconds = fut.result()["seconds"]
        self.next_step(st)

    def on_band(self, st: _SlideState, fut, err) -> None:
        if err is not None:
            return self.fail(st, err)
        res = fut.result()
        st.files.update(res.get("files") or {})
        st.tiles_done += res["n"]
        st.read_seconds += res["seconds"]
        self.tiles_total += res["n"]
        if st.job.slide_id in self.tile_bars:
            self.tile_bars[st.job.slide_id].update(res["n"])
        elapsed = time.perf_counter() - self.t_start
        self.batch.bar.set_postfix_str(f"{self.tiles_total} tiles, {self.tiles_total / max(elapsed, 1e-9):.0f} tiles/s")
        self.next_step(st)

    def on_final(self, st: _SlideState, fut, err) -> None:
        if err is not None:
            return self.fail(st, err)
        res = fut.result()
        secs = time.perf_counter() - st.t0
        n = st.plan["n_tiles"]
        self.finish(
            st,
            "done",
            "; ".join(r for r in (st.retile_reason, "" if n else "no tissue found") if r),
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
