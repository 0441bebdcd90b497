"""EM benchmark: is the E-step starved by I/O? And the three training modes side by side.

E-step throughput (default)
---------------------------
On the same tiles, measures

* ``e-step``   the E-step's prediction pass exactly as ``em-round`` runs it
               (:func:`pipeline.em.write_probmaps`): tiles read lazily from the
               Zarr stores by a DataLoader, theta1 forward, probability maps and
               tile maxima written to a sharded Zarr;
* ``forward``  theta1's bare forward pass (same batch size, same threads, same
               sigmoid and float16 cast) on the same tiles already in memory
               as a uint8 tensor.

and prints tiles/s side by side with their ratio (target >= 0.8), once per
``--loader-workers`` value. A small generated cohort is used (and cached in
``bench-out/``) unless ``--stores`` is given.

Three-mode comparison (``--compare``)
-------------------------------------
Runs ``em-round`` in ``mixed`` (``--rounds``), ``pixel`` and ``image`` mode on
a generated cohort with lesions (train / val / test split), classifies the test
slides, then prints and writes ``bench-out/em-compare-<cohort>-<config>/comparison.md``
(one folder per cohort and settings, so runs on another cohort never resume these):
test AUC, specificity at 100 % sensitivity, pixel Dice, the chosen round, where
theta1 fires (realistic cohorts) and minutes.

Usage::

    python bench/em_bench.py                          # tiny config, 2 CPU cores
    python bench/em_bench.py --config default --tiles 256
    python bench/em_bench.py --compare --rounds 2
    python bench/em_bench.py --compare --cohort realistic --positives 20 --negatives 20 --annotate 4 \\
        --seeds 3 --config cpu --ablate no_hard_negative_top_up full_slide_annotations hed_jitter t_from_negatives_and_cap
    python bench/em_bench.py --compare --cohort realistic --positives 20 --negatives 20 --annotate 8 \\
        --config cpu --rounds 5 --modes mixed --trainers cellmix scorenet scorenet_scoremix
    python bench/em_bench.py --compare --cohort realistic --positives 20 --negatives 20 --annotate 8 \\
        --config cpu --rounds 5 --seeds 3 --holdout 20 --holdout-seed 2000003 --per-round --ablate theta2_random

``--holdout N`` scores every run on 2N more held-out slides generated from another cohort seed (eight test
slides give an AUC in steps of 1/16). A row whose theta1 settings match a finished run of another row (same
mode and seed) takes that run's theta1 (``em-round --theta1-from``) and trains stage 2 only; its minutes are
then marked †.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "bench-out"


def make_cohort(out: Path, n_pos: int, n_neg: int, size_px: int, mpp: float, seed: int, annotate: int,
                split=(0.5, 0.5, 0.0)) -> Path:
    """Generate and tile a cohort once (cached by its parameters)."""
    from pipeline.config import load_config
    from pipeline.tile import run_tile
    from wsi.synth import make_cohort as synth

    d = out / f"cohort-p{n_pos}-n{n_neg}-s{size_px}-m{mpp:g}-seed{seed}-a{annotate}"
    if (d / "READY").is_file():
        return d
    shutil.rmtree(d, ignore_errors=True)
    print(f"generating {n_pos + n_neg} slides into {d} ...", flush=True)
    synth(d / "cohort", n_positive=n_pos, n_negative=n_neg, width_px=size_px, height_px=size_px, mpp=mpp,
          seed=seed, annotate=annotate, split=split)
    cfg = load_config("tiny")
    run_tile(sorted((d / "cohort").glob("*.tif")), d / "stores", cfg, workers=0, quiet=True, progress=False)
    (d / "READY").write_text("ok\n")
    return d


def bench_estep(args) -> None:
    import torch

    from pipeline.config import load_config
    from pipeline.probmaps import write_probmaps
    from pipeline.inference import _seg_probs, resolve_device
    from pipeline.run import build_model
    from pipeline.labels import SlideEntry
    from wsi.store import TileStore, list_stores

    cfg = load_config(args.config)
    if args.stores:
        stores = Path(args.stores)
    else:
        stores = make_cohort(OUT, args.positives, args.negatives, 1024, 2.0, args.seed, args.annotate) / "stores"
    paths = list_stores(stores)
    if not paths:
        sys.exit(f"{stores}: no tile stores")
    # the same tiles for both: whole slides until --tiles is reached
    slides, n = [], 0
    for p in paths:
        st = TileStore(p)
        if n >= args.tiles:
            break
        slides.append(SlideEntry(p.name[:-5], 0, "train", p, len(st)))
        n += len(st)
    threads = args.threads if args.threads is not None else (cfg.runtime.torch_threads or torch.get_num_threads())
    torch.set_num_threads(threads)
    device = resolve_device(cfg.runtime.device)
    torch.manual_seed(0)
    model = build_model(cfg.model.seg_arch, {"num_classes": 1}).to(device).eval()
    bs, stride = cfg.em.predict_batch_size, cfg.model.map_stride_px
    tile_px = TileStore(slides[0].store_path).tile_px
    print(f"model {cfg.model.seg_arch}, {n} tiles of {tile_px} px in {len(slides)} slides, batch {bs}, "
          f"torch threads {threads}, device {device}")

    # bare forward on the tiles in memory
    tiles = torch.from_numpy(np.concatenate([TileStore(s.store_path)[:] for s in slides]))

    def forward_once() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for a in range(0, len(tiles), bs):
                x = tiles[a : a + bs].to(device).permute(0, 3, 1, 2).float().div_(255.0)
                p = _seg_probs(model, x, stride).to(torch.float16)
                p.amax(dim=(1, 2)).float().cpu().numpy()
                p.cpu().numpy()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return len(tiles) / (time.perf_counter() - t0)

    def estep_once(w: int, r: int) -> float:
        out = OUT / "em-bench" / f"probmaps-w{w}-{r}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        write_probmaps(model, slides, out, tile_px=tile_px, map_stride_px=stride, batch_size=bs, device=device,
                       loader_workers=w, amp=cfg.runtime.amp)
        rate = n / (time.perf_counter() - t0)
        shutil.rmtree(out, ignore_errors=True)
        return rate

    forward_once()  # warm-up
    # interleaved, best of --repeat: other load on the machine hits both alike
    fwd = 0.0
    best = {w: 0.0 for w in args.loader_workers}
    for r in range(args.repeat):
        fwd = max(fwd, forward_once())
        for w in args.loader_workers:
            best[w] = max(best[w], estep_once(w, r))
    rows = list(best.items())
    print(f"\n{'loader workers':>14} {'e-step tiles/s':>15} {'forward tiles/s':>16} {'ratio':>6}")
    for w, e in rows:
        print(f"{w:>14} {e:>15.1f} {fwd:>16.1f} {e / fwd:>6.2f}")


ABLATIONS = {
    # issue #10 items, each switched off (or on) against the mixed run with the config as given
    "no_hard_negative_top_up": {"em.hard_negative_top_up": False},
    # item 2 off: the annotator's files read without their Region* rectangles, i.e. as whole-slide annotations,
    # so the annotated slides' lesions outside the rectangles become exact negatives
    "full_slide_annotations": {"em.annotated_region_classes": []},
    "hed_jitter": {"em.hed_scale": 0.3, "em.hed_shift": 0.05},
    "t_from_negatives_and_cap": {"em.threshold_mode": "negative_fpr", "em.max_positive_tiles_per_slide": 0.1},
    # item 4: theta2 started from the round's theta1 trunk rather than at random (stage 2 only: theta1 is copied)
    "theta2_from_theta1": {"stage2.init": "theta1"},
    "theta2_random": {"stage2.init": "random"},
    # the paper's K = 16 tiles per slide for theta2 (the CPU preset takes 8)
    "top_k_16": {"stage2.top_k": 16},
}

#: issue #12: the patch-level trainers in the loop, each against the mixed run with the config as given
_CELLMIX = {"model.seg_mix": [{"name": "cellmix", "p": 0.5, "strategy": "group", "drive": "hold", "T0": "auto"}]}
_SCORENET = {"model.cls_arch": "scorenet_tiny"}
_SCOREMIX = {"model.cls_mix": [{"name": "scoremix", "p": 0.5}]}
TRAINER_VARIANTS = {
    "cellmix": _CELLMIX,
    "scorenet": _SCORENET,
    "scorenet_scoremix": {**_SCORENET, **_SCOREMIX},
    "cellmix_scorenet": {**_CELLMIX, **_SCORENET},
    "cellmix_scorenet_scoremix": {**_CELLMIX, **_SCORENET, **_SCOREMIX},
}


def theta1_source(base: Path, cfg, seed: int, own: Path) -> Path | None:
    """A finished run of the same mode, seed and theta1 settings as ``cfg`` in another row's folder, whose
    theta1 this row can take (``em-round --theta1-from``: bit for bit the theta1 it would train,
    tests/test_em.py): the row then costs stage 2 only. Runs that trained their own theta1 come first, then
    the one whose settings differ least from ``cfg``. None: train theta1 (no such run)."""
    import json

    from pipeline.reuse import THETA2_ONLY
    from pipeline.run import config_diff

    found, new = [], cfg.to_dict()
    for rec in sorted(base.glob(f"{cfg.em.mode}*/seed{seed}/run/run.json")):
        if rec.parent.resolve() == own.resolve():
            continue
        meta = json.loads(rec.read_text())
        if meta.get("mode") == cfg.em.mode and not config_diff(meta.get("config") or {}, new, ignore=THETA2_ONLY):
            found.append((meta.get("theta1_from") is not None, len(config_diff(meta["config"], new)), rec.parent))
    return min(found)[-1] if found else None


def _realistic_cohort(n_pos: int, n_neg: int, annotate: int, seed: int, config: str, overrides=None, *,
                      holdout: bool = False) -> Path:
    """Generate (once) a realistic cohort and tile it with ``config``'s tiling settings (and ``--set``).
    ``holdout``: every slide in the test split (test-kind lesions), for :func:`holdout_cohort`."""
    from pipeline.config import load_config
    from pipeline.tile import run_tile
    from wsi.synth import make_cohort as synth

    cfg = load_config(config, overrides)
    kind = "holdout" if holdout else "realistic"
    d = OUT / f"{kind}-p{n_pos}-n{n_neg}-a{annotate}-seed{seed}-{cfg.tiling_hash()}"
    if (d / "READY").is_file():
        return d
    shutil.rmtree(d, ignore_errors=True)
    print(f"generating a {kind} cohort of {n_pos + n_neg} slides into {d} ...", flush=True)
    synth(d / "cohort", n_positive=n_pos, n_negative=n_neg, width_px=4096, height_px=4096, mpp=0.5, seed=seed,
          annotate=annotate, difficulty="realistic", split={"test": 1.0} if holdout else (0.6, 0.2, 0.2))
    run_tile(sorted((d / "cohort").glob("*.tif")), d / "stores", cfg, workers=2, quiet=True, progress=False)
    (d / "READY").write_text("ok\n")
    return d


#: the held-out cohort's seed is the training cohort's plus this, so no slide of it is a training slide's twin
HOLDOUT_SEED_OFFSET = 1_000_003


def holdout_cohort(args) -> Path | None:
    """``--holdout N``: N positive and N negative slides more, generated like the realistic cohort from another
    seed and all in its test split (lesions of the held-out kind). Eight test slides give a slide AUC in steps
    of 1/16 and a specificity in steps of 1/4, too coarse to tell 0.875 from 0.9; no run trains or chooses
    anything on these, they only score the runs' chosen rounds."""
    from pipeline.config import parse_set_options

    if not args.holdout:
        return None
    if args.cohort != "realistic":
        sys.exit("--holdout needs --cohort realistic (its slides are generated like the realistic cohort's)")
    seed = args.seed + HOLDOUT_SEED_OFFSET if args.holdout_seed is None else args.holdout_seed
    if seed == args.seed:
        sys.exit("--holdout-seed must differ from --seed (the training cohort's)")
    return _realistic_cohort(args.holdout, args.holdout, 0, seed, args.config, parse_set_options(args.set),
                             holdout=True)


