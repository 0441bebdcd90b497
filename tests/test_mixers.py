"""Batch mixers (pipeline/mixers.py): CellMix and ScoreMix on encoded batches, the CellMix curriculum,
and both inside the EM loop (configs/tiny-mix.yaml)."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from pipeline.config import ConfigError, load_config  # noqa: E402
from pipeline.mixers import BagTargets, CellMix, ScoreMix, create_mixer, patch_sizes, to_tokens  # noqa: E402
from tests.em_fixtures import em_cohort, em_threads  # noqa: E402,F401

TINY_MIX = Path(__file__).resolve().parents[1] / "configs" / "tiny-mix.yaml"


def _encoded(b: int, edge: int, cell: int, seed: int = 0):
    """Images whose red channel is a random pixel target, green the image index and blue the cell index."""
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(b, edge, edge, generator=g) > 0.5).float()
    n = edge // cell
    img = torch.arange(b, dtype=torch.float32).view(b, 1, 1).expand(b, edge, edge) / 100
    pos = torch.arange(n * n, dtype=torch.float32).view(n, n).repeat_interleave(cell, 0).repeat_interleave(cell, 1) / 1000
    x = torch.stack([target, img, pos.expand(b, edge, edge)], dim=1).contiguous()
    return x, target


def _decode(x: torch.Tensor, cell: int):
    """Per cell (B, n*n): source image and source position (from the green and blue channels)."""
    g = torch.round(x[:, 1, ::cell, ::cell] * 100).long().flatten(1)
    p = torch.round(x[:, 2, ::cell, ::cell] * 1000).long().flatten(1)
    return g, p


def _at_epoch(mixer, epoch: int, epochs: int):
    """A mixer bound to a trainer of ``epochs`` epochs, resumed at ``epoch`` (hold, no shift)."""
    mixer.setup("dense", epochs)
    mixer.load_state_dict({**mixer.state_dict(), "epoch": epoch})
    return mixer


# --------------------------------------------------------------------------- CellMix


@pytest.mark.parametrize("strategy", ["group", "split"])
def test_cellmix_dense(strategy):
    # 64 px tiles, last of 4 epochs: patch 16 px (16 tokens), fix ratio 0.25 -> 4 fixed tokens
    m = _at_epoch(CellMix(p=1.0, strategy=strategy), 3, 4)
    assert m.current(64) == (16, 0.25)
    x, target = _encoded(6, 64, 16)
    xm, ym = m(x, target, kind="dense", model=None, generator=torch.Generator().manual_seed(1))
    # the red channel still encodes the target
    assert torch.equal(xm[:, 0], ym)
    src, pos = _decode(xm, 16)
    # every token keeps its position
    assert torch.equal(pos, torch.arange(16).expand(6, 16))
    # fixed positions: the same 4 in every image, unchanged there
    own = src == torch.arange(6)[:, None]
    fixed = own.all(dim=0)
    assert int(fixed.sum()) == 4
    assert torch.equal(to_tokens(xm, 16)[:, fixed], to_tokens(x, 16)[:, fixed])
    rel = ~fixed
    if strategy == "group":  # all relation tokens of an image come from one other image
        for i in range(6):
            assert len(set(src[i, rel].tolist())) == 1 and int(src[i, rel][0]) != i
    else:  # each relation position is a permutation of the batch
        for r in rel.nonzero().flatten().tolist():
            assert sorted(src[:, r].tolist()) == list(range(6))
        assert len({tuple(src[i, rel].tolist()) for i in range(6)}) > 1


@pytest.mark.parametrize("strategy", ["group", "split"])
def test_cellmix_soft_labels_match_the_pixel_mass(strategy):
    m = _at_epoch(CellMix(p=1.0, strategy=strategy), 2, 4)  # 64 px: patch 16, ratio ~0.47
    x, _ = _encoded(5, 64, 16, seed=2)
    y = torch.eye(5)  # image i is class i
    xm, ym = m(x, y, kind="label", model=None, generator=torch.Generator().manual_seed(3))
    src, _ = _decode(xm, 16)
    mass = torch.stack([(src == j).float().mean(dim=1) for j in range(5)], dim=1)
    torch.testing.assert_close(ym.sum(dim=1), torch.ones(5))
    torch.testing.assert_close(ym, mass)
    assert (ym.diagonal() < 1).all()


def test_cellmix_bag_keeps_slides_and_labels():
    b, k, edge = 3, 4, 64
    x, _ = _encoded(b * k, edge, 16, seed=4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    label = torch.tensor([1.0, 0.0, 0.0])
    slide_of = torch.arange(b * k) // k
    bag = BagTargets(label, mask)
    for cross in (False, True):
        m = _at_epoch(CellMix(p=1.0, cross_slide=cross), 3, 4)
        xb, yb = m(x.view(b, k, 3, edge, edge), bag, kind="bag", model=None,
                   generator=torch.Generator().manual_seed(5))
        assert torch.equal(yb.label, label) and torch.equal(yb.mask, mask)
        src, _ = _decode(xb.reshape(b * k, 3, edge, edge), 16)
        valid = mask.flatten()
        assert torch.equal(src[~valid], torch.arange(b * k)[~valid, None].expand(-1, 16))  # padding untouched
        assert valid[src[valid]].all()  # no padding pixels pasted into real tiles
        src_slide, own_slide = slide_of[src], slide_of[:, None].expand(-1, 16)
        src_label = label[src_slide]
        assert torch.equal(src_label, label[own_slide])  # no mixing across labels
        if not cross:  # every tile's patches come from the K tiles of its own slide, which keeps its content
            assert torch.equal(src_slide, own_slide)
            for s in range(b):
                t = slice(s * k, (s + 1) * k)
                assert sorted(map(tuple, torch.stack([src[t].flatten(), torch.arange(16).repeat(k)], 1).tolist())) == \
                    sorted(map(tuple, torch.stack([torch.arange(s * k, (s + 1) * k).repeat_interleave(16),
                                                   torch.arange(16).repeat(k)], 1).tolist()))
        else:  # the positive slide stays by itself; the negative slides exchange patches
            assert torch.equal(src_slide[:k], own_slide[:k])
            assert (src_slide[k:] != own_slide[k:]).any()
        assert (src != torch.arange(b * k)[:, None]).any()


LOSSES = [1.0, 1.2, 0.9, 0.95, 0.96, 0.5]
# (patch px, fix ratio, T) per epoch of 6 on 128 px tiles: patch sizes 64, 32, 16 (two epochs each),
# fix ratio 0.9 -> 0.25 linearly; T0 auto = 1.0 (first epoch), x0.933 when an epoch beats it.
EXPECTED = {
    "hold": [(64, 0.9, 1.0), (64, 0.77, 1.0), (32, 0.64, 0.933), (16, 0.459, 0.933), (16, 0.38, 0.933),
             (16, 0.25, 0.870489)],
    "back": [(64, 0.9, 1.0), (64, 0.77, 1.0), (64, 0.704, 0.933), (16, 0.459, 0.933), (32, 0.418, 0.933),
             (32, 0.275, 0.870489)],
}


def _scripted(drive: str, losses, mixer=None, start=0):
    m = mixer or CellMix(p=1.0, drive=drive).setup("dense", 6)
    x, t = _encoded(2, 128, 16)
    out = []
    for loss in losses[start:]:
        m(x, t, kind="dense", model=None, generator=torch.Generator().manual_seed(0))
        out.append(m.end_epoch(loss))
    return m, out


@pytest.mark.parametrize("drive", ["hold", "back"])
def test_cellmix_curriculum(drive):
    assert patch_sizes(512) == [256, 128, 64, 32, 16] and patch_sizes(128) == [64, 32, 16]
    _, recs = _scripted(drive, LOSSES)
    got = [(r["patch_px"], r["fix_ratio"], r["T"]) for r in recs]
    for (p, f, t), (ep, ef, et) in zip(got, EXPECTED[drive]):
        assert p == ep and f == pytest.approx(ef, abs=1e-6) and t == pytest.approx(et, abs=1e-6)
    assert [r["batches_mixed"] for r in recs] == [1] * 6
    ts = [r["T"] for r in recs]
    assert all(b == a or b == pytest.approx(a * 0.933) for a, b in zip(ts, ts[1:]))  # at most one change per epoch
    # resuming after epoch 1 repeats the uninterrupted curriculum
    m1, first = _scripted(drive, LOSSES[:1])
    fresh = CellMix(p=1.0, drive=drive).setup("dense", 6)
    fresh.load_state_dict(m1.state_dict())
    _, rest = _scripted(drive, LOSSES, mixer=fresh, start=1)
    assert first + rest == recs


def test_trainer_with_cellmix_resumes_bit_identically(em_threads):
    import models
    from pipeline.trainers import SoftBCESegTrainer

    def make():
        models.seed_everything(0)
        return SoftBCESegTrainer(models.create_model("dla34_up_tiny"), device=torch.device("cpu"), epochs=3,
                                 progress=False, mixers=[CellMix(p=1.0)])

    x, t = _encoded(2, 64, 16)
    batch = {"image": (x.permute(0, 2, 3, 1) * 255).to(torch.uint8), "target": t}
    a, states = make(), []
    hist = a.fit(lambda e: [batch], checkpoint=lambda tr: states.append(copy.deepcopy(tr.state_dict())))
    assert [r["mix"][0]["patch_px"] for r in hist] == [32, 32, 16]
    assert [r["mix"][0]["batches_mixed"] for r in hist] == [1, 1, 1]
    assert states[0]["mixers"][0]["epoch"] == 1
    c = make()
    c.load_state_dict(states[0])
    c.fit(lambda e: [batch])
    assert all(torch.equal(v, c.model.state_dict()[k]) for k, v in a.model.state_dict().items())
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in a.history]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in c.history]


def test_mixer_registry_and_refusals():
    with pytest.raises(ConfigError, match=r"unknown mixer 'celmix' \(did you mean 'cellmix'\?\)"):
        create_mixer("celmix")
    with pytest.raises(ConfigError, match=r"no option 'stratgy' \(did you mean 'strategy'\?\)"):
        create_mixer("cellmix", stratgy="split")
    with pytest.raises(ConfigError, match="strategy must be 'group' or 'split'"):
        create_mixer("cellmix", strategy="grp")
    with pytest.raises(ConfigError, match="cannot label 'points' targets exactly"):
        CellMix().setup("points", 1)
    with pytest.raises(ConfigError, match="needs a model with a saliency"):
        ScoreMix().setup("bag", 1, torch.nn.Conv2d(3, 1, 1))
    from pipeline.trainers import Trainer

    with pytest.raises(ConfigError, match="cannot label None"):
        Trainer(torch.nn.Conv2d(3, 1, 1), device="cpu", mixers=[CellMix()])
    # config entries: validated when training starts, one line each
    cfg = load_config(TINY_MIX)
    assert cfg.model.seg_mix[0]["name"] == "cellmix" and cfg.model.cls_mix == [{"name": "scoremix", "p": 0.5}]
    cfg.validate_for_training()
    assert load_config(TINY_MIX, {"model.cls_mix": "[]"}).train_hash() != cfg.train_hash()
    bad = load_config(TINY_MIX, {"model.seg_mix": "[{name: cellmix, T0: 4.0, drve: back}]"})
    with pytest.raises(ConfigError, match=r"model\.seg_mix\[0\]: mixer 'cellmix' has no option 'drve'"):
        bad.validate_for_training()
    bad = load_config(TINY_MIX, {"model.cls_arch": "dla34_cls_tiny"})
    with pytest.raises(ConfigError, match=r"model\.cls_mix\[0\].*saliency.*model\.cls_arch='dla34_cls_tiny'"):
        bad.validate_for_training()


# --------------------------------------------------------------------------- ScoreMix


class RedSaliency(torch.nn.Module):
    """A stand-in for ScoreNet's semantic distribution: softmax of the red mean of each 16 px cell."""

    def saliency(self, x):
        cells = torch.nn.functional.avg_pool2d(x[:, :1], 16)[:, 0]
        b, h, w = cells.shape
        return torch.softmax(cells.flatten(1) * 60, dim=1).view(b, h, w)


