"""Tiling benchmark: the project's `tile` vs a naive loop vs the floor, in one run.

Generates a realistic pyramidal slide with the project's generator (cached in
``bench-out/``), then measures on the same tile grid (512 px, stride 384,
0.5 um/px, JPEG q90 unless told otherwise):

* project   ``run_tile`` end to end (mask, grid, read, encode, write, rename)
            on its default ``--workers`` threads, and with ``--processes`` (a
            Dask LocalCluster of worker processes), also shown less the
            cluster's start-up and shut-down (paid once per run, whatever the
            number of slides);
* naive     what a user would write: ``read_region(512x512)`` per grid tile and
            ``zarr_array[i] = tile`` one tile at a time, the same tiles split
            over ``--workers`` processes;
* floor     decoding every touched source JPEG tile once + encoding every output
            tile with the same codec, nothing else, over ``--workers`` processes.

Timed runs carry no instrumentation: a thread sampling RSS every 50 ms cost
the threaded project 6 % of its time. Peak RSS comes from one more run of
each, untimed: the process's own high-water mark (``VmHWM``, reset before the
run) and, for child processes, their summed RSS sampled every 50 ms. The
project and the floor run ``--repeat`` times, interleaved, and the medians are
compared: on a shared 2-core machine single runs vary by +-15 %.

Usage::

    python bench/tile_bench.py                       # 20000 x 20000 slide
    python bench/tile_bench.py --size-px 50000       # the memory check
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _own_hwm() -> int:
    """This process's peak RSS since the last :func:`_reset_hwm` (bytes; 0 if unknown)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_hwm() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: reset VmHWM to the current RSS
    except OSError:
        pass


class PeakRSS:
    """Peak RSS of this process and its descendants during the ``with`` block.

    This process's own peak is its exact high-water mark; child processes'
    RSS is sampled (summed with this process's current RSS) every 50 ms.
    """

    def __init__(self, interval_s: float = 0.05):
        import psutil

        self._proc = psutil.Process()
        self._interval = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        total = 0
        procs = [self._proc]
        try:
            procs += self._proc.children(recursive=True)
        except Exception:
            pass
        for p in procs:
            try:
                total += p.memory_info().rss
            except Exception:
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self._interval)

    def __enter__(self):
        _reset_hwm()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _own_hwm())


def make_slide(out: Path, size_px: int, seed: int) -> Path:
    from wsi.synth import write_slide

    path = out / f"bench_{size_px}.tif"
    if not path.exists():
        t = time.perf_counter()
        tmp_dir = out / f".gen-{size_px}"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir()
        write_slide(tmp_dir / path.name, size_px, size_px, mpp=0.5, seed=seed, lesions=2)
        os.replace(tmp_dir / path.name, path)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        print(f"generated {path.name} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.0f} s")
    return path


# --------------------------------------------------------------------------- naive


def _naive_worker(args):
    path, store, idx, coords, tile_px = args
    import openslide
    import zarr

    import wsi.codecs  # noqa: F401  (registers the codec)
    from wsi.slide import composite_on_white

    arr = zarr.open_array(store, mode="r+")
    slide = openslide.OpenSlide(path)
    for i, (x, y) in zip(idx, coords):
        tile = composite_on_white(np.asarray(slide.read_region((int(x), int(y)), 0, (tile_px, tile_px))))
        arr[int(i)] = tile
    slide.close()
    return len(idx)


def run_naive(path: Path, coords: np.ndarray, tile_px: int, workers: int, out: Path, quality: int) -> float:
    import zarr

    from wsi.codecs import JpegCodec

    store = out / "naive.zarr"
    shutil.rmtree(store, ignore_errors=True)
    zarr.create_array(
        str(store), shape=(len(coords), tile_px, tile_px, 3), chunks=(1, tile_px, tile_px, 3),
        dtype="uint8", serializer=JpegCodec(quality=quality), compressors=None, fill_value=255,
    )
    parts = np.array_split(np.arange(len(coords)), workers)
    t = time.perf_counter()
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(_naive_worker, [(str(path), str(store), p, coords[p], tile_px) for p in parts])
    return time.perf_counter() - t


