"""Fault scenarios against the installed command line: damaged stores, killed swaps, moving slides, bad
settings, full disks, held locks, Ctrl-C. Prints a PASS/FAIL table; exit code 1 if any scenario failed.

Every scenario runs ``wsi-pipeline`` as ``sys.executable -m pipeline.cli`` (so run this with the Python of the
installation under test, or ``PYTHONPATH=<checkout>``) on a small generated slide in a fresh temporary folder.

Usage::

    python bench/faults.py                # all scenarios
    python bench/faults.py -k shard       # those whose name contains 'shard'
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

CLI = [sys.executable, "-m", "pipeline.cli"]
_CHECKOUT_TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
TILE_SET = ["--config", str(_CHECKOUT_TINY) if _CHECKOUT_TINY.is_file() else "tiny", "--set", "tiling.tile_px=128", "--set", "tiling.overlap_px=32",
            "--set", "store.tiles_per_shard=8", "--workers", "0", "--quiet"]


def cli(*args, timeout=300, **kw):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)


def py(code: str, *args):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def one_line_error(r) -> bool:
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    return len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr


def report(out: Path, sid: str = "slide") -> dict:
    data = json.loads((out / "tile-report.json").read_text())
    return {s["slide_id"]: s for s in data["slides"]}[sid]


def temporaries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()
                  if p.name.startswith((".tmp-", ".old-", ".wsi-pipeline.lock", ".wsi-pipeline.leases")))


class Env:
    def __init__(self, root: Path):
        self.root = root
        self.slide = root / "slides" / "slide.tif"
        self.base = root / "base-stores"
        self.n = 0

    def setup(self) -> None:
        from wsi.synth import write_slide

        self.slide.parent.mkdir(parents=True)
        write_slide(self.slide, 3072, 2560, mpp=0.5, seed=1, lesions=1)
        r = cli("tile", self.slide, "--out", self.base, *TILE_SET)
        assert r.returncode == 0, r.stderr

    def stores(self) -> Path:
        """A fresh copy of a complete store folder."""
        self.n += 1
        out = self.root / f"case{self.n:02d}"
        shutil.copytree(self.base, out, symlinks=True)
        return out

    def tile(self, out: Path, *extra):
        return cli("tile", self.slide, "--out", out, *TILE_SET, *extra)


READ_STORE = """
import sys
from wsi.store import FastTileReader, StoreError, TileStore
try:
    s = TileStore(sys.argv[1])
    r = FastTileReader(s)
    for i in range(len(s)):
        r[i]
    s.read(range(len(s)))
except StoreError as e:
    print(e); sys.exit(3)
"""


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def damaged_store(env: Env, damage, verify_needed: bool, read_refused: bool = True):
    out = env.stores()
    store = out / "slide.zarr"
    damage(store)
    checks = []
    if read_refused:
        r = py(READ_STORE, store)
        checks.append(("read refused in one line naming the store", r.returncode == 3 and str(store) in r.stdout
                       and "slide slide" in r.stdout and len(r.stdout.strip().splitlines()) == 1))
    r = env.tile(out)
    o = report(out)
    if verify_needed:
        checks.append(("plain re-run skips (sizes match)", r.returncode == 0 and o["status"] == "skipped"))
        r = env.tile(out, "--verify")
        o = report(out)
    checks.append(("re-tiled, saying why", r.returncode == 0 and o["status"] == "done"
                   and o["reason"].startswith("re-tiled:")))
    r = py(READ_STORE, store)
    checks.append(("the new store reads", r.returncode == 0))
    r = env.tile(out, "--verify")
    checks.append(("then skipped with checksums verified", report(out)["status"] == "skipped"))
    return checks


def _first_shard(store: Path) -> Path:
    return sorted(store.glob("tiles/c.*"))[0]


def s_shard_deleted(env):
    return damaged_store(env, lambda s: _first_shard(s).unlink(), False)


def s_coords_chunk_deleted(env):
    return damaged_store(env, lambda s: next(s.glob("coords/c/*/*")).unlink(), False)


def s_zero_byte_shard(env):
    return damaged_store(env, lambda s: _first_shard(s).write_bytes(b""), False)


def s_bytes_flipped(env):
    return damaged_store(env, lambda s: _flip(_first_shard(s), 1000), True, read_refused=False)


def s_shard_index_damaged(env):
    return damaged_store(env, lambda s: _flip(_first_shard(s), -12), True)


def s_zarr_json_damaged(env):
    return damaged_store(env, lambda s: (s / "zarr.json").write_text("{"), False, read_refused=False)


KILL_IN_SWAP = """
import os, sys
import wsi.store as s
from pipeline.cli import main
mode = sys.argv[1]
real_exchange, real_replace = s._rename_exchange, os.replace
def exchange_then_die(a, b):
    assert real_exchange(a, b)
    os._exit(9)
