"""The ``evaluate`` command: slide-level ROC / AUC / sensitivity / specificity, pixel Dice / IoU of heatmaps.

Slide level
-----------
``predictions.csv`` (from ``classify``) joined with a labels CSV
(``slide_id,label[,split]``). Reported:

* AUC (ties count one half);
* sensitivity and specificity at the threshold stored in ``predictions.csv``
  (the one ``classify`` decided with: the run's validation threshold or ``--threshold``);
* specificity at the highest threshold that still finds every positive slide of
  *this* table (the lowest positive probability; an oracle operating point,
  shown to compare with the paper's "specificity at 100 % sensitivity");
* a ROC curve PNG drawn with Pillow (no plotting library needed).

Slides without tissue (empty probability), without a label, or outside
``--split`` are left out and listed.

Pixel level (``--masks``)
-------------------------
Ground truth: QuPath GeoJSON (``<slide_id>.geojson``, level-0 px, classes
Tumor/Tumour) or mask images (``<slide_id>_lesion_mask.png``, ``<slide_id>_mask.png``,
``<slide_id>.png``; downsample from a ``<mask>.json`` sidecar ``{"downsample": N}``
or slide width / mask width), GeoJSON preferred when both exist. The truth is
rasterised on each slide's heatmap grid (pixel centres, see :mod:`wsi.heatmap`)
and compared with ``heatmap >= 0.5`` over the tissue mask. Negative slides
without a file count as all-negative truth; positive slides without one are
skipped. Dice and IoU are given per slide, pooled over all pixels of all
slides, and averaged over the positive slides.

Only numpy, Pillow and OpenCV are used: no torch.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.batch import UsageError, atomic_write_json, utc_now
from pipeline.config import Config
from pipeline.metrics import roc_auc, roc_curve, sensitivity_specificity, specificity_at_full_sensitivity

log = logging.getLogger("wsi_pipeline")

__all__ = ["read_predictions_csv", "run_evaluate", "format_evaluation", "draw_roc_png", "pixel_scores"]

MASK_NAME_SUFFIXES = ("_lesion_mask", "_mask", "")
MASK_SUFFIXES = (".png", ".tif", ".tiff")
GEOJSON_SUFFIXES = (".geojson", ".json")


# --------------------------------------------------------------------------- inputs


def read_predictions_csv(path: str | Path) -> list[dict]:
    """Rows of a ``predictions.csv``: ``slide_id``, ``probability`` (float or None), ``threshold``
    (float or None), ``threshold_source``, ``heatmap_zarr`` (path or None), in file order."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: predictions file not found; give the predictions.csv written by 'wsi-pipeline classify'")
    try:
        rows = list(csv.DictReader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"{path}: cannot read the predictions ({exc})") from None
    if not rows:
        raise UsageError(f"{path}: no predictions in the file")
    cols = set(rows[0])
    missing = [c for c in ("slide_id", "probability") if c not in cols]
    if missing:
        raise UsageError(f"{path}: missing column(s) {', '.join(missing)}; expected the predictions.csv of 'wsi-pipeline classify'")
    out, seen = [], set()
    for n, r in enumerate(rows, start=2):
        sid = (r.get("slide_id") or "").strip()
        if not sid:
            raise UsageError(f"{path}: line {n}: empty slide_id")
        if sid in seen:
            raise UsageError(f"{path}: line {n}: slide {sid!r} is listed twice; keep one row per slide")
        seen.add(sid)

        def num(key):
            v = (r.get(key) or "").strip()
            if not v:
                return None
            try:
                x = float(v)
            except ValueError:
                raise UsageError(f"{path}: line {n}: {key} {v!r} of slide {sid!r} is not a number") from None
            if not math.isfinite(x):
                return None
            return x

        hz = (r.get("heatmap_zarr") or "").strip()
        out.append({
            "slide_id": sid,
            "probability": num("probability"),
            "threshold": num("threshold") if "threshold" in cols else None,
            "threshold_source": (r.get("threshold_source") or "").strip(),
            "heatmap_zarr": (path.parent / hz) if hz else None,
        })
    return out


# --------------------------------------------------------------------------- slide level


def _clean(v):
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def _counts(y: np.ndarray, s: np.ndarray, t: float) -> dict:
    pred = s >= t
    return {
        "tp": int((pred & (y == 1)).sum()),
        "fn": int((~pred & (y == 1)).sum()),
        "tn": int((~pred & (y == 0)).sum()),
        "fp": int((pred & (y == 0)).sum()),
    }


