"""The classify stage end to end: a generated cohort, a real (tiny) trained run, real files on disk.

The trained run is the EM tests' shared one (``tests/em_fixtures.py``: 20
generated slides, tiny config, two rounds), made once per session and cached on
disk; here it is classified once per module from the slides themselves.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import shapely
from PIL import Image
from shapely.geometry import shape

from pipeline.batch import UsageError
from pipeline.config import load_config
from pipeline.leases import Leases
from wsi.heatmap import assemble_heatmap, heatmap_regions, read_heatmap_zarr, regions_geojson, write_heatmap_zarr
from tests.em_fixtures import em_cohort, em_run  # noqa: F401  (fixtures)
from wsi.store import TileStore

# --------------------------------------------------------------------------- wsi.heatmap (no model needed)


def test_assemble_heatmap_geometry_overlap_and_gaps():
    # two 512-px (level-0) tiles overlapping by 128 px, maps 32x32 (16 level-0 px per cell),
    # heatmap at 16 level-0 px per pixel with its origin at (64, 32)
    coords = np.array([[64, 32], [448, 32]])
    maps = np.stack([np.full((32, 32), 0.2), np.full((32, 32), 0.7)]).astype(np.float16)
    maps[0, 5, 7] = 0.9  # cell (row 5, col 7) of the first tile
    heat = assemble_heatmap(coords, maps, tile_level0_px=512, origin_level0_xy=(64, 32), downsample=16, shape=(40, 60))
    assert heat.dtype == np.float32 and heat.shape == (40, 60)
    assert heat[5, 7] == pytest.approx(0.9, abs=1e-3)
    assert heat[0, 0] == pytest.approx(0.2, abs=1e-3)
    # columns 24..31 are covered by both tiles: maximum
    assert np.allclose(heat[:32, 24:32], 0.7, atol=1e-3)
    assert np.allclose(heat[:32, 32:56], 0.7, atol=1e-3)
    assert np.isnan(heat[32:]).all() and np.isnan(heat[:, 56:]).all()
    mean = assemble_heatmap(coords, maps, tile_level0_px=512, origin_level0_xy=(64, 32), downsample=16,
                            shape=(40, 60), reduce="mean")
    assert np.allclose(mean[:32, 24:32], 0.45, atol=1e-3)
    # maps finer than the heatmap are area-averaged: a 2x2 checkerboard of 0/1 cells -> 0.5
    fine = np.zeros((1, 64, 64), np.float32)
    fine[0, ::2, ::2] = fine[0, 1::2, 1::2] = 1
    h = assemble_heatmap(np.array([[0, 0]]), fine, tile_level0_px=512, origin_level0_xy=(0, 0), downsample=16, shape=(32, 32))
    assert np.allclose(h, 0.5, atol=1e-6)
    empty = assemble_heatmap(np.zeros((0, 2)), np.zeros((0, 4, 4)), tile_level0_px=512, origin_level0_xy=(0, 0),
                             downsample=16, shape=(3, 4))
    assert np.isnan(empty).all()


def test_regions_are_exact_level0_polygons_with_holes(tmp_path):
    heat = np.zeros((20, 30), np.float32)
    heat[2:10, 3:15] = 0.9
    heat[5:7, 6:8] = 0.1  # a 2x2 hole
    heat[15, 20] = 0.8  # a single pixel
    heat[12:14, 25:27] = np.nan  # unscored: never positive
    tissue = np.ones_like(heat, bool)
    tissue[15, 20] = False  # outside the tissue: dropped
    regs = heatmap_regions(heat, 0.5, downsample=16, origin_level0_xy=(100, 200), within=tissue)
    assert len(regs) == 1
    poly = regs[0]["polygon"]
    assert poly.is_valid and len(poly.interiors) == 1
    assert poly.area == pytest.approx((8 * 12 - 4) * 16 * 16)
    assert poly.bounds == (100 + 3 * 16, 200 + 2 * 16, 100 + 15 * 16, 200 + 10 * 16)
    assert regs[0]["max_probability"] == pytest.approx(0.9) and regs[0]["n_pixels"] == 92
    gj = regions_geojson(regs, name="Tumor (predicted)")
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == 1
    f = gj["features"][0]
    assert f["geometry"]["type"] == "Polygon" and len(f["geometry"]["coordinates"]) == 2
    assert f["properties"]["classification"]["name"] == "Tumor (predicted)"
    assert shape(f["geometry"]).area == pytest.approx(poly.area)
    assert heatmap_regions(np.full((4, 4), np.nan), 0.5, downsample=1) == []
    # storage round trip
    p = write_heatmap_zarr(tmp_path / "h.zarr", heat, tissue, {"downsample": 16, "origin_level0_xy": [100, 200]})
    h2, t2, attrs = read_heatmap_zarr(p)
    np.testing.assert_array_equal(np.isnan(h2), np.isnan(heat))
    np.testing.assert_array_equal(np.nan_to_num(h2), np.nan_to_num(heat))
    assert (t2 == tissue).all() and attrs["downsample"] == 16
    write_heatmap_zarr(tmp_path / "h.zarr", heat * 0, None, {})  # replaces in place
    assert np.nanmax(read_heatmap_zarr(p)[0]) == 0 and not list(tmp_path.glob(".*"))


# --------------------------------------------------------------------------- a trained run


@pytest.fixture(scope="module")
def trained(em_cohort, em_run):
    labels = {s["slide_id"]: s["label"] for s in em_cohort.info["slides"]}
    best = json.loads((em_run / "best").read_text())["round"]
    return SimpleNamespace(cohort=em_cohort.cohort, stores=em_cohort.stores, run=em_run, labels=labels, best=best,
                           width_px=em_cohort.info["width_px"], height_px=em_cohort.info["height_px"])


@pytest.fixture(scope="module")
def classified(trained, tmp_path_factory):
    from pipeline.classify import run_classify

    out = tmp_path_factory.mktemp("classified") / "out"
    rep = run_classify(trained.cohort, trained.run, out, workers=0, quiet=True, progress=False)
    return SimpleNamespace(out=out, report=rep)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


class _Page(HTMLParser):
    """Collects what a reader sees: text, image sources, links, table rows of the summary."""

    def __init__(self):
        super().__init__()
        self.text, self.imgs, self.hrefs, self.title = [], [], [], ""
        self.summary_ids: list[str] = []
        self._tags: list[str] = []
        self._in_summary = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self._tags.append(tag)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag in ("a", "link", "script"):
            self.hrefs.append(a.get("href") or a.get("src") or "")
        if tag == "section" and a.get("id") == "summary":
            self._in_summary = True
        elif tag == "section":
            self._in_summary = False

    def handle_endtag(self, tag):
        if self._tags and self._tags[-1] == tag:
            self._tags.pop()

    def handle_data(self, data):
        self.text.append(data)
        if self._tags and self._tags[-1] == "title":
            self.title += data
        if self._in_summary and self._tags and self._tags[-1] == "a":
            self.summary_ids.append(data)


def test_classify_end_to_end(trained, classified):
    out, rep = classified.out, classified.report
    n = len(trained.labels)
    assert rep.ok and rep.counts() == {"done": n, "skipped": 0, "failed": 0}
    rows = _rows(out / "predictions.csv")
    assert sorted(r["slide_id"] for r in rows) == sorted(trained.labels)
    metrics = json.loads((trained.run / f"round_{trained.best}" / "metrics.json").read_text())
    thr = metrics["val"]["threshold_at_full_sensitivity"]
    probs = {}
    for r in rows:
        p = float(r["probability"])
        assert 0.0 <= p <= 1.0
        assert float(r["threshold"]) == thr and "validation" in r["threshold_source"]
        assert r["decision"] == ("positive" if p >= thr else "negative")
        assert r["round"] == str(trained.best)
        probs[r["slide_id"]] = p
        # the slide probability is the mean theta2 score of the top-K tiles, K = stage2.top_k = 4
        t2 = [float(v) for v in r["topk_theta2_probability"].split(";")]
        assert len(t2) == 4 and np.mean(t2) == pytest.approx(p, abs=1e-3)
        store = TileStore(out / "stores" / f"{r['slide_id']}.zarr")
        xy = set(map(tuple, store.coords.tolist()))
        for x, y in zip(r["topk_x_level0_px"].split(";"), r["topk_y_level0_px"].split(";")):
            assert (int(x), int(y)) in xy
        t1 = [float(v) for v in r["topk_theta1_max"].split(";")]
        assert t1 == sorted(t1, reverse=True)
    assert [r["slide_id"] for r in rows] == sorted(probs, key=lambda s: -probs[s])  # sorted by probability
    pos = [probs[s] for s, y in trained.labels.items() if y == 1]
    neg = [probs[s] for s, y in trained.labels.items() if y == 0]
    print(f"mean probability: positive {np.mean(pos):.3f}, negative {np.mean(neg):.3f}")
    assert np.mean(pos) > np.mean(neg)

    # heatmaps: array at thumbnail scale + PNG overlay
    for sid in trained.labels:
        store = TileStore(out / "stores" / f"{sid}.zarr")
        heat, tissue, attrs = read_heatmap_zarr(out / "heatmaps" / f"{sid}.zarr")
        assert heat.shape == store.mask.shape == tissue.shape
        assert attrs["downsample"] == store.mask_downsample and attrs["slide_id"] == sid
        v = heat[~np.isnan(heat)]
        assert v.size > 0 and v.min() >= 0 and v.max() <= 1
        with Image.open(out / "heatmaps" / f"{sid}.png") as im:
            assert im.mode == "RGB" and max(im.size) >= 512

    # GeoJSON regions in level-0 px: the most confident positive slide's regions hit its true lesions
    best = max((s for s, y in trained.labels.items() if y == 1),
               key=lambda s: json.loads((out / "slides" / f"{s}.json").read_text())["heatmap"]["max_probability"])
    gj = json.loads((out / "regions" / f"{best}.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and gj["features"]
    pred = shapely.union_all([shape(f["geometry"]) for f in gj["features"]])
    assert all(f["geometry"]["type"] == "Polygon" and f["properties"]["classification"]["name"] == "Tumor (predicted)"
               for f in gj["features"])
    assert 0 <= pred.bounds[0] and pred.bounds[2] <= trained.width_px and pred.bounds[3] <= trained.height_px
    truth_gj = json.loads((trained.cohort / "annotations" / f"{best}.geojson").read_text())
    truth = shapely.union_all([shape(f["geometry"]) for f in truth_gj["features"]])
    overlap = pred.intersection(truth).area / pred.area
    print(f"{best}: {overlap:.2f} of the predicted region area lies in true lesions")
    assert overlap > 0.3

    # report.html: a real parser, every slide named, in probability order, images embedded
    page = _Page()
    page.feed((out / "report.html").read_text())
    page.close()
    text = " ".join(page.text)
    assert "Slide classification report" in page.title
    assert page.summary_ids == [r["slide_id"] for r in rows]
    for sid in trained.labels:
        assert sid in text
    assert f"{thr:.4f}" in text and "Provenance" in text and "round" in text.lower()
    assert len(page.imgs) >= n * (2 + 4)
    assert all(src.startswith("data:image/jpeg;base64,") for src in page.imgs)
    assert all(h.startswith("#") for h in page.hrefs)  # no external resources
    with Image.open(io.BytesIO(base64.b64decode(page.imgs[0].split(",", 1)[1]))) as im:
        assert im.size[0] > 100
    rj = json.loads((out / "classify-report.json").read_text())
    assert rj["command"] == "classify" and rj["counts"]["done"] == n
    assert not [p for p in out.rglob(".tmp-*")]


def test_rerun_skips_and_a_corrupt_slide_fails_alone(trained, classified, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    out = tmp_path / "out"
    shutil.copytree(classified.out, out)
    slides = tmp_path / "slides"
    slides.mkdir()
    for sid in trained.labels:
        (slides / f"{sid}.tif").symlink_to(trained.cohort / f"{sid}.tif")
    data = (trained.cohort / "slide_000.tif").read_bytes()
    (slides / "broken.tif").write_bytes(data[: len(data) // 3])
    before = {p.name: p.stat().st_mtime_ns for p in (out / "slides").glob("*.json")}
    csv_before = _rows(out / "predictions.csv")
    r = CliRunner().invoke(main, ["classify", str(slides), "--run", str(trained.run), "--out", str(out),
                                  "--workers", "0", "--quiet"])
    assert r.exit_code == 1, r.output
    n = len(trained.labels)
    assert f"0 done, {n} skipped, 1 failed" in r.output and "FAILED broken" in r.output
    rep = json.loads((out / "classify-report.json").read_text())
    failed = [s for s in rep["slides"] if s["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["slide_id"] == "broken" and "broken.tif" in failed[0]["reason"]
    assert "\n" not in failed[0]["reason"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "slides").glob("*.json")} == before
    tiling = json.loads((out / "stores" / "tile-report.json").read_text())
    assert tiling["counts"] == {"done": 0, "skipped": n, "failed": 1}  # current stores are reused
    # predictions.csv is rebuilt from the stored results: same slides, probabilities and decisions
    key = ("slide_id", "probability", "decision", "threshold")
    now = [tuple(r[k] for k in key) for r in _rows(out / "predictions.csv")]
    assert len(now) == n and now == [tuple(r[k] for k in key) for r in csv_before]
    page = _Page()
    page.feed((out / "report.html").read_text())
    assert "broken" in " ".join(page.text) and "Failed in the last run" in " ".join(page.text)


def test_store_input_refuses_other_tiling(trained, classified, tmp_path):
    from pipeline.classify import run_classify
    from pipeline.tile import run_tile

    stores = tmp_path / "stores"
    stores.mkdir()
    shutil.copytree(trained.stores / "slide_002.zarr", stores / "slide_002.zarr")
    other = tmp_path / "other"
    slide_dir = tmp_path / "one"
    slide_dir.mkdir()
    (slide_dir / "slide_005.tif").symlink_to(trained.cohort / "slide_005.tif")
    cfg = load_config("tiny", {"runtime.workers": 0, "tiling.tile_px": 64, "tiling.overlap_px": 0})
    assert run_tile(slide_dir, other, cfg, workers=0, quiet=True, progress=False).ok
    shutil.copytree(other / "slide_005.zarr", stores / "slide_005.zarr")
    # a slide without tissue, tiled with the run's settings: a result, not a failure
    from wsi.synth import write_slide

    write_slide(slide_dir / "empty.tif", 2048, 2048, mpp=0.5, seed=3, tissue="none")
    run_cfg = load_config("tiny", {"runtime.workers": 0})
    assert run_tile(slide_dir / "empty.tif", stores, run_cfg, workers=0, quiet=True, progress=False).ok
    rep = run_classify(stores, trained.run, tmp_path / "out", workers=0, quiet=True, progress=False)
    by = {s.slide_id: s for s in rep.slides}
    assert by["slide_002"].status == "done"
    assert by["empty"].status == "done" and by["empty"].reason == "no tissue tiles"
    assert by["slide_005"].status == "failed"
    assert "tile_px 64 (run: 128)" in by["slide_005"].reason and "slide_005.zarr" in by["slide_005"].reason
    # a store tiled with the run's settings scores exactly as when classify tiled the slide itself
    ref = {r["slide_id"]: r for r in _rows(classified.out / "predictions.csv")}
    got = {r["slide_id"]: r for r in _rows(tmp_path / "out" / "predictions.csv")}
    assert list(got) == ["slide_002", "empty"]  # no-tissue slides last
    assert got["empty"]["probability"] == "" and got["empty"]["decision"] == "no tissue"
    assert float(got["slide_002"]["probability"]) == pytest.approx(float(ref["slide_002"]["probability"]), abs=1e-6)
    assert not rep.ok


def test_threshold_round_and_lock_rules(trained, tmp_path):
    from pipeline.classify import run_classify

    run = tmp_path / "run"
    shutil.copytree(trained.run, run)
    stores = tmp_path / "stores"
    stores.mkdir()
    shutil.copytree(trained.stores / "slide_001.zarr", stores / "slide_001.zarr")
    out = tmp_path / "out"
    kw = dict(workers=0, quiet=True, progress=False)
    with pytest.raises(UsageError, match="--round"):
        run_classify(stores, run, out, round_="latest", **kw)
    with pytest.raises(UsageError, match="round 3 is not finished"):
        run_classify(stores, run, out, round_=3, **kw)
    with pytest.raises(UsageError, match="between 0 and 1"):
        run_classify(stores, run, out, threshold=1.5, **kw)
    out.mkdir()
    with Leases(out, "classify") as other:  # another job holds the slide: left to it
        assert other.claim("slide-slide_001").ok
        rep = run_classify(stores, run, out, threshold=0.5, **kw)
        assert rep.ok and [s.status for s in rep.slides] == ["busy"] and "pid" in rep.slides[0].reason
        assert _rows(out / "predictions.csv") == []
    # a run without a validation threshold: never a silent 0.5
    mpath = run / f"round_{trained.best}" / "metrics.json"
    m = json.loads(mpath.read_text())
    m["val"] = None
    mpath.write_text(json.dumps(m))
    with pytest.raises(UsageError, match="pass --threshold"):
        run_classify(stores, run, out, **kw)
    rep = run_classify(stores, run, out, threshold=0.25, round_="0", **kw)
    assert rep.ok
    row = _rows(out / "predictions.csv")[0]
    assert float(row["threshold"]) == 0.25 and row["threshold_source"].startswith("--threshold")
    assert row["decision"] == ("positive" if float(row["probability"]) >= 0.25 else "negative") and row["round"] == "0"
    # the same slide and round with another threshold is not re-scored, only re-decided
    rep = run_classify(stores, run, out, threshold=0.99, round_=0, **kw)
    assert rep.counts()["skipped"] == 1
    row2 = _rows(out / "predictions.csv")[0]
    assert row2["probability"] == row["probability"] and float(row2["threshold"]) == 0.99
    # another round is another model: scored again, and only its results are listed
    rep = run_classify(stores, run, out, threshold=0.5, round_=1, **kw)
    assert rep.counts()["done"] == 1
    rows = _rows(out / "predictions.csv")
    assert len(rows) == 1 and rows[0]["round"] == "1"


def test_evaluate_on_classify_output(trained, classified, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    r = CliRunner().invoke(main, ["evaluate", "--predictions", str(classified.out / "predictions.csv"),
                                  "--labels", str(trained.cohort / "labels.csv"),
                                  "--masks", str(trained.cohort / "annotations"), "--out", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    assert "AUC:" in r.output and "100% sensitivity" in r.output and "Dice" in r.output
    res = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    n = len(trained.labels)
    assert res["n_slides"] == n and 0.5 < res["auc"] <= 1.0
    px = res["pixel"]
    assert px["n_slides"] == n and not px["skipped"]
    print(f"pixel Dice: pooled {px['pooled_dice']:.3f}, positive-slide mean {px['mean_dice_positive_slides']:.3f}")
    assert px["mean_dice_positive_slides"] > 0.15  # a misplaced heatmap (wrong origin/scale) gives ~0
    assert px["false_positive_fraction_negative_slides"] < 0.05
    with Image.open(tmp_path / "ev" / "roc.png") as im:
        assert im.size == (600, 600)


def test_help_has_examples():
    from click.testing import CliRunner

    from pipeline.cli import main

    for cmd in ("classify", "evaluate"):
        r = CliRunner().invoke(main, [cmd, "--help"])
        assert r.exit_code == 0 and "Examples:" in r.output and f"wsi-pipeline {cmd}" in r.output


def test_every_output_file_is_readable_as_the_umask_says(trained, tmp_path):
    """Predictions, reports, GeoJSON, heatmaps, tiles and stores: 0o666 & ~umask, like any new file."""
    import os
    import stat

    from pipeline.classify import run_classify

    slides = tmp_path / "slides"
    slides.mkdir()
    for sid in sorted(trained.labels)[:2]:
        shutil.copy(Path(trained.cohort) / f"{sid}.tif", slides / f"{sid}.tif")
    old = os.umask(0o002)
    try:
        rep = run_classify(slides, trained.run, tmp_path / "out", workers=0, quiet=True, progress=False)
    finally:
        os.umask(old)
    assert rep.ok
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.name != ".wsi-pipeline.lock"]
    names = {p.name for p in files}
    assert {"predictions.csv", "report.html", "classify-report.json"} <= names
    assert any(p.suffix == ".geojson" for p in files) and any(p.suffix == ".jpg" for p in files)
    wrong = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if stat.S_IMODE(p.stat().st_mode) != 0o664}
    assert not wrong