# --------------------------------------------------------------------------- floor


def _floor_worker(args):
    path, dims, src_tiles, tile_store, tile_idx, quality = args
    import imagecodecs

    from wsi.fastread import decode_source_tiles
    from wsi.store import TileStore

    t = time.perf_counter()
    decode_source_tiles(path, dims, src_tiles)
    decode_s = time.perf_counter() - t
    store = TileStore(tile_store)
    encode_s = 0.0
    for start in range(0, len(tile_idx), 64):
        tiles = store.read(tile_idx[start : start + 64])  # untimed: just to have real pixels
        t = time.perf_counter()
        for tile in tiles:
            imagecodecs.jpeg8_encode(tile, level=quality)
        encode_s += time.perf_counter() - t
    return decode_s, encode_s


def run_floor(path: Path, coords: np.ndarray, tile_px: int, workers: int, ref_store: Path, quality: int):
    import openslide

    from wsi.fastread import TiffLevelReader, touched_source_tiles

    with openslide.OpenSlide(str(path)) as s:
        dims = s.level_dimensions[0]
    with TiffLevelReader.open(path, dims) as r:
        tshape = r.tile_shape
    touched = sorted(touched_source_tiles([(int(x), int(y), tile_px, tile_px) for x, y in coords], tshape, (dims[1], dims[0])))
    src_parts = [touched[i::workers] for i in range(workers)]
    tile_parts = np.array_split(np.arange(len(coords)), workers)
    with mp.get_context("spawn").Pool(workers) as pool:
        res = pool.map(
            _floor_worker,
            [(str(path), dims, src_parts[i], str(ref_store), tile_parts[i], quality) for i in range(workers)],
        )
    return max(d + e for d, e in res), len(touched), res


# --------------------------------------------------------------------------- main


