"""Never trust damaged or moving data: damaged stores, swaps killed half-way, slides that change,
durable writes, and the one-line failures of tile / config / lock (issue #11)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.batch import RunLock, UsageError
from pipeline.config import ConfigError, load_config
from pipeline.tile import finalize_slide, plan_slide, run_tile, TileJob
from wsi.slide import SlideError
from wsi.store import (
    STORES_LOCK,
    FastTileReader,
    StoreError,
    TileStore,
    TileWriter,
    create_store,
    finalize_store,
    list_stores,
    recover_swaps,
    replace_dir,
    temp_store_path,
    verify_store,
)

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "pipeline.cli"]
TINY = str(ROOT / "configs" / "tiny.yaml")  # this checkout's (an installed package may hold another version)


def _env():
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _cfg(**over):
    base = {"tiling.mpp": 0.5, "tiling.tile_px": 128, "tiling.overlap_px": 32, "runtime.workers": 0,
            "store.tiles_per_shard": 8}
    base.update(over)
    return load_config("tiny", base)


def _run(slides, out, cfg=None, **kw):
    return run_tile(slides, out, cfg or _cfg(), workers=kw.pop("workers", 0), quiet=True, progress=False, **kw)


def _status(report, sid="tissue"):
    return {s.slide_id: s for s in report.slides}[sid]


def _store(tmp_path, n=20, per_shard=4, name="s1"):
    """A small complete JPEG store written as tiling writes it."""
    tmp = temp_store_path(tmp_path, name)
    rng = np.random.default_rng(0)
    tiles = rng.integers(60, 200, (n, 32, 32, 3), dtype=np.uint8)
    create_store(
        tmp, tile_px=32, coords=np.stack([np.arange(n) * 32, np.zeros(n, int)], 1),
        cols_rows=np.stack([np.arange(n), np.zeros(n, int)], 1), tissue_fraction=np.linspace(0.3, 1, n),
        mask=np.ones((4, 4), bool), thumbnail=np.full((4, 4, 3), 200, np.uint8), tiles_per_shard=per_shard,
        attrs={"slide": {"slide_id": name}, "tiling": {"effective_mpp": 0.5, "downsample": 1.0},
               "tissue": {"mask_downsample": 16.0}},
    )
    with TileWriter(tmp) as w:
        w.write(np.arange(n), tiles)
    final = tmp_path / f"{name}.zarr"
    finalize_store(tmp, final, {}, w.files)
    return final


@pytest.fixture
def tiled(tmp_path, synth_slides):
    d = tmp_path / "in"
    d.mkdir()
    slide = d / "tissue.tif"
    shutil.copy2(synth_slides["tissue"], slide)
    out = tmp_path / "out"
    assert _status(_run(slide, out)).status == "done"
    return slide, out, out / "tissue.zarr"


# --------------------------------------------------------------------------- the integrity record


def test_finalize_records_every_file_and_a_complete_store_verifies(tmp_path):
    path = _store(tmp_path)
    files = TileStore(path).attrs["integrity"]["files"]
    assert {"tiles/c.0.0.0.0", "tiles/c.4.0.0.0", "coords/c/0/0", "tiles/zarr.json"} <= set(files)
    assert "zarr.json" not in files  # the record lives there
    for rel, (size, crc) in files.items():
        assert (path / rel).stat().st_size == size and len(crc) == 8
    assert verify_store(path) == [] and verify_store(path, checksums=True) == []


def test_writer_checksums_equal_a_read_back(tmp_path):
    from wsi.store import file_crc32c

    path = _store(tmp_path)
    for rel, (size, crc) in TileStore(path).attrs["integrity"]["files"].items():
        assert file_crc32c(path / rel) == crc, rel


def test_a_store_with_tiles_never_written_cannot_be_completed(tmp_path):
    tmp = temp_store_path(tmp_path, "x")
    create_store(tmp, tile_px=32, coords=np.zeros((8, 2)), cols_rows=np.zeros((8, 2)), tissue_fraction=np.ones(8),
                 mask=np.ones((2, 2)), thumbnail=np.zeros((2, 2, 3)), tiles_per_shard=4)
    with TileWriter(tmp) as w:
        w.write(np.arange(4), np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(StoreError, match=r"1 tile file\(s\) never written \(tiles/c.1.0.0.0"):
        finalize_store(tmp, tmp_path / "x.zarr", {})
    assert not (tmp_path / "x.zarr").exists()


DAMAGE = {
    "shard deleted": lambda p: (p / "tiles" / "c.4.0.0.0").unlink(),
    "coords chunk deleted": lambda p: (p / "coords" / "c" / "0" / "0").unlink(),
    "0-byte shard": lambda p: (p / "tiles" / "c.2.0.0.0").write_bytes(b""),
    "shard truncated": lambda p: os.truncate(p / "tiles" / "c.0.0.0.0", 100),
}


@pytest.mark.parametrize("what", sorted(DAMAGE))
def test_a_damaged_store_is_an_error_naming_store_and_fix_never_fill_values(tmp_path, what):
    path = _store(tmp_path)
    DAMAGE[what](path)
    with pytest.raises(StoreError) as e:
        TileStore(path)
    msg = str(e.value)
    assert str(path) in msg and "slide s1" in msg and "damaged" in msg and "wsi-pipeline tile" in msg
    assert "\n" not in msg
    assert verify_store(path)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_found_by_the_checksums(tmp_path):
    path = _store(tmp_path)
    _flip(path / "tiles" / "c.4.0.0.0", 700)
    assert verify_store(path) == []  # same sizes: the cheap check passes
    assert verify_store(path, checksums=True) == ["tiles/c.4.0.0.0 does not match its checksum"]


def test_a_damaged_shard_index_names_slide_and_store(tmp_path):
    path = _store(tmp_path)
    _flip(path / "tiles" / "c.4.0.0.0", -10)  # inside the shard index
    store = TileStore(path)
    for read in (lambda: FastTileReader(store)[17], lambda: store[17], lambda: store.read([16, 17])):
        with pytest.raises(StoreError) as e:
            read()
        assert str(path) in str(e.value) and "slide s1" in str(e.value) and "\n" not in str(e.value)


def test_an_undecodable_tile_names_slide_and_store(tmp_path):
    path = _store(tmp_path, per_shard=1)
    f = path / "tiles" / "c.3.0.0.0"
    f.write_bytes(b"\0" * f.stat().st_size)  # same size, not a JPEG
    store = TileStore(path)
    with pytest.raises(StoreError, match=r"slide s1 is damaged: tile 3 could not be read"):
        FastTileReader(store)[3]
    with pytest.raises(StoreError, match=r"slide s1 is damaged"):
        store[3]


def test_a_shard_deleted_after_opening_is_an_error_not_white_tiles(tmp_path):
    path = _store(tmp_path)
    reader = FastTileReader(TileStore(path))
    (path / "tiles" / "c.4.0.0.0").unlink()
    with pytest.raises(StoreError, match="tile 17 is missing"):
        reader[17]


# --------------------------------------------------------------------------- tile re-tiles what fails


def test_tile_retiles_a_store_with_a_deleted_shard_saying_why(tiled):
    slide, out, store = tiled
    want = TileStore(store).read(range(len(TileStore(store))))
    next(store.glob("tiles/c.*")).unlink()
    with pytest.raises(StoreError):
        TileStore(store)
    o = _status(_run(slide, out))
    assert o.status == "done" and o.reason.startswith("re-tiled:") and "is missing" in o.reason
    assert np.array_equal(TileStore(store).read(range(len(want))), want)
    assert _status(_run(slide, out)).status == "skipped"


def test_tile_retiles_a_store_without_its_coords(tiled):
    slide, out, store = tiled
    (store / "coords" / "c" / "0" / "0").unlink()
    o = _status(_run(slide, out))
    assert o.status == "done" and "coords/c/0/0 is missing" in o.reason


def test_flipped_bytes_are_skipped_by_default_and_retiled_with_verify(tiled):
    slide, out, store = tiled
    shard = sorted(store.glob("tiles/c.*"))[0]
    _flip(shard, 500)
    assert _status(_run(slide, out)).status == "skipped"  # sizes only: cheap
    o = _status(_run(slide, out, verify=True))
    assert o.status == "done" and "does not match its checksum" in o.reason
    assert "checksums verified" in _status(_run(slide, out, verify=True)).reason


def test_a_store_without_an_integrity_record_is_retiled(tiled):
    import zarr

    slide, out, store = tiled
    g = zarr.open_group(str(store), mode="r+")
    del g.attrs["integrity"]
    o = _status(_run(slide, out))
    assert o.status == "done" and "no record of its files" in o.reason


def test_an_unreadable_store_is_retiled(tiled):
    slide, out, store = tiled
    (store / "zarr.json").write_text("{")
    o = _status(_run(slide, out))
    assert o.status == "done" and "unreadable" in o.reason


# --------------------------------------------------------------------------- slides that change


def test_a_slide_changed_during_tiling_fails_and_keeps_no_store(tmp_path, synth_slides):
    slide = tmp_path / "tissue.tif"
    shutil.copy2(synth_slides["tissue"], slide)
    out = tmp_path / "out"
    out.mkdir()
    job = TileJob(str(slide), "tissue", str(out), _cfg())
    plan = plan_slide(job)
    os.utime(slide, ns=(time.time_ns(), time.time_ns() + 10**9))  # a copy landing
    with pytest.raises(SlideError, match="changed while it was being tiled"):
        finalize_slide(job, plan, {})
    assert not (out / "tissue.zarr").exists()
    shutil.rmtree(plan["tmp"])


def test_same_size_and_mtime_with_other_content_is_retiled(tiled):
    slide, out, store = tiled
    st = slide.stat()
    data = bytearray(slide.read_bytes())
    data[len(data) // 2] ^= 0xFF  # what cp -p / rsync -t of another file would do
    slide.write_bytes(bytes(data))
    os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert slide.stat().st_size == st.st_size and slide.stat().st_mtime_ns == st.st_mtime_ns
    assert _status(_run(slide, out)).status == "done"  # the ctime moved: the content was compared


def test_verify_content_compares_every_byte(tiled):
    import zarr

    slide, out, store = tiled
    attrs = TileStore(store).attrs
    assert len(attrs["slide"]["content_crc32c"]) == 8 and attrs["slide"]["ctime_ns"] > 0
    assert _status(_run(slide, out, verify_content=True)).status == "skipped"
    g = zarr.open_group(str(store), mode="r+")  # a record that no longer matches the file
    g.attrs["slide"] = {**attrs["slide"], "content_crc32c": "00000000"}
    assert _status(_run(slide, out)).status == "skipped"  # stat unchanged: trusted
    o = _status(_run(slide, out, verify_content=True))
    assert o.status == "done" and "--verify-content" in o.reason


# --------------------------------------------------------------------------- swaps killed half-way


_KILL_IN_SWAP = textwrap.dedent("""
    import os, sys
    import wsi.store as s
    from pipeline.config import load_config
    from pipeline.tile import run_tile
    mode = sys.argv[3]
    real_exchange, real_replace = s._rename_exchange, os.replace
    def exchange_then_die(a, b):
        assert real_exchange(a, b)
        os._exit(9)  # killed right after the exchange, before the old copy is renamed aside
    def replace_then_die(a, b, *args, **kw):
        real_replace(a, b, *args, **kw)
        if os.path.basename(a) == "tissue.zarr":
            os._exit(9)  # killed right after the old store was moved aside: no tissue.zarr
    if mode == "rename":
        s._rename_exchange = lambda a, b: False
        s.os.replace = replace_then_die
    else:
        s._rename_exchange = exchange_then_die
    cfg = load_config(sys.argv[4], {"tiling.tile_px": 128, "tiling.overlap_px": 32, "store.jpeg_quality": 70})
    run_tile(sys.argv[1], sys.argv[2], cfg, workers=0, quiet=True, progress=False)
