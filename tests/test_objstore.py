"""Object storage: URLs, publishing stores, the stage cache, tile / em-round / classify on ``s3://``.

The fast tests use fsspec's in-process ``memory://`` file system (the same code path as ``s3://``:
everything goes through fsspec and zarr's FsspecStore). The slow ones run the command line against a
local S3 server on the loopback (moto's server mode) and skip when moto or s3fs is not installed.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.tile import run_tile
from wsi.objstore import Remote, RemoteError, as_location, is_url
from wsi.remote_store import publish_store
from wsi.staging import SlideCache
from wsi.store import StoreError, TileStore, list_stores, picture_paths

ROOT = Path(__file__).resolve().parents[1]
#: Attributes that name the slide file, the time or the file list: they differ between two tilings of one slide.
VARYING = ("slide", "created_utc", "finished_utc", "timings", "integrity")


def _bucket() -> str:
    return f"memory://t-{uuid.uuid4().hex[:8]}"


def _memfs():
    import fsspec

    return fsspec.filesystem("memory")


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[Path]:
    from wsi.synth import write_slide

    d = tmp_path_factory.mktemp("objstore_slides")
    out = []
    for i, size in enumerate((1024, 768)):
        out.append(d / f"s{i}.tif")
        write_slide(out[-1], size, size, mpp=2.0, seed=i + 1, lesions=1)
    return out


@pytest.fixture(scope="module")
def local_stores(slides, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("objstore_local") / "stores"
    rep = run_tile(slides, d, load_config("tiny"), workers=1, quiet=True, progress=False)
    assert rep.ok, rep.summary()
    return d


def assert_same_store(a: TileStore, b: TileStore) -> None:
    assert len(a) == len(b) > 0
    assert np.array_equal(a[:], b[:])
    assert np.array_equal(a.coords, b.coords) and np.array_equal(a.grid_colrow, b.grid_colrow)
    assert np.array_equal(a.tissue_fraction, b.tissue_fraction)
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.thumbnail, b.thumbnail)
    same = lambda attrs: {k: v for k, v in attrs.items() if k not in VARYING}  # noqa: E731
    assert same(a.attrs) == same(b.attrs)
    sa, sb = a.attrs["slide"], b.attrs["slide"]
    for k in ("width", "height", "mpp", "fingerprint", "size_bytes", "content_crc32c"):
        assert sa.get(k) == sb.get(k), k


# --------------------------------------------------------------------------- URLs


def test_urls_and_local_paths(tmp_path):
    assert is_url("s3://b/p") and is_url("memory://x") and is_url("gs://b")
    assert not is_url("/data/x") and not is_url("file:///data/x") and not is_url(Path("s3:/b"))
    assert as_location("s3://b/stores/") == "s3://b/stores"
    assert as_location(f"file://{tmp_path}") == tmp_path  # file:// is a local folder: every local guarantee
    assert as_location("rel/x") == Path("rel/x")


def test_unknown_protocol_and_missing_client_are_one_line(tmp_path, slides):
    with pytest.raises(RemoteError, match="not a storage protocol"):
        Remote("nosuchproto://bucket/x")
    res = CliRunner().invoke(main, ["tile", str(slides[0]), "--out", "nosuchproto://b/stores", "--quiet"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "nosuchproto://" in res.output
    # s3fs not installed: the CLI in a process where importing it fails
    code = ("import sys; sys.modules['s3fs'] = None; from pipeline.cli import main; "
            f"main(['tile', {str(slides[0])!r}, '--out', 's3://bucket/stores', '--quiet'])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "s3fs" in proc.stderr and "pip install" in proc.stderr


# --------------------------------------------------------------------------- stores


def test_published_store_reads_back_identical(local_stores):
    url = _bucket() + "/stores"
    for p in list_stores(local_stores):
        pics = {str(f): f"{p.name[:-5]}.{n}" for n, f in picture_paths(p).items()}
        publish_store(p, f"{url}/{p.name}", pics)
    assert [u.rsplit("/", 1)[1] for u in list_stores(url)] == [p.name for p in list_stores(local_stores)]
    for p in list_stores(local_stores):
        b = TileStore(f"{url}/{p.name}")
        assert_same_store(TileStore(p), b)
        assert b.attrs["integrity"] == TileStore(p).attrs["integrity"]
    assert _memfs().exists(url.replace("memory://", "/") + "/s0.overlay.png")


def test_remote_store_damage_and_incomplete_are_refused(local_stores):
    url = _bucket() + "/stores/s0.zarr"
    src = local_stores / "s0.zarr"
    publish_store(src, url)
    r = Remote(url)
    shard = sorted(k for k in r.files() if k.startswith("tiles/c."))[0]
    r.rm([shard])
    with pytest.raises(StoreError, match=f"damaged: {shard} is missing"):
        TileStore(url)
    publish_store(src, url)  # publishing again puts it right
    assert len(TileStore(url)) == len(TileStore(src))
    root = json.loads(r.cat("zarr.json"))
    root["attributes"]["complete"] = False  # what a killed upload of a replacement leaves
    r.pipe("zarr.json", json.dumps(root).encode())
    with pytest.raises(StoreError, match="incomplete"):
        TileStore(url)


def test_republishing_a_smaller_store_removes_the_old_objects(local_stores):
    url = _bucket() + "/stores/x.zarr"
    big, small = local_stores / "s0.zarr", local_stores / "s1.zarr"
    publish_store(big, url)
    publish_store(small, url)
    have = set(Remote(url).files())
    want = set(TileStore(small).attrs["integrity"]["files"]) | {"zarr.json"}
    assert have == want
    assert_same_store(TileStore(small), TileStore(url))


# --------------------------------------------------------------------------- tile on object storage


def test_tile_urls_in_and_out_match_local_tiling(slides, local_stores, tmp_path):
    bucket = _bucket()
    fs = _memfs()
    for p in slides:
        fs.put_file(str(p), f"{bucket[len('memory:/'):]}/slides/{p.name}")
    cfg = load_config("tiny")
    stage = tmp_path / "stage"
    rep = run_tile(f"{bucket}/slides", f"{bucket}/stores", cfg, workers=1, quiet=True, progress=False,
                   stage_dir=stage)
    assert rep.ok and rep.counts()["done"] == 2, rep.summary()
    assert {o.path for o in rep.slides} == {f"{bucket}/slides/{p.name}" for p in slides}
    for p in slides:
        remote = TileStore(f"{bucket}/stores/{p.stem}.zarr")
        assert_same_store(TileStore(local_stores / f"{p.stem}.zarr"), remote)
        assert remote.attrs["slide"]["remote"]["url"] == f"{bucket}/slides/{p.name}"
    work = Path(rep.settings["work_dir"])
    assert work.parent == stage / "outputs" and not list(work.glob("*.zarr"))  # the local copies are gone
    assert Remote(f"{bucket}/stores").exists("tile-report.json")
    # again: skipped without downloading (the remote size and mtime still match the store's record)
    shutil.rmtree(stage / "slides")
    again = run_tile(f"{bucket}/slides", f"{bucket}/stores", cfg, workers=1, quiet=True, progress=False,
                     stage_dir=stage)
    assert again.counts()["skipped"] == 2 and not (stage / "slides").exists()
    # a slide replaced on the storage by other content is staged and tiled again
    fs.put_file(str(slides[1]), f"{bucket[len('memory:/'):]}/slides/{slides[0].name}")
    third = run_tile(f"{bucket}/slides", f"{bucket}/stores", cfg, workers=1, quiet=True, progress=False,
                     stage_dir=stage)
    assert {o.slide_id: o.status for o in third.slides} == {"s0": "done", "s1": "skipped"}


def test_tile_remote_store_left_incomplete_is_replaced(slides, tmp_path):
    url = _bucket() + "/stores"
    cfg = load_config("tiny")
    run_tile(slides[:1], url, cfg, workers=0, quiet=True, progress=False, stage_dir=tmp_path)
    r = Remote(f"{url}/s0.zarr")
    root = json.loads(r.cat("zarr.json"))
    root["attributes"]["complete"] = False
    r.pipe("zarr.json", json.dumps(root).encode())
    rep = run_tile(slides[:1], url, cfg, workers=0, quiet=True, progress=False, stage_dir=tmp_path)
    assert rep.slides[0].status == "done"
    assert TileStore(f"{url}/s0.zarr").attrs["complete"] is True


def test_em_cohort_loads_from_object_storage(local_stores, tmp_path):
    from pipeline.labels import load_cohort

    url = _bucket() + "/stores"
    for p in list_stores(local_stores):
        publish_store(p, f"{url}/{p.name}")
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label,split\ns0,1,train\ns1,0,train\n")
    cohort = load_cohort(url, labels)
    assert cohort.stores_dir == url and [str(s.store_path) for s in cohort.slides] == [f"{url}/s0.zarr",
                                                                                         f"{url}/s1.zarr"]
    labels.write_text("slide_id,label,split\ns0,1,train\ns1,0,train\ns9,0,train\n")
    with pytest.raises(Exception, match="1 labelled slide.*s9"):
        load_cohort(url, labels)


def test_classify_outputs_are_mirrored(tmp_path):
    from pipeline.classify import upload_outputs

    out = tmp_path / "out"
    (out / "slides").mkdir(parents=True)
    (out / "heatmaps").mkdir()
    (out / "slides" / "a.json").write_text("{}")
    (out / "heatmaps" / "a.png").write_bytes(b"png")
    (out / "predictions.csv").write_text("slide_id\na\n")
    (out / ".leases").mkdir()
    (out / ".leases" / "x").write_text("held")
    url = _bucket() + "/results"
    assert upload_outputs(out, url) == 3
    assert set(Remote(url).files()) == {"slides/a.json", "heatmaps/a.png", "predictions.csv"}
    assert upload_outputs(out, url) == 0  # nothing changed
    (out / "slides" / "a.json").unlink()
    (out / "predictions.csv").write_text("slide_id\n")
    assert upload_outputs(out, url) == 1
    assert set(Remote(url).files()) == {"heatmaps/a.png", "predictions.csv"}
    assert Remote(url).cat("predictions.csv") == b"slide_id\n"


# --------------------------------------------------------------------------- stage cache


def test_stage_cache_reuses_evicts_and_stays_within_its_limit(tmp_path):
    bucket = _bucket()
    fs = _memfs()
    for i in range(3):
        fs.pipe_file(f"{bucket[len('memory:/'):]}/s{i}.tif", bytes([i]) * 1000)
    url = [f"{bucket}/s{i}.tif" for i in range(3)]
    cache = SlideCache(tmp_path / "cache", 2500)
    a = cache.stage(url[0])
    assert a.read_bytes() == bytes([0]) * 1000 and a.name == "s0.tif"
    cache.unpin(url[0])
    b = cache.stage(url[1])
    assert cache.stage(url[0]) == a  # re-used (the remote size and mtime match), pinned again
    with pytest.raises(RemoteError, match="in use.*runtime.stage_cache_gb"):  # both pinned: no room
        cache.stage(url[2])
    cache.unpin(url[1])
    c = cache.stage(url[2])  # evicts s1, the least recently used unpinned entry
    assert c.is_file() and not b.exists() and a.exists() and cache.used_bytes() <= 2500
    cache.unpin(url[0])
    cache.unpin(url[2])
    fs.pipe_file(f"{bucket[len('memory:/'):]}/s0.tif", b"x" * 1000)  # replaced: staged anew
    assert cache.stage(url[0]).read_bytes() == b"x" * 1000
    cache.unpin(url[0])
    with pytest.raises(RemoteError, match="more than the whole stage cache"):
        SlideCache(tmp_path / "small", 10).stage(url[1])


def test_a_killed_download_never_looks_staged(tmp_path):
    bucket = _bucket()
    _memfs().pipe_file(f"{bucket[len('memory:/'):]}/k.tif", b"k" * 100)
    url = f"{bucket}/k.tif"
    cache = SlideCache(tmp_path / "cache", 10_000)
    d = cache._dir(url)
    d.mkdir(parents=True)
    (d / "k.tif").write_bytes(b"k" * 40)  # a partial file under the final name, and no complete entry
    (d / "entry.json").write_text(json.dumps({"url": url, "size": 100, "state": "staging"}))
    assert cache.stage(url).read_bytes() == b"k" * 100
    assert json.loads((d / "entry.json").read_text())["state"] == "complete"
    cache.unpin(url)


# --------------------------------------------------------------------------- S3 (moto server on the loopback)


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server on 127.0.0.1 with dummy credentials; yields a bucket URL."""
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install 'wsi-pipeline[s3]')")
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"bucket-{uuid.uuid4().hex[:8]}"  # moto keeps its buckets per process, across server instances
    s3fs.S3FileSystem().mkdir(bucket)
    try:
        yield f"s3://{bucket}"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        srv.stop()


