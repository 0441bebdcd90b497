import json

import numpy as np
import pytest
import shapely

from wsi.annotations import (
    AnnotationError,
    Annotations,
    annotation_files,
    annotation_slide_id,
    load_geojson,
    load_slide_annotation,
    match_annotation_files,
    positive_fraction,
    rasterize_mask,
    rasterize_tile,
    rasterize_tile_labels,
    rasterize_tiles,
    tiles_touching,
)


def _mask_from_pixels(n, pixels):
    m = np.zeros((n, n), dtype=np.uint8)
    for i, j in pixels:
        m[i, j] = 1
    return m


def _ring(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _feature(coords, cls="Tumor", kind="Polygon"):
    props = {} if cls is None else {"classification": {"name": cls, "color": [200, 0, 0]}}
    return {"type": "Feature", "geometry": {"type": kind, "coordinates": coords},
            "properties": props}


def _collection(*features):
    return {"type": "FeatureCollection", "features": list(features)}


# ---------------------------------------------------------------- rasterise


def test_rectangle_downsample_1_hand_mask():
    ann = Annotations(shapely.box(2, 3, 6, 5))  # x in [2, 6), y in [3, 5)
    got = rasterize_tile(ann, (0, 0), 8, 1.0)
    want = _mask_from_pixels(8, [(i, j) for i in (3, 4) for j in (2, 3, 4, 5)])
    assert got.dtype == np.uint8 and got.shape == (8, 8)
    np.testing.assert_array_equal(got, want)


def test_rectangle_downsample_2_hand_mask():
    # tile covers level-0 [10, 26) x [20, 36); pixel centres at 11, 13, ..., 25 / 21, ..., 35
    ann = Annotations(shapely.box(14, 22, 20, 30))
    got = rasterize_tile(ann, (10, 20), 8, 2.0)
    # columns: centres 15, 17, 19 in [14, 20) -> j = 2, 3, 4
    # rows: centres 23, 25, 27, 29 in [22, 30) -> i = 1, 2, 3, 4
    want = _mask_from_pixels(8, [(i, j) for i in (1, 2, 3, 4) for j in (2, 3, 4)])
    np.testing.assert_array_equal(got, want)


def test_rectangle_half_open_edges_on_centres():
    # edges exactly on pixel centres (d = 2 -> centres at odd coordinates):
    # left/top inclusive, right/bottom exclusive
    ann = Annotations(shapely.box(3, 1, 7, 5))
    got = rasterize_tile(ann, (0, 0), 4, 2.0)
    # column centres 1, 3, 5, 7: 3 <= c < 7 -> j = 1, 2; row centres: 1 <= c < 5 -> i = 0, 1
    want = _mask_from_pixels(4, [(0, 1), (0, 2), (1, 1), (1, 2)])
    np.testing.assert_array_equal(got, want)


def test_adjacent_rectangles_partition_pixels():
    left = Annotations(shapely.box(0, 0, 3, 8))
    right = Annotations(shapely.box(3, 0, 8, 8))
    a = rasterize_tile(left, (0, 0), 4, 2.0)
    b = rasterize_tile(right, (0, 0), 4, 2.0)
    assert not np.any(a & b)
    assert np.all(a | b)


def test_triangle_hand_mask():
    tri = shapely.Polygon([(1, 1), (7.2, 1), (1, 7.2)])  # x >= 1, y >= 1, x + y < 8.2
    got = rasterize_tile(Annotations(tri), (0, 0), 8, 1.0)
    want = _mask_from_pixels(8, [(i, j) for i in range(8) for j in range(8)
                                 if i >= 1 and j >= 1 and i + j <= 7])
    np.testing.assert_array_equal(got, want)
    assert got.sum() == 21


def test_polygon_with_hole():
    poly = shapely.Polygon(_ring(0, 0, 8, 8), [_ring(2, 2, 6, 6)])
    got = rasterize_tile(Annotations(poly), (0, 0), 8, 1.0)
    want = np.ones((8, 8), np.uint8)
    want[2:6, 2:6] = 0
    np.testing.assert_array_equal(got, want)
    # same at downsample 2 over a 16 x 16 level-0 box: hole [4, 12)^2 -> pixels 2..5
    poly2 = shapely.Polygon(_ring(0, 0, 16, 16), [_ring(4, 4, 12, 12)])
    got2 = rasterize_tile(Annotations(poly2), (0, 0), 8, 2.0)
    np.testing.assert_array_equal(got2, want)


def test_multipolygon_and_out_px():
    mp = shapely.MultiPolygon([shapely.box(0, 0, 2, 2), shapely.box(4, 6, 8, 8)])
    got = rasterize_tile(Annotations(mp), (0, 0), 8, 1.0)
    want = np.zeros((8, 8), np.uint8)
    want[0:2, 0:2] = 1
    want[6:8, 4:8] = 1
    np.testing.assert_array_equal(got, want)
    # out_px = 4 over the same box: d = 2, centres 1, 3, 5, 7
    small = rasterize_tile(Annotations(mp), (0, 0), 8, 1.0, out_px=4)
    np.testing.assert_array_equal(small, want[::2, ::2])


def test_overlapping_features_are_unioned():
    data = _collection(_feature([_ring(0, 0, 6, 6)]), _feature([_ring(2, 2, 8, 8)]))
    got = rasterize_tile(load_geojson(data), (0, 0), 8, 1.0)
    want = np.zeros((8, 8), np.uint8)
    want[0:6, 0:6] = 1
    want[2:8, 2:8] = 1
    np.testing.assert_array_equal(got, want)  # overlap stays 1 (no even-odd cancellation)


def test_random_polygons_match_point_in_polygon():
    rng = np.random.default_rng(1)
    for trial in range(20):
        k = rng.integers(3, 12)
        ang = np.sort(rng.uniform(0, 2 * np.pi, k))
        rad = rng.uniform(5, 30, k)
        pts = np.c_[40 + rad * np.cos(ang), 37 + rad * np.sin(ang)]
        poly = shapely.Polygon(pts)
        if not poly.is_valid:
            continue
        x0, y0, d = 7.3, 5.1, 1.5
        got = rasterize_tile(Annotations(poly), (x0, y0), 48, d)
        c = np.arange(48) + 0.5
        cx, cy = np.meshgrid(x0 + c * d, y0 + c * d)
        want = shapely.contains_xy(poly, cx, cy)
        np.testing.assert_array_equal(got.astype(bool), want)


def test_fast_path_far_tile(monkeypatch):
    import wsi.annotations as mod

    ann = Annotations(shapely.box(0, 0, 10, 10))

    def boom(*a, **k):
        raise AssertionError("rasteriser called for a tile outside all bounds")

    monkeypatch.setattr(mod, "_scanline_fill", boom)
    out = rasterize_tile(ann, (1000, 1000), 16, 2.0)
    assert out.shape == (16, 16) and out.dtype == np.uint8 and not out.any()


def test_polygon_covering_whole_tile_and_beyond():
    ann = Annotations(shapely.box(-100, -100, 500, 500))
    assert rasterize_tile(ann, (50, 60), 8, 4.0).all()


def test_rasterize_tiles_batch():
    ann = Annotations(shapely.box(0, 0, 4, 4))
    out = rasterize_tiles(ann, np.array([[0, 0], [4, 0], [2, 2]]), 4, 1.0)
    assert out.shape == (3, 4, 4)
    assert out[0].all() and not out[1].any()
    np.testing.assert_array_equal(out[2], np.pad(np.ones((2, 2), np.uint8), ((0, 2), (0, 2))))


# ------------------------------------------------------------------ loading


def test_class_filtering_and_variants(tmp_path):
    data = _collection(
        _feature([_ring(0, 0, 2, 2)], "Tumor"),
        _feature([_ring(2, 0, 4, 2)], "tumor"),          # case-insensitive
        _feature([_ring(4, 0, 6, 2)], "Stroma"),         # ignored
        _feature([_ring(6, 0, 8, 2)], None),             # unclassified: ignored by default
        {"type": "Feature", "properties": {"classification": "Tumor"},  # plain-string class
         "geometry": {"type": "Polygon", "coordinates": [_ring(0, 4, 2, 6)]}},
    )
    path = tmp_path / "slide.geojson"
    path.write_text(json.dumps(data))
    ann = load_geojson(path)
    got = rasterize_tile(ann, (0, 0), 8, 1.0)
    want = np.zeros((8, 8), np.uint8)
    want[0:2, 0:4] = 1
    want[4:6, 0:2] = 1
    np.testing.assert_array_equal(got, want)
    assert ann.class_counts["Stroma"] == 1 and ann.class_counts[None] == 1

    with_unclassified = load_geojson(path, unclassified_positive=True)
    assert rasterize_tile(with_unclassified, (0, 0), 8, 1.0)[0:2, 6:8].all()

    stroma = load_geojson(data, positive_classes=["STROMA"])
    assert rasterize_tile(stroma, (0, 0), 8, 1.0).sum() == 4


def test_bare_list_single_feature_and_multipolygon():
    f1 = _feature([_ring(0, 0, 2, 2)])
    f2 = _feature([[_ring(4, 4, 6, 6)], [_ring(6, 6, 8, 8)]], kind="MultiPolygon")
    ann_list = load_geojson([f1, f2])
    got = rasterize_tile(ann_list, (0, 0), 8, 1.0)
    assert got.sum() == 4 + 4 + 4
    assert got[0:2, 0:2].all() and got[4:6, 4:6].all() and got[6:8, 6:8].all()
    ann_one = load_geojson(f1)
    assert rasterize_tile(ann_one, (0, 0), 8, 1.0).sum() == 4


def test_geojson_hole_roundtrip():
    feat = _feature([_ring(0, 0, 8, 8), _ring(2, 2, 6, 6)])
    got = rasterize_tile(load_geojson(feat), (0, 0), 8, 1.0)
    assert got.sum() == 64 - 16 and not got[2:6, 2:6].any()


def test_negative_classes_labels_variant():
    data = _collection(
        _feature([_ring(0, 0, 4, 4)], "Tumor"),
        _feature([_ring(2, 0, 8, 8)], "Benign"),  # overlaps the tumour: positive wins
        _feature([_ring(0, 6, 2, 8)], "Other"),
    )
    ann = load_geojson(data, negative_classes=("benign",))
    assert ann.has_negative
    labels, annotated = rasterize_tile_labels(ann, (0, 0), 8, 1.0)
    want_labels = np.zeros((8, 8), np.uint8)
    want_labels[0:4, 0:4] = 1
    want_annot = want_labels.copy()
    want_annot[:, 2:8] = 1
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_array_equal(annotated, want_annot)
    np.testing.assert_array_equal(rasterize_tile(ann, (0, 0), 8, 1.0), want_labels)


def test_class_in_both_lists_rejected():
    with pytest.raises(ValueError, match="both positive and negative"):
        load_geojson(_feature([_ring(0, 0, 2, 2)]), negative_classes=("TUMOR",))


def test_outside_slide_error_names_file(tmp_path):
    path = tmp_path / "case_07.geojson"
    path.write_text(json.dumps(_collection(
        _feature([_ring(0, 0, 10, 10)]),
        _feature([_ring(900, 100, 1200, 200)]),
    )))
    with pytest.raises(AnnotationError) as exc:
        load_geojson(path, slide_dimensions=(1000, 800))
    msg = str(exc.value)
    assert "case_07.geojson" in msg and "feature #1" in msg
    assert "1000 x 800" in msg and "level-0" in msg
    # within tolerance is fine, and without slide_dimensions nothing is checked
    load_geojson(path, slide_dimensions=(1195, 800), outside_tolerance_px=8)
    load_geojson(path)


def test_invalid_geometry_repaired():
    bowtie = _feature([[[0, 0], [4, 4], [4, 0], [0, 4], [0, 0]]])
    ann = load_geojson(bowtie)
    assert ann.positive.is_valid and ann.positive_area_px == pytest.approx(8.0)


def test_unrepairable_geometry_error_names_feature(tmp_path):
    path = tmp_path / "bad.geojson"
    path.write_text(json.dumps(_collection(
        _feature([_ring(0, 0, 2, 2)]),
        _feature([[[0, 0], [1, 1], [2, 2], [0, 0]]]),  # collinear: no area
    )))
    with pytest.raises(AnnotationError, match=r"bad\.geojson: feature #1"):
        load_geojson(path)


def test_empty_positive_error_and_allow_empty(tmp_path):
    path = tmp_path / "empty.geojson"
    path.write_text(json.dumps(_collection(_feature([_ring(0, 0, 2, 2)], "Stroma"))))
    with pytest.raises(AnnotationError, match=r"empty\.geojson: no positive annotation.*Stroma") as err:
        load_geojson(path)
    assert "allow_empty" not in str(err.value) and "add their class to the positive classes" in str(err.value)
    ann = load_geojson(path, allow_empty=True)
    assert ann.is_empty
    assert not rasterize_tile(ann, (0, 0), 4, 1.0).any()
    assert not tiles_touching(ann, np.zeros((2, 2)), 4, 1.0).any()


def test_bad_json(tmp_path):
    path = tmp_path / "broken.geojson"
    path.write_text("{not json")
    with pytest.raises(AnnotationError, match="broken.geojson"):
        load_geojson(path)


# ------------------------------------------------------------- mask images


def test_rasterize_mask_nearest_neighbour():
    # mask at downsample 4: mask pixel (r, c) covers level-0 [4c, 4c+4) x [4r, 4r+4)
    mask = np.zeros((4, 4), dtype=bool)
    mask[1, 2] = True   # level-0 x [8, 12), y [4, 8)
    # tile at (6, 2), 8 px, downsample 1 -> centres x 6.5..13.5, y 2.5..9.5
    got = rasterize_mask(mask, 4.0, (6, 2), 8, 1.0)
    want = np.zeros((8, 8), np.uint8)
    want[2:6, 2:6] = 1  # x centres 8.5..11.5 -> j 2..5; y centres 4.5..7.5 -> i 2..5
    np.testing.assert_array_equal(got, want)
    # downsample 2, out_px 4: d = 2 (tile 4 px * 2 / 4... level-0 span 8)
    got2 = rasterize_mask(mask, 4.0, (8, 4), 4, 2.0, out_px=4)
    want2 = np.zeros((4, 4), np.uint8)
    want2[0:2, 0:2] = 1  # centres 9, 11 in [8, 12) and 5, 7 in [4, 8)
    np.testing.assert_array_equal(got2, want2)


def test_rasterize_mask_outside_image_is_zero_and_matches_polygon():
    mask = np.ones((3, 3), dtype=np.uint8) * 255
    got = rasterize_mask(mask, 2.0, (4, 4), 4, 1.0)  # image covers level-0 [0, 6)^2
    want = np.zeros((4, 4), np.uint8)
    want[0:2, 0:2] = 1
    np.testing.assert_array_equal(got, want)
    # a mask image and the equivalent polygon give the same target
    ann = Annotations(shapely.box(0, 0, 6, 6))
    np.testing.assert_array_equal(rasterize_tile(ann, (4, 4), 4, 1.0), got)


# --------------------------------------------------------- tile summaries


def test_tiles_touching_and_fraction():
    ann = Annotations(shapely.MultiPolygon([shapely.box(0, 0, 8, 4), shapely.box(20, 20, 24, 24)]))
    coords = np.array([[0, 0], [8, 0], [0, 8], [16, 16], [4, 0]])
    frac = positive_fraction(ann, coords, 4, 2.0)  # tiles span 8 level-0 px
    np.testing.assert_allclose(frac, [0.5, 0.0, 0.0, 0.25, 0.25])
    np.testing.assert_array_equal(tiles_touching(ann, coords, 4, 2.0),
                                  [True, False, False, True, True])
    # tile [8, 16) shares only an edge with the box: not touching
    np.testing.assert_array_equal(tiles_touching(ann, coords, 4, 2.0, min_fraction=0.3),
                                  [True, False, False, False, False])


def test_coords_shape_checked():
    ann = Annotations(shapely.box(0, 0, 1, 1))
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        positive_fraction(ann, np.zeros((3, 3)), 4, 1.0)


# ------------------------------------------------- files of a slide, one loader


def test_discovery_rule_names_and_preference(tmp_path):
    for name in ("s1.geojson", "s1_lesion_mask.png", "s1_lesion_mask.json", "s2-mask.png", "s3.png",
                 "s3_mask.tif", "notes.geojson", ".hidden.png", "readme.txt"):
        (tmp_path / name).write_bytes(b"")
    files = annotation_files([tmp_path, tmp_path / "s2-mask.png"])  # a file given twice is listed once
    assert [f.name for f in files] == ["notes.geojson", "s1.geojson", "s1_lesion_mask.png", "s2-mask.png",
                                       "s3.png", "s3_mask.tif"]  # the mask's sidecar is not GeoJSON
    by_slide, unmatched = match_annotation_files(files, ["s1", "s2", "s3", "s4"])
    assert {k: [f.name for f in v] for k, v in by_slide.items()} == {
        "s1": ["s1.geojson", "s1_lesion_mask.png"],  # GeoJSON first
        "s2": ["s2-mask.png"],
        "s3": ["s3_mask.tif", "s3.png"],  # a name suffix before the bare slide id
    }
    assert [f.name for f in unmatched] == ["notes.geojson"]
    # an exact slide id wins over a stripped suffix; GeoJSON never strips one
    assert annotation_slide_id("a_mask.png", {"a", "a_mask"}) == "a_mask"
    assert annotation_slide_id("a_mask.png", {"a"}) == "a"
    assert annotation_slide_id("a_mask.geojson", {"a"}) is None
    with pytest.raises(AnnotationError, match=r"readme\.txt: not an annotation file"):
        annotation_files([tmp_path / "readme.txt"])
    with pytest.raises(AnnotationError, match=r"nope: no such annotation file or folder"):
        annotation_files([tmp_path / "nope"])


def _region_file(tmp_path, region_cls="Region 1"):
    path = tmp_path / "s.geojson"
    path.write_text(json.dumps(_collection(
        _feature([_ring(0, 0, 8, 8)], region_cls),
        _feature([_ring(2, 2, 6, 4)], "Tumor"),       # inside the region
        _feature([_ring(10, 0, 12, 2)], "Tumor"),     # outside it: still positive (and labelled)
        _feature([_ring(0, 10, 4, 12)], "Other"),     # ignored
    )))
    return path


def test_region_limited_geojson_target_weight_and_tiles(tmp_path):
    ann = load_slide_annotation(_region_file(tmp_path))
    assert ann.slide_id == "s" and not ann.complete and ann.geo.has_regions
    target, weight = ann.tile_labels((0, 0), 12, 1.0)
    want_t = np.zeros((12, 12), np.uint8)
    want_t[2:4, 2:6] = 1
    want_t[0:2, 10:12] = 1
    want_w = np.zeros((12, 12), np.uint8)
    want_w[0:8, 0:8] = 1
    want_w[0:2, 10:12] = 1
    np.testing.assert_array_equal(target, want_t)
    np.testing.assert_array_equal(weight, want_w)
    np.testing.assert_array_equal(ann.tile_target((0, 0), 12, 1.0), want_t)
    # tiles of 8 level-0 px: the region's tile, the outside tumour's tile; a corner contact is no overlap
    coords = np.array([[0, 0], [16, 16], [8, 8], [8, 0]])
    np.testing.assert_array_equal(ann.labelled_tiles(coords, 4, 2.0), [True, False, False, True])
    # the same file without region classes annotates the whole slide
    whole = load_slide_annotation(tmp_path / "s.geojson", region_classes=())
    assert whole.complete
    t2, w2 = whole.tile_labels((0, 0), 12, 1.0)
    np.testing.assert_array_equal(t2, want_t)
    assert w2.all() and whole.labelled_tiles(coords, 4, 2.0).all()


@pytest.mark.parametrize("cls", ["Region 1", "region", "REGION*"])
def test_region_classes_are_case_insensitive_patterns(tmp_path, cls):
    ann = load_slide_annotation(_region_file(tmp_path, cls))
    assert ann.geo.has_regions


def test_region_only_file_is_not_empty(tmp_path):
    path = tmp_path / "r.geojson"
    path.write_text(json.dumps(_collection(_feature([_ring(0, 0, 4, 4)], "Region"))))
    ann = load_slide_annotation(path)
    assert not ann.has_positive and not ann.complete
    t, w = ann.tile_labels((0, 0), 8, 1.0)
    assert not t.any() and w.sum() == 16
    with pytest.raises(AnnotationError, match=r"r\.geojson: no positive annotation"):
        load_slide_annotation(path, region_classes=())


def _mask(tmp_path, name, img, sidecar=None):
    import cv2

    path = tmp_path / name
    assert cv2.imwrite(str(path), np.asarray(img, np.uint8))
    if sidecar is not None:
        path.with_suffix(".json").write_text(json.dumps(sidecar))
    return path


def test_mask_unlabelled_value_and_heatmap_grid(tmp_path):
    img = np.zeros((4, 4), np.uint8)  # downsample 4: covers level-0 [0, 16)^2
    img[0, 0:2] = 255
    img[1, :] = 128
    path = _mask(tmp_path, "s-mask.png", img, {"downsample": 4, "unlabelled": 128})
    ann = load_slide_annotation(path, "s")
    assert ann.mask_downsample == 4 and not ann.complete and ann.sources == [str(path)]
    # one output pixel per mask pixel (centres 2, 6, 10, 14)
    target, weight = ann.tile_labels((0, 0), 8, 2.0, out_px=4)
    np.testing.assert_array_equal(target, (img == 255).astype(np.uint8))
    np.testing.assert_array_equal(weight, (img != 128).astype(np.uint8))
    np.testing.assert_array_equal(ann.labelled_tiles(np.array([[0, 0], [0, 4], [0, 8]]), 2, 2.0),
                                  [True, False, True])
    # heatmap grid (3 x 5) at downsample 4 from level-0 (4, 0): centres x 6..22 -> mask cols 1, 2, 3, outside
    truth, labelled = ann.grid_labels((3, 5), (4, 0), 4.0)
    assert truth.shape == labelled.shape == (3, 5)
    want_t = np.zeros((3, 5), bool)
    want_t[0, 0] = True
    want_l = np.ones((3, 5), bool)
    want_l[1, 0:3] = False
    np.testing.assert_array_equal(truth, want_t)
    np.testing.assert_array_equal(labelled, want_l)
    # without the unlabelled value every non-zero pixel is positive
    plain = load_slide_annotation(_mask(tmp_path, "t_mask.png", img, {"downsample": 4}), "t")
    assert plain.complete and plain.mask.sum() == 6


def test_mask_downsample_rules_and_errors(tmp_path):
    img = np.zeros((25, 25), np.uint8)
    img[3, 3] = 1
    ann = load_slide_annotation(_mask(tmp_path, "a.png", img), slide_dimensions=(100, 100))
    assert ann.mask_downsample == 4  # slide width / mask width
    assert load_slide_annotation(tmp_path / "a.png", slide_dimensions=(100, 100), mask_downsample=2).mask_downsample == 2
    with pytest.raises(AnnotationError, match=r"a\.png: the mask's downsample is unknown.*a\.json"):
        load_slide_annotation(tmp_path / "a.png")
    with pytest.raises(AnnotationError, match=r"a\.png: mask of 25x25 px does not have the slide's aspect"):
        load_slide_annotation(tmp_path / "a.png", slide_dimensions=(100, 200))
    big = _mask(tmp_path, "b.png", img, {"downsample": 20})
    with pytest.raises(AnnotationError, match=r"b\.png: the mask covers 500x500 level-0 px.*larger than the slide"):
        load_slide_annotation(big, slide_dimensions=(100, 100))
    bad = _mask(tmp_path, "c.png", img, {"downsample": "sixteen"})
    with pytest.raises(AnnotationError, match=r"c\.json: 'downsample' must be a number"):
        load_slide_annotation(bad)
    empty = _mask(tmp_path, "d.png", np.zeros((4, 4)), {"downsample": 4})
    with pytest.raises(AnnotationError, match=r"d\.png: the mask has no positive"):
        load_slide_annotation(empty)
    assert not load_slide_annotation(empty, allow_empty=True).has_positive
    (tmp_path / "e.png").write_bytes(b"not a png")
    with pytest.raises(AnnotationError, match=r"e\.png: cannot read the mask image"):
        load_slide_annotation(tmp_path / "e.png")
