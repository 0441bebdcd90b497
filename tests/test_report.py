"""predictions.csv and report.html from per-slide results, checked with the stdlib CSV reader and HTML parser."""

from __future__ import annotations

import base64
import csv
import io
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.report import PREDICTION_COLUMNS, decision_for, render_report_html, write_predictions_csv, write_report_html

EVIL = '<script>alert("x")</script>&co'


def _img(path: Path, colour, size=(64, 48)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), colour, np.uint8)).save(path)
    return path.name


def _result(out: Path, sid: str, p, k: int = 2) -> dict:
    d = out / "heatmaps"
    _img(d / f"{sid}.png", (200, 30, 30), (600, 400))
    _img(d / f"{sid}_thumbnail.jpg", (230, 200, 220))
    topk = []
    for rank in range(1, k + 1):
        _img(out / "tiles" / sid / f"{rank:02d}.jpg", (120, 40, 160), (32, 32))
        topk.append({"rank": rank, "tile_index": rank, "x_level0_px": 100 * rank, "y_level0_px": 7,
                     "size_level0_px": 512.0, "theta1_max": 0.9 / rank, "theta2_probability": 0.8 / rank,
                     "image": f"tiles/{sid}/{rank:02d}.jpg"})
    return {
        "slide_id": sid, "probability": p, "n_tiles": 10, "round": 1, "run_dir": "/runs/r", "tile_px": 128, "mpp": 2.0,
        "topk": topk if p is not None else [],
        "heatmap": {"png": f"heatmaps/{sid}.png", "zarr": f"heatmaps/{sid}.zarr", "thumbnail": f"heatmaps/{sid}_thumbnail.jpg",
                    "max_probability": 0.9, "positive_fraction_of_tissue": 0.1},
        "regions": {"geojson": f"regions/{sid}.geojson", "n_regions": 1, "threshold": 0.5},
        "scored_utc": "2026-01-01T00:00:00Z",
    }


PROV = {
    "software_version": "0.1.0", "generated_utc": "2026-01-02T00:00:00Z", "run_dir": "/runs/<r>", "round": 1,
    "round_requested": "best", "best_round": 1, "threshold": 0.5, "threshold_source": "run validation & more",
    "top_k": 2, "seg_arch": "dla34_up_tiny", "cls_arch": "dla34_cls_tiny", "tiling": {"tile_px": 128},
    "validation": {"auc": 0.9, "n_pos": 2}, "config": {"note": EVIL}, "device": "cpu",
}


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text, self.imgs, self.scripts, self.rows = [], [], [], 0, []
        self._stack = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._stack.append(tag)
        if tag == "script":
            self.scripts += 1
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        if tag == "tr":
            self.rows.append([])

    def handle_endtag(self, tag):
        while self._stack and self._stack.pop() != tag:
            pass

    def handle_data(self, data):
        self.text.append(data)
        if self.rows and "td" in self._stack:
            self.rows[-1].append(data)


def test_report_lists_slides_by_probability_and_escapes_text(tmp_path):
    results = [_result(tmp_path, "b", 0.91), _result(tmp_path, EVIL, 0.5), _result(tmp_path, "a", 0.2),
               _result(tmp_path, "empty", None)]
    path = write_report_html(tmp_path / "report.html", results, PROV, tmp_path, failures=[("bad", "bad.svs: damaged <x>")])
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "<script>" not in page and "&lt;script&gt;" in page and "&amp;co" in page
    p = _Collect()
    p.feed(page)
    p.close()
    assert p.scripts == 0
    text = " ".join(p.text)
    for sid in ("b", EVIL, "a", "empty", "bad"):
        assert sid in text  # the parser unescapes: the exact ids are what a reader sees
    assert "bad.svs: damaged <x>" in text
    assert "run validation & more" in text and "/runs/<r>" in text and "0.1.0" in text
    # the summary table rows, in the given (probability) order, with decisions at threshold 0.5
    body = [r for r in p.rows if r and r[0].strip().isdigit()]
    assert len(body) == 4
    assert [r[1] for r in body[:4]] == ["b", EVIL, "a", "empty"]
    decisions = [next(c for c in r if c in ("positive", "negative", "no tissue")) for r in body[:4]]
    assert decisions == ["positive", "positive", "negative", "no tissue"]  # 0.5 >= 0.5 is positive
    # images: thumbnail + overlay per slide, the top-K tiles, all embedded JPEGs that decode
    assert len(p.imgs) == 4 * 2 + 3 * 2
    for src in p.imgs:
        assert src.startswith("data:image/jpeg;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            im.load()
    with Image.open(io.BytesIO(base64.b64decode(p.imgs[1].split(",", 1)[1]))) as im:
        assert max(im.size) <= 720  # overlays are shrunk for the page
    assert "http" not in page.replace("http-equiv", "")


def test_report_survives_missing_images_and_no_results(tmp_path):
    r = _result(tmp_path, "x", 0.7)
    (tmp_path / "heatmaps" / "x.png").unlink()
    page = render_report_html([r], PROV, tmp_path)
    p = _Collect()
    p.feed(page)
    assert "x" in " ".join(p.text) and len(p.imgs) == 1 + 2
    page = render_report_html([], PROV, tmp_path)
    assert "No slide has been scored" in page


def test_predictions_csv_round_trips(tmp_path):
    results = [_result(tmp_path, "b", 0.9123456789012345), _result(tmp_path, "a,1", 0.5), _result(tmp_path, "z", None)]
    write_predictions_csv(tmp_path / "predictions.csv", results, 0.5, 'val split, "quoted"')
    with open(tmp_path / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == PREDICTION_COLUMNS
    assert [r["slide_id"] for r in rows] == ["b", "a,1", "z"]
    assert float(rows[0]["probability"]) == 0.9123456789012345  # full precision
    assert [r["decision"] for r in rows] == ["positive", "positive", "no tissue"]
    assert rows[2]["probability"] == "" and rows[0]["threshold_source"] == 'val split, "quoted"'
    assert rows[0]["topk_x_level0_px"] == "100;200" and rows[0]["topk_theta2_probability"] == "0.8000;0.4000"
    assert rows[0]["heatmap_zarr"] == "heatmaps/b.zarr" and rows[0]["round"] == "1"


@pytest.mark.parametrize("p,t,want", [(0.5, 0.5, "positive"), (0.4999, 0.5, "negative"), (None, 0.5, "no tissue"),
                                      (float("nan"), 0.1, "no tissue"), (0.0, 0.0, "positive")])
def test_decision_rule(p, t, want):
    assert decision_for(p, t) == want
