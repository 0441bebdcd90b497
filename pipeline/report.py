"""What ``classify`` hands to people and tools: ``predictions.csv`` and a self-contained ``report.html``.

Both are rebuilt from the per-slide results (``OUT/slides/<id>.json``, see
:mod:`pipeline.classify`) at the end of every run, so they always list every
slide scored with the current run and round, not only this run's new ones.

``predictions.csv`` columns
---------------------------
``slide_id, probability, decision, threshold, threshold_source, round, run_dir,
n_tiles, topk_x_level0_px, topk_y_level0_px, topk_size_level0_px,
topk_theta1_max, topk_theta2_probability, heatmap_png, heatmap_zarr,
regions_geojson, detections_geojson, scored_utc`` -- the ``topk_*`` cells hold the K values
separated by ``;`` in rank order (highest theta1 maximum first); file columns
are relative to the CSV's folder. ``decision`` is ``positive`` when
``probability >= threshold`` (both written with full float precision, so the
rule can be re-applied exactly), ``negative`` otherwise, ``no tissue`` for a slide
without tissue tiles (empty probability).

``report.html``
---------------
No external resources, no script (images embedded as base64 JPEG at the size
they are shown: overlays 440 px wide, tiles 112 px): a summary table sorted by
probability, then per slide the thumbnail, the theta1 heatmap overlay (viridis,
opacity rising with probability, colour bar) and the top-K tiles with their
scores, then the run's provenance (software version, run, round, threshold and
where it came from, config). All text is HTML-escaped.

With labels (``classify --labels``, ``evaluate --report``) the summary has a
truth column and a section shows the ROC curve (inline SVG) with the AUC and
its bootstrap 95 % interval, the operating point and the confusion counts at
the threshold.

Up to :data:`MAX_SLIDES_ONE_PAGE` slides it is one page. Beyond that
``report.html`` is an index (summary table, performance, provenance) whose rows
link into ``report-pages/page-NNN.html``, :data:`SLIDES_PER_PAGE` slides each,
so no page grows with the cohort.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import shutil
import uuid
from pathlib import Path
from typing import Mapping, Sequence


from wsi.atomic import atomic_write_text

__all__ = ["PREDICTION_COLUMNS", "decision_for", "write_predictions_csv", "render_report_html", "render_report_pages",
           "write_report_html", "labelled_performance"]

PREDICTION_COLUMNS = [
    "slide_id",
    "probability",
    "decision",
    "threshold",
    "threshold_source",
    "round",
    "run_dir",
    "n_tiles",
    "topk_x_level0_px",
    "topk_y_level0_px",
    "topk_size_level0_px",
    "topk_theta1_max",
    "topk_theta2_probability",
    "heatmap_png",
    "heatmap_zarr",
    "regions_geojson",
    "detections_geojson",
    "scored_utc",
]

#: Width (CSS px) at which thumbnails and overlays are shown, and embedded.
OVERLAY_DISPLAY_PX = 440
#: Side (CSS px) at which top-K tiles are shown, and embedded.
TILE_DISPLAY_PX = 112
#: Cohorts up to this size get one page; larger ones an index and pages.
MAX_SLIDES_ONE_PAGE = 200
#: Slides per detail page of a large cohort's report.
SLIDES_PER_PAGE = 50
#: Folder (beside report.html) of a large cohort's detail pages.
PAGES_DIR = "report-pages"


def decision_for(probability: float | None, threshold: float) -> str:
    if probability is None or (isinstance(probability, float) and math.isnan(probability)):
        return "no tissue"
    return "positive" if float(probability) >= float(threshold) else "negative"


def _fmt(v, nd: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{nd}f}" if nd else repr(v)
    return str(v)


def write_predictions_csv(path: str | Path, results: Sequence[dict], threshold: float, threshold_source: str,
                          provenance: dict | None = None) -> Path:
    """Write ``predictions.csv`` (atomically), one row per result, in the given order."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(PREDICTION_COLUMNS)
    for r in results:
        topk = r.get("topk") or []
        p = r.get("probability")
        w.writerow([
            r["slide_id"],
            "" if p is None else repr(float(p)),
            decision_for(p, threshold),
            repr(float(threshold)),
            threshold_source,
            r.get("round"),
            r.get("run_dir") or (provenance or {}).get("run_dir", ""),
            r.get("n_tiles", 0),
            ";".join(str(t["x_level0_px"]) for t in topk),
            ";".join(str(t["y_level0_px"]) for t in topk),
            ";".join(f"{t['size_level0_px']:g}" for t in topk),
            ";".join(f"{t['theta1_max']:.4f}" for t in topk),
            ";".join(f"{t['theta2_probability']:.4f}" for t in topk),
            (r.get("heatmap") or {}).get("png") or "",
            (r.get("heatmap") or {}).get("zarr") or "",
            (r.get("regions") or {}).get("geojson") or "",
            (r.get("detections") or {}).get("geojson") or "",
            r.get("scored_utc", ""),
        ])
    atomic_write_text(path, buf.getvalue())
    return Path(path)


