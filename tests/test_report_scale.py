"""report.html at cohort scale (500 synthetic results), with labels, and in a real headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.report import (MAX_SLIDES_ONE_PAGE, PAGES_DIR, SLIDES_PER_PAGE, TILE_DISPLAY_PX, labelled_performance,
                             write_report_html)
from wsi.preview import colorbar, heatmap_overlay, render_heatmap_overlay

PROV = {"software_version": "0.1.0", "generated_utc": "2026-01-02T00:00:00Z", "run_dir": "/runs/r", "round": 1,
        "round_requested": "best", "best_round": 1, "threshold": 0.5, "threshold_source": "run validation",
        "top_k": 16, "seg_arch": "dla34_up", "cls_arch": "dla34_cls", "tiling": {"tile_px": 512}, "config": {}}


def _jpeg(path: Path, rng, size) -> None:
    """A textured picture (blurred noise: tissue-like detail, harder for JPEG than flat colour)."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    noise = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(cv2.GaussianBlur(noise, (0, 0), 1.5)).save(path, quality=88)


def _cohort(out: Path, n: int, k: int = 16, seed: int = 0):
    """n results like classify's: 1024 px overlay + thumbnail, k tiles of 128 px (textured); written once per
    image and shared by the slides (the report embeds each slide's own copy)."""
    rng = np.random.default_rng(seed)
    _jpeg(out / "heatmaps" / "shared.png", rng, (1024, 768))
    _jpeg(out / "heatmaps" / "shared_thumbnail.jpg", rng, (1024, 768))
    for rank in range(1, k + 1):
        _jpeg(out / "tiles" / f"{rank:02d}.jpg", rng, (128, 128))
    probs = rng.random(n)
    labels = {f"s{i:04d}": int(rng.random() < 0.3 + 0.5 * probs[i]) for i in range(n)}
    results = []
    for i in np.argsort(-probs):
        sid = f"s{i:04d}"
        results.append({
            "slide_id": sid, "probability": float(probs[i]), "n_tiles": 100, "tile_px": 512, "mpp": 0.5,
            "topk": [{"rank": r, "x_level0_px": r, "y_level0_px": 0, "theta1_max": 0.9, "theta2_probability": 0.8,
                      "image": f"tiles/{r:02d}.jpg"} for r in range(1, k + 1)],
            "heatmap": {"png": "heatmaps/shared.png", "thumbnail": "heatmaps/shared_thumbnail.jpg",
                        "max_probability": 0.9, "positive_fraction_of_tissue": 0.1},
            "regions": {"n_regions": 1, "threshold": 0.5}, "scored_utc": "2026-01-01T00:00:00Z",
        })
    return results, labels


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.hrefs, self.ids, self.text = [], [], set(), []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.imgs.append(a)
        if tag == "a":
            self.hrefs.append(a["href"])

    def handle_data(self, data):
        self.text.append(data)


def _parse(path: Path) -> _Page:
    p = _Page()
    p.feed(path.read_text())
    p.close()
    return p


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("small")
    results, labels = _cohort(out, 12)
    write_report_html(out / "report.html", results, PROV, out, labels=labels)
    return out


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    out = tmp_path_factory.mktemp("big")
    results, labels = _cohort(out, 500)
    t0 = time.perf_counter()
    write_report_html(out / "report.html", results, PROV, out, labels=labels)
    return out, results, labels, time.perf_counter() - t0