def classified_once(stores: Path, run: Path, rnd: int, out: Path) -> Path:
    """``predictions.csv`` of round ``rnd`` of ``run`` on ``stores``, classified into ``out`` unless it is there
    and newer than the round's models (a run trained again in the same folder is classified again)."""
    from pipeline.classify import run_classify

    pred = out / "predictions.csv"
    models = [run / f"round_{rnd}" / f for f in ("seg.pt", "cls.pt")]
    if not pred.is_file() or any(m.stat().st_mtime_ns > pred.stat().st_mtime_ns for m in models):
        shutil.rmtree(out, ignore_errors=True)
        run_classify(stores, run, out, round_=rnd, threshold=0.5, quiet=True, progress=False)
    return pred


def score_holdout(h: Path, run: Path, rnd: int, out: Path, cfg) -> dict:
    """Round ``rnd`` of ``run`` on the held-out cohort ``h`` (classified once into ``out``)."""
    from pipeline.evaluate import run_evaluate

    pred = classified_once(h / "stores", run, rnd, out)
    ev = run_evaluate(pred, h / "cohort" / "labels.csv", split="test", config=cfg, out_dir=out)
    return {"holdout_auc": ev.get("auc"),
            "holdout_spec100": (ev.get("at_full_sensitivity") or {}).get("specificity"),
            "holdout_auc_theta1_max": theta1_max_auc(pred, ev)}


