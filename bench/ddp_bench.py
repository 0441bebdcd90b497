"""torchrun benchmark: one EM round and classify on 1 process vs N ranks, and where the time goes.

On a generated cohort (cached in ``bench-out/``, the one ``bench/em_bench.py`` makes) it runs,
each as a fresh command line, timed from outside:

* ``em-round`` (one round: round-0 training, E-step prediction of every train/val slide, stage 2,
  validation) -- in one process with ``runtime.torch_threads`` = 1 and = N, and under
  ``torchrun --nproc-per-node N`` with one thread per rank;
* ``classify`` of every store with that round, the same three ways.

For each it prints the wall time, the speed-up and scaling efficiency against one process with one
thread (speed-up / N) and against one process with N threads (the fair baseline on N cores), and the
time per step from the run's own records (``metrics.json`` ``time_s``: training, prediction, stage 2,
validation; the prediction time of each rank; for classify the per-slide scoring time), the rest
being process start-up (Python, torch, the process group) and whatever the steps do not record.
The table goes to stdout and, with the raw figures, to ``bench-out/ddp/ddp_bench.json``.

Usage::

    python bench/ddp_bench.py                      # tiny config, 2 ranks, the 20-slide cohort
    python bench/ddp_bench.py --ranks 4 --positives 20 --negatives 20
    python bench/ddp_bench.py --config cpu --set em.epochs_init=2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

OUT = ROOT / "bench-out"


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(args: list, ranks: int) -> float:
    """One command line of the CLI (under torchrun when ``ranks`` > 1); its wall time in seconds."""
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else []
    cmd = [sys.executable, *launch, "-m", "pipeline.cli", *(["--"] if ranks > 1 else []), *[str(a) for a in args]]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-4000:]}")
    return secs


def _variants(n: int) -> list[tuple[str, int, int]]:
    """(label, ranks, torch threads per process)."""
    return [("1 process, 1 thread", 1, 1), (f"1 process, {n} threads", 1, n), (f"{n} ranks x 1 thread", n, 1)]


def bench_em(cohort: Path, out: Path, args) -> list[dict]:
    rows = []
    for label, ranks, threads in _variants(args.ranks):
        run = out / f"run-r{ranks}-t{threads}"
        shutil.rmtree(run, ignore_errors=True)
        cmd = ["em-round", "--stores", cohort / "stores", "--labels", cohort / "cohort" / "labels.csv", "--run", run,
               "--config", args.config, "--rounds", 1, "--quiet", "--set", f"runtime.torch_threads={threads}"]
        for a in sorted((cohort / "cohort" / "annotations").glob("*.geojson")):
            cmd += ["--annotations", a]
        for s in args.set:
            cmd += ["--set", s]
        wall = _run(cmd, ranks)
        m = json.loads((run / "round_0" / "metrics.json").read_text())
        t = m["time_s"]
        steps = {"train theta1": t.get("round0_train", 0.0) + t.get("m_step", 0.0), "predict (E-step maps)": t["predict"],
                 "stage 2": t["stage2"], "validation": t.get("validation", 0.0), "heatmaps": t.get("heatmaps", 0.0)}
        rows.append({"command": "em-round", "variant": label, "ranks": ranks, "threads": threads, "wall_s": wall,
                     "steps_s": steps, "startup_and_other_s": wall - sum(steps.values()),
                     "predict_ranks": (m.get("predict") or {}).get("ranks"), "run": str(run),
                     "stage2_loss": m.get("stage2_loss"), "val_auc": (m.get("val") or {}).get("auc")})
        print(f"  em-round, {label}: {wall:.1f} s", flush=True)
    return rows


def bench_classify(cohort: Path, out: Path, run: Path, args) -> list[dict]:
    rows = []
    for label, ranks, threads in _variants(args.ranks):
        res = out / f"classify-r{ranks}-t{threads}"
        shutil.rmtree(res, ignore_errors=True)
        env_threads = {"OMP_NUM_THREADS": str(threads)}
        os.environ.update(env_threads)  # classify takes its threads from the environment (torch's default)
        wall = _run(["classify", cohort / "stores", "--run", run, "--out", res, "--threshold", 0.5, "--quiet"], ranks)
        rep = json.loads((res / "classify-report.json").read_text())
        scoring = sum(s["seconds"] for s in rep["slides"])
        rows.append({"command": "classify", "variant": label, "ranks": ranks, "threads": threads, "wall_s": wall,
                     "steps_s": {"scoring (sum over slides)": scoring, "scoring per rank (wall)": scoring / ranks},
                     "startup_and_other_s": wall - scoring / ranks, "slides": len(rep["slides"])})
        print(f"  classify, {label}: {wall:.1f} s", flush=True)
    os.environ.pop("OMP_NUM_THREADS", None)
    return rows


def _table(rows: list[dict], n: int) -> str:
    lines = ["| command | run | wall s | speed-up vs 1x1 | efficiency vs 1x1 | speed-up vs 1x" f"{n} | where the time goes (s) |",
             "|---|---|---|---|---|---|---|"]
    for cmd in ("em-round", "classify"):
        rs = [r for r in rows if r["command"] == cmd]
        base1, basen = rs[0]["wall_s"], rs[1]["wall_s"]
        for r in rs:
            s = base1 / r["wall_s"]
            steps = ", ".join(f"{k} {v:.1f}" for k, v in r["steps_s"].items())
            steps += f", start-up and the rest {r['startup_and_other_s']:.1f}"
            if r.get("predict_ranks"):
                steps += "; E-step per rank " + " / ".join(f"{p['seconds']:.1f} ({p['tiles']} tiles)"
                                                         for p in r["predict_ranks"])
            lines.append(f"| {cmd} | {r['variant']} | {r['wall_s']:.1f} | {s:.2f} | {s / r['ranks']:.2f} | "
                         f"{basen / r['wall_s']:.2f} | {steps} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    from em_bench import make_cohort

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--config", default="tiny")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra em-round --set")
    p.add_argument("--positives", type=int, default=10)
    p.add_argument("--negatives", type=int, default=10)
    p.add_argument("--annotate", type=int, default=2)
    p.add_argument("--seed", type=int, default=3)
    args = p.parse_args(argv)
    cohort = make_cohort(OUT, args.positives, args.negatives, 1024, 2.0, args.seed, args.annotate)
    out = OUT / "ddp"
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    print(f"cohort {cohort} ({args.positives + args.negatives} slides), {os.cpu_count()} cores, load {load:.1f}",
          flush=True)
    rows = bench_em(cohort, out, args)
    rows += bench_classify(cohort, out, Path(rows[0]["run"]), args)
    table = _table(rows, args.ranks)
    print(table)
    (out / "ddp_bench.json").write_text(json.dumps({"rows": rows, "table": table, "load_before": load,
                                                    "load_after": os.getloadavg()[0], "cores": os.cpu_count()},
                                                   indent=1))


if __name__ == "__main__":
    main()