def replace_then_die(a, b, *args, **kw):
    real_replace(a, b, *args, **kw)
    if os.path.basename(a) == "slide.zarr":
        os._exit(9)
if mode == "rename":
    s._rename_exchange = lambda a, b: False
    s.os.replace = replace_then_die
else:
    s._rename_exchange = exchange_then_die
sys.argv = ["wsi-pipeline"] + sys.argv[2:]
main()
"""


def _kill_in_swap(env: Env, mode: str):
    out = env.stores()
    r = py(KILL_IN_SWAP, mode, "tile", env.slide, "--out", out, *TILE_SET, "--set", "store.jpeg_quality=70")
    left = temporaries(out)
    checks = [("killed inside the swap", r.returncode == 9)]
    if mode == "rename":
        checks.append(("the window: no slide.zarr, an .old- copy", not (out / "slide.zarr").exists()
                       and any(n.startswith(".old-") for n in left)))
    r = env.tile(out)
    checks.append(("next run: a complete store, no temporaries", r.returncode == 0 and py(READ_STORE, out / "slide.zarr")
                   .returncode == 0 and temporaries(out) == []))
    return checks


def s_kill_inside_swap_exchange(env):
    return _kill_in_swap(env, "exchange")


def s_kill_inside_swap_two_renames(env):
    return _kill_in_swap(env, "rename")


def s_slide_replaced_same_size_and_mtime(env):
    out = env.stores()
    slide = env.root / "moved" / "slide.tif"
    slide.parent.mkdir(exist_ok=True)
    shutil.copy2(env.slide, slide)
    r = cli("tile", slide, "--out", out, *TILE_SET)
    st = slide.stat()
    data = bytearray(slide.read_bytes())
    data[len(data) // 2] ^= 0xFF
    slide.write_bytes(bytes(data))
    os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = cli("tile", slide, "--out", out, *TILE_SET)
    return [("same size + mtime, other content: re-tiled", r.returncode == 0 and report(out)["status"] == "done")]


def s_verify_content(env):
    out = env.stores()
    r = env.tile(out, "--verify-content")
    return [("--verify-content on an unchanged slide skips", r.returncode == 0 and report(out)["status"] == "skipped")]


def _bad_setting(env, *args, text: str, rc: int = 2):
    r = cli("tile", env.slide, "--out", env.root / "never", *args)
    return [(f"exit {rc}, one line: {text}", r.returncode == rc and one_line_error(r) and text in r.stderr)]


def s_nan_and_range_settings(env):
    checks = []
    for setting, text in [("tiling.mpp=nan", "tiling.mpp must be a finite number"),
                          ("tissue.mask_mpp=.inf", "tissue.mask_mpp must be a finite number"),
                          ("store.zstd_level=99", "store.zstd_level must be in"),
                          ("tissue.max_background_value=300", "tissue.max_background_value must be in"),
                          ("tissue.min_threshold=nan", "tissue.min_threshold must be a finite number"),
                          ("tiling.mpp_tolerance=inf", "tiling.mpp_tolerance must be a finite number")]:
        checks += _bad_setting(env, "--set", setting, text=text)
    checks.append(("no folder made", not (env.root / "never").exists()))
    return checks


def s_bad_mpp_and_workers(env):
    csv = env.root / "mpp.csv"
    csv.write_text("slide_id,mpp\nslide,nan\n")
    return (_bad_setting(env, "--assume-mpp", "0", text="--assume-mpp 0.0")
            + _bad_setting(env, "--assume-mpp", "inf", text="--assume-mpp inf")
            + _bad_setting(env, "--mpp-csv", csv, text="mpp must be a number > 0")
            + _bad_setting(env, "--workers", "-2", text="--workers -2"))


def s_duplicate_yaml_key(env):
    cfg = env.root / "dup.yaml"
    cfg.write_text("tiling:\n  mpp: 0.5\n  mpp: 1.0\n")
    return _bad_setting(env, "--config", cfg, text="key 'mpp' appears twice")


def s_missing_list_entry_and_symlink_loop(env):
    d = env.root / "listcase"
    d.mkdir()
    (d / "loop.svs").symlink_to(d / "loop.svs")
    # one real slide: a list where no entry exists is a whole-batch mistake (exit 2)
    (d / "list.txt").write_text(f"missing.svs\nloop.svs\n{env.slide}\n")
    out = env.root / "listcase-out"
    r = cli("tile", d / "list.txt", "--out", out, *TILE_SET)
    checks = [("list: exit 1, each a one-line reason", r.returncode == 1
               and "file not found" in report(out, "missing")["reason"]
               and "loop of symbolic links" in report(out, "loop")["reason"])]
    r = cli("tile", d / "loop.svs", "--out", out, *TILE_SET)
    checks.append(("a loop as SLIDES: exit 2, one line", r.returncode == 2 and one_line_error(r)
                   and "loop of symbolic links" in r.stderr))
    return checks


def s_lease_held(env):
    """Another job holds the slide's lease: this run leaves the slide to it; once that job is gone, the
    next run takes the lease over and tiles the slide."""
    out = env.stores()
    shutil.rmtree(out / "slide.zarr")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from pipeline.leases import Leases
        with Leases(sys.argv[1], "holder") as leases:
            assert leases.claim("slide-slide").ok
            print("held", flush=True); time.sleep(60)
    """), str(out)], stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()
    r = env.tile(out)
    holder.kill()  # SIGKILL: its lease file stays, naming a process that is gone
    holder.wait()
    checks = [("second job: exit 0, the slide left to the holder", r.returncode == 0
               and "1 slide being processed by other jobs" in r.stderr and report(out)["status"] == "busy"
               and f"pid {holder.pid}" in report(out)["reason"] and not (out / "slide.zarr").exists())]
    r = env.tile(out)
    checks.append(("after the holder died: its lease taken over, the slide tiled, no lease left", r.returncode == 0
                   and report(out)["status"] == "done" and "took over its lease" in r.stderr
                   and not (out / ".wsi-pipeline.leases").exists()))
    return checks