def _test_stores(d: Path) -> Path:
    """A folder of links to the test-split stores (classify scores a folder of stores)."""
    t = d / "test-stores"
    if not t.is_dir():
        t.mkdir()
        for line in (d / "cohort" / "labels.csv").read_text().splitlines()[1:]:
            sid, _, split = line.split(",")[:3]
            if split == "test":
                (t / f"{sid}.zarr").symlink_to(d / "stores" / f"{sid}.zarr")
    return t


def _one(d: Path, mode: str, cfg, ann: list, rounds: int, out: Path, fresh: bool, *, run: Path | None = None,
         round_: int | None = None, theta1_from: Path | None = None, holdout: Path | None = None) -> dict:
    """Train one run on train/val (or reuse ``run``), classify the held-out test slides with its chosen round (or
    round ``round_``), evaluate them (slides and pixels); the same on the ``holdout`` cohort when given."""
    from pipeline.classify import run_classify
    from pipeline.em import run_em
    from pipeline.evaluate import run_evaluate

    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    run = run or out / "run"
    summary = run_em(d / "stores", d / "cohort" / "labels.csv", run, cfg,
                     annotations=ann if mode != "image" else (), rounds=rounds, progress=False, theta1_from=theta1_from)
    rnd = summary["best_round"] if round_ is None else round_
    # the rounds' own recorded times, so a run resumed with more --rounds counts its earlier rounds too
    times = {int(k): ((m or {}).get("time_s") or {}).get("total", 0.0) for k, m in summary["rounds"].items()}
    minutes = sum(t for k, t in times.items() if round_ is None or k <= round_) / 60
    run_classify(_test_stores(d), run, out / "classified", round_=rnd, threshold=0.5, quiet=True, progress=False)
    ev = run_evaluate(out / "classified" / "predictions.csv", d / "cohort" / "labels.csv", split="test",
                      masks=[d / "cohort" / "annotations"], config=cfg, out_dir=out / "classified")
    px = ev.get("pixel") or {}
    rates = {}
    if (d / "cohort" / "cohort.json").is_file():
        done = sorted(int(p.name.split("_")[1]) for p in run.glob("round_*") if (p / "DONE").is_file())
        for r in [r for r in done if round_ is None or r == round_]:
            rates[r] = tile_hit_rates(d, run, r)
            print(f"  round {r}: theta1 flags (max >= 0.5) "
                  + ", ".join(f"{k} {v:.1%}" for k, v in rates[r].items()) + " of train/val tiles", flush=True)
    best = rates.get(rnd) or {}
    tiles = test_tile_aucs(d, out / "classified") if rates else {}
    if tiles:
        print("  held-out test tiles, lesion AUC against: " + ", ".join(f"{k} {v:.3f}" for k, v in tiles.items()),
              flush=True)
    held = score_holdout(holdout, run, rnd, out / f"{holdout.name}-r{rnd}", cfg) if holdout else {}
    return {"lesion_vs_normal": (best.get("lesion"), best.get("normal")), "test_tile_auc": tiles.get("all"),
            "test_auc": ev.get("auc"), "test_spec100": (ev.get("at_full_sensitivity") or {}).get("specificity"),
            "test_dice": px.get("mean_dice_positive_slides"), "best_round": rnd, "minutes": minutes,
            "theta1_copied": theta1_from is not None, **held}


