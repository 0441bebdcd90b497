"""Inputs people actually have: flat image exports, DICOM scans, and which files a folder search takes."""

from __future__ import annotations

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



def _write_dicom_pyramid(levels, out_dir: Path, mpp: float, tile: int = 256) -> None:
    """A VL Whole Slide Microscopy series: one TILED_FULL instance per level, JPEG baseline frames."""
    import imagecodecs
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence
    from pydicom.uid import JPEGBaseline8Bit, generate_uid

    study, series, frame_ref = generate_uid(), generate_uid(), generate_uid()
    for li, img in enumerate(levels):
        h, w = img.shape[:2]
        nx, ny = -(-w // tile), -(-h // tile)
        frames = []
        for ty in range(ny):
            for tx in range(nx):
                t = np.full((tile, tile, 3), 255, np.uint8)
                part = img[ty*tile:(ty+1)*tile, tx*tile:(tx+1)*tile]
                t[:part.shape[0], :part.shape[1]] = part
                frames.append(bytes(imagecodecs.jpeg8_encode(t, level=95)))
        ds = Dataset()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.6"
        sop = generate_uid()
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_ref
        ds.Modality = "SM"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if li == 0 else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
        ds.PatientID = "synth"; ds.PatientName = "synth"; ds.StudyID = "1"; ds.SeriesNumber = 1; ds.InstanceNumber = li + 1
        ds.Manufacturer = "wsi-pipeline synth"
        ds.ContainerIdentifier = "synth-1"
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.Rows = ds.Columns = tile
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = w, h
        ds.TotalPixelMatrixFocalPlanes = 1
        ds.NumberOfFrames = len(frames)
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = 8; ds.BitsStored = 8; ds.HighBit = 7; ds.PixelRepresentation = 0
        ds.LossyImageCompression = "01"
        ds.NumberOfOpticalPaths = 1
        op = Dataset(); op.OpticalPathIdentifier = "1"
        ds.OpticalPathSequence = Sequence([op])
        ds.ImagedVolumeWidth = w * mpp * 2**li / 1000; ds.ImagedVolumeHeight = h * mpp * 2**li / 1000; ds.ImagedVolumeDepth = 0.001
        pm = Dataset(); pm.PixelSpacing = [mpp * 2**li / 1000, mpp * 2**li / 1000]; pm.SliceThickness = 0.001
        sfg = Dataset(); sfg.PixelMeasuresSequence = Sequence([pm])
        ds.SharedFunctionalGroupsSequence = Sequence([sfg])
        origin = Dataset(); origin.XOffsetInSlideCoordinateSystem = 0; origin.YOffsetInSlideCoordinateSystem = 0
        ds.TotalPixelMatrixOriginSequence = Sequence([origin])
        ds.PixelData = encapsulate(frames)
        ds["PixelData"].VR = "OB"
        ds.save_as(f"{out_dir}/level{li}.dcm", enforce_file_format=True)


def test_dicom_pyramid_tiles_through_openslide(tmp_path, region):
    pytest.importorskip("pydicom", reason="writing a WSI DICOM pyramid needs pydicom (the 'test' extra)")
    scan = tmp_path / "in" / "scan-1"
    scan.mkdir(parents=True)
    _write_dicom_pyramid([region, np.ascontiguousarray(region[::2, ::2])], scan, 0.5)
    assert discover_slides(tmp_path / "in") == [scan]
    with open_slide(scan) as s:
        assert s.properties["openslide.vendor"] == "dicom" and len(s.level_dimensions) == 2
    rep = run_tile(tmp_path / "in", tmp_path / "out", _cfg(), workers=0, quiet=True, progress=False)
    assert rep.ok, rep.slides
    st = TileStore(tmp_path / "out" / "scan-1.zarr")
    a = st.attrs
    assert a["slide"]["mpp_source"] == "openslide-properties" and a["slide"]["mpp"] == pytest.approx(0.5)
    assert a["tiling"]["read_path"] == "openslide" and len(st) > 10
    for i in (0, len(st) // 2, len(st) - 1):  # JPEG frames at quality 95: close to the source
        x, y = st.coords[i]
        part = region[y : y + 128, x : x + 128].astype(int)
        assert np.abs(st[i][: part.shape[0], : part.shape[1]].astype(int) - part).mean() < 3
    # a second run sees the unchanged folder and skips it
    again = run_tile(tmp_path / "in", tmp_path / "out", _cfg(), workers=0, quiet=True, progress=False)
    assert [o.status for o in again.slides] == ["skipped"]
