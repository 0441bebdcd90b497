"""Trainer extension points: optimiser choice, the on_epoch_end hook and its state across a resume (CPU)."""

from __future__ import annotations

import io

import pytest

torch = pytest.importorskip("torch")

from pipeline import config  # noqa: E402
from pipeline.trainers import OPTIMIZERS, ColorJitter, SoftBCESegTrainer, create_trainer  # noqa: E402

CPU = torch.device("cpu")


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 1))


def _batches(epoch: int) -> list[dict]:
    g = torch.Generator().manual_seed(100 + epoch)
    out = []
    for _ in range(2):
        img = (torch.rand(3, 16, 16, 3, generator=g) * 255).to(torch.uint8)
        out.append({"image": img, "target": (img[..., 0].float() > 127).float()})
    return out


class _CurriculumTrainer(SoftBCESegTrainer):
    """A loss-driven schedule in on_epoch_end that also draws from its own generator (like a mixer)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.level, self.best = 1.0, float("inf")
        self.rng = torch.Generator().manual_seed(123)

    def compute_loss(self, batch, generator):
        loss, n = super().compute_loss(batch, generator)
        return loss * self.level, n

    def on_epoch_end(self, record):
        super().on_epoch_end(record)
        harder = record["loss"] < self.best
        self.best = min(self.best, record["loss"])
        self.level = self.level * (0.7 if harder else 1.2) + 0.1 * float(torch.rand(1, generator=self.rng))
        record["level"] = self.level

    def get_extra_state(self):
        return {**super().get_extra_state(), "level": self.level, "best": self.best, "rng": self.rng.get_state()}

    def set_extra_state(self, state):
        super().set_extra_state(state)
        self.level, self.best = state["level"], state["best"]
        self.rng.set_state(state["rng"])


def _trainer(seed: int = 0, epochs: int = 4, cls=_CurriculumTrainer, **kw):
    return cls(_net(seed), device=CPU, epochs=epochs, lr=0.01, jitter=ColorJitter(0.2, 0.2, 0.2, 0.02),
               seed=3, progress=False, **kw)


def _strip(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


class _Stop(Exception):
    pass


def test_on_epoch_end_runs_before_the_checkpoint_and_fills_the_record():
    seen = []

    def checkpoint(tr):
        seen.append(dict(tr.history[-1]))

    hist = _trainer().fit(_batches, checkpoint=checkpoint)
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert all("level" in h for h in seen) and [h["level"] for h in seen] == [h["level"] for h in hist]
    assert len({round(h["level"], 6) for h in hist}) == 4


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_resume_with_hook_state_equals_the_uninterrupted_run(optimizer):
    full = _trainer(optimizer=optimizer)
    full.fit(_batches)

    saved = {}

    def crash_after_first(tr):
        buf = io.BytesIO()
        torch.save(tr.state_dict(), buf)
        saved["state"] = buf.getvalue()
        raise _Stop

    with pytest.raises(_Stop):
        _trainer(optimizer=optimizer).fit(_batches, checkpoint=crash_after_first)
    state = torch.load(io.BytesIO(saved["state"]), weights_only=False)
    assert state["epoch"] == 1 and set(state["extra"]) == {"level", "best", "rng"}

    resumed = _trainer(seed=99, optimizer=optimizer)  # other initial weights: the state must replace them
    resumed.load_state_dict(state)
    resumed.fit(_batches)
    assert _strip(resumed.history) == _strip(full.history)
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k

    # without the hook's state the resumed run differs: the test above can fail
    forgetful = _trainer(seed=99, optimizer=optimizer)
    forgetful.load_state_dict({**state, "extra": {"level": 1.0, "best": float("inf"),
                                                   "rng": torch.Generator().manual_seed(123).get_state()}})
    forgetful.fit(_batches)
    assert _strip(forgetful.history) != _strip(full.history)


def test_optimizer_choice():
    assert set(OPTIMIZERS) == set(config.OPTIMIZERS)
    net = _net()
    kinds = {name: type(create_trainer("soft_bce", net, device=CPU, optimizer=name).optimizer) for name in OPTIMIZERS}
    assert kinds == {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    sgd = create_trainer("soft_bce", net, device=CPU, optimizer="sgd", lr=0.05, weight_decay=1e-4)
    group = sgd.optimizer.param_groups[0]
    assert (group["momentum"], group["lr"], group["weight_decay"]) == (0.9, 0.05, 1e-4)
    adamw = create_trainer("soft_bce", net, device=CPU, optimizer="adamw", weight_decay=0.0)
    assert adamw.optimizer.param_groups[0]["weight_decay"] == 0.0  # ours, not torch's 0.01 default
    assert create_trainer("soft_bce", net, device=CPU).optimizer_name == "adam"  # the paper's
    with pytest.raises(ValueError, match="optimizer must be one of"):
        create_trainer("soft_bce", net, device=CPU, optimizer="lion")
    # the optimisers really differ, and a state of one is refused by another
    results = {}
    for name in OPTIMIZERS:
        t = _trainer(cls=SoftBCESegTrainer, epochs=1, optimizer=name)
        t.fit(_batches)
        results[name] = torch.cat([p.detach().flatten() for p in t.model.parameters()])
    assert not torch.equal(results["adam"], results["sgd"])
    with pytest.raises(ValueError, match="saved state is of a 'sgd' optimiser.*'adam'"):
        _trainer(cls=SoftBCESegTrainer).load_state_dict(_trainer(cls=SoftBCESegTrainer, optimizer="sgd").state_dict())


def _mil_tiles(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey noise tiles; the positive half holds one small red spot (a few % of the tile), like a
    lesion in a top-K tile of a positive slide. Targets: the slide label on every pixel (image mode)."""
    g = torch.Generator().manual_seed(seed)
    img = (100 + 40 * torch.rand(n, 16, 16, 1, generator=g)).expand(n, 16, 16, 3).clone()
    label = (torch.arange(n) % 2).float()
    for i in range(0, n, 2):
        r, c = (int(v) for v in torch.randint(1, 13, (2,), generator=g))
        img[i + 1, r : r + 3, c : c + 3] = torch.tensor([220.0, 40.0, 40.0])
    return img.to(torch.uint8), label[:, None, None].expand(n, 16, 16).clone()


