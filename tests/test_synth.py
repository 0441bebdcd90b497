"""Tests of the synthetic slide generator (wsi.synth)."""

from __future__ import annotations

import csv
import hashlib
import json
import math

import cv2
import numpy as np
import openslide
import pytest
import shapely.geometry
import tifffile
from skimage.draw import polygon as draw_polygon

from wsi import synth

W, H = 3000, 2500  # level-0 size of the test slides


def _md5(path) -> str:
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def _level_rgb(path, level: int) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as s:
        w, h = s.level_dimensions[level]
        return np.asarray(s.read_region((0, 0), level, (w, h)).convert("RGB"))


def _tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Stained pixels: coloured (not grey glass)."""
    rgb = rgb.astype(np.int16)
    return (rgb.max(2) - rgb.min(2)) > 25


@pytest.fixture(scope="module")
def positive(tmp_path_factory):
    d = tmp_path_factory.mktemp("pos")
    spec = synth.write_slide(d / "pos.tif", W, H, seed=3, lesions=2, workers=2)
    return spec


@pytest.fixture(scope="module")
def negative(tmp_path_factory):
    d = tmp_path_factory.mktemp("neg")
    return synth.write_slide(d / "neg.tif", W, H, seed=4, lesions=0)


# --------------------------------------------------------------------------- pyramid / metadata


def test_openslide_opens_pyramid(positive):
    with openslide.OpenSlide(positive.path) as s:
        assert s.properties["openslide.vendor"] == "generic-tiff"
        assert s.level_count == 2  # 1, 4 (16 would be < 512 px)
        assert s.level_dimensions == ((W, H), (750, 625))
        assert s.level_downsamples == pytest.approx((1.0, 4.0))
        assert s.properties["openslide.level[0].tile-width"] == "256"
    assert positive.downsamples == [1, 4]
    assert [tuple(x) for x in positive.level_dimensions] == [(W, H), (750, 625)]


def test_custom_levels_and_tile_size(tmp_path):
    spec = synth.write_slide(tmp_path / "c.tif", 2000, 1500, levels=[1, 2, 8], tile_px=128,
                             seed=1, tissue="small")
    with openslide.OpenSlide(spec.path) as s:
        assert s.level_count == 3
        assert s.level_dimensions == ((2000, 1500), (1000, 750), (250, 188))
        assert s.level_downsamples[:2] == pytest.approx((1.0, 2.0))
        assert s.level_downsamples[2] == pytest.approx(8.0, rel=0.01)
        assert s.properties["openslide.level[1].tile-width"] == "128"
    with tifffile.TiffFile(spec.path) as tf:  # every level in the main IFD chain, largest first
        assert [p.shape[:2] for p in tf.pages] == [(1500, 2000), (750, 1000), (188, 250)]
        assert [p.is_tiled for p in tf.pages] == [True] * 3
        assert [p.subfiletype for p in tf.pages] == [0, 1, 1]
        assert all(p.compression == tifffile.COMPRESSION.JPEG for p in tf.pages)


def test_default_downsamples():
    assert synth.default_downsamples(3000, 2500) == [1, 4]
    assert synth.default_downsamples(20000, 20000) == [1, 4, 16]
    assert synth.default_downsamples(50000, 40000) == [1, 4, 16, 64]
    assert synth.default_downsamples(400, 300) == [1]


def test_mpp_recoverable(positive):
    with openslide.OpenSlide(positive.path) as s:
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.5)
    with tifffile.TiffFile(positive.path) as tf:
        for page, ds in zip(tf.pages, (1, 4)):
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            num, den = page.tags["XResolution"].value
            assert 1e4 / (num / den) == pytest.approx(0.5 * ds)  # um per pixel


def test_no_mpp_variant(tmp_path):
    spec = synth.write_slide(tmp_path / "nompp.tif", 1200, 1000, mpp=None, seed=1)
    assert spec.mpp is None
    with openslide.OpenSlide(spec.path) as s:
        assert "openslide.mpp-x" not in s.properties
        assert "openslide.mpp-y" not in s.properties
    with tifffile.TiffFile(spec.path) as tf:
        unit = tf.pages[0].tags.get("ResolutionUnit")
        assert unit is None or unit.value == tifffile.RESUNIT.NONE


@pytest.mark.parametrize("photometric", ["ycbcr", "rgb"])
def test_pixels_match_renderer(tmp_path, photometric):
    scene = synth.make_scene(1500, 1200, seed=7, lesions=1)
    spec = synth.write_slide(tmp_path / "r.tif", 1500, 1200, scene=scene, photometric=photometric,
                             levels=[1, 4])
    with tifffile.TiffFile(spec.path) as tf:
        ycbcr = tf.pages[0].photometric == tifffile.PHOTOMETRIC.YCBCR
        assert ycbcr == (photometric == "ycbcr")
    with openslide.OpenSlide(spec.path) as s:
        got = np.asarray(s.read_region((512, 256), 0, (512, 512)).convert("RGB")).astype(int)
        got1 = np.asarray(s.read_region((0, 0), 1, s.level_dimensions[1]).convert("RGB")).astype(int)
    ref = synth.render_region(scene, (512, 256), (512, 512), 1).astype(int)
    ref1 = synth.render_region(scene, (0, 0), (375, 300), 4).astype(int)
    assert np.abs(got - ref).mean() < 6  # JPEG error only
    assert np.abs(got1 - ref1).mean() < 6


# --------------------------------------------------------------------------- content


def test_tissue_fraction_and_white_background(negative):
    rgb = _level_rgb(negative.path, 1)
    tissue = _tissue_mask(rgb)
    assert 0.1 < tissue.mean() < 0.7
    assert 0.1 < negative.tissue_fraction < 0.7
    glass = rgb[cv2.dilate(tissue.astype(np.uint8), np.ones((15, 15), np.uint8)) == 0]
    assert glass.size > 0.1 * rgb.size
    assert glass.mean() > 238
    glass_rgb = np.round(np.array(synth._GLASS_RGB))
    assert (np.abs(glass.astype(int) - glass_rgb).max(1) <= 3).mean() > 0.995  # flat, no texture
    # the slide border is glass
    assert _tissue_mask(rgb[:3]).sum() == 0 and _tissue_mask(rgb[:, :3]).sum() == 0
    # H&E-like colours: stroma pink (R > B > G), some purple nuclei (B > R)
    t = rgb[tissue].astype(int)
    r, g, b = t.mean(0)
    assert r > b > g
    assert ((t[:, 2] > t[:, 0] + 10) & (t.sum(1) < 450)).mean() > 0.02


def test_level0_has_nuclei(negative):
    scene = synth.make_scene(W, H, seed=4)
    # a region of tissue far from the edges of the tissue
    g = scene.raster_um
    j, i = np.unravel_index(np.argmax(scene.raster), scene.raster.shape)
    x, y = int(i * g / 0.5) - 256, int(j * g / 0.5) - 256
    with openslide.OpenSlide(negative.path) as s:
        rgb = np.asarray(s.read_region((x, y), 0, (512, 512)).convert("RGB")).astype(int)
    dark = (rgb.sum(2) < 420) & (rgb[..., 2] > rgb[..., 1])  # haematoxylin
    n, _ = cv2.connectedComponents(dark.astype(np.uint8))
    assert n - 1 >= 10  # individual nuclei
    assert 0.005 < dark.mean() < 0.5


def test_blank_and_faint_slides(tmp_path):
    blank = synth.write_slide(tmp_path / "blank.tif", 1500, 1200, tissue="none", seed=1)
    rgb = _level_rgb(blank.path, 0)
    assert rgb.min() > 235 and _tissue_mask(rgb).sum() == 0
    assert blank.tissue_fraction == 0 and blank.n_lesions == 0
    with pytest.raises(ValueError):
        synth.make_scene(1500, 1200, tissue="none", lesions=1)

    faint = synth.write_slide(tmp_path / "faint.tif", W, H, tissue="faint", seed=1)
    small = synth.write_slide(tmp_path / "small.tif", W, H, tissue="small", seed=1)
    f_rgb, s_rgb = _level_rgb(faint.path, 1), _level_rgb(small.path, 1)
    s_tissue = _tissue_mask(s_rgb)
    assert 0.005 < s_tissue.mean() < 0.08
    # same layout, much paler stain
    assert faint.tissue_fraction == small.tissue_fraction
    f_od = -np.log(f_rgb[s_tissue].astype(float) / 245.0).mean()
    s_od = -np.log(s_rgb[s_tissue].astype(float) / 245.0).mean()
    assert f_od < 0.5 * s_od


def test_same_seed_identical_files_other_seed_differs(tmp_path):
    a = synth.write_slide(tmp_path / "a.tif", 1500, 1200, seed=11, lesions=1, workers=1)
    b = synth.write_slide(tmp_path / "b.tif", 1500, 1200, seed=11, lesions=1, workers=2)
    c = synth.write_slide(tmp_path / "c.tif", 1500, 1200, seed=12, lesions=1, workers=2)
    assert _md5(a.path) == _md5(b.path)
    assert _md5(a.geojson_path) == _md5(b.geojson_path)
    assert _md5(a.mask_path) == _md5(b.mask_path)
    assert _md5(a.path) != _md5(c.path)
    ra, rc = _level_rgb(a.path, 0), _level_rgb(c.path, 0)
    assert np.abs(ra.astype(int) - rc.astype(int)).mean() > 5


def test_render_is_position_keyed():
    scene = synth.make_scene(2000, 1600, seed=5, lesions=1)
    whole = synth.render_region(scene, (256, 256), (512, 512), 1)
    parts = np.zeros_like(whole)
    for y in (0, 256):  # rendered in another order and split
        for x in (256, 0):
            parts[y:y + 256, x:x + 256] = synth.render_region(scene, (256 + x, 256 + y), (256, 256), 1)
    # identical up to blur borders / sub-pixel rounding at the block edges
    diff = np.abs(whole.astype(int) - parts.astype(int))
    assert diff.mean() < 0.1 and (diff > 0).mean() < 0.01


# --------------------------------------------------------------------------- lesions


def test_lesion_geojson_and_mask(positive):
    assert positive.n_lesions == 2 and positive.mask_downsample == 16
    gj = json.load(open(positive.geojson_path))
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == 2
    ds = positive.mask_downsample
    mask = cv2.imread(positive.mask_path, cv2.IMREAD_UNCHANGED)
    assert mask.dtype == np.uint8 and mask.ndim == 2
    assert mask.shape == (math.ceil(H / ds), math.ceil(W / ds))
    assert set(np.unique(mask)) == {0, 255}
    side = json.load(open(positive.mask_json_path))
    assert side["downsample"] == ds and side["level0_size_px"] == [W, H]
    ref = np.zeros(mask.shape, bool)
    for feat in gj["features"]:
        assert feat["type"] == "Feature"
        assert feat["geometry"]["type"] == "Polygon"
        props = feat["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
        ring = np.array(feat["geometry"]["coordinates"][0], float)
        assert ring.shape[0] >= 4 and np.array_equal(ring[0], ring[-1])
        assert shapely.geometry.shape(feat["geometry"]).is_valid
        assert (ring[:, 0] >= 0).all() and (ring[:, 0] <= W).all()
        assert (ring[:, 1] >= 0).all() and (ring[:, 1] <= H).all()
        # independent rasterisation at the mask's downsample (pixel centres)
        rr, cc = draw_polygon(ring[:, 1] / ds - 0.5, ring[:, 0] / ds - 0.5, shape=mask.shape)
        ref[rr, cc] = True
    got = mask > 0
    iou = (got & ref).sum() / (got | ref).sum()
    assert iou > 0.9
    # the lesions lie inside tissue
    rgb = _level_rgb(positive.path, 1)
    m4 = cv2.resize(mask, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST) > 0
    assert _tissue_mask(rgb)[m4].mean() > 0.9


def test_lesions_look_different(positive):
    rgb = _level_rgb(positive.path, 1).astype(float)
    mask = cv2.imread(positive.mask_path, cv2.IMREAD_GRAYSCALE)
    m4 = cv2.resize(mask, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST)
    k = np.ones((9, 9), np.uint8)
    inside = cv2.erode(m4, k) > 0
    outside = (cv2.dilate(m4, k) == 0) & _tissue_mask(rgb.astype(np.uint8))
    assert inside.sum() > 200 and outside.sum() > 2000
    les, nor = rgb[inside], rgb[outside]
    assert nor.mean() - les.mean() > 20  # darker
    # more haematoxylin (blue-purple): blue minus green larger, red lower
    assert (les[:, 2] - les[:, 1]).mean() > (nor[:, 2] - nor[:, 1]).mean() + 5
    assert nor[:, 0].mean() - les[:, 0].mean() > 30


def test_negative_has_no_annotations(negative, tmp_path):
    assert negative.n_lesions == 0
    assert negative.geojson_path is None and negative.mask_path is None
    gj = synth.lesion_geojson([])
    assert gj == {"type": "FeatureCollection", "features": []}


# --------------------------------------------------------------------------- cohort


def test_make_cohort(tmp_path):
    out = tmp_path / "cohort"
    res = synth.make_cohort(out, n_positive=3, n_negative=2, width_px=1600, height_px=1300,
                            seed=2, annotate=1, split=(0.6, 0.2, 0.2))
    rows = list(csv.DictReader(open(out / "labels.csv")))
    assert list(rows[0].keys()) == ["slide_id", "label", "split"]
    assert [r["slide_id"] for r in rows] == [f"slide_{i:03d}" for i in range(5)]
    labels = {r["slide_id"]: int(r["label"]) for r in rows}
    assert sorted(labels.values()) == [0, 0, 1, 1, 1]
    assert {r["split"] for r in rows} <= {"train", "val", "test"}
    for lab in (0, 1):  # stratified: each split gets both labels where counts allow
        splits = [r["split"] for r in rows if int(r["label"]) == lab]
        assert "train" in splits
    positives = [s for s, v in labels.items() if v == 1]
    negatives = [s for s, v in labels.items() if v == 0]
    ann = out / "annotations"
    for sid in labels:
        assert (out / f"{sid}.tif").exists()
        has = (ann / f"{sid}.geojson").exists()
        assert has == (sid in positives)
        assert (ann / f"{sid}_lesion_mask.png").exists() == (sid in positives)
    for sid in positives:
        assert len(json.load(open(ann / f"{sid}.geojson"))["features"]) >= 1
    for sid in negatives:
        with openslide.OpenSlide(str(out / f"{sid}.tif")) as s:
            assert s.level_count >= 1
    pix = (out / "pixel_annotated.txt").read_text().split()
    assert pix == res["pixel_annotated"] and len(pix) == 1
    assert labels[pix[0]] == 1
    assert [r["split"] for r in rows if r["slide_id"] == pix[0]] == ["train"]
    manifest = json.load(open(out / "cohort.json"))
    assert [s["slide_id"] for s in manifest["slides"]] == list(labels)
    # labels / splits are a pure function of the seed
    plan = synth._cohort_plan(3, 2, 2, ["train", "val", "test"], [0.6, 0.2, 0.2], 1, (1, 3))
    assert list(plan[0]) == [s["label"] for s in res["slides"]]
    assert plan[1] == [s["split"] for s in res["slides"]]
    other = synth._cohort_plan(30, 20, 3, ["train", "val", "test"], [0.6, 0.2, 0.2], 1, (1, 3))
    assert other[0].sum() == 30 and other[1].count("train") == 30


def test_split_counts():
    assert synth._split_counts(10, (0.6, 0.2, 0.2)) == [6, 2, 2]
    assert synth._split_counts(3, (0.6, 0.2, 0.2)) == [1, 1, 1]
    assert synth._split_counts(2, (0.6, 0.2, 0.2)) == [1, 1, 0]
    assert sum(synth._split_counts(7, (0.5, 0.25, 0.25))) == 7


def test_make_cohort_rejects_too_many_annotated(tmp_path):
    with pytest.raises(ValueError):
        synth.make_cohort(tmp_path, n_positive=1, n_negative=1, width_px=600, height_px=500,
                          annotate=3)


def test_synth_cli_bad_options_give_one_line_and_exit_2(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    res = CliRunner().invoke(main, ["synth", str(tmp_path / "c"), "--positives", "1", "--negatives", "1"])
    assert res.exit_code == 2
    assert "cannot generate this cohort" in res.output and "--annotated" in res.output
    assert "Traceback" not in res.output


# --------------------------------------------------------------------------- realistic cohort

RW = 1280  # level-0 side of the realistic test slides (0.5 um/px)


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    """A small realistic cohort on procedural tissue (the same wherever the tests run)."""
    out = tmp_path_factory.mktemp("realistic")
    res = synth.make_cohort(out, n_positive=10, n_negative=10, width_px=RW, height_px=RW, seed=5, annotate=2,
                            difficulty="realistic", texture_source=None, workers=2, levels=(1, 4))
    return out, res


def _thumbnail(path):
    with openslide.OpenSlide(str(path)) as s:
        lv = s.level_count - 1
        rgb = np.asarray(s.read_region((0, 0), lv, s.level_dimensions[lv]).convert("RGB"))
        return rgb, s.level_downsamples[lv]


def _auc_either_way(y, scores) -> float:
    from pipeline.metrics import roc_auc

    a = roc_auc(y, scores)
    return max(a, 1 - a)


def test_realistic_cohort_has_no_shortcut(realistic):
    from wsi.tissue import tissue_mask

    out, res = realistic
    y, feats = [], {}
    for s in res["slides"]:
        rgb, ds = _thumbnail(s["path"])
        tis = tissue_mask(rgb, 0.5 * ds).mask
        whole, on_tissue = rgb.reshape(-1, 3).mean(0), rgb[tis].mean(0)
        grey = rgb.astype(float).mean(2)
        row = {"mean R": whole[0], "mean G": whole[1], "mean B": whole[2], "tissue mean R": on_tissue[0],
               "tissue mean G": on_tissue[1], "tissue mean B": on_tissue[2], "darkness": 255 - grey.mean(),
               "tissue darkness": 255 - grey[tis].mean(), "tissue fraction": tis.mean(),
               "file size": (out / f"{s['slide_id']}.tif").stat().st_size}
        for k, v in row.items():
            feats.setdefault(k, []).append(v)
        y.append(s["label"])
    assert sum(y) == 10 and len(y) == 20
    aucs = {k: _auc_either_way(y, v) for k, v in feats.items()}
    assert max(aucs.values()) <= 0.7, aucs


def test_realistic_lesions_are_1_to_5_percent_of_tissue(realistic):
    from wsi.tissue import tissue_mask

    out, res = realistic
    for s in res["slides"]:
        if s["label"] == 0:
            continue
        assert 0.01 <= s["lesion_fraction_of_tissue"] <= 0.05
        gj = json.load(open(out / "annotations" / f"{s['slide_id']}.geojson"))
        lesion_px = sum(shapely.geometry.shape(f["geometry"]).area for f in gj["features"])
        rgb, ds = _thumbnail(s["path"])
        tissue_px = tissue_mask(rgb, 0.5 * ds).mask.sum() * ds * ds
        assert 0.01 <= lesion_px / tissue_px <= 0.05, (s["slide_id"], lesion_px / tissue_px)


def test_realistic_truth_for_every_slide_and_decoys_everywhere(realistic):
    out, res = realistic
    ann = out / "annotations"
    rows = list(csv.DictReader(open(out / "labels.csv")))
    assert list(rows[0]) == ["slide_id", "label", "split"] and {r["split"] for r in rows} == {"train", "val", "test"}
    manifest = json.load(open(out / "cohort.json"))
    assert manifest["difficulty"] == "realistic" and manifest["tissue_texture"]["kind"] == "procedural"
    for s in res["slides"]:
        mask = cv2.imread(str(ann / f"{s['slide_id']}_lesion_mask.png"), cv2.IMREAD_GRAYSCALE)
        assert json.load(open(ann / f"{s['slide_id']}_lesion_mask.json"))["downsample"] == 16
        assert (mask.max() == 255) == (s["label"] == 1) == (ann / f"{s['slide_id']}.geojson").exists()
        kinds = [b["kind"] for b in s["blobs"]]
        assert kinds.count("decoy") >= 1  # normal-tissue blobs on every slide, negatives included
        assert kinds.count("lesion") == (s["n_lesions"] if s["label"] else 0)
        assert s["label"] == 0 or s["n_lesions"] >= 1
    # both classes get the same blob sizes, confounders and nuisances (matched pairs)
    for lab in (0, 1):
        sl = [s for s in res["slides"] if s["label"] == lab]
        assert sum(len(s["confounders"]) for s in sl) > len(sl)
    npos = [len(s["blobs"]) for s in res["slides"] if s["label"] == 1]
    nneg = [len(s["blobs"]) for s in res["slides"] if s["label"] == 0]
    assert sorted(npos) == sorted(nneg)


def test_realistic_blobs_differ_by_texture_not_colour(realistic):
    """Lesion and decoy blobs: same mean colour, different nuclear texture."""
    out, res = realistic
    kind, feats = [], {"R": [], "G": [], "B": [], "fine texture": []}
    for s in res["slides"]:
        with openslide.OpenSlide(s["path"]) as sl:
            for b in s["blobs"]:
                p = np.array(b["polygon_level0_px"])
                (x0, y0), (x1, y1) = np.floor(p.min(0)).astype(int), np.ceil(p.max(0)).astype(int)
                rgb = np.asarray(sl.read_region((x0, y0), 0, (x1 - x0, y1 - y0)).convert("RGB")).astype(np.float32)
                m = np.zeros(rgb.shape[:2], np.uint8)
                cv2.fillPoly(m, [np.round(p - (x0, y0)).astype(np.int32)], 1)
                inside = cv2.erode(m, np.ones((9, 9), np.uint8)) > 0
                lum = rgb.mean(2)
                dog = cv2.GaussianBlur(lum, (0, 0), 1.5) - cv2.GaussianBlur(lum, (0, 0), 6)
                for c, k in enumerate("RGB"):
                    feats[k].append(rgb[inside][:, c].mean())
                feats["fine texture"].append(dog[inside].std())
                kind.append(b["kind"] == "lesion")
    assert 10 <= sum(kind) < len(kind)
    for k in "RGB":
        assert _auc_either_way(kind, feats[k]) <= 0.75, k
    assert _auc_either_way(kind, feats["fine texture"]) >= 0.75


def test_realistic_region_annotations(realistic):
    from shapely.geometry import shape
    from shapely.ops import unary_union

    out, res = realistic
    annotated = (out / "pixel_annotated.txt").read_text().split()
    assert len(annotated) == 2 and annotated == res["pixel_annotated"]
    outside_somewhere = clipped_somewhere = False
    for s in res["slides"]:
        path = out / "region_annotations" / f"{s['slide_id']}.geojson"
        assert path.exists() == (s["slide_id"] in annotated)
        if not path.exists():
            continue
        assert s["label"] == 1 and s["split"] == "train" and s["n_lesions"] >= 2
        feats = json.load(open(path))["features"]
        regions = [f for f in feats if f["properties"]["classification"]["name"] == "Region*"]
        tumors = [f for f in feats if f["properties"]["classification"]["name"] == "Tumor"]
        assert regions and tumors and len(regions) + len(tumors) == len(feats)
        for f in regions:  # axis-aligned rectangles inside the slide
            ring = np.array(f["geometry"]["coordinates"][0])
            assert len(ring) == 5 and len(set(ring[:, 0])) == 2 and len(set(ring[:, 1])) == 2
            assert ring.min() >= 0 and ring[:, 0].max() <= RW and ring[:, 1].max() <= RW
        area = unary_union([shape(f["geometry"]) for f in regions])
        for f in tumors:
            assert shape(f["geometry"]).difference(area.buffer(0.5)).area == 0
        truth = [shapely.geometry.Polygon(p) for p in s["spec"]["lesions_level0_px"]]
        outside_somewhere |= any(not t.intersects(area) for t in truth)
        got = sum(shape(f["geometry"]).area for f in tumors)
        clipped_somewhere |= got < sum(t.intersection(area).area for t in truth) + 1 and any(
            t.intersects(area) and not t.within(area) for t in truth)
    assert outside_somewhere and clipped_somewhere


def test_realistic_test_split_lesions_are_of_another_kind(realistic):
    out, res = realistic
    got = {"train": {}, "test": {}}
    for s in res["slides"]:
        for b in s["blobs"]:
            if b["kind"] == "lesion":
                side = "test" if s["split"] == "test" else "train"
                assert b["group"] == ("lesion_test" if side == "test" else "lesion_train")
                for k, v in b["params"].items():
                    got[side].setdefault(k, []).append(v)
    assert got["train"] and got["test"]
    ranges, bands = synth.BLOB_PARAM_RANGES["lesion"], synth.LESION_KIND_BANDS
    for side, group in (("train", "lesion_train"), ("test", "lesion_test")):
        for k, values in got[side].items():  # every parameter lies in one of its group's bands
            a, b = ranges[k]
            for v in values:
                u = (v - a) / (b - a)
                assert any(lo - 1e-3 <= u <= hi + 1e-3 for lo, hi in bands[group]), (side, k, u)
    for lo, hi in bands["lesion_test"]:  # ... and no test band meets a training band
        assert all(hi < lo2 or hi2 < lo for lo2, hi2 in bands["lesion_train"])


def test_realistic_cohort_is_deterministic_and_records_its_texture(tmp_path, shared_slides):
    kw = dict(n_positive=1, n_negative=1, width_px=1024, height_px=1024, seed=9, difficulty="realistic",
              split=(1.0,))
    src = shared_slides / "cmu-1-small-region.svs"
    a = synth.make_cohort(tmp_path / "a", texture_source=src, workers=1, **kw)
    b = synth.make_cohort(tmp_path / "b", texture_source=src, workers=2, **kw)  # slides in parallel threads
    c = synth.make_cohort(tmp_path / "c", texture_source=None, workers=1, **kw)
    assert a["tissue_texture"]["kind"] == "real" and c["tissue_texture"]["kind"] == "procedural"
    assert a["tissue_texture"]["source"].endswith("cmu-1-small-region.svs")
    for sa, sb, sc in zip(a["slides"], b["slides"], c["slides"]):
        assert _md5(sa["path"]) == _md5(sb["path"]) != _md5(sc["path"])
        assert sa["blobs"] == sb["blobs"]


def test_synth_cli_realistic(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    out = tmp_path / "c"
    res = CliRunner().invoke(main, ["synth", str(out), "--difficulty", "realistic", "--positives", "1",
                                    "--negatives", "1", "--size-px", "1024", "--annotated", "0"])
    assert res.exit_code == 0, res.output
    assert json.load(open(out / "cohort.json"))["difficulty"] == "realistic"
    with openslide.OpenSlide(str(out / "slide_000.tif")) as s:
        assert s.dimensions == (1024, 1024)
    bad = CliRunner().invoke(main, ["synth", str(tmp_path / "d"), "--difficulty", "hard"])
    assert bad.exit_code == 2