def _tile_kinds(d: Path, slide: dict, xy: np.ndarray, tile_level0_px: float) -> np.ndarray:
    """What each tile's centre lies on, from the cohort's ground truth: lesion, decoy, a confounder or normal tissue."""
    import shapely

    c = xy + tile_level0_px / 2
    kind = np.full(len(xy), "normal", dtype=object)
    for cf in slide["confounders"]:
        if "bbox_level0_px" in cf and cf["kind"] != "stain_patch":  # stain patches cover most of a slide
            x0, y0, x1, y1 = cf["bbox_level0_px"]
            kind[(c[:, 0] >= x0) & (c[:, 0] < x1) & (c[:, 1] >= y0) & (c[:, 1] < y1)] = "confounder"
    pts = shapely.points(c[:, 0], c[:, 1])
    for b in slide["blobs"]:  # a tile whose centre is within half a tile of a blob shows part of it
        kind[shapely.contains(shapely.Polygon(b["polygon_level0_px"]).buffer(tile_level0_px / 2), pts)] = b["kind"]
    return kind


def tile_hit_rates(d: Path, run: Path, rnd: int, cut: float = 0.5) -> dict:
    """Share of train/val tiles whose maximum theta1 probability in round ``rnd`` is >= ``cut``, per kind of
    tissue under them (realistic cohorts record the truth): a model that learned the lesions flags far more
    lesion than normal, decoy or confounder tiles; one that learned nothing flags them all alike."""
    import json

    import zarr

    from pipeline.probmaps import read_max_probs

    cohort = json.loads((d / "cohort" / "cohort.json").read_text())
    hits, total = {}, {}
    for slide in cohort["slides"]:
        if slide["split"] == "test":
            continue
        g = zarr.open_group(str(d / "stores" / f"{slide['slide_id']}.zarr"), mode="r")
        xy = np.asarray(g["coords"][:], np.float64)
        t = g.attrs["tiling"]
        size = float(t["tile_px"] * t["downsample"])  # level-0 px
        kind = _tile_kinds(d, slide, xy, size)
        flagged = read_max_probs(run / f"round_{rnd}" / "probmaps.zarr", slide["slide_id"]) >= cut
        for k in set(kind):
            sel = kind == k
            total[k] = total.get(k, 0) + int(sel.sum())
            hits[k] = hits.get(k, 0) + int((flagged & sel).sum())
    return {k: round(hits[k] / total[k], 3) for k in sorted(total) if total[k]}


