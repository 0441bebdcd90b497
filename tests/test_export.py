"""wsi-pipeline export on real stores: CLAM/TRIDENT coordinate files, ImageFolder, WebDataset."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
from click.testing import CliRunner

from pipeline.batch import UsageError
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.export import h5_attributes, run_export
from pipeline.tile import run_tile
from wsi.slide import read_region_rgb
from wsi.store import TileStore


@pytest.fixture(scope="module")
def stores(synth_slides, tmp_path_factory) -> dict[str, Path]:
    """One JPEG store folder (two slides, the second at 40x so tiles come from a resized level) and one zstd."""
    out = {}
    for codec in ("jpeg", "zstd"):
        d = tmp_path_factory.mktemp(f"stores_{codec}")
        cfg = load_config("tiny", {"runtime.workers": 0, "store.codec": codec, "store.tiles_per_shard": 8,
                                   "tiling.mpp": 0.5, "tiling.tile_px": 128, "tiling.overlap_px": 0})
        slides = [synth_slides["tissue"]] + ([synth_slides["tissue40x"]] if codec == "jpeg" else [])
        assert run_tile(slides, d, cfg, workers=0, quiet=True, progress=False).ok
        out[codec] = d
    return out


def test_h5_attributes_name_the_level_and_size_read(stores):
    # 40x slide: tiles come from level 0 of a 0.25 um scan, resized x0.5
    a = h5_attributes(TileStore(stores["jpeg"] / "tissue40x.zarr"))
    assert a["patch_level"] == 0 and a["patch_size"] == 256 and a["patch_size_level0"] == 256 and a["tile_px"] == 128
    b = h5_attributes(TileStore(stores["jpeg"] / "tissue.zarr"))
    assert b["patch_level"] == 0 and b["patch_size"] == 128 and b["mpp"] == 0.5 and b["name"] == "tissue"


def test_h5_coords_read_the_same_regions_as_the_store(tmp_path, stores, synth_slides):
    h5py = pytest.importorskip("h5py")
    run_export(stores["zstd"], tmp_path, ["h5"])
    store = TileStore(stores["zstd"] / "tissue.zarr")
    with h5py.File(tmp_path / "h5" / "tissue.h5", "r") as f:
        coords = f["coords"][:]
        level, size = int(f["coords"].attrs["patch_level"]), int(f["coords"].attrs["patch_size"])
        assert f["coords"].attrs["name"] == "tissue"
    np.testing.assert_array_equal(coords, store.coords)
    # what CLAM's extractor does: read_region(coord, patch_level, (patch_size,) * 2)
    with openslide.OpenSlide(str(synth_slides["tissue"])) as s:
        for i in (0, len(store) // 2, len(store) - 1):
            region = read_region_rgb(s, tuple(coords[i]), level, (size, size))
            assert np.abs(region.astype(int) - store[i]).max() <= 4  # the store's fast-path decode vs OpenSlide's
    run_export(stores["jpeg"], tmp_path / "j", ["h5"])
    with h5py.File(tmp_path / "j" / "h5" / "tissue40x.h5", "r") as f:
        assert int(f["coords"].attrs["patch_size"]) == 256


def test_imagefolder_holds_the_store_tiles(tmp_path, stores):
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\ntissue,1\n")
    run_export(stores["jpeg"], tmp_path / "out", ["imagefolder"], labels_csv=labels)
    root = tmp_path / "out" / "imagefolder"
    assert sorted(p.name for p in root.iterdir()) == ["1", "unlabelled"]
    for sid, cls in (("tissue", "1"), ("tissue40x", "unlabelled")):
        store = TileStore(stores["jpeg"] / f"{sid}.zarr")
        files = sorted((root / cls / sid).iterdir())
        assert len(files) == len(store)
        for i in (0, len(store) - 1):
            x, y = store.coords[i]
            f = root / cls / sid / f"{sid}_{x}_{y}.jpg"
            img = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
            assert np.abs(img.astype(int) - store[i]).max() <= 2  # the stored JPEG itself (decoders may round)
    # lossless store: PNG, pixel for pixel; a relabelled slide moves class folder
    labels.write_text("slide_id,label\ntissue,0\n")
    run_export(stores["zstd"], tmp_path / "out", ["imagefolder"], labels_csv=labels)
    assert not (root / "1" / "tissue").exists()
    store = TileStore(stores["zstd"] / "tissue.zarr")
    x, y = store.coords[3]
    img = cv2.cvtColor(cv2.imread(str(root / "0" / "tissue" / f"tissue_{x}_{y}.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(img, store[3])


def test_webdataset_shard_per_slide(tmp_path, stores):
    run_export(stores["zstd"], tmp_path, ["webdataset"])
    store = TileStore(stores["zstd"] / "tissue.zarr")
    shard = tmp_path / "webdataset" / "tissue.tar"
    with tarfile.open(shard) as tar:
        names = tar.getnames()
        assert len(names) == 2 * len(store) and names[:2] == ["tissue/0000000.png", "tissue/0000000.json"]
        meta = json.loads(tar.extractfile("tissue/0000005.json").read())
        png = np.frombuffer(tar.extractfile("tissue/0000005.png").read(), np.uint8)
    assert (meta["x"], meta["y"]) == tuple(int(v) for v in store.coords[5]) and meta["label"] is None
    np.testing.assert_array_equal(cv2.cvtColor(cv2.imdecode(png, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB), store[5])
    wds = pytest.importorskip("webdataset")
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    assert len(samples) == len(store) and samples[5]["__key__"] == "tissue/0000005"
    assert json.loads(samples[5]["json"])["index"] == 5


def test_export_cli_and_errors(tmp_path, stores):
    r = CliRunner().invoke(main, ["export", str(stores["jpeg"] / "tissue.zarr"), "--out", str(tmp_path / "e"),
                                  "--format", "webdataset", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "exported" in r.output and (tmp_path / "e" / "webdataset" / "tissue.tar").is_file()
    assert not (tmp_path / "e" / "webdataset" / "tissue40x.tar").exists()  # one store given: one slide
    r = CliRunner().invoke(main, ["export", str(tmp_path), "--out", str(tmp_path / "e"), "--format", "h5"])
    assert r.exit_code == 2 and "no tile stores here" in r.output
    with pytest.raises(UsageError, match="formats must be among"):
        run_export(stores["jpeg"], tmp_path, ["parquet"])
