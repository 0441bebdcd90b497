"""Zarr tile store: codec round trip, writer, reader API, format checks."""

import json

import numpy as np
import pytest
import zarr

from wsi.codecs import JpegCodec
from wsi.store import (
    FORMAT_VERSION,
    StoreError,
    TileStore,
    TileWriter,
    create_store,
    finalize_store,
    list_stores,
    temp_store_path,
)


def _tiles(n, t=64, seed=0):
    rng = np.random.default_rng(seed)
    # smooth, image-like content, distinct per tile
    yy, xx = np.mgrid[:t, :t] / t
    out = np.empty((n, t, t, 3), np.uint8)
    for i in range(n):
        f = rng.uniform(1, 3, size=3)
        for c in range(3):
            out[i, ..., c] = 170 + 50 * np.sin(2 * np.pi * (f[c] * xx + yy * (c + 1) / 2 + i / 7))
    return out


def _make(tmp_path, codec="jpeg", n=5, t=64):
    tmp = temp_store_path(tmp_path, "s1")
    coords = np.array([[i * 48, 0] for i in range(n)])
    create_store(
        tmp,
        tile_px=t,
        coords=coords,
        cols_rows=np.stack([np.arange(n), np.zeros(n, int)], 1),
        tissue_fraction=np.linspace(0.3, 1, n),
        mask=np.ones((4, 4), bool),
        thumbnail=np.full((4, 4, 3), 200, np.uint8),
        codec=codec,
        jpeg_quality=95,
        attrs={"slide": {"slide_id": "s1"}, "tiling": {"effective_mpp": 0.5, "downsample": 1.0},
               "tissue": {"mask_downsample": 16.0}},
    )
    tiles = _tiles(n, t)
    w = TileWriter(tmp)
    order = np.array([3, 0, 4, 1, 2][:n]) if n == 5 else np.arange(n)
    w.write(order, tiles[order])
    final = tmp_path / "s1.zarr"
    finalize_store(tmp, final, {})
    return final, tiles, w.bytes_written


def test_jpeg_codec_round_trip_and_config():
    codec = JpegCodec(quality=90)
    chunk = _tiles(1)
    data = codec.encode_array(chunk)
    assert data[:2] == b"\xff\xd8"  # a real JPEG file
    back = JpegCodec.decode_bytes(data, chunk.shape)
    assert back.shape == chunk.shape
    assert np.abs(back.astype(int) - chunk).mean() < 3
    assert JpegCodec.from_dict(codec.to_dict()) == codec
    with pytest.raises(ValueError):
        JpegCodec(quality=0)


def test_store_round_trip_jpeg(tmp_path):
    path, tiles, nbytes = _make(tmp_path, "jpeg")
    s = TileStore(path)
    assert len(s) == 5 and s.tile_px == 64 and s.slide_id == "s1"
    got = s.read([0, 1, 2, 3, 4])
    err = np.abs(got.astype(int) - tiles)
    assert err.mean() < 2.0 and err.max() < 40  # lossy, but close
    # random access, repeats, order preserved, negative index, slices, dask view
    np.testing.assert_array_equal(s.read([4, 0, 4]), got[[4, 0, 4]])
    np.testing.assert_array_equal(s[-1], got[4])
    np.testing.assert_array_equal(s[1:3], got[1:3])
    np.testing.assert_array_equal(s.as_dask()[2].compute(), got[2])
    seen = [i for idx, _ in s.iter_batches(2) for i in idx]
    assert seen == [0, 1, 2, 3, 4]
    assert s.attrs["codec"]["name"] == "jpeg" and s.attrs["codec"]["quality"] == 95
    assert nbytes > 0
    # a plain zarr reader with the codec registered sees the same pixels
    arr = zarr.open_group(str(path), mode="r")["tiles"]
    np.testing.assert_array_equal(arr[3], got[3])
    # each chunk file is a plain JPEG
    chunk_file = path / "tiles" / "c.3.0.0.0"
    assert chunk_file.read_bytes()[:2] == b"\xff\xd8"


def test_store_round_trip_zstd_is_lossless(tmp_path):
    path, tiles, _ = _make(tmp_path, "zstd")
    s = TileStore(path)
    np.testing.assert_array_equal(s.read(range(5)), tiles)
    assert s.attrs["codec"]["name"] == "zstd"


def test_incomplete_and_foreign_stores_refused(tmp_path):
    tmp = temp_store_path(tmp_path, "x")
    create_store(tmp, tile_px=32, coords=np.zeros((0, 2)), cols_rows=np.zeros((0, 2)),
                 tissue_fraction=np.zeros(0), mask=np.zeros((2, 2)), thumbnail=np.zeros((2, 2, 3)))
    with pytest.raises(StoreError, match="incomplete"):
        TileStore(tmp)
    assert list_stores(tmp_path) == []  # temporaries are hidden
    with pytest.raises(StoreError, match="no tile store"):
        TileStore(tmp_path / "missing.zarr")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    with pytest.raises(StoreError, match="not a wsi-pipeline tile store"):
        TileStore(tmp_path / "other.zarr")


def test_old_format_version_refused_with_fix(tmp_path):
    path, _, _ = _make(tmp_path)
    g = zarr.open_group(str(path), mode="r+")
    g.attrs["format_version"] = FORMAT_VERSION - 1 if FORMAT_VERSION > 0 else 99
    with pytest.raises(StoreError, match="format version.*re-tile"):
        TileStore(path)


def test_finalize_replaces_existing_store(tmp_path):
    path, _, _ = _make(tmp_path)
    first = json.loads((path / "zarr.json").read_text())["attributes"]["complete"]
    path2, tiles2, _ = _make(tmp_path)  # same name: replaced atomically
    assert path2 == path and first is True
    assert list_stores(tmp_path) == [path]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]
