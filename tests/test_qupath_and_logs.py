"""QuPath both ways (detections out, edited regions back in), whole-batch mistakes, --log-file, trackers."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from shapely.geometry import shape

from pipeline.batch import UsageError, setup_logging
from pipeline.classify import detections_geojson
from pipeline.cli import main
from pipeline.config import load_config
from tests.em_fixtures import em_cohort, em_run  # noqa: F401  (fixtures)
from wsi.annotations import load_slide_annotation
from wsi.heatmap import heatmap_regions, regions_geojson


def test_detections_are_tile_squares_with_measurements():
    gj = detections_geojson(np.array([[0, 0], [384, 0]]), 512.0, [0.9, 0.2], [0.4, 0.05], {1: 0.7})
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == 2
    f0, f1 = gj["features"]
    assert f0["properties"]["objectType"] == "detection"
    assert shape(f0["geometry"]).bounds == (0, 0, 512, 512) and shape(f1["geometry"]).bounds == (384, 0, 896, 512)
    assert f0["properties"]["measurements"] == {"theta1_max": 0.9, "theta1_mean": 0.4}
    assert f1["properties"]["measurements"] == {"theta1_max": 0.2, "theta1_mean": 0.05, "theta2_probability": 0.7}
    json.dumps(gj)  # plain JSON types only


def test_edited_region_export_comes_back_as_training_annotation(tmp_path):
    """classify's regions file, edited as a pathologist would in QuPath: one region confirmed (class renamed
    to Tumor), one deleted, one left as predicted (not used); em-round's loader reads what was confirmed."""
    heat = np.zeros((40, 60), np.float32)
    heat[2:8, 3:9] = 0.9
    heat[20:30, 30:40] = 0.8
    heat[32:36, 50:55] = 0.7
    regs = heatmap_regions(heat, 0.5, downsample=16, origin_level0_xy=(0, 0))
    exported = regions_geojson(regs, name="Tumor (predicted)")
    assert len(exported["features"]) == 3
    # unedited: nothing is positive yet ("Tumor (predicted)" is not a positive class)
    (tmp_path / "slide_a.geojson").write_text(json.dumps(exported))
    with pytest.raises(Exception, match="slide_a.geojson"):
        load_slide_annotation(tmp_path / "slide_a.geojson", positive_classes=["Tumor", "Tumour"])
    edited = json.loads(json.dumps(exported))
    by_area = sorted(edited["features"], key=lambda f: -f["properties"]["measurements"]["area_level0_px2"])
    by_area[0]["properties"]["classification"] = {"name": "Tumor", "color": [200, 0, 0]}  # confirmed
    edited["features"] = [by_area[0], by_area[2]]  # the middle one deleted, the smallest left as predicted
    (tmp_path / "slide_a.geojson").write_text(json.dumps(edited, indent=1))
    ann = load_slide_annotation(tmp_path / "slide_a.geojson", positive_classes=["Tumor", "Tumour"],
                                slide_dimensions=(60 * 16, 40 * 16))
    assert ann.slide_id == "slide_a"
    confirmed = shape(by_area[0]["geometry"])
    assert ann.geo.positive.area == pytest.approx(confirmed.area)
    assert ann.geo.positive.symmetric_difference(confirmed).area < 1e-6
    # the file is found for its slide the way `em-round --annotations regions/` finds it
    from wsi.annotations import annotation_files, match_annotation_files

    matched, unmatched = match_annotation_files(annotation_files([tmp_path]), ["slide_a", "slide_b"])
    assert list(matched) == ["slide_a"] and not unmatched


