"""The tiling stage end to end: real OpenSlide on generated pyramidal TIFFs, real Zarr on disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import openslide
import pytest

from pipeline.batch import UsageError
from pipeline.config import load_config
from pipeline.batch import RunReport, SlideOutcome
from pipeline.tile import SUSPECTS_FILE, _update_suspects, describe_error, load_suspects, run_tile
from wsi.reader import read_tiles
from wsi.slide import read_region_rgb
from wsi.store import TileStore, list_stores


def _cfg(**over):
    base = {"tiling.mpp": 0.5, "tiling.tile_px": 128, "tiling.overlap_px": 32, "runtime.workers": 0}
    base.update(over)
    return load_config("tiny", base)


def _run(slides, out, cfg=None, **kw):
    return run_tile(slides, out, cfg or _cfg(), workers=kw.pop("workers", 0), quiet=True, progress=False, **kw)


def _by_id(report):
    return {s.slide_id: s for s in report.slides}


def _one(tmp_path, slide: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir(exist_ok=True)
    dst = d / slide.name
    shutil.copy2(slide, dst)
    return dst


def test_tiles_match_openslide_and_store_is_complete(tmp_path, synth_slides):
    slide = _one(tmp_path, synth_slides["tissue"])
    rep = _run(slide.parent, tmp_path / "out", _cfg(**{"store.codec": "zstd"}))
    assert rep.ok
    s = TileStore(tmp_path / "out" / "tissue.zarr")
    assert len(s) > 10
    a = s.attrs
    assert a["complete"] and a["tiling"]["level"] == 0 and a["tiling"]["scale"] == 1.0
    assert a["tiling"]["read_path"] == "fast-tiff"
    assert a["slide"]["mpp_source"] in ("openslide-properties", "tiff-resolution-tags")
    assert a["slide"]["size_bytes"] == slide.stat().st_size and len(a["slide"]["fingerprint"]) == 32
    # coordinates sit on the global grid: multiples of the stride in level-0 px
    assert (s.coords % 96 == 0).all()
    assert (s.tissue_fraction >= 0.25).all()
    # pixels equal OpenSlide's region (lossless store; fast path differs by decoder rounding only)
    with openslide.OpenSlide(str(slide)) as osr:
        for i in [0, len(s) // 2, len(s) - 1]:
            ref = read_region_rgb(osr, tuple(s.coords[i]), 0, (128, 128))
            d = np.abs(s[i].astype(int) - ref)
            assert d.max() <= 4 and d.mean() < 0.5
    assert (tmp_path / "out" / "tissue.overlay.png").stat().st_size > 0  # beside the store, not inside
    assert (tmp_path / "out" / "tissue.mask.png").stat().st_size > 0
    assert not list((tmp_path / "out" / "tissue.zarr").glob("*.png"))
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp-")]
    report = json.loads((tmp_path / "out" / "tile-report.json").read_text())
    assert report["counts"] == {"done": 1, "skipped": 0, "failed": 0}
    assert report["slides"][0]["details"]["bytes_per_tile"] > 0


def test_fast_path_equals_openslide_path(tmp_path, synth_slides):
    slide = _one(tmp_path, synth_slides["tissue"])
    for fast, out in ((True, "fast"), (False, "slow")):
        _run(slide, tmp_path / out, _cfg(**{"store.codec": "zstd", "tiling.fast_read": fast}))
    a, b = TileStore(tmp_path / "fast" / "tissue.zarr"), TileStore(tmp_path / "slow" / "tissue.zarr")
    assert b.attrs["tiling"]["read_path"] == "openslide"
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.thumbnail, b.thumbnail)
    d = np.abs(a.read(range(len(a))).astype(int) - b.read(range(len(b))))
    print(f"fast vs OpenSlide path: max diff {d.max()}, mean diff {d.mean():.4f}")
    assert d.max() <= 4 and d.mean() < 0.1


def test_lowres_fast_path_equals_openslide(synth_slides):
    from wsi.slide import read_lowres, slide_info

    for key in ("tissue", "tissue40x"):
        path = str(synth_slides[key])
        with openslide.OpenSlide(path) as slide:
            info = slide_info(slide, path)
            for mpp in (8.0, 3.0):
                fast, ds_fast = read_lowres(slide, info, mpp, fast_path=path, strip_px=300)
                ref, ds_ref = read_lowres(slide, info, mpp, strip_px=300)
                assert ds_fast == ds_ref
                np.testing.assert_array_equal(fast, ref)


def test_layout_settings_do_not_change_the_store(tmp_path, synth_slides):
    """Block, band and shard sizes change how the work is cut, never the tiles."""
    slide = _one(tmp_path, synth_slides["tissue"])
    ref = _run(slide, tmp_path / "ref", _cfg(**{"store.codec": "zstd"}))
    assert ref.ok
    a = TileStore(tmp_path / "ref" / "tissue.zarr")
    want = a.read(range(len(a)))
    for i, over in enumerate([
        {"tiling.block_tiles": 2, "tiling.task_tiles": 5, "store.tiles_per_shard": 3},
        {"tiling.block_tiles": 50, "store.tiles_per_shard": 1},
        {"tiling.fast_read": False, "tiling.task_tiles": 7, "store.tiles_per_shard": 4},
    ]):
        out = tmp_path / f"v{i}"
        rep = _run(slide, out, _cfg(**{"store.codec": "zstd", **over}), workers=2 if i == 0 else 0)
        assert rep.ok, rep.summary()
        b = TileStore(out / "tissue.zarr")
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_array_equal(b.read(range(len(b))), want)
        per_shard = over["store.tiles_per_shard"]
        assert b.attrs["tiles_per_shard"] == per_shard
        chunk_files = [f for f in (out / "tissue.zarr" / "tiles").iterdir() if f.name.startswith("c.")]
        assert len(chunk_files) == -(-len(b) // per_shard)
        assert b.attrs["tile_bytes"] == sum(f.stat().st_size for f in chunk_files)
    # a layout setting is not a tiling change: the reference store stays current
    again = _run(slide, tmp_path / "ref", _cfg(**{"store.codec": "zstd", "store.tiles_per_shard": 5}))
    assert [s.status for s in again.slides] == ["skipped"]


def test_lower_level_and_resize(tmp_path, synth_slides):
    """tiny config: 2 um/px from a 0.5 um/px slide is pyramid level 1 (ds 4) without resizing;
    a 0.25 um/px slide asked for 0.5 um/px is read at level 0 and shrunk 2x."""
    s1 = _one(tmp_path, synth_slides["tissue"])
    s2 = _one(tmp_path, synth_slides["tissue40x"])
    rep = _run(s1.parent, tmp_path / "out", load_config("tiny", {"runtime.workers": 0}))
    assert rep.ok
    t = TileStore(tmp_path / "out" / "tissue.zarr").attrs["tiling"]
    assert (t["level"], t["scale"], t["effective_mpp"]) == (1, 1.0, 2.0)
    t40 = TileStore(tmp_path / "out" / "tissue40x.zarr")
    assert t40.attrs["tiling"]["downsample"] == pytest.approx(8.0)  # 2.0 / 0.25
    rep = _run(s2, tmp_path / "out40", _cfg())
    t = TileStore(tmp_path / "out40" / "tissue40x.zarr").attrs["tiling"]
    assert (t["level"], t["scale"], t["downsample"]) == (0, 2.0, 2.0)
    assert t["effective_mpp"] == pytest.approx(0.5)


def test_rerun_skips_then_redoes_changed(tmp_path, synth_slides):
    slide = _one(tmp_path, synth_slides["tissue"])
    out = tmp_path / "out"
    first = _run(slide.parent, out)
    assert _by_id(first)["tissue"].status == "done"
    mtime_store = (out / "tissue.zarr" / "zarr.json").stat().st_mtime_ns
    again = _run(slide.parent, out)
    assert _by_id(again)["tissue"].status == "skipped"
    # touched but identical content: still skipped (content fingerprint)
    os.utime(slide, None)
    assert _by_id(_run(slide.parent, out))["tissue"].status == "skipped"
    assert (out / "tissue.zarr" / "zarr.json").stat().st_mtime_ns == mtime_store
    # a tiling config change (codec quality) re-tiles
    assert _by_id(_run(slide.parent, out, _cfg(**{"store.jpeg_quality": 80})))["tissue"].status == "done"
    assert TileStore(out / "tissue.zarr").attrs["codec"]["quality"] == 80
    # a changed slide file re-tiles
    shutil.copy2(synth_slides["tissue40x"], slide)
    assert _by_id(_run(slide.parent, out, _cfg(**{"store.jpeg_quality": 80})))["tissue"].status == "done"
    assert len(list(out.glob("reports/tile-*.json"))) == 5


def test_no_tissue_is_a_result_not_a_retry(tmp_path, synth_slides):
    slide = _one(tmp_path, synth_slides["blank"])
    rep = _run(slide, tmp_path / "out")
    o = _by_id(rep)["blank"]
    assert o.status == "done" and o.details["n_tiles"] == 0 and o.reason == "no tissue found"
    assert len(TileStore(tmp_path / "out" / "blank.zarr")) == 0
    assert _by_id(_run(slide, tmp_path / "out"))["blank"].status == "skipped"


def test_missing_mpp_fails_alone_then_overrides(tmp_path, synth_slides):
    nompp = _one(tmp_path, synth_slides["nompp"])
    _one(tmp_path, synth_slides["tissue"])
    rep = _run(nompp.parent, tmp_path / "out")
    o = _by_id(rep)
    assert o["tissue"].status == "done"
    assert o["nompp"].status == "failed"
    assert "no micrometres-per-pixel" in o["nompp"].reason and "TIFF resolution tags" in o["nompp"].reason
    assert "--assume-mpp" in o["nompp"].reason and "nompp.tif" in o["nompp"].reason
    assert not rep.ok
    rep = _run(nompp, tmp_path / "out", mpp_overrides={"nompp": 0.5})
    assert _by_id(rep)["nompp"].status == "done"
    assert TileStore(tmp_path / "out" / "nompp.zarr").attrs["slide"]["mpp_source"] == "mpp-csv"
    rep = _run(nompp, tmp_path / "out2", assume_mpp=0.5)
    assert TileStore(tmp_path / "out2" / "nompp.zarr").attrs["slide"]["mpp_source"] == "assume-mpp"


def test_bad_inputs(tmp_path, synth_slides):
    d = tmp_path / "in"
    d.mkdir()
    (d / "notaslide.svs").write_bytes(os.urandom(5000))
    _one(tmp_path, synth_slides["tissue"])
    rep = _run(d, tmp_path / "out")
    o = _by_id(rep)
    assert o["tissue"].status == "done"
    assert o["notaslide"].status == "failed" and "not a slide OpenSlide can read" in o["notaslide"].reason
    assert not (tmp_path / "out" / "notaslide.zarr").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no slides found"):
        _run(tmp_path / "empty", tmp_path / "out")
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="cannot write"):
        _run(d, blocker / "sub")
    with pytest.raises(UsageError, match="no such file"):
        _run(tmp_path / "nope", tmp_path / "out")


def test_duplicate_slide_ids_fail_clearly(tmp_path, synth_slides):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy2(synth_slides["tissue"], tmp_path / "a" / "x.tif")
    shutil.copy2(synth_slides["tissue"], tmp_path / "b" / "x.tif")
    rep = _run(tmp_path, tmp_path / "out")
    st = sorted(s.status for s in rep.slides)
    assert st == ["done", "failed"]
    assert "already used by" in [s for s in rep.slides if s.status == "failed"][0].reason


def test_a_slide_another_job_holds_is_left_to_it(tmp_path, synth_slides):
    from pipeline.leases import Leases

    slide = _one(tmp_path, synth_slides["tissue"])
    out = tmp_path / "out"
    out.mkdir()
    with Leases(out, "tile") as other:
        assert other.claim("slide-tissue").ok
        rep = _run(slide, out)
        o = _by_id(rep)["tissue"]
        assert rep.ok and o.status == "busy" and f"pid {os.getpid()}" in o.reason
        assert "1 slide being processed by other jobs" in rep.summary() and not list_stores(out)
    assert _by_id(_run(slide, out))["tissue"].status == "done"  # released


def test_stale_temporaries_are_cleaned(tmp_path, synth_slides):
    slide = _one(tmp_path, synth_slides["tissue"])
    out = tmp_path / "out"
    (out / ".tmp-tissue-123-abc.zarr").mkdir(parents=True)
    assert _run(slide, out).ok
    assert list_stores(out) == [out / "tissue.zarr"]
    assert not list(out.glob(".tmp-*"))


def test_slides_left_by_a_dead_run_are_tiled_in_worker_processes(tmp_path, synth_slides):
    # A run that dies (a native crash in a tiling thread, a kill, a power cut) leaves the
    # temporary stores of the slides it was building; the next run on the folder tiles
    # those slides with worker processes, so one that crashes again fails alone.
    slide = _one(tmp_path, synth_slides["tissue"])
    (slide.parent / "bad.svs").write_bytes(b"not a slide" * 100)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".tmp-tissue-4242-0badc0de.zarr").mkdir()
    (out / ".tmp-bad-4242-0ddba11.zarr").mkdir()
    rep = _run(slide.parent, out, workers=2)
    assert rep.settings["processes"] is True and "worker processes" in rep.settings["executor"]
    assert rep.settings["processes_reason"] == "suspect slides: bad, tissue"
    o = _by_id(rep)
    assert o["tissue"].status == "done" and o["bad"].status == "failed" and "not a slide" in o["bad"].reason
    assert not list(out.glob(".tmp-*"))
    # Tiled, or failed with an ordinary error: neither brought the process down.
    assert load_suspects(out) == {} and not (out / SUSPECTS_FILE).exists()
    rep = _run(slide.parent, out, workers=2)
    assert rep.settings["processes"] is False and "threads" in rep.settings["executor"]
    assert _by_id(rep)["tissue"].status == "skipped" and "processes_reason" not in rep.settings


def test_a_run_killed_mid_slide_makes_the_next_run_isolate_that_slide(tmp_path, synth_slides):
    import signal
    import time

    d = tmp_path / "in"
    d.mkdir()
    for i in range(6):
        shutil.copy2(synth_slides["tissue"], d / f"s{i}.tif")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline.cli", "tile", str(d), "--out", str(out), "--config", "tiny",
           "--set", "tiling.mpp=0.5", "--workers", "1", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and not list(out.glob(".tmp-*")):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)  # what a segfault or the OOM killer does
    proc.wait()
    left = {p.name.split("-")[1] for p in out.glob(".tmp-*")}
    assert left, "the run finished before it could be killed"
    rep = _run(d, out, _cfg(), workers=2)
    assert rep.ok and rep.settings["processes"] is True
    assert all(sid in rep.settings["processes_reason"] for sid in left)
    assert sorted(list_stores(out)) == [out / f"s{i}.zarr" for i in range(6)]
    assert not list(out.glob(".tmp-*")) and load_suspects(out) == {}


def test_a_slide_that_kills_its_worker_stays_suspect():
    suspects = {"a": "interrupted", "b": "interrupted", "c": "interrupted", "d": "interrupted"}
    rep = RunReport("tile")
    rep.add(SlideOutcome("a", "a.svs", "done"))
    rep.add(SlideOutcome("b", "b.svs", "failed", "b.svs: not a slide"))
    rep.add(SlideOutcome("c", "c.svs", "failed", "c.svs: the worker process died", details={"worker_died": True}))
    assert _update_suspects(suspects, rep) == {"c": "c.svs: the worker process died", "d": "interrupted"}


def test_a_killed_worker_is_described_plainly():
    from distributed.scheduler import KilledWorker

    msg = describe_error(KilledWorker("tile_band-1", "tcp://127.0.0.1:1", 1), "/data/x.svs")
    assert msg.startswith("/data/x.svs: the worker process tiling it died 2 times (a crash inside")
    assert "re-export or re-scan it" in msg


def test_read_tiles_pads_beyond_edge(synth_slides):
    from wsi.slide import choose_level

    with openslide.OpenSlide(str(synth_slides["blank"])) as s:
        w, h = s.dimensions
    choice = choose_level(0.5, (1, 4), 0.5)
    for path in ("fast-tiff", "openslide"):
        t = read_tiles(str(synth_slides["blank"]), np.array([[w - 64, h - 64]]), choice, 128, pad_value=7, read_path=path)
        assert (t[0, 64:, :, :] == 7).all() and (t[0, :, 64:, :] == 7).all()
        assert (t[0, :64, :64] > 200).all()  # glass inside the slide


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_local_cluster_equals_single_process(tmp_path, synth_slides, processes):
    d = tmp_path / "in"
    d.mkdir()
    for k in ("tissue", "tissue40x"):
        shutil.copy2(synth_slides[k], d / synth_slides[k].name)
    cfg = _cfg(**{"tiling.block_tiles": 3})
    r0 = _run(d, tmp_path / "inline", cfg, workers=0)
    r2 = _run(d, tmp_path / "dask", cfg, workers=2, processes=processes)
    assert r0.ok and r2.ok
    assert r2.settings["processes"] is processes
    assert ("worker processes" if processes else "2 threads in this process") in r2.settings["executor"]
    for sid in ("tissue", "tissue40x"):
        a = TileStore(tmp_path / "inline" / f"{sid}.zarr")
        b = TileStore(tmp_path / "dask" / f"{sid}.zarr")
        assert len(a) == len(b) > 0
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_array_equal(a.read(range(len(a))), b.read(range(len(b))))


def test_an_existing_dask_cluster_equals_single_process(tmp_path, synth_slides):
    # --scheduler: a cluster this run did not start (as dask-jobqueue or Kubernetes give),
    # reached over TCP; its workers open the slides themselves.
    from distributed import LocalCluster

    slide = _one(tmp_path, synth_slides["tissue"])
    cfg = _cfg(**{"tiling.block_tiles": 3})
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        r = _run(slide, tmp_path / "remote", cfg, scheduler=cluster.scheduler_address)
    r0 = _run(slide, tmp_path / "inline", cfg)
    assert r.ok and r0.ok and r.settings["executor"].startswith(f"dask {cluster.scheduler_address}")
    a, b = TileStore(tmp_path / "inline" / "tissue.zarr"), TileStore(tmp_path / "remote" / "tissue.zarr")
    assert len(a) == len(b) > 0
    np.testing.assert_array_equal(a.read(range(len(a))), b.read(range(len(b))))


def test_shared_real_svs(tmp_path, shared_slides):
    rep = _run(shared_slides, tmp_path / "out", _cfg(**{"tiling.tile_px": 512, "tiling.overlap_px": 128}))
    o = _by_id(rep)
    assert o["cmu-1-small-region"].status == "done"
    s = TileStore(tmp_path / "out" / "cmu-1-small-region.zarr")
    t = s.attrs["tiling"]
    assert t["scale"] == 1.0 and t["level"] == 0  # 0.499 um/px tiles at 0.5 without resizing
    assert abs(s.mpp - 0.499) < 1e-3 and len(s) > 5
    assert o["broken"].status == "failed" and "not a slide" in o["broken"].reason
    assert o["corrupt-tiles"].status == "failed"
    assert "damaged" in o["corrupt-tiles"].reason and "corrupt-tiles.svs" in o["corrupt-tiles"].reason
    assert not (tmp_path / "out" / "corrupt-tiles.zarr").exists()
    assert not list((tmp_path / "out").glob(".tmp-*"))
    assert not rep.ok


def test_cli_exit_codes_and_help(tmp_path, synth_slides):
    slide = _one(tmp_path, synth_slides["tissue"])
    exe = [sys.executable, "-m", "pipeline.cli"]
    for cmd in (["--help"], ["tile", "--help"]):
        r = subprocess.run(exe + cmd, capture_output=True, text=True)
        assert r.returncode == 0 and "Examples" in r.stdout or "Usage" in r.stdout
    assert "--processes / --threads" in r.stdout
    r = subprocess.run(exe + ["tile", str(slide.parent), "--out", str(tmp_path / "o"), "--config", "tiny",
                              "--workers", "0", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "1 done, 0 skipped, 0 failed" in r.stderr
    (slide.parent / "bad.svs").write_bytes(b"nope" * 100)
    r = subprocess.run(exe + ["tile", str(slide.parent), "--out", str(tmp_path / "o"), "--config", "tiny",
                              "--workers", "0", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 1 and "FAILED bad" in r.stderr and "1 skipped" in r.stderr
    r = subprocess.run(exe + ["tile", str(slide.parent), "--out", str(tmp_path / "o"), "--set", "tiling.tile_pz=3"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown key 'tile_pz'" in r.stderr and "tile_px" in r.stderr


@pytest.fixture
def tiny_disk(tmp_path):
    """A 400 kB tmpfs: a real 'no space left on device' (needs root; skips otherwise)."""
    mnt = tmp_path / "tiny_disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_disk_full_fails_the_slide_cleanly(tmp_path, synth_slides, tiny_disk):
    slide = _one(tmp_path, synth_slides["tissue"])
    rep = _run(slide, tiny_disk, _cfg(**{"store.codec": "zstd"}))
    o = _by_id(rep)["tissue"]
    assert o.status == "failed"
    assert "no space left" in o.reason and "tissue.tif" in o.reason
    assert not list(tiny_disk.glob(".tmp-*")) and not (tiny_disk / "tissue.zarr").exists()
    assert json.loads((tiny_disk / "tile-report.json").read_text())["counts"]["failed"] == 1