def slide_level(y, s, threshold: float | None, threshold_source: str = "") -> dict:
    y = np.asarray(y, np.int64)
    s = np.asarray(s, np.float64)
    fpr, tpr, thr = roc_curve(y, s)
    res = {
        "n_slides": int(len(y)),
        "n_pos": int(y.sum()),
        "n_neg": int(len(y) - y.sum()),
        "auc": _clean(roc_auc(y, s)),
        "roc": {"fpr": [_clean(v) for v in fpr], "tpr": [_clean(v) for v in tpr],
                "threshold": [None if not math.isfinite(v) else float(v) for v in thr]},
    }
    if threshold is not None:
        sens, spec = sensitivity_specificity(y, s, threshold)
        res["at_threshold"] = {"threshold": float(threshold), "source": threshold_source,
                               "sensitivity": _clean(sens), "specificity": _clean(spec), **_counts(y, s, threshold)}
    else:
        res["at_threshold"] = None
    spec_f, t_f = specificity_at_full_sensitivity(y, s)
    if not math.isnan(t_f):
        sens_f, _ = sensitivity_specificity(y, s, t_f)
        res["at_full_sensitivity"] = {"threshold": float(t_f), "sensitivity": _clean(sens_f),
                                      "specificity": _clean(spec_f), **_counts(y, s, t_f)}
    else:
        res["at_full_sensitivity"] = None
    return res


# --------------------------------------------------------------------------- pixel level


def _find_truth(slide_id: str, dirs: Sequence[Path]) -> tuple[str, Path] | None:
    for d in dirs:
        for suf in GEOJSON_SUFFIXES:
            p = d / f"{slide_id}{suf}"
            if p.is_file():
                return "geojson", p
    for d in dirs:
        for name in MASK_NAME_SUFFIXES:
            for suf in MASK_SUFFIXES:
                p = d / f"{slide_id}{name}{suf}"
                if p.is_file():
                    return "mask", p
    return None


