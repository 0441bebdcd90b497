"""The EM loop end to end on a generated cohort with lesions (tiny config, CPU).

The session's two-round run (``em_run``: ``wsi-pipeline em-round --rounds 2``
through the CLI) is shared with test_inference.py; the crash/resume test runs
its own small cohort subset.
"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from pipeline.batch import UsageError  # noqa: E402
from pipeline.cli import main  # noqa: E402
from pipeline.config import Config, ConfigError, load_config  # noqa: E402
from pipeline.data import SOURCE_NEGATIVE, SOURCE_PSEUDO, TileTargetDataset  # noqa: E402
from pipeline.em import EMHooks, run_em  # noqa: E402
from pipeline.pseudolabels import e_step  # noqa: E402
from pipeline.labels import load_cohort, read_labels_csv  # noqa: E402
from tests.em_fixtures import em_cohort, em_run, em_threads  # noqa: E402,F401
from wsi import __version__  # noqa: E402

# The seeded tiny run separates the 5 + 5 held-out slides with AUC 0.92-1.0 on every cohort seed tried
# (0, 1, 2, 3); chance is 0.5.
MIN_VAL_AUC = 0.75


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _ann_args(cohort):
    out = []
    for a in cohort.annotations:
        out += ["--annotations", a]
    return out


# --------------------------------------------------------------------------- trainers


def test_trainer_registry_and_colour_jitter():
    from pipeline.trainers import ColorJitter, SoftBCESegTrainer, create_trainer, list_trainers

    assert {"soft_bce", "topk_mean"} <= set(list_trainers())
    with pytest.raises(ValueError, match="unknown trainer 'cellmix'"):
        create_trainer("cellmix", torch.nn.Conv2d(3, 1, 1), device="cpu")
    x = torch.rand(6, 3, 16, 16)
    j = ColorJitter(0.2, 0.2, 0.2, 0.05)
    a = j(x, torch.Generator().manual_seed(1))
    b = j(x, torch.Generator().manual_seed(1))
    c = j(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1 and (a - x).abs().mean() > 0.01
    assert not ColorJitter(0, 0, 0, 0).active
    # a trainer runs epochs, records losses, and its state resumes exactly
    import models

    def make():
        models.seed_everything(0)
        m = models.create_model("dla34_up_tiny")
        return SoftBCESegTrainer(m, device=torch.device("cpu"), epochs=2, jitter=j, progress=False)

    batch = {"image": (torch.rand(2, 64, 64, 3) * 255).to(torch.uint8), "target": torch.zeros(2, 64, 64)}
    t = make()
    hist = t.fit(lambda e: [batch])
    assert [h["epoch"] for h in hist] == [1, 2] and hist[1]["loss"] < hist[0]["loss"]
    t1 = make()
    t1.train_epoch([batch])
    state = t1.state_dict()
    t2 = make()
    t2.load_state_dict(state)
    t2.fit(lambda e: [batch])
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, t2.model.state_dict()[k]), k


# --------------------------------------------------------------------------- the two-round run


def test_two_rounds_end_to_end(em_run, em_cohort):
    meta = json.loads((em_run / "run.json").read_text())
    assert meta["format"] == "wsi-pipeline.em-run" and meta["format_version"] == 1
    assert meta["rounds_completed"] == [0, 1] and meta["mode"] == "mixed"
    assert meta["software_version"] == __version__
    assert set(meta["tiling"]) == {"config_hash", "tile_px", "mpp", "overlap_px"}
    assert meta["tiling"]["tile_px"] == 128
    cfg = load_config("tiny")
    assert meta["config"] == cfg.to_dict()
    assert meta["train_hash"] == cfg.train_hash(tiling_hash=meta["tiling"]["config_hash"])
    assert sorted(meta["annotations"]) == sorted(em_cohort.annotated_ids)
    losses = {int(k): v for k, v in meta["round_losses"].items()}
    eligible = {k: v for k, v in losses.items() if k >= 1}  # mixed: round 0 is the pixel-only model, not eligible
    assert meta["best_round"] == min(eligible, key=eligible.get)
    assert json.loads((em_run / "best").read_text()) == {"round": meta["best_round"]}

    for k in (0, 1):
        rdir = em_run / f"round_{k}"
        assert (rdir / "DONE").is_file() and not (rdir / "state").exists()
        for name, arch in (("seg.pt", "dla34_up_tiny"), ("cls.pt", "dla34_cls_tiny")):
            ck = torch.load(rdir / name, map_location="cpu", weights_only=False)
            assert {"arch", "arch_kwargs", "model", "optimizer", "scheduler", "round", "config", "software_version"} <= set(ck)
            assert ck["arch"] == arch and ck["round"] == k and ck["config"] == cfg.to_dict()
        m = json.loads((rdir / "metrics.json").read_text())
        assert m["round"] == k and m["stage2_loss"] == pytest.approx(losses[k])
        assert len(m["seg"]["epochs"]) == (4 if k == 0 else 2) and len(m["stage2"]["epochs"]) == 4
        assert all(e["loss"] is not None and np.isfinite(e["loss"]) for e in m["seg"]["epochs"] + m["stage2"]["epochs"])
        assert m["seg"]["init"] == ("random" if k == 0 else "round 0")
        assert set(m["time_s"]) >= {"predict", "stage2", "validation", "heatmaps", "total"}
        assert set(m["val"]) >= {"auc", "specificity_at_full_sensitivity", "threshold_at_full_sensitivity", "n_pos", "n_neg"}
        assert (m["val"]["n_pos"], m["val"]["n_neg"]) == (5, 5)
        assert len(m["heatmaps"]) == 2 and all((rdir / h).stat().st_size > 1000 for h in m["heatmaps"])
        assert m["predict"]["slides"] == 20
    # round 0: annotated tiles only; round 1: the 2:1:7 mix
    m0 = json.loads((em_run / "round_0" / "metrics.json").read_text())
    m1 = json.loads((em_run / "round_1" / "metrics.json").read_text())
    assert m0["e_step"] is None and m0["seg"]["sources"]["pseudo_positive"] == 0
    assert m1["seg"]["counts_per_batch"] == [4, 2, 14]  # batch 20 at 2:1:7
    e = m1["e_step"]
    assert e["positive_slides"]["slides"] == 3 and e["negative_slides"]["slides"] == 5  # annotated slides excluded
    for cls in ("positive_slides", "negative_slides"):
        assert e[cls]["kept"] + e[cls]["removed"] == e[cls]["tiles"]
    # hard negatives: the tiles at or above T, topped up to one batch's share (14) from below T
    pools = e["hard_negative_pools"]
    assert pools["above_T"] == e["negative_slides"]["kept"]
    assert e["hard_negative_tiles"] == pools["above_T"] + pools["top_up_below_T"] == max(14, pools["above_T"])
    assert e["pseudo_positive_tiles"] == e["positive_slides"]["kept"] > 0
    assert 0 < e["pseudo_positive_pixel_fraction"] <= 1
    # theta1 finds lesion tiles: pseudo-positives are kept far more often on positive slides
    assert e["positive_slides"]["kept"] / e["positive_slides"]["tiles"] > 2 * e["negative_slides"]["kept"] / e["negative_slides"]["tiles"]


def test_held_out_slides_are_classified_above_chance(em_run):
    meta = json.loads((em_run / "run.json").read_text())
    m = json.loads((em_run / f"round_{meta['best_round']}" / "metrics.json").read_text())
    assert m["val"]["auc"] >= MIN_VAL_AUC, m["val"]
    probs = m["val"]["slides"]
    assert len(probs) == 10 and all(0 <= p["probability"] <= 1 for p in probs.values())


def test_e_step_pseudo_labels(em_run, em_cohort):
    import zarr

    cfg = load_config("tiny")
    cohort = load_cohort(em_cohort.stores, em_cohort.labels)
    maps_path = em_run / "round_0" / "probmaps.zarr"
    est = e_step(maps_path, cohort.train, em_cohort.annotated_ids, cfg.em)
    pp, hn, stats = est.pseudo_positive, est.hard_negative, est.stats
    root = zarr.open_group(str(maps_path), mode="r")
    labels = np.array([s.label for s in cohort.train])
    assert set(labels[pp.slide]) <= {1} and set(labels[hn.slide]) <= {0}
    annotated = {i for i, s in enumerate(cohort.train) if s.slide_id in em_cohort.annotated_ids}
    assert not annotated & (set(pp.slide.tolist()) | set(hn.slide.tolist()))
    # the T filter: kept tiles reach T, removed ones do not
    for i, s in enumerate(cohort.train):
        if i in annotated:
            continue
        maxp = root[f"{s.slide_id}/maps"][:].astype(np.float32).max(axis=(1, 2))
        kept = set(pp.tile[pp.slide == i].tolist()) | set(hn.tile[hn.slide == i].tolist())
        assert kept == set(np.flatnonzero(maxp >= cfg.em.threshold_T).tolist())
    ds = TileTargetDataset([s.store_path for s in cohort.train], type(pp).concat([pp, hn]),
                           slide_ids=[s.slide_id for s in cohort.train], pseudo=est.targets)
    assert len(hn) == stats["hard_negative_tiles"] > 0
    for j in range(len(pp), len(ds)):  # negative slides' pseudo labels are all zero
        item = ds[j]
        assert item["source"] == SOURCE_NEGATIVE and not item["target"].any()
    for j in range(min(len(pp), 5)):
        item = ds[j]
        assert item["source"] == SOURCE_PSEUDO
        p = root[f"{cohort.train[pp.slide[j]].slide_id}/maps"][int(pp.tile[j])].astype(np.float32)
        assert item["target"].max() == pytest.approx(min(1.0, 4.0 * p.max()), abs=2e-3)


def test_rerun_of_finished_rounds_does_nothing(em_run, em_cohort):
    before = {p: p.stat().st_mtime_ns for p in em_run.glob("round_*/*.pt")}
    res = _cli("em-round", "--stores", em_cohort.stores, "--labels", em_cohort.labels, "--run", em_run,
               "--config", "tiny", "--rounds", "2", "--quiet", *_ann_args(em_cohort))
    assert res.exit_code == 0, res.output
    assert "ran round(s) none" in res.output and "<- best" in res.output
    assert {p: p.stat().st_mtime_ns for p in em_run.glob("round_*/*.pt")} == before


def test_run_from_a_different_config_or_input_is_refused(em_run, em_cohort, tmp_path):
    ann = list(em_cohort.annotations)
    with pytest.raises(UsageError, match=r"different config \(em.epochs: 2 -> 3\).*run.json"):
        run_em(em_cohort.stores, em_cohort.labels, em_run, load_config("tiny", {"em.epochs": 3}), annotations=ann)
    with pytest.raises(UsageError, match="trained with --mode mixed, not pixel"):
        run_em(em_cohort.stores, em_cohort.labels, em_run, load_config("tiny", {"em.mode": "pixel"}), annotations=ann)
    with pytest.raises(UsageError, match="pixel annotations differ"):
        run_em(em_cohort.stores, em_cohort.labels, em_run, load_config("tiny"), annotations=ann[:1])
    rows = read_labels_csv(em_cohort.labels)
    rows[0] = (rows[0][0], 1 - rows[0][1], rows[0][2])
    with open(tmp_path / "l.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("slide_id", "label", "split"), *rows])
    with pytest.raises(UsageError, match="labels differ from those the run was trained with"):
        run_em(em_cohort.stores, tmp_path / "l.csv", em_run, load_config("tiny"), annotations=ann)
    res = _cli("em-round", "--stores", em_cohort.stores, "--labels", em_cohort.labels, "--run", em_run,
               "--config", "tiny", "--set", "stage2.top_k=8", *_ann_args(em_cohort))
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and res.output.startswith("error: ") and "stage2.top_k: 4 -> 8" in res.output


def test_a_run_made_before_a_setting_existed_resumes(em_run, em_cohort, tmp_path):
    """A run recorded by a version without some setting (here stage2.init) reads it as its default, which keeps
    that version's behaviour: the run resumes as it is (nothing retrained), while a real change is still refused."""
    old = tmp_path / "old"
    shutil.copytree(em_run, old)
    meta = json.loads((old / "run.json").read_text())
    del meta["config"]["stage2"]["init"]
    meta["train_hash"] = "0123456789abcdef"  # what the older version's hash of its config was
    (old / "run.json").write_text(json.dumps(meta))
    before = {p: p.stat().st_mtime_ns for p in old.glob("round_*/*.pt")}
    s = run_em(em_cohort.stores, em_cohort.labels, old, load_config("tiny"), annotations=list(em_cohort.annotations),
               rounds=2, progress=False)
    assert s["rounds_run"] == [] and {p: p.stat().st_mtime_ns for p in old.glob("round_*/*.pt")} == before
    with pytest.raises(UsageError, match=r"different config \(stage2.init: 'random' -> 'theta1'\)"):
        run_em(em_cohort.stores, em_cohort.labels, old, load_config("tiny", {"stage2.init": "theta1"}),
               annotations=list(em_cohort.annotations), rounds=2, progress=False)


