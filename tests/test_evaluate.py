"""``evaluate`` against numbers worked out by hand: slide AUC / sensitivity / specificity, pixel Dice / IoU."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import load_config
from click.testing import CliRunner
from PIL import Image

from pipeline.batch import UsageError
from pipeline.cli import main
from pipeline.evaluate import pixel_scores, read_predictions_csv, run_evaluate
from wsi.heatmap import write_heatmap_zarr

# 3 positive, 4 negative slides (s3 and s7 tie at 0.40), one without tissue, one without a label.
#   AUC: 0.90 and 0.70 beat all 4 negatives (8 pairs); 0.40 beats 0.30 and 0.10, ties 0.40 (2.5)
#        -> 10.5 / 12 = 0.875
#   threshold 0.45: called positive 0.90, 0.70 (TP 2) and 0.50 (FP 1); FN 1 (0.40); TN 3
#        -> sensitivity 2/3, specificity 3/4
#   100 % sensitivity: threshold 0.40 (lowest positive); negatives below it: 0.30, 0.10 -> specificity 2/4
PRED = """slide_id,probability,decision,threshold,threshold_source,round,heatmap_zarr
s1,0.9,positive,0.45,run validation split,0,
s2,0.7,positive,0.45,run validation split,0,
s4,0.5,positive,0.45,run validation split,0,
s3,0.4,negative,0.45,run validation split,0,
s7,0.4,negative,0.45,run validation split,0,
s5,0.3,negative,0.45,run validation split,0,
s6,0.1,negative,0.45,run validation split,0,
s8,,no tissue,0.45,run validation split,0,
s9,0.8,positive,0.45,run validation split,0,
"""
LABELS = """slide_id,label,split
s1,1,test
s2,1,test
s3,1,test
s4,0,test
s5,0,test
s6,0,test
s7,0,test
s8,0,test
s10,1,val
"""


@pytest.fixture
def table(tmp_path) -> tuple[Path, Path]:
    (tmp_path / "predictions.csv").write_text(PRED)
    (tmp_path / "labels.csv").write_text(LABELS)
    return tmp_path / "predictions.csv", tmp_path / "labels.csv"


def test_slide_metrics_match_hand_computation(table, tmp_path):
    pred, labels = table
    res = run_evaluate(pred, labels, split="all", out_dir=tmp_path / "ev")  # every labelled slide, not only test
    assert (res["n_slides"], res["n_pos"], res["n_neg"]) == (7, 3, 4)
    assert res["auc"] == pytest.approx(10.5 / 12)
    at = res["at_threshold"]
    assert at["threshold"] == 0.45 and at["source"] == "run validation split"
    assert at["sensitivity"] == pytest.approx(2 / 3) and at["specificity"] == pytest.approx(3 / 4)
    assert (at["tp"], at["fn"], at["tn"], at["fp"]) == (2, 1, 3, 1)
    full = res["at_full_sensitivity"]
    assert full["threshold"] == 0.4 and full["sensitivity"] == 1.0 and full["specificity"] == pytest.approx(0.5)
    assert res["left_out"] == {"no_tissue": ["s8"], "no_label": ["s9"], "no_prediction": ["s10"]}
    # ROC: starts at (0, 0), ends at (1, 1), one point per distinct score
    assert res["roc"]["fpr"][0] == 0 and res["roc"]["tpr"][0] == 0
    assert res["roc"]["fpr"][-1] == 1 and res["roc"]["tpr"][-1] == 1 and len(res["roc"]["fpr"]) == 7
    saved = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert saved["auc"] == res["auc"]
    with Image.open(tmp_path / "ev" / "roc.png") as im:
        assert im.size == (600, 600)
        a = np.asarray(im.convert("RGB")).astype(int)
    # the curve is drawn in blue, the operating points in orange and green
    assert ((a[..., 2] > 150) & (a[..., 0] < 80)).sum() > 500
    assert ((a[..., 0] > 200) & (a[..., 1] > 90) & (a[..., 1] < 150) & (a[..., 2] < 40)).any()
    # one split only
    res = run_evaluate(pred, labels, split="test", out_dir=tmp_path / "ev2")
    assert res["n_slides"] == 7 and res["split"] == "test" and res["left_out"]["no_prediction"] == []


def test_cli_prints_the_numbers(table, tmp_path):
    pred, labels = table
    r = CliRunner().invoke(main, ["evaluate", "--predictions", str(pred), "--labels", str(labels)])
    assert r.exit_code == 0, r.output
    assert "AUC: 0.875" in r.output
    assert "sensitivity 0.667, specificity 0.750" in r.output
    assert "threshold 0.4000): sensitivity 1.000, specificity 0.500" in r.output
    assert (pred.parent / "roc.png").is_file() and (pred.parent / "evaluation.json").is_file()
    r = CliRunner().invoke(main, ["evaluate", "--predictions", str(tmp_path / "nope.csv"), "--labels", str(labels)])
    assert r.exit_code == 2 and "nope.csv" in r.output and "predictions file not found" in r.output


def test_bad_tables_are_one_clear_error(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text(LABELS)
    p = tmp_path / "p.csv"
    p.write_text("slide,score\na,0.5\n")
    with pytest.raises(UsageError, match="missing column.*slide_id"):
        run_evaluate(p, labels)
    p.write_text("slide_id,probability,threshold\ns1,0.5,0.4\ns1,0.6,0.4\n")
    with pytest.raises(UsageError, match="line 3.*listed twice"):
        run_evaluate(p, labels)
    p.write_text("slide_id,probability,threshold\ns1,high,0.4\n")
    with pytest.raises(UsageError, match="line 2.*not a number"):
        read_predictions_csv(p)
    p.write_text("slide_id,probability,threshold\nx1,0.5,0.4\n")
    with pytest.raises(UsageError, match="no predicted slide has a label"):
        run_evaluate(p, labels)
    p.write_text("slide_id,probability,threshold\ns1,0.5,0.4\ns4,0.6,0.3\n")
    with pytest.raises(UsageError, match="different thresholds"):
        run_evaluate(p, labels)


def _heatmap(path: Path) -> None:
    """10 x 10 heatmap, 8 level-0 px per pixel, origin (16, 32): 0.9 on rows 2-5 x cols 2-5, NaN on row 9."""
    heat = np.full((10, 10), 0.1, np.float32)
    heat[2:6, 2:6] = 0.9
    heat[9] = np.nan
    tissue = np.ones((10, 10), bool)
    tissue[:, 0] = False
    write_heatmap_zarr(path, heat, tissue, {"downsample": 8.0, "origin_level0_xy": [16, 32],
                                            "slide_width_px": 112, "slide_height_px": 128})


def test_pixel_dice_iou_against_geojson_and_mask(tmp_path):
    # truth: level-0 box x 40..72, y 48..80 -> heatmap pixel centres in cols 3-6, rows 2-5 (16 px)
    # predicted: cols 2-5, rows 2-5 (16 px); overlap cols 3-5 x rows 2-5 = 12
    #   Dice = 2 * 12 / 32 = 0.75, IoU = 12 / 20 = 0.6
    out = tmp_path / "cls"
    _heatmap(out / "heatmaps" / "p1.zarr")
    _heatmap(out / "heatmaps" / "p2.zarr")
    _heatmap(out / "heatmaps" / "n1.zarr")
    _heatmap(out / "heatmaps" / "p3.zarr")
    (out / "predictions.csv").write_text(
        "slide_id,probability,threshold,heatmap_zarr\n"
        "p1,0.9,0.5,heatmaps/p1.zarr\np2,0.8,0.5,heatmaps/p2.zarr\nn1,0.7,0.5,heatmaps/n1.zarr\np3,0.6,0.5,heatmaps/p3.zarr\n"
    )
    (tmp_path / "labels.csv").write_text("slide_id,label\np1,1\np2,1\nn1,0\np3,1\n")
    gt = tmp_path / "gt"
    gt.mkdir()
    ring = [[40, 48], [72, 48], [72, 80], [40, 80], [40, 48]]
    (gt / "p1.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"classification": {"name": "Tumor"}}}]}))
    mask = np.zeros((32, 28), np.uint8)  # downsample 4: level-0 [4c, 4c + 4)
    mask[12:20, 10:18] = 255
    cv2.imwrite(str(gt / "p2_lesion_mask.png"), mask)
    (gt / "p2_lesion_mask.json").write_text(json.dumps({"downsample": 4}))
    res = run_evaluate(out / "predictions.csv", tmp_path / "labels.csv", masks=[gt], out_dir=tmp_path / "ev")
    px = res["pixel"]
    for sid in ("p1", "p2"):
        s = px["slides"][sid]
        assert s["dice"] == pytest.approx(0.75) and s["iou"] == pytest.approx(0.6)
        assert (s["tp_px"], s["fp_px"], s["fn_px"]) == (12, 4, 4)
        assert s["tissue_px"] == 90
    # negative slide without a truth file: all-negative truth, its 16 predicted pixels are false positives
    n1 = px["slides"]["n1"]
    assert n1["dice"] == 0.0 and n1["fp_px"] == 16 and n1["truth"].startswith("none")
    assert px["false_positive_fraction_negative_slides"] == pytest.approx(16 / 90)
    assert px["skipped"] == {"p3": "positive slide without ground-truth file"}
    assert px["mean_dice_positive_slides"] == pytest.approx(0.75)
    assert px["pooled_dice"] == pytest.approx(2 * 24 / (2 * 24 + 8 + 16 + 8))
    # the threshold moves which pixels count
    low = pixel_scores(np.full((2, 2), 0.3, np.float32), np.ones((2, 2), bool), None, threshold=0.25)
    assert low["dice"] == 1.0 and low["predicted_px"] == 4


def _box_geojson(path, x0, y0, x1, y1, cls="Tumor", region=None):
    feats = [{"type": "Feature", "properties": {"classification": {"name": cls}},
              "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}}]
    if region is not None:
        rx0, ry0, rx1, ry1 = region
        feats.append({"type": "Feature", "properties": {"classification": {"name": "Region 1"}},
                      "geometry": {"type": "Polygon",
                                   "coordinates": [[[rx0, ry0], [rx1, ry0], [rx1, ry1], [rx0, ry1], [rx0, ry0]]]}})
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))


def test_pixel_truth_found_and_read_as_training_does(tmp_path):
    # same geometry as above: truth cols 3-6 x rows 2-5, predicted cols 2-5 x rows 2-5
    out = tmp_path / "cls"
    for sid in ("m1", "c1", "r1"):
        _heatmap(out / "heatmaps" / f"{sid}.zarr")
    (out / "predictions.csv").write_text(
        "slide_id,probability,threshold,heatmap_zarr\n"
        "m1,0.9,0.5,heatmaps/m1.zarr\nc1,0.8,0.5,heatmaps/c1.zarr\nr1,0.7,0.5,heatmaps/r1.zarr\n"
    )
    (tmp_path / "labels.csv").write_text("slide_id,label\nm1,1\nc1,1\nr1,1\n")
    gt = tmp_path / "gt"
    gt.mkdir()
    mask = np.zeros((32, 28), np.uint8)
    mask[12:20, 10:18] = 255
    cv2.imwrite(str(gt / "m1-mask.png"), mask)  # the '-mask' name training accepts
    (gt / "m1-mask.json").write_text(json.dumps({"downsample": 4}))
    _box_geojson(gt / "c1.geojson", 40, 48, 72, 80, cls="Carcinoma")
    # region x [56, 112): predicted column 2 lies outside it and outside the tumour, so it is unlabelled
    _box_geojson(gt / "r1.geojson", 40, 48, 72, 80, region=(56, 32, 112, 112))

    res = run_evaluate(out / "predictions.csv", tmp_path / "labels.csv", masks=[gt], out_dir=tmp_path / "ev")
    px = res["pixel"]
    assert px["slides"]["m1"]["truth"].endswith("m1-mask.png") and px["skipped"] == {}
    assert px["slides"]["m1"]["dice"] == pytest.approx(0.75)
    assert px["slides"]["c1"]["truth_px"] == 0 and px["slides"]["c1"]["dice"] == 0.0  # Carcinoma is not positive
    assert px["positive_classes"] == ["Tumor", "Tumour"]
    r1 = px["slides"]["r1"]
    assert r1["region_limited"] and not px["slides"]["m1"]["region_limited"]
    assert (r1["tp_px"], r1["fp_px"], r1["fn_px"], r1["tissue_px"]) == (12, 0, 4, 58)
    assert r1["dice"] == pytest.approx(24 / 28) and r1["iou"] == pytest.approx(0.75)

    res = run_evaluate(out / "predictions.csv", tmp_path / "labels.csv", masks=[gt], out_dir=tmp_path / "ev2",
                       config=load_config(None, {"em.positive_classes": ["carcinoma"]}))
    c1 = res["pixel"]["slides"]["c1"]
    assert c1["dice"] == pytest.approx(0.75) and c1["truth_px"] == 16
    assert res["pixel"]["slides"]["r1"]["truth_px"] == 0  # its Tumor box is no longer positive
