"""Outputs other tools read: tile stores with stock zarr (no wsi-pipeline), xarray, OME-NGFF heatmaps."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.config import load_config
from pipeline.tile import run_tile
from wsi.heatmap import read_heatmap_zarr, write_heatmap_zarr
from wsi.store import DIMENSION_NAMES, TileStore

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def default_store(synth_slides, tmp_path_factory) -> Path:
    """A store in the default layout (JPEG tiles in shard files), small tiles for speed."""
    out = tmp_path_factory.mktemp("default_store")
    cfg = load_config("tiny", {"runtime.workers": 0, "store.codec": "jpeg", "store.tiles_per_shard": 32,
                               "tiling.mpp": 0.5, "tiling.tile_px": 256})
    assert cfg.store.codec == "jpeg" and cfg.store.tiles_per_shard > 1
    rep = run_tile(synth_slides["tissue"], out, cfg, workers=0, quiet=True, progress=False)
    assert rep.ok
    return out / "tissue.zarr"


def _clean_python(tmp_path: Path, *, with_codec: bool) -> Path:
    """A venv whose packages are the main environment's minus wsi-pipeline (and its editable
    finder), plus the codec distribution of ``codecs-dist/`` when ``with_codec``."""
    main_site = Path(zarr.__file__).resolve().parents[1]
    venv = tmp_path / ("venv-codec" if with_codec else "venv-bare")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    deps = tmp_path / "deps"
    if not deps.exists():
        deps.mkdir()
        for entry in main_site.iterdir():
            name = entry.name.lower()
            if name.startswith(("__editable__", "wsi_pipeline", "_wsi_pipeline")) or name.endswith(".pth"):
                continue
            (deps / entry.name).symlink_to(entry)
    paths = [str(deps)]
    if with_codec:
        codec = tmp_path / "codec"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
             "--target", str(codec), str(REPO / "codecs-dist")],
            check=True, capture_output=True,
        )
        assert (codec / "wsi_pipeline_jpeg.py").is_file()
        paths.insert(0, str(codec))
    (site / "deps.pth").write_text("\n".join(paths) + "\n")
    return venv / "bin" / "python"


_READ = """
import importlib.util, json, sys
import numpy as np, zarr
assert importlib.util.find_spec("wsi") is None and importlib.util.find_spec("pipeline") is None, "pipeline leaked"
tiles = zarr.open_group(sys.argv[1], mode="r")["tiles"]
np.save(sys.argv[2], tiles[:])
print(json.dumps(list(tiles.metadata.dimension_names)))
"""


def _run_clean(python: Path, tmp_path: Path, store: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(
        [str(python), "-c", _READ, str(store), str(tmp_path / "tiles.npy")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )


def test_stock_zarr_reads_a_default_store_with_only_the_codec_distribution(tmp_path, default_store):
    if shutil.which("pip") is None and subprocess.run([sys.executable, "-m", "pip", "--version"]).returncode:
        pytest.skip("pip is needed to install codecs-dist")
    bare = _run_clean(_clean_python(tmp_path, with_codec=False), tmp_path, default_store)
    assert bare.returncode != 0 and "wsi_pipeline.jpeg" in bare.stderr  # what stock zarr says alone
    got = _run_clean(_clean_python(tmp_path, with_codec=True), tmp_path, default_store)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == list(DIMENSION_NAMES["tiles"])
    store = TileStore(default_store)
    np.testing.assert_array_equal(np.load(tmp_path / "tiles.npy"), store[:])
    assert len(store) > 0


def test_store_arrays_have_dimension_names_and_open_in_xarray(default_store):
    g = zarr.open_group(str(default_store), mode="r")
    for name, dims in DIMENSION_NAMES.items():
        assert g[name].metadata.dimension_names == dims, name
    assert not list(default_store.glob("*.png"))  # pictures live beside the store
    assert default_store.with_name("tissue.overlay.png").is_file()
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(default_store, consolidated=False)
    assert ds["tiles"].dims == DIMENSION_NAMES["tiles"] and ds.sizes["tile"] == len(TileStore(default_store))
    np.testing.assert_array_equal(ds["coords"].values, TileStore(default_store).coords)


def test_old_store_with_pictures_inside_still_reads(tmp_path, default_store):
    old = tmp_path / "old.zarr"
    shutil.copytree(default_store, old)
    (old / "overlay.png").write_bytes(default_store.with_name("tissue.overlay.png").read_bytes())
    np.testing.assert_array_equal(TileStore(old)[0], TileStore(default_store)[0])


def _validate_ngff_multiscales(ome: dict, group: zarr.Group) -> None:
    """The parts of the OME-NGFF 0.5 multiscales spec a one-level 2-D image must meet."""
    assert ome["version"] == "0.5"
    (ms,) = ome["multiscales"]
    axes = ms["axes"]
    assert 2 <= len(axes) <= 5 and all(a["type"] == "space" for a in axes) and len({a["name"] for a in axes}) == len(axes)
    for ds in ms["datasets"]:
        arr = group[ds["path"]]
        assert arr.ndim == len(axes)
        assert list(arr.metadata.dimension_names) == [a["name"] for a in axes]
        tr = ds["coordinateTransformations"]
        assert tr[0]["type"] == "scale" and len(tr[0]["scale"]) == len(axes)  # scale first, then translation
        assert all(t["type"] in ("scale", "translation") for t in tr) and len(tr) <= 2
        if len(tr) == 2:
            assert tr[1]["type"] == "translation" and len(tr[1]["translation"]) == len(axes)


def test_heatmap_zarr_is_ome_ngff_with_physical_pixel_size(tmp_path):
    heat = np.linspace(0, 1, 12 * 20, dtype=np.float32).reshape(12, 20)
    heat[0, 0] = np.nan
    attrs = {"slide_id": "s1", "mpp": 0.25, "downsample": 64.0, "origin_level0_xy": [100, 200]}
    path = write_heatmap_zarr(tmp_path / "s1.zarr", heat, heat > 0.5, attrs)
    g = zarr.open_group(str(path), mode="r")
    ome = g.attrs["ome"]
    _validate_ngff_multiscales(ome, g)
    scale, trans = ome["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert scale["scale"] == [16.0, 16.0]  # 64 level-0 px of 0.25 um
    # heatmap pixel (0, 0) covers level-0 [100, 164) x [200, 264): centre 131.5, 231.5 -> um
    assert trans["translation"] == [231.5 * 0.25, 131.5 * 0.25]
    assert g["tissue"].metadata.dimension_names == ("y", "x")
    back, tissue, a = read_heatmap_zarr(path)
    np.testing.assert_array_equal(back, heat)
    assert a["ome"] == ome
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(path, consolidated=False)
    assert ds["probability"].dims == ("y", "x") and ds["probability"].shape == (12, 20)
    np.testing.assert_array_equal(ds["probability"].values, heat)
    # without a resolution there is no physical frame to claim
    bare = write_heatmap_zarr(tmp_path / "s2.zarr", heat, None, {"downsample": 64.0})
    assert "ome" not in zarr.open_group(str(bare), mode="r").attrs


def test_heatmap_validates_with_the_ome_zarr_models(tmp_path):
    pytest.importorskip("ome_zarr_models", reason="the OME-NGFF validator is the 'ome-zarr-models' package (test extra)")
    from ome_zarr_models.v05.image import Image

    heat = np.random.default_rng(0).random((12, 20), dtype=np.float32)
    path = write_heatmap_zarr(tmp_path / "s1.zarr", heat, heat > 0.5,
                              {"slide_id": "s1", "mpp": 0.5, "downsample": 32.0, "origin_level0_xy": [0, 0]})
    img = Image.from_zarr(zarr.open_group(str(path), mode="r"))  # raises on any spec violation
    (ms,) = img.ome_attributes.multiscales
    assert [a.unit for a in ms.axes] == ["micrometer", "micrometer"] and ms.datasets[0].path == "probability"