# --------------------------------------------------------------------------- HTML


def _data_uri(path: Path, width: int | None = None, quality: int = 85) -> str | None:
    """A file as a base64 JPEG data URI (shrunk to ``width`` px wide), or None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if width and im.size[0] > width:
                f = width / im.size[0]
                im = im.resize((max(1, round(im.size[0] * f)), max(1, round(im.size[1] * f))), Image.LANCZOS)
            b = io.BytesIO()
            im.save(b, format="JPEG", quality=quality)
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(b.getvalue()).decode("ascii")


def _e(v) -> str:
    return html.escape("" if v is None else str(v), quote=True)


_CSS = """
.warning { border:2px solid var(--pos); background:#fdecea; padding:8px 16px; margin:12px 0; }
:root { --fg:#1d2430; --muted:#5b6575; --line:#dfe3ea; --bg:#f6f7f9; --pos:#c0392b; --neg:#2e7d32; --na:#777; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color:var(--fg); background:var(--bg); }
header { background:#1d2430; color:#fff; padding:18px 28px; }
header h1 { margin:0 0 4px; font-size:22px; font-weight:600; }
header p { margin:0; color:#c9d1dd; }
main { max-width:1180px; margin:0 auto; padding:18px 28px 40px; }
section { background:#fff; border:1px solid var(--line); border-radius:8px; padding:16px 20px; margin:16px 0; }
h2 { font-size:18px; margin:0 0 12px; }
h3 { font-size:14px; margin:14px 0 8px; color:var(--muted); font-weight:600; }
table { border-collapse:collapse; width:100%; }
th, td { text-align:left; padding:5px 8px; border-bottom:1px solid var(--line); vertical-align:top; }
th { color:var(--muted); font-weight:600; font-size:12px; text-transform:uppercase; letter-spacing:.03em; }
td.num { font-variant-numeric: tabular-nums; white-space:nowrap; }
.bar { display:inline-block; height:9px; background:#dfe3ea; width:120px; border-radius:5px; vertical-align:middle; margin-left:8px; position:relative; }
.bar span { display:block; height:9px; border-radius:5px; background:#4a78c2; }
.bar i { position:absolute; top:-3px; width:2px; height:15px; background:#1d2430; }
.badge { display:inline-block; padding:1px 9px; border-radius:10px; font-size:12px; font-weight:600; color:#fff; }
.badge.positive { background:var(--pos); } .badge.negative { background:var(--neg); } .badge.no-tissue { background:var(--na); }
article.slide { border-top:1px solid var(--line); padding-top:14px; margin-top:14px; }
article.slide:first-of-type { border-top:0; margin-top:0; padding-top:0; }
article.slide h2 { display:flex; gap:12px; align-items:center; flex-wrap:wrap; }
.meta { color:var(--muted); font-size:13px; }
.pics { display:flex; gap:14px; flex-wrap:wrap; }
figure { margin:0; }
figure img { display:block; border:1px solid var(--line); border-radius:4px; background:#fff; }
.pics img { width:440px; max-width:100%; height:auto; }
.perf { display:flex; gap:24px; flex-wrap:wrap; align-items:flex-start; }
table.kv th { text-transform:none; font-size:13px; width:150px; }
table.confusion { width:auto; } table.confusion td, table.confusion th { text-align:center; }
.badge.truth { background:transparent; border:1px solid currentColor; }
.badge.truth.positive { color:var(--pos); } .badge.truth.negative { color:var(--neg); }
nav.pager { display:flex; gap:16px; margin:10px 0; } ol.pages { columns:3; }
figcaption { color:var(--muted); font-size:12px; margin-top:3px; }
.tiles { display:flex; gap:8px; flex-wrap:wrap; }
.tiles img { width:112px; height:112px; object-fit:cover; }
.tiles figcaption { width:112px; line-height:1.3; }
.legend { display:inline-block; width:160px; height:10px; vertical-align:middle; border-radius:3px;
  background:linear-gradient(90deg,#440154,#482878,#3e4989,#31688e,#26828e,#1f9e89,#35b779,#6ece58,#b5de2b,#fde725); margin:0 6px; }
.failed td { color:var(--pos); }
pre { background:var(--bg); padding:10px; border-radius:6px; overflow:auto; font-size:12px; max-height:480px; }
footer { color:var(--muted); font-size:12px; text-align:center; padding:8px; }
"""


def _prob_cell(p, threshold: float) -> str:
    if p is None:
        return '<td class="num">n/a</td>'
    w = max(0.0, min(1.0, float(p))) * 100
    t = max(0.0, min(1.0, float(threshold))) * 100
    return (f'<td class="num">{p:.4f}<span class="bar" title="threshold {threshold:.4f}">'
            f'<span style="width:{w:.1f}%"></span><i style="left:{t:.1f}%"></i></span></td>')


def _truth_cell(labels: Mapping[str, int] | None, sid: str) -> str:
    if labels is None:
        return ""
    y = labels.get(sid)
    if y is None:
        return '<td class="truth">&mdash;</td>'
    word = "positive" if int(y) == 1 else "negative"
    return f'<td class="truth"><span class="badge {word} truth">{word}</span></td>'


def _head(title: str) -> list[str]:
    return [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
    ]


def _header(results: Sequence[dict], provenance: dict, thr: float, n_pos: int) -> str:
    return ("<header><h1>Slide classification report</h1>"
            f"<p>{len(results)} slide(s), {n_pos} positive at threshold {thr:.4f} &middot; round {_e(provenance.get('round'))} "
            f"of {_e(provenance.get('run_dir'))} &middot; wsi-pipeline {_e(provenance.get('software_version'))}</p></header>"
            + _warning_banner(provenance.get("warnings") or []))


def _warning_banner(warnings: Sequence[str]) -> str:
    """The run's own warnings (theta2 did not fit, a threshold from too few val positives), on top of every page."""
    if not warnings:
        return ""
    items = "".join(f"<li>{_e(w)}</li>" for w in warnings)
    return f'<section id="warnings" class="warning" role="alert"><h2>Read this first</h2><ul>{items}</ul></section>'



def _footer(provenance: dict) -> str:
    return (f"<footer>wsi-pipeline {_e(provenance.get('software_version'))} &middot; {_e(provenance.get('generated_utc'))}"
            " &middot; for research use; not a diagnosis</footer></body></html>")


def _summary_section(results, decisions, thr, provenance, labels, href) -> list[str]:
    parts = ['<section id="summary"><h2>Slides by probability</h2>',
             f'<p class="meta">Threshold {thr:.4f} &mdash; {_e(provenance.get("threshold_source"))}. '
             "A slide is positive when its probability is at least the threshold.</p>",
             "<table><thead><tr><th>#</th><th>Slide</th><th>Probability</th><th>Decision</th>"
             + ("<th>Truth</th>" if labels is not None else "")
             + "<th>Tissue tiles</th><th>Predicted area</th></tr></thead><tbody>"]
    for i, (r, d) in enumerate(zip(results, decisions), start=1):
        frac = (r.get("heatmap") or {}).get("positive_fraction_of_tissue")
        parts.append(
            f'<tr><td class="num">{i}</td><td><a href="{href(i)}">{_e(r["slide_id"])}</a></td>'
            f'{_prob_cell(r.get("probability"), thr)}'
            f'<td><span class="badge {d.replace(" ", "-")}">{_e(d)}</span></td>'
            f'{_truth_cell(labels, r["slide_id"])}'
            f'<td class="num">{_e(r.get("n_tiles"))}</td>'
            f'<td class="num">{"" if frac is None else f"{100 * frac:.1f} % of tissue"}</td></tr>'
        )
    parts.append("</tbody></table></section>")
    return parts


def _roc_svg(fpr: Sequence[float], tpr: Sequence[float], point: tuple[float, float] | None, size: int = 300) -> str:
    """The ROC curve as inline SVG (no image, no script): curve, chance diagonal, operating point."""
    m, w = 36, size - 46  # left/bottom margin and plot side

    def xy(fx, ty):
        return m + fx * w, 10 + (1 - ty) * w

    pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(f, t) for f, t in zip(fpr, tpr) if f is not None and t is not None))
    out = [f'<svg class="roc" width="{size}" height="{size}" viewBox="0 0 {size} {size}" role="img" '
           'aria-label="ROC curve" xmlns="http://www.w3.org/2000/svg">',
           f'<rect x="{m}" y="10" width="{w}" height="{w}" fill="#fff" stroke="#9aa3b2"/>',
           f'<line x1="{m}" y1="{10 + w}" x2="{m + w}" y2="10" stroke="#c5cad3" stroke-dasharray="4 4"/>']
    for v in (0.25, 0.5, 0.75):
        x, y = xy(v, v)
        out.append(f'<line x1="{x:.1f}" y1="10" x2="{x:.1f}" y2="{10 + w}" stroke="#eef0f4"/>'
                   f'<line x1="{m}" y1="{y:.1f}" x2="{m + w}" y2="{y:.1f}" stroke="#eef0f4"/>')
    for v in (0, 0.5, 1):
        x, y = xy(v, v)
        out.append(f'<text x="{x:.1f}" y="{24 + w}" font-size="10" text-anchor="middle">{v:g}</text>'
                   f'<text x="{m - 4}" y="{y + 3:.1f}" font-size="10" text-anchor="end">{v:g}</text>')
    out.append(f'<text x="{m + w / 2:.0f}" y="{size - 4}" font-size="11" text-anchor="middle">1 &#8722; specificity</text>'
               f'<text x="10" y="{10 + w / 2:.0f}" font-size="11" text-anchor="middle" '
               f'transform="rotate(-90 10 {10 + w / 2:.0f})">sensitivity</text>')
    out.append(f'<polyline points="{pts}" fill="none" stroke="#31688e" stroke-width="2"/>')
    if point is not None:
        x, y = xy(*point)
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="#e67800" stroke="#fff"><title>operating point</title></circle>')
    out.append("</svg>")
    return "".join(out)


def labelled_performance(results: Sequence[dict], labels: Mapping[str, int], threshold: float) -> dict | None:
    """Slide-level performance of ``results`` against ``labels`` at ``threshold``: the ROC, AUC with a bootstrap
    95 % interval, sensitivity, specificity and confusion counts (:mod:`pipeline.evaluate`); None when no
    scored slide has a label."""
    from pipeline.evaluate import auc_bootstrap_ci, slide_level

    used = [(int(labels[r["slide_id"]]), float(r["probability"])) for r in results
            if r["slide_id"] in labels and r.get("probability") is not None]
    if not used:
        return None
    y, s = zip(*used)
    res = slide_level(list(y), list(s), threshold)
    res["auc_ci95"] = auc_bootstrap_ci(y, s)
    return res


def _performance_section(perf: dict | None, n_results: int) -> list[str]:
    parts = ['<section id="performance"><h2>Against the labels</h2>']
    if perf is None:
        parts.append('<p class="meta">No scored slide has a label.</p></section>')
        return parts
    at = perf["at_threshold"]
    ci = perf.get("auc_ci95")
    auc = "n/a (one class only)" if perf["auc"] is None else f"{perf['auc']:.3f}"
    if ci is not None and perf["auc"] is not None:
        auc += f" (95 % bootstrap interval {ci[0]:.3f}&ndash;{ci[1]:.3f})"

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f} %"

    point = None
    if at["sensitivity"] is not None and at["specificity"] is not None:
        point = (1 - at["specificity"], at["sensitivity"])
    parts.append('<div class="perf">')
    if perf["auc"] is not None:
        parts.append(_roc_svg(perf["roc"]["fpr"], perf["roc"]["tpr"], point))
    parts.append(
        "<div><table class=\"kv\"><tbody>"
        f"<tr><th>Labelled slides</th><td>{perf['n_slides']} of {n_results} ({perf['n_pos']} positive, {perf['n_neg']} negative)</td></tr>"
        f"<tr><th>AUC</th><td>{auc}</td></tr>"
        f"<tr><th>Operating point</th><td>threshold {at['threshold']:.4f}: sensitivity {pct(at['sensitivity'])}, "
        f"specificity {pct(at['specificity'])}</td></tr></tbody></table>"
        '<h3>Confusion counts at the threshold</h3><table class="confusion"><thead><tr><th></th>'
        "<th>called positive</th><th>called negative</th></tr></thead><tbody>"
        f'<tr><th>truly positive</th><td class="num">TP {at["tp"]}</td><td class="num">FN {at["fn"]}</td></tr>'
        f'<tr><th>truly negative</th><td class="num">FP {at["fp"]}</td><td class="num">TN {at["tn"]}</td></tr>'
        "</tbody></table></div></div></section>"
    )
    return parts


def _slide_article(i: int, r: dict, d: str, out_dir: Path, labels) -> list[str]:
    p = r.get("probability")
    hm = r.get("heatmap") or {}
    truth = ""
    if labels is not None and r["slide_id"] in labels:
        word = "positive" if int(labels[r["slide_id"]]) == 1 else "negative"
        truth = f' <span class="badge {word} truth">truth: {word}</span>'
    parts = [f'<article class="slide" id="slide-{i}"><h2>{_e(r["slide_id"])} '
             f'<span class="badge {d.replace(" ", "-")}">{_e(d)}{"" if p is None else f" {p:.4f}"}</span>{truth}</h2>']
    regions = r.get("regions") or {}
    parts.append(
        f'<p class="meta">{_e(r.get("n_tiles"))} tissue tiles of {_e(r.get("tile_px"))} px at {_fmt(r.get("mpp"), 3)} &micro;m/px'
        f' &middot; max theta1 probability {_fmt(hm.get("max_probability"), 3) or "n/a"}'
        f' &middot; {_e(regions.get("n_regions", 0))} predicted region(s)'
        f' &middot; scored {_e(r.get("scored_utc"))}</p>'
    )
    parts.append('<div class="pics">')
    for key, cap in (("thumbnail", "Thumbnail"), ("png", "Tumour probability (theta1) over the tissue")):
        uri = _data_uri(out_dir / hm[key], width=OVERLAY_DISPLAY_PX) if hm.get(key) else None
        if uri:
            parts.append(f'<figure><img src="{uri}" width="{OVERLAY_DISPLAY_PX}" alt="{_e(cap)} of {_e(r["slide_id"])}">'
                         f"<figcaption>{_e(cap)}</figcaption></figure>")
    parts.append("</div>")
    topk = r.get("topk") or []
    if topk:
        parts.append(f"<h3>Top {len(topk)} tiles (highest theta1 maximum; slide probability = mean theta2)</h3><div class=\"tiles\">")
        for t in topk:
            uri = _data_uri(out_dir / t["image"], width=TILE_DISPLAY_PX, quality=80) if t.get("image") else None
            img = (f'<img src="{uri}" width="{TILE_DISPLAY_PX}" height="{TILE_DISPLAY_PX}" alt="tile {t["rank"]}">'
                   if uri else "")
            parts.append(
                f"<figure>{img}<figcaption>#{t['rank']} &theta;2 {t['theta2_probability']:.3f} &middot; "
                f"&theta;1 {t['theta1_max']:.3f}<br>x {t['x_level0_px']}, y {t['y_level0_px']}</figcaption></figure>"
            )
        parts.append("</div>")
    parts.append("</article>")
    return parts


def _slides_section(items, out_dir: Path, labels, results_exist: bool, regions_thr) -> list[str]:
    parts = ['<section id="slides"><h2>Slides</h2>',
             '<p class="meta">Heatmap: theta1 positive probability over the tissue (viridis; the colour grows more '
             'opaque as the probability rises), 0<span class="legend"></span>1; '
             f"white outlines = regions at or above {_e(regions_thr)}.</p>"]
    for i, r, d in items:
        parts += _slide_article(i, r, d, out_dir, labels)
    if not results_exist:
        parts.append('<p class="meta">No slide has been scored with this run and round yet.</p>')
    parts.append("</section>")
    return parts


def _provenance_section(provenance: dict, thr: float) -> list[str]:
    val = provenance.get("validation") or {}
    rows = [
        ("Software", f"wsi-pipeline {provenance.get('software_version')}"),
        ("Report generated (UTC)", provenance.get("generated_utc")),
        ("Run", provenance.get("run_dir")),
        ("Run created (UTC)", provenance.get("run_created_utc")),
        ("Run trained with", f"wsi-pipeline {provenance.get('run_software_version')}, mode {provenance.get('run_mode')}"),
        ("Training hash", provenance.get("run_train_hash")),
        ("Round", f"{provenance.get('round')} (requested: {provenance.get('round_requested')}; best round: {provenance.get('best_round')})"),
        ("Models", f"theta1 {provenance.get('seg_arch')}, theta2 {provenance.get('cls_arch')}, top K = {provenance.get('top_k')}"),
        ("Threshold", f"{thr:.6f} — {provenance.get('threshold_source')}"),
        ("Validation (this round)", ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in val.items()) or "none"),
        ("Stage-2 loss", _fmt(provenance.get("stage2_loss"), 4)),
        ("Tiling", json.dumps(provenance.get("tiling"), sort_keys=True)),
        ("Device", provenance.get("device")),
    ]
    if provenance.get("labels"):
        rows.append(("Labels", provenance.get("labels")))
    parts = ['<section id="provenance"><h2>Provenance</h2><table><tbody>']
    parts += [f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows]
    parts.append("</tbody></table>")
    parts.append("<details><summary>Run configuration</summary><pre>"
                 f"{_e(json.dumps(provenance.get('config') or {}, indent=2, sort_keys=True, default=str))}</pre></details>")
    parts.append("</section>")
    return parts


def _page_name(n: int) -> str:
    return f"{PAGES_DIR}/page-{n:03d}.html"


def render_report_pages(results: Sequence[dict], provenance: dict, out_dir: str | Path,
                        failures: Sequence[tuple[str, str]] = (), labels: Mapping[str, int] | None = None,
                        *, max_slides_per_page: int = MAX_SLIDES_ONE_PAGE,
                        slides_per_page: int = SLIDES_PER_PAGE) -> dict[str, str]:
    """The report as ``{relative path: HTML}``: ``report.html`` alone for up to ``max_slides_per_page``
    slides; beyond that ``report.html`` is the index (summary, performance, provenance, links) and the
    slide details are split into ``report-pages/page-NNN.html`` of ``slides_per_page`` slides each.

    ``labels`` (slide_id -> 0/1) adds a truth column and the performance section (ROC with AUC and its
    bootstrap 95 % interval, the operating point and the confusion counts at the threshold)."""
    out_dir = Path(out_dir)
    thr = float(provenance["threshold"])
    decisions = [decision_for(r.get("probability"), thr) for r in results]
    n_pos = sum(d == "positive" for d in decisions)
    regions_thr = (results[0].get("regions") or {}).get("threshold", 0.5) if results else 0.5
    title = f"Slide classification report ({len(results)} slides)"
    paged = len(results) > max_slides_per_page
    page_of = (lambda i: (i - 1) // slides_per_page + 1)
    href = (lambda i: f"{_page_name(page_of(i))}#slide-{i}") if paged else (lambda i: f"#slide-{i}")
    parts = _head(title) + [_header(results, provenance, thr, n_pos), "<main>"]
    parts += _summary_section(results, decisions, thr, provenance, labels, href)
    if labels is not None:
        parts += _performance_section(labelled_performance(results, labels, thr), len(results))
    if failures:
        parts.append('<section id="failed"><h2>Failed in the last run</h2><table class="failed"><tbody>')
        parts += [f"<tr><td>{_e(sid)}</td><td>{_e(reason)}</td></tr>" for sid, reason in failures]
        parts.append("</tbody></table></section>")
    items = [(i, r, d) for i, (r, d) in enumerate(zip(results, decisions), start=1)]
    pages: dict[str, str] = {}
    if not paged:
        parts += _slides_section(items, out_dir, labels, bool(results), regions_thr)
    else:
        n_pages = page_of(len(results))
        parts.append('<section id="pages"><h2>Slide pages</h2><p class="meta">The heatmaps and top tiles are on '
                     f"{n_pages} pages of {slides_per_page} slides, in probability order:</p><ol class=\"pages\">")
        for n in range(1, n_pages + 1):
            first, last = (n - 1) * slides_per_page + 1, min(n * slides_per_page, len(results))
            parts.append(f'<li><a href="{_page_name(n)}">slides {first}&ndash;{last}</a> '
                         f'<span class="meta">({_e(results[first - 1]["slide_id"])} &hellip; {_e(results[last - 1]["slide_id"])})</span></li>')
        parts.append("</ol></section>")
        for n in range(1, n_pages + 1):
            chunk = items[(n - 1) * slides_per_page: n * slides_per_page]
            nav = ['<nav class="pager"><a href="../report.html">index</a>']
            if n > 1:
                nav.append(f'<a href="page-{n - 1:03d}.html">&larr; page {n - 1}</a>')
            nav.append(f"<span>page {n} of {n_pages}</span>")
            if n < n_pages:
                nav.append(f'<a href="page-{n + 1:03d}.html">page {n + 1} &rarr;</a>')
            nav.append("</nav>")
            page = _head(f"{title}, page {n} of {n_pages}") + [_header(results, provenance, thr, n_pos), "<main>"]
            page += nav + _slides_section(chunk, out_dir, labels, True, regions_thr) + nav
            page += ["</main>", _footer(provenance)]
            pages[_page_name(n)] = "\n".join(page) + "\n"
    parts += _provenance_section(provenance, thr)
    parts += ["</main>", _footer(provenance)]
    return {"report.html": "\n".join(parts) + "\n", **pages}


def render_report_html(results: Sequence[dict], provenance: dict, out_dir: str | Path,
                       failures: Sequence[tuple[str, str]] = (), labels: Mapping[str, int] | None = None) -> str:
    """The report's main page as a string (images read from ``out_dir`` and embedded); for large
    cohorts this is the index of :func:`render_report_pages`."""
    return render_report_pages(results, provenance, out_dir, failures, labels)["report.html"]


def write_report_html(path: str | Path, results: Sequence[dict], provenance: dict, out_dir: str | Path,
                      failures: Sequence[tuple[str, str]] = (), labels: Mapping[str, int] | None = None) -> Path:
    """Write the report: ``path`` and, for large cohorts, the ``report-pages/`` folder beside it (put in place
    whole; a folder of an earlier, larger report is removed)."""
    from wsi.store import replace_dir

    path = Path(path)
    pages = render_report_pages(results, provenance, out_dir, failures, labels)
    main = pages.pop("report.html")
    pages_dir = path.parent / PAGES_DIR
    if pages:
        tmp = path.parent / f".tmp-{PAGES_DIR}-{uuid.uuid4().hex[:8]}"
        for rel, text in pages.items():
            atomic_write_text(tmp / Path(rel).name, text)
        replace_dir(tmp, pages_dir)
    atomic_write_text(path, main)
    if not pages and pages_dir.is_dir():
        shutil.rmtree(pages_dir, ignore_errors=True)
    return path
