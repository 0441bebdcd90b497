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
    for version in (0, FORMAT_VERSION + 1):
        g.attrs["format_version"] = version
        with pytest.raises(StoreError, match="format version.*re-tile"):
            TileStore(path)


def test_finalize_replaces_existing_store(tmp_path):
    path, _, _ = _make(tmp_path)
    first = json.loads((path / "zarr.json").read_text())["attributes"]["complete"]
    path2, tiles2, _ = _make(tmp_path)  # same name: replaced atomically
    assert path2 == path and first is True
    assert list_stores(tmp_path) == [path]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]


@pytest.mark.parametrize("codec", ["jpeg", "zstd"])
@pytest.mark.parametrize("per_shard", [1, 4])
def test_writer_files_equal_zarrs_own(tmp_path, codec, per_shard):
    """The hand-written chunk and shard files are byte for byte what zarr itself writes."""
    from wsi.store import create_tile_array

    tiles = _tiles(10)
    ours, theirs = tmp_path / "ours.zarr", tmp_path / "theirs.zarr"
    for p in (ours, theirs):
        create_tile_array(p, tile_px=64, n_tiles=10, codec=codec, tiles_per_shard=per_shard)
    with TileWriter(ours) as w:
        for i in [3, 1, 0, 2, 9, 8, 7, 6, 5, 4]:  # any order; the last shard is partial
            w.write_tile(i, tiles[i])
    arr = zarr.open_group(str(theirs), mode="r+")["tiles"]
    for i in range(10):
        arr[i] = tiles[i]
    files = sorted(f.name for f in (ours / "tiles").iterdir())
    assert files == sorted(f.name for f in (theirs / "tiles").iterdir())
    assert len(files) == -(-10 // per_shard) + 1  # + zarr.json
    for name in files:
        assert (ours / "tiles" / name).read_bytes() == (theirs / "tiles" / name).read_bytes(), name
    assert w.bytes_written == sum((ours / "tiles" / f).stat().st_size for f in files if f.startswith("c."))
    got = zarr.open_group(str(ours), mode="r")["tiles"]
    assert np.array_equal(got[:], arr[:])
    if codec == "zstd":
        assert np.array_equal(got[:], tiles)


def test_writer_refuses_to_drop_an_incomplete_shard(tmp_path):
    from wsi.store import create_tile_array

    p = tmp_path / "s.zarr"
    create_tile_array(p, tile_px=64, n_tiles=10, tiles_per_shard=4)
    tiles = _tiles(3)
    with pytest.raises(StoreError, match=r"shards \[0\] are incomplete \(1 tiles never written\)"):
        with TileWriter(p) as w:
            for i in range(3):
                w.write_tile(i, tiles[i])
    with pytest.raises(IndexError):
        TileWriter(p).write_tile(10, tiles[0])


def test_writer_accepts_strided_views(tmp_path):
    """Tiles cut as views of a larger canvas encode exactly like contiguous copies."""
    from wsi.store import create_tile_array

    canvas = _tiles(1, t=160)[0]
    views = [canvas[0:64, 0:64], canvas[48:112, 96:160]]
    for name, tiles in (("views", views), ("copies", [np.ascontiguousarray(v) for v in views])):
        create_tile_array(tmp_path / name, tile_px=64, n_tiles=2, tiles_per_shard=2)
        with TileWriter(tmp_path / name) as w:
            for i, t in enumerate(tiles):
                w.write_tile(i, t)
    assert (tmp_path / "views/tiles/c.0.0.0.0").read_bytes() == (tmp_path / "copies/tiles/c.0.0.0.0").read_bytes()


def test_version_1_stores_still_read(tmp_path):
    path, tiles, _ = _make(tmp_path, codec="zstd")
    zarr.open_group(str(path), mode="r+").attrs["format_version"] = 1
    assert np.array_equal(TileStore(path).read(range(5)), tiles)


@pytest.mark.parametrize("per_shard", [1, 4])
def test_raw_chunks_read_what_zarr_reads(tmp_path, per_shard):
    from wsi.codecs import JpegCodec
    from wsi.store import RawChunks, create_tile_array

    p = tmp_path / "s.zarr"
    create_tile_array(p, tile_px=64, n_tiles=10, tiles_per_shard=per_shard)
    tiles = _tiles(8)
    with TileWriter(p) as w:
        for i in range(8):  # tiles 8 and 9 never written (partial last shard / missing files)
            w.write_tile(i, tiles[i])
    arr = zarr.open_group(str(p), mode="r")["tiles"]
    raw = RawChunks(p / "tiles", arr.metadata)
    assert raw.supported and raw.per_shard == per_shard and isinstance(raw.codecs[0], JpegCodec)
    for i in range(8):
        assert np.array_equal(JpegCodec.decode_bytes(raw.read(i), (64, 64, 3)), arr[i])
    assert raw.read(9) is None
    with pytest.raises(IndexError):
        raw.read(10)
    if per_shard > 1:
        shard = p / "tiles" / "c.0.0.0.0"
        data = bytearray(shard.read_bytes())
        data[-10] ^= 0xFF  # damage the index
        shard.write_bytes(bytes(data))
        with pytest.raises(StoreError, match="checksum"):
            RawChunks(p / "tiles", arr.metadata).read(0)


@pytest.mark.parametrize("codec,per_shard", [("jpeg", 1), ("jpeg", 4), ("zstd", 4)])
def test_fast_tile_reader_reads_what_the_store_reads(tmp_path, codec, per_shard):
    from wsi.store import FastTileReader

    n, t = 10, 64
    tmp = temp_store_path(tmp_path, "s1")
    create_store(
        tmp, tile_px=t, coords=np.array([[i * t, 0] for i in range(n)]),
        cols_rows=np.stack([np.arange(n), np.zeros(n, int)], 1), tissue_fraction=np.ones(n),
        mask=np.ones((4, 4), bool), thumbnail=np.full((4, 4, 3), 200, np.uint8),
        codec=codec, tiles_per_shard=per_shard, attrs={"slide": {"slide_id": "s1"}},
    )
    tiles = _tiles(n, t)
    with TileWriter(tmp) as w:
        for i in range(n):  # a complete store has every tile (tests/test_integrity.py: when one goes missing)
            w.write_tile(i, tiles[i])
    finalize_store(tmp, tmp_path / "s1.zarr", {})
    store = TileStore(tmp_path / "s1.zarr")
    reader = FastTileReader(store)
    assert reader.fast == (codec == "jpeg") and len(reader) == n
    for i in range(n):
        got = reader[i]
        assert got.shape == (t, t, 3) and got.dtype == np.uint8
        assert np.array_equal(got, store[i])
    with pytest.raises(IndexError):
        reader[n]