def s_reports_unwritable(env):
    out = env.stores()
    shutil.rmtree(out / "reports")
    (out / "reports").write_text("a file where the reports folder goes")
    r = env.tile(out)
    return [("exit 2, one line naming the path", r.returncode == 2 and one_line_error(r) and "reports" in r.stderr),
            ("no temporaries, no lease or lock file", temporaries(out) == [])]


def s_file_size_limit(env):
    if not shutil.which("prlimit"):
        return None
    out = env.root / "fsize-out"
    r = subprocess.run(["prlimit", "--fsize=60000", *CLI, "tile", str(env.slide), "--out", str(out), *TILE_SET,
                        "--set", "store.codec=zstd"], capture_output=True, text=True, timeout=300)
    if "prlimit:" in r.stderr:
        return None
    return [("exit 1, the slide failed in one line", r.returncode == 1 and "file size limit" in r.stderr
             and "Traceback" not in r.stderr),
            ("no temporaries, no store", temporaries(out) == [] and not (out / "slide.zarr").exists())]


def s_disk_full_tmpfs(env):
    mnt = env.root / "tiny-disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], capture_output=True).returncode:
        return None
    try:
        r = cli("tile", env.slide, "--out", mnt, *TILE_SET, "--set", "store.codec=zstd")
        return [("exit 1, 'no space left' for the slide", r.returncode == 1 and "no space left" in r.stderr
                 and "Traceback" not in r.stderr),
                ("no temporaries, no store", temporaries(mnt) == [] and not (mnt / "slide.zarr").exists())]
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def s_ctrl_c(env):
    d = env.root / "many"
    d.mkdir()
    for i in range(12):
        shutil.copy2(env.slide, d / f"s{i:02d}.tif")
    out = env.root / "many-out"
    p = subprocess.Popen(CLI + ["tile", str(d), "--out", str(out), *TILE_SET], stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < 60 and not (out.is_dir() and list(out.glob(".tmp-*"))):
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    return [("exit 130 with one line", p.returncode == 130 and "interrupted" in err and "Traceback" not in err)]


# --------------------------------------------------------------------------- EM runs (issue #11 items 2 and 4)


def _em_env(env) -> dict:
    """A small cohort, tiled, and one finished image-mode round (made once, copied per scenario)."""
    if getattr(env, "em", None):
        return env.em
    from wsi.synth import make_cohort

    root = env.root / "em"
    make_cohort(root / "cohort", n_positive=3, n_negative=3, width_px=1024, height_px=1024, mpp=2.0, seed=3,
                split=(1.0, 0.0, 0.0))
    r = cli("tile", root / "cohort", "--out", root / "stores", "--config", "tiny", "--workers", "0", "--quiet")
    assert r.returncode == 0, r.stderr
    base = ["em-round", "--stores", root / "stores", "--labels", root / "cohort" / "labels.csv", "--mode", "image",
            "--config", "tiny", "--set", "em.epochs_init=1", "--set", "em.epochs=1", "--set", "stage2.epochs=1",
            "--quiet"]
    r = cli(*base, "--run", root / "run", "--rounds", "1", timeout=900)
    assert r.returncode == 0, r.stderr
    env.em = {"root": root, "base": base}
    return env.em


def _em_copy(env) -> tuple[list, Path, Path]:
    em = _em_env(env)
    env.n += 1
    case = env.root / f"em-case{env.n:02d}"
    shutil.copytree(em["root"] / "run", case / "run")
    shutil.copytree(em["root"] / "stores", case / "stores")
    base = [case / "stores" if a == em["root"] / "stores" else a for a in em["base"]]
    return base, case / "run", case / "stores"


def s_em_store_replaced_between_rounds(env):
    import zarr

    base, run, stores = _em_copy(env)
    sid = sorted(p.name for p in stores.glob("*.zarr"))[0]
    zarr.open_group(str(stores / sid), mode="r+").attrs.update({"created_utc": "2030-01-01T00:00:00Z"})  # as a re-tile
    r = cli(*base, "--run", run, "--rounds", "2", timeout=900)
    return [("refused in one line naming the store", r.returncode == 2 and one_line_error(r) and sid in r.stderr),
            ("no round 1 was trained on the changed data", not (run / "round_1").exists())]


def s_em_killed_between_run_json_and_best(env):
    base, run, _ = _em_copy(env)
    (run / "best").write_text('{"round": 7}\n')  # what a kill between the two writes could leave, or worse
    r = cli(*base, "--run", run, "--rounds", "1", timeout=900)
    best = json.loads((run / "best").read_text())["round"]
    return [("re-run exits 0", r.returncode == 0),
            ("best re-synced from run.json", best == json.loads((run / "run.json").read_text())["best_round"] == 0)]


def s_em_interrupted_force(env):
    base, run, _ = _em_copy(env)
    trash = run / ".trash-deadbeef"  # a --force killed after moving the old round aside
    trash.mkdir()
    os.replace(run / "round_0", trash / "round_0")
    r = cli(*base, "--run", run, "--rounds", "1", timeout=900)
    return [("re-run trains the round again", r.returncode == 0 and (run / "round_0" / "DONE").is_file()),
            ("the moved-aside round is deleted once the new one is done", not trash.exists())]


SCENARIOS = {name[2:]: fn for name, fn in globals().items() if name.startswith("s_")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="only scenarios whose name contains this")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="wsi-faults-"))
    env = Env(root)
    t0 = time.perf_counter()
    env.setup()
    rows, failed = [], 0
    for name, fn in SCENARIOS.items():
        if args.k not in name:
            continue
        try:
            checks = fn(env)
        except Exception as exc:  # a scenario that breaks is a failure, with the reason
            checks = [(f"{type(exc).__name__}: {exc}", False)]
        if checks is None:
            rows.append((name, "SKIP", "not permitted here"))
            continue
        ok = all(c[1] for c in checks)
        failed += not ok
        detail = "failed: " + "; ".join(c[0] for c in checks if not c[1]) if not ok else f"{len(checks)} checks"
        rows.append((name, "PASS" if ok else "FAIL", detail))
    w = max(len(r[0]) for r in rows)
    print(f"{'scenario':<{w}}  result  checks")
    for name, res, detail in rows:
        print(f"{name:<{w}}  {res:<6}  {detail}")
    n_pass = sum(r[1] == "PASS" for r in rows)
    print(f"\n{n_pass} passed, {failed} failed, {sum(r[1] == 'SKIP' for r in rows)} skipped "
          f"in {time.perf_counter() - t0:.0f} s")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