def test_tile_aucs(d: Path, classified: Path) -> dict:
    """theta1 on every tile of the held-out test slides, read from what ``classify`` wrote into ``classified``
    (its QuPath detections carry each tile's theta1 maximum, rounded to 1e-4): the AUC of a tile's maximum for
    lesion tiles (of the kind no training slide has) against each other kind, and against all of them.
    Four test positives give a slide AUC in steps of 1/16; these thousands of tiles say whether theta1
    learned the lesions or only got lucky on a handful of slides."""
    import json

    import zarr

    from pipeline.metrics import roc_auc

    cohort = json.loads((d / "cohort" / "cohort.json").read_text())
    kinds, scores = [], []
    for s in (s for s in cohort["slides"] if s["split"] == "test"):
        t = zarr.open_group(str(d / "stores" / f"{s['slide_id']}.zarr"), mode="r").attrs["tiling"]
        feats = json.loads((classified / "detections" / f"{s['slide_id']}.geojson").read_text())["features"]
        xy = np.array([f["geometry"]["coordinates"][0][0] for f in feats], np.float64)
        kinds.append(_tile_kinds(d, s, xy, float(t["tile_px"] * t["downsample"])))
        scores.append(np.array([f["properties"]["measurements"]["theta1_max"] for f in feats], np.float64))
    p, k = np.concatenate(scores), np.concatenate(kinds)
    les = (k == "lesion").astype(np.int64)
    out = {"all": roc_auc(les, p)}
    for other in sorted(set(k) - {"lesion"}):
        sel = (k == "lesion") | (k == other)
        out[other] = roc_auc(les[sel], p[sel])
    return {key: round(float(v), 3) for key, v in out.items()}


def _fmt(vals) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    return f"{np.mean(vals):.3f} ± {np.std(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"


def _variant(args, d: Path, ann: list, base: Path, name: str, mode: str, extra: dict, seed: int,
             holdout: Path | None = None) -> dict:
    """One row's run of one seed. Pixel mode trains exactly round 0 of a mixed run (same seeds, same batches),
    so when mixed runs too, the pixel row classifies the mixed run's round 0 instead of training it again."""
    import json

    from pipeline.config import load_config, parse_set_options

    cfg = load_config(args.config, {**parse_set_options(args.set), **extra, "em.mode": mode, "em.seed": seed})
    out = base / name.replace(":", "-") / f"seed{seed}"
    if mode == "pixel" and "mixed" in args.modes:
        mixed = load_config(args.config, {**parse_set_options(args.set), "em.mode": "mixed", "em.seed": seed})
        run = base / "mixed" / f"seed{seed}" / "run"
        took = json.loads((run / "run.json").read_text()).get("theta1_from") if (run / "run.json").is_file() else None
        return _one(d, "mixed", mixed, ann, args.rounds, out, args.fresh, run=run, round_=0, holdout=holdout,
                    theta1_from=Path(took["run"]) if took else None)
    src = theta1_source(base, cfg, seed, out / "run") if mode != "pixel" and not args.fresh else None
    made = out / "run" / "run.json"
    if src is not None and made.is_file() and not json.loads(made.read_text()).get("theta1_from"):
        src = None  # made before --theta1-from existed, with its own (the same) theta1: resume it as it is
    if src is not None:
        print(f"{name} seed {seed}: theta1 from {src} (stage 2 only)", flush=True)
    return _one(d, mode, cfg, ann, args.image_rounds if mode == "image" else args.rounds, out, args.fresh,
                theta1_from=src, holdout=holdout)


