"""The EM loop on realistic data (issue #10): hard-negative supply, T per round, the per-slide cap,
unlabelled pixels, round choice, theta2 independent of the round, the fit warning, patients, and
evaluate's default split. Unit tests on hand-made probability maps, plus the shared tiny EM run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pipeline.config import load_config  # noqa: E402
from pipeline.labels import LabelError, SlideEntry, carve_val_split, read_labels_table  # noqa: E402
from pipeline.pseudolabels import e_step, round_threshold  # noqa: E402
from pipeline.sampling import choose_round  # noqa: E402
from tests.em_fixtures import em_cohort, em_run, em_threads  # noqa: E402,F401


def _maps(path: Path, slides: dict[str, np.ndarray], h: int = 4) -> None:
    """A probmaps.zarr whose tiles are constant maps at the given maxima."""
    import zarr

    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    for sid, maxp in slides.items():
        grp = g.create_group(sid)
        maps = np.repeat(np.asarray(maxp, np.float16)[:, None, None], h * h, axis=1).reshape(-1, h, h)
        grp.create_array("maps", data=maps, chunks=(1, h, h))
        grp.create_array("max_prob", data=maps.astype(np.float32).max(axis=(1, 2)), chunks=(max(1, len(maxp)),))


def _slides(spec):
    return [SlideEntry(sid, lab, "train", Path(f"/nowhere/{sid}.zarr"), n) for sid, lab, n in spec]


@pytest.fixture
def cohort_maps(tmp_path):
    rng = np.random.default_rng(0)
    maxp = {
        "pos1": np.concatenate([np.full(5, 0.9), rng.uniform(0, 0.3, 45)]),
        "pos2": np.concatenate([np.full(2, 0.6), rng.uniform(0, 0.3, 48)]),
        "neg1": np.concatenate([np.full(1, 0.5), rng.uniform(0, 0.35, 59)]),
        "neg2": rng.uniform(0, 0.2, 40),
    }
    _maps(tmp_path / "pm.zarr", maxp)
    train = _slides([("pos1", 1, 50), ("pos2", 1, 50), ("neg1", 0, 60), ("neg2", 0, 40)])
    return tmp_path / "pm.zarr", train, maxp


def _cfg(**em):
    return load_config(None, {f"em.{k}": v for k, v in em.items()}).em


def test_hard_negatives_are_topped_up_from_the_best_tiles_below_T(cohort_maps):
    pm, train, maxp = cohort_maps
    # few: one tile of neg1 passes T = 0.4; the epoch needs 14 -> 13 more, the highest below T
    est = e_step(pm, train, [], _cfg(), min_hard_negatives=14)
    assert len(est.hard_negative) == 14
    assert est.stats["hard_negative_pools"] == {"above_T": 1, "top_up_below_T": 13}
    neg = np.concatenate([maxp["neg1"], maxp["neg2"]]).astype(np.float16).astype(np.float32)
    chosen = [maxp[train[s].slide_id].astype(np.float16).astype(np.float32)[t]
              for s, t in zip(est.hard_negative.slide, est.hard_negative.tile)]
    assert sorted(chosen, reverse=True) == sorted(neg, reverse=True)[:14]
    assert set(est.hard_negative.slide.tolist()) <= {2, 3}  # negative slides only
    # zero needed, or top-up off: only the tiles at or above T
    assert len(e_step(pm, train, [], _cfg(), min_hard_negatives=0).hard_negative) == 1
    off = e_step(pm, train, [], _cfg(hard_negative_top_up=False), min_hard_negatives=14)
    assert len(off.hard_negative) == 1 and off.stats["hard_negative_pools"]["top_up_below_T"] == 0
    # many: more than all negative tiles -> every negative tile, no repeats
    allneg = e_step(pm, train, [], _cfg(), min_hard_negatives=1000).hard_negative
    assert len(allneg) == 100 and len(set(zip(allneg.slide.tolist(), allneg.tile.tolist()))) == 100


def test_threshold_from_the_negatives_and_the_positive_cap(cohort_maps):
    pm, train, maxp = cohort_maps
    neg = [maxp["neg1"].astype(np.float16).astype(np.float32), maxp["neg2"].astype(np.float16).astype(np.float32)]
    # 1 % of 100 negative tiles may pass: the T above the second-highest negative tile, but never below 0.4
    T = round_threshold(neg, _cfg(threshold_mode="negative_fpr", negative_fpr=0.01))
    assert T == pytest.approx(0.4)
    T = round_threshold(neg, _cfg(threshold_mode="negative_fpr", negative_fpr=0.01, threshold_T=0.1))
    all_neg = np.sort(np.concatenate(neg))[::-1]
    assert all_neg[1] < T <= all_neg[0] + 1e-6 and (np.concatenate(neg) >= T).sum() <= 1
    est = e_step(pm, train, [], _cfg(threshold_mode="negative_fpr", negative_fpr=0.01, threshold_T=0.1))
    assert est.targets.T == pytest.approx(T) and est.stats["negative_slides"]["kept"] <= 1
    # the cap keeps each positive slide's highest tiles
    est = e_step(pm, train, [], _cfg(max_positive_tiles_per_slide=3))
    per = est.stats["per_slide"]
    assert per["pos1"]["n_kept"] == 3 and per["pos2"]["n_kept"] == 2
    est = e_step(pm, train, [], _cfg(max_positive_tiles_per_slide=0.02))  # 2 % of 50 tiles = 1
    assert est.stats["per_slide"]["pos1"]["n_kept"] == 1
    assert 0 < est.stats["positive_slides"]["kept_share"] < 0.05


def test_the_e_step_estimates_pseudo_positive_precision_and_warns_when_it_is_noise(cohort_maps, tmp_path, caplog):
    from pipeline.pseudolabels import pseudo_precision_estimate

    pm, train, _ = cohort_maps
    est = e_step(pm, train, [], _cfg(), min_hard_negatives=0)  # 7 of 100 positive tiles kept, 1 of 100 negative
    assert est.stats["pseudo_positive_precision_estimate"] == pytest.approx(1 - 0.01 / 0.07)
    assert est.stats["warnings"] == []
    assert pseudo_precision_estimate(0.14, 0.133) == pytest.approx(0.05, abs=1e-3)
    assert pseudo_precision_estimate(0.05, 0.2) == 0.0 and pseudo_precision_estimate(0.0, 0.1) is None
    # a theta1 that keeps tiles of both classes alike: the round's pseudo-positives are noise, and it says so
    rng = np.random.default_rng(1)
    same = {sid: rng.uniform(0, 1, n) for sid, n in (("pos1", 50), ("pos2", 50), ("neg1", 60), ("neg2", 40))}
    _maps(tmp_path / "same.zarr", same)
    with caplog.at_level("WARNING", logger="wsi_pipeline"):
        noisy = e_step(tmp_path / "same.zarr", train, [], _cfg(), min_hard_negatives=0)
    assert noisy.stats["pseudo_positive_precision_estimate"] < 0.5
    assert len(noisy.stats["warnings"]) == 1 and "em.min_pseudo_precision=0.5" in noisy.stats["warnings"][0]
    assert noisy.stats["warnings"][0] in caplog.text
    assert e_step(tmp_path / "same.zarr", train, [], _cfg(min_pseudo_precision=0.0)).stats["warnings"] == []
    # nothing kept on the positive slides: a warning of its own
    _maps(tmp_path / "none.zarr", {sid: np.full(n, 0.1) for sid, n in (("pos1", 50), ("pos2", 50), ("neg1", 60),
                                                                      ("neg2", 40))})
    w = e_step(tmp_path / "none.zarr", train, [], _cfg()).stats["warnings"]
    assert len(w) == 1 and "kept no tile of the 2 positive slide(s)" in w[0]


def test_the_e_step_reads_maps_only_of_kept_positive_tiles(cohort_maps, monkeypatch):
    import pipeline.probmaps as probmaps

    pm, train, _ = cohort_maps
    reads = []
    real = probmaps.read_maps

    def counting(path, sid, tiles=None):
        reads.append((sid, None if tiles is None else np.asarray(tiles).tolist()))
        return real(path, sid, tiles)

    monkeypatch.setattr(probmaps, "read_maps", counting)
    est = e_step(pm, train, [], _cfg(), min_hard_negatives=0)
    assert reads == [("pos1", [0, 1, 2, 3, 4]), ("pos2", [0, 1])]
    assert len(est.pseudo_positive) == 7


def test_unlabelled_pixels_have_no_loss():
    import models
    from pipeline.trainers import create_trainer

    models.seed_everything(0)
    model = models.create_model("dla34_up_tiny", num_classes=1)
    tr = create_trainer("soft_bce", model, device=torch.device("cpu"), lr=1e-3, weight_decay=0.0, epochs=1,
                        lr_schedule="constant", amp=False, jitter=None, seed=0, progress=False, desc="t")
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8)
    y = torch.zeros(2, 64, 64)
    y[:, :32] = float("nan")
    loss_nan, _ = tr.compute_loss({"image": img, "target": y.half()}, g)
    # the same as a loss over the labelled half alone: changing the unlabelled targets changes nothing
    y2 = y.clone()
    y2[:, :32] = 1.0
    w = torch.ones_like(y2)
    w[:, :32] = 0
    from models import soft_bce_with_logits

    with torch.no_grad():
        logits = model(img.permute(0, 3, 1, 2).float() / 255)
        logits = torch.nn.functional.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False)
        want = soft_bce_with_logits(logits, y2, w)
    assert float(loss_nan) == pytest.approx(float(want), rel=1e-4)


def test_round_choice_rules():
    values = {0: {"stage2_loss": 0.1, "val_loss": 0.9, "val_auc": 0.6},
              1: {"stage2_loss": 0.3, "val_loss": 0.4, "val_auc": 0.8},
              2: {"stage2_loss": 0.2, "val_loss": 0.5, "val_auc": 0.8}}
    assert choose_round(values, "stage2_loss") == (0, "stage2_loss")
    assert choose_round(values, "stage2_loss", allowed=[1, 2]) == (2, "stage2_loss")  # round 0 excluded
    assert choose_round(values, "val_loss") == (1, "val_loss")
    assert choose_round(values, "val_auc", allowed=[1, 2]) == (1, "val_auc")  # tie on AUC -> lower val loss
    nov = {k: {**v, "val_auc": None, "val_loss": None} for k, v in values.items()}
    k, why = choose_round(nov, "val_auc", allowed=[1, 2])
    assert k == 2 and why.startswith("stage2_loss")


def test_the_tiny_run_records_its_round_choice_fit_and_scores(em_run):
    meta = json.loads((em_run / "run.json").read_text())
    assert meta["best_round"] == json.loads((em_run / "best").read_text())["round"]
    sel = meta["selection"]
    assert sel["select_by"] == "stage2_loss" and sel["eligible"] == [1]  # mixed: round 0 cannot win
    assert meta["best_round"] == 1 and set(meta["round_values"]) == {"0", "1"}
    for k in (0, 1):
        m = json.loads((em_run / f"round_{k}" / "metrics.json").read_text())
        assert 0 <= m["stage2"]["train_auc"] <= 1 and isinstance(m["warnings"], list)
        assert set(m["val"]["score_aucs"]) == {"theta2", "theta1_max", "theta1_topk_mean"}
        assert m["val"]["loss"] >= 0 and m["val"]["slide_score"] == "theta2"
        assert m["seg"]["e_step"] is None or "hard_negative_pools" in m["seg"]["e_step"]


def test_theta2_does_not_depend_on_the_round_number(em_run, em_cohort, tmp_path):
    """Same theta1 maps in rounds 0 and 1 -> the same theta2, bit for bit: rounds differ only by theta1."""
    import shutil

    from pipeline.em import EMHooks, RoundContext
    from pipeline.labels import load_cohort
    from pipeline.run import RunDir, load_checkpoint
    from pipeline.stage2 import train_theta2

    cfg = load_config("tiny", {"stage2.epochs": 1, "stage2.slides_per_epoch": 4})
    cohort = load_cohort(em_cohort.stores, em_cohort.labels)
    run = RunDir(tmp_path / "r")
    for k in (0, 1):
        run.state_dir(k).mkdir(parents=True)
        shutil.copytree(em_run / "round_0" / "probmaps.zarr", run.probmaps(k))
    ctx = RoundContext(cfg, cohort, run, {}, torch.device("cpu"), False, EMHooks(), train=cohort.train, val=[])
    for k in (0, 1):
        train_theta2(ctx, k)
    a, b = (load_checkpoint(run.checkpoint(k, "cls"))["model"] for k in (0, 1))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_fit_warning_is_raised_below_the_bar():
    from pipeline.stage2 import _fit_warnings

    assert _fit_warnings(0.95, 0.8, 2) == []
    (w,) = _fit_warnings(0.55, 0.8, 2)
    assert "did not fit" in w and "0.550" in w


def test_patients_never_span_splits_and_val_is_carved_by_patient(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("slide_id,label,split,patient_id\na,1,train,P1\nb,1,val,P1\nc,0,train,P2\n")
    with pytest.raises(LabelError, match="patient P1: a in train, b in val"):
        read_labels_table(p)
    rows = [(f"s{i}", i % 2, f"P{i // 2}") for i in range(40)]  # two slides per patient, labels alternate
    train = [SlideEntry(sid, lab, "train", Path("x"), 1, pid) for sid, lab, pid in rows]
    tr, va = carve_val_split(train, 0.25, seed=3)
    assert {s.patient for s in tr}.isdisjoint({s.patient for s in va})
    assert len(tr) + len(va) == 40 and all(s.split == "val" for s in va)
    assert {0, 1} <= {s.label for s in va} and {0, 1} <= {s.label for s in tr}
    assert carve_val_split(train, 0.25, seed=3) == (tr, va)  # seeded


def test_evaluate_scores_the_test_split_by_default_and_warns_without_one(tmp_path):
    from pipeline.evaluate import run_evaluate

    pred = tmp_path / "predictions.csv"
    pred.write_text("slide_id,probability,decision,threshold,threshold_source\n"
                    "a,0.9,positive,0.5,x\nb,0.1,negative,0.5,x\nc,0.8,positive,0.5,x\nd,0.2,negative,0.5,x\n")
    lab = tmp_path / "labels.csv"
    lab.write_text("slide_id,label,split\na,1,train\nb,0,train\nc,1,test\nd,0,test\n")
    res = run_evaluate(pred, lab, out_dir=tmp_path / "e1")
    assert res["split"] == "test" and res["n_slides"] == 2 and not res["warnings"]
    lab.write_text("slide_id,label,split\na,1,train\nb,0,train\nc,1,val\nd,0,val\n")
    res = run_evaluate(pred, lab, out_dir=tmp_path / "e2")
    assert res["split"] == "all" and res["n_slides"] == 4 and "optimistic" in res["warnings"][0]


def test_a_changed_store_is_refused_on_resume(em_run, em_cohort, tmp_path):
    """A store re-tiled (here: its creation stamp changed, as a re-tile does) after the run read it."""
    import shutil

    import zarr

    from pipeline.batch import UsageError
    from pipeline.labels import load_cohort
    from pipeline.run import RunDir, run_identity

    stores = tmp_path / "stores"
    shutil.copytree(em_cohort.stores, stores)
    cfg = load_config("tiny")
    run = RunDir(em_run)
    meta = run.read_meta()
    same = load_cohort(stores, em_cohort.labels)
    sid = same.train[3].slide_id
    assert run_identity(cfg, same, {}, same.train, same.val)["store_content"] == meta["store_content"]
    g = zarr.open_group(str(stores / f"{sid}.zarr"), mode="r+")
    g.attrs.update({"created_utc": "2030-01-01T00:00:00Z"})
    moved = load_cohort(stores, em_cohort.labels)
    ident = run_identity(cfg, moved, {}, moved.train, moved.val)
    with pytest.raises(UsageError, match=f"{sid}.zarr: the tile store changed since .* was trained on it.*"
                                         "pass --allow-restore to train its rounds again"):
        run.check_compatible(meta, ident)
    assert run.check_compatible(meta, {**ident, "annotations": meta["annotations"]}, allow_restore=True) == [sid]


@pytest.mark.slow  # trains round 0 again (about 45 s on 2 busy cores)
def test_allow_restore_retrains_the_rounds_on_a_retiled_store(em_run, em_cohort, tmp_path, em_threads):
    """A store re-tiled under a finished run: refused in one line naming --allow-restore; with the flag the
    rounds are moved aside and trained again, and run.json pins the store's new content."""
    import shutil

    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.tile import run_tile

    stores, run = tmp_path / "stores", tmp_path / "run"
    shutil.copytree(em_cohort.stores, stores)
    shutil.copytree(em_run, run)
    before = json.loads((run / "run.json").read_text())
    sid = before["splits"]["train"][3]
    shutil.rmtree(stores / f"{sid}.zarr")  # re-tile it: same slide and settings, a new store
    assert run_tile([em_cohort.cohort / f"{sid}.tif"], stores, load_config("tiny"), workers=0, quiet=True,
                    progress=False).ok
    args = ["em-round", "--stores", stores, "--labels", em_cohort.labels, "--run", run, "--config", "tiny",
            "--rounds", "1", "--quiet", *[x for a in em_cohort.annotations for x in ("--annotations", a)]]

    def cli(*extra):
        return CliRunner().invoke(main, [str(a) for a in [*args, *extra]], catch_exceptions=False)

    res = cli()
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert f"{sid}.zarr: the tile store changed since" in res.output and "--allow-restore" in res.output
    done0 = json.loads((run / "round_0" / "DONE").read_text())["finished_utc"]

    res = cli("--allow-restore")
    assert res.exit_code == 0, res.output
    warned = [ln for ln in res.output.splitlines() if "--allow-restore" in ln]
    assert len(warned) == 1 and sid in warned[0] and "1 tile store(s)" in warned[0], res.output
    after = json.loads((run / "run.json").read_text())
    assert after["store_content"][sid] != before["store_content"][sid]
    assert {k: v for k, v in after["store_content"].items() if k != sid} == \
        {k: v for k, v in before["store_content"].items() if k != sid}
    assert after["rounds_completed"] == [0] and after["best_round"] == 0
    assert json.loads((run / "round_0" / "DONE").read_text())["finished_utc"] > done0  # trained again
    assert not (run / "round_1").exists() and not list(run.glob(".trash-*"))  # old rounds deleted once done
    res = cli()  # the run now goes on with the stores as they are, without the flag
    assert res.exit_code == 0 and "ran round(s) none" in res.output, res.output


