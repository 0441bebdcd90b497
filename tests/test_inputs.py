"""Inputs people actually have: flat image exports, DICOM scans, and which files a folder search takes."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
import tifffile

from pipeline.batch import UsageError, discover_slides
from pipeline.config import load_config
from pipeline.tile import run_tile
from wsi.slide import (
    SLIDE_EXTENSIONS,
    SlideError,
    dicom_series_uid,
    load_mpp_csv,
    open_slide,
    read_region_rgb,
    slide_id_for,
)
from wsi.store import TileStore


def _cfg():
    return load_config("tiny", {"tiling.mpp": 0.5, "tiling.tile_px": 128, "tiling.overlap_px": 0,
                                "store.codec": "zstd", "runtime.workers": 0})


@pytest.fixture(scope="module")
def region(synth_slides) -> np.ndarray:
    """Level 0 of a generated slide as one RGB array (the 'export' people hand us)."""
    with openslide.OpenSlide(str(synth_slides["tissue"])) as s:
        return read_region_rgb(s, (0, 0), 0, s.dimensions)


def _check_tiles_equal_source(store_path: Path, region: np.ndarray) -> TileStore:
    s = TileStore(store_path)
    assert len(s) > 10 and s.attrs["tiling"]["scale"] == 1.0 and s.attrs["slide"]["level_dimensions"] == [
        [region.shape[1], region.shape[0]]
    ]
    h, w = region.shape[:2]
    for i in range(len(s)):
        x, y = s.coords[i]
        src = np.full((128, 128, 3), 255, np.uint8)  # the pad value beyond the image
        part = region[y : y + 128, x : x + 128]
        src[: part.shape[0], : part.shape[1]] = part
        np.testing.assert_array_equal(s[i], src, err_msg=f"tile {i} at {(x, y)}")
    assert s.mask.any()
    return s


def test_flat_tiff_is_a_one_level_slide(tmp_path, region):
    d = tmp_path / "in"
    d.mkdir()
    tifffile.imwrite(d / "export.tif", region, photometric="rgb")  # stripped, no resolution tags
    with pytest.raises(openslide.OpenSlideUnsupportedFormatError):
        openslide.OpenSlide(str(d / "export.tif"))  # what OpenSlide alone says
    rep = run_tile(d, tmp_path / "out", _cfg(), workers=0, quiet=True, progress=False, assume_mpp=0.5)
    assert rep.ok, rep.slides
    s = _check_tiles_equal_source(tmp_path / "out" / "export.zarr", region)
    assert s.attrs["slide"]["mpp_source"] == "assume-mpp" and s.attrs["tiling"]["read_path"] == "openslide"
    assert (tmp_path / "out" / "export.overlay.png").is_file()


def test_flat_png_and_jpeg_with_mpp_csv(tmp_path, region):
    d = tmp_path / "in"
    d.mkdir()
    rgba = np.dstack([region, np.full(region.shape[:2], 255, np.uint8)])
    cv2.imwrite(str(d / "roi.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))  # lossless, with alpha
    csv = tmp_path / "mpp.csv"
    csv.write_text("slide_id,mpp\nroi,0.5\n")
    rep = run_tile(d, tmp_path / "out", _cfg(), workers=0, quiet=True, progress=False,
                   mpp_overrides=load_mpp_csv(csv))
    assert rep.ok, rep.slides
    s = _check_tiles_equal_source(tmp_path / "out" / "roi.zarr", region)
    assert s.attrs["slide"]["mpp_source"] == "mpp-csv"
    # JPEG: opened as the same one-level slide, pixels as OpenCV decodes them
    cv2.imwrite(str(tmp_path / "roi.jpg"), cv2.cvtColor(region, cv2.COLOR_RGB2BGR))
    with open_slide(tmp_path / "roi.jpg") as sl:
        assert sl.level_dimensions == ((region.shape[1], region.shape[0]),)
        ref = cv2.cvtColor(cv2.imread(str(tmp_path / "roi.jpg")), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(read_region_rgb(sl, (100, 200), 0, (64, 32)), ref[200:232, 100:164])
    # without any mpp the message names the fixes
    with pytest.raises(Exception, match="--assume-mpp"):
        from wsi.slide import slide_info

        with open_slide(tmp_path / "roi.jpg") as sl:
            slide_info(sl, tmp_path / "roi.jpg")


def test_flat_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(SlideError, match="broken.png.*nor a flat image"):
        open_slide(bad)
    deep = tmp_path / "deep.tif"
    tifffile.imwrite(deep, np.zeros((8, 8, 3), np.uint16), photometric="rgb")
    with pytest.raises(SlideError, match="deep.tif.*8-bit"):
        open_slide(deep)


def test_folder_search_takes_pictures_only_where_sensible(tmp_path):
    slides = tmp_path / "slides"
    (slides / "exports").mkdir(parents=True)
    for name in ("a.svs", "overlay.png", "a_thumbnail.jpg"):  # whole-slide files: pictures beside them are not slides
        (slides / name).write_bytes(b"x")
    for name in ("roi1.png", "roi2.JPG", "roi1_mask.png", "roi1-mask.png", ".hidden.png"):
        (slides / "exports" / name).write_bytes(b"x")
    stores = tmp_path / "stores"  # a store folder: stores, pictures beside them, old pictures inside
    (stores / "a.zarr").mkdir(parents=True)
    for name in ("a.overlay.png", "a.mask.png", "a.zarr/overlay.png", "b.png"):
        (stores / name).write_bytes(b"x")
    assert discover_slides(slides) == [slides / "a.svs", slides / "exports" / "roi1.png", slides / "exports" / "roi2.JPG"]
    with pytest.raises(UsageError, match="no slides found"):
        discover_slides(stores)
    assert discover_slides(stores / "b.png") == [stores / "b.png"]  # named explicitly: always a slide


def test_no_unverified_extensions():
    assert ".czi" not in SLIDE_EXTENSIONS  # OpenSlide 4 does not read Zeiss CZI


# --------------------------------------------------------------------------- DICOM


def _dcm(path: Path, series_uid: str, *, explicit: bool = True) -> None:
    """A minimal DICOM file header (preamble, DICM, one series UID element)."""
    uid = series_uid.encode() + (b"\x00" if len(series_uid) % 2 else b"")
    tag = b"\x20\x00\x0e\x00"
    elem = tag + (b"UI" + len(uid).to_bytes(2, "little") if explicit else len(uid).to_bytes(4, "little")) + uid
    path.write_bytes(b"\x00" * 128 + b"DICM" + b"\x08\x00\x18\x00UI\x04\x001.23" + elem)


def test_dicom_instances_are_one_slide_per_series(tmp_path):
    scan = tmp_path / "in" / "case-7"
    scan.mkdir(parents=True)
    for i in range(3):
        _dcm(scan / f"{i}.dcm", "1.2.826.0.1.5", explicit=i != 1)
    mixed = tmp_path / "in" / "two-series"
    mixed.mkdir()
    _dcm(mixed / "b.dcm", "1.2.3.9")
    _dcm(mixed / "a.dcm", "1.2.3.4")
    _dcm(mixed / "c.dcm", "1.2.3.4")
    assert dicom_series_uid(scan / "1.dcm") == "1.2.826.0.1.5"
    assert discover_slides(tmp_path / "in") == [scan, mixed / "a.dcm", mixed / "b.dcm"]
    assert slide_id_for(scan) == "case-7"
    with pytest.raises(SlideError, match="case-7"):  # not real WSI DICOM: one clear message
        open_slide(scan)

