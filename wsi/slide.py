"""Opening slides, finding their resolution, choosing pyramid levels, reading pixels.

OpenSlide is the universal reader and the source of metadata. Pixels it returns
are premultiplied RGBA with transparent (alpha 0) areas outside the scanned
region; :func:`read_region_rgb` composites them onto white explicitly so they
never turn into black, tissue-like pixels.

OpenSlide errors are sticky: after one failed read a handle refuses everything.
Callers therefore open a handle per unit of work (:func:`open_slide`) and never
reuse one after an error.

Inputs besides OpenSlide's own formats:

* **flat images** (a plain RGB TIFF, PNG or JPEG export of a region, see
  :data:`FLAT_IMAGE_EXTENSIONS`): what OpenSlide cannot open is decoded whole
  (tifffile / OpenCV) and served as a one-level slide (``openslide.ImageSlide``);
  their micrometres per pixel come from the TIFF resolution tags or
  ``--mpp-csv`` / ``--assume-mpp``;
* **DICOM WSI**: a scan is a folder of instance files; the slide path is the
  folder (:func:`dicom_files`), read through OpenSlide's DICOM driver.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import math
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import openslide
import tifffile
from PIL import Image

from wsi.objstore import is_url

#: Files OpenSlide reads (``.dcm``: DICOM instances, grouped into one slide per folder by discovery).
#: Zeiss ``.czi`` is not listed: OpenSlide 4 does not read it.
SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs",
    ".svslide", ".bif", ".dcm",
)
#: Flat (one-level) image exports read whole when OpenSlide cannot open them.
FLAT_IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
#: Flat images larger than this are refused (a whole-slide scan must be pyramidal).
MAX_FLAT_PIXELS = 1 << 30


class SlideError(Exception):
    """A slide cannot be processed; the message names the file and the fix."""


class MissingMppError(SlideError):
    """The slide's micrometres per pixel could not be determined."""


def slide_id_for(path: str | Path) -> str:
    """The slide id used in stores, labels and reports: the file name without its extension."""
    name = Path(path).name
    if not is_url(path) and Path(path).is_dir():  # a DICOM scan: the folder's name as it is
        return name
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def file_problem(path: str | Path, exc: OSError) -> str:
    """One line for a slide file that cannot be opened: missing, unreadable, a link loop..."""
    if isinstance(exc, FileNotFoundError):
        return f"{path}: file not found (a missing file, or a symbolic link to one); check the path or the list file"
    if isinstance(exc, PermissionError):
        return f"{path}: permission denied; make the file readable by this user"
    if exc.errno == errno.ELOOP:
        return f"{path}: a loop of symbolic links (the link leads back to itself); fix or remove the link"
    if isinstance(exc, IsADirectoryError):
        return f"{path}: a folder, not a slide file"
    return f"{path}: cannot be read ({exc.strerror or exc})"


def check_readable(path: str | Path) -> None:
    """Raise :class:`SlideError` with :func:`file_problem`'s line unless ``path`` opens for reading
    (a folder, i.e. a DICOM scan, must list)."""
    try:
        if Path(path).is_dir():
            os.listdir(path)
        else:
            with open(path, "rb"):
                pass
    except OSError as exc:
        raise SlideError(file_problem(path, exc)) from None


def open_slide(path: str | Path) -> openslide.AbstractSlide:
    """Open a slide, turning errors into one clear :class:`SlideError`.

    OpenSlide first; a flat image it cannot read (:data:`FLAT_IMAGE_EXTENSIONS`)
    becomes a one-level ``openslide.ImageSlide``; a folder is a DICOM scan,
    opened through one of its instance files.
    """
    path = Path(path)
    check_readable(path)
    target = path
    if path.is_dir():
        files = dicom_files(path)
        if not files:
            raise SlideError(f"{path}: a folder is read as a DICOM scan but holds no .dcm files")
        target = files[0]
    try:
        return openslide.OpenSlide(str(target))
    except openslide.OpenSlideUnsupportedFormatError:
        if path.suffix.lower() in FLAT_IMAGE_EXTENSIONS and path.is_file():
            return openslide.ImageSlide(Image.fromarray(_flat_rgba(path)))
        raise SlideError(
            f"{path}: not a slide OpenSlide can read (unsupported format or not an image); "
            "check the file is a complete whole-slide image"
        ) from None
    except openslide.OpenSlideError as exc:
        raise SlideError(f"{path}: OpenSlide could not open it ({exc}); the file may be damaged") from None