@pytest.mark.slow
def test_500_slides_split_into_an_index_and_pages_of_bounded_size(big):
    out, results, labels, secs = big
    index = _parse(out / "report.html")
    pages = sorted((out / PAGES_DIR).glob("page-*.html"))
    assert len(pages) == -(-500 // SLIDES_PER_PAGE)
    # the index: every slide once, in probability order, linked to the page that shows it; no images
    rows = [h for h in index.hrefs if "#slide-" in h]
    assert len(rows) == 500 and not index.imgs
    for i, h in enumerate(rows, start=1):
        page, anchor = h.split("#")
        assert page == f"{PAGES_DIR}/page-{(i - 1) // SLIDES_PER_PAGE + 1:03d}.html" and anchor == f"slide-{i}"
        assert anchor in _parse(out / page).ids if i in (1, 50, 51, 500) else True
    text = " ".join(index.text)
    assert [results[0]["slide_id"], results[-1]["slide_id"]] == [t for t in index.text if t in (results[0]["slide_id"], results[-1]["slide_id"])]
    assert "Truth" in text and "AUC" in text and "TP" in text
    # sizes: the index stays small, each page holds its slides only, tiles embedded at display size
    idx_kb = (out / "report.html").stat().st_size / 1024
    page_mb = [p.stat().st_size / 2**20 for p in pages]
    per_slide_kb = sum(p.stat().st_size for p in pages) / 500 / 1024
    print(f"500 slides: written in {secs:.1f} s; index {idx_kb:.0f} KB, pages max {max(page_mb):.2f} MB, "
          f"{per_slide_kb:.0f} KB per slide (16 tiles + 2 pictures)")
    assert idx_kb < 400
    assert per_slide_kb < 300 and max(page_mb) < 15
    first = _parse(pages[0])
    assert len(first.imgs) == SLIDES_PER_PAGE * (2 + 16)
    tile = first.imgs[2]
    assert tile["width"] == str(TILE_DISPLAY_PX)
    with Image.open(io.BytesIO(base64.b64decode(tile["src"].split(",", 1)[1]))) as im:
        assert im.size == (TILE_DISPLAY_PX, TILE_DISPLAY_PX)
    # pages link back to the index and to each other, and nothing else
    assert "../report.html" in first.hrefs and "page-002.html" in first.hrefs
    assert all(not h.startswith(("http", "//")) for p in pages[:2] for h in _parse(p).hrefs)


@pytest.mark.slow
def test_small_cohort_is_one_page_and_a_shrunk_cohort_drops_old_pages(tmp_path):
    out = tmp_path
    results, labels = _cohort(out, 520)
    write_report_html(out / "report.html", results, PROV, out)
    assert (out / PAGES_DIR).is_dir()
    write_report_html(out / "report.html", results[:MAX_SLIDES_ONE_PAGE], PROV, out)
    assert not (out / PAGES_DIR).exists()
    p = _parse(out / "report.html")
    assert all(h.startswith("#") for h in p.hrefs) and len(p.imgs) == MAX_SLIDES_ONE_PAGE * 18
    assert "Truth" not in " ".join(p.text)
    assert not list(out.glob(".tmp-*"))


def test_labelled_performance_matches_the_counts():
    results = [{"slide_id": s, "probability": p} for s, p in
               [("a", 0.9), ("b", 0.8), ("c", 0.6), ("d", 0.4), ("e", 0.3), ("f", 0.1), ("g", None)]]
    labels = {"a": 1, "b": 1, "c": 0, "d": 1, "e": 0, "f": 0, "g": 1}
    perf = labelled_performance(results, labels, 0.5)
    at = perf["at_threshold"]
    assert (at["tp"], at["fn"], at["fp"], at["tn"]) == (2, 1, 1, 2)
    assert perf["n_slides"] == 6 and perf["auc"] == pytest.approx(8 / 9)
    lo, hi = perf["auc_ci95"]
    assert 0.3 <= lo < perf["auc"] <= hi <= 1.0
    assert labelled_performance(results, {"zz": 1}, 0.5) is None


def test_heatmap_colours_are_viridis_with_opacity_rising_with_probability():
    thumb = np.full((10, 10, 3), 200, np.uint8)
    low = heatmap_overlay(thumb, np.zeros((10, 10)))
    high = heatmap_overlay(thumb, np.ones((10, 10)))
    # viridis: 0 = dark purple, 1 = yellow; at 0 the tissue shows through (only a faint tint)
    assert np.abs(low.astype(int) - 200).max() < 40
    r, g, b = high[0, 0]
    assert r > 150 and g > 150 and b < 120  # yellow dominates
    img = render_heatmap_overlay(np.full((100, 80, 3), 230, np.uint8), np.full((100, 80), 0.7), np.ones((100, 80), bool))
    bar = colorbar(img.shape[1])
    assert img.shape[0] == 100 * 6 + bar.shape[0] and img.shape[1] == 80 * 6  # upscaled to >= 512 px, bar below
    np.testing.assert_array_equal(img[-bar.shape[0]:], bar)


# --------------------------------------------------------------------------- a real browser

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def _chromium(*args, timeout=120):
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-dev-shm-usage", "--enable-logging=stderr", "--v=0", *args],
                          capture_output=True, text=True, timeout=timeout)


_CHECK_JS = """
<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  document.body.setAttribute('data-check', JSON.stringify({imgs: imgs.length, broken: broken,
    width: document.documentElement.scrollWidth, height: document.documentElement.scrollHeight}));
});
</script>
"""


def _check_in_chromium(out: Path, which: str, n_imgs: int, tmp_path: Path) -> None:
    src = (out / which).read_text()
    probe = (out / which).with_name("probe-" + Path(which).name)
    probe.write_text(src.replace("</body>", _CHECK_JS + "</body>"))
    t0 = time.perf_counter()
    r = _chromium("--virtual-time-budget=20000", "--dump-dom", probe.as_uri())
    secs = time.perf_counter() - t0
    probe.unlink()
    m = re.search(r'data-check="([^"]+)"', r.stdout)
    assert m, r.stderr[-2000:]
    check = json.loads(m.group(1).replace("&quot;", '"'))
    print(f"{which}: {check} loaded in {secs:.1f} s ({(out / which).stat().st_size / 2**20:.2f} MB)")
    assert check["imgs"] == n_imgs and check["broken"] == 0 and check["height"] > 1000
    assert secs < 60
    console_errors = [ln for ln in r.stderr.splitlines() if "CONSOLE" in ln and ("ERROR" in ln or "Uncaught" in ln)]
    assert not console_errors, console_errors
    shot = tmp_path / "shot.png"
    _chromium("--window-size=1280,900", f"--screenshot={shot}", (out / which).as_uri())
    with Image.open(shot) as im:
        arr = np.asarray(im.convert("RGB"))
    assert arr.shape[:2] == (900, 1280) and arr.std() > 10  # something was drawn, not a blank page


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)")
def test_labelled_report_loads_in_headless_chromium(small, tmp_path):
    """The page renders, every image decodes in the browser, and the console shows no error.

    The report itself has no script; a copy with a small load-time checker appended is what the browser opens
    (``--dump-dom`` prints the DOM after the load event)."""
    _check_in_chromium(small, "report.html", 12 * 18, tmp_path)
    assert "<svg" in (small / "report.html").read_text()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)")
@pytest.mark.parametrize("which", ["report.html", f"{PAGES_DIR}/page-001.html"])
def test_500_slide_report_loads_in_headless_chromium(big, tmp_path, which):
    _check_in_chromium(big[0], which, 0 if which == "report.html" else SLIDES_PER_PAGE * 18, tmp_path)
