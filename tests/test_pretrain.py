"""DINO pre-training: EMA teacher, loss, multi-crop, weights that load, resume, the command."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import load_config

torch = pytest.importorskip("torch")

import models  # noqa: E402
from models.dino import DINO, MultiCrop, backbone_part, ema_update  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from wsi.synth import make_patch_set

    out = tmp_path_factory.mktemp("pre") / "set"
    make_patch_set(out, n_classes=3, per_class=(12, 0, 0), size_px=64)
    return out / "train"


class _Killed(Exception):
    """A crash after a checkpoint, as a power cut would leave it."""


def _kill_after_epoch_1(epoch):
    if epoch == 1:
        raise _Killed


def _dino(arch="scorenet_tiny", part="auto", crops=4):
    models.seed_everything(0)
    model = models.create_model(arch, num_classes=1)
    return DINO(backbone_part(model, part), 32, 32, 16, 3, True, crops, 0.1, 0.9)


def test_ema_update_by_hand():
    d = _dino()
    with torch.no_grad():
        for p in d.student.parameters():
            p.add_(torch.randn_like(p))
    before_t = [p.detach().double().clone() for p in d.teacher.parameters()]
    s = [p.detach().double().clone() for p in d.student.parameters()]
    ema_update(d.teacher, d.student, 0.9)
    for t0, s0, t1 in zip(before_t, s, d.teacher.parameters()):
        torch.testing.assert_close(t1.double(), 0.9 * t0 + 0.1 * s0, rtol=0, atol=1e-6)


def test_one_training_step_moves_teacher_by_ema_and_teacher_differs(two_torch_threads):
    from pipeline.pretrain import _optimizer, _schedules, _step

    cfg = load_config(TINY, {"pretrain.momentum_teacher": 0.9})
    p = cfg.pretrain
    d = _dino(crops=2 + p.local_crops)
    mc = MultiCrop(p.global_crop_px, p.local_crop_px, p.local_crops)
    opt, sched = _optimizer(d, p), _schedules(p, 1)
    x = torch.rand(4, 3, 64, 64)
    t0 = [q.detach().clone() for q in d.teacher.parameters()]
    _step(d, mc, opt, sched, 0, 0, x, torch.Generator().manual_seed(0), p)
    m = sched["momentum"][0]
    assert m == pytest.approx(0.9)
    for a, q, s in zip(t0, d.teacher.parameters(), d.student.parameters()):
        torch.testing.assert_close(q, m * a + (1 - m) * s.detach(), rtol=0, atol=1e-6)
    moved = [not torch.equal(q, s) for q, s in zip(d.teacher.parameters(), d.student.parameters()) if s.requires_grad]
    assert any(moved)


def test_student_learns_to_match_the_teacher(two_torch_threads):
    """On fixed crops the optimiser lowers the DINO loss (centre frozen to isolate the student)."""
    d = _dino(crops=4)
    mc = MultiCrop(32, 16, 2)
    crops = mc(torch.rand(8, 3, 64, 64), torch.Generator().manual_seed(1))
    d.criterion.center_momentum = 1.0
    opt = torch.optim.AdamW(d.student.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = d.loss(crops, 0.04)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_multicrop_shapes_and_seeded():
    mc = MultiCrop(32, 16, 3)
    x = torch.rand(2, 3, 40, 40)
    a = mc(x, torch.Generator().manual_seed(3))
    b = mc(x, torch.Generator().manual_seed(3))
    assert [tuple(c.shape) for c in a] == [(2, 3, 32, 32)] * 2 + [(2, 3, 16, 16)] * 3
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert all(0 <= float(c.min()) and float(c.max()) <= 1 for c in a)


def test_pretrain_writes_weights_that_load_and_resume_is_exact(images, tmp_path, two_torch_threads):
    from pipeline.pretrain import run_pretrain

    cfg = load_config(TINY, {"pretrain.epochs": 2})

    with pytest.raises(_Killed):
        run_pretrain(tmp_path / "a" / "w.pt", cfg, images=images, progress=False, on_checkpoint=_kill_after_epoch_1)
    assert (tmp_path / "a" / ".w.pt.state.pt").is_file() and not (tmp_path / "a" / "w.pt").exists()
    ra = run_pretrain(tmp_path / "a" / "w.pt", cfg, images=images, progress=False)
    rb = run_pretrain(tmp_path / "b" / "w.pt", cfg, images=images, progress=False)
    assert [h["loss"] for h in ra["history"]] == [h["loss"] for h in rb["history"]]
    wa = torch.load(tmp_path / "a" / "w.pt", weights_only=False)["model"]
    wb = torch.load(tmp_path / "b" / "w.pt", weights_only=False)["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the scorer's weights, all of them, load into a 4-class scorenet_tiny
    target = models.create_model("scorenet_tiny", num_classes=4)
    scorer_keys = {k for k in target.state_dict() if k.startswith("scorer.")}
    assert set(wa) == scorer_keys
    from pipeline.run import load_weights

    load_weights(target, tmp_path / "a" / "w.pt", "test")
    assert all(torch.equal(target.state_dict()[k], wa[k]) for k in wa)
    # the same command again does nothing
    again = run_pretrain(tmp_path / "a" / "w.pt", cfg, images=images, progress=False)
    assert again["skipped"]


def test_dla_backbone_weights_load_without_the_classifier(images, tmp_path, two_torch_threads):
    from pipeline.pretrain import run_pretrain

    cfg = load_config(TINY, {"pretrain.arch": "dla34_cls_tiny", "pretrain.epochs": 1, "pretrain.global_crop_px": 64,
                             "pretrain.local_crop_px": 32, "pretrain.local_crops": 1, "pretrain.batch_size": 12})
    run_pretrain(tmp_path / "dla.pt", cfg, images=images, progress=False)
    target = models.create_model("dla34_cls_tiny", num_classes=5)
    rep = models.load_state_dict_flexible(target, torch.load(tmp_path / "dla.pt", weights_only=False))
    assert not rep.unexpected_keys and not rep.mismatched_keys
    assert set(rep.missing_keys) == {k for k in target.state_dict() if k.startswith("backbone.fc.")}


def test_pretrain_cli_errors_are_one_line(images, tmp_path):
    r = CliRunner().invoke(main, ["pretrain", "--out", str(tmp_path / "w.pt"), "--config", TINY])
    assert r.exit_code == 2 and "exactly one of --stores" in r.output
    r = CliRunner().invoke(main, ["pretrain", "--images", str(images), "--out", str(tmp_path / "w.pt"),
                                  "--config", TINY, "--set", "pretrain.local_crop_px=12"])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "local_crop_px=12" in lines[0]


# --------------------------------------------------------------------------- was anything learned?


def test_teacher_entropy_tells_uniform_from_one_prototype_collapse():
    from models.dino import teacher_entropy

    flat = teacher_entropy(torch.full((8, 16), 1 / 16))
    assert flat == pytest.approx({"sample": 1.0, "batch": 1.0})
    one = torch.zeros(8, 16)
    one[:, 3] = 1.0
    assert teacher_entropy(one) == pytest.approx({"sample": 0.0, "batch": 0.0}, abs=1e-6)
    # healthy: every image one-hot, images spread over the prototypes
    spread = torch.eye(16)
    assert teacher_entropy(spread) == pytest.approx({"sample": 0.0, "batch": 1.0}, abs=1e-6)


def test_dino_loss_records_the_entropy_of_the_targets_it_used():
    from models.dino import DINOLoss

    crit = DINOLoss(16, 2)
    t = torch.randn(6, 16)
    crit(torch.randn(6, 16), t, 0.04)
    q = torch.softmax(t / 0.04, dim=-1)
    ent = float(-(q * q.clamp_min(1e-12).log()).sum(-1).mean()) / torch.log(torch.tensor(16.0)).item()
    assert crit.stats["sample"] == pytest.approx(ent, rel=1e-5)


def test_knn_classify_weighted_votes():
    from models.dino import knn_classify

    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    q = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert knn_classify(bank, labels, q, 2, k=3).tolist() == [0, 1]
    # k = all: class 1 has three voters, but class 0's two are far closer and the weights say so
    assert knn_classify(bank, labels, q[:1], 2, k=5, temperature=0.07).tolist() == [0]
    # a flat vote (huge temperature) is a plain majority
    assert knn_classify(bank, labels, q[:1], 2, k=5, temperature=1e6).tolist() == [1]


def test_collapse_verdict():
    from pipeline.pretrain import collapse_verdict

    assert collapse_verdict([{"teacher_entropy": 0.99, "batch_entropy": 1.0}], 0.95) == "uniform"
    assert collapse_verdict([{"teacher_entropy": 0.01, "batch_entropy": 0.01}], 0.95) == "one-prototype"
    assert collapse_verdict([{"teacher_entropy": 0.4, "batch_entropy": 0.9}], 0.95) is None
    assert collapse_verdict([], 0.95) is None


def test_probe_and_collapse_warning_in_record_and_cli(tmp_path, two_torch_threads):
    """The record keeps the per-epoch entropies and the k-NN probe before and after; a run whose
    targets end flatter than pretrain.collapse_entropy (here set low enough that 3 epochs surely
    pass it) is flagged in the record and by the CLI, and its weights are still written."""
    from wsi.synth import make_patch_set

    make_patch_set(tmp_path / "set", n_classes=2, per_class=(8, 4, 1), size_px=64)
    out = tmp_path / "w.pt"
    r = CliRunner().invoke(main, ["pretrain", "--images", str(tmp_path / "set" / "train"), "--out", str(out),
                                  "--config", TINY, "--probe", str(tmp_path / "set"), "--quiet",
                                  "--set", "pretrain.epochs=3", "--set", "runtime.torch_threads=2",
                                  "--set", "pretrain.collapse_entropy=0.05"])
    assert r.exit_code == 0, r.output
    rec = torch.load(out, weights_only=False)["pretrain"]
    assert [set(h) >= {"teacher_entropy", "batch_entropy"} for h in rec["history"]] == [True] * 3
    assert all(0.0 <= h["teacher_entropy"] <= 1.0 for h in rec["history"])
    pr = rec["probe"]
    assert pr["k"] == 20 and pr["final"]["images"] == {"train": 16, "val": 8}
    assert 0.0 <= pr["init"]["accuracy"] <= 1.0 and 0.0 <= pr["final"]["accuracy"] <= 1.0
    assert "k-NN probe, 8 val images" in r.output
    assert rec["collapse"] == "uniform" and rec["history"][-1]["teacher_entropy"] >= 0.05
    assert rec["warnings"] and rec["warnings"][0].startswith("the teacher's targets collapsed to uniform")
    assert "WARNING: the teacher's targets collapsed to uniform" in r.output
    # evaluation settings judge the run, they are not part of its identity: same output, skipped
    r = CliRunner().invoke(main, ["pretrain", "--images", str(tmp_path / "set" / "train"), "--out", str(out),
                                  "--config", TINY, "--quiet", "--set", "pretrain.epochs=3",
                                  "--set", "pretrain.knn_k=5"])
    assert r.exit_code == 0 and "already pre-trained" in r.output


def test_probe_of_another_size_is_refused_in_one_line(images, tmp_path):
    from wsi.synth import make_patch_set

    make_patch_set(tmp_path / "big", n_classes=2, per_class=(2, 2, 1), size_px=96)
    r = CliRunner().invoke(main, ["pretrain", "--images", str(images), "--out", str(tmp_path / "w.pt"),
                                  "--config", TINY, "--probe", str(tmp_path / "big")])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "96x96" in lines[0] and "--probe" in lines[0]


def test_probe_before_is_the_untrained_network_even_after_a_resume(tmp_path, two_torch_threads):
    """Killed after epoch 1 and resumed: the probe's 'init' is the seeded untrained network's, the same
    as in an uninterrupted run, never the half-trained weights the resume starts from."""
    from pipeline.pretrain import run_pretrain
    from wsi.synth import make_patch_set

    make_patch_set(tmp_path / "set", n_classes=2, per_class=(8, 4, 1), size_px=64)
    cfg = load_config(TINY, {"pretrain.epochs": 2, "pretrain.knn_k": 3})
    kw = dict(images=tmp_path / "set" / "train", probe=tmp_path / "set", progress=False)

    with pytest.raises(_Killed):
        run_pretrain(tmp_path / "a" / "w.pt", cfg, on_checkpoint=_kill_after_epoch_1, **kw)
    ra = run_pretrain(tmp_path / "a" / "w.pt", cfg, **kw)
    rb = run_pretrain(tmp_path / "b" / "w.pt", cfg, **kw)
    # the margin is a float of the features themselves: equal only if the very same network was probed
    assert ra["probe"]["init"] == rb["probe"]["init"] and ra["probe"]["final"] == rb["probe"]["final"]
    assert ra["probe"]["init"]["margin"] != ra["probe"]["final"]["margin"]
    assert ra["probe"]["k"] == 3


def test_class_margin_by_hand():
    from models.dino import class_margin

    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # query 0 (class 0): own 1, other 0 -> +1; query 1 (class 1): own 0, other 1 -> -1
    assert class_margin(bank, labels, q, torch.tensor([0, 1])) == pytest.approx(0.0)
    assert class_margin(bank, labels, q, torch.tensor([0, 0])) == pytest.approx(1.0)
