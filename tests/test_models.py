"""Tests for models/: registry, DLA models, losses, seeding and weight loading.

CPU only, no downloads (every model is built with random weights).  The
full-width dla34 models are only run at 64x64.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import models  # noqa: E402
from models import registry  # noqa: E402
from models.losses import soft_bce_with_logits, topk_mean_bce  # noqa: E402
from models.utils import load_state_dict_flexible, seed_everything  # noqa: E402

BUILTIN = ["dla34_cls", "dla34_cls_tiny", "dla34_up", "dla34_up_tiny"]


@pytest.fixture(autouse=True)
def _threads(two_torch_threads):
    yield


@pytest.fixture(scope="module")
def dla34_up_model():
    seed_everything(0)
    return models.create_model("dla34_up").eval()


@pytest.fixture
def scratch_registry():
    """Names registered inside a test are removed afterwards."""
    before = dict(registry._model_entrypoints), dict(registry._model_size_divisors)
    yield
    for live, saved in zip((registry._model_entrypoints, registry._model_size_divisors), before):
        live.clear()
        live.update(saved)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# --------------------------------------------------------------------------- registry


def test_registry_lists_builtin_models():
    names = models.list_models()
    assert names == sorted(names)
    for name in BUILTIN:
        assert name in names
        assert models.is_model(name)
    assert models.list_models("dla34_up*") == ["dla34_up", "dla34_up_tiny"]
    assert models.list_models("cls") == ["dla34_cls", "dla34_cls_tiny"]  # substring without wildcards
    assert models.list_models("no_such_thing*") == []
    assert not models.is_model("dla34")


def test_create_model_records_name_and_kwargs():
    m = models.create_model("dla34_up_tiny", num_classes=2, drop_rate=0.1)
    assert isinstance(m, models.DLAUpSeg)
    assert m.model_name == "dla34_up_tiny"
    assert m.model_kwargs == {"num_classes": 2, "drop_rate": 0.1}
    assert m.num_classes == 2
    assert any(isinstance(x, nn.Dropout2d) for x in m.modules())


def test_unknown_model_name_error_lists_known_and_closest():
    with pytest.raises(KeyError) as ki:
        models.create_model("dla34up")
    msg = str(ki.value)
    assert "Did you mean 'dla34_up'" in msg
    for name in BUILTIN:
        assert name in msg
    assert msg.startswith("Unknown model 'dla34up'")  # not repr()-quoted like a bare KeyError
    with pytest.raises(ValueError, match="Unknown model 'resnet50'"):
        models.create_model("resnet50")
    assert ki.value.closest[0] == "dla34_up"
    import pickle

    assert str(pickle.loads(pickle.dumps(ki.value))) == msg


def test_pretrained_is_refused():
    with pytest.raises(ValueError, match="pretrained"):
        models.create_model("dla34_up_tiny", pretrained=True)


def test_register_custom_model(scratch_registry):
    @models.register_model("toy_linear_test")
    def toy(num_classes: int = 1, **kw):
        return nn.Linear(4, num_classes)

    assert models.is_model("toy_linear_test")
    m = models.create_model("toy_linear_test", num_classes=3)
    assert isinstance(m, nn.Linear) and m.out_features == 3

    @models.register_model
    def toy_bare_test(**kw):
        return nn.Identity()

    assert "toy_bare_test" in models.list_models("toy_*")

    with pytest.raises(ValueError, match="already registered"):
        @models.register_model("toy_linear_test")
        def other(**kw):
            return nn.Identity()

    @models.register_model("toy_linear_test", overwrite=True)
    def replacement(**kw):
        return nn.Identity()

    assert isinstance(models.create_model("toy_linear_test"), nn.Identity)


def test_builtin_models_declare_size_divisor_32():
    for name in BUILTIN:
        assert models.get_size_divisor(name) == 32
    for name in ("dla34_up_tiny", "dla34_cls_tiny"):
        m = models.create_model(name)
        assert m.size_divisor == 32, name  # what the model computes from its backbone agrees
    assert models.DLAClassifier(width_mult=0.25).size_divisor == 32  # also when built directly
    with pytest.raises(models.UnknownModelError, match="Did you mean 'dla34_up'"):
        models.get_size_divisor("dla34up")


def test_size_divisor_int_callable_and_invalid(scratch_registry):
    @models.register_model("toy_div_test", size_divisor=48)
    def toy(**kw):
        return nn.Identity()

    @models.register_model("toy_div_kw_test", size_divisor=lambda patch=16, depth=2, **kw: patch * 2 ** depth)
    def toy_kw(**kw):
        return nn.Identity()

    @models.register_model
    def toy_div_default_test(**kw):
        return nn.Identity()

    assert models.get_size_divisor("toy_div_test") == 48
    assert models.get_size_divisor("toy_div_kw_test") == 64
    assert models.get_size_divisor("toy_div_kw_test", patch=8, depth=1, width=3) == 16
    assert models.get_size_divisor("toy_div_default_test") == 1  # undeclared: any size
    assert models.create_model("toy_div_test").size_divisor == 48
    assert models.create_model("toy_div_kw_test", patch=4).size_divisor == 16
    for bad in (0, 2.5, True, "32"):
        with pytest.raises(ValueError, match="size_divisor"):
            models.register_model("toy_bad_test", size_divisor=bad)
    assert not models.is_model("toy_bad_test")

    @models.register_model("toy_bad_fn_test", size_divisor=lambda **kw: 0)
    def toy_bad(**kw):
        return nn.Identity()

    with pytest.raises(ValueError, match="'toy_bad_fn_test' declares size_divisor 0"):
        models.get_size_divisor("toy_bad_fn_test")


# --------------------------------------------------------------------------- backbone assumptions


def test_timm_dla34_feature_info():
    bb = timm.create_model("dla34", features_only=True, pretrained=False)
    assert bb.feature_info.channels() == [32, 64, 128, 256, 512]
    assert bb.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert bb.feature_info.module_name() == ["level1", "level2", "level3", "level4", "level5"]


def test_dla34_up_backbone_matches_timm(dla34_up_model):
    fi = dla34_up_model.backbone.feature_info
    assert fi.channels() == [32, 64, 128, 256, 512]
    assert fi.reduction() == [2, 4, 8, 16, 32]
    assert dla34_up_model.output_stride == 4
    assert dla34_up_model.size_divisor == 32
    assert dla34_up_model.num_features == 64


def test_tiny_backbone_channels():
    m = models.create_model("dla34_up_tiny")
    assert m.backbone.feature_info.channels() == [8, 16, 32, 64, 128]
    assert m.backbone.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert m.num_features == 16
    wide = models.create_model("dla34_up_tiny", width_mult=0.5)
    assert wide.backbone.feature_info.channels() == [16, 32, 64, 128, 256]
    explicit = models.create_model("dla34_up", channels=(8, 8, 16, 16, 32, 32), head_chs=8)
    assert explicit.backbone.feature_info.channels() == [8, 16, 16, 32, 32]


def test_custom_path_at_full_width_equals_timm_dla34():
    # the width_mult/levels/channels path builds timm's DLA class directly; at
    # dla34's own settings it must give exactly timm's dla34
    ref = timm.create_model("dla34", pretrained=False)
    custom = models.create_dla_backbone("dla34", levels=(1, 1, 1, 2, 2, 1))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in custom.state_dict().items()} == ref_shapes
    assert n_params(custom) == n_params(ref)


# --------------------------------------------------------------------------- dla34_up (theta1)


def test_dla34_up_full_width_shapes_64(dla34_up_model):
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        feats = dla34_up_model.forward_features(x)
        logits4 = dla34_up_model.forward_head(feats)
        logits = dla34_up_model(x)
    assert feats.shape == (2, 64, 16, 16)
    assert logits4.shape == (2, 1, 16, 16)
    assert logits.shape == (2, 1, 64, 64)
    assert torch.isfinite(logits).all()
    assert torch.allclose(logits, F.interpolate(logits4, size=(64, 64), mode="bilinear", align_corners=False))


@pytest.mark.parametrize("hw", [(64, 64), (96, 96), (128, 96)])
def test_dla34_up_tiny_shapes(hw):
    m = models.create_model("dla34_up_tiny").eval()
    h, w = hw
    x = torch.rand(3, 3, h, w)
    with torch.no_grad():
        out = m(x)
        out4 = m(x, upsample=False)
        feats = m.forward_features(x)
    assert out.shape == (3, 1, h, w)
    assert out4.shape == (3, 1, h // 4, w // 4)
    assert feats.shape == (3, 16, h // 4, w // 4)


def test_dla34_up_out_stride_2_and_bilinear():
    m = models.create_model("dla34_up_tiny", out_stride=2, upsample="bilinear", num_classes=3).eval()
    with torch.no_grad():
        assert m(torch.rand(1, 3, 64, 64), upsample=False).shape == (1, 3, 32, 32)
        assert m(torch.rand(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="out_stride"):
        models.create_model("dla34_up_tiny", out_stride=32)
    with pytest.raises(ValueError, match="upsample"):
        models.create_model("dla34_up_tiny", upsample="nearest")


@pytest.mark.parametrize("hw", [(100, 96), (64, 48), (31, 32)])
def test_dla34_up_rejects_sizes_not_multiple_of_32(hw):
    m = models.create_model("dla34_up_tiny").eval()
    h, w = hw
    with pytest.raises(ValueError, match=rf"multiples of 32, got {h}x{w}"):
        m(torch.rand(1, 3, h, w))


def test_dla34_up_in_chans_and_uint8_input():
    m = models.create_model("dla34_up_tiny", in_chans=1).eval()
    with torch.no_grad():
        assert m(torch.rand(2, 1, 32, 32)).shape == (2, 1, 32, 32)
        with pytest.raises(ValueError, match="input channels"):
            m(torch.rand(2, 3, 32, 32))
    m3 = models.create_model("dla34_up_tiny").eval()
    xu8 = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(m3(xu8), m3(xu8.float() / 255.0), atol=1e-6)


def test_normalisation_buffers_not_in_state_dict():
    m = models.create_model("dla34_up_tiny", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert torch.allclose(m.normalize.mean.flatten(), torch.tensor([0.5] * 3))
    assert not any(k.startswith("normalize.") for k in m.state_dict())
    x = torch.full((1, 3, 4, 4), 0.75)
    assert torch.allclose(m.normalize(x), torch.ones_like(x))


def test_dla34_up_initial_probability_is_the_prior():
    seed_everything(0)
    m = models.create_model("dla34_up_tiny").train()
    with torch.no_grad():
        p = torch.sigmoid(m(torch.rand(4, 3, 64, 64)))
    assert 0.005 < p.mean().item() < 0.02
    assert m.classifier.bias.item() == pytest.approx(-math.log(0.99 / 0.01))
    m0 = models.create_model("dla34_up_tiny", prior_prob=None)
    assert m0.classifier.bias.item() == 0.0
    with pytest.raises(ValueError, match="prior_prob"):
        models.create_model("dla34_up_tiny", prior_prob=1.0)


def test_every_parameter_gets_a_gradient():
    m = models.create_model("dla34_up_tiny").train()
    m(torch.rand(2, 3, 64, 64)).mean().backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []


# --------------------------------------------------------------------------- dla34_cls (theta2)


def test_dla34_cls_full_width_shape_64():
    seed_everything(0)
    m = models.create_model("dla34_cls").eval()
    with torch.no_grad():
        out = m(torch.rand(2, 3, 64, 64))
    assert out.shape == (2,)
    assert torch.isfinite(out).all()
    assert n_params(m) == n_params(timm.create_model("dla34", num_classes=1, pretrained=False))


def test_dla34_cls_tiny_shapes_and_tiles():
    m = models.create_model("dla34_cls_tiny").eval()
    with torch.no_grad():
        assert m(torch.rand(3, 3, 64, 64)).shape == (3,)
        assert m(torch.rand(1, 3, 96, 64)).shape == (1,)
        tiles = torch.rand(2, 4, 3, 64, 64)
        out = m.forward_tiles(tiles)
        assert out.shape == (2, 4)
        assert torch.allclose(out[1], m(tiles[1]), atol=1e-5)
        assert m.forward_features(torch.rand(1, 3, 64, 64)).shape == (1, 128, 2, 2)
    m3 = models.create_model("dla34_cls_tiny", num_classes=3).eval()
    with torch.no_grad():
        assert m3(torch.rand(2, 3, 64, 64)).shape == (2, 3)


def test_dla34_cls_initial_logits_are_small():
    # timm's own DLA classifier init gives logits of several units; ours is small
    seed_everything(0)
    m = models.create_model("dla34_cls_tiny").train()
    with torch.no_grad():
        out = m(torch.rand(8, 3, 64, 64))
    assert out.abs().max().item() < 1.0


# --------------------------------------------------------------------------- losses


def _bce(p: float, t: float) -> float:
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


L3 = math.log(3.0)  # sigmoid(ln 3) = 0.75, sigmoid(-ln 3) = 0.25


def test_soft_bce_2x2_hand_computed():
    logits = torch.tensor([[[[0.0, L3], [-L3, L3]]]], requires_grad=True)  # (1, 1, 2, 2)
    targets = torch.tensor([[[0.5, 1.0], [0.0, 0.2]]])  # (1, 2, 2): broadcast to the channel
    per_px = [_bce(0.5, 0.5), _bce(0.75, 1.0), _bce(0.25, 0.0), _bce(0.75, 0.2)]
    # by hand: ln 2, -ln .75, -ln .75, -(0.2 ln .75 + 0.8 ln .25)
    assert per_px == pytest.approx([0.693147, 0.287682, 0.287682, 1.166572], abs=1e-6)

    none = soft_bce_with_logits(logits, targets, reduction="none")
    assert none.shape == (1, 1, 2, 2)
    assert none.flatten().tolist() == pytest.approx(per_px, abs=1e-6)
    assert soft_bce_with_logits(logits, targets, reduction="sum").item() == pytest.approx(sum(per_px), abs=1e-6)
    mean = soft_bce_with_logits(logits, targets)
    assert mean.item() == pytest.approx(sum(per_px) / 4, abs=1e-6)
    # d mean / d x = (sigmoid(x) - t) / N
    mean.backward()
    expected = [(0.5 - 0.5) / 4, (0.75 - 1.0) / 4, (0.25 - 0.0) / 4, (0.75 - 0.2) / 4]
    assert logits.grad.flatten().tolist() == pytest.approx(expected, abs=1e-6)


def test_soft_bce_weighted_mean_and_shapes():
    logits = torch.tensor([[[[0.0, L3], [-L3, L3]]]])
    targets = torch.tensor([[[[0.5, 1.0], [0.0, 0.2]]]])  # same shape as logits
    per_px = [_bce(0.5, 0.5), _bce(0.75, 1.0), _bce(0.25, 0.0), _bce(0.75, 0.2)]
    w = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])  # (B, H, W): ignore one pixel
    got = soft_bce_with_logits(logits, targets, weight=w)
    assert got.item() == pytest.approx((per_px[0] + per_px[2] + per_px[3]) / 3, abs=1e-6)
    w2 = torch.tensor([[[[2.0, 1.0], [1.0, 0.0]]]])
    assert soft_bce_with_logits(logits, targets, weight=w2, reduction="sum").item() == pytest.approx(
        2 * per_px[0] + per_px[1] + per_px[2], abs=1e-6
    )
    assert soft_bce_with_logits(logits, targets, weight=torch.zeros(1, 2, 2)).item() == 0.0
    # per-sample weight broadcasts
    assert soft_bce_with_logits(logits, targets, weight=torch.full((1, 1, 1, 1), 3.0)).item() == pytest.approx(
        sum(per_px) / 4, abs=1e-6
    )
    # half-precision logits: computed and returned in float32
    assert soft_bce_with_logits(logits.half(), targets).dtype == torch.float32
    with pytest.raises(ValueError, match="do not fit"):
        soft_bce_with_logits(logits, torch.zeros(1, 1, 3, 3))
    with pytest.raises(ValueError, match="reduction"):
        soft_bce_with_logits(logits, targets, reduction="avg")


def test_topk_mean_bce_hand_computed():
    logits = torch.tensor([[0.0, L3, -L3], [L3, L3, L3]], requires_grad=True)
    labels = torch.tensor([1.0, 0.0])
    # slide 0: mean prob (0.5 + 0.75 + 0.25) / 3 = 0.5, label 1 -> ln 2
    # slide 1: mean prob 0.75, label 0 -> -ln 0.25 = ln 4
    per_slide = topk_mean_bce(logits, labels, reduction="none")
    assert per_slide.tolist() == pytest.approx([math.log(2), math.log(4)], abs=1e-6)
    loss = topk_mean_bce(logits, labels)
    assert loss.item() == pytest.approx(1.5 * math.log(2), abs=1e-6)
    assert topk_mean_bce(logits, labels, reduction="sum").item() == pytest.approx(3 * math.log(2), abs=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # (B, K, 1) logits are accepted
    assert topk_mean_bce(logits.detach().unsqueeze(-1), labels).item() == pytest.approx(loss.item())


def test_topk_mean_bce_matches_naive_formula_and_mask():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=g) * 3
    labels = torch.tensor([1.0, 0.0, 1.0, 0.3, 0.0])
    p = torch.sigmoid(logits).mean(1)
    naive = -(labels * torch.log(p) + (1 - labels) * torch.log(1 - p))
    assert torch.allclose(topk_mean_bce(logits, labels, reduction="none"), naive, atol=1e-5)
    # a mask drops padded tiles: same as computing on the real tiles only
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[2, 4:] = False
    padded = logits.clone()
    padded[2, 4:] = 100.0  # must not matter
    got = topk_mean_bce(padded, labels, mask=mask, reduction="none")
    assert got[2].item() == pytest.approx(topk_mean_bce(logits[2:3, :4], labels[2:3]).item(), abs=1e-6)
    assert torch.allclose(got[[0, 1, 3, 4]], naive[[0, 1, 3, 4]], atol=1e-5)


def test_topk_mean_bce_is_clamped_and_finite():
    eps = 1e-6
    logits = torch.full((2, 4), 60.0, requires_grad=True)  # p == 1 in float32
    labels = torch.tensor([0.0, 1.0])
    loss = topk_mean_bce(logits, labels, eps=eps, reduction="none")
    assert torch.isfinite(loss).all()
    assert loss[0].item() == pytest.approx(-math.log(eps), rel=1e-5)  # capped at -log(eps)
    assert loss[1].item() == pytest.approx(-math.log1p(-eps), abs=1e-7)
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert topk_mean_bce(torch.full((1, 3), -80.0), torch.ones(1), eps=eps).item() == pytest.approx(
        -math.log(eps), rel=1e-5
    )
    with pytest.raises(ValueError, match="slide labels"):
        topk_mean_bce(torch.zeros(2, 3), torch.zeros(3))


# --------------------------------------------------------------------------- seeding


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_seeded_construction_is_identical():
    for name in ("dla34_up_tiny", "dla34_cls_tiny"):
        seed_everything(123)
        a = models.create_model(name)
        seed_everything(123)
        b = models.create_model(name)
        seed_everything(124)
        c = models.create_model(name)
        assert _state_equal(a, b)
        assert not _state_equal(a, c)


def test_seed_everything_seeds_python_numpy_torch():
    import random

    import numpy as np

    seed_everything(7)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(7)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_seed_everything_deterministic_flag():
    was = torch.are_deterministic_algorithms_enabled()
    try:
        seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        seed_everything(0)  # None leaves it alone
        assert torch.are_deterministic_algorithms_enabled()
        seed_everything(0, deterministic=False)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(was)


# --------------------------------------------------------------------------- flexible loading


def test_load_state_dict_flexible_ddp_prefix_and_nesting():
    seed_everything(1)
    src = models.create_model("dla34_up_tiny")
    seed_everything(2)
    dst = models.create_model("dla34_up_tiny")
    assert not _state_equal(src, dst)
    ddp = {"module." + k: v.clone() for k, v in src.state_dict().items()}
    report = load_state_dict_flexible(dst, {"state_dict": ddp, "epoch": 3})
    assert report.ok
    assert report.stripped_prefixes == ["module."]
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert len(report.loaded_keys) == len(src.state_dict())
    assert _state_equal(src, dst)

    seed_everything(3)
    dst2 = models.create_model("dla34_up_tiny")
    report2 = load_state_dict_flexible(dst2, {"model": src.state_dict(), "optimizer": {}}, strict=True)
    assert report2.ok and report2.stripped_prefixes == []
    assert _state_equal(src, dst2)


def test_load_state_dict_flexible_reports_problems():
    src = models.create_model("dla34_up_tiny")
    sd = dict(src.state_dict())
    sd.pop("classifier.bias")
    sd["extra.weight"] = torch.zeros(3)
    dst = models.create_model("dla34_up_tiny", num_classes=2)  # classifier.weight shape differs
    before = dst.classifier.weight.detach().clone()
    report = load_state_dict_flexible(dst, sd)
    assert not report.ok
    assert report.missing_keys == ["classifier.bias"]
    assert report.unexpected_keys == ["extra.weight"]
    assert report.mismatched_keys == [("classifier.weight", (1, 16, 1, 1), (2, 16, 1, 1))]
    assert torch.equal(dst.classifier.weight, before)  # skipped, not half-loaded
    assert torch.equal(dst.head[0].weight, src.head[0].weight)  # the rest was loaded
    text = str(report)
    assert "missing (1): classifier.bias" in text and "extra.weight" in text
    with pytest.raises(RuntimeError, match="classifier.bias"):
        load_state_dict_flexible(models.create_model("dla34_up_tiny"), sd, strict=True)
    with pytest.raises(TypeError):
        load_state_dict_flexible(dst, [1, 2, 3])


def test_classifier_backbone_weights_load_into_segmentation_backbone():
    # theta1 and theta2 share the timm DLA layout: the classifier's backbone
    # (minus its fc) loads into the segmentation backbone
    seed_everything(5)
    cls = models.create_model("dla34_cls_tiny")
    seg = models.create_model("dla34_up_tiny")
    report = load_state_dict_flexible(seg.backbone, cls.backbone.state_dict())
    assert report.missing_keys == []
    assert sorted(report.unexpected_keys) == ["fc.bias", "fc.weight"]
    assert torch.equal(seg.backbone.level5.root.conv.weight, cls.backbone.level5.root.conv.weight)


# --------------------------------------------------------------------------- training sanity


def _bright_squares(n: int, size: int, g: torch.Generator):
    x = torch.rand(n, 3, size, size, generator=g) * 0.5
    y = torch.zeros(n, 1, size, size)
    for i in range(n):
        s = int(torch.randint(12, 24, (1,), generator=g))
        r, c = torch.randint(0, size - s, (2,), generator=g).tolist()
        x[i, :, r:r + s, c:c + s] += 0.5
        y[i, :, r:r + s, c:c + s] = 1.0
    return x, y


def test_tiny_segmenter_overfits_bright_squares():
    seed_everything(0)
    x, y = _bright_squares(8, 64, torch.Generator().manual_seed(0))
    m = models.create_model("dla34_up_tiny").train()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = soft_bce_with_logits(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    # predictions on the training batch (still batch-stat BN: after 30 steps the
    # running statistics have not settled, so eval mode is not a fair check)
    with torch.no_grad():
        logits = m(x)
    pred = logits > 0
    iou = (pred & (y > 0)).sum().item() / max((pred | (y > 0)).sum().item(), 1)
    assert iou > 0.6, iou


def test_tiny_classifier_fits_topk_slides():
    # slides of K=4 tiles; positive slides hold one or more bright-square tiles
    seed_everything(0)
    g = torch.Generator().manual_seed(0)
    b, k = 8, 4
    tiles = torch.rand(b, k, 3, 32, 32, generator=g) * 0.5
    labels = torch.tensor([1.0, 0.0] * (b // 2))
    for i in range(0, b, 2):
        tiles[i, : 1 + i // 4, :, 8:24, 8:24] += 0.5
    m = models.create_model("dla34_cls_tiny").train()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = topk_mean_bce(m.forward_tiles(tiles), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_cpu_autocast_bfloat16_forward_and_losses():
    # stands in for CUDA autocast: the model and losses must accept reduced-precision activations
    m = models.create_model("dla34_up_tiny").train()
    x = torch.rand(2, 3, 64, 64)
    y = (torch.rand(2, 64, 64) > 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(x)
        loss = soft_bce_with_logits(logits, y)
    assert logits.shape == (2, 1, 64, 64)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    c = models.create_model("dla34_cls_tiny").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tl = c.forward_tiles(torch.rand(2, 3, 3, 32, 32))
        closs = topk_mean_bce(tl, torch.tensor([1.0, 0.0]))
    assert tl.shape == (2, 3) and closs.dtype == torch.float32 and torch.isfinite(closs)