def read_flat_image(path: str | Path) -> np.ndarray:
    """The pixels of a flat image file as (H, W, 3) uint8 RGB (transparency composited onto white).

    TIFFs are read with tifffile (the first page, or level 0 of a pyramid),
    PNG and JPEG with OpenCV.
    """
    return np.ascontiguousarray(_flat_rgba(path)[..., :3])


def _flat_rgba(path: str | Path) -> np.ndarray:
    """:func:`read_flat_image` as read-only opaque RGBA (PIL then shares the memory instead of
    copying it). The last image decoded in this process is kept (by path, size and mtime), so
    the tasks of one slide don't decode it again."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _flat_lock:
        if _flat_cache.get("key") == key:
            return _flat_cache["rgb"]
    rgb = _decode_flat(path)
    rgba = np.empty(rgb.shape[:2] + (4,), np.uint8)
    rgba[..., :3], rgba[..., 3] = rgb, 255
    rgba.setflags(write=False)
    with _flat_lock:
        _flat_cache.clear()
        _flat_cache.update(key=key, rgb=rgba)
    return rgba


_flat_cache: dict = {}
_flat_lock = threading.Lock()


def _decode_flat(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                if int(np.prod(page.shape[:2])) > MAX_FLAT_PIXELS:
                    raise SlideError(f"{path}: a flat {page.shape[1]} x {page.shape[0]} px image is too large to "
                                     "read whole; convert it to a tiled pyramidal TIFF (e.g. vips tiffsave --tile --pyramid)")
                img = page.asarray()
        else:
            img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if img is None:
                raise ValueError("OpenCV could not decode it")
            if img.ndim == 3:  # OpenCV's channel order is BGR(A)
                img = img[..., [2, 1, 0, 3][: img.shape[-1]]]
    except SlideError:
        raise
    except Exception as exc:
        raise SlideError(f"{path}: not a slide OpenSlide can read, nor a flat image ({exc})") from None
    return _as_rgb8(img, path)


def _as_rgb8(img: np.ndarray, path: Path) -> np.ndarray:
    if img.dtype != np.uint8:
        raise SlideError(f"{path}: a flat image must be 8-bit RGB, got {img.dtype}; convert it to 8-bit")
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 2, 3, 4):
        raise SlideError(f"{path}: a flat image must be RGB (H, W, 3), got shape {img.shape}")
    if img.shape[-1] in (2, 4):  # straight alpha: composite onto white glass
        a = img[..., -1:].astype(np.uint16)
        img = ((img[..., :-1].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return np.ascontiguousarray(img)


# --------------------------------------------------------------------------- DICOM


def dicom_files(folder: str | Path) -> list[Path]:
    """The DICOM instance files (``*.dcm``, not hidden) directly in ``folder``, sorted."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() == ".dcm" and not p.name.startswith(".") and p.is_file())


#: (0020,000E) Series Instance UID, little endian: group, element.
_SERIES_UID_TAG = b"\x20\x00\x0e\x00"


def dicom_series_uid(path: str | Path, *, header_bytes: int = 1 << 16) -> str | None:
    """The Series Instance UID of a DICOM file (explicit or implicit VR little endian), or None.

    Only the first ``header_bytes`` are read: the UID sits in the header,
    before any pixel data.
    """
    with open(path, "rb") as fh:
        head = fh.read(header_bytes)
    if head[128:132] != b"DICM":
        return None
    at = head.find(_SERIES_UID_TAG, 132)
    while at >= 0:
        if head[at + 4 : at + 6] == b"UI":  # explicit VR: 2-byte length
            n, start = int.from_bytes(head[at + 6 : at + 8], "little"), at + 8
        else:  # implicit VR: 4-byte length
            n, start = int.from_bytes(head[at + 4 : at + 8], "little"), at + 8
        uid = head[start : start + n].rstrip(b"\x00 ").decode("ascii", "replace")
        if 0 < n <= 64 and uid.replace(".", "").isdigit():
            return uid
        at = head.find(_SERIES_UID_TAG, at + 1)
    return None


def dicom_slides(folder: str | Path) -> list[Path]:
    """The slides of a folder of DICOM instances: one per series.

    A folder that holds one series (the usual export: one scan per folder) is
    the slide itself (its id is the folder name); with several series, each
    series is named by its first file (OpenSlide opens that file's series),
    its id the file's stem.
    """
    series: dict[str, list[Path]] = {}
    for f in dicom_files(folder):
        series.setdefault(dicom_series_uid(f) or "", []).append(f)
    if len(series) <= 1:
        return [Path(folder)] if series else []
    return sorted(files[0] for files in series.values())


