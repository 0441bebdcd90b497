"""What ``classify`` hands to people and tools: ``predictions.csv`` and a self-contained ``report.html``.

Both are rebuilt from the per-slide results (``OUT/slides/<id>.json``, see
:mod:`pipeline.classify`) at the end of every run, so they always list every
slide scored with the current run and round, not only this run's new ones.

``predictions.csv`` columns
---------------------------
``slide_id, probability, decision, threshold, threshold_source, round, run_dir,
n_tiles, topk_x_level0_px, topk_y_level0_px, topk_size_level0_px,
topk_theta1_max, topk_theta2_probability, heatmap_png, heatmap_zarr,
regions_geojson, scored_utc`` -- the ``topk_*`` cells hold the K values
separated by ``;`` in rank order (highest theta1 maximum first); file columns
are relative to the CSV's folder. ``decision`` is ``positive`` when
``probability >= threshold`` (both written with full float precision, so the
rule can be re-applied exactly), ``negative`` otherwise, ``no tissue`` for a slide
without tissue tiles (empty probability).

``report.html``
---------------
One page, no external resources (images embedded as base64 JPEG): a summary
table sorted by probability, then per slide the thumbnail, the theta1 heatmap
overlay and the top-K tiles with their scores, then the run's provenance
(software version, run, round, threshold and where it came from, config). All
text is HTML-escaped.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path
from typing import Sequence


from wsi.atomic import atomic_write_text

__all__ = ["PREDICTION_COLUMNS", "decision_for", "write_predictions_csv", "render_report_html", "write_report_html"]

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
    "scored_utc",
]

OVERLAY_MAX_SIDE_PX = 720


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
            r.get("scored_utc", ""),
        ])
    atomic_write_text(path, buf.getvalue())
    return Path(path)


# --------------------------------------------------------------------------- HTML


def _data_uri(path: Path, max_side: int | None = None, quality: int = 85) -> str | None:
    """A file as a base64 JPEG data URI (shrunk to ``max_side``), or None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if max_side and max(im.size) > max_side:
                f = max_side / max(im.size)
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
figcaption { color:var(--muted); font-size:12px; margin-top:3px; }
.tiles { display:flex; gap:8px; flex-wrap:wrap; }
.tiles img { width:112px; height:112px; object-fit:cover; }
.tiles figcaption { width:112px; line-height:1.3; }
.legend { display:inline-block; width:160px; height:10px; vertical-align:middle; border-radius:3px;
  background:linear-gradient(90deg,#00007f,#0000ff,#00ffff,#ffff00,#ff0000,#7f0000); margin:0 6px; }
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


def _warning_banner(warnings: Sequence[str]) -> list[str]:
    """The run's own warnings (theta2 did not fit, a threshold from too few val positives) on top of the page."""
    if not warnings:
        return []
    items = "".join(f"<li>{_e(w)}</li>" for w in warnings)
    return [f'<section id="warnings" class="warning" role="alert"><h2>Read this first</h2><ul>{items}</ul></section>']


def render_report_html(results: Sequence[dict], provenance: dict, out_dir: str | Path,
                       failures: Sequence[tuple[str, str]] = ()) -> str:
    """The report page as a string (images read from ``out_dir`` and embedded)."""
    out_dir = Path(out_dir)
    thr = float(provenance["threshold"])
    decisions = [decision_for(r.get("probability"), thr) for r in results]
    n_pos = sum(d == "positive" for d in decisions)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Slide classification report ({len(results)} slides)</title>",
        f"<style>{_CSS}</style></head><body>",
        "<header><h1>Slide classification report</h1>",
        f"<p>{len(results)} slide(s), {n_pos} positive at threshold {thr:.4f} &middot; round {_e(provenance.get('round'))} "
        f"of {_e(provenance.get('run_dir'))} &middot; wsi-pipeline {_e(provenance.get('software_version'))}</p></header>",
        "<main>",
    ]
    parts += _warning_banner(provenance.get("warnings") or [])
    # summary table
    parts.append('<section id="summary"><h2>Slides by probability</h2>')
    parts.append(f'<p class="meta">Threshold {thr:.4f} &mdash; {_e(provenance.get("threshold_source"))}. '
                 "A slide is positive when its probability is at least the threshold.</p>")
    parts.append("<table><thead><tr><th>#</th><th>Slide</th><th>Probability</th><th>Decision</th>"
                 "<th>Tissue tiles</th><th>Predicted area</th></tr></thead><tbody>")
    for i, (r, d) in enumerate(zip(results, decisions), start=1):
        frac = (r.get("heatmap") or {}).get("positive_fraction_of_tissue")
        parts.append(
            f'<tr><td class="num">{i}</td><td><a href="#slide-{i}">{_e(r["slide_id"])}</a></td>'
            f'{_prob_cell(r.get("probability"), thr)}'
            f'<td><span class="badge {d.replace(" ", "-")}">{_e(d)}</span></td>'
            f'<td class="num">{_e(r.get("n_tiles"))}</td>'
            f'<td class="num">{"" if frac is None else f"{100 * frac:.1f} % of tissue"}</td></tr>'
        )
    parts.append("</tbody></table></section>")
    if failures:
        parts.append('<section id="failed"><h2>Failed in the last run</h2><table class="failed"><tbody>')
        for sid, reason in failures:
            parts.append(f"<tr><td>{_e(sid)}</td><td>{_e(reason)}</td></tr>")
        parts.append("</tbody></table></section>")
    # per slide
    parts.append('<section id="slides"><h2>Slides</h2>')
    parts.append('<p class="meta">Heatmap: theta1 positive probability over the tissue, 0<span class="legend"></span>1; '
                 f"white outlines = regions at or above {_e((results[0].get('regions') or {}).get('threshold', 0.5) if results else 0.5)}.</p>")
    for i, (r, d) in enumerate(zip(results, decisions), start=1):
        p = r.get("probability")
        hm = r.get("heatmap") or {}
        parts.append(f'<article class="slide" id="slide-{i}"><h2>{_e(r["slide_id"])} '
                     f'<span class="badge {d.replace(" ", "-")}">{_e(d)}{"" if p is None else f" {p:.4f}"}</span></h2>')
        regions = r.get("regions") or {}
        parts.append(
            f'<p class="meta">{_e(r.get("n_tiles"))} tissue tiles of {_e(r.get("tile_px"))} px at {_fmt(r.get("mpp"), 3)} &micro;m/px'
            f' &middot; max theta1 probability {_fmt(hm.get("max_probability"), 3) or "n/a"}'
            f' &middot; {_e(regions.get("n_regions", 0))} predicted region(s)'
            f' &middot; scored {_e(r.get("scored_utc"))}</p>'
        )
        parts.append('<div class="pics">')
        for key, cap in (("thumbnail", "Thumbnail"), ("png", "Tumour probability (theta1) over the tissue")):
            uri = _data_uri(out_dir / hm[key], OVERLAY_MAX_SIDE_PX) if hm.get(key) else None
            if uri:
                parts.append(f'<figure><img src="{uri}" alt="{_e(cap)} of {_e(r["slide_id"])}">'
                             f"<figcaption>{_e(cap)}</figcaption></figure>")
        parts.append("</div>")
        topk = r.get("topk") or []
        if topk:
            parts.append(f"<h3>Top {len(topk)} tiles (highest theta1 maximum; slide probability = mean theta2)</h3><div class=\"tiles\">")
            for t in topk:
                uri = _data_uri(out_dir / t["image"], None) if t.get("image") else None
                img = f'<img src="{uri}" alt="tile {t["rank"]}">' if uri else ""
                parts.append(
                    f"<figure>{img}<figcaption>#{t['rank']} &theta;2 {t['theta2_probability']:.3f} &middot; "
                    f"&theta;1 {t['theta1_max']:.3f}<br>x {t['x_level0_px']}, y {t['y_level0_px']}</figcaption></figure>"
                )
            parts.append("</div>")
        parts.append("</article>")
    if not results:
        parts.append('<p class="meta">No slide has been scored with this run and round yet.</p>')
    parts.append("</section>")
    # provenance
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
    parts.append('<section id="provenance"><h2>Provenance</h2><table><tbody>')
    for k, v in rows:
        parts.append(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>")
    parts.append("</tbody></table>")
    parts.append("<details><summary>Run configuration</summary><pre>"
                 f"{_e(json.dumps(provenance.get('config') or {}, indent=2, sort_keys=True, default=str))}</pre></details>")
    parts.append("</section></main>")
    parts.append(f"<footer>wsi-pipeline {_e(provenance.get('software_version'))} &middot; {_e(provenance.get('generated_utc'))}"
                 " &middot; for research use; not a diagnosis</footer></body></html>")
    return "\n".join(parts) + "\n"


def write_report_html(path: str | Path, results: Sequence[dict], provenance: dict, out_dir: str | Path,
                      failures: Sequence[tuple[str, str]] = ()) -> Path:
    atomic_write_text(path, render_report_html(results, provenance, out_dir, failures))
    return Path(path)