@pytest.mark.slow
def test_s3_tile_stage_and_errors(s3, tmp_path, monkeypatch):
    from wsi.synth import make_cohort

    import s3fs

    make_cohort(tmp_path / "cohort", n_positive=2, n_negative=1, width_px=768, height_px=768, mpp=2.0, seed=4,
                difficulty="easy", workers=1)
    slides = sorted((tmp_path / "cohort").glob("*.tif"))
    fs = s3fs.S3FileSystem()
    for p in slides:
        fs.put_file(str(p), f"{s3[len('s3://'):]}/slides/{p.name}")
    run = lambda *a: CliRunner().invoke(main, [*a, "--config", "tiny", "--workers", "1", "--quiet",  # noqa: E731
                                               "--set", f"runtime.stage_dir={tmp_path / 'stage'}"])
    local = run("tile", str(tmp_path / "cohort"), "--out", str(tmp_path / "local"))
    assert local.exit_code == 0, local.output
    # local slides -> S3 stores; S3 slides (staged) -> local stores; S3 -> S3 again: skipped
    to_s3 = run("tile", str(tmp_path / "cohort"), "--out", f"{s3}/stores")
    assert to_s3.exit_code == 0, to_s3.output
    from_s3 = run("tile", f"{s3}/slides", "--out", str(tmp_path / "from_s3"))
    assert from_s3.exit_code == 0, from_s3.output
    for p in slides:
        ref = TileStore(tmp_path / "local" / f"{p.stem}.zarr")
        assert_same_store(ref, TileStore(f"{s3}/stores/{p.stem}.zarr"))
        assert_same_store(ref, TileStore(tmp_path / "from_s3" / f"{p.stem}.zarr"))
    s3_to_s3 = run("tile", f"{s3}/slides", "--out", f"{s3}/stores3")
    assert s3_to_s3.exit_code == 0 and "3 done" in s3_to_s3.output, s3_to_s3.output
    assert_same_store(TileStore(f"{s3}/stores/{slides[0].stem}.zarr"), TileStore(f"{s3}/stores3/{slides[0].stem}.zarr"))
    shutil.rmtree(tmp_path / "stage" / "slides")
    again = run("tile", f"{s3}/slides", "--out", f"{s3}/stores3")  # skipped without a download
    assert again.exit_code == 0 and "3 skipped" in again.output, again.output
    assert not (tmp_path / "stage" / "slides").exists()
    # errors: one line, exit 2
    bad = run("tile", str(tmp_path / "cohort"), "--out", "s3://no-such-bucket/stores")
    assert bad.exit_code == 2 and "no such bucket" in bad.output and bad.output.count("\n") == 1, bad.output
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    s3fs.S3FileSystem.clear_instance_cache()
    nocred = run("tile", str(tmp_path / "cohort"), "--out", f"{s3}/stores2")
    assert nocred.exit_code == 2 and "no credentials" in nocred.output and nocred.output.count("\n") == 1, \
        nocred.output