def test_force_moves_rounds_aside_and_a_round_needs_all_its_files(em_run, tmp_path):
    import shutil

    from pipeline.run import RunDir

    shutil.copytree(em_run, tmp_path / "r")
    run = RunDir(tmp_path / "r")
    assert run.is_done(0) and run.is_done(1)
    (run.round_dir(1) / "seg.pt").unlink()
    assert not run.is_done(1)  # DONE without its checkpoint is not complete
    meta = run.clear_rounds(run.read_meta())
    assert meta["rounds_completed"] == [] and not run.is_done(0) and not (run.path / "best").exists()
    trash = list(run.path.glob(".trash-*"))
    assert len(trash) == 1 and sorted(p.name for p in trash[0].iterdir()) == ["round_0", "round_1"]
    run.empty_trash()
    assert not list(run.path.glob(".trash-*"))


def test_tile_waits_for_a_reader_of_the_stores_folder(tmp_path, synth_slides):
    """A run reading STORES (shared lock) makes a cron 'tile' into STORES wait before it swaps a store in."""
    import subprocess
    import sys

    from wsi.store import stores_lock

    stores = tmp_path / "stores"
    stores.mkdir()
    cmd = [sys.executable, "-m", "pipeline.cli", "tile", str(synth_slides["tissue"]), "--out", str(stores),
           "--config", "tiny", "--workers", "0"]
    with stores_lock(stores, exclusive=False) as held:
        assert held
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        waited = []
        for line in proc.stderr:
            if "waiting for the lock on" in line:
                waited.append(line)
                break
        assert waited, "tile did not wait for the reader"
        assert not (stores / "tissue.zarr").exists()  # nothing swapped in while the reader holds the folder
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert [p.name for p in stores.glob("*.zarr")] == ["tissue.zarr"]
