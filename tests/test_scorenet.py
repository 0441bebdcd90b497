"""Tests for models/topk.py (perturbed top-k) and models/scorenet.py (ScoreNet tile classifier).

CPU only, random weights; ScoreNet runs on 64-256 px inputs.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

import torch.nn.functional as F  # noqa: E402

import models  # noqa: E402
from models.scorenet import ScoreNet, scorenet_size_divisor, scorenet_tiny_size_divisor  # noqa: E402
from models.topk import PerturbedTopK, num_selected, perturbed_topk, topk_indicators  # noqa: E402
from models.utils import seed_everything  # noqa: E402


@pytest.fixture(autouse=True)
def _threads(two_torch_threads):
    yield


@pytest.fixture(scope="module")
def tiny():
    seed_everything(0)
    return models.create_model("scorenet_tiny")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- perturbed top-k


def test_num_selected_is_ceil_of_a_tenth():
    assert [num_selected(n, 0.1) for n in (1, 4, 10, 16, 30, 238)] == [1, 1, 1, 2, 3, 24]
    with pytest.raises(ValueError):
        num_selected(16, 0.0)


@pytest.mark.parametrize("training", [False, True])
def test_topk_forward_equals_torch_topk(training):
    scores = torch.randn(5, 12, generator=gen(0)).requires_grad_(True)
    out = perturbed_topk(scores, 3, training=training, generator=gen(1))
    idx = torch.topk(scores.detach(), 3).indices.sort(dim=-1).values
    assert out.shape == (5, 3, 12)
    assert torch.equal(out, F.one_hot(idx, 12).float())
    mod = PerturbedTopK().eval()
    assert torch.equal(mod(scores, 3), out)


SIX = torch.tensor([[0.3, -0.2, 0.5, 0.1, -0.4, 0.25]])


def mc_expected_indicators(s: torch.Tensor, k: int, sigma: float, noise: torch.Tensor) -> torch.Tensor:
    """Monte-Carlo E[topk(s + sigma Z)] with fixed draws: an (N,) -> (k, N) step function."""
    return topk_indicators(s[None, :] + sigma * noise, k).mean(dim=0)


@pytest.mark.parametrize("baseline", [True, False])
def test_perturbed_jacobian_matches_finite_difference(baseline):
    k, sigma, n = 2, 0.5, 100_000

    def f(s):
        return perturbed_topk(s, k, sigma=sigma, num_samples=n, baseline=baseline, generator=gen(1))

    jac = torch.autograd.functional.jacobian(f, SIX)[0, :, :, 0, :]  # (k, N, N): dY[j, n] / ds[m]
    noise = torch.randn(n, 6, generator=gen(2))  # independent of the draws above
    h = 0.05
    fd = torch.stack(
        [(mc_expected_indicators(SIX[0] + h * e, k, sigma, noise)
          - mc_expected_indicators(SIX[0] - h * e, k, sigma, noise)) / (2 * h) for e in torch.eye(6)],
        dim=-1,
    )
    assert fd.abs().max() > 0.3  # the smoothed selection really moves
    assert (jac - fd).abs().max() < 0.02


def test_expected_forward_is_the_monte_carlo_mean():
    out = perturbed_topk(SIX.clone().requires_grad_(True), 2, sigma=0.5, num_samples=100_000,
                         hard=False, generator=gen(3))
    want = mc_expected_indicators(SIX[0], 2, 0.5, torch.randn(100_000, 6, generator=gen(4)))
    assert torch.allclose(out[0], want, atol=0.01)
    assert torch.allclose(out.sum(dim=-1), torch.ones(1, 2))  # each slot holds one region in expectation


def test_topk_runs_in_float32_outside_autocast():
    scores = torch.randn(2, 8, generator=gen(0)).to(torch.bfloat16).requires_grad_(True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = perturbed_topk(scores, 2, sigma=0.5, generator=gen(1))
    assert out.dtype == torch.float32
    (out * torch.arange(8.0)).sum().backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0


def test_topk_noise_comes_from_the_generator():
    def grad(seed):
        s = SIX.clone().requires_grad_(True)
        (perturbed_topk(s, 2, sigma=0.5, generator=gen(seed)) * torch.arange(6.0)).sum().backward()
        return s.grad

    assert torch.equal(grad(7), grad(7))
    assert not torch.equal(grad(7), grad(8))


# --------------------------------------------------------------------------- ScoreNet


def test_registered_with_size_divisors():
    assert models.is_model("scorenet") and models.is_model("scorenet_tiny")
    assert scorenet_size_divisor() == 128 and scorenet_tiny_size_divisor() == 32
    assert scorenet_size_divisor(downscale=4) == 64 and scorenet_tiny_size_divisor(token_px=16) == 64
    for name, fn in [("scorenet", scorenet_size_divisor), ("scorenet_tiny", scorenet_tiny_size_divisor)]:
        for kw in ({}, {"downscale": 2}):
            assert models.create_model(name, **kw).size_divisor == fn(**kw)


def test_paper_architecture():
    m = models.create_model("scorenet")
    assert (m.downscale, m.region_px, m.scorer.token_px, m.fine.token_px) == (8, 128, 16, 16)
    assert len(m.scorer.encoder.blocks) == len(m.fine.encoder.blocks) == 8
    assert len(m.aggregator.blocks) == 5
    blk = m.scorer.encoder.blocks[0]
    assert blk.attn.num_heads == 4 and blk.mlp[0].out_features == 2 * 96
    assert m.scorer.encoder.peg.conv.groups == 96  # depthwise-conv positions
    assert m.num_features == 96 * (4 + 3)


@pytest.mark.parametrize("h, w", [(64, 64), (128, 96)])
def test_tiny_shapes(tiny, h, w):
    tiny.eval()
    x = torch.rand(3, 3, h, w, generator=gen(0))
    with torch.no_grad():
        assert tiny(x).shape == (3,)
        sal = tiny.saliency(x)
    assert sal.shape == (3, h // 32, w // 32) and sal.dtype == torch.float32
    assert torch.allclose(sal.sum(dim=(1, 2)), torch.ones(3))


def test_paper_preset_shapes_and_classes():
    m = models.create_model("scorenet", num_classes=3).eval()
    x = torch.rand(2, 3, 256, 256, generator=gen(0))
    with torch.no_grad():
        assert m(x).shape == (2, 3)
        assert m.saliency(x).shape == (2, 2, 2)


def test_uint8_input_is_scaled(tiny):
    tiny.eval()
    u = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=gen(0))
    with torch.no_grad():
        assert torch.allclose(tiny(u), tiny(u.float() / 255.0), atol=1e-5)


def test_fine_vit_sees_the_top_saliency_regions(tiny):
    tiny.eval()
    x = torch.rand(2, 3, 128, 128, generator=gen(1))  # 16 regions of 32 px, k = 2
    seen = []
    hook = tiny.fine.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            sal = tiny.saliency(x).flatten(1)
            tiny(x)
    finally:
        hook.remove()
    xn = tiny.normalize(x)
    for b in range(2):
        for j, n in enumerate(torch.topk(sal[b], 2).indices.sort().values.tolist()):
            r, c = divmod(n, 4)
            want = xn[b, :, 32 * r:32 * r + 32, 32 * c:32 * c + 32]
            assert torch.equal(seen[0][2 * b + j], want)


def test_scorer_gets_gradient_through_the_topk_in_training():
    seed_everything(0)
    m = models.create_model("scorenet_tiny").train()
    x = torch.rand(4, 3, 128, 128, generator=gen(0))
    m(x, generator=gen(1)).sum().backward()
    # head_weights only feed the semantic distribution -> top-k: their gradient is the perturbed one
    g = m.head_weights.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert m.scorer.patch_embed.weight.grad.abs().sum() > 0

    m.zero_grad(set_to_none=True)
    m.eval()
    m(x).sum().backward()  # plain top-k: no gradient reaches the distribution
    assert m.head_weights.grad is None
    assert m.fine.patch_embed.weight.grad.abs().sum() > 0


def test_eval_is_deterministic_and_hard_training_forward_matches(tiny):
    x = torch.rand(3, 3, 96, 64, generator=gen(2))
    tiny.eval()
    with torch.no_grad():
        a, b = tiny(x), tiny(x)
    assert torch.equal(a, b)
    tiny.train()
    try:
        c = tiny(x, generator=gen(5))  # hard forward: the noise only shapes the gradient
    finally:
        tiny.eval()
    assert torch.allclose(a, c.detach(), atol=1e-6)


@pytest.mark.parametrize("name, h, w", [("scorenet_tiny", 80, 64), ("scorenet_tiny", 16, 16), ("scorenet", 500, 512)])
def test_tile_not_divisible_by_region_fails_in_one_line(name, h, w):
    m = models.create_model(name).eval()
    r = m.size_divisor
    with pytest.raises(ValueError) as err:
        m(torch.rand(1, 3, h, w))
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{h}x{w}" in msg and f"region size {r} px" in msg
    with pytest.raises(ValueError, match=f"region size {r} px"):
        m.saliency(torch.rand(1, 3, h, w))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="fine_token_px"):
        ScoreNet(downscale=4, token_px=8, fine_token_px=5)
    with pytest.raises(ValueError, match="topk_forward"):
        ScoreNet(topk_forward="soft")
    with pytest.raises(ValueError, match="num_heads"):
        ScoreNet(embed_dim=90, num_heads=4)


def test_mixed_precision_keeps_the_distribution_in_float32():
    seed_everything(0)
    m = models.create_model("scorenet_tiny").train()
    x = torch.rand(2, 3, 64, 96, generator=gen(0))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        y = m(x, generator=gen(1))
        sal = m.saliency(x)
    assert y.shape == (2,) and sal.dtype == torch.float32
    y.float().sum().backward()
    assert torch.isfinite(m.head_weights.grad).all() and m.head_weights.grad.abs().sum() > 0


def test_registry_knows_the_region_size_without_building_a_model():
    import models
    from pipeline.config import ConfigError, load_config

    assert models.get_size_divisor("scorenet") == 128
    assert models.get_size_divisor("scorenet_tiny") == 32
    assert models.get_size_divisor("scorenet_tiny", token_px=16) == 64
    cfg = load_config("tiny", {"model.cls_arch": "scorenet_tiny", "model.cls_arch_kwargs": "{token_px: 16}"})
    cfg.validate_for_training(tile_px=128)
    with pytest.raises(ConfigError, match="scorenet_tiny"):
        cfg.validate_for_training(tile_px=96)  # fine for DLA34 (32), not for 64 px regions