""")


@pytest.mark.parametrize("mode", ["exchange", "rename"])
def test_a_kill_inside_the_swap_never_loses_the_store(tiled, mode):
    slide, out, store = tiled
    r = subprocess.run([sys.executable, "-c", _KILL_IN_SWAP, str(slide), str(out), mode, TINY], env=_env(),
                       capture_output=True, text=True)
    assert r.returncode == 9, r.stderr
    if mode == "rename":
        assert not store.exists() and list(out.glob(".old-tissue.zarr-*"))  # the window
    else:
        assert store.exists() and list(out.glob(".tmp-tissue-*"))  # the old store under the temporary name
    names = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    # The next run (any settings) finds a complete store in place and keeps or re-tiles it.
    rep = _run(slide, out)
    assert _status(rep).status in ("done", "skipped")
    assert TileStore(store).attrs["complete"], names
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".old-*"))


def test_recover_swaps_prefers_the_finished_new_store_then_the_old(tmp_path):
    old = _store(tmp_path, name="a")
    os.replace(old, tmp_path / ".old-a.zarr-0123abcd")
    assert recover_swaps(tmp_path) == ["a"] and (tmp_path / "a.zarr").is_dir()
    # a damaged copy is never put back
    _store(tmp_path, name="b")
    os.replace(tmp_path / "b.zarr", tmp_path / ".old-b.zarr-0123abcd")
    (tmp_path / ".old-b.zarr-0123abcd" / "tiles" / "c.0.0.0.0").unlink()
    assert recover_swaps(tmp_path) == []
    assert list_stores(tmp_path) == [tmp_path / "a.zarr"]


def test_replace_dir_exchanges_atomically(tmp_path):
    a, b = tmp_path / "new", tmp_path / "x.zarr"
    a.mkdir()
    (a / "f").write_text("new")
    b.mkdir()
    (b / "f").write_text("old")
    replace_dir(a, b)
    assert (b / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["x.zarr"]


# --------------------------------------------------------------------------- clean failures


def _cli(*args, **kw):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, env=_env(), **kw)


@pytest.mark.parametrize("setting,text", [
    ("tiling.mpp=nan", "tiling.mpp must be a finite number"),
    ("tissue.mask_mpp=inf", "tissue.mask_mpp must be a finite number"),
    ("store.zstd_level=40", "store.zstd_level must be in"),
    ("tissue.max_background_value=256", "tissue.max_background_value must be in [0, 255]"),
    ("tissue.min_threshold=nan", "tissue.min_threshold must be a finite number"),
    ("tiling.mpp_tolerance=1.5", "tiling.mpp_tolerance must be in [0, 1)"),
])
def test_nan_inf_and_out_of_range_settings_are_refused(setting, text):
    with pytest.raises(ConfigError, match=text.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config("tiny", dict([setting.split("=")]))


def test_cli_refuses_bad_numbers_with_one_line_and_exit_2(tmp_path, synth_slides):
    for args, text in [
        (["--set", "tiling.mpp=nan"], "tiling.mpp must be a finite number"),
        (["--assume-mpp", "0"], "--assume-mpp 0.0: must be a number"),
        (["--assume-mpp", "nan"], "--assume-mpp nan"),
        (["--workers", "-2"], "--workers -2"),
    ]:
        r = _cli("tile", str(synth_slides["tissue"]), "--out", str(tmp_path / "o"), *args)
        assert r.returncode == 2 and text in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    csv = tmp_path / "mpp.csv"
    csv.write_text("slide_id,mpp\ntissue,inf\n")
    r = _cli("tile", str(synth_slides["tissue"]), "--out", str(tmp_path / "o"), "--mpp-csv", str(csv))
    assert r.returncode == 2 and "line 2: mpp must be a number > 0" in r.stderr
    with pytest.raises(UsageError, match="--assume-mpp 0"):
        _run(synth_slides["tissue"], tmp_path / "o", assume_mpp=0)


def test_duplicate_yaml_keys_are_an_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tiling:\n  mpp: 0.5\n  tile_px: 256\n  mpp: 1.0\n")
    with pytest.raises(ConfigError, match=r"c.yaml: key 'mpp' appears twice \(lines 2 and 4\)"):
        load_config(cfg)
    cfg.write_text("tiling:\n  mpp: 0.5\ntiling:\n  tile_px: 256\n")
    with pytest.raises(ConfigError, match="key 'tiling' appears twice"):
        load_config(cfg)


def test_missing_list_entries_and_symlink_loops_get_one_line(tmp_path, synth_slides):
    (tmp_path / "loop.svs").symlink_to(tmp_path / "loop.svs")
    (tmp_path / "list.txt").write_text(f"missing.svs\nloop.svs\n{synth_slides['blank']}\n")  # one real slide:
    # a list where none exists is a whole-batch mistake (one message, exit 2), tested in test_qupath_and_logs
    rep = _run(tmp_path / "list.txt", tmp_path / "out")
    o = {s.slide_id: s.reason for s in rep.slides}
    assert o["missing"].endswith("file not found (a missing file, or a symbolic link to one); check the path or the list file")
    assert "a loop of symbolic links" in o["loop"]
    with pytest.raises(UsageError, match="a loop of symbolic links"):
        _run(tmp_path / "loop.svs", tmp_path / "out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_slide_says_permission_denied(tmp_path, synth_slides):
    slide = tmp_path / "tissue.tif"
    shutil.copy2(synth_slides["tissue"], slide)
    slide.chmod(0)
    o = _status(_run(slide, tmp_path / "out"))
    assert "permission denied" in o.reason and "not a slide" not in o.reason


def test_the_lock_names_host_and_pid_and_leaves_no_file(tmp_path):
    import socket

    with RunLock(tmp_path, "tile"):
        text = (tmp_path / RunLock.NAME).read_text()
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in text
        with pytest.raises(UsageError, match=f"pid {os.getpid()} on host"):
            RunLock(tmp_path, "tile").__enter__()
    assert not (tmp_path / RunLock.NAME).exists()
    with pytest.raises(ValueError):  # a command that refuses the folder inside the lock leaves nothing
        with RunLock(tmp_path, "em-round"):
            raise ValueError("not a run folder")
    assert list(tmp_path.iterdir()) == []


def test_an_os_error_outside_the_slides_is_one_line_exit_2(tmp_path, synth_slides):
    out = tmp_path / "o"
    out.mkdir()
    (out / "reports").write_text("a file where the reports folder goes")
    r = _cli("tile", str(synth_slides["tissue"]), "--out", str(out), "--config", TINY, "--quiet")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and "reports" in r.stderr and "Traceback" not in r.stderr
    # no temporaries, no run lock; the stores folder's reader/writer lock file stays (an flock file must:
    # removing it would let two processes lock two different files of one name)
    left = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert left in ([], [STORES_LOCK]), left


def test_a_file_size_limit_fails_the_slide_cleanly(tmp_path, synth_slides):
    if not shutil.which("prlimit"):
        pytest.skip("prlimit is not installed")
    out = tmp_path / "o"
    r = subprocess.run(["prlimit", "--fsize=60000", *CLI, "tile", str(synth_slides["tissue"]), "--out", str(out),
                        "--config", TINY, "--set", "store.codec=zstd", "--quiet"],
                       capture_output=True, text=True, env=_env())
    if "prlimit:" in r.stderr:
        pytest.skip(f"prlimit not permitted here: {r.stderr.strip()}")
    assert r.returncode == 1, r.stderr
    assert "file size limit" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not list(out.glob(".tmp-*")) and not (out / "tissue.zarr").exists()


def test_ctrl_c_on_tile_exits_130_with_a_line(tmp_path, synth_slides):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(12):
        shutil.copy2(synth_slides["tissue"], d / f"s{i:02d}.tif")
    out = tmp_path / "o"
    # SIGINT as a terminal gives it, even when this test runs in a background job (which inherits it ignored)
    p = subprocess.Popen(CLI + ["tile", str(d), "--out", str(out), "--config", TINY, "--workers", "0", "--quiet"],
                         stderr=subprocess.PIPE, text=True, env=_env(),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0 = time.time()
    while not list(out.glob(".tmp-*")) and time.time() - t0 < 60 and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted; run the same command again" in err and "Traceback" not in err
    assert not (out / RunLock.NAME).exists()
