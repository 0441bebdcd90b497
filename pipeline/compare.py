"""Runs side by side: mode, best round, its stage-2 loss and validation metrics (``bench/em_bench.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pipeline.run import RunDir
from wsi.atomic import atomic_write_json, atomic_write_text

__all__ = ["compare_runs", "format_comparison", "write_comparison"]


def compare_runs(run_dirs: Sequence[str | Path]) -> list[dict]:
    """One row per run: mode, best round, its stage-2 loss and validation metrics."""
    rows = []
    for d in run_dirs:
        run = RunDir(d)
        meta = run.read_meta()
        best = meta.get("best_round")
        m = run.metrics(best, required=False) if best is not None else {}
        val = m.get("val") or {}
        rows.append({
            "run": str(d),
            "mode": meta.get("mode"),
            "rounds": len(meta.get("rounds_completed", [])),
            "best_round": best,
            "stage2_loss": m.get("stage2_loss"),
            "val_auc": val.get("auc"),
            "val_specificity_at_full_sensitivity": val.get("specificity_at_full_sensitivity"),
            "val_threshold_at_full_sensitivity": val.get("threshold_at_full_sensitivity"),
            "n_pos": val.get("n_pos"),
            "n_neg": val.get("n_neg"),
            "train_seconds": sum((run.metrics(r, required=False).get("time_s", {}).get("total") or 0)
                                 for r in meta.get("rounds_completed", [])),
        })
    return rows


def format_comparison(rows: list[dict]) -> str:
    def f(v, nd=3):
        return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    head = f"{'mode':<7} {'rounds':>6} {'best':>4} {'stage2 loss':>11} {'val AUC':>7} {'spec@100%sens':>13} {'thr':>6} {'pos/neg':>7} {'train s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['mode']:<7} {r['rounds']:>6} {f(r['best_round']):>4} {f(r['stage2_loss'], 4):>11} {f(r['val_auc']):>7} "
            f"{f(r['val_specificity_at_full_sensitivity']):>13} {f(r['val_threshold_at_full_sensitivity']):>6} "
            f"{str(r['n_pos']) + '/' + str(r['n_neg']):>7} {r['train_seconds']:>8.0f}"
        )
    return "\n".join(lines)


def write_comparison(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Write ``comparison.json`` and ``comparison.txt`` (the table) into ``out_dir``."""
    rows = compare_runs(run_dirs)
    out = Path(out_dir)
    atomic_write_json(out / "comparison.json", rows)
    atomic_write_text(out / "comparison.txt", format_comparison(rows) + "\n")
    return out / "comparison.txt"