def _peaked(b: int, seed: int):
    """64 px images (4 x 4 cells of 16 px): red 0.1 except one random peak cell (0.9); green/blue as _encoded."""
    g = torch.Generator().manual_seed(seed)
    x, _ = _encoded(b, 64, 16)
    peaks = torch.randint(0, 16, (b,), generator=g)
    red = torch.full((b, 16), 0.1)
    red[torch.arange(b), peaks] = 0.9
    x[:, 0] = red.view(b, 4, 4).repeat_interleave(16, 1).repeat_interleave(16, 2)
    return x, peaks


def test_scoremix_cuts_at_the_source_peak():
    model, hits = RedSaliency(), 0
    for seed in range(20):
        x, peaks = _peaked(4, seed)
        target = x[:, 0].clone()  # the pixel targets are the red channel: they must travel with it
        xm, ym = ScoreMix(p=1.0)(x, target, kind="dense", model=model, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(xm[:, 0], ym)
        src, pos = _decode(xm, 16)
        for t in range(4):
            pasted = src[t] != t
            if not pasted.any():
                continue
            s = int(src[t][pasted][0])
            assert (src[t][pasted] == s).all()
            assert int(peaks[s]) in pos[t][pasted].tolist()  # the cut box holds the source's peak
            hits += 1
    assert hits >= 60


def test_scoremix_bag_swap_keeps_the_slides_pixels():
    b, k = 2, 4
    x, _ = _peaked(b * k, 7)
    x[:, 1] += torch.rand(b * k, 64, 64, generator=torch.Generator().manual_seed(8)) / 1000  # every pixel distinct
    bag = BagTargets(torch.tensor([1.0, 0.0]), torch.ones(b, k, dtype=torch.bool))
    xb, yb = ScoreMix(p=1.0)(x.view(b, k, 3, 64, 64), bag, kind="bag", model=RedSaliency(),
                             generator=torch.Generator().manual_seed(9))
    assert torch.equal(yb.label, bag.label)
    assert not torch.equal(xb, x.view(b, k, 3, 64, 64))
    for s in range(b):
        before = x.view(b, k, 3, 64, 64)[s].permute(0, 2, 3, 1).reshape(-1, 3)
        after = xb[s].permute(0, 2, 3, 1).reshape(-1, 3)
        ub, cb = torch.unique(before, dim=0, return_counts=True)
        ua, ca = torch.unique(after, dim=0, return_counts=True)
        assert torch.equal(ub, ua) and torch.equal(cb, ca)


# --------------------------------------------------------------------------- the EM loop


def _subset_labels(cohort, path):
    from pipeline.labels import read_labels_csv

    rows = read_labels_csv(cohort.labels)
    ann = set(cohort.annotated_ids)
    keep = [r for r in rows if r[0] in ann]
    keep += [r for r in rows if r[2] == "train" and r[1] == 1 and r[0] not in ann][:1]
    keep += [r for r in rows if r[2] == "train" and r[1] == 0][:3]
    keep += [r for r in rows if r[2] == "val"][:4]
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([("slide_id", "label", "split"), *keep])
    return path


class _Crash(Exception):
    pass


def _weights(run, k, name):
    return torch.load(run / f"round_{k}" / name, weights_only=False)


def _same_weights(a, b, k, name):
    wa, wb = _weights(a, k, name), _weights(b, k, name)
    return wa["model"].keys() == wb["model"].keys() and all(torch.equal(wa["model"][x], wb["model"][x]) for x in wa["model"])


SMALL = {"em.epochs_init": 3, "em.epochs": 2, "em.batches_per_epoch": 3, "stage2.epochs": 2, "em.heatmap_slides": 1}


def _run(cohort, labels, run_dir, cfg, crash_at=None) -> str:
    """Two EM rounds through run_em, optionally stopped at a checkpoint ``(round, step, n)``."""
    from pipeline.em import EMHooks, run_em

    def hook(k, step, n):
        if crash_at == (k, step, n):
            raise _Crash(str(crash_at))
    try:
        run_em(cohort.stores, labels, run_dir, cfg, annotations=cohort.annotations, rounds=2, progress=False,
               hooks=EMHooks(hook))
    except _Crash:
        return "crashed"
    return "done"


def test_em_round_with_mixers(em_cohort, tmp_path, em_threads):
    """Two rounds of em-round with configs/tiny-mix.yaml (CellMix on theta1, ScoreNet + ScoreMix on theta2)."""
    from click.testing import CliRunner

    from pipeline.cli import main

    labels = _subset_labels(em_cohort, tmp_path / "l.csv")
    args = ["em-round", "--stores", str(em_cohort.stores), "--labels", str(labels), "--run", str(tmp_path / "a"),
            "--config", str(TINY_MIX), "--rounds", "2", "--quiet"]
    for key, v in SMALL.items():
        args += ["--set", f"{key}={v}"]
    for a in em_cohort.annotations:
        args += ["--annotations", str(a)]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    a = tmp_path / "a"
    assert (a / "best").exists()
    mixed_seg = mixed_cls = 0
    for k in (0, 1):
        m = json.loads((a / f"round_{k}" / "metrics.json").read_text())
        seg = [e["mix"][0] for e in m["seg"]["epochs"]]
        assert [r["name"] for r in seg] == ["cellmix"] * len(seg) and len(seg) == (3 if k == 0 else 2)
        assert seg[0]["patch_px"] == 64 and seg[0]["fix_ratio"] == pytest.approx(0.9) and seg[0]["move"] == "start"
        assert all(r["T"] is not None and r["patch_px"] in (64, 32, 16) for r in seg)  # restarts each round
        cls = [e["mix"][0] for e in m["stage2"]["epochs"]]
        assert [r["name"] for r in cls] == ["scoremix", "scoremix"]
        mixed_seg += sum(r["batches_mixed"] for r in seg)
        mixed_cls += sum(r["batches_mixed"] for r in cls)
    assert mixed_seg > 0 and mixed_cls > 0  # p = 0.5: both trainers mixed some batches

    # resumed after crashes in both rounds: bit-identical
    b = tmp_path / "b"
    for crash in [(0, "seg", 1), (1, "seg", 1), (1, "cls", 1)]:
        assert _run(em_cohort, labels, b, load_config(TINY_MIX, SMALL), crash) == "crashed"
    assert _run(em_cohort, labels, b, load_config(TINY_MIX, SMALL)) == "done"
    for k in (0, 1):
        assert _same_weights(a, b, k, "seg.pt") and _same_weights(a, b, k, "cls.pt")
        ma = json.loads((a / f"round_{k}" / "metrics.json").read_text())
        mb = json.loads((b / f"round_{k}" / "metrics.json").read_text())
        for part in ("seg", "stage2"):
            strip = [[{x: v for x, v in e.items() if x != "seconds"} for e in m[part]["epochs"]] for m in (ma, mb)]
            assert strip[0] == strip[1]
        assert ma["stage2_loss"] == mb["stage2_loss"] and ma["val"] == mb["val"]


@pytest.mark.slow
def test_em_round_with_mixers_at_p0_equals_the_plain_trainers(em_cohort, tmp_path, em_threads):
    labels = _subset_labels(em_cohort, tmp_path / "l.csv")
    off = load_config(TINY_MIX, {**SMALL, "model.seg_mix": "[{name: cellmix, p: 0}]",
                                 "model.cls_mix": "[{name: scoremix, p: 0}]"})
    plain = load_config(TINY_MIX, {**SMALL, "model.seg_mix": "[]", "model.cls_mix": "[]"})
    assert off.train_hash() != plain.train_hash()
    assert _run(em_cohort, labels, tmp_path / "off", off) == "done"
    assert _run(em_cohort, labels, tmp_path / "plain", plain) == "done"
    for k in (0, 1):
        assert _same_weights(tmp_path / "off", tmp_path / "plain", k, "seg.pt")
        assert _same_weights(tmp_path / "off", tmp_path / "plain", k, "cls.pt")
        mo = json.loads((tmp_path / "off" / f"round_{k}" / "metrics.json").read_text())
        mp = json.loads((tmp_path / "plain" / f"round_{k}" / "metrics.json").read_text())
        assert [e["loss"] for e in mo["seg"]["epochs"]] == [e["loss"] for e in mp["seg"]["epochs"]]
        assert mo["stage2_loss"] == mp["stage2_loss"]
        assert all(e["mix"][0]["batches_mixed"] == 0 for e in mo["seg"]["epochs"])
