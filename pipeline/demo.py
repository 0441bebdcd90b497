"""The end-to-end demo: synthetic cohort -> tile -> em-round x2 -> classify -> evaluate.

Everything runs with ``configs/tiny.yaml`` so it finishes in a few minutes on
2 CPU cores. Each step is the same function the corresponding command runs,
and each is idempotent: running the demo again reuses what is already there.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from pipeline.batch import UsageError, progress_bar
from wsi.atomic import atomic_write_json, atomic_write_text
from pipeline.config import Config
from pipeline.run import RunDir

log = logging.getLogger("wsi_pipeline")


def run_demo(
    out_dir: str | Path,
    config: Config,
    *,
    n_positive: int = 12,
    n_negative: int = 12,
    size_px: int = 4096,
    annotated: int = 2,
    rounds: int = 2,
    seed: int = 0,
    workers: int | None = None,
    quiet: bool = False,
) -> dict:
    """Run every stage on a generated cohort in ``out_dir``; returns the headline numbers.

    Layout: ``cohort/`` (slides, labels.csv, annotations), ``stores/`` (tiles),
    ``run/`` (EM rounds, trained on the train split, thresholded on val),
    ``classified/`` (predictions.csv, report.html, heatmaps) for the held-out
    test-split slides, and ``demo-summary.json``.
    """
    from pipeline.classify import run_classify
    from pipeline.em import run_em
    from pipeline.evaluate import run_evaluate
    from pipeline.tile import run_tile
    from wsi.synth import make_cohort

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    cohort = out / "cohort"
    params = dict(n_positive=n_positive, n_negative=n_negative, width_px=size_px, height_px=size_px,
                  mpp=0.5, seed=seed, annotate=annotated)

    t = time.perf_counter()
    stamp = cohort / "demo-params.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == params):
        log.info("generating %d synthetic slides (%d px, 0.5 um/px) in %s", n_positive + n_negative, size_px, cohort)
        with progress_bar(n_positive + n_negative, "synth", "slide", not quiet) as bar:
            make_cohort(cohort, **params, on_slide=lambda _: bar.update(1))
        atomic_write_text(stamp, json.dumps(params))
    else:
        log.info("reusing the cohort in %s", cohort)
    timings["cohort_s"] = time.perf_counter() - t

    labels = cohort / "labels.csv"
    splits = {}
    for line in labels.read_text().splitlines()[1:]:
        sid, _, split = line.split(",")
        splits[sid] = split
    train_val = [cohort / f"{sid}.tif" for sid, sp in sorted(splits.items()) if sp in ("train", "val")]
    test = [cohort / f"{sid}.tif" for sid, sp in sorted(splits.items()) if sp == "test"]
    annotated_ids = (cohort / "pixel_annotated.txt").read_text().split()
    annotations = [cohort / "annotations" / f"{sid}.geojson" for sid in annotated_ids]

    t = time.perf_counter()
    # Every labelled slide gets a store (the labels CSV lists them all); training uses
    # only the train and val splits, and the test slides are classified afresh below.
    rep = run_tile(train_val + test, out / "stores", config, workers=workers, quiet=quiet)
    if not rep.ok:
        raise UsageError(f"tiling failed: {rep.summary()}")
    timings["tile_s"] = time.perf_counter() - t

    t = time.perf_counter()
    run_em(out / "stores", labels, out / "run", config, annotations=annotations, rounds=rounds, progress=not quiet)
    timings["em_s"] = time.perf_counter() - t

    t = time.perf_counter()
    test_list = out / "test-slides.txt"
    atomic_write_text(test_list, "".join(f"{p.resolve()}\n" for p in test))
    crep = run_classify(test_list, out / "run", out / "classified", workers=workers, quiet=quiet)
    if not crep.ok:
        raise UsageError(f"classify failed: {crep.summary()}")
    timings["classify_s"] = time.perf_counter() - t

    ev = run_evaluate(out / "classified" / "predictions.csv", labels, split="test",
                      masks=[cohort / "annotations"], config=config)
    run = RunDir(out / "run")
    run_meta = run.read_meta()
    best = run.resolve_round("best", run_meta)
    val = run.metrics(best).get("val") or {}
    summary = {
        "report": str((out / "classified" / "report.html").resolve()),
        "best_round": best,
        "round_losses": run_meta.get("round_losses"),
        "val": val,
        "test": ev,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    atomic_write_json(out / "demo-summary.json", summary)
    return summary