# --------------------------------------------------------------------------- resolution


def load_mpp_csv(path: str | Path) -> dict[str, float]:
    """Read a per-slide override file with columns ``slide_id,mpp``."""
    path = Path(path)
    out: dict[str, float] = {}
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not {"slide_id", "mpp"} <= set(reader.fieldnames):
                raise SlideError(f"{path}: an mpp override file needs the header 'slide_id,mpp'")
            for n, row in enumerate(reader, start=2):
                try:
                    mpp = float(row["mpp"])
                except (TypeError, ValueError):
                    raise SlideError(f"{path}, line {n}: mpp {row['mpp']!r} is not a number") from None
                if not (math.isfinite(mpp) and mpp > 0):
                    raise SlideError(f"{path}, line {n}: mpp must be a number > 0, got {row['mpp']!r}")
                out[row["slide_id"].strip()] = mpp
    except OSError as exc:
        raise SlideError(f"{path}: cannot read the mpp override file ({exc.strerror})") from None
    return out


def _mpp_from_properties(props) -> float | None:
    try:
        x = float(props.get(openslide.PROPERTY_NAME_MPP_X, "nan"))
        y = float(props.get(openslide.PROPERTY_NAME_MPP_Y, "nan"))
    except ValueError:
        return None
    vals = [v for v in (x, y) if math.isfinite(v) and v > 0]
    return float(np.mean(vals)) if vals else None


def _mpp_from_tiff_tags(path: Path) -> float | None:
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            tags = page.tags
            if "XResolution" not in tags or "ResolutionUnit" not in tags:
                return None
            num, den = tags["XResolution"].value
            unit = int(tags["ResolutionUnit"].value)
    except Exception:  # not a TIFF, or unreadable tags: this source just has nothing
        return None
    if not num or not den:
        return None
    px_per_unit = num / den
    um_per_unit = {2: 25_400.0, 3: 10_000.0}.get(unit)  # 2 = inch, 3 = centimetre
    if um_per_unit is None or px_per_unit <= 0:
        return None
    mpp = um_per_unit / px_per_unit
    # Scanners that leave the default 72/96 dpi write ~350 um/px: not a microscope resolution.
    return mpp if 0.05 <= mpp <= 50 else None


def resolve_mpp(
    slide: openslide.OpenSlide,
    path: str | Path,
    *,
    mpp_overrides: dict[str, float] | None = None,
    assume_mpp: float | None = None,
) -> tuple[float, str]:
    """Level-0 micrometres per pixel and where it came from.

    Tries, in order: an explicit per-slide row in ``mpp_overrides`` (the user's
    ``--mpp-csv``, which wins because it exists to correct metadata), the
    OpenSlide properties, the TIFF resolution tags, then ``assume_mpp``.
    Raises :class:`MissingMppError` naming every source it tried.
    """
    path = Path(path)
    sid = slide_id_for(path)
    if mpp_overrides and sid in mpp_overrides:
        return float(mpp_overrides[sid]), "mpp-csv"
    mpp = _mpp_from_properties(slide.properties)
    if mpp:
        return mpp, "openslide-properties"
    mpp = _mpp_from_tiff_tags(path)
    if mpp:
        return mpp, "tiff-resolution-tags"
    if assume_mpp:
        return float(assume_mpp), "assume-mpp"
    tried = "OpenSlide properties (openslide.mpp-x/y), TIFF resolution tags"
    tried += f", --mpp-csv (no row for {sid!r})" if mpp_overrides is not None else ", --mpp-csv (not given)"
    raise MissingMppError(
        f"{path}: no micrometres-per-pixel found; tried {tried}. "
        f"Add '{sid},<mpp>' to an --mpp-csv file or pass --assume-mpp"
    )


# --------------------------------------------------------------------------- slide facts