def _mask_downsample(path: Path, mask: np.ndarray, slide_width: float | None) -> float:
    side = path.with_suffix(".json")
    if side.is_file():
        try:
            return float(json.loads(side.read_text())["downsample"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{side}: expected JSON with a 'downsample' number ({exc})") from None
    if not slide_width:
        raise UsageError(f"{path}: give the mask's downsample in {side.name} ({{\"downsample\": N}})")
    return float(slide_width) / mask.shape[1]


def truth_on_grid(kind: str, path: Path, shape: tuple[int, int], origin_level0_xy, downsample: float,
                  slide_width: float | None = None, slide_height: float | None = None,
                  positive_classes: Sequence[str] = ("Tumor", "Tumour")) -> np.ndarray:
    """Ground truth rasterised on a heatmap grid (bool, ``shape``): pixel centre inside a positive region."""
    import cv2

    from wsi.annotations import AnnotationError, load_geojson, rasterize_mask, rasterize_tile

    H, W = int(shape[0]), int(shape[1])
    side = max(H, W, 1)
    xy = (float(origin_level0_xy[0]), float(origin_level0_xy[1]))
    if kind == "geojson":
        dims = (int(slide_width), int(slide_height)) if slide_width and slide_height else None
        try:
            ann = load_geojson(path, positive_classes=positive_classes, slide_dimensions=dims, allow_empty=True)
        except AnnotationError as exc:
            raise UsageError(str(exc)) from None
        full = rasterize_tile(ann, xy, side, downsample, out_px=side)
    else:
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise UsageError(f"{path}: cannot read the mask image (PNG or TIFF expected)")
        if img.ndim == 3:
            img = img[..., :3].max(axis=2)
        mask = (img != 0).astype(np.uint8)
        ds = _mask_downsample(path, mask, slide_width)
        full = rasterize_mask(mask, ds, xy, side, downsample, out_px=side)
    return full[:H, :W].astype(bool)


def pixel_scores(heat: np.ndarray, truth: np.ndarray, tissue: np.ndarray | None, threshold: float = 0.5) -> dict:
    """Dice, IoU and pixel counts of ``heat >= threshold`` against ``truth`` over ``tissue``."""
    from pipeline.metrics import dice, iou

    region = np.ones(heat.shape, bool) if tissue is None else np.asarray(tissue, bool)
    pred = (np.nan_to_num(heat, nan=-1.0) >= threshold) & region
    gt = np.asarray(truth, bool) & region
    tp = int((pred & gt).sum())
    return {
        "dice": dice(pred, gt),
        "iou": iou(pred, gt),
        "tp_px": tp,
        "fp_px": int((pred & ~gt).sum()),
        "fn_px": int((~pred & gt).sum()),
        "truth_px": int(gt.sum()),
        "predicted_px": int(pred.sum()),
        "tissue_px": int(region.sum()),
    }


def _pixel_level(rows: list[dict], labels: dict, mask_dirs: Sequence[Path], threshold: float,
                 positive_classes: Sequence[str]) -> dict:
    from wsi.heatmap import read_heatmap_zarr

    per, skipped = {}, {}
    for r in rows:
        sid = r["slide_id"]
        if sid not in labels:
            continue
        if r["heatmap_zarr"] is None:
            skipped[sid] = "no heatmap_zarr in predictions.csv"
            continue
        found = _find_truth(sid, mask_dirs)
        if found is None and labels[sid] == 1:
            skipped[sid] = "positive slide without ground-truth file"
            continue
        try:
            heat, tissue, attrs = read_heatmap_zarr(r["heatmap_zarr"])
        except (ValueError, FileNotFoundError) as exc:
            skipped[sid] = str(exc)
            continue
        if found is None:
            truth = np.zeros(heat.shape, bool)
            src = "none (negative slide)"
        else:
            truth = truth_on_grid(found[0], found[1], heat.shape, attrs["origin_level0_xy"], attrs["downsample"],
                                  attrs.get("slide_width_px"), attrs.get("slide_height_px"), positive_classes)
            src = str(found[1])
        sc = pixel_scores(heat, truth, tissue, threshold)
        per[sid] = {"label": labels[sid], "truth": src, **sc}
    tp = sum(v["tp_px"] for v in per.values())
    fp = sum(v["fp_px"] for v in per.values())
    fn = sum(v["fn_px"] for v in per.values())
    pos = [v for v in per.values() if v["label"] == 1]
    neg = [v for v in per.values() if v["label"] == 0]
    return {
        "threshold": threshold,
        "compared": "heatmap >= threshold vs ground truth at heatmap scale, over the tissue mask",
        "n_slides": len(per),
        "pooled_dice": (2 * tp / (2 * tp + fp + fn)) if (tp + fp + fn) else None,
        "pooled_iou": (tp / (tp + fp + fn)) if (tp + fp + fn) else None,
        "mean_dice_positive_slides": float(np.mean([v["dice"] for v in pos])) if pos else None,
        "mean_iou_positive_slides": float(np.mean([v["iou"] for v in pos])) if pos else None,
        "false_positive_fraction_negative_slides": (
            sum(v["fp_px"] for v in neg) / max(1, sum(v["tissue_px"] for v in neg)) if neg else None
        ),
        "slides": per,
        "skipped": skipped,
    }


# --------------------------------------------------------------------------- ROC picture


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def draw_roc_png(path: str | Path, fpr, tpr, *, auc: float | None = None, title: str = "ROC curve",
                 points: Sequence[tuple[float, float, str, tuple[int, int, int]]] = (), size_px: int = 600) -> Path:
    """A ROC curve with axes, ticks, labels, the chance diagonal and marked operating points, as PNG."""
    from PIL import Image, ImageDraw

    S = int(size_px)
    left, right, top, bottom = 78, 24, 54, 70
    img = Image.new("RGB", (S, S), "white")
    d = ImageDraw.Draw(img)
    pw, ph = S - left - right, S - top - bottom
    f_small, f_mid, f_big = _font(13), _font(15), _font(17)

    def X(v):
        return left + float(v) * pw

    def Y(v):
        return top + (1.0 - float(v)) * ph

    for k in range(6):
        v = k / 5
        d.line([(X(v), top), (X(v), top + ph)], fill=(232, 235, 240))
        d.line([(left, Y(v)), (left + pw, Y(v))], fill=(232, 235, 240))
        d.line([(X(v), top + ph), (X(v), top + ph + 5)], fill="black")
        d.line([(left - 5, Y(v)), (left, Y(v))], fill="black")
        d.text((X(v), top + ph + 8), f"{v:.1f}", fill="black", font=f_small, anchor="mt")
        d.text((left - 8, Y(v)), f"{v:.1f}", fill="black", font=f_small, anchor="rm")
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    # chance line, dashed
    n = 40
    for i in range(0, n, 2):
        a, b = i / n, (i + 1) / n
        d.line([(X(a), Y(a)), (X(b), Y(b))], fill=(150, 150, 150), width=1)
    pts = [(X(a), Y(b)) for a, b in zip(fpr, tpr) if a is not None and b is not None
           and not (isinstance(a, float) and math.isnan(a)) and not (isinstance(b, float) and math.isnan(b))]
    # straight segments between the operating points of successive thresholds (ties give diagonals)
    if len(pts) >= 2:
        d.line(pts, fill=(31, 94, 180), width=3, joint="curve")
    for fx, ty, label, colour in points:
        if fx is None or ty is None:
            continue
        cx, cy = X(fx), Y(ty)
        d.ellipse([cx - 6, cy - 6, cx + 6, cy + 6], outline=colour, width=3)
    d.text((S / 2, 16), title + ("" if auc is None else f"  (AUC {auc:.3f})"), fill="black", font=f_big, anchor="mt")
    d.text((left + pw / 2, S - 22), "False positive rate (1 - specificity)", fill="black", font=f_mid, anchor="mm")
    ylab = Image.new("RGB", (ph, 24), "white")
    ImageDraw.Draw(ylab).text((ph / 2, 12), "True positive rate (sensitivity)", fill="black", font=f_mid, anchor="mm")
    img.paste(ylab.rotate(90, expand=True), (8, top))
    # legend
    ly = top + ph - 18 - 20 * len(points)
    for i, (_, _, label, colour) in enumerate(points):
        y = ly + 20 * i
        d.ellipse([left + pw - 250, y - 5, left + pw - 240, y + 5], outline=colour, width=3)
        d.text((left + pw - 232, y), label, fill="black", font=f_small, anchor="lm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    img.save(str(tmp), format="PNG")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- entry point


def run_evaluate(
    predictions: str | Path,
    labels: str | Path,
    *,
    out_dir: str | Path | None = None,
    masks: Sequence[str | Path] = (),
    split: str | None = None,
    pixel_threshold: float = 0.5,
    config: Config | None = None,
) -> dict:
    """Evaluate ``predictions.csv`` against ``labels``; writes ``evaluation.json`` and ``roc.png`` into
    ``out_dir`` (default: the predictions file's folder) and returns the results.

    ``config`` (default: the built-in one) gives the GeoJSON classes that count as lesion
    (``em.positive_classes``)."""
    from pipeline.labels import read_labels_csv

    predictions = Path(predictions)
    rows = read_predictions_csv(predictions)
    lab_rows = read_labels_csv(labels)
    if split is not None:
        lab_rows = [r for r in lab_rows if r[2] == split]
        if not lab_rows:
            raise UsageError(f"{labels}: no slide has split {split!r}")
    lab = {sid: y for sid, y, _ in lab_rows}
    thresholds = {r["threshold"] for r in rows if r["threshold"] is not None}
    if len(thresholds) > 1:
        raise UsageError(f"{predictions}: rows have different thresholds ({sorted(thresholds)[:4]}); "
                         "evaluate one classify output at a time")
    threshold = thresholds.pop() if thresholds else None
    source = next((r["threshold_source"] for r in rows if r["threshold"] is not None), "")
    used = [r for r in rows if r["slide_id"] in lab and r["probability"] is not None]
    no_tissue = [r["slide_id"] for r in rows if r["slide_id"] in lab and r["probability"] is None]
    unlabelled = [r["slide_id"] for r in rows if r["slide_id"] not in lab]
    predicted = {r["slide_id"] for r in rows}
    not_predicted = [sid for sid in lab if sid not in predicted]
    if not used:
        raise UsageError(
            f"{predictions}: no predicted slide has a label in {labels}"
            + (f" with split {split!r}" if split else "") + "; check that the slide ids match"
        )
    y = np.array([lab[r["slide_id"]] for r in used])
    s = np.array([r["probability"] for r in used])
    result = {
        "predictions": str(predictions.resolve()),
        "labels": str(Path(labels).resolve()),
        "split": split or "all",
        "evaluated_utc": utc_now(),
        **slide_level(y, s, threshold, source),
        "left_out": {"no_tissue": no_tissue, "no_label": unlabelled, "no_prediction": not_predicted},
        "slides": {r["slide_id"]: {"label": int(lab[r["slide_id"]]), "probability": r["probability"]} for r in used},
    }
    if masks:
        dirs = []
        for m in masks:
            m = Path(m)
            if not m.exists():
                raise UsageError(f"{m}: no such ground-truth folder or file")
            dirs.append(m if m.is_dir() else m.parent)
        positive_classes = (config or Config()).em.positive_classes
        result["pixel"] = _pixel_level(rows, lab, dirs, pixel_threshold, positive_classes)
    out = Path(out_dir) if out_dir is not None else predictions.parent
    from pipeline.batch import ensure_writable_dir

    ensure_writable_dir(out, "output folder")
    pts = []
    at, af = result["at_threshold"], result["at_full_sensitivity"]
    if at is not None and at["specificity"] is not None and at["sensitivity"] is not None:
        pts.append((1 - at["specificity"], at["sensitivity"], f"threshold {at['threshold']:.3f} (predictions)", (230, 120, 0)))
    if af is not None and af["specificity"] is not None:
        pts.append((1 - af["specificity"], af["sensitivity"], f"100% sensitivity ({af['threshold']:.3f})", (20, 150, 60)))
    if result["auc"] is not None:
        draw_roc_png(out / "roc.png", result["roc"]["fpr"], result["roc"]["tpr"], auc=result["auc"],
                     title=f"ROC, {result['n_pos']} positive / {result['n_neg']} negative slides", points=pts)
        result["roc_png"] = str(out / "roc.png")
    else:
        result["roc_png"] = None
    atomic_write_json(out / "evaluation.json", result)
    result["evaluation_json"] = str(out / "evaluation.json")
    return result


def format_evaluation(res: dict) -> str:
    """The results as a few lines of text."""

    def f(v, nd=3):
        return "n/a" if v is None else f"{v:.{nd}f}"

    lines = [f"slides: {res['n_slides']} ({res['n_pos']} positive, {res['n_neg']} negative; split {res['split']})",
             f"AUC: {f(res['auc'])}"]
    at = res.get("at_threshold")
    if at:
        lines.append(
            f"at threshold {at['threshold']:.4f} ({at['source'] or 'from predictions.csv'}): sensitivity "
            f"{f(at['sensitivity'])}, specificity {f(at['specificity'])} (TP {at['tp']}, FN {at['fn']}, TN {at['tn']}, FP {at['fp']})"
        )
    else:
        lines.append("at threshold: predictions.csv has no threshold column")
    af = res.get("at_full_sensitivity")
    if af:
        lines.append(
            f"at 100% sensitivity on these slides (threshold {af['threshold']:.4f}): sensitivity {f(af['sensitivity'])}, "
            f"specificity {f(af['specificity'])} (TP {af['tp']}, FN {af['fn']}, TN {af['tn']}, FP {af['fp']})"
        )
    lo = res.get("left_out", {})
    for key, what in (("no_tissue", "without tissue"), ("no_label", "without a label (in this split)"), ("no_prediction", "labelled but not predicted")):
        if lo.get(key):
            ids = lo[key]
            lines.append(f"left out, {what}: {len(ids)} ({', '.join(ids[:6])}{' ...' if len(ids) > 6 else ''})")
    px = res.get("pixel")
    if px:
        lines.append(
            f"pixels (heatmap >= {px['threshold']}, {px['n_slides']} slides, over tissue): pooled Dice {f(px['pooled_dice'])}, "
            f"IoU {f(px['pooled_iou'])}; mean over positive slides Dice {f(px['mean_dice_positive_slides'])}, "
            f"IoU {f(px['mean_iou_positive_slides'])}; false-positive tissue fraction on negative slides "
            f"{f(px['false_positive_fraction_negative_slides'], 4)}"
        )
        if px["skipped"]:
            lines.append(f"pixels skipped: {', '.join(f'{k} ({v})' for k, v in list(px['skipped'].items())[:6])}")
    if res.get("roc_png"):
        lines.append(f"ROC curve: {res['roc_png']}")
    if res.get("evaluation_json"):
        lines.append(f"results: {res['evaluation_json']}")
    return "\n".join(lines)
