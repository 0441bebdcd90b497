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
Ground truth is found and read exactly as training reads annotations
(:mod:`wsi.annotations`): QuPath GeoJSON (``<slide_id>.geojson``, level-0 px,
classes ``positive_classes``, default ``em.positive_classes``) or mask images
(``<slide_id>_lesion_mask.png``, ``<slide_id>_mask.png``, ``<slide_id>-mask.png``,
``<slide_id>.png``, ...; downsample from a ``<mask>.json`` sidecar
``{"downsample": N}`` or slide width / mask width), GeoJSON preferred when both
exist. The truth is rasterised on each slide's heatmap grid (pixel centres, see
:mod:`wsi.heatmap`) and compared with ``heatmap >= 0.5`` over the tissue mask;
a region-limited annotation (``Region*`` features, or a mask's unlabelled value)
is compared only over its labelled pixels. Negative slides without a file count
as all-negative truth; positive slides without one are skipped. Dice and IoU are
given per slide, pooled over all pixels of all slides, and averaged over the
positive slides.

Only numpy, Pillow, OpenCV and shapely (via wsi.annotations) are used: no torch.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.batch import UsageError, utc_now
from pipeline.config import Config
from wsi.atomic import atomic_path, atomic_write_json
from pipeline.metrics import roc_auc, roc_curve, sensitivity_specificity, specificity_at_full_sensitivity
from wsi.annotations import AnnotationError, annotation_files, load_slide_annotation, match_annotation_files

log = logging.getLogger("wsi_pipeline")

__all__ = ["read_predictions_csv", "run_evaluate", "auc_bootstrap_ci", "slide_level", "format_evaluation", "draw_roc_png", "pixel_scores"]


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


def auc_bootstrap_ci(y, s, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the slide AUC (slides resampled with replacement,
    ``n_boot`` times, fixed ``seed`` so a report is reproducible); None without both classes.
    Resamples that miss a class are drawn again."""
    y = np.asarray(y, np.int64)
    s = np.asarray(s, np.float64)
    if y.size == 0 or y.min() == y.max():
        return None
    rng = np.random.default_rng(seed)
    aucs = []
    while len(aucs) < n_boot:
        idx = rng.integers(0, y.size, y.size)
        yb, sb = y[idx], s[idx]
        pos, neg = sb[yb == 1], np.sort(sb[yb == 0])
        if not pos.size or not neg.size:
            continue
        lo, hi = np.searchsorted(neg, pos, "left"), np.searchsorted(neg, pos, "right")
        aucs.append(float((lo + 0.5 * (hi - lo)).sum() / (pos.size * neg.size)))
    a = (1.0 - level) / 2.0
    q = np.quantile(np.asarray(aucs), [a, 1.0 - a])
    return float(q[0]), float(q[1])


# --------------------------------------------------------------------------- pixel level


def truth_on_grid(path: Path, slide_id: str, shape: tuple[int, int], origin_level0_xy, downsample: float,
                  slide_width: float | None = None, slide_height: float | None = None, *,
                  positive_classes: Sequence[str], region_classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth on a heatmap grid: ``(truth, labelled)``, bool arrays of ``shape``; ``truth`` where the
    pixel centre is positive, ``labelled`` where the annotation says anything (all of it unless region-limited)."""
    dims = (int(slide_width) if slide_width else None, int(slide_height) if slide_height else None)
    try:
        ann = load_slide_annotation(path, slide_id, positive_classes=positive_classes, region_classes=region_classes,
                                    slide_dimensions=dims, allow_empty=True)
    except AnnotationError as exc:
        raise UsageError(str(exc)) from None
    return ann.grid_labels(shape, origin_level0_xy, downsample)


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


def _truth_files(masks: Sequence[str | Path], slide_ids) -> dict[str, Path]:
    """Each slide's ground-truth file (the rule of :func:`wsi.annotations.match_annotation_files`)."""
    try:
        files = annotation_files(masks)
    except AnnotationError as exc:
        raise UsageError(str(exc)) from None
    by_slide, _ = match_annotation_files(files, slide_ids)
    for sid, fs in by_slide.items():
        if len(fs) > 1:
            log.debug("slide %s: ground truth %s used; not used: %s", sid, fs[0].name, ", ".join(f.name for f in fs[1:]))
    return {sid: fs[0] for sid, fs in by_slide.items()}


def _pixel_level(rows: list[dict], labels: dict, masks: Sequence[str | Path], threshold: float,
                 positive_classes: Sequence[str], region_classes: Sequence[str]) -> dict:
    from wsi.heatmap import read_heatmap_zarr

    truth_files = _truth_files(masks, labels)
    per, skipped = {}, {}
    for r in rows:
        sid = r["slide_id"]
        if sid not in labels:
            continue
        if r["heatmap_zarr"] is None:
            skipped[sid] = "no heatmap_zarr in predictions.csv"
            continue
        found = truth_files.get(sid)
        if found is None and labels[sid] == 1:
            skipped[sid] = "positive slide without ground-truth file"
            continue
        try:
            heat, tissue, attrs = read_heatmap_zarr(r["heatmap_zarr"])
        except (ValueError, FileNotFoundError) as exc:
            skipped[sid] = str(exc)
            continue
        if found is None:
            truth, labelled = np.zeros(heat.shape, bool), None
            src = "none (negative slide)"
        else:
            truth, labelled = truth_on_grid(found, sid, heat.shape, attrs["origin_level0_xy"], attrs["downsample"],
                                            attrs.get("slide_width_px"), attrs.get("slide_height_px"),
                                            positive_classes=positive_classes, region_classes=region_classes)
            src = str(found)
        region = tissue
        if labelled is not None and not labelled.all():
            region = labelled if tissue is None else np.asarray(tissue, bool) & labelled
        sc = pixel_scores(heat, truth, region, threshold)
        per[sid] = {"label": labels[sid], "truth": src, "region_limited": region is not tissue, **sc}
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
    with atomic_path(path) as tmp:
        img.save(str(tmp), format="PNG")
    return path


# --------------------------------------------------------------------------- entry point


def _resolve_split(split: str | None, lab_rows, labels) -> tuple[str, list[str]]:
    """``None``/``'auto'``: the held-out ``test`` split when the labels have one, else every slide with a
    loud warning: slides a model was trained or thresholded on give optimistic figures."""
    if split not in (None, "auto"):
        return split, []
    splits = {r[2] for r in lab_rows}
    if "test" in splits:
        return "test", []
    seen = sorted(splits & {"train", "val"})
    msg = (f"{labels} has no 'test' split: scoring {', '.join(seen)} slides, which the model was trained or "
           "thresholded on; these figures are optimistic, not a measure of how it does on new slides")
    log.warning("%s", msg)
    return "all", [msg]


def run_evaluate(
    predictions: str | Path,
    labels: str | Path,
    *,
    out_dir: str | Path | None = None,
    masks: Sequence[str | Path] = (),
    split: str | None = "auto",
    pixel_threshold: float = 0.5,
    config: Config | None = None,
    report: bool = False,
) -> dict:
    """Evaluate ``predictions.csv`` against ``labels``; writes ``evaluation.json`` and ``roc.png`` into
    ``out_dir`` (default: the predictions file's folder) and returns the results.

    ``masks`` are ground-truth files or folders (see the module docstring); ``config`` (default: the
    built-in one) gives the GeoJSON classes that count as lesion (``em.positive_classes``) and those that
    mark where an annotation is complete (``em.annotated_region_classes``). ``report`` also writes
    ``report.html`` into ``out_dir``: the classify report of these predictions with the labels
    (:func:`write_labelled_report`)."""
    from pipeline.labels import read_labels_csv

    predictions = Path(predictions)
    rows = read_predictions_csv(predictions)
    lab_rows = read_labels_csv(labels)
    split, warnings = _resolve_split(split, lab_rows, labels)
    if split != "all":
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
            + (f" with split {split!r}" if split != "all" else "") + "; check that the slide ids match"
        )
    y = np.array([lab[r["slide_id"]] for r in used])
    s = np.array([r["probability"] for r in used])
    result = {
        "predictions": str(predictions.resolve()),
        "labels": str(Path(labels).resolve()),
        "split": split,
        "warnings": warnings,
        "evaluated_utc": utc_now(),
        **slide_level(y, s, threshold, source),
        "left_out": {"no_tissue": no_tissue, "no_label": unlabelled, "no_prediction": not_predicted},
        "slides": {r["slide_id"]: {"label": int(lab[r["slide_id"]]), "probability": r["probability"]} for r in used},
    }
    if masks:
        em = (config or Config()).em
        pos, reg = list(em.positive_classes), list(em.annotated_region_classes)
        result["pixel"] = _pixel_level(rows, lab, masks, pixel_threshold, pos, reg)
        result["pixel"]["positive_classes"] = pos
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
    if report:
        result["report_html"] = str(write_labelled_report(predictions, rows, lab, out, labels))
    atomic_write_json(out / "evaluation.json", result)
    result["evaluation_json"] = str(out / "evaluation.json")
    return result


def write_labelled_report(predictions: Path, rows: list[dict], labels: dict, out: Path, labels_path) -> Path:
    """``out/report.html`` from the per-slide results beside ``predictions`` (``slides/<id>.json``, written by
    ``classify``) with a truth column, the ROC with AUC and its bootstrap interval, and the confusion counts."""
    import json

    from pipeline.report import write_report_html

    folder = predictions.parent
    results, missing = [], []
    for r in rows:
        try:
            results.append(json.loads((folder / "slides" / f"{r['slide_id']}.json").read_text()))
        except (OSError, ValueError):
            missing.append(r["slide_id"])
    if missing:
        raise UsageError(f"{folder / 'slides'}: no result file for {len(missing)} slide(s) of {predictions} "
                         f"({', '.join(missing[:4])}); --report needs the classify output folder as it was written")
    try:
        provenance = json.loads((folder / "provenance.json").read_text())
    except (OSError, ValueError):  # an output of an older version: what predictions.csv says
        thr = next((r["threshold"] for r in rows if r["threshold"] is not None), None)
        if thr is None:
            raise UsageError(f"{predictions}: no threshold column; --report needs the predictions.csv of classify") from None
        provenance = {"threshold": thr, "threshold_source": rows[0]["threshold_source"],
                      "run_dir": results[0].get("run_dir") if results else None,
                      "round": results[0].get("round") if results else None}
    provenance = {**provenance, "labels": str(Path(labels_path).resolve()), "generated_utc": utc_now()}
    return write_report_html(out / "report.html", results, provenance, folder, labels=labels)


def format_evaluation(res: dict) -> str:
    """The results as a few lines of text."""

    def f(v, nd=3):
        return "n/a" if v is None else f"{v:.{nd}f}"

    lines = [f"WARNING: {w}" for w in res.get("warnings") or []]
    lines += [f"slides: {res['n_slides']} ({res['n_pos']} positive, {res['n_neg']} negative; split {res['split']})",
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
    if res.get("report_html"):
        lines.append(f"report: {res['report_html']}")
    if res.get("evaluation_json"):
        lines.append(f"results: {res['evaluation_json']}")
    return "\n".join(lines)