def _state(path):
    ck = torch.load(path, map_location="cpu", weights_only=False)
    return ck["model"]


def test_theta1_from_copies_theta1_and_trains_stage_2_only(em_run, em_cohort, tmp_path):
    """--theta1-from: every round's theta1 is the source's, bit for bit; stage 2 with the source's own settings
    reproduces the source's theta2 exactly (so a copied theta1 is the one this run would have trained), and
    with other stage-2 settings it trains a different theta2 on the same theta1."""
    ann = list(em_cohort.annotations)
    same, other = tmp_path / "same", tmp_path / "other"
    s = run_em(em_cohort.stores, em_cohort.labels, same, load_config("tiny"), annotations=ann, rounds=2,
               progress=False, theta1_from=em_run)
    run_em(em_cohort.stores, em_cohort.labels, other, load_config("tiny", {"stage2.top_k": 2}), annotations=ann,
           rounds=2, progress=False, theta1_from=em_run)
    src = json.loads((em_run / "run.json").read_text())
    assert s["best_round"] == src["best_round"]
    for k in (0, 1):
        rd = f"round_{k}"
        assert (same / rd / "seg.pt").read_bytes() == (em_run / rd / "seg.pt").read_bytes()
        assert (other / rd / "seg.pt").read_bytes() == (em_run / rd / "seg.pt").read_bytes()
        a, b, c = (_state(r / rd / "cls.pt") for r in (em_run, same, other))
        assert all(torch.equal(a[n], b[n]) for n in a)
        assert not all(torch.equal(a[n], c[n]) for n in a)
        m = json.loads((same / rd / "metrics.json").read_text())
        assert m["stage2_loss"] == json.loads((em_run / rd / "metrics.json").read_text())["stage2_loss"]
        assert m["theta1_from"]["round_dir"] == str((em_run / rd).resolve()) and "m_step" not in m["time_s"]
    meta = json.loads((other / "run.json").read_text())
    assert meta["theta1_from"] == {"run": str(em_run.resolve()), "train_hash": src["train_hash"]}
    with pytest.raises(UsageError, match=r"took theta1 from the run .* this call from its own training"):
        run_em(em_cohort.stores, em_cohort.labels, other, load_config("tiny", {"stage2.top_k": 2}), annotations=ann,
               rounds=2, progress=False)


