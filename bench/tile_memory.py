"""Peak memory of `tile` on a large slide (this process's high-water mark; worker processes, if any, sampled every 50 ms).

    python bench/tile_memory.py --size-px 50000      # target: peak RSS < 2 GB
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    from tile_bench import PeakRSS, make_slide

    from pipeline.config import load_config
    from pipeline.tile import run_tile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-px", type=int, default=50000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    slide = make_slide(args.out, args.size_px, seed=7)
    out = args.out / "stores_memory"
    shutil.rmtree(out, ignore_errors=True)
    with PeakRSS() as rss:
        t = time.perf_counter()
        rep = run_tile([slide], out, load_config(None), workers=args.workers, quiet=True, progress=False)
        secs = time.perf_counter() - t
    assert rep.ok, rep.summary()
    n = rep.slides[0].details["n_tiles"]
    print(f"{slide.name}: {args.size_px} x {args.size_px} px, {slide.stat().st_size / 1e6:.0f} MB, "
          f"{n} tiles in {secs:.1f} s ({n / secs:.0f} tiles/s), {args.workers} workers, "
          f"peak RSS {rss.peak / 1e9:.2f} GB   (target < 2 GB)")


if __name__ == "__main__":
    main()