@dataclass(frozen=True)
class SlideInfo:
    """What the pipeline needs to know about a slide (all sizes in level-0 pixels)."""

    path: str
    slide_id: str
    vendor: str
    width: int
    height: int
    bounds_xywh: tuple[int, int, int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float
    mpp_source: str

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def to_dict(self) -> dict:
        return asdict(self)


def slide_info(
    slide: openslide.OpenSlide,
    path: str | Path,
    *,
    mpp_overrides: dict[str, float] | None = None,
    assume_mpp: float | None = None,
) -> SlideInfo:
    mpp, source = resolve_mpp(slide, path, mpp_overrides=mpp_overrides, assume_mpp=assume_mpp)
    w, h = slide.dimensions
    props = slide.properties
    try:  # MRXS and others: the scanned area inside a larger canvas
        bounds = (
            int(props[openslide.PROPERTY_NAME_BOUNDS_X]),
            int(props[openslide.PROPERTY_NAME_BOUNDS_Y]),
            int(props[openslide.PROPERTY_NAME_BOUNDS_WIDTH]),
            int(props[openslide.PROPERTY_NAME_BOUNDS_HEIGHT]),
        )
    except (KeyError, ValueError):
        bounds = (0, 0, w, h)
    return SlideInfo(
        path=str(path),
        slide_id=slide_id_for(path),
        vendor=str(props.get(openslide.PROPERTY_NAME_VENDOR, "unknown")),
        width=int(w),
        height=int(h),
        bounds_xywh=bounds,
        level_dimensions=tuple(tuple(int(v) for v in d) for d in slide.level_dimensions),
        level_downsamples=tuple(float(d) for d in slide.level_downsamples),
        mpp=mpp,
        mpp_source=source,
    )


@dataclass(frozen=True)
class LevelChoice:
    """Which pyramid level serves a target resolution, and how to scale it.

    Attributes
    ----------
    level : int
        OpenSlide level to read.
    level_downsample : float
        Level-0 pixels per pixel of that level.
    scale : float
        Pixels of the level per output pixel (1.0 = no resizing).
    downsample : float
        Level-0 pixels per output pixel (``level_downsample * scale``).
    effective_mpp : float
        The output's real micrometres per pixel.
    """

    level: int
    level_downsample: float
    scale: float
    downsample: float
    effective_mpp: float

    @property
    def resized(self) -> bool:
        return self.scale != 1.0


def choose_level(
    level0_mpp: float,
    level_downsamples: tuple[float, ...] | list[float],
    target_mpp: float,
    *,
    tolerance: float = 0.05,
) -> LevelChoice:
    """Pick the coarsest level at least as fine as ``target_mpp``.

    A level whose mpp is within ``tolerance`` (relative) of the target is used
    as it is (``scale == 1``, effective mpp = the level's own); otherwise the
    chosen level is resized by ``scale = target_mpp / level_mpp``. A target
    finer than level 0 upsamples level 0 (``scale < 1``).
    """
    best = 0
    for lvl, ds in enumerate(level_downsamples):
        lvl_mpp = level0_mpp * ds
        if lvl_mpp <= target_mpp * (1 + tolerance):
            if ds > level_downsamples[best] or lvl == 0:
                best = lvl
    ds = float(level_downsamples[best])
    lvl_mpp = level0_mpp * ds
    if abs(lvl_mpp - target_mpp) <= tolerance * target_mpp:
        scale = 1.0
    else:
        scale = target_mpp / lvl_mpp
    return LevelChoice(
        level=best,
        level_downsample=ds,
        scale=scale,
        downsample=ds * scale,
        effective_mpp=lvl_mpp * scale,
    )


# --------------------------------------------------------------------------- pixels


def composite_on_white(rgba: np.ndarray, background: int = 255) -> np.ndarray:
    """Flatten OpenSlide's premultiplied RGBA onto a uniform background.

    Parameters
    ----------
    rgba : (H, W, 4) uint8 array
        Premultiplied RGBA as returned by ``OpenSlide.read_region``.
    background : int
        Grey value shown where the slide is transparent (255 = white glass).
    """
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    out = rgb.astype(np.uint16) + ((255 - alpha.astype(np.uint16)) * background // 255)[..., None]
    return np.minimum(out, 255).astype(np.uint8)


def read_region_rgb(
    slide: openslide.OpenSlide,
    level0_xy: tuple[int, int],
    level: int,
    size_wh: tuple[int, int],
    *,
    background: int = 255,
) -> np.ndarray:
    """``read_region`` as an (H, W, 3) uint8 RGB array composited onto ``background``."""
    region = slide.read_region((int(level0_xy[0]), int(level0_xy[1])), int(level), (int(size_wh[0]), int(size_wh[1])))
    return composite_on_white(np.asarray(region), background)


def read_lowres(
    slide: openslide.OpenSlide,
    info: SlideInfo,
    target_mpp: float,
    *,
    strip_px: int = 2048,
    fast_path: str | None = None,
) -> tuple[np.ndarray, float]:
    """Render the slide's bounds at about ``target_mpp`` using the pyramid.

    Reads the coarsest level that is at least as fine as the target, in
    horizontal strips (bounded memory), and resizes with area averaging.
    With ``fast_path`` (the slide's file) the level's source tiles are decoded
    directly (:mod:`wsi.fastread`, the same pixels as OpenSlide) when the
    file allows it, else OpenSlide reads them.

    Returns
    -------
    rgb : (H, W, 3) uint8 array
        The rendering of ``info.bounds_xywh``.
    downsample : float
        Level-0 pixels per pixel of ``rgb`` (along x; y matches to rounding).
    """
    bx, by, bw, bh = info.bounds_xywh
    choice = choose_level(info.mpp, info.level_downsamples, target_mpp, tolerance=0.0)
    ds_level = choice.level_downsample
    out_w = max(1, int(round(bw * info.mpp / target_mpp)))
    out_h = max(1, int(round(bh * info.mpp / target_mpp)))
    lvl_w = max(1, int(math.ceil(bw / ds_level)))
    lvl_h = max(1, int(math.ceil(bh / ds_level)))
    out = np.empty((out_h, out_w, 3), np.uint8)
    reader = None
    # Offset bounds (MRXS ...), DICOM folders and flat images never take the fast path.
    if fast_path is not None and bx == 0 and by == 0 and not isinstance(slide, openslide.ImageSlide) and Path(fast_path).is_file():
        from wsi.fastread import try_open

        reader = try_open(fast_path, slide.level_dimensions[choice.level])
    # Strips in output rows; each reads the matching rows of the level.
    rows_per_strip = max(1, int(strip_px * out_h / lvl_h))
    for oy in range(0, out_h, rows_per_strip):
        oy1 = min(out_h, oy + rows_per_strip)
        ly0 = int(math.floor(oy * lvl_h / out_h))
        ly1 = int(math.ceil(oy1 * lvl_h / out_h))
        if reader is not None:
            strip = reader.read_region(0, ly0, lvl_w, max(1, ly1 - ly0))
        else:
            strip = read_region_rgb(
                slide, (bx, by + int(round(ly0 * ds_level))), choice.level, (lvl_w, max(1, ly1 - ly0))
            )
        # Exact resampling of this strip's rows onto its output rows.
        target = (out_w, oy1 - oy)
        interp = cv2.INTER_AREA if lvl_w >= out_w else cv2.INTER_LINEAR
        out[oy:oy1] = cv2.resize(strip, target, interpolation=interp)
    if reader is not None:
        reader.close()
    return out, bw / out_w


# --------------------------------------------------------------------------- identity


def file_fingerprint(path: str | Path, *, sample_bytes: int = 1 << 20, n_samples: int = 8) -> str:
    """A content fingerprint cheap enough for gigabyte files.

    SHA-256 over the file size, its first and last ``sample_bytes`` and
    ``n_samples`` evenly spaced samples in between. For formats that keep their
    pixels in a sibling folder (MRXS) the folder's file names and sizes are
    included.
    """
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():  # a DICOM scan: every instance file's name and fingerprint
        for f in dicom_files(path):
            h.update(f"{f.name}:{file_fingerprint(f, sample_bytes=sample_bytes, n_samples=n_samples)}".encode())
        return h.hexdigest()[:32]
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as fh:
        if size <= sample_bytes * (n_samples + 2):
            h.update(fh.read())
        else:
            offsets = [0, size - sample_bytes] + [
                int(size * (i + 1) / (n_samples + 1)) for i in range(n_samples)
            ]
            for off in sorted(offsets):
                fh.seek(off)
                h.update(fh.read(sample_bytes))
    sibling = path.with_suffix("")
    if path.suffix.lower() == ".mrxs" and sibling.is_dir():
        for f in sorted(sibling.iterdir()):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:32]


def file_stat(path: str | Path) -> tuple[int, float]:
    """``(size in bytes, mtime)``; for a DICOM folder the total size and the newest mtime."""
    if Path(path).is_dir():
        sts = [f.stat() for f in dicom_files(path)] or [os.stat(path)]
        return int(sum(s.st_size for s in sts)), float(max(s.st_mtime for s in sts))
    st = os.stat(path)
    return int(st.st_size), float(st.st_mtime)