def test_labels_csv_given_as_slides_is_one_error(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label,split\n" + "".join(f"slide_{i:03d},{i % 2},train\n" for i in range(25)))
    r = CliRunner().invoke(main, ["tile", str(labels), "--out", str(tmp_path / "stores"), "--workers", "0"])
    assert r.exit_code == 2, r.output
    errors = [ln for ln in r.output.splitlines() if "error" in ln.lower() or "FileNotFound" in ln]
    assert len(errors) == 1 and "labels file" in errors[0] and "labels.csv" in errors[0]
    # a list of slides none of which exists: one line too
    lst = tmp_path / "slides.txt"
    lst.write_text("a.svs\nb.svs\n")
    r = CliRunner().invoke(main, ["tile", str(lst), "--out", str(tmp_path / "stores"), "--workers", "0"])
    assert r.exit_code == 2 and "none of the 2 listed slide(s) exists" in r.output


def test_log_file_gets_info_even_when_quiet(tmp_path):
    log = tmp_path / "logs" / "run.log"
    r = CliRunner().invoke(main, ["synth", str(tmp_path / "c"), "--positives", "1", "--negatives", "0",
                                  "--size-px", "1024", "--annotated", "0", "--quiet", "--log-file", str(log)])
    assert r.exit_code == 0, r.output
    text = log.read_text()
    assert "INFO generating 1 slides" in text and text[:4].isdigit()  # dated lines
    assert "generating" not in r.output  # --quiet: the console shows warnings only
    setup_logging(False, False)  # back to stderr only; the file is closed
    assert not [h for h in logging.getLogger("wsi_pipeline").handlers if isinstance(h, logging.FileHandler)]


def test_log_lines_go_through_tqdm(capsys):
    from tqdm.contrib.logging import _TqdmLoggingHandler

    setup_logging(False, False)
    handlers = logging.getLogger("wsi_pipeline").handlers
    assert len(handlers) == 1 and isinstance(handlers[0], _TqdmLoggingHandler)
    logging.getLogger("wsi_pipeline").info("hello through tqdm")
    assert "hello through tqdm" in capsys.readouterr().err


def test_tracker_flattens_round_metrics():
    from pipeline.tracking import Tracker, make_tracker

    class Memory(Tracker):
        def __init__(self):
            self.logged = []

        def scalar(self, tag, value, step):
            self.logged.append((tag, value, step))

    m = {"round": 1, "stage2_loss": 0.3, "val": {"auc": 0.9, "n_pos": 3, "slides": [1, 2]},
         "e_step": {"n_pseudo_positive": 12, "kept_fraction": 0.5},
         "seg": {"epochs": [{"epoch": 0, "loss": 1.0}, {"epoch": 1, "loss": 0.5}]}, "time_s": {"total": 3.0},
         "mode": "mixed", "val_nan": float("nan")}
    t = Memory()
    t.hooks().round_end(1, m)
    got = {(tag, step): v for tag, v, step in t.logged}
    assert got[("stage2_loss", 1)] == 0.3 and got[("val/auc", 1)] == 0.9 and got[("e_step/n_pseudo_positive", 1)] == 12
    assert got[("round_1/seg/loss", 0)] == 1.0 and got[("round_1/seg/loss", 1)] == 0.5
    assert not any(tag.startswith(("mode", "val_nan", "val/slides")) for tag, _ in got)
    assert make_tracker("none", "run") is None


def test_tensorboard_tracker_writes_events(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install 'wsi-pipeline[tensorboard]')")
    from pipeline.tracking import make_tracker

    t = make_tracker("tensorboard", tmp_path / "run")
    t.log_round(0, {"stage2_loss": 0.25, "val": {"auc": 0.75}})
    t.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("val/auc")] == [pytest.approx(0.75)]


def test_mlflow_tracker_logs_round_and_epoch_metrics(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow not installed (pip install 'wsi-pipeline[mlflow]')")
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import make_tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the folder store for opt-in use
    t = make_tracker("mlflow", tmp_path / "run")
    t.log_round(0, {"stage2_loss": 0.25, "val": {"auc": 0.75}, "seg": {"epochs": [{"epoch": 0, "loss": 1.0},
                                                                                  {"epoch": 1, "loss": 0.5}]}})
    t.log_round(1, {"stage2_loss": 0.2, "val": {"auc": 0.8}})
    run_id = t.run.info.run_id
    t.close()
    c = MlflowClient()
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "val/auc")] == [(0, 0.75), (1, 0.8)]
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "round_0/seg/loss")] == [(0, 1.0), (1, 0.5)]
    run = c.get_run(run_id)
    assert run.info.run_name == "run" and run.data.tags["wsi_pipeline.run_dir"] == str((tmp_path / "run").resolve())
    assert run.info.status == "FINISHED"


def test_mlflow_backend_that_cannot_open_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow not installed (pip install 'wsi-pipeline[mlflow]')")
    from pipeline.tracking import make_tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "false")
    with pytest.raises(UsageError, match=r"--tracker mlflow: cannot start an MLflow run at file:.*MLFLOW_TRACKING_URI") as ei:
        make_tracker("mlflow", tmp_path / "run")
    assert "\n" not in str(ei.value)


