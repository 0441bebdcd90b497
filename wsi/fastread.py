"""Fast region reads from tiled TIFF-family slides.

OpenSlide's ``read_region`` is the universal reader, but it runs every pixel
through a tile cache, a Cairo compositing step and a premultiplied-ARGB
conversion, which caps it at roughly 25-30 megapixels per second per core.
The tiling stage reads large, overlapping windows of one pyramid level, so it
can do much better by going to the source tiles directly: read the compressed
bytes of every source tile the requested regions touch (once, with one open
file handle), decode each with libjpeg-turbo / OpenJPEG through
:mod:`imagecodecs`, and copy the overlapping parts into the outputs.

The reader handles one pyramid level of

* Aperio SVS (JPEG, and JPEG 2000 compressions 33003 / 33005),
* generic tiled TIFF / BigTIFF pyramids (one tiled IFD per level, or levels
  stored as SubIFDs) with JPEG, JPEG 2000 or any lossless compression that
  :mod:`tifffile` decodes (LZW, deflate, zstd, WebP, PNG, ...).

Anything else raises :class:`UnsupportedSlide` from
:meth:`TiffLevelReader.open` (or makes :func:`try_open` return ``None``), and
the caller should fall back to OpenSlide: non-TIFF formats, NDPI, Ventana
BIF, Leica SCN and Trestle files (whose tiles do not map 1:1 onto
OpenSlide's levels), stripped levels, separate colour planes, samples wider
than 8 bits, palette / CMYK / non-JPEG YCbCr images, and Aperio levels below
a level with missing tiles (OpenSlide paints those from the larger level). Colour handling follows OpenSlide:
the TIFF PhotometricInterpretation tag alone decides whether JPEG data are
YCbCr (photometric 6) or RGB (photometric 2), as Aperio writes RGB-encoded
JPEG tiles without a JFIF or Adobe marker.

Nothing here keeps a file open at import time, and readers pickle by path,
so they are safe to hand to ``spawn``-started worker processes.
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "UnsupportedSlide",
    "TileDecodeError",
    "TiffLevelReader",
    "try_open",
    "iter_canvases",
    "touched_source_tiles",
    "decode_source_tiles",
]

#: TIFF compression codes decoded directly with libjpeg-turbo.
_JPEG_COMPRESSIONS = {7}
#: Aperio JPEG 2000 with YCbCr components (possibly 4:2:2 chroma).
_JP2K_YCBCR = 33003
#: JPEG 2000 with RGB components (Aperio 33005; 33004 and 34712 are the
#: other JPEG 2000 codes in use, decoded the same way).
_JP2K_RGB = {33004, 33005, 34712}
#: Compressions refused outright: old-style JPEG (6) has no reliable layout,
#: and the rest decode to something that is not an 8-bit RGB image.
_REFUSED_COMPRESSIONS = {
    6: "old-style JPEG (compression 6)",
    2: "CCITT RLE",
    3: "CCITT Group 3",
    4: "CCITT Group 4",
}
#: Most bytes fetched with one ``pread`` when neighbouring tiles are
#: stored back to back in the file.
_MAX_READ_SPAN = 16 << 20
#: Largest gap between two tiles' data that is still read in one go.
_MAX_READ_GAP = 4096


class UnsupportedSlide(Exception):
    """The fast path cannot read this slide or level; use OpenSlide instead.

    The message says why (no tiled page of the requested size, unsupported
    compression, planar configuration, sample layout, vendor format ...).
    """


class TileDecodeError(RuntimeError):
    """A source tile's compressed data could not be read or decoded.

    Raised instead of returning garbage pixels: the message names the file,
    the tile as ``(row, column)`` in the level's tile grid and the level.
    When the decoder itself raised, its exception is chained as
    ``__cause__``; truncated streams (which libjpeg only warns about) and
    tiles that decode to the wrong size are caught by checks here.
    """


def _as_region(region) -> tuple[int, int, int, int]:
    try:
        x, y, w, h = region
    except (TypeError, ValueError):
        raise ValueError(
            f"region must be (x, y, w, h), got {region!r}"
        ) from None
    x, y, w, h = int(x), int(y), int(w), int(h)
    if w < 0 or h < 0:
        raise ValueError(f"region width and height must be >= 0, got {region!r}")
    return x, y, w, h


def _check_fill(fill) -> np.ndarray:
    fill_arr = np.asarray(fill)
    if (
        fill_arr.shape not in ((), (3,))
        or not np.issubdtype(fill_arr.dtype, np.number)
        or (fill_arr < 0).any()
        or (fill_arr > 255).any()
    ):
        raise ValueError(f"fill must be 0..255 or an RGB triple of those, got {fill!r}")
    return fill_arr


def touched_source_tiles(
    regions_xywh: Iterable[Sequence[int]],
    tile_shape: tuple[int, int],
    level_shape: tuple[int, int],
) -> set[tuple[int, int]]:
    """Return the source tiles that a set of regions overlaps.

    Parameters
    ----------
    regions_xywh : iterable of (x, y, w, h)
        Regions in the level's pixel coordinates (pixels). They may extend
        beyond the level; only their part inside the level counts.
    tile_shape : (int, int)
        ``(tile_height, tile_width)`` of the source tiles, in pixels.
    level_shape : (int, int)
        ``(height, width)`` of the level, in pixels (numpy order, like
        ``tile_shape``; note this is the reverse of OpenSlide's
        ``level_dimensions``).

    Returns
    -------
    tiles : set of (int, int)
        ``(tile_row, tile_column)`` indices of every source tile that at
        least one region overlaps. Its size is the minimum number of tile
        decodes needed to serve the regions.
    """
    th, tw = (int(v) for v in tile_shape)
    height, width = (int(v) for v in level_shape)
    if th <= 0 or tw <= 0:
        raise ValueError(f"tile_shape must be positive, got {tile_shape!r}")
    tiles: set[tuple[int, int]] = set()
    for region in regions_xywh:
        x, y, w, h = _as_region(region)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, width), min(y + h, height)
        if x0 >= x1 or y0 >= y1:
            continue
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                tiles.add((ty, tx))
    return tiles


def _ycbcr_to_rgb(ycc: np.ndarray) -> np.ndarray:
    """Convert full-range (JFIF / BT.601) YCbCr uint8 pixels to RGB uint8."""
    import cv2  # local: only JPEG 2000 YCbCr slides need it

    # OpenCV's YCrCb conversion is the JFIF one; it wants (Y, Cr, Cb) order.
    yrb = np.ascontiguousarray(ycc[..., [0, 2, 1]])
    return cv2.cvtColor(yrb, cv2.COLOR_YCrCb2RGB)


def _jp2k_needs_ycbcr_conversion(data: bytes) -> bool:
    """Whether a decoded Aperio 33003 tile still holds YCbCr samples.

    imagecodecs (through OpenJPEG's ``color_sycc_to_rgb``) already converts
    three-component codestreams whose chroma is subsampled (Aperio's 4:2:2)
    and JP2 files whose colour box says sYCC. A raw codestream with
    full-resolution chroma comes back unconverted.
    """
    if data[:4] != b"\xff\x4f\xff\x51":
        return False  # JP2 container: its colour box was honoured
    comps = _j2k_subsampling(data)
    if not comps or len(comps) != 3:
        return True
    return all(c == (1, 1) for c in comps)


def _j2k_subsampling(data: bytes) -> list[tuple[int, int]] | None:
    """Return per-component (XRsiz, YRsiz) from a JPEG 2000 SIZ marker."""
    start = data.find(b"\xff\x4f\xff\x51")  # SOC immediately followed by SIZ
    if start < 0:
        return None
    siz = start + 4
    if len(data) < siz + 38:
        return None
    ncomp = int.from_bytes(data[siz + 36 : siz + 38], "big")
    comps = []
    for c in range(ncomp):
        off = siz + 38 + 3 * c
        if len(data) < off + 3:
            return None
        comps.append((data[off + 1], data[off + 2]))
    return comps


def _decode_jp2k(lv: "_Level", data: bytes) -> np.ndarray:
    """Decode one JPEG 2000 tile to RGB uint8."""
    import imagecodecs

    arr = imagecodecs.jpeg2k_decode(data)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"JPEG 2000 tile decoded to shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"JPEG 2000 tile has {arr.dtype} samples")
    if lv.jp2k_ycbcr and _jp2k_needs_ycbcr_conversion(data):
        arr = _ycbcr_to_rgb(arr)
    return arr


class _Level:
    """Everything needed to decode one tiled TIFF page, file handle excluded."""

    def __init__(self, page, tif, label: str):
        import tifffile

        self.label = label
        self.width = int(page.imagewidth)
        self.height = int(page.imagelength)
        self.tile_h = int(page.tilelength)
        self.tile_w = int(page.tilewidth)
        self.tiles_down = -(-self.height // self.tile_h)
        self.tiles_across = -(-self.width // self.tile_w)
        self.compression = int(page.compression)
        self.photometric = int(page.photometric)
        self.samples = int(page.samplesperpixel)
        self.jpegtables = page.jpegtables
        self.offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self.bytecounts = np.asarray(page.databytecounts, dtype=np.int64)
        where = f"{label} ({self.width}x{self.height})"

        if page.imagedepth != 1 or page.tiledepth != 1:
            raise UnsupportedSlide(f"{where} is a volume (tile depth > 1)")
        if int(page.planarconfig) != 1:
            raise UnsupportedSlide(
                f"{where} stores colour planes separately (PlanarConfiguration 2)"
            )
        if page.dtype is None or np.dtype(page.dtype) != np.uint8:
            raise UnsupportedSlide(
                f"{where} has {page.bitspersample}-bit samples "
                f"(sample format {int(page.sampleformat)}); only 8-bit is read"
            )
        n_tiles = self.tiles_down * self.tiles_across
        if len(self.offsets) != n_tiles or len(self.bytecounts) != n_tiles:
            raise UnsupportedSlide(
                f"{where} has {len(self.offsets)} tile offsets for a "
                f"{self.tiles_down}x{self.tiles_across} grid"
            )
        if self.compression in _REFUSED_COMPRESSIONS:
            raise UnsupportedSlide(
                f"{where} uses {_REFUSED_COMPRESSIONS[self.compression]}"
            )

        extra = len(page.extrasamples)
        colour = self.samples - extra
        photometric = self.photometric
        if self.compression in _JPEG_COMPRESSIONS:
            import imagecodecs

            if not imagecodecs.JPEG8.available:
                raise UnsupportedSlide("imagecodecs was built without libjpeg-turbo")
            self.jpeg8_decode = imagecodecs.jpeg8_decode
            if photometric in (2, 6) and self.samples == 3:
                # OpenSlide and libtiff let the photometric tag decide; the
                # JPEG stream's own markers (JFIF, Adobe, component IDs) are
                # ignored. Aperio writes RGB data labelled photometric RGB.
                self.kind = "jpeg"
                self.jpeg_colorspace = "YCBCR" if photometric == 6 else "RGB"
            elif photometric == 1 and self.samples == 1:
                self.kind = "jpeg"
                self.jpeg_colorspace = "GRAYSCALE"
            else:
                raise UnsupportedSlide(
                    f"{where}: JPEG with photometric {photometric} and "
                    f"{self.samples} samples per pixel is not supported"
                )
        elif self.compression == _JP2K_YCBCR or self.compression in _JP2K_RGB:
            import imagecodecs

            if not imagecodecs.JPEG2K.available:
                raise UnsupportedSlide(
                    f"{where}: JPEG 2000 tiles but imagecodecs has no OpenJPEG"
                )
            if self.samples != 3:
                raise UnsupportedSlide(
                    f"{where}: JPEG 2000 with {self.samples} samples per pixel"
                )
            self.kind = "jp2k"
            self.jp2k_ycbcr = self.compression == _JP2K_YCBCR or photometric == 6
            self._probe_jp2k(tif, where)
        else:
            try:
                tifffile.TIFF.DECOMPRESSORS[self.compression]
            except (KeyError, ImportError) as exc:
                raise UnsupportedSlide(
                    f"{where}: compression {self.compression} cannot be decoded "
                    f"({exc})"
                ) from None
            if photometric == 2 and colour == 3:
                pass
            elif photometric == 1 and colour == 1:
                pass
            else:
                raise UnsupportedSlide(
                    f"{where}: photometric {photometric} with {self.samples} "
                    f"samples ({extra} extra) is not supported without JPEG"
                )
            if page.is_subsampled:
                raise UnsupportedSlide(f"{where}: chroma subsampling without JPEG")
            self.kind = "tifffile"
            # The closure only needs the tag values it captured, not the file.
            self.tiff_decode = page.decode
        self.colour_samples = colour if self.kind == "tifffile" else 3

    def _probe_jp2k(self, tif, where: str) -> None:
        """Check that subsampled JPEG 2000 chroma (Aperio 4:2:2) decodes.

        imagecodecs upsamples and converts such tiles through OpenJPEG; a
        build that cannot would fail on every tile, so refuse at open time
        and let OpenSlide read the slide.
        """
        present = np.nonzero(self.bytecounts > 0)[0]
        if not len(present):
            return
        i = int(present[0])
        fh = tif.filehandle
        fh.seek(int(self.offsets[i]))
        data = fh.read(int(self.bytecounts[i]))
        comps = _j2k_subsampling(data)
        if not comps or all(c == (1, 1) for c in comps):
            return
        try:
            arr = _decode_jp2k(self, data)
        except Exception as exc:
            raise UnsupportedSlide(
                f"{where}: JPEG 2000 tiles with subsampled components {comps} "
                f"do not decode here ({type(exc).__name__}: {exc})"
            ) from None
        if arr.shape[:2] != (self.tile_h, self.tile_w):
            raise UnsupportedSlide(
                f"{where}: JPEG 2000 tile with components {comps} decoded to "
                f"{arr.shape}, not the {self.tile_h}x{self.tile_w} tile"
            )

    def tile_index(self, ty: int, tx: int) -> int:
        return ty * self.tiles_across + tx


class TiffLevelReader:
    """Reads rectangular regions of one pyramid level of a tiled TIFF-family slide.

    Create it with :meth:`open` (or :func:`try_open`). Source tiles are read
    with ``os.pread`` on one file descriptor and decoded with
    :mod:`imagecodecs`; each call of :meth:`read_regions` decodes every
    source tile its regions touch exactly once and keeps no tile after the
    call returns.

    Attributes
    ----------
    path : str
        The slide file.
    width, height : int
        Size of the level, in pixels.
    tile_shape : (int, int)
        ``(tile_height, tile_width)`` of the source tiles, in pixels.
    source : str
        Which IFD holds the level, e.g. ``"TIFF page 0"`` or
        ``"TIFF page 0 SubIFD 1"``.
    compression : int
        TIFF compression code of the level's tiles.
    decoded_tiles : int
        Number of source tiles decoded by this reader so far (missing tiles,
        which have no data, are not counted).
    """

    def __init__(self, path, level_dimensions: tuple[int, int]):
        self.path = os.fspath(path)
        self.level_dimensions = (int(level_dimensions[0]), int(level_dimensions[1]))
        self.decoded_tiles = 0
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._level = self._find_level(self.path, self.level_dimensions)
        self.width = self._level.width
        self.height = self._level.height
        self.tile_shape = (self._level.tile_h, self._level.tile_w)
        self.source = self._level.label
        self.compression = self._level.compression

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, path, level_dimensions: tuple[int, int]) -> "TiffLevelReader":
        """Open the level of ``path`` whose size is ``level_dimensions``.

        Parameters
        ----------
        path : str or os.PathLike
            Slide file (Aperio SVS, generic tiled TIFF / BigTIFF, ...).
        level_dimensions : (int, int)
            ``(width, height)`` of the wanted level in pixels, as OpenSlide
            reports it in ``OpenSlide.level_dimensions``.

        Returns
        -------
        reader : TiffLevelReader

        Raises
        ------
        UnsupportedSlide
            The file is not a TIFF, is a vendor format whose tiles do not map
            1:1 to OpenSlide's level (Ventana BIF, Leica SCN, Hamamatsu
            NDPI), has no tiled page of that size, or that page uses a
            compression, planar configuration or sample layout this reader
            does not decode. Fall back to OpenSlide.
        OSError
            The file cannot be opened at all.
        """
        return cls(path, level_dimensions)

    @staticmethod
    def _find_level(path: str, level_dimensions: tuple[int, int]) -> _Level:
        import tifffile

        try:
            tif = tifffile.TiffFile(path)
        except OSError:
            raise
        except Exception as exc:  # TiffFileError, or worse on mangled headers
            raise UnsupportedSlide(f"{path}: not a TIFF file ({exc})") from None
        with tif:
            try:
                candidates = TiffLevelReader._candidate_pages(tif, path)
            except (UnsupportedSlide, OSError):
                raise
            except Exception as exc:
                raise UnsupportedSlide(
                    f"{path}: TIFF structure not understood ({type(exc).__name__}: {exc})"
                ) from None
            want = (int(level_dimensions[0]), int(level_dimensions[1]))
            matches = [
                (page, label) for page, label in candidates
                if (int(page.imagewidth), int(page.imagelength)) == want
            ]
            tiled = [(page, label) for page, label in matches if page.is_tiled]
            if not tiled:
                if matches:
                    raise UnsupportedSlide(
                        f"{path}: the {want[0]}x{want[1]} level is stored in strips, "
                        "not tiles"
                    )
                sizes = sorted(
                    {(int(p.imagewidth), int(p.imagelength)) for p, _ in candidates},
                    reverse=True,
                )
                raise UnsupportedSlide(
                    f"{path}: no TIFF page is {want[0]}x{want[1]} (pages are {sizes})"
                )
            problems = []
            for page, label in tiled:
                try:
                    level = _Level(page, tif, label)
                except UnsupportedSlide as exc:
                    problems.append(str(exc))
                    continue
                if tif.is_svs:
                    TiffLevelReader._check_aperio_missing_tiles(tif, page, path)
                return level
            raise UnsupportedSlide(f"{path}: " + "; ".join(problems))

    @staticmethod
    def _candidate_pages(tif, path: str) -> list:
        """All image pages of the file as ``(page, label)``, IFD order first.

        Main-chain pages come first, then their SubIFDs, then the level
        pages of any series tifffile recognises (deduplicated by offset).
        """
        import tifffile

        for flag, name in (
            ("is_bif", "Ventana BIF (overlapping tiles)"),
            ("is_scn", "Leica SCN (multi-image collection)"),
            ("is_ndpi", "Hamamatsu NDPI"),
        ):
            if getattr(tif, flag, False):
                raise UnsupportedSlide(f"{path}: {name} is read through OpenSlide")
        software = tif.pages.first.software or ""
        if software.startswith("MedScan"):
            # Trestle: tiles overlap by amounts given in the description
            raise UnsupportedSlide(
                f"{path}: Trestle (overlapping tiles) is read through OpenSlide"
            )

        candidates: list = []
        seen: set[int] = set()

        def add(page, label: str) -> None:
            if isinstance(page, tifffile.TiffPage) and page.offset not in seen:
                seen.add(page.offset)
                candidates.append((page, label))

        for i, page in enumerate(tif.pages):
            add(page, f"TIFF page {i}")
        for page, label in list(candidates):
            try:
                sub = page.pages  # SubIFD pyramid, if any
                for j, subpage in enumerate(sub if sub is not None else ()):
                    add(subpage, f"{label} SubIFD {j}")
            except Exception:  # a damaged SubIFD chain only hides levels
                pass
        try:
            for series in tif.series:
                for level in series.levels:
                    keyframe = getattr(level, "keyframe", None)
                    if keyframe is not None:
                        add(keyframe, f"TIFF IFD at offset {keyframe.offset}")
        except Exception:  # series detection is heuristic; pages suffice
            pass
        return candidates

    @staticmethod
    def _check_aperio_missing_tiles(tif, page, path: str) -> None:
        """Refuse Aperio levels that OpenSlide paints from the level above.

        Some Aperio encoders leave zero-length tiles. OpenSlide fills such a
        tile of level k > 0 by downscaling level k - 1, and it marks the
        tiles of every later level that cover a missing tile as missing too.
        Only a missing tile in the first level is plainly transparent
        (``fill`` here); anything else goes to OpenSlide.
        """
        import tifffile

        levels = [p for p in tif.pages if isinstance(p, tifffile.TiffPage) and p.is_tiled]
        offsets = [p.offset for p in levels]
        if page.offset not in offsets:
            return
        k = offsets.index(page.offset)
        if k == 0:
            return
        for p in levels[: k + 1]:
            if 0 in p.databytecounts:
                raise UnsupportedSlide(
                    f"{path}: Aperio level {k} has missing tiles at or above it, "
                    "which OpenSlide renders from the next larger level"
                )

    # ------------------------------------------------------------ file I/O
    def _fileno(self) -> int:
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0)
                    self._fd = os.open(self.path, flags)
        return self._fd

    def _read_at(self, offset: int, size: int) -> bytes:
        fd = self._fileno()
        if hasattr(os, "pread"):
            chunks = []
            got = 0
            while got < size:
                chunk = os.pread(fd, size - got, offset + got)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        with self._lock:  # platforms without pread: seek + read
            os.lseek(fd, offset, os.SEEK_SET)
            return os.read(fd, size)

    def close(self) -> None:
        """Close the file descriptor (reopened automatically if used again)."""
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> "TiffLevelReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self):
        # Pickle by path: file descriptors do not cross process boundaries.
        return {"path": self.path, "level_dimensions": self.level_dimensions}

    def __setstate__(self, state):
        self.__init__(state["path"], state["level_dimensions"])

    def __repr__(self) -> str:
        return (
            f"TiffLevelReader({self.path!r}, level {self.width}x{self.height}, "
            f"{self._level.label}, tiles {self.tile_shape[0]}x{self.tile_shape[1]}, "
            f"compression {self.compression})"
        )

    # ------------------------------------------------------------ decoding
    def _fail(self, ty: int, tx: int, why: str) -> TileDecodeError:
        msg = (
            f"{self.path}: source tile ({ty},{tx}) at level {self.width}x{self.height} "
            f"({self._level.label}) failed to decode: {why}"
        )
        return TileDecodeError(msg)

    def _decode(self, blob: bytes, start: int, end: int, ty: int, tx: int) -> np.ndarray:
        """Decode the tile stored in ``blob[start:end]`` to (h, w, 3) uint8 RGB."""
        lv = self._level
        kind = lv.kind
        data = memoryview(blob)[start:end]
        try:
            if kind == "jpeg":
                arr = lv.jpeg8_decode(
                    data,
                    tables=lv.jpegtables,
                    colorspace=lv.jpeg_colorspace,
                    outcolorspace="RGB",
                )
                # libjpeg only *warns* about a stream that ends early and pads
                # the rest of the tile with grey; OpenSlide turns that warning
                # into an error, so do we: an EOI marker must follow the scan.
                # (Inside entropy-coded data 0xFF is always stuffed, so
                # FF D9 after the SOS header can only be the EOI marker;
                # padding after EOI is tolerated, as libjpeg ignores it.)
                sos = blob.find(b"\xff\xda", start, end)
                if blob.rfind(b"\xff\xd9", max(sos, start), end) < 0:
                    raise self._fail(ty, tx, "truncated JPEG stream (no EOI marker)")
            elif kind == "jp2k":
                arr = _decode_jp2k(lv, bytes(data))
            else:
                index = lv.tile_index(ty, tx)
                arr = lv.tiff_decode(bytes(data), index, jpegtables=lv.jpegtables)[0]
                if arr is None:
                    raise ValueError("decoder returned no data")
                arr = arr.reshape(arr.shape[-3:])
                if lv.colour_samples == 1:
                    arr = np.repeat(arr[..., :1], 3, axis=2)
                elif arr.shape[2] != 3:
                    arr = arr[..., :3]
        except TileDecodeError:
            raise
        except Exception as exc:  # decoder errors come in many types
            raise self._fail(ty, tx, f"{type(exc).__name__}: {exc}") from exc
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise self._fail(
                ty, tx, f"decoded to {arr.dtype} {arr.shape}, expected uint8 RGB"
            )
        need_h = min(lv.tile_h, lv.height - ty * lv.tile_h)
        need_w = min(lv.tile_w, lv.width - tx * lv.tile_w)
        if arr.shape[0] < need_h or arr.shape[1] < need_w:
            raise self._fail(
                ty, tx,
                f"decoded to {arr.shape[1]}x{arr.shape[0]} px, tile needs "
                f"{need_w}x{need_h}",
            )
        return arr

    # ------------------------------------------------------------- reading
    def read_regions(self, regions_xywh, *, fill=255) -> list[np.ndarray]:
        """Read several regions of the level, decoding each source tile once.

        Parameters
        ----------
        regions_xywh : iterable of (x, y, w, h)
            Regions in this level's pixel coordinates (pixels; x, y of the
            top-left corner, w, h the size). They may overlap one another and
            extend beyond the level.
        fill : int or (int, int, int), optional
            Value for pixels outside the level and inside missing source
            tiles (TileByteCounts 0). Default 255 (white, like OpenSlide's
            transparent pixels composited on white).

        Returns
        -------
        images : list of ndarray, shape (h, w, 3), dtype uint8
            One RGB array per region, in the order given.

        Raises
        ------
        TileDecodeError
            A source tile the regions need is truncated or corrupt.
        ValueError
            A region is malformed (negative size, not four numbers).

        Notes
        -----
        All tiles touched by the regions are decoded once each and pasted
        into every region they overlap, in file order; only one decoded tile
        is alive at a time, so the extra memory is one tile on top of the
        outputs.
        """
        lv = self._level
        regions = [_as_region(r) for r in regions_xywh]
        fill_arr = _check_fill(fill)
        width, height, th, tw = lv.width, lv.height, lv.tile_h, lv.tile_w

        outs: list[np.ndarray] = []
        users: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, (x, y, w, h) in enumerate(regions):
            x0, y0 = max(x, 0), max(y, 0)
            x1, y1 = min(x + w, width), min(y + h, height)
            inside = x0 == x and y0 == y and x1 == x + w and y1 == y + h
            # Every in-level pixel is written by a tile below, so only
            # regions that stick out of the level need pre-filling.
            if inside:
                outs.append(np.empty((h, w, 3), np.uint8))
            else:
                outs.append(np.full((h, w, 3), fill_arr, np.uint8))
            if x0 >= x1 or y0 >= y1:
                continue
            for ty in range(y0 // th, (y1 - 1) // th + 1):
                for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                    users[(ty, tx)].append(i)
        if not users:
            return outs

        for (ty, tx), tile in self._iter_tiles(users.keys()):
            ox, oy = tx * tw, ty * th
            tile_x1 = min(ox + tw, width)
            tile_y1 = min(oy + th, height)
            for i in users[(ty, tx)]:
                x, y, w, h = regions[i]
                ix0, iy0 = max(x, ox), max(y, oy)
                ix1, iy1 = min(x + w, tile_x1), min(y + h, tile_y1)
                dst = outs[i][iy0 - y : iy1 - y, ix0 - x : ix1 - x]
                if tile is None:
                    dst[...] = fill_arr
                else:
                    dst[...] = tile[iy0 - oy : iy1 - oy, ix0 - ox : ix1 - ox]
        return outs

    def read_canvas(self, regions_xywh, *, fill=255, tiles: dict | None = None, scratch: np.ndarray | None = None):
        """Read the bounding box of several regions into one array.

        This is how tiles are cut in bulk: every source tile the regions
        touch is decoded once and pasted once into a single canvas, and each
        region is then a view of it (no per-region copy).

        Parameters
        ----------
        regions_xywh : iterable of (x, y, w, h)
            Regions in this level's pixel coordinates (pixels); they may
            overlap one another and extend beyond the level.
        fill : int or (int, int, int), optional
            Value for pixels outside the level and inside missing source
            tiles. Default 255 (white).
        tiles : dict, optional
            Decoded source tiles shared between calls, keyed by
            ``(tile_row, tile_column)`` (``None`` for a missing tile). Tiles
            found there are not decoded again and every tile this call
            decodes is added; the caller removes the ones it no longer needs
            (see :func:`iter_canvases`).
        scratch : uint8 array, optional
            Memory to build the canvas in (any shape, C-contiguous, at least
            the canvas's size); reusing it across calls saves the page faults
            of a fresh large allocation each time. The canvas is then a view
            of it.

        Returns
        -------
        canvas : ndarray, shape (H, W, 3), dtype uint8
            The regions' bounding box. Region ``(x, y, w, h)`` is
            ``canvas[y - y0 : y - y0 + h, x - x0 : x - x0 + w]``; pixels of the
            box that lie in no region are undefined.
        origin : (int, int)
            ``(x0, y0)``, the box's top-left corner in level pixels.

        Raises
        ------
        TileDecodeError
            A source tile the regions need is truncated or corrupt.
        ValueError
            No regions, or a malformed region or fill.
        """
        lv = self._level
        regions = [_as_region(r) for r in regions_xywh]
        if not regions:
            raise ValueError("read_canvas needs at least one region")
        fill_arr = _check_fill(fill)
        bx0 = min(r[0] for r in regions)
        by0 = min(r[1] for r in regions)
        bx1 = max(r[0] + r[2] for r in regions)
        by1 = max(r[1] + r[3] for r in regions)
        width, height, th, tw = lv.width, lv.height, lv.tile_h, lv.tile_w
        inside = bx0 >= 0 and by0 >= 0 and bx1 <= width and by1 <= height
        shape = (by1 - by0, bx1 - bx0, 3)
        size = shape[0] * shape[1] * 3
        if scratch is not None and scratch.dtype == np.uint8 and scratch.flags.c_contiguous and scratch.size >= size:
            canvas = scratch.reshape(-1)[:size].reshape(shape)
        else:
            canvas = np.empty(shape, np.uint8)
        if not inside:
            canvas[...] = fill_arr
        keys = touched_source_tiles(regions, (th, tw), (height, width))
        cache = {} if tiles is None else tiles
        missing = [k for k in keys if k not in cache]
        missing.sort()
        for key, tile in self._iter_tiles(missing):
            cache[key] = tile
        for ty, tx in keys:
            tile = cache[(ty, tx)]
            ox, oy = tx * tw, ty * th
            ix0, iy0 = max(bx0, ox), max(by0, oy)
            ix1, iy1 = min(bx1, ox + tw, width), min(by1, oy + th, height)
            dst = canvas[iy0 - by0 : iy1 - by0, ix0 - bx0 : ix1 - bx0]
            if tile is None:
                dst[...] = fill_arr
            else:
                dst[...] = tile[iy0 - oy : iy1 - oy, ix0 - ox : ix1 - ox]
        return canvas, (bx0, by0)

    def read_region(self, x: int, y: int, w: int, h: int, *, fill=255) -> np.ndarray:
        """Read one region of the level.

        Parameters
        ----------
        x, y : int
            Top-left corner in this level's pixel coordinates (pixels).
        w, h : int
            Size of the region, in pixels.
        fill : int or (int, int, int), optional
            Value for pixels outside the level or in missing tiles.

        Returns
        -------
        image : ndarray, shape (h, w, 3), dtype uint8
            RGB pixels.
        """
        return self.read_regions([(x, y, w, h)], fill=fill)[0]

    def _iter_tiles(self, keys):
        """Yield ``((ty, tx), rgb or None)`` for the keys, in file order.

        Tiles stored next to each other in the file are fetched with one
        ``pread``; ``None`` stands for a missing tile (no data).
        """
        lv = self._level
        entries = []
        for ty, tx in keys:
            idx = lv.tile_index(ty, tx)
            entries.append((int(lv.offsets[idx]), int(lv.bytecounts[idx]), ty, tx))
        entries.sort()
        n = len(entries)
        i = 0
        while i < n:
            off, count, ty, tx = entries[i]
            if count <= 0 or off <= 0:
                yield (ty, tx), None
                i += 1
                continue
            # group the following tiles that sit (almost) contiguously
            j = i + 1
            end = off + count
            while j < n:
                o2, c2 = entries[j][0], entries[j][1]
                if c2 <= 0 or o2 <= 0 or o2 < end or o2 - end > _MAX_READ_GAP:
                    break
                if o2 + c2 - off > _MAX_READ_SPAN:
                    break
                end = o2 + c2
                j += 1
            blob = self._read_at(off, end - off)
            for k in range(i, j):
                o, c, ky, kx = entries[k]
                start = o - off
                if start + c > len(blob):
                    raise self._fail(
                        ky, kx,
                        f"file ends before the tile's data ({c} bytes at offset {o})",
                    )
                tile = self._decode(blob, start, start + c, ky, kx)
                self.decoded_tiles += 1
                yield (ky, kx), tile
            i = j


def iter_canvases(reader: "TiffLevelReader", cells, *, fill=255):
    """Read groups of regions one after another, decoding each source tile once in all.

    Neighbouring groups of overlapping tiles share the source tiles along
    their borders; reading them in sequence through this function decodes
    those tiles once and keeps each decoded tile only until the last group
    that needs it has been read, so memory stays at about one row of source
    tiles across the groups plus one canvas.

    Parameters
    ----------
    reader : TiffLevelReader
    cells : sequence of sequences of (x, y, w, h)
        The groups of regions, in the order they are read (raster order keeps
        memory lowest).
    fill : int or (int, int, int), optional
        See :meth:`TiffLevelReader.read_canvas`.

    Yields
    ------
    canvas, origin
        :meth:`TiffLevelReader.read_canvas`'s result for each group in turn.
        A canvas is only valid until the next one is requested.
    """
    th, tw = reader.tile_shape
    shape = (reader.height, reader.width)
    last_use: dict[tuple[int, int], int] = {}
    touched = []
    biggest = 0
    for c, regions in enumerate(cells):
        regions = [_as_region(r) for r in regions]
        keys = touched_source_tiles(regions, (th, tw), shape)
        touched.append(keys)
        for k in keys:
            last_use[k] = c
        if regions:
            w = max(x + rw for x, _, rw, _ in regions) - min(x for x, _, _, _ in regions)
            h = max(y + rh for _, y, _, rh in regions) - min(y for _, y, _, _ in regions)
            biggest = max(biggest, w * h * 3)
    tiles: dict = {}
    scratch = np.empty(biggest, np.uint8)  # one canvas buffer for all groups
    for c, regions in enumerate(cells):
        yield reader.read_canvas(regions, fill=fill, tiles=tiles, scratch=scratch)
        for k in touched[c]:
            if last_use[k] == c:
                tiles.pop(k, None)


def try_open(path, level_dimensions: tuple[int, int]) -> TiffLevelReader | None:
    """Open a fast reader for one level, or return ``None`` if unsupported.

    Parameters
    ----------
    path : str or os.PathLike
        Slide file.
    level_dimensions : (int, int)
        ``(width, height)`` of the level in pixels, as OpenSlide reports it.

    Returns
    -------
    reader : TiffLevelReader or None
        ``None`` when :meth:`TiffLevelReader.open` raises
        :class:`UnsupportedSlide`; the caller then reads with OpenSlide.
    """
    try:
        return TiffLevelReader.open(path, level_dimensions)
    except UnsupportedSlide:
        return None


def decode_source_tiles(
    path, level_dimensions: tuple[int, int], tile_indices: Iterable[tuple[int, int]]
) -> int:
    """Read and decode the given source tiles and throw the pixels away.

    This is the floor of the work any reader must do for a set of regions
    (see :func:`touched_source_tiles`); benchmarks compare against it.

    Parameters
    ----------
    path : str or os.PathLike
        Slide file.
    level_dimensions : (int, int)
        ``(width, height)`` of the level in pixels, as OpenSlide reports it.
    tile_indices : iterable of (int, int)
        ``(tile_row, tile_column)`` indices.

    Returns
    -------
    n : int
        Number of tiles decoded (missing tiles are not counted).
    """
    with TiffLevelReader.open(path, level_dimensions) as reader:
        lv = reader._level
        keys = []
        for ty, tx in tile_indices:
            ty, tx = int(ty), int(tx)
            if not (0 <= ty < lv.tiles_down and 0 <= tx < lv.tiles_across):
                raise ValueError(
                    f"tile ({ty},{tx}) is outside the {lv.tiles_down}x"
                    f"{lv.tiles_across} tile grid"
                )
            keys.append((ty, tx))
        for _ in reader._iter_tiles(dict.fromkeys(keys)):
            pass
        return reader.decoded_tiles
