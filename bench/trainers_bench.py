"""train-patches on the generated patch set: dla34_cls_tiny and scorenet_tiny, each plain and with its
batch mixers (CellMix; ScoreMix needs ScoreNet's saliency), and ScoreNet with DINO pre-training of its
scorer; accuracy and macro-F1 (test split) over seeds, mean +- sd, seconds per epoch. The DINO row also
reports what pre-training did: the weighted k-NN accuracy of the val images on the scorer's features
before and after (``pretrain --probe``) and whether the teacher collapsed.

    PYTHONPATH=. python bench/trainers_bench.py [--seeds 3] [--epochs 30] [--out bench-out/trainers]

The same trainers inside the EM loop on the realistic cohort: ``bench/em_bench.py --compare --trainers``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.patches import run_train_patches  # noqa: E402
from pipeline.pretrain import run_pretrain  # noqa: E402
from wsi.synth import make_patch_set  # noqa: E402

CELLMIX = [{"name": "cellmix", "p": 0.5, "strategy": "group", "drive": "hold", "T0": "auto"}]
# (label, config overrides, DINO pre-training of the scorer first)
ROWS = [
    ("dla34_cls_tiny", {"model.cls_arch": "dla34_cls_tiny"}, False),
    ("dla34_cls_tiny + cellmix", {"model.cls_arch": "dla34_cls_tiny", "model.cls_mix": CELLMIX}, False),
    ("scorenet_tiny", {"model.cls_arch": "scorenet_tiny"}, False),
    ("scorenet_tiny + cellmix", {"model.cls_arch": "scorenet_tiny", "model.cls_mix": CELLMIX}, False),
    ("scorenet_tiny + scoremix", {"model.cls_arch": "scorenet_tiny",
                                  "model.cls_mix": [{"name": "scoremix", "p": 0.5}]}, False),
    ("scorenet_tiny + DINO scorer", {"model.cls_arch": "scorenet_tiny"}, True),
]


def _pretrain(a, data: Path, tiny: Path, seed: int) -> tuple[Path, dict]:
    w = a.out / f"dino_seed{seed}.pt"
    rec = run_pretrain(w, load_config(tiny, {"pretrain.seed": seed, "pretrain.epochs": a.pretrain_epochs,
                                             "runtime.torch_threads": 2}),
                       images=data / "train", probe=data, progress=False)
    if rec.get("skipped"):  # the probe ran when it was trained; read it back
        import torch

        rec = torch.load(w, weights_only=False)["pretrain"]
    return w, rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--pretrain-epochs", type=int, default=30)
    ap.add_argument("--per-class", type=int, nargs=3, default=(12, 20, 60),
                    help="images per class in train / val / test; few training images, the low-data regime where "
                         "the papers report their augmentations' gains (with 60 per class every row scores 1.0)")
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("bench-out/trainers"))
    a = ap.parse_args()
    data = a.out / "patches"
    if not (data / "patch_set.json").is_file():
        make_patch_set(data, n_classes=a.classes, per_class=a.per_class, size_px=64, seed=0)
    tiny = ROOT / "configs" / "tiny.yaml"
    rows, dino_notes = [], []
    for label, over, dino in ROWS:
        acc, f1, spe = [], [], []
        for seed in range(a.seeds):
            o = {**over, "patches.seed": seed, "patches.epochs": a.epochs, "runtime.torch_threads": 2}
            if dino:
                w, rec = _pretrain(a, data, tiny, seed)
                o["model.cls_weights"] = str(w)
                pr, last = rec["probe"], rec["history"][-1]
                dino_notes.append(f"seed {seed}: k-NN {pr['init']['accuracy']:.3f} -> {pr['final']['accuracy']:.3f}, "
                                  f"teacher entropy {last['teacher_entropy']:.2f} of ln K, collapse: {rec['collapse']}")
                print(f"DINO {dino_notes[-1]}", flush=True)
            t = time.perf_counter()
            res = run_train_patches(data, a.out / f"{label.replace(' ', '_')}_seed{seed}", load_config(tiny, o),
                                    progress=False)
            rep = res["reports"]["test"]
            acc.append(rep["accuracy"])
            f1.append(rep["macro_f1"])
            spe.append(statistics.mean(h["seconds"] for h in res["history"]))
            print(f"{label} seed {seed}: acc {acc[-1]:.3f} macro-F1 {f1[-1]:.3f} ({time.perf_counter() - t:.0f} s)",
                  flush=True)
        rows.append((label, acc, f1, spe))

    def ms(v):
        return f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0:.3f}"

    print(f"\n| model | test accuracy | test macro-F1 | s/epoch |  ({a.seeds} seeds, {a.epochs} epochs, CPU)")
    print("|---|---|---|---|")
    for label, acc, f1, spe in rows:
        print(f"| {label} | {ms(acc)} | {ms(f1)} | {statistics.mean(spe):.2f} |")
    print(f"\nDINO ({a.pretrain_epochs} epochs, tiny preset), scorer features, val k-NN accuracy before -> after:")
    for n in dino_notes:
        print(f"- {n}")


if __name__ == "__main__":
    main()