def test_missing_tracker_package_is_a_usage_error(tmp_path, monkeypatch):
    import importlib.util

    from pipeline import tracking

    real = importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda n, *a: None if n == "mlflow" else real(n, *a))
    with pytest.raises(UsageError, match=r"wsi-pipeline\[mlflow\]"):
        tracking.make_tracker("mlflow", tmp_path)


# --------------------------------------------------------------------------- with a trained run


@pytest.fixture(scope="module")
def run_and_stores(em_cohort, em_run, tmp_path_factory):
    return em_cohort, em_run


def test_classify_writes_detections_and_a_labelled_report(run_and_stores, tmp_path):
    from pipeline.classify import run_classify

    cohort, run = run_and_stores
    stores = tmp_path / "stores"
    stores.mkdir()
    labels = {s["slide_id"]: s["label"] for s in cohort.info["slides"]}
    pick = [next(s for s, y in labels.items() if y == 1), next(s for s, y in labels.items() if y == 0)]
    for sid in pick:
        shutil.copytree(cohort.stores / f"{sid}.zarr", stores / f"{sid}.zarr")
    lab = tmp_path / "labels.csv"
    lab.write_text("slide_id,label\n" + "".join(f"{s},{labels[s]}\n" for s in pick))
    out = tmp_path / "out"
    rep = run_classify(stores, run, out, workers=0, quiet=True, progress=False, labels=lab)
    assert rep.ok
    from wsi.store import TileStore

    for sid in pick:
        gj = json.loads((out / "detections" / f"{sid}.geojson").read_text())
        st = TileStore(stores / f"{sid}.zarr")
        assert len(gj["features"]) == len(st)
        meas = [f["properties"]["measurements"] for f in gj["features"]]
        assert all(0 <= m["theta1_mean"] <= m["theta1_max"] <= 1 for m in meas)
        res = json.loads((out / "slides" / f"{sid}.json").read_text())
        scored = {t["tile_index"]: t for t in res["topk"]}
        with_t2 = {f["properties"]["tile_index"]: f["properties"]["measurements"] for f in gj["features"]
                   if "theta2_probability" in f["properties"]["measurements"]}
        assert set(with_t2) == set(scored)
        for i, m in with_t2.items():
            assert m["theta2_probability"] == pytest.approx(scored[i]["theta2_probability"], abs=1e-4)
            assert m["theta1_max"] == pytest.approx(scored[i]["theta1_max"], abs=1e-4)
    page = (out / "report.html").read_text()
    assert "Against the labels" in page and "Truth" in page and "TP " in page
    assert json.loads((out / "provenance.json").read_text())["threshold"] == rep.settings["threshold"]
    # evaluate --report rebuilds the same labelled page from the classify output
    r = CliRunner().invoke(main, ["evaluate", "--predictions", str(out / "predictions.csv"), "--labels", str(lab),
                                  "--report", "--out", str(tmp_path / "eval")])
    assert r.exit_code == 0, r.output
    assert "Against the labels" in (tmp_path / "eval" / "report.html").read_text()


def test_stores_all_tiled_otherwise_stop_once(run_and_stores, tmp_path):
    from pipeline.classify import run_classify
    from pipeline.tile import run_tile

    cohort, run = run_and_stores
    slides = tmp_path / "slides"
    slides.mkdir()
    for sid in ("slide_000", "slide_001", "slide_002"):
        (slides / f"{sid}.tif").symlink_to(cohort.cohort / f"{sid}.tif")
    cfg = load_config("tiny", {"runtime.workers": 0, "tiling.tile_px": 64, "tiling.overlap_px": 0})
    assert run_tile(slides, tmp_path / "other", cfg, workers=0, quiet=True, progress=False).ok
    with pytest.raises(UsageError) as e:
        run_classify(tmp_path / "other", run, tmp_path / "out", workers=0, quiet=True, progress=False)
    msg = str(e.value)
    assert "all 3 store(s)" in msg and "tile_px 64 (run: 128)" in msg and "\n" not in msg
    assert not (tmp_path / "out" / "classify-report.json").exists()
