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

    class Killed(Exception):
        pass

    def kill(epoch):
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        run_pretrain(tmp_path / "a" / "w.pt", cfg, images=images, progress=False, on_checkpoint=kill)
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
