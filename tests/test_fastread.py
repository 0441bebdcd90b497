"""Tests for wsi.fastread: the direct tiled-TIFF read path.

Pixels are checked against OpenSlide (the universal path the pipeline falls
back to) on small pyramids written here with tifffile and on the real Aperio
slides in ../shared when present. Run with ``-s`` to see the measured pixel
differences and speeds.
"""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
import pytest
import tifffile

openslide = pytest.importorskip("openslide")

from wsi.fastread import (  # noqa: E402
    TiffLevelReader,
    TileDecodeError,
    UnsupportedSlide,
    decode_source_tiles,
    touched_source_tiles,
    try_open,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CMU = SHARED / "slides" / "cmu-1-small-region.svs"
CORRUPT = SHARED / "slides" / "corrupt-tiles.svs"
BROKEN = SHARED / "slides" / "broken.svs"

# Allowed difference to OpenSlide. Both sides use libjpeg-turbo / OpenJPEG,
# so JPEG and lossless tiles match exactly; the only rounding is in the
# YCbCr->RGB step of Aperio 33003 JPEG 2000 tiles (OpenSlide's tables vs
# OpenCV's fixed point), a unit or two at most.
MAX_ABS_DIFF = 3
MAX_MEAN_DIFF = 0.5

TILE = 256
BASE_H, BASE_W = 760, 1000  # deliberately not multiples of the tile size


# --------------------------------------------------------------- fixtures
def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth random colour field plus fine grain: JPEG-friendly, not flat."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (h // 24 + 2, w // 24 + 2, 3)).astype(np.float32)
    img = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    img += rng.standard_normal((h, w, 3), dtype=np.float32) * 6.0
    return np.clip(img, 0, 255).astype(np.uint8)


def _pyramid(img: np.ndarray, n: int) -> list[np.ndarray]:
    levels = [img]
    for _ in range(n - 1):
        a = levels[-1]
        levels.append(
            cv2.resize(a, (a.shape[1] // 2, a.shape[0] // 2), interpolation=cv2.INTER_AREA)
        )
    return levels


def _padded_tiles(a: np.ndarray, tile: int = TILE):
    """Yield full-size tiles in raster order, edge tiles zero-padded."""
    for y in range(0, a.shape[0], tile):
        for x in range(0, a.shape[1], tile):
            t = np.zeros((tile, tile) + a.shape[2:], a.dtype)
            part = a[y : y + tile, x : x + tile]
            t[: part.shape[0], : part.shape[1]] = part
            yield t


def _write_pyramid(path, levels, **kw) -> None:
    with tifffile.TiffWriter(path) as tw:
        for k, lvl in enumerate(levels):
            tw.write(lvl, tile=(TILE, TILE), subfiletype=1 if k else 0, metadata=None, **kw)


def _split_jpeg(stream: bytes, rgb_ids_to_numbers: bool):
    """Split a JPEG into (tables-only stream, abbreviated image stream).

    DQT/DHT segments go to the tables, APPn markers are dropped (Aperio tiles
    carry neither JFIF nor Adobe markers). Optionally renumber the component
    IDs 'R','G','B' to 0,1,2 as Aperio does, so that libjpeg alone would
    guess YCbCr and only the TIFF photometric tag says RGB.
    """
    assert stream[:2] == b"\xff\xd8"
    pos, tables, kept = 2, [], []
    remap = {0x52: 0, 0x47: 1, 0x42: 2}
    while True:
        marker = stream[pos + 1]
        length = int.from_bytes(stream[pos + 2 : pos + 4], "big")
        seg = bytearray(stream[pos : pos + 2 + length])
        if marker == 0xDA:  # SOS: header, then entropy data to the end
            if rgb_ids_to_numbers:
                for i in range(seg[4]):
                    seg[5 + 2 * i] = remap.get(seg[5 + 2 * i], seg[5 + 2 * i])
            kept.append(bytes(seg) + stream[pos + 2 + length :])
            break
        if marker in (0xDB, 0xC4):
            tables.append(bytes(seg))
        elif 0xE0 <= marker <= 0xEF:
            pass
        else:
            if marker == 0xC0 and rgb_ids_to_numbers:
                for i in range(seg[9]):
                    seg[10 + 3 * i] = remap.get(seg[10 + 3 * i], seg[10 + 3 * i])
            kept.append(bytes(seg))
        pos += 2 + length
    return b"\xff\xd8" + b"".join(tables) + b"\xff\xd9", b"\xff\xd8" + b"".join(kept)


def _aperio_description(w: int, h: int, codec: str = "JPEG/RGB") -> str:
    # OpenSlide picks its Aperio driver by this prefix (and pads nothing)
    return (
        f"Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE}) "
        f"{codec} Q=70|AppMag = 20|MPP = 0.5"
    )


def _write_shared_tables(path, levels, rgb: bool) -> None:
    """JPEG tiles with one JPEGTables tag per level, as Aperio writes them.

    The RGB variant is a complete Aperio imitation (description, RGB data,
    photometric RGB, component IDs 0,1,2), read by OpenSlide's Aperio driver.
    """
    h0, w0 = levels[0].shape[:2]
    with tifffile.TiffWriter(path) as tw:
        for k, lvl in enumerate(levels):
            tables, tiles = None, []
            for t in _padded_tiles(lvl):
                if rgb:
                    full = imagecodecs.jpeg8_encode(t, level=85, colorspace="RGB", outcolorspace="RGB")
                else:
                    full = imagecodecs.jpeg8_encode(t, level=85, subsampling=(2, 2))
                tab, body = _split_jpeg(bytes(full), rgb_ids_to_numbers=rgb)
                assert tables in (None, tab), "tiles must share quantisation/Huffman tables"
                tables = tab
                tiles.append(body)
            tw.write(
                iter(tiles), shape=lvl.shape, dtype=np.uint8, tile=(TILE, TILE),
                compression="jpeg", photometric="rgb", jpegtables=tables,
                compressionargs={"outcolorspace": "RGB"} if rgb else None,
                description=_aperio_description(w0, h0) if rgb and k == 0 else None,
                subfiletype=1 if k else 0, metadata=None,
            )


def _write_aperio_jp2k(path, img, compression: int) -> None:
    """One-level Aperio-style SVS with JPEG 2000 tiles (33003 or 33005)."""
    desc = _aperio_description(img.shape[1], img.shape[0], "J2K/KDU")

    def tiles():
        for t in _padded_tiles(img):
            if compression == 33003:  # components stored as Y, Cb, Cr
                ycc = cv2.cvtColor(t, cv2.COLOR_RGB2YCrCb)[..., [0, 2, 1]]
                yield imagecodecs.jpeg2k_encode(ycc, level=80, codecformat="J2K", mct=False)
            else:
                yield imagecodecs.jpeg2k_encode(t, level=80, codecformat="J2K")

    with tifffile.TiffWriter(path) as tw:
        tw.write(
            tiles(), shape=img.shape, dtype=np.uint8, tile=(TILE, TILE),
            compression=compression, photometric="rgb", description=desc, metadata=None,
        )


def _write_missing_tiles(path, levels, missing, aperio: bool = False) -> None:
    """Deflate pyramid whose level-0 tiles listed in ``missing`` have no data."""
    h0, w0 = levels[0].shape[:2]
    with tifffile.TiffWriter(path) as tw:
        for k, lvl in enumerate(levels):
            tiles = [
                b"" if k == 0 and i in missing else imagecodecs.zlib_encode(t.tobytes())
                for i, t in enumerate(_padded_tiles(lvl))
            ]
            tw.write(
                iter(tiles), shape=lvl.shape, dtype=np.uint8, tile=(TILE, TILE),
                compression="zlib", photometric="rgb", metadata=None,
                description=_aperio_description(w0, h0, "ZIP") if aperio and k == 0 else None,
                subfiletype=1 if k else 0,
            )


def _write_subifds(path, levels) -> None:
    with tifffile.TiffWriter(path) as tw:
        tw.write(levels[0], tile=(TILE, TILE), compression="jpeg", photometric="rgb",
                 subifds=len(levels) - 1, metadata=None)
        for lvl in levels[1:]:
            tw.write(lvl, tile=(TILE, TILE), compression="jpeg", photometric="rgb",
                     subfiletype=1, metadata=None)


def _build(name: str, path: Path) -> None:
    img = _texture(BASE_H, BASE_W, seed=len(name))
    levels = _pyramid(img, 3)
    jpeg = {"compression": "jpeg", "compressionargs": {"level": 85}, "photometric": "rgb"}
    if name == "jpeg_ycbcr":  # photometric YCbCr, 4:2:0 chroma, tables in every tile
        _write_pyramid(path, levels, **jpeg)
    elif name == "jpeg_rgb":  # photometric RGB, RGB-encoded JPEG
        _write_pyramid(path, levels, compression="jpeg", photometric="rgb",
                       compressionargs={"level": 85, "outcolorspace": "RGB"}, subsampling=(1, 1))
    elif name == "jpeg_tables_rgb":  # Aperio layout: JPEGTables, RGB data, IDs 0,1,2
        _write_shared_tables(path, levels, rgb=True)
    elif name == "jpeg_tables_ycbcr":
        _write_shared_tables(path, levels, rgb=False)
    elif name == "jpeg_gray":
        _write_pyramid(path, [cv2.cvtColor(a, cv2.COLOR_RGB2GRAY) for a in levels],
                       compression="jpeg", compressionargs={"level": 85}, photometric="minisblack")
    elif name == "deflate":
        _write_pyramid(path, levels, compression="zlib", predictor=True, photometric="rgb")
    elif name == "lzw":
        _write_pyramid(path, levels, compression="lzw", photometric="rgb")
    elif name == "zstd":
        _write_pyramid(path, levels, compression="zstd", photometric="rgb")
    elif name == "webp":
        _write_pyramid(path, levels, compression="webp", compressionargs={"level": 90},
                       photometric="rgb")
    elif name == "deflate_rgba":
        rgba = [np.dstack([a, np.full(a.shape[:2], 255, np.uint8)]) for a in levels]
        _write_pyramid(path, rgba, compression="zlib", photometric="rgb", extrasamples="unassalpha")
    elif name == "missing_tiles":
        _write_missing_tiles(path, levels[:1], missing={1, 5})
    elif name == "aperio_missing_tiles":
        _write_missing_tiles(path, levels[:2], missing={1, 5}, aperio=True)
    elif name == "aperio_j2k_rgb":
        _write_aperio_jp2k(path, img, 33005)
    elif name == "aperio_j2k_ycbcr":
        _write_aperio_jp2k(path, img, 33003)
    elif name == "subifds":
        _write_subifds(path, levels)
    elif name == "planar":
        tifffile.imwrite(path, np.moveaxis(img, 2, 0), tile=(TILE, TILE), photometric="rgb",
                         planarconfig="separate", compression="zlib", metadata=None)
    elif name == "stripped":
        tifffile.imwrite(path, img, photometric="rgb", compression="zlib", metadata=None)
    elif name == "uint16":
        tifffile.imwrite(path, img.astype(np.uint16) * 257, tile=(TILE, TILE),
                         photometric="rgb", compression="zlib", metadata=None)
    elif name == "truncated_tile":
        def tiles():
            for i, t in enumerate(_padded_tiles(img)):
                data = bytes(imagecodecs.jpeg8_encode(t, level=85))
                yield data[: len(data) // 2] if i == 2 else data
        with tifffile.TiffWriter(path) as tw:
            tw.write(tiles(), shape=img.shape, dtype=np.uint8, tile=(TILE, TILE),
                     compression="jpeg", photometric="ycbcr", subsampling=(2, 2), metadata=None)
    elif name == "garbage_tile":
        rng = np.random.default_rng(3)
        def tiles():
            for i, t in enumerate(_padded_tiles(img)):
                data = bytes(imagecodecs.jpeg8_encode(t, level=85))
                yield rng.bytes(len(data)) if i == 2 else data
        with tifffile.TiffWriter(path) as tw:
            tw.write(tiles(), shape=img.shape, dtype=np.uint8, tile=(TILE, TILE),
                     compression="jpeg", photometric="ycbcr", subsampling=(2, 2), metadata=None)
    else:
        raise KeyError(name)


@pytest.fixture(scope="session")
def slide_factory(tmp_path_factory):
    root = tmp_path_factory.mktemp("fastread")
    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            path = root / f"{name}.tif"
            _build(name, path)
            made[name] = path
        return made[name]

    return make


def _need_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not available (../shared is absent)")
    return path


# ---------------------------------------------------------------- helpers
def _openslide_rgba(slide, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    ds = slide.level_downsamples[level]
    loc = (int(round(x * ds)), int(round(y * ds)))
    return np.asarray(slide.read_region(loc, level, (w, h)))


def _regions_for(width: int, height: int, seed: int):
    rng = np.random.default_rng(seed)
    regions = [
        (0, 0, width, height),  # the whole level
        (-37, -11, 300, 200),  # top-left corner, partly outside
        (width - 150, height - 90, 300, 200),  # bottom-right corner, partly outside
        (width // 3, height // 4, 257, 129),  # odd sizes crossing tile seams
    ]
    for _ in range(4):
        w, h = int(rng.integers(1, min(width, 300))), int(rng.integers(1, min(height, 300)))
        regions.append((int(rng.integers(-50, width)), int(rng.integers(-50, height)), w, h))
    return regions


def _compare_with_openslide(path: Path, label: str, fill=255, levels=None):
    """Read levels with both readers; return per-level (max, mean) diffs."""
    slide = openslide.OpenSlide(str(path))
    results = []
    try:
        vendor = slide.properties.get("openslide.vendor")
        if label.startswith(("aperio", "jpeg_tables_rgb")) or label.endswith(".svs"):
            assert vendor == "aperio", vendor
        for level, dims in enumerate(slide.level_dimensions):
            if levels is not None and level not in levels:
                continue
            with TiffLevelReader.open(path, dims) as reader:
                assert (reader.width, reader.height) == dims
                regions = _regions_for(*dims, seed=level)
                ours = reader.read_regions(regions, fill=fill)
            diffs = []
            for (x, y, w, h), got in zip(regions, ours):
                assert got.shape == (h, w, 3) and got.dtype == np.uint8
                ref = _openslide_rgba(slide, level, x, y, w, h)
                opaque = ref[..., 3] == 255
                transparent = ref[..., 3] == 0
                assert (opaque | transparent).all()
                # outside the image / missing tiles: our fill value
                assert (got[transparent] == fill).all()
                if opaque.any():
                    diffs.append(np.abs(got.astype(np.int16) - ref[..., :3])[opaque])
            d = np.concatenate(diffs)
            max_d, mean_d = int(d.max()), float(d.mean())
            print(f"[fastread] {label} ({vendor}) level {level} {dims[0]}x{dims[1]}: "
                  f"max |diff| = {max_d}, mean |diff| = {mean_d:.4f} vs OpenSlide")
            assert max_d <= MAX_ABS_DIFF, (label, level, max_d)
            assert mean_d < MAX_MEAN_DIFF, (label, level, mean_d)
            results.append((max_d, mean_d))
    finally:
        slide.close()
    return results


# ------------------------------------------------------------------ tests
OPENSLIDE_VARIANTS = [
    "jpeg_ycbcr",
    "jpeg_rgb",
    "jpeg_tables_rgb",
    "jpeg_tables_ycbcr",
    "jpeg_gray",
    "deflate",
    "lzw",
    "zstd",
    "deflate_rgba",
    "missing_tiles",
    "aperio_missing_tiles",
    "aperio_j2k_rgb",
    "aperio_j2k_ycbcr",
]


@pytest.mark.parametrize("variant", OPENSLIDE_VARIANTS)
def test_pixels_match_openslide_generated(slide_factory, variant):
    path = slide_factory(variant)
    # level 1 of aperio_missing_tiles is refused (see test_aperio_missing_tiles)
    results = _compare_with_openslide(
        path, variant, levels={0} if variant == "aperio_missing_tiles" else None
    )
    expected = {"missing_tiles": 1, "aperio_missing_tiles": 1,
                "aperio_j2k_rgb": 1, "aperio_j2k_ycbcr": 1}.get(variant, 3)
    assert len(results) == expected


def test_pixels_match_openslide_cmu_svs():
    path = _need_shared(CMU)
    results = _compare_with_openslide(path, "cmu-1-small-region.svs")
    assert len(results) == 1
    with TiffLevelReader.open(path, (2220, 2967)) as reader:
        assert reader.tile_shape == (240, 240)
        assert reader.compression == 7


def test_aperio_missing_tiles(slide_factory):
    """Aperio: missing level-0 tiles are transparent (fill); OpenSlide paints
    the later levels' tiles over them from level 0, so those levels go to
    OpenSlide."""
    path = slide_factory("aperio_missing_tiles")
    slide = openslide.OpenSlide(str(path))
    assert slide.properties["openslide.vendor"] == "aperio"
    assert slide.level_dimensions[:2] == ((BASE_W, BASE_H), (BASE_W // 2, BASE_H // 2))
    slide.close()
    with TiffLevelReader.open(path, (BASE_W, BASE_H)) as reader:
        got = reader.read_region(0, 0, BASE_W, BASE_H, fill=9)
        assert (got[:TILE, TILE : 2 * TILE] == 9).all()
    with pytest.raises(UnsupportedSlide, match="missing tiles"):
        TiffLevelReader.open(path, (BASE_W // 2, BASE_H // 2))


def test_missing_tiles_take_fill(slide_factory):
    path = slide_factory("missing_tiles")  # tiles 1 and 5 of a 4-wide grid absent
    with TiffLevelReader.open(path, (BASE_W, BASE_H)) as reader:
        got = reader.read_region(0, 0, BASE_W, BASE_H, fill=7)
        assert (got[0:TILE, TILE : 2 * TILE] == 7).all()  # tile (0, 1)
        assert (got[TILE : 2 * TILE, TILE : 2 * TILE] == 7).all()  # tile (1, 1)
        assert (got[0:TILE, 0:TILE] != 7).any()
        assert reader.decoded_tiles == 12 - 2


@pytest.mark.parametrize("variant", ["webp", "subifds"])
def test_pixels_match_tifffile(slide_factory, variant):
    """Formats OpenSlide does not read (WebP) or expose (SubIFD levels)."""
    path = slide_factory(variant)
    with tifffile.TiffFile(path) as tif:
        levels = [lvl.asarray() for lvl in tif.series[0].levels]
    assert len(levels) == 3
    for k, ref in enumerate(levels):
        h, w = ref.shape[:2]
        with TiffLevelReader.open(path, (w, h)) as reader:
            got = reader.read_region(-5, -5, w + 10, h + 10, fill=0)
        d = np.abs(got[5:-5, 5:-5].astype(np.int16) - ref[..., :3])
        print(f"[fastread] {variant} level {k} {w}x{h}: max |diff| = {int(d.max())}, "
              f"mean |diff| = {float(d.mean()):.4f} vs tifffile")
        assert d.max() == 0
        assert (got[:5] == 0).all() and (got[:, -5:] == 0).all()


def test_regions_outside_and_across_border(slide_factory):
    path = slide_factory("jpeg_ycbcr")
    with TiffLevelReader.open(path, (BASE_W, BASE_H)) as reader:
        whole = reader.read_region(0, 0, BASE_W, BASE_H)
        n0 = reader.decoded_tiles
        far, empty = reader.read_regions(
            [(BASE_W + 10, 0, 64, 64), (0, -100, 64, 0)], fill=(1, 2, 3)
        )
        assert reader.decoded_tiles == n0  # nothing inside the level: no decoding
        assert far.shape == (64, 64, 3) and (far == [1, 2, 3]).all()
        assert empty.shape == (0, 64, 3)

        x, y = BASE_W - 100, BASE_H - 60
        got = reader.read_region(x, y, 512, 512, fill=(10, 20, 30))
        assert (got[:60, :100] == whole[y:, x:]).all()
        assert (got[60:] == [10, 20, 30]).all()
        assert (got[:, 100:] == [10, 20, 30]).all()

        got = reader.read_region(-200, -300, 512, 512)
        assert (got[300:, 200:] == whole[:212, :312]).all()
        assert (got[:300] == 255).all() and (got[:, :200] == 255).all()

        with pytest.raises(ValueError):
            reader.read_region(0, 0, -1, 10)
        with pytest.raises(ValueError):
            reader.read_regions([(0, 0, 10)])
        with pytest.raises(ValueError):
            reader.read_region(0, 0, 10, 10, fill=256)


def test_each_source_tile_decoded_once_per_call(slide_factory):
    path = slide_factory("jpeg_tables_rgb")
    # 512 px windows at stride 384 (128 px overlap), as the tiling stage cuts them
    regions = [(x, y, 512, 512) for y in range(-128, BASE_H, 384) for x in range(-128, BASE_W, 384)]
    with TiffLevelReader.open(path, (BASE_W, BASE_H)) as reader:
        floor = touched_source_tiles(regions, reader.tile_shape, (reader.height, reader.width))
        assert floor == {(ty, tx) for ty in range(3) for tx in range(4)}
        outs = reader.read_regions(regions)
        assert reader.decoded_tiles == len(floor) == 12
        # same pixels as reading the windows one by one (which re-decodes)
        for region, got in zip(regions, outs):
            assert np.array_equal(got, reader.read_region(*region))
        assert reader.decoded_tiles > 12
        # a second call decodes again: nothing is cached across calls
        before = reader.decoded_tiles
        reader.read_regions(regions)
        assert reader.decoded_tiles - before == 12


def test_touched_source_tiles():
    tiles = touched_source_tiles([(0, 0, 1, 1)], (256, 256), (760, 1000))
    assert tiles == {(0, 0)}
    tiles = touched_source_tiles([(255, 255, 2, 2)], (256, 256), (760, 1000))
    assert tiles == {(0, 0), (0, 1), (1, 0), (1, 1)}
    # clipped to the level; regions fully outside or empty touch nothing
    tiles = touched_source_tiles(
        [(900, 700, 500, 500), (-10, -10, 5, 5), (10, 10, 0, 4)], (256, 256), (760, 1000)
    )
    assert tiles == {(2, 3)}
    # (height, width) order: a 240x240 grid on a 2967-high, 2220-wide level
    tiles = touched_source_tiles([(0, 0, 10**6, 10**6)], (240, 240), (2967, 2220))
    assert len(tiles) == 13 * 10


def test_decode_source_tiles(slide_factory):
    path = slide_factory("jpeg_ycbcr")
    assert decode_source_tiles(path, (BASE_W, BASE_H), [(0, 0), (2, 3), (0, 0)]) == 2
    assert decode_source_tiles(path, (BASE_W // 2, BASE_H // 2), []) == 0
    with pytest.raises(ValueError):
        decode_source_tiles(path, (BASE_W, BASE_H), [(3, 0)])


@pytest.mark.parametrize(
    "variant, dims, reason",
    [
        ("planar", (BASE_W, BASE_H), "PlanarConfiguration"),
        ("stripped", (BASE_W, BASE_H), "strips"),
        ("uint16", (BASE_W, BASE_H), "16-bit"),
        ("jpeg_ycbcr", (123, 456), "no TIFF page is 123x456"),
    ],
)
def test_unsupported_raises(slide_factory, variant, dims, reason):
    path = slide_factory(variant)
    with pytest.raises(UnsupportedSlide, match=reason):
        TiffLevelReader.open(path, dims)
    assert try_open(path, dims) is None


def test_not_a_tiff_is_unsupported(tmp_path):
    junk = tmp_path / "junk.svs"
    junk.write_bytes(os.urandom(1000))
    with pytest.raises(UnsupportedSlide, match="not a TIFF"):
        TiffLevelReader.open(junk, (10, 10))
    with pytest.raises(FileNotFoundError):
        TiffLevelReader.open(tmp_path / "absent.svs", (10, 10))
    if BROKEN.exists():
        with pytest.raises(UnsupportedSlide):
            TiffLevelReader.open(BROKEN, (2220, 2967))


def test_corrupt_tiles_svs():
    path = _need_shared(CORRUPT)
    clean_path = _need_shared(CMU)
    # The damaged bytes cover source tiles (10,3), (10,4), (10,5) of the
    # 240 px grid: x 720..1439, y 2400..2639 of level 0.
    with TiffLevelReader.open(path, (2220, 2967)) as reader:
        with pytest.raises(TileDecodeError, match=r"source tile \(10,[345]\)") as info:
            reader.read_region(700, 2380, 512, 512)
        assert str(path) in str(info.value) and info.value.__cause__ is not None
        print(f"[fastread] corrupt-tiles.svs: {info.value}")
        for tx in (3, 4, 5):
            with pytest.raises(TileDecodeError, match=rf"\(10,{tx}\)"):
                reader.read_region(tx * 240 + 10, 2410, 20, 20)
        # clean regions of the same file (and the same handle) still read fine
        clean_regions = [(0, 0, 512, 512), (1500, 2400, 512, 512), (700, 1800, 512, 512)]
        got = reader.read_regions(clean_regions)
    with TiffLevelReader.open(clean_path, (2220, 2967)) as clean:
        want = clean.read_regions(clean_regions)
    for g, w in zip(got, want):
        assert np.array_equal(g, w)


@pytest.mark.parametrize("variant", ["truncated_tile", "garbage_tile"])
def test_damaged_generated_tile_raises(slide_factory, variant):
    path = slide_factory(variant)  # tile (0, 2) damaged
    with TiffLevelReader.open(path, (BASE_W, BASE_H)) as reader:
        with pytest.raises(TileDecodeError, match=r"source tile \(0,2\)"):
            reader.read_region(2 * TILE + 5, 5, 10, 10)
        assert reader.read_region(0, 0, 2 * TILE, 2 * TILE).shape == (512, 512, 3)
        assert reader.read_region(3 * TILE, TILE, 100, 100).shape == (100, 100, 3)


def test_pickle_close_and_reopen(slide_factory):
    path = slide_factory("jpeg_ycbcr")
    reader = TiffLevelReader.open(path, (BASE_W // 2, BASE_H // 2))
    a = reader.read_region(10, 20, 100, 50)
    clone = pickle.loads(pickle.dumps(reader))
    assert np.array_equal(clone.read_region(10, 20, 100, 50), a)
    reader.close()
    reader.close()  # idempotent
    assert np.array_equal(reader.read_region(10, 20, 100, 50), a)  # reopens lazily
    reader.close()
    clone.close()
    assert "TiffLevelReader" in repr(reader)


def test_speed_vs_openslide(tmp_path):
    """Print MP/s of the fast path vs OpenSlide on a 4096x4096 area (no assert)."""
    n = 4096
    img = _texture(n, n, seed=42)
    path = tmp_path / "speed.tif"
    tifffile.imwrite(path, img, tile=(TILE, TILE), compression="jpeg",
                     compressionargs={"level": 80}, photometric="rgb", metadata=None)
    mp = n * n / 1e6
    windows = [(x, y, 512, 512) for y in range(0, n - 511, 384) for x in range(0, n - 511, 384)]
    window_mp = len(windows) * 512 * 512 / 1e6

    def best(fn, reps=2):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    with TiffLevelReader.open(path, (n, n)) as reader:
        t_fast = best(lambda: reader.read_region(0, 0, n, n))
        t_windows = best(lambda: reader.read_regions(windows))
    all_tiles = touched_source_tiles([(0, 0, n, n)], (TILE, TILE), (n, n))
    t_floor = best(lambda: decode_source_tiles(path, (n, n), all_tiles))

    def openslide_pieces(regions):
        slide = openslide.OpenSlide(str(path))  # fresh handle: cold tile cache
        try:
            for x, y, w, h in regions:
                np.asarray(slide.read_region((x, y), 0, (w, h)))[..., :3].copy()
        finally:
            slide.close()

    pieces = [(x, y, 512, 512) for y in range(0, n, 512) for x in range(0, n, 512)]
    t_os = best(lambda: openslide_pieces(pieces))
    t_os_windows = best(lambda: openslide_pieces(windows), reps=1)

    print(
        f"\n[fastread] speed, {n}x{n} JPEG level (q80, 256 px tiles), one core:\n"
        f"  decode floor (each tile once, pixels discarded): {mp / t_floor:7.1f} MP/s\n"
        f"  read_regions, one {n}x{n} region:              {mp / t_fast:7.1f} MP/s\n"
        f"  read_regions, {len(windows)} 512 px windows stride 384: "
        f"{window_mp / t_windows:7.1f} MP/s of output ({mp / t_windows:.1f} MP/s of level)\n"
        f"  OpenSlide read_region, 64 pieces of 512 px:     {mp / t_os:7.1f} MP/s\n"
        f"  OpenSlide read_region, {len(windows)} windows stride 384: "
        f"{window_mp / t_os_windows:7.1f} MP/s of output\n"
        f"  speed-up (one region vs OpenSlide pieces):      {t_os / t_fast:7.1f}x"
    )


@pytest.mark.parametrize("variant", ["jpeg_tables_rgb", "missing_tiles"])
def test_read_canvas_matches_read_regions(slide_factory, variant):
    """One canvas over several regions holds exactly the pixels read_regions returns."""
    path = slide_factory(variant)
    with TiffLevelReader.open(path, (BASE_W, BASE_H)) as reader:
        groups = [
            _regions_for(BASE_W, BASE_H, seed=3)[1:],  # spans outside the level on both sides
            [(100, 50, 300, 200), (350, 220, 128, 64)],  # inside
        ]
        for regions in groups:
            want = reader.read_regions(regions, fill=(9, 8, 7))
            before = reader.decoded_tiles
            canvas, (x0, y0) = reader.read_canvas(regions, fill=(9, 8, 7))
            touched = touched_source_tiles(regions, reader.tile_shape, (reader.height, reader.width))
            assert reader.decoded_tiles - before == len([t for t in touched if t in reader_tiles(reader)])
            for (x, y, w, h), ref in zip(regions, want):
                assert np.array_equal(canvas[y - y0 : y - y0 + h, x - x0 : x - x0 + w], ref)
        with pytest.raises(ValueError, match="at least one region"):
            reader.read_canvas([])


def reader_tiles(reader):
    """Source tiles of the level that have data (missing tiles are not decoded)."""
    lv = reader._level
    return {
        (ty, tx)
        for ty in range(lv.tiles_down)
        for tx in range(lv.tiles_across)
        if lv.bytecounts[lv.tile_index(ty, tx)] > 0
    }


def test_iter_canvases_decodes_each_source_tile_once_in_all(slide_factory):
    """Overlapping 512 px windows cut canvas by canvas: every source tile decoded once over all canvases."""
    from wsi.fastread import iter_canvases

    path = slide_factory("jpeg_tables_rgb")
    windows = [(x, y, 512, 512) for y in range(-128, BASE_H, 384) for x in range(-128, BASE_W, 384)]
    cells = [[w] for w in windows]  # the worst case: one window per canvas, all sharing borders
    with TiffLevelReader.open(path, (BASE_W, BASE_H)) as reader:
        singles = [reader.read_region(*w) for w in windows]
        before = reader.decoded_tiles
        seen = []
        for (canvas, (x0, y0)), cell in zip(iter_canvases(reader, cells), cells):
            x, y, w, h = cell[0]
            seen.append(canvas[y - y0 : y - y0 + h, x - x0 : x - x0 + w].copy())
        touched = touched_source_tiles(windows, reader.tile_shape, (reader.height, reader.width))
        assert reader.decoded_tiles - before == len(touched) == 12
    for got, ref in zip(seen, singles, strict=True):
        assert np.array_equal(got, ref)
