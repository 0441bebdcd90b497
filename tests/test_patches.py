"""train-patches: synth --patches -> training -> report, resume, idempotence, --predict, bad layouts."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import load_config

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")  # this checkout's preset (not an installed copy)


@pytest.fixture(scope="module")
def patch_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("patches") / "set"
    r = CliRunner().invoke(main, ["synth", str(out), "--patches", "--classes", "4", "--per-class", "24", "8", "8"])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def trained(patch_set, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    r = CliRunner().invoke(main, ["train-patches", "--data", str(patch_set), "--run", str(run), "--config", TINY,
                                  "--predict", str(patch_set / "test"), "--quiet"])
    assert r.exit_code == 0, r.output
    return run


def test_synth_patch_set_is_seeded_and_laid_out(patch_set, tmp_path):
    info = json.loads((patch_set / "patch_set.json").read_text())
    assert info["classes"] == ["normal", "stroma", "tumour", "lymphocytes"]
    for split, n in (("train", 24), ("val", 8), ("test", 8)):
        for c in info["classes"]:
            assert len(list((patch_set / split / c).glob("*.png"))) == n
    from wsi.synth import make_patch_set

    make_patch_set(tmp_path / "again", n_classes=4, per_class=(2, 0, 0))
    a = (patch_set / "train" / "tumour" / "tumour_0001.png").read_bytes()
    assert (tmp_path / "again" / "train" / "tumour" / "tumour_0001.png").read_bytes() == a


def test_report_files_and_accuracy_beats_chance(trained):
    for split in ("val", "test"):
        rep = json.loads((trained / "report" / f"{split}.json").read_text())
        assert rep["n"] == 32 and np.asarray(rep["confusion_matrix"]).sum() == 32
        assert rep["accuracy"] >= 0.5, rep  # chance is 0.25
        assert set(rep["per_class_recall"]) == {"lymphocytes", "normal", "stroma", "tumour"}
        assert 0 < rep["macro_f1"] <= 1
        png = (trained / "report" / f"{split}_confusion.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (trained / "DONE").is_file() and not (trained / "state").exists()
    metrics = json.loads((trained / "metrics.json").read_text())
    assert len(metrics["epochs"]) == load_config(TINY).patches.epochs


def test_predict_writes_probabilities(trained, patch_set):
    rows = list(csv.DictReader(open(trained / "predictions.csv")))
    assert len(rows) == 32
    probs = np.array([[float(r[f"prob_{c}"]) for c in ("lymphocytes", "normal", "stroma", "tumour")] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    truth = [r["path"].split("/")[0] for r in rows]
    assert np.mean([r["predicted"] == t for r, t in zip(rows, truth)]) >= 0.5


def test_rerun_is_idempotent_and_other_settings_refused(trained, patch_set):
    before = (trained / "model.pt").read_bytes()
    r = CliRunner().invoke(main, ["train-patches", "--data", str(patch_set), "--run", str(trained), "--config", TINY])
    assert r.exit_code == 0 and "nothing to train" in r.output
    assert (trained / "model.pt").read_bytes() == before
    r = CliRunner().invoke(main, ["train-patches", "--data", str(patch_set), "--run", str(trained), "--config", TINY,
                                  "--set", "patches.lr=0.01"])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "patches.lr" in lines[0] and "--force" in lines[0]


def test_resume_after_kill_equals_uninterrupted(patch_set, tmp_path):
    from pipeline.patches import run_train_patches

    cfg = load_config(TINY, {"patches.epochs": 3})

    class Killed(Exception):
        pass

    def kill_after_1(epoch):
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        run_train_patches(patch_set, tmp_path / "a", cfg, progress=False, on_checkpoint=kill_after_1)
    assert (tmp_path / "a" / "state" / "train.pt").is_file() and not (tmp_path / "a" / "DONE").exists()
    resumed = run_train_patches(patch_set, tmp_path / "a", cfg, progress=False)
    whole = run_train_patches(patch_set, tmp_path / "b", cfg, progress=False)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"]]
    sa = torch.load(tmp_path / "a" / "model.pt", weights_only=False)["model"]
    sb = torch.load(tmp_path / "b" / "model.pt", weights_only=False)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sb)


def test_soft_ce_takes_soft_labels():
    from pipeline.trainers import create_trainer

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    tr = create_trainer("soft_ce", model, device="cpu", progress=False)
    assert tr.target_kind == "label"
    img = torch.randint(0, 255, (2, 4, 4, 3), dtype=torch.uint8)
    y = torch.tensor([[0.3, 0.7, 0.0], [0.0, 0.0, 1.0]])
    loss, n = tr.compute_loss({"image": img, "target": y}, torch.Generator())
    logits = model(img.permute(0, 3, 1, 2).float() / 255)
    expect = -(y * torch.log_softmax(logits, -1)).sum(1).mean()
    assert n == 2 and torch.allclose(loss, expect)


@pytest.mark.parametrize("breakage, needle", [
    ("no_val", "no val/ folder"),
    ("stray", "put each in its class folder"),
    ("unknown_class", "not in train/"),
    ("mixed_size", "one size"),
])
def test_bad_layout_one_line_exit_2(patch_set, tmp_path, breakage, needle):
    data = tmp_path / "data"
    for split in ("train", "val"):
        for c in ("normal", "stroma", "tumour"):
            (data / split / c).mkdir(parents=True)
            for f in sorted((patch_set / split / c).glob("*.png"))[:2]:
                shutil.copy(f, data / split / c / f.name)
    if breakage == "no_val":
        shutil.rmtree(data / "val")
    elif breakage == "stray":
        shutil.copy(next((data / "train" / "normal").glob("*.png")), data / "train" / "loose.png")
    elif breakage == "unknown_class":
        shutil.copytree(data / "val" / "normal", data / "val" / "mystery")
    else:
        import cv2

        cv2.imwrite(str(data / "train" / "normal" / "big.png"), np.zeros((96, 96, 3), np.uint8))
    r = CliRunner().invoke(main, ["train-patches", "--data", str(data), "--run", str(tmp_path / "run"),
                                  "--config", TINY])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert needle in lines[0] and lines[0].startswith("error: ")


def test_batch_mixers_apply_to_patch_training(patch_set, tmp_path):
    """model.cls_mix reaches train-patches: CellMix reports its curriculum every epoch and changes training;
    at p: 0 it changes nothing, bit for bit."""
    from pipeline.patches import run_train_patches

    plain = run_train_patches(patch_set, tmp_path / "plain", load_config(TINY, {"patches.epochs": 2}), progress=False)
    mixed = run_train_patches(patch_set, tmp_path / "mixed", load_config(TINY, {
        "patches.epochs": 2, "model.cls_mix": "[{name: cellmix, p: 1.0}]"}), progress=False)
    off = run_train_patches(patch_set, tmp_path / "off", load_config(TINY, {
        "patches.epochs": 2, "model.cls_mix": "[{name: cellmix, p: 0.0}]"}), progress=False)
    assert all("cellmix" in str(h.get("mix")) for h in mixed["history"])
    assert [h["loss"] for h in mixed["history"]] != [h["loss"] for h in plain["history"]]
    assert [h["loss"] for h in off["history"]] == [h["loss"] for h in plain["history"]]
