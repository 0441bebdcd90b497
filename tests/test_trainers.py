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