def test_theta1_from_refuses_a_run_of_other_theta1(em_run, em_cohort, tmp_path):
    ann = list(em_cohort.annotations)
    with pytest.raises(UsageError, match=r"other theta1 settings \(em.epochs: 2 -> 3\)"):
        run_em(em_cohort.stores, em_cohort.labels, tmp_path / "a", load_config("tiny", {"em.epochs": 3}),
               annotations=ann, rounds=2, theta1_from=em_run)
    with pytest.raises(UsageError, match="other pixel annotations"):
        run_em(em_cohort.stores, em_cohort.labels, tmp_path / "b", load_config("tiny"), annotations=ann[:1],
               rounds=2, theta1_from=em_run)
    with pytest.raises(UsageError, match=r"round\(s\) 2 are not finished .* --rounds 2"):
        run_em(em_cohort.stores, em_cohort.labels, tmp_path / "c", load_config("tiny"), annotations=ann,
               rounds=3, theta1_from=em_run)
    res = _cli("em-round", "--stores", em_cohort.stores, "--labels", em_cohort.labels, "--run", tmp_path / "d",
               "--config", "tiny", "--mode", "pixel", "--theta1-from", em_run, *_ann_args(em_cohort))
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "differs in its --mode" in res.output
    assert not (tmp_path / "a" / "round_0").exists()