def _project_run(slide: Path, out: Path, workers: int, codec: str, processes: bool = False, rss=None):
    from pipeline.config import load_config
    from pipeline.tile import run_tile
    from wsi.store import TileStore

    shutil.rmtree(out, ignore_errors=True)
    c = load_config(None, {"runtime.workers": workers, "runtime.processes": processes, "store.codec": codec})
    with rss if rss is not None else contextlib.nullcontext():
        t = time.perf_counter()
        rep = run_tile([slide], out, c, workers=workers, quiet=True, progress=False)
        secs = time.perf_counter() - t
    assert rep.ok, rep.summary()
    store = TileStore(out / f"{slide.stem}.zarr")
    fixed = rep.settings.get("executor_start_s", 0.0) + rep.settings.get("executor_stop_s", 0.0)
    return {"secs": secs, "fixed": fixed, "n": len(store), "bpt": store.attrs["bytes_per_tile"],
            "peak": rss.peak if rss is not None else float("nan"), "store": store,
            "timings": store.attrs.get("timings", {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-px", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3,
                    help="project and floor runs, interleaved; medians are reported (default 3)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--skip-processes", action="store_true", help="leave out the --processes (Dask LocalCluster) runs")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from pipeline.config import load_config

    slide = make_slide(args.out, args.size_px, args.seed)
    q = load_config(None).store.jpeg_quality
    src_mb = slide.stat().st_size / 1e6

    zs = _project_run(slide, args.out / "stores_zstd", args.workers, "zstd")  # also the floor's pixels
    coords = zs["store"].coords
    n = zs["n"]
    mp_px = n * 512 * 512 / 1e6
    proj, procs, floor = [], [], []
    for _ in range(max(1, args.repeat)):
        proj.append(_project_run(slide, args.out / "stores_jpeg", args.workers, "jpeg"))
        if not args.skip_processes:
            procs.append(_project_run(slide, args.out / "stores_procs", args.workers, "jpeg", processes=True))
        t_floor, n_src, parts = run_floor(slide, coords, 512, args.workers, zs["store"].path, q)
        floor.append((t_floor, parts))
    t_naive = None if args.skip_naive else run_naive(slide, coords, 512, args.workers, args.out, q)

    # Memory: one more run of each, untimed (see the module docstring).
    peaks = {}
    for key, kw in (("jpeg", {}), ("zstd", {"codec": "zstd"}), ("procs", {"processes": True})):
        if key == "procs" and args.skip_processes:
            continue
        rss = PeakRSS()
        _project_run(slide, args.out / f"stores_{key}", args.workers, kw.get("codec", "jpeg"),
                     processes=kw.get("processes", False), rss=rss)
        peaks[key] = rss.peak
    with PeakRSS() as rss:
        run_floor(slide, coords, 512, args.workers, zs["store"].path, q)
    peaks["floor"] = rss.peak

    med = lambda xs: float(np.median(xs))  # noqa: E731
    t_proj = med([p["secs"] for p in proj])
    t_floor = med([f[0] for f in floor])
    p0 = proj[0]
    nan = float("nan")
    rows = [("project tile, %d threads (jpeg q%d)" % (args.workers, q), t_proj, peaks["jpeg"], p0["bpt"])]
    if procs:
        t_procs = med([p["secs"] for p in procs])
        t_fixed = med([p["fixed"] for p in procs])
        t_work = med([p["secs"] - p["fixed"] for p in procs])
        rows += [
            ("  --processes (Dask LocalCluster)", t_procs, peaks["procs"], procs[0]["bpt"]),
            ("  --processes less cluster start/stop", t_work, nan, procs[0]["bpt"]),
        ]
    rows.append(("project tile, threads (zstd)", zs["secs"], peaks["zstd"], zs["bpt"]))
    if t_naive is not None:
        naive_bpt = sum(f.stat().st_size for f in (args.out / "naive.zarr").rglob("*") if f.is_file()) / n
        rows.append(("naive read_region loop", t_naive, nan, naive_bpt))
    rows.append(("floor (decode + encode)", t_floor, peaks["floor"], nan))

    print()
    print(f"slide {slide.name}: {args.size_px} x {args.size_px} px, {src_mb:.0f} MB, {n} tissue tiles of 512 px "
          f"(stride 384), {n_src} source tiles touched, {args.workers} workers, {os.cpu_count()} cores; "
          f"project and floor: median of {len(proj)} interleaved runs")
    print(f"{'':38s} {'seconds':>8s} {'tiles/s':>8s} {'MP/s':>7s} {'peak RSS':>9s} {'bytes/tile':>11s}")
    for name, secs, pk, b in rows:
        bs = f"{b:11.0f}" if b == b else f"{'-':>11s}"
        ps = f"{pk / 1e9:7.2f}GB" if pk == pk else f"{'-':>9s}"
        print(f"{name:38s} {secs:8.2f} {n / secs:8.1f} {mp_px / secs:7.1f} {ps} {bs}")
    print(f"project runs (s): {[round(p['secs'], 2) for p in proj]}")
    if procs:
        print(f"--processes runs (s): {[round(p['secs'], 2) for p in procs]}, "
              f"cluster start+stop {[round(p['fixed'], 2) for p in procs]}")
    print(f"floor runs (s): {[round(f[0], 2) for f in floor]}; split per worker (decode s, encode s) in the first: "
          f"{[(round(d, 2), round(e, 2)) for d, e in floor[0][1]]}")
    print(f"project stage timings (first run, s): {p0['timings']}")
    if t_naive is not None:
        print(f"project / naive speed: {t_naive / t_proj:.2f}x   (target >= 1.6x)")
    print(f"project time / floor time: {t_proj / t_floor:.2f}x end to end   (target <= 1.3x)")
    if procs:
        print(f"  --processes: {t_procs / t_floor:.2f}x end to end, {t_work / t_floor:.2f}x less the "
              f"{t_fixed:.2f} s LocalCluster start-up and shut-down")
    print(f"store size / source size: jpeg {p0['bpt'] * n / 1e6 / src_mb:.2f}x, zstd {zs['bpt'] * n / 1e6 / src_mb:.2f}x")


if __name__ == "__main__":
    main()
