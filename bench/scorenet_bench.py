"""ScoreNet vs a plain ViT of the same width on the same tiles, and the cost of the perturbed top-k.

* Models: ``scorenet`` (paper preset: 512 px tile -> 64 px thumbnail, 16 regions of
  128 px, k = 2 read at full resolution) against a plain ViT with the same
  blocks (width 96, depth 8, 4 heads, MLP ratio 2, 16 px tokens, depthwise-conv
  positions) over the whole full-resolution tile (1024 tokens), global-average
  pooled into one logit.  Tiles/s in eval (``inference_mode``) and for a
  training step (forward + backward), medians of ``--repeat`` timed runs after
  one warm-up; and the peak of the memory allocated during one training step.
* Perturbed top-k (``models.topk``): forward + backward time and the peak of
  the memory it allocates (noise, perturbed scores, indices, one-hots and the
  gradient), for a batch of tiles, BRACS-sized images (N = 238, the paper's
  average) and a slide-sized score map.

Memory on the CPU is the running sum of the allocator's allocations and frees
recorded by ``torch.profiler`` (``profile_memory=True``) inside the measured
call: what the call adds on top of what already exists, not the process RSS.
On a GPU (``--device cuda``) it is CUDA's peak allocated memory during the call
above what was allocated before it, and the timings synchronise the device;
``--amp`` runs the models under bfloat16 autocast, as ``runtime.amp`` does
(the top-k stays float32).

Usage::

    python bench/scorenet_bench.py                 # 512 px tiles, batch 8, CPU
    python bench/scorenet_bench.py --tile-px 256 --batch 4 --repeat 2
    python bench/scorenet_bench.py --device cuda --batch 64 --amp
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import models  # noqa: E402
from models.dla import InputNormalize, _resolve_mean_std  # noqa: E402
from models.scorenet import ConvViT  # noqa: E402
from models.topk import num_selected, perturbed_topk  # noqa: E402


class PlainViT(nn.Module):
    """The baseline: ScoreNet's fine-grained ViT applied to the whole tile, GAP -> one logit."""

    def __init__(self, token_px=16, embed_dim=96, depth=8, num_heads=4, mlp_ratio=2.0):
        super().__init__()
        self.normalize = InputNormalize(*_resolve_mean_std(3, None, None))
        self.vit = ConvViT(token_px, embed_dim, depth, num_heads, mlp_ratio, num_cls=0)
        self.head = nn.Linear(embed_dim, 1)

    def forward(self, x):
        _, gap, _ = self.vit(self.normalize(x))
        return self.head(gap).reshape(x.shape[0])


def peak_alloc_bytes(fn, setup=None, device: str = "cpu") -> int:
    """Peak of the bytes allocated (net of frees) on ``device`` while ``fn()`` runs.

    ``setup()`` runs first, outside the measurement: frees of blocks allocated
    before the profiler started would otherwise count against the peak."""
    if setup is not None:
        setup()
    if device != "cpu":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    total = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        total += e.nbytes()
        peak = max(peak, total)
    return peak


def median_seconds(fn, repeat: int, device: str = "cpu") -> float:
    def timed():
        t0 = time.perf_counter()
        fn()
        if device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed()  # warm-up
    return statistics.median(timed() for _ in range(repeat))


def bench_model(name: str, model: nn.Module, x: torch.Tensor, repeat: int, amp: bool = False) -> dict:
    device = x.device.type
    model = model.to(x.device)

    def forward():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            return model(x).float()

    def infer():
        model.eval()
        with torch.inference_mode():
            forward()

    def setup():
        model.train()
        model.zero_grad(set_to_none=True)

    def train_step():
        setup()
        forward().sum().backward()

    b = x.shape[0]
    return dict(
        name=name,
        params=sum(p.numel() for p in model.parameters()),
        eval_tps=b / median_seconds(infer, repeat, device),
        train_tps=b / median_seconds(train_step, repeat, device),
        train_peak=peak_alloc_bytes(lambda: forward().sum().backward(), setup, device),
    )


def bench_topk(label: str, batch: int, n: int, samples: int, repeat: int, device: str = "cpu") -> dict:
    k = num_selected(n, 0.1)
    scores = torch.softmax(torch.randn(batch, n, device=device), dim=-1).requires_grad_(True)
    upstream = torch.randn(batch, k, n, device=device)

    def setup():
        scores.grad = None

    def step():
        setup()
        (perturbed_topk(scores, k, sigma=1e-3, num_samples=samples) * upstream).sum().backward()

    def plain():
        with torch.no_grad():
            perturbed_topk(scores, k, training=False)

    return dict(
        label=label, batch=batch, n=n, k=k, samples=samples,
        ms=1e3 * median_seconds(step, repeat, device), plain_ms=1e3 * median_seconds(plain, repeat, device),
        peak=peak_alloc_bytes(step, setup, device), noise=batch * samples * n * 4,
    )


def mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tile-px", type=int, default=512, help="tile side in pixels (a multiple of 128)")
    ap.add_argument("--batch", type=int, default=8, help="tiles per batch")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (median)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: on a shared machine, threads of ScoreNet's many small ops "
                         "wait on each other; measured 7x slower with 2 threads under load)")
    ap.add_argument("--samples", type=int, default=100, help="Monte-Carlo samples of the top-k (ScoreNet: 100)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--amp", action="store_true", help="bfloat16 autocast for the models (runtime.amp)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, args.tile_px, args.tile_px, device=args.device)

    rows = [
        bench_model("scorenet", models.create_model("scorenet"), x, args.repeat, args.amp),
        bench_model("plain ViT (same blocks, full tile)", PlainViT(), x, args.repeat, args.amp),
    ]
    n_tokens = (args.tile_px // 16) ** 2
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{args.threads} CPU threads"
    print(f"\n{args.batch} tiles of {args.tile_px} px, {where}{', bf16 autocast' if args.amp else ''}, "
          f"torch {torch.__version__}; plain ViT: {n_tokens} tokens/tile\n")
    print("| model | params | eval tiles/s | train tiles/s | train-step peak alloc (MB) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['params'] / 1e6:.2f} M | {r['eval_tps']:.1f} | {r['train_tps']:.1f} | "
              f"{mb(r['train_peak'])} |")
    print(f"\nscorenet / plain ViT: eval x{rows[0]['eval_tps'] / rows[1]['eval_tps']:.1f}, "
          f"train x{rows[0]['train_tps'] / rows[1]['train_tps']:.1f}, "
          f"memory x{rows[1]['train_peak'] / max(rows[0]['train_peak'], 1):.1f} less")

    n_regions = (args.tile_px // 128) ** 2
    topk_rows = [bench_topk(label, b, n, args.samples, args.repeat, args.device) for label, b, n in (
        (f"{args.batch} tiles of {args.tile_px} px", args.batch, n_regions),
        ("64 tiles (stage-2 batch)", 64, n_regions),
        ("8 BRACS-sized images", 8, 238),
        ("1 slide-sized map", 1, 64 * 64),
    )]
    print(f"\nPerturbed top-k (sigma 1e-3, {args.samples} samples), training forward + backward:\n")
    print("| scores | B x N | k | fwd+bwd ms | plain topk ms | peak alloc (MB) | noise alone (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in topk_rows:
        print(f"| {r['label']} | {r['batch']} x {r['n']} | {r['k']} | {r['ms']:.2f} | {r['plain_ms']:.3f} | "
              f"{mb(r['peak'])} | {mb(r['noise'])} |")


if __name__ == "__main__":
    main()