def _classified_round(d: Path, run: Path, rnd: int, out: Path, cfg, done: dict) -> dict:
    """Round ``rnd`` of ``run`` on the held-out test slides: slide AUC and specificity at 100 % sensitivity.
    Classified into ``out`` unless ``done[rnd]`` already holds that round's predictions (the rows above)."""
    from pipeline.evaluate import run_evaluate

    pred = done.get(rnd)
    if pred is None or not pred.is_file():
        pred = classified_once(_test_stores(d), run, rnd, out)
    ev = run_evaluate(pred, d / "cohort" / "labels.csv", split="test", config=cfg, out_dir=out)
    return {"test_auc": ev.get("auc"), "test_spec100": (ev.get("at_full_sensitivity") or {}).get("specificity"),
            "test_auc_theta1_max": theta1_max_auc(pred, ev)}


def theta1_max_auc(pred: Path, ev: dict) -> float | None:
    """Test AUC of the slide score ``stage2.slide_score: theta1_max`` (theta1's highest tile), read from the
    top-K tiles ``classify`` lists, beside theta2's: issue #10 found theta1's maximum ranked held-out slides
    better than a data-starved theta2; is that still so after the fixes?"""
    import csv

    from pipeline.metrics import roc_auc

    labels = {sid: v["label"] for sid, v in (ev.get("slides") or {}).items()}
    rows = [r for r in csv.DictReader(pred.open()) if r["slide_id"] in labels and r.get("topk_theta1_max")]
    if not rows:
        return None
    score = [max(float(v) for v in r["topk_theta1_max"].split(";")) for r in rows]
    return float(roc_auc([labels[r["slide_id"]] for r in rows], score))


RULES = ("stage2_loss", "val_loss", "val_auc")