def _lse(z: torch.Tensor, r: float) -> torch.Tensor:
    return (torch.logsumexp(r * z, dim=1) - torch.log(torch.tensor(float(z.shape[1])))) / r


def test_tile_lse_bce_loss_is_one_bce_per_tile_through_a_smooth_maximum():
    img, target = _mil_tiles(4, seed=1)
    tr = create_trainer("tile_lse_bce", _net(2), device=CPU, jitter=None, progress=False, lse_r=5.0)
    assert tr.target_kind == "dense"
    loss, n = tr.compute_loss({"image": img, "target": target}, torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = tr.model(img.permute(0, 3, 1, 2).float() / 255).flatten(1)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(_lse(z, 5.0), target[:, 0, 0])
    assert n == 4 and torch.allclose(loss, expected, atol=1e-6)
    # the pool lies between the mean and the maximum, and tends to the maximum as r grows
    assert bool((_lse(z, 5.0) <= z.amax(1) + 1e-6).all() and (_lse(z, 5.0) >= z.mean(1) - 1e-6).all())
    assert torch.allclose(_lse(z, 1e4), z.amax(1), atol=1e-3)
    # under torchrun the (sum, count) of a slice gives the same mean
    s, c = tr.loss_terms({"image": img, "target": target, "pos": torch.arange(4), "total": torch.full((4,), 4)},
                         torch.Generator())
    assert torch.allclose(s / c, expected, atol=1e-6)
    with pytest.raises(ValueError, match="lse_r must be > 0"):
        create_trainer("tile_lse_bce", _net(2), device=CPU, lse_r=0.0)


def _mil_fit(name: str, **kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train on small-spot MIL tiles; on held-out tiles: the positive tiles' maxima, the negative
    tiles' maxima and the median pixel of the negative tiles."""
    tr = create_trainer(name, _net(0), device=CPU, jitter=None, progress=False, lr=0.01, epochs=60, **kw)
    tr.fit(lambda epoch: [dict(zip(("image", "target"), _mil_tiles(16, seed=100 * epoch + b))) for b in range(2)])
    img, target = _mil_tiles(64, seed=999)
    with torch.no_grad():
        p = torch.sigmoid(tr.model(img.permute(0, 3, 1, 2).float() / 255)).flatten(1)
    lab = target[:, 0, 0].bool()
    return p.amax(1)[lab], p.amax(1)[~lab], p[~lab].median()


def test_tile_lse_bce_learns_small_lesions_where_the_pixel_label_and_the_hard_maximum_do_not():
    """Why image mode trains through a smooth tile maximum (em.mil_loss: tile): from random init, on
    tiles whose lesion is a 3x3 spot (4 % of the tile), it ranks every lesion tile above every normal one
    with a margin; the slide label on every pixel leaves normal tiles' maxima and their background near
    0.5 (normal tissue pulled towards 'lesion'); the hard maximum learns nothing."""
    pos, neg, _ = _mil_fit("tile_lse_bce", lse_r=5.0)
    assert float(pos.min()) > 0.9 and float(neg.max()) < 0.4
    pos_px, neg_px, background = _mil_fit("soft_bce")
    assert float(background) > 0.4 and float(neg_px.max()) > 0.45
    pos_hard, neg_hard, _ = _mil_fit("tile_lse_bce", lse_r=1e4)  # ~ the hard maximum
    assert float(pos_hard.min()) < float(neg_hard.max())  # no separation


def test_image_mode_trains_theta1_with_the_tile_label_unless_told_otherwise():
    from types import SimpleNamespace

    from pipeline.config import ConfigError, load_config
    from pipeline.mstep import seg_trainer
    from pipeline.trainers import TileLSEBCETrainer

    def trainer(**over):
        ctx = SimpleNamespace(cfg=load_config("tiny", over), device=CPU, amp=False, progress=False, dist=None)
        return seg_trainer(ctx, _net(), 0, 1)

    tr = trainer(**{"em.mode": "image", "em.mil_lse_r": 3.0})
    assert isinstance(tr, TileLSEBCETrainer) and tr.lse_r == 3.0
    assert type(trainer(**{"em.mode": "image", "em.mil_loss": "pixel"})) is SoftBCESegTrainer
    assert type(trainer(**{"em.mode": "mixed"})) is SoftBCESegTrainer  # annotations and pseudo labels: pixel targets
    with pytest.raises(ConfigError, match=r"em.mil_loss must be one of \['tile', 'pixel'\].*'tile'"):
        load_config("tiny", {"em.mil_loss": "tiles"})
    with pytest.raises(ConfigError, match="em.mil_lse_r must be > 0"):
        load_config("tiny", {"em.mil_lse_r": 0})
