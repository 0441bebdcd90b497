"""What tests/test_ddp.py runs in other processes (real torch.distributed, gloo on CPU).

* BatchNorm-free test models (``ddp_test_seg``, ``ddp_test_cls``): with them two ranks must train
  what one process trains, up to float reduction order (per-rank BatchNorm on CPU would normalise
  each rank's slice with its own statistics, a different training; see docs/design.md).
* Training and E-step scenarios that run the same way in one process and in each rank.
* :func:`spawn_main`: the body of each rank started by ``torch.multiprocessing.spawn``.
* ``tests/ddp_driver.py`` (torchrun's target) uses :func:`register_test_models` and :func:`install_crash`.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

TILE = 32


class _TestSeg(nn.Module):
    """Two convolutions, per-pixel logits at full resolution; no BatchNorm."""

    def __init__(self, num_classes: int = 1, width: int = 8, **_):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, num_classes, 1))

    def forward(self, x):
        return self.body(x)


class _TestCls(nn.Module):
    """A strided convolution, global pooling and one logit per tile; no BatchNorm."""

    def __init__(self, num_classes: int = 1, width: int = 8, **_):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 5, stride=4, padding=2)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def register_test_models() -> None:
    """Register ``ddp_test_seg`` / ``ddp_test_cls`` (idempotent)."""
    from models import register_model

    register_model("ddp_test_seg", overwrite=True)(lambda **kw: _TestSeg(**kw))
    register_model("ddp_test_cls", overwrite=True)(lambda **kw: _TestCls(**kw))


def install_crash(spec: str | None) -> None:
    """``spec = 'k:step:n'``: em-round raises at that checkpoint (on rank 0, where the hooks run)."""
    if not spec:
        return
    import pipeline.em as em

    k, step, n = spec.split(":")
    real = em.run_em

    def run_em(*args, hooks=None, **kwargs):
        def crash(kk, st, nn_):
            if (kk, st, nn_) == (int(k), step, int(n)):
                raise RuntimeError(f"test crash at {spec}")

        return real(*args, hooks=em.EMHooks(crash), **kwargs)

    em.run_em = run_em


# --------------------------------------------------------------------------- training scenarios


class _Tiles(Dataset):
    """Deterministic random tiles with pixel targets (some unlabelled = NaN); keys ``(index, seed)``."""

    def __len__(self):
        return 40

    def __getitem__(self, key):
        from pipeline.data import augment_geometric

        i, seed = key
        rng = np.random.default_rng(i)
        img = rng.integers(0, 256, (TILE, TILE, 3), dtype=np.uint8)
        y = (rng.random((TILE, TILE)) < 0.3).astype(np.float32)
        if i % 3 == 0:
            y[:, : TILE // 2] = np.nan  # a region-limited annotation: half the tile unlabelled
        img, y = augment_geometric(seed, (img, y), flip=True, rotate90=True)
        return {"image": img, "target": y.astype(np.float16), "source": 0}


class _Bags(Dataset):
    """Deterministic slides of K = 3 tiles (the last one padded: mask False) with a slide label."""

    def __len__(self):
        return 12

    def __getitem__(self, key):
        i, _seed = key
        rng = np.random.default_rng(100 + i)
        tiles = rng.integers(0, 256, (3, TILE, TILE, 3), dtype=np.uint8)
        mask = np.array([True, True, i % 2 == 0])
        return {"tiles": tiles, "mask": mask, "label": np.float32(i % 2), "slide": i}


class _BrokenTiles(_Tiles):
    """Tile 33 cannot be read (on whichever rank loads it)."""

    def __getitem__(self, key):
        if key[0] == 33:
            raise OSError("tile 33: unreadable")
        return super().__getitem__(key)


# global batches: uneven sizes, and a last stage-2 batch smaller than the world (rank 1 gets a stand-in)
SEG_BATCHES = [[0, 5, 9, 12, 3, 7, 21], [1, 2, 30, 33, 8], [4, 6, 39]]
CLS_BATCHES = [[0, 3, 5], [2, 7, 11, 1], [6]]


def train_scenario(kind: str, d, device) -> dict:
    """Two epochs of the soft_bce (``seg``) or topk_mean (``cls``) trainer on fixed global batches, with
    colour jitter and per-item augmentation; returns the weights and the epoch records."""
    from pipeline.data import SeededBatches, make_loader
    from pipeline.trainers import ColorJitter, SoftBCESegTrainer, TopKMeanSlideTrainer

    torch.manual_seed(0)
    model = _TestSeg() if kind == "seg" else _TestCls()
    cls = SoftBCESegTrainer if kind == "seg" else TopKMeanSlideTrainer
    tr = cls(model, device=device, epochs=2, lr=1e-2, jitter=ColorJitter(0.2, 0.2, 0.2, 0.05), seed=3,
             progress=False, dist=d)
    ds, batches = (_Tiles(), SEG_BATCHES) if kind == "seg" else (_Bags(), CLS_BATCHES)
    tr.fit(lambda e: make_loader(ds, SeededBatches(batches, 7, e), loader_workers=0, device=device, dist=d))
    return {"model": {k: v.detach().cpu().clone() for k, v in tr.model.state_dict().items()},
            "history": [{k: r[k] for k in ("loss", "items", "batches")} for r in tr.history]}


def failure_scenarios(d, device) -> dict:
    """A step that fails on rank 1 only, and a batch that fails to load on rank 1 only (tile 33 sits at
    position 3 of the second global batch): what each rank raises, instead of waiting for ever."""
    from pipeline.data import SeededBatches, make_loader
    from pipeline.trainers import SoftBCESegTrainer

    out = {}
    try:
        with d.agree("a test step"):
            if d.rank == 1:
                raise ValueError("rank 1 broke")
    except Exception as exc:  # noqa: BLE001 -- the test compares what each rank raised
        out["agree"] = f"{type(exc).__name__}: {exc}"
    torch.manual_seed(0)
    tr = SoftBCESegTrainer(_TestSeg(), device=device, epochs=1, progress=False, dist=d)
    try:
        tr.fit(lambda e: make_loader(_BrokenTiles(), SeededBatches(SEG_BATCHES, 7, e), loader_workers=0,
                                     device=device, dist=d))
    except Exception as exc:  # noqa: BLE001
        out["train"] = f"{type(exc).__name__}: {exc}"
    return out


def maps_scenario(d, device, stores: Path, labels: Path, out: Path) -> dict:
    """The E-step's prediction pass of a seeded test model over the cohort, into ``out``."""
    from pipeline.labels import load_cohort
    from pipeline.probmaps import write_probmaps

    cohort = load_cohort(stores, labels)
    torch.manual_seed(1)
    model = _TestSeg()
    return write_probmaps(model, cohort.train + cohort.val, out, tile_px=int(cohort.tiling["tile_px"]),
                          map_stride_px=4, batch_size=16, device=device, loader_workers=0, amp=False, dist=d)


def spawn_main(rank: int, world: int, port: int, out: str, stores: str, labels: str) -> None:
    """One rank (``torch.multiprocessing.spawn``): torchrun's environment, then every scenario."""
    from pipeline.distributed import session

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)})
    torch.set_num_threads(1)
    with session("cpu", timeout_s=120) as (d, device):
        assert d.world == world and d.rank == rank and d.backend == "gloo"
        res = {kind: train_scenario(kind, d, device) for kind in ("seg", "cls")}
        res["maps"] = maps_scenario(d, device, Path(stores), Path(labels), Path(out) / "probmaps.zarr")
        res["failures"] = failure_scenarios(d, device)
    with open(Path(out) / f"result-{rank}.pkl", "wb") as fh:
        pickle.dump(res if rank == 0 else {"failures": res["failures"]}, fh)