def test_theta2_can_start_from_theta1s_trunk(em_run, em_cohort, tmp_path):
    """stage2.init: theta1 -- theta2's DLA trunk starts as the round's theta1 trunk, tensor for tensor (with no
    stage-2 epochs it stays so), its head from the seeded init; metrics.json says so. A theta2 without that
    trunk (ScoreNet) and a weights file given as well are one clear error each."""
    from pipeline.run import build_model, load_trunk

    run = tmp_path / "run"
    run_em(em_cohort.stores, em_cohort.labels, run, load_config("tiny", {"stage2.init": "theta1", "stage2.epochs": 0}),
           annotations=list(em_cohort.annotations), rounds=2, progress=False, theta1_from=em_run)
    fresh = _state(em_run / "round_0" / "cls.pt")
    for k in (0, 1):
        seg, cls = _state(run / f"round_{k}" / "seg.pt"), _state(run / f"round_{k}" / "cls.pt")
        trunk = [n for n in cls if n.startswith("backbone.") and not n.startswith("backbone.fc.")]
        assert len(trunk) > 100 and all(torch.equal(cls[n], seg[n]) for n in trunk)
        assert not all(torch.equal(cls[n], fresh[n]) for n in trunk)  # not the random init of a default run
        m = json.loads((run / f"round_{k}" / "metrics.json").read_text())
        assert m["stage2"]["init"].startswith("theta1 trunk") and f"round_{k}" in m["stage2"]["init"]
    a, b = _state(run / "round_0" / "cls.pt"), _state(run / "round_1" / "cls.pt")
    assert torch.equal(a["backbone.fc.weight"], b["backbone.fc.weight"])  # the head's init does not depend on k
    with pytest.raises(UsageError, match="none of theta1's trunk tensors .* fit theta2"):
        load_trunk(build_model("scorenet_tiny", {"num_classes": 1}), run / "round_0" / "seg.pt")
    with pytest.raises(ConfigError, match="stage2.init: theta1 and model.cls_weights"):
        load_config("tiny", {"stage2.init": "theta1", "model.cls_weights": str(run / "round_0" / "cls.pt")})


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_are_one_clear_line(em_cohort, tmp_path):
    base = ["em-round", "--stores", em_cohort.stores, "--run", tmp_path / "run", "--config", "tiny"]
    rows = read_labels_csv(em_cohort.labels) + [("missing_slide", 1, "train")]
    with open(tmp_path / "l.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("slide_id", "label", "split"), *rows])
    res = _cli(*base, "--labels", tmp_path / "l.csv", *_ann_args(em_cohort))
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert "no store in" in res.output and "missing_slide" in res.output

    # an annotation outside its slide
    sid = em_cohort.annotated_ids[0]
    gj = json.loads(em_cohort.annotations[0].read_text())
    for f in gj["features"]:
        f["geometry"]["coordinates"] = [[[x * 4, y * 4] for x, y in ring] for ring in f["geometry"]["coordinates"]]
    bad = tmp_path / f"{sid}.geojson"
    bad.write_text(json.dumps(gj))
    res = _cli(*base, "--labels", em_cohort.labels, "--annotations", bad)
    assert res.exit_code == 2 and f"{sid}.geojson" in res.output and "outside the slide" in res.output

    # mixed mode without annotations, a non-run folder, a broken weights file
    res = _cli(*base, "--labels", em_cohort.labels)
    assert res.exit_code == 2 and "needs pixel annotations" in res.output
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    res = _cli(*base[:-4], "--run", tmp_path / "busy", "--config", "tiny", "--labels", em_cohort.labels,
               *_ann_args(em_cohort))
    assert res.exit_code == 2 and "not empty" in res.output
    torch.save({"foo": torch.zeros(3)}, tmp_path / "w.pt")
    res = _cli(*base, "--labels", em_cohort.labels, "--weights", tmp_path / "w.pt", *_ann_args(em_cohort))
    assert res.exit_code == 2 and "w.pt: none of its tensors fit the theta1 model" in res.output
    assert not (tmp_path / "run" / "round_0").exists()

    # a store from an older format
    stores = tmp_path / "stores"
    shutil.copytree(em_cohort.stores, stores)
    meta_path = stores / f"{sid}.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["format_version"] = 0
    meta_path.write_text(json.dumps(meta))
    res = _cli("em-round", "--stores", stores, "--labels", em_cohort.labels, "--run", tmp_path / "run2",
               "--config", "tiny", *_ann_args(em_cohort))
    assert res.exit_code == 2 and f"{sid}.zarr: tile store format version 0" in res.output


def test_tile_size_must_be_a_multiple_of_32(em_cohort, tmp_path):
    with pytest.raises(ConfigError, match="tiling.tile_px=100 is not a multiple of 32.*96 or 128"):
        load_config("tiny", {"tiling.tile_px": 100}).validate_for_training()
    Config().validate_for_training()  # the paper's 512 px
    from pipeline.tile import run_tile

    pos = em_cohort.annotated_ids[0]
    neg = next(s for s, lab, sp in read_labels_csv(em_cohort.labels) if lab == 0 and sp == "train")
    rep = run_tile([em_cohort.cohort / f"{s}.tif" for s in (pos, neg)], tmp_path / "stores",
                   load_config("tiny", {"tiling.tile_px": 112, "tiling.overlap_px": 16}), workers=0, quiet=True,
                   progress=False)
    assert rep.ok
    with open(tmp_path / "l.csv", "w") as fh:
        fh.write(f"slide_id,label\n{pos},1\n{neg},0\n")
    with pytest.raises(ConfigError, match="tile_px of the stores in .*=112 is not a multiple of 32"):
        run_em(tmp_path / "stores", tmp_path / "l.csv", tmp_path / "run", load_config("tiny"),
               annotations=[em_cohort.annotations[0]])


# --------------------------------------------------------------------------- crash and resume


class _Crash(Exception):
    pass


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(em_cohort, tmp_path, em_threads):
    """Kill the run at checkpoints in both rounds (theta1, maps, theta2); the resumed run ends with
    bit-identical weights, maps and losses."""
    rows = read_labels_csv(em_cohort.labels)
    ann = set(em_cohort.annotated_ids)
    keep = [r for r in rows if r[0] in ann]
    keep += [r for r in rows if r[2] == "train" and r[1] == 1 and r[0] not in ann][:1]
    keep += [r for r in rows if r[2] == "train" and r[1] == 0][:2]
    keep += [r for r in rows if r[2] == "val"][:2]
    with open(tmp_path / "l.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("slide_id", "label", "split"), *keep])
    cfg = load_config("tiny", {"em.epochs_init": 2, "em.epochs": 2, "em.batches_per_epoch": 2,
                               "stage2.epochs": 2, "em.heatmap_slides": 1})

    def run(d, crash_at=None):
        def hook(k, step, n):
            if crash_at == (k, step, n):
                raise _Crash(f"{crash_at}")
        try:
            run_em(em_cohort.stores, tmp_path / "l.csv", d, cfg, annotations=em_cohort.annotations, rounds=2,
                   progress=False, hooks=EMHooks(hook))
        except _Crash:
            return "crashed"
        return "done"

    assert run(tmp_path / "a") == "done"
    crashes = [(0, "seg", 1), (0, "predict", 2), (1, "seg", 1), (1, "cls", 1)]
    for c in crashes:
        assert run(tmp_path / "b", c) == "crashed"
        assert (tmp_path / "b" / f"round_{c[0]}" / "state").is_dir()
        assert not (tmp_path / "b" / f"round_{c[0]}" / "DONE").exists()
    assert (tmp_path / "b" / "round_0" / ".probmaps.zarr.partial").exists() is False
    assert run(tmp_path / "b") == "done"

    a, b = tmp_path / "a", tmp_path / "b"
    for k in (0, 1):
        for name in ("seg.pt", "cls.pt"):
            wa = torch.load(a / f"round_{k}" / name, weights_only=False)
            wb = torch.load(b / f"round_{k}" / name, weights_only=False)
            assert wa["model"].keys() == wb["model"].keys()
            assert all(torch.equal(wa["model"][key], wb["model"][key]) for key in wa["model"]), (k, name)
            assert [e["loss"] for e in wa["history"]] == [e["loss"] for e in wb["history"]]
        ma = json.loads((a / f"round_{k}" / "metrics.json").read_text())
        mb = json.loads((b / f"round_{k}" / "metrics.json").read_text())
        assert ma["stage2_loss"] == mb["stage2_loss"] and ma["val"] == mb["val"]
        assert ma["e_step"] == mb["e_step"]
    import zarr

    za, zb = zarr.open_group(str(a / "round_1" / "probmaps.zarr")), zarr.open_group(str(b / "round_1" / "probmaps.zarr"))
    for sid in za.group_keys():
        np.testing.assert_array_equal(za[sid]["maps"][:], zb[sid]["maps"][:])
    assert json.loads((a / "run.json").read_text())["round_losses"] == json.loads((b / "run.json").read_text())["round_losses"]

    # --force starts over: rounds are trained again, to the same result
    mtime = (b / "round_0" / "seg.pt").stat().st_mtime_ns
    run_em(em_cohort.stores, tmp_path / "l.csv", b, cfg, annotations=em_cohort.annotations, rounds=1, force=True,
           progress=False)
    assert (b / "round_0" / "seg.pt").stat().st_mtime_ns != mtime and not (b / "round_1").exists()
    assert json.loads((b / "run.json").read_text())["rounds_completed"] == [0]


# --------------------------------------------------------------------------- the three modes


@pytest.mark.slow
def test_three_modes_give_comparable_metrics(em_run, em_cohort, tmp_path, em_threads):
    from pipeline.compare import compare_runs, format_comparison, write_comparison

    cfg = {m: load_config("tiny", {"em.mode": m}) for m in ("pixel", "image")}
    s_pixel = run_em(em_cohort.stores, em_cohort.labels, tmp_path / "pixel", cfg["pixel"],
                     annotations=em_cohort.annotations, rounds=2, progress=False)
    assert s_pixel["rounds_completed"] == [0]  # no EM in pixel mode
    s_image = run_em(em_cohort.stores, em_cohort.labels, tmp_path / "image", cfg["image"], rounds=2, progress=False)
    assert s_image["rounds_completed"] == [0, 1]
    m = s_image["rounds"][1]
    assert m["seg"]["mil_top_k"] == 1 and len(m["seg"]["mil_selections"]) == 2
    assert m["seg"]["mil_selections"][0]["tiles"] == 10  # one tile per train slide
    runs = [em_run, tmp_path / "pixel", tmp_path / "image"]
    rows = compare_runs(runs)
    assert [r["mode"] for r in rows] == ["mixed", "pixel", "image"]
    for r in rows:
        assert r["val_auc"] is not None and 0 <= r["val_auc"] <= 1 and (r["n_pos"], r["n_neg"]) == (5, 5)
    table = format_comparison(rows)
    assert len(table.splitlines()) == 5 and "spec@100%sens" in table
    path = write_comparison(runs, tmp_path)
    assert path.read_text().strip() == table
    print("\n" + table)