def per_round_table(args, d: Path, base: Path, h: Path | None = None) -> str:
    """Every round of every mixed seed on the held-out test slides, with the values each round-choice rule
    (``em.select_by``) reads and the round each rule picks among rounds 1.. (``em.select_rounds em``): is the
    paper's stage-2-loss rule the one to keep, and do the rounds improve on round 0 (the pixel-only model)?"""
    import json

    from pipeline.config import load_config, parse_set_options
    from pipeline.sampling import choose_round

    held_col = f" held-out AUC ({h.name}) |" if h else ""
    lines = ["| seed | round | stage-2 loss | val loss | val AUC | test AUC | spec. at 100 % sens. "
             "| test AUC of θ1's maximum |" + held_col + " chosen by |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if h else "") + "---|"]
    chosen = {r: [] for r in RULES}
    for seed in _seeds(args):
        run = base / "mixed" / f"seed{seed}" / "run"
        cfg = load_config(args.config, {**parse_set_options(args.set), "em.mode": "mixed", "em.seed": seed})
        meta = json.loads((run / "run.json").read_text())
        values = {int(k): v for k, v in meta["round_values"].items()}
        picks = {r: choose_round(values, r, [k for k in values if k >= 1])[0] for r in RULES}
        done = {0: base / "pixel" / f"seed{seed}" / "classified" / "predictions.csv",
                meta["best_round"]: run.parent / "classified" / "predictions.csv"}
        test = {k: _classified_round(d, run, k, run.parent / "rounds" / f"round_{k}", cfg, done) for k in sorted(values)}
        if h is not None:  # round 0 and the chosen round were scored by the rows above (pixel, mixed)
            for k in sorted(values):
                at = base / "pixel" / f"seed{seed}" if k == 0 and (base / "pixel").is_dir() else run.parent
                test[k].update(score_holdout(h, run, k, at / f"{h.name}-r{k}", cfg))
        for k in sorted(values):
            v = values[k]
            held = f" {_num(test[k].get('holdout_auc'))} |" if h else ""
            lines.append(f"| {seed} | {k} | {_num(v.get('stage2_loss'))} | {_num(v.get('val_loss'))} | "
                         f"{_num(v.get('val_auc'))} | {_num(test[k]['test_auc'])} | {_num(test[k]['test_spec100'])} | "
                         f"{_num(test[k]['test_auc_theta1_max'])} |{held} {', '.join(r for r in RULES if picks[r] == k)} |")
        for r in RULES:
            if picks[r] is not None:
                chosen[r].append(test[picks[r]])
    lines += ["", "| rule (em.select_by) | test AUC of the chosen round | specificity at 100 % sensitivity |"
              + (" held-out AUC |" if h else ""), "|---|---|---|" + ("---|" if h else "")]
    for r in RULES:
        held = f" {_fmt([t.get('holdout_auc') for t in chosen[r]])} |" if h else ""
        lines.append(f"| {r} | {_fmt([t['test_auc'] for t in chosen[r]])} | {_fmt([t['test_spec100'] for t in chosen[r]])} |"
                     + held)
    return "\n".join(lines)


def holdout_table(rows, h: Path, n: int) -> list:
    """The rows' chosen rounds on the ``--holdout`` cohort, per seed and mean ± sd."""
    lines = ["", f"The same runs' chosen rounds on {2 * n} more held-out slides ({h.name}: {n} positive, {n} negative, "
             "another cohort seed, lesions of the held-out kind; nothing was trained or chosen on them):", "",
             "| run | held-out AUC per seed | held-out AUC | specificity at 100 % sensitivity | AUC of θ1's maximum |",
             "|---|---|---|---|---|"]
    for name, per in rows:
        lines.append(f"| {name} | {' / '.join(_num(r.get('holdout_auc')) for r in per)} | "
                     f"{_fmt([r.get('holdout_auc') for r in per])} | {_fmt([r.get('holdout_spec100') for r in per])} | "
                     f"{_fmt([r.get('holdout_auc_theta1_max') for r in per])} |")
    return lines


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _seeds(args) -> range:
    """em.seed values of the comparison: --seeds of them from --first-seed."""
    return range(args.first_seed, args.first_seed + args.seeds)


def bench_compare(args) -> None:
    from pipeline.batch import setup_logging
    from pipeline.config import parse_set_options

    setup_logging(quiet=not args.verbose)
    if args.cohort == "realistic":
        d = _realistic_cohort(args.positives, args.negatives, args.annotate, args.seed, args.config,
                              parse_set_options(args.set))
        ann = [d / "cohort" / "region_annotations"]
    else:
        d = make_cohort(OUT, args.positives, args.negatives, 1024, 2.0, args.seed, args.annotate, split=(0.5, 0.25, 0.25))
        ann = [d / "cohort" / "annotations" / f"{sid}.geojson"
               for sid in (d / "cohort" / "pixel_annotated.txt").read_text().split()]
    tag = "-".join([Path(args.config).stem, *[x.replace("=", "") for x in args.set]])
    variants = ([(m, m, {}) for m in args.modes] + [(f"mixed:{a}", "mixed", ABLATIONS[a]) for a in args.ablate]
                + [(f"mixed:{t}", "mixed", TRAINER_VARIANTS[t]) for t in args.trainers])
    if args.scorenet_weights:  # ScoreNet as theta2, started from DINO weights (wsi-pipeline pretrain)
        variants.append(("mixed:scorenet_pretrained", "mixed",
                         {**_SCORENET, "model.cls_weights": str(Path(args.scorenet_weights).resolve())}))
    base = OUT / f"em-compare-{d.name}-{tag}"
    h = holdout_cohort(args)
    rows = []
    for name, mode, extra in variants:
        per = []
        for seed in _seeds(args):
            r = _variant(args, d, ann, base, name, mode, extra, seed, holdout=h)
            print(f"{name} seed {seed}: {r}", flush=True)
            per.append(r)
        rows.append((name, per))
    lines = [f"Cohort: {args.cohort} ({d.name}), config {args.config} {' '.join(args.set)}, {args.seeds} seed(s), "
             f"{args.rounds} round(s); test split, threshold-free metrics; mean ± sd over seeds.", "",
             "| run | test AUC | specificity at 100 % sensitivity | pixel Dice (positive slides) | test tile AUC "
             "| chosen round(s) | θ1 flags lesion / normal tiles | minutes |",
             "|---|---|---|---|---|---|---|---|"]
    for name, per in rows:
        lines.append(f"| {name} | {_fmt([r['test_auc'] for r in per])} | {_fmt([r['test_spec100'] for r in per])} | "
                     f"{_fmt([r['test_dice'] for r in per])} | {_fmt([r.get('test_tile_auc') for r in per])} | "
                     f"{', '.join(str(r['best_round']) for r in per)} | "
                     f"{_fmt([r['lesion_vs_normal'][0] for r in per])} / {_fmt([r['lesion_vs_normal'][1] for r in per])} | "
                     f"{_fmt([r['minutes'] for r in per])}{' †' if any(r['theta1_copied'] for r in per) else ''} |")
    if "pixel" in args.modes and "mixed" in args.modes:
        lines.append("\npixel: round 0 of the mixed run of the same seed (the pixel-only model; mode pixel trains "
                     "exactly this round), classified on its own.")
    if any(r["theta1_copied"] for _, per in rows for r in per):
        lines.append("\n†: theta1 copied from the run of the same seed and theta1 settings (em-round --theta1-from); "
                     "its minutes are stage 2's (and the copy's) only, on at least one seed.")
    if "image" in args.modes:
        lines.append(f"\nimage: {args.image_rounds} round(s) of top-K MIL (each MIL epoch ranks every training tile).")
    if h is not None:
        lines += holdout_table(rows, h, args.holdout)
    if args.per_round and "mixed" in args.modes:
        lines += ["", "Every round of the mixed runs on the test slides:", "", per_round_table(args, d, base, h)]
    table = "\n".join(lines)
    path = base / "comparison.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table + "\n")
    print("\n" + table + f"\n\nwritten: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--stores", default=None, help="Tile store folder (default: a generated cohort).")
    ap.add_argument("--tiles", type=int, default=1000, help="About this many tiles (whole slides).")
    ap.add_argument("--loader-workers", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: runtime.torch_threads).")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--compare", action="store_true", help="Run mixed / pixel / image mode and compare.")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--positives", type=int, default=10)
    ap.add_argument("--negatives", type=int, default=10)
    ap.add_argument("--annotate", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--fresh", action="store_true", help="Delete previous comparison runs first.")
    ap.add_argument("--cohort", choices=["easy", "realistic"], default="easy",
                    help="--compare on the easy cohort or the realistic one (synth --difficulty realistic).")
    ap.add_argument("--seeds", type=int, default=1, help="--compare: em.seed 0..N-1 per mode (mean ± sd).")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="--compare: em.seed of the first run (add seeds to a comparison without re-running the first).")
    ap.add_argument("--modes", nargs="+", default=["mixed", "pixel", "image"], choices=["mixed", "pixel", "image"],
                    help="--compare: modes, run in this order (pixel reuses round 0 of mixed when both are given).")
    ap.add_argument("--image-rounds", type=int, default=1,
                    help="--compare: rounds of image mode (each MIL epoch ranks every training tile; costly on CPU).")
    ap.add_argument("--ablate", nargs="*", default=[], choices=sorted(ABLATIONS),
                    help="--compare: also mixed runs with one issue-#10 measure switched (see ABLATIONS).")
    ap.add_argument("--trainers", nargs="*", default=[], choices=sorted(TRAINER_VARIANTS),
                    help="--compare: also mixed runs with an issue-#12 trainer (CellMix on theta1, ScoreNet as theta2, "
                         "ScoreNet + ScoreMix, and both; see TRAINER_VARIANTS). A variant of stage 2 only copies "
                         "theta1 from the run of the same seed and theta1 settings when it is there (--theta1-from), "
                         "so list those first (mixed, cellmix).")
    ap.add_argument("--scorenet-weights", default=None, metavar="FILE",
                    help="--compare: also a mixed run whose theta2 is scorenet_tiny started from FILE (e.g. its "
                         "scorer pre-trained with 'wsi-pipeline pretrain --method dino' on the train/val stores).")
    ap.add_argument("--holdout", type=int, default=0, metavar="N",
                    help="--compare, realistic cohort: also score every run's chosen round (and, with --per-round, "
                         "every round) on N positive and N negative slides more, generated once from another cohort "
                         "seed, all of the held-out lesion kind; nothing trains or chooses on them.")
    ap.add_argument("--holdout-seed", type=int, default=None, metavar="S",
                    help="--holdout: the held-out cohort's seed (default --seed + %d). Decide on one held-out "
                         "cohort, report on another." % HOLDOUT_SEED_OFFSET)
    ap.add_argument("--per-round", action="store_true",
                    help="--compare: also classify every round of the mixed runs on the test slides and show the "
                         "round each em.select_by rule picks.")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    if args.compare:
        bench_compare(args)
    else:
        bench_estep(args)


if __name__ == "__main__":
    main()
