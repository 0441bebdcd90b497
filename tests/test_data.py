"""Labels, annotations and the torch Datasets over real tile stores of a generated cohort."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pipeline.batch import UsageError  # noqa: E402
from pipeline.data import (  # noqa: E402
    SOURCE_ANNOTATED,
    SOURCE_CONSTANT,
    SOURCE_NEGATIVE,
    SOURCE_PSEUDO,
    SeededBatches,
    SlideTopKDataset,
    TileItems,
    TileTargetDataset,
    augment_geometric,
    collate,
    load_pixel_annotations,
)
from pipeline.labels import LabelError, load_cohort, read_labels_csv  # noqa: E402
from tests.em_fixtures import em_cohort  # noqa: E402,F401
from wsi.annotations import positive_fraction, rasterize_tile  # noqa: E402
from wsi.store import FastTileReader, TileStore  # noqa: E402


def _write_csv(path, rows, header=("slide_id", "label", "split")):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def cohort(em_cohort):
    return load_cohort(em_cohort.stores, em_cohort.labels)


# --------------------------------------------------------------------------- labels


def test_labels_csv_parses_and_defaults_split(tmp_path):
    p = _write_csv(tmp_path / "l.csv", [("a", "1"), ("b", "0")], header=("slide_id", "label"))
    assert read_labels_csv(p) == [("a", 1, "train"), ("b", 0, "train")]
    p = tmp_path / "c.csv"
    p.write_text("# comment\nlabel,slide_id,split,extra\n\n1,x,VAL,foo\n0,y,,bar\n")
    assert read_labels_csv(p) == [("x", 1, "val"), ("y", 0, "train")]


def test_labels_csv_reports_every_problem_with_lines(tmp_path):
    p = _write_csv(tmp_path / "bad.csv", [("a", "1", "train"), ("a", "0", "train"), ("b", "yes", "train"),
                                         ("c", "1", "holdout"), ("d", "2", "val")])
    with pytest.raises(LabelError) as ei:
        read_labels_csv(p)
    msg = str(ei.value)
    assert "bad.csv" in msg and "4 problem(s)" in msg
    assert "line 3: slide 'a' is listed again (first on line 2)" in msg
    assert "line 4: label 'yes'" in msg and "line 6: label '2'" in msg
    assert "line 5: split 'holdout'" in msg
    p = _write_csv(tmp_path / "nohead.csv", [("a", "1")], header=("id", "class"))
    with pytest.raises(LabelError, match="header lacks column.*slide_id, label"):
        read_labels_csv(p)
    with pytest.raises(LabelError, match="not found"):
        read_labels_csv(tmp_path / "missing.csv")


def test_cohort_joins_labels_and_stores(em_cohort, cohort):
    assert len(cohort.slides) == 20
    assert {s.split for s in cohort.slides} == {"train", "val"}
    assert sum(s.label for s in cohort.train) == 5 and len(cohort.train) == 10
    assert cohort.tiling["tile_px"] == 128 and cohort.tiling["mpp"] == 2.0 and cohort.tiling["overlap_px"] == 32
    assert all(s.n_tiles == len(TileStore(s.store_path)) for s in cohort.slides)


def test_cohort_reports_slides_without_store(em_cohort, tmp_path):
    rows = [(s, l, sp) for s, l, sp in read_labels_csv(em_cohort.labels)]
    rows += [("ghost_1", 1, "train"), ("ghost_2", 0, "val")]
    p = _write_csv(tmp_path / "l.csv", rows)
    with pytest.raises(LabelError, match=r"2 labelled slide\(s\) have no store in .*ghost_1, ghost_2.*wsi-pipeline tile"):
        load_cohort(em_cohort.stores, p)


def test_cohort_refuses_old_store_format(em_cohort, tmp_path):
    stores = tmp_path / "stores"
    stores.mkdir()
    rows = read_labels_csv(em_cohort.labels)[:4]
    for sid, _, _ in rows:
        shutil.copytree(em_cohort.stores / f"{sid}.zarr", stores / f"{sid}.zarr")
    meta_path = stores / f"{rows[0][0]}.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["format_version"] = 0
    meta_path.write_text(json.dumps(meta))
    p = _write_csv(tmp_path / "l.csv", rows)
    with pytest.raises(LabelError, match=f"{rows[0][0]}.zarr: tile store format version 0.*re-tile"):
        load_cohort(stores, p)


def test_cohort_needs_both_classes_in_train(em_cohort, tmp_path):
    rows = [(s, l, "train" if l == 1 else "val") for s, l, _ in read_labels_csv(em_cohort.labels)]
    with pytest.raises(LabelError, match="train split has 10 positive and 0 negative"):
        load_cohort(em_cohort.stores, _write_csv(tmp_path / "l.csv", rows))


# --------------------------------------------------------------------------- annotations


def test_annotation_errors_name_the_file(em_cohort, cohort, tmp_path):
    slides = cohort.by_id()
    pos = em_cohort.annotated_ids[0]
    neg = next(s.slide_id for s in cohort.slides if s.label == 0)
    src = json.loads((em_cohort.cohort / "annotations" / f"{pos}.geojson").read_text())

    unknown = tmp_path / "not_a_slide.geojson"
    unknown.write_text(json.dumps(src))
    with pytest.raises(UsageError, match="not_a_slide.geojson: no labelled slide 'not_a_slide'"):
        load_pixel_annotations([unknown], slides)

    on_negative = tmp_path / f"{neg}.geojson"
    on_negative.write_text(json.dumps(src))
    with pytest.raises(UsageError, match=f"{neg}.geojson: slide '{neg}' is labelled negative"):
        load_pixel_annotations([on_negative], slides)

    outside = json.loads(json.dumps(src))
    for f in outside["features"]:
        f["geometry"]["coordinates"] = [[[x + 5000, y] for x, y in ring] for ring in f["geometry"]["coordinates"]]
    d = tmp_path / "outside"
    d.mkdir()
    (d / f"{pos}.geojson").write_text(json.dumps(outside))
    with pytest.raises(UsageError, match=f"{pos}.geojson.*outside the slide of 1024 x 1024"):
        load_pixel_annotations([d], slides)

    with pytest.raises(UsageError, match="no positive annotation.*em.positive_classes=\\['Stroma'\\]") as err:
        load_pixel_annotations([em_cohort.annotations[0]], slides, positive_classes=["Stroma"])
    msg = str(err.value)  # advice a command-line user can follow, in one line
    assert "allow_empty" not in msg and "\n" not in msg
    assert 'add a class with --set "em.positive_classes=[Stroma, <lesion class>]"' in msg
    assert "leave this file out of the annotations" in msg and "'Tumor': " in msg  # the classes the file has
    with pytest.raises(UsageError, match="no such annotation file"):
        load_pixel_annotations([tmp_path / "nope.geojson"], slides)


def test_geojson_and_mask_targets_agree(em_cohort, cohort):
    sid = em_cohort.annotated_ids[0]
    slides = cohort.by_id()
    geo = load_pixel_annotations([em_cohort.cohort / "annotations" / f"{sid}.geojson"], slides)[sid]
    mask = load_pixel_annotations([em_cohort.cohort / "annotations" / f"{sid}_lesion_mask.png"], slides)[sid]
    assert geo.geo is not None and geo.mask is None
    assert mask.mask is not None and mask.mask_downsample == 16  # from the sidecar JSON
    st = TileStore(slides[sid].store_path)
    tg = np.stack([geo.tile_target(xy, st.tile_px, st.downsample) for xy in st.coords]).astype(bool)
    tm = np.stack([mask.tile_target(xy, st.tile_px, st.downsample) for xy in st.coords]).astype(bool)
    assert tg.sum() > 500
    inter, union = (tg & tm).sum(), (tg | tm).sum()
    assert inter / union > 0.6  # the mask is 16x coarser than the polygons
    # the pixel targets agree with the exact geometric area per tile
    frac = positive_fraction(geo.geo, st.coords, st.tile_px, st.downsample)
    np.testing.assert_allclose(tg.mean(axis=(1, 2)), frac, atol=0.02)


def test_training_and_evaluate_find_the_same_files_and_honour_positive_classes(em_cohort, cohort, tmp_path):
    from pipeline.evaluate import _truth_files
    from wsi.annotations import positive_fraction as area_fraction

    sid = em_cohort.annotated_ids[0]
    slides = cohort.by_id()
    src = em_cohort.cohort / "annotations"
    st = TileStore(slides[sid].store_path)
    ref = load_pixel_annotations([src / f"{sid}_lesion_mask.png"], slides)[sid]

    dash = tmp_path / "dash"
    dash.mkdir()
    shutil.copy(src / f"{sid}_lesion_mask.png", dash / f"{sid}-mask.png")
    shutil.copy(src / f"{sid}_lesion_mask.json", dash / f"{sid}-mask.json")
    got = load_pixel_annotations([dash], slides)
    assert list(got) == [sid] and got[sid].sources == [str(dash / f"{sid}-mask.png")]
    assert got[sid].mask_downsample == 16
    assert _truth_files([dash], slides) == {sid: dash / f"{sid}-mask.png"}  # evaluate finds the same file
    for xy in st.coords:
        np.testing.assert_array_equal(got[sid].tile_target(xy, st.tile_px, st.downsample),
                                      ref.tile_target(xy, st.tile_px, st.downsample))

    # a class that is positive only when the config says so
    gj = json.loads((src / f"{sid}.geojson").read_text())
    for f in gj["features"]:
        f["properties"]["classification"]["name"] = "Carcinoma"
    carc = tmp_path / "carcinoma"
    carc.mkdir()
    (carc / f"{sid}.geojson").write_text(json.dumps(gj))
    with pytest.raises(UsageError, match=f"{sid}.geojson: no positive annotation.*em.positive_classes="):
        load_pixel_annotations([carc], slides)
    geo = load_pixel_annotations([carc], slides, positive_classes=["Carcinoma"])[sid]
    assert geo.complete and geo.has_positive
    frac = area_fraction(geo.geo, st.coords, st.tile_px, st.downsample)
    tg = np.stack([geo.tile_target(xy, st.tile_px, st.downsample) for xy in st.coords])
    np.testing.assert_allclose(tg.mean(axis=(1, 2)), frac, atol=0.02)

    # a Region rectangle over the left half: the right half is unlabelled except the lesions there
    gj["features"].append({"type": "Feature", "properties": {"classification": {"name": "Region"}},
                           "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [512, 0], [512, 1024], [0, 1024], [0, 0]]]}})
    (carc / f"{sid}.geojson").write_text(json.dumps(gj))
    part = load_pixel_annotations([carc], slides, positive_classes=["Carcinoma"])[sid]
    assert not part.complete
    span = st.tile_px * st.downsample
    want = (st.coords[:, 0] < 512) | (frac > 0)
    np.testing.assert_array_equal(part.labelled_tiles(st.coords, st.tile_px, st.downsample), want)
    assert 0 < want.sum() < len(want)
    for xy, fr in zip(st.coords, frac):
        target, weight = part.tile_labels(xy, st.tile_px, st.downsample)
        np.testing.assert_array_equal(target, geo.tile_target(xy, st.tile_px, st.downsample))
        if xy[0] + span <= 512:
            assert weight.all()
        elif xy[0] >= 512 and fr == 0:
            assert not weight.any()


# --------------------------------------------------------------------------- datasets


def test_fast_reader_equals_zarr_and_falls_back_for_zstd(em_cohort, tmp_path):
    from pipeline.config import load_config
    from pipeline.tile import run_tile

    st = TileStore(em_cohort.stores / "slide_000.zarr")
    r = FastTileReader(st)
    assert r.fast
    for i in range(len(st)):
        np.testing.assert_array_equal(r[i], st[i])
    with pytest.raises(IndexError):
        r[len(st)]
    rep = run_tile([em_cohort.cohort / "slide_000.tif"], tmp_path / "z", load_config("tiny", {"store.codec": "zstd"}),
                   workers=0, quiet=True, progress=False)
    assert rep.ok
    z = TileStore(tmp_path / "z" / "slide_000.zarr")
    rz = FastTileReader(z)
    assert not rz.fast
    np.testing.assert_array_equal(rz[3], z[3])


def _pseudo_zarr(path, sid, n, h, seed=0):
    import zarr

    rng = np.random.default_rng(seed)
    maps = (rng.random((n, h, h)) ** 3).astype(np.float16)
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.create_group(sid).create_array("maps", data=maps, chunks=(1, h, h))
    return maps


def test_targets_per_source(em_cohort, cohort, tmp_path):
    import cv2

    from pipeline.pseudolabels import PseudoTargets, positive_pseudo_labels

    sid = em_cohort.annotated_ids[0]
    entry = cohort.by_id()[sid]
    neg = next(s for s in cohort.train if s.label == 0)
    ann = load_pixel_annotations([em_cohort.annotations[0]], cohort.by_id())
    st = TileStore(entry.store_path)
    maps = _pseudo_zarr(tmp_path / "pm.zarr", sid, len(st), 32)
    items = TileItems.concat([
        TileItems.make(0, np.arange(len(st)), SOURCE_ANNOTATED),
        TileItems.make(0, [0, 5, 7], SOURCE_PSEUDO),
        TileItems.make(1, [0, 1, 2], SOURCE_NEGATIVE),
        TileItems.make(1, [3], SOURCE_CONSTANT, 1.0),
    ])
    ds = TileTargetDataset([entry.store_path, neg.store_path], items, slide_ids=[sid, neg.slide_id],
                           annotations={0: ann[sid]},
                           pseudo=PseudoTargets(T=0.4, V=4.0, floor=0.01, probmaps=str(tmp_path / "pm.zarr")))
    n = len(st)
    assert len(ds) == n + 7
    for i in range(n):
        item = ds[i]
        assert item["image"].shape == (128, 128, 3) and item["image"].dtype == np.uint8
        np.testing.assert_array_equal(item["image"], st[i])
        np.testing.assert_array_equal(item["target"], rasterize_tile(ann[sid].geo, st.coords[i], 128, st.downsample))
        assert item["source"] == SOURCE_ANNOTATED
    for j, t in enumerate([0, 5, 7]):
        want = cv2.resize(positive_pseudo_labels(maps[t : t + 1].astype(np.float32), V=4.0, floor=0.01)[0], (128, 128),
                          interpolation=cv2.INTER_LINEAR)
        got = ds[n + j]["target"].astype(np.float32)
        np.testing.assert_allclose(got, want, atol=1e-3)
        assert got.max() <= 1.0 and got.min() >= 0.0
    for j in range(3):  # hard negatives of a negative slide: all zero
        assert not ds[n + 3 + j]["target"].any()
    assert (ds[n + 6]["target"] == 1).all()


def _dihedral(a, k, fh, fv):
    a = np.rot90(a, k, axes=(0, 1))
    if fh:
        a = a[:, ::-1]
    if fv:
        a = a[::-1]
    return a


def test_augmentation_moves_tile_and_target_together(em_cohort, cohort):
    sid = em_cohort.annotated_ids[0]
    entry = cohort.by_id()[sid]
    ann = load_pixel_annotations([em_cohort.annotations[0]], cohort.by_id())
    st = TileStore(entry.store_path)
    frac = positive_fraction(ann[sid].geo, st.coords, st.tile_px, st.downsample)
    edge = [int(i) for i in np.flatnonzero((frac > 0.05) & (frac < 0.95))]  # tiles with a lesion border
    assert edge
    ds = TileTargetDataset([entry.store_path], TileItems.make(0, edge, SOURCE_ANNOTATED), annotations={0: ann[sid]})
    seen = set()
    for seed in range(12):
        plain, aug = ds[0], ds[(0, seed)]
        matches = [(k, fh, fv) for k in range(4) for fh in (0, 1) for fv in (0, 1)
                   if np.array_equal(_dihedral(plain["image"], k, fh, fv), aug["image"])]
        assert matches, "augmented tile is not a flip/rotation of the tile"
        assert any(np.array_equal(_dihedral(plain["target"], *m), aug["target"]) for m in matches)
        seen.add(aug["image"].tobytes())
        assert np.array_equal(ds[(0, seed)]["image"], aug["image"])  # same seed, same result
    assert len(seen) >= 4
    a, b = augment_geometric(5, (np.arange(12).reshape(3, 4), np.arange(12).reshape(3, 4)), flip=True, rotate90=True)
    np.testing.assert_array_equal(a, b)


def test_batches_do_not_depend_on_loader_workers(em_cohort, cohort):
    from torch.utils.data import DataLoader

    from pipeline.sampling import MixedBatchSampler

    ann = load_pixel_annotations(em_cohort.annotations, cohort.by_id())
    train = cohort.train
    parts, annotations = [], {}
    for i, s in enumerate(train):
        if s.slide_id in ann:
            parts.append(TileItems.make(i, np.arange(s.n_tiles), SOURCE_ANNOTATED))
            annotations[i] = ann[s.slide_id]
    neg = [TileItems.make(i, np.arange(s.n_tiles), SOURCE_NEGATIVE) for i, s in enumerate(train) if s.label == 0]
    a, hn = TileItems.concat(parts), TileItems.concat(neg)
    items = TileItems.concat([a, hn])
    ds = TileTargetDataset([s.store_path for s in train], items, annotations=annotations)
    with pytest.warns(UserWarning, match="empty"):
        sampler = MixedBatchSampler((len(a), 0, len(hn)), 10, (2, 1, 7), num_batches=3, seed=1)
    out = {}
    for workers in (0, 2):
        loader = DataLoader(ds, batch_sampler=SeededBatches(sampler.as_flat_indices(), 7, epoch=2), num_workers=workers,
                            collate_fn=collate)
        out[workers] = list(loader)
    assert len(out[0]) == 3
    for b0, b2 in zip(out[0], out[2]):
        assert b0["image"].shape == (10, 128, 128, 3) and b0["target"].shape == (10, 128, 128)
        assert torch.equal(b0["image"], b2["image"]) and torch.equal(b0["target"], b2["target"])
        # the 2:1:7 mix with no pseudo-positives: 2 annotated + 8 hard negatives
        assert b0["source"].tolist() == [SOURCE_ANNOTATED] * 2 + [SOURCE_NEGATIVE] * 8


def test_topk_dataset_pads_short_slides(cohort):
    s = cohort.train[0]
    ds = SlideTopKDataset([s.store_path], [np.array([4, 2])], [1], k=4)
    item = ds[0]
    assert item["tiles"].shape == (4, 128, 128, 3) and item["mask"].tolist() == [True, True, False, False]
    st = TileStore(s.store_path)
    np.testing.assert_array_equal(item["tiles"][0], st[4])
    np.testing.assert_array_equal(item["tiles"][1], st[2])
    assert item["label"] == 1.0
    batch = collate([ds[(0, 3)], ds[(0, 4)]])
    assert batch["tiles"].shape == (2, 4, 128, 128, 3) and batch["mask"].dtype == torch.bool


def test_stain_jitter_uses_its_own_stream_per_item(em_cohort, cohort):
    """HED jitter (pipeline.stain) changes the pixels only: flips, rotations and targets stay as without it."""
    from pipeline.stain import HEDJitter

    sid = em_cohort.annotated_ids[0]
    entry = cohort.by_id()[sid]
    ann = load_pixel_annotations([em_cohort.annotations[0]], cohort.by_id())
    items = TileItems.make(0, np.arange(6), SOURCE_ANNOTATED)
    plain = TileTargetDataset([entry.store_path], items, annotations={0: ann[sid]})
    hed = HEDJitter(0.3, 0.05)
    stained = TileTargetDataset([entry.store_path], items, annotations={0: ann[sid]}, stain=hed)
    raw = TileStore(entry.store_path)
    for i in range(6):
        seed = 1000 + i
        a, b = plain[(i, seed)], stained[(i, seed)]
        np.testing.assert_array_equal(a["target"], b["target"])
        expected = augment_geometric(seed, (hed(raw[i], seed),), flip=True, rotate90=True)[0]
        np.testing.assert_array_equal(b["image"], expected)  # jitter, then the same flip/rotation
        assert np.abs(b["image"].astype(int) - a["image"]).mean() > 1
        np.testing.assert_array_equal(stained[(i, seed)]["image"], b["image"])
        np.testing.assert_array_equal(stained[i]["image"], raw[i])  # no seed: no augmentation
    topk = SlideTopKDataset([entry.store_path], [np.arange(3)], [1], k=3, stain=hed)
    topk_plain = SlideTopKDataset([entry.store_path], [np.arange(3)], [1], k=3)
    x, y = topk[(0, 9)]["tiles"], topk_plain[(0, 9)]["tiles"]
    diffs = [float((x[j].astype(int) - y[j]).mean()) for j in range(3)]
    assert len({round(d, 3) for d in diffs}) == 3  # every tile draws its own stain change
    from torch.utils.data import DataLoader

    batches = SeededBatches([[0, 1, 2], [3, 4, 5]], base_seed=5, epoch=1)
    out = [list(DataLoader(stained, batch_sampler=batches, num_workers=w, collate_fn=collate)) for w in (0, 2)]
    for b0, b2 in zip(*out):
        assert torch.equal(b0["image"], b2["image"])