@pytest.mark.slow
def test_s3_classify_reads_stores_from_s3(s3, tmp_path_factory, tmp_path):
    pytest.importorskip("torch")
    from tests.em_fixtures import build_em_cohort, build_em_run

    base = tmp_path_factory.getbasetemp()
    cohort = build_em_cohort(base)
    run = build_em_run(base, cohort)
    stores = list_stores(cohort.stores)[:3]
    local = tmp_path / "stores"
    local.mkdir()
    for p in stores:
        shutil.copytree(p, local / p.name)
        publish_store(p, f"{s3}/stores/{p.name}")
    args = ["--run", str(run), "--device", "cpu", "--loader-workers", "0", "--quiet", "--stage-dir", str(tmp_path)]
    a = CliRunner().invoke(main, ["classify", str(local), "--out", str(tmp_path / "a"), *args])
    assert a.exit_code == 0, a.output
    b = CliRunner().invoke(main, ["classify", f"{s3}/stores", "--out", f"{s3}/results", *args])
    assert b.exit_code == 0, b.output
    import s3fs

    with s3fs.S3FileSystem().open(f"{s3[len('s3://'):]}/results/predictions.csv", "r") as fh:
        remote_rows = list(csv.DictReader(fh))
    local_rows = list(csv.DictReader(open(tmp_path / "a" / "predictions.csv")))
    key = lambda rows: [(r["slide_id"], r["probability"], r["n_tiles"], r["topk_x_level0_px"]) for r in rows]  # noqa
    assert key(remote_rows) == key(local_rows) and len(local_rows) == 3
    assert Remote(f"{s3}/results").exists("report.html")
    res = json.loads(Remote(f"{s3}/results").cat(f"slides/{stores[0].name[:-5]}.json"))
    assert res["store"] == f"{s3}/stores/{stores[0].name}"
