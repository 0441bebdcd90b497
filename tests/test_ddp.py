"""em-round and classify under torchrun: real torch.distributed (gloo on CPU), real processes.

In-process tests check the pieces (shards, the slices of a global batch, colour jitter of a slice,
loss terms whose scaled gradients add up to the one-process gradient). One spawn of two ranks checks
the trainers and the E-step's prediction pass against one process. The slow tests start the CLI under
``python -m torch.distributed.run`` (torchrun) on the tiny config: two ranks against one, a crash and
a resume with another world size, and classify.

What "the same" means here. The E-step's maps and classify's predictions are computed slide by slide
by the same code whatever the rank, so they are equal *exactly* -- given the same number of torch threads
per process (one here): torch's CPU convolutions sum in an order that depends on it, which moves the last
bits of a probability. Training is equal up to float
reduction order: a rank sums its slice and the all-reduce adds the two sums, where one process sums
the whole batch at once; these test models have no BatchNorm, and their weights agree to ~1e-6. With
BatchNorm on CPU (the tiny DLAs) each rank normalises its slice with its own statistics (torch's
SyncBatchNorm is CUDA-only), which is a different training: those runs are checked to complete, to
resume and to record it, not to equal one process.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pipeline.distributed import SINGLE, Dist, ShardedBatches, shard_indices  # noqa: E402
from tests import ddp_helpers  # noqa: E402
from tests.em_fixtures import em_threads  # noqa: E402,F401  (one torch thread, as each rank has: CPU sums depend on it)

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- pieces, in this process


def test_shards_cover_every_item_once_and_balance_tiles():
    weights = [50, 3, 40, 7, 7, 30, 0, 12]
    for world in (1, 2, 3):
        parts = shard_indices(weights, world)
        assert sorted(i for p in parts for i in p) == list(range(len(weights)))
        assert all(p == sorted(p) for p in parts)
        loads = [sum(weights[i] for i in p) for p in parts]
        assert max(loads) - min(loads) <= max(weights)
    assert shard_indices(weights, 2) == [[0, 3, 4, 7], [1, 2, 5, 6]]  # 50+7+7+12 = 76, 40+30+3+0 = 73
    items = list("abcdefg")
    assert Dist(1, 3).shard(items) == ["b", "e"] and SINGLE.shard(items) == items


def test_each_rank_takes_its_slice_of_the_same_global_batch():
    """The 2:1:7 batches of one seeded sampler, sliced over 1, 2 and 3 ranks: the slices put back
    together are the global batch (keys, augmentation seeds and order), so its composition is one process's."""
    from pipeline.data import SeededBatches
    from pipeline.sampling import MixedBatchSampler

    sampler = MixedBatchSampler((12, 5, 40), batch_size=10, seed=4)
    flat = sampler.as_flat_indices()
    whole = list(SeededBatches(flat, 9, epoch=2))
    for world in (1, 2, 3):
        slices = [list(ShardedBatches(SeededBatches(flat, 9, epoch=2), r, world)) for r in range(world)]
        for b, batch in enumerate(whole):
            keys = sorted((k for s in slices for k in s[b]), key=lambda k: k[2])
            assert [k[:2] for k in keys] == batch and [k[2] for k in keys] == list(range(10))
            assert {k[3] for k in keys} == {10}
            src = [0 if i < 12 else 1 if i < 17 else 2 for i, _ in batch]
            assert [src.count(s) for s in range(3)] == [2, 1, 7]
    # a global batch smaller than the world: the rank without items gets a stand-in of weight 0
    assert list(ShardedBatches([[(4, 11)]], 1, 2)) == [[(4, 11, -1, 1)]]


def test_colour_jitter_of_a_slice_is_that_of_the_whole_batch():
    from pipeline.trainers import ColorJitter

    x = torch.rand(7, 3, 8, 8)
    j = ColorJitter(0.3, 0.3, 0.3, 0.05)
    whole = j(x, torch.Generator().manual_seed(5))
    for rows in ([1, 4], [0, 3, 6], [2]):
        r = torch.tensor(rows)
        part = j(x[r], torch.Generator().manual_seed(5), (r, 7))
        assert torch.equal(part, whole[r])


def _batch(ds, keys, total=None):
    from pipeline.data import PositionedDataset, collate

    if total is None:
        return collate([ds[k] for k in keys])
    return collate([PositionedDataset(ds)[k] for k in keys])


@pytest.mark.parametrize("kind", ["seg", "cls"])
def test_scaled_loss_terms_add_up_to_the_one_process_gradient(kind):
    """What DDP computes, without processes: each slice's gradient of ``sum * world / global count``,
    averaged over the ranks, is the gradient of the whole batch's mean loss (NaN-unlabelled pixels,
    uneven slices and an empty slice's stand-in included)."""
    from pipeline.trainers import SoftBCESegTrainer, TopKMeanSlideTrainer

    torch.manual_seed(0)
    model = ddp_helpers._TestSeg() if kind == "seg" else ddp_helpers._TestCls()
    cls = SoftBCESegTrainer if kind == "seg" else TopKMeanSlideTrainer
    tr = cls(model, device=torch.device("cpu"), progress=False)
    ds = ddp_helpers._Tiles() if kind == "seg" else ddp_helpers._Bags()
    keys = [(i, None) for i in ([0, 3, 6, 1, 9] if kind == "seg" else [0, 3])]

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    loss, _ = tr.compute_loss(_batch(ds, keys), torch.Generator().manual_seed(1))
    want = grads(loss)
    world = 3  # slices of 2, 2, 1 items (seg) or 1, 1 and a stand-in (cls)
    slices = [[(*keys[p], p, len(keys)) for p in range(r, len(keys), world)] or [(*keys[0], -1, len(keys))]
              for r in range(world)]
    terms = [tr.loss_terms(_batch(ds, s, len(keys)), torch.Generator().manual_seed(1)) for s in slices]
    count = sum(float(c) for _, c in terms)
    got = None
    for s, (num, _) in zip(slices, terms):
        g = grads(num * world / count)
        got = g if got is None else [a + b for a, b in zip(got, g)]
    for a, b in zip(want, got):
        torch.testing.assert_close(b / world, a, rtol=1e-5, atol=1e-7)
    assert abs(sum(float(n.detach()) for n, _ in terms) / count - float(loss.detach())) < 1e-6


def test_a_rank_under_torchrun_gets_its_own_device_and_is_told_off_a_shared_one(monkeypatch):
    from pipeline.batch import UsageError
    from pipeline.distributed import rank_device

    assert rank_device("cpu", 1).type == "cpu"
    with pytest.raises(UsageError, match="LOCAL_RANK"):
        rank_device("cuda:1", 0)
    if not torch.cuda.is_available():
        assert rank_device("auto", 3).type == "cpu"


# --------------------------------------------------------------------------- two real ranks (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    """Four generated slides of 640 px at 2 um/px, tiled with the tiny config (~30 tiles each)."""
    from pipeline.config import load_config
    from pipeline.tile import run_tile
    from wsi.synth import make_cohort

    d = tmp_path_factory.mktemp("ddp_cohort")
    make_cohort(d / "slides", n_positive=2, n_negative=2, width_px=640, height_px=640, mpp=2.0, seed=5,
                split=(0.5, 0.5, 0.0), workers=1)
    rep = run_tile(sorted((d / "slides").glob("*.tif")), d / "stores", load_config("tiny"), workers=0, quiet=True,
                   progress=False)
    assert rep.ok, rep.summary()
    return d / "stores", d / "slides" / "labels.csv"


@pytest.fixture(scope="module")
def two_ranks(small_cohort, tmp_path_factory):
    """One spawn of two gloo ranks running every scenario of tests/ddp_helpers.py."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("two_ranks")
    stores, labels = small_cohort
    mp.spawn(ddp_helpers.spawn_main, args=(2, _free_port(), str(out), str(stores), str(labels)), nprocs=2, join=True)
    res = []
    for rank in (0, 1):
        with open(out / f"result-{rank}.pkl", "rb") as fh:
            res.append(pickle.load(fh))
    res[0]["failures_of_rank_1"] = res[1]["failures"]
    return out, res[0]


@pytest.mark.parametrize("kind", ["seg", "cls"])
def test_two_ranks_train_what_one_process_trains(two_ranks, kind, em_threads):
    """soft_bce (uneven slices, unlabelled pixels) and topk_mean (a last batch smaller than the world):
    the global loss, item counts and weights of two ranks are one process's, up to float reduction order."""
    _, res = two_ranks
    one = ddp_helpers.train_scenario(kind, SINGLE, torch.device("cpu"))
    two = res[kind]
    assert [h["items"] for h in two["history"]] == [h["items"] for h in one["history"]]
    assert [h["batches"] for h in two["history"]] == [3, 3]
    np.testing.assert_allclose([h["loss"] for h in two["history"]], [h["loss"] for h in one["history"]], rtol=1e-5)
    for key, w in one["model"].items():
        torch.testing.assert_close(two["model"][key], w, rtol=1e-4, atol=1e-6)


def test_two_ranks_write_the_maps_one_process_writes(two_ranks, small_cohort, tmp_path, em_threads):
    """The E-step's prediction pass sharded over two ranks: every slide's maps and maxima are
    byte-equal to one process's, and the Zarr is complete and in place."""
    import zarr

    out, res = two_ranks
    stores, labels = small_cohort
    one = ddp_helpers.maps_scenario(SINGLE, torch.device("cpu"), stores, labels, tmp_path / "probmaps.zarr")
    a, b = zarr.open_group(str(tmp_path / "probmaps.zarr"), mode="r"), zarr.open_group(str(out / "probmaps.zarr"), mode="r")
    assert sorted(a.group_keys()) == sorted(b.group_keys()) and len(list(a.group_keys())) == 4
    assert b.attrs["complete"] and not (out / ".probmaps.zarr.partial").exists()
    for sid in a.group_keys():
        np.testing.assert_array_equal(a[sid]["maps"][:], b[sid]["maps"][:])
        np.testing.assert_array_equal(a[sid]["max_prob"][:], b[sid]["max_prob"][:])
        assert b[sid].attrs["complete"]
    maps = res["maps"]
    assert maps["tiles"] == one["tiles"] and sum(r["tiles"] for r in maps["ranks"]) == one["tiles"]
    assert all(r["tiles"] > 0 for r in maps["ranks"])


# --------------------------------------------------------------------------- the CLI under torchrun (slow)


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _cli(args, *, ranks: int = 1, timeout: int = 900, **env) -> subprocess.CompletedProcess:
    """tests/ddp_driver.py (the CLI with the test models) in one process, or under torchrun with ``ranks``."""
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else []
    driver = [str(ROOT / "tests" / "ddp_driver.py"), *(["--"] if ranks > 1 else []), *[str(a) for a in args]]
    return subprocess.run([sys.executable, *launch, *driver], env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def ddp_labels(tmp_path_factory):
    """A subset of the EM tests' cohort (2 annotated, 1 other positive and 2 negative train slides, 2 val)."""
    from pipeline.labels import read_labels_csv
    from tests.em_fixtures import build_em_cohort

    cohort = build_em_cohort(tmp_path_factory.getbasetemp())
    rows = read_labels_csv(cohort.labels)
    ann = set(cohort.annotated_ids)
    keep = [r for r in rows if r[0] in ann]
    keep += [r for r in rows if r[2] == "train" and r[1] == 1 and r[0] not in ann][:1]
    keep += [r for r in rows if r[2] == "train" and r[1] == 0][:2]
    keep += [r for r in rows if r[2] == "val" and r[1] == 1][:1] + [r for r in rows if r[2] == "val" and r[1] == 0][:1]
    path = tmp_path_factory.mktemp("ddp_labels") / "labels.csv"
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([("slide_id", "label", "split"), *keep])
    return cohort, path


def _em_args(cohort, labels, run, *sets) -> list:
    args = ["em-round", "--stores", cohort.stores, "--labels", labels, "--run", run, "--config", "tiny", "--rounds", 2,
            "--set", "em.epochs_init=2", "--set", "em.epochs=2", "--set", "em.batches_per_epoch=3",
            "--set", "stage2.epochs=2", "--set", "em.heatmap_slides=1"]
    for a in cohort.annotations:
        args += ["--annotations", a]
    for s in sets:
        args += ["--set", s]
    return args


@pytest.mark.slow
def test_em_round_on_two_ranks_trains_what_one_process_trains(ddp_labels, tmp_path):
    """Two rounds (round 0, E-step, M-step, stage 2) of BatchNorm-free models: two ranks against one
    process. Weights and losses agree up to float reduction order, maps to one float16 step (the maps of
    weights that differ in the last float32 bits round to the same float16 nearly everywhere)."""
    cohort, labels = ddp_labels
    models = ("model.seg_arch=ddp_test_seg", "model.cls_arch=ddp_test_cls")
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = _cli(_em_args(cohort, labels, one, *models))
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = _cli(_em_args(cohort, labels, two, *models), ranks=2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "torchrun: 2 ranks (gloo)" in r2.stderr and r2.stderr.count("em-round (mixed): ran round(s) 0, 1") == 1
    for k in (0, 1):
        for name in ("seg.pt", "cls.pt"):
            a = torch.load(one / f"round_{k}" / name, weights_only=False)
            b = torch.load(two / f"round_{k}" / name, weights_only=False)
            assert [h["items"] for h in a["history"]] == [h["items"] for h in b["history"]]
            np.testing.assert_allclose([h["loss"] for h in b["history"]], [h["loss"] for h in a["history"]], rtol=1e-4)
            for key, w in a["model"].items():
                torch.testing.assert_close(b["model"][key], w, rtol=1e-3, atol=1e-5, msg=f"round {k} {name} {key}")
        ma = json.loads((one / f"round_{k}" / "metrics.json").read_text())
        mb = json.loads((two / f"round_{k}" / "metrics.json").read_text())
        assert mb["distributed"] == {"world_size": 2, "backend": "gloo", "batchnorm": "per-rank"}
        assert "distributed" not in ma
        assert mb["stage2_loss"] == pytest.approx(ma["stage2_loss"], rel=1e-3)
        if k:
            for key in ("pseudo_positive_tiles", "hard_negative_tiles", "hard_negative_pools"):
                assert ma["e_step"][key] == mb["e_step"][key]
        _assert_maps_close(one / f"round_{k}" / "probmaps.zarr", two / f"round_{k}" / "probmaps.zarr")
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())


def _assert_maps_close(a: Path, b: Path) -> None:
    import zarr

    za, zb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert sorted(za.group_keys()) == sorted(zb.group_keys())
    for sid in za.group_keys():
        x, y = za[sid]["maps"][:].astype(np.float32), zb[sid]["maps"][:].astype(np.float32)
        assert np.abs(x - y).max() <= 1e-3 and (x != y).mean() < 0.01, sid


@pytest.mark.slow
def test_a_failed_rank_stops_both_and_one_process_resumes_the_run_and_classify_agrees(ddp_labels, tmp_path):
    """The tiny DLAs (BatchNorm: per-rank statistics on CPU). Round 1's M-step crashes on rank 0 after
    its first checkpoint: both ranks stop (none waits for ever); one process resumes the run from that
    checkpoint. Then classify on two ranks writes the predictions one process writes."""
    cohort, labels = ddp_labels
    run = tmp_path / "run"
    crashed = _cli(_em_args(cohort, labels, run), ranks=2, WSI_TEST_CRASH_AT="1:seg:1")
    assert crashed.returncode != 0
    assert "test crash at 1:seg:1" in crashed.stderr and "this rank stops too" in crashed.stderr
    m0 = json.loads((run / "round_0" / "metrics.json").read_text())
    assert m0["distributed"]["batchnorm"] == "per-rank" and (run / "round_1" / "state" / "seg_train.pt").is_file()
    assert not (run / ".wsi-pipeline.lock").exists()

    resumed = _cli(_em_args(cohort, labels, run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "round 1: resuming theta1 training after epoch 1/2" in resumed.stderr
    assert "round 0 is complete; skipped" in resumed.stderr
    m1 = json.loads((run / "round_1" / "metrics.json").read_text())
    assert "distributed" not in m1 and [e["epoch"] for e in m1["seg"]["epochs"]] == [1, 2]
    assert json.loads((run / "run.json").read_text())["rounds_completed"] == [0, 1]

    one = _cli(["classify", cohort.stores, "--run", run, "--out", tmp_path / "c1", "--threshold", 0.5, "--quiet"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _cli(["classify", cohort.stores, "--run", run, "--out", tmp_path / "c2", "--threshold", 0.5, "--quiet"],
               ranks=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stderr.count("classify: 20 done") == 1  # rank 0 alone reports
    a, b = _predictions(tmp_path / "c1"), _predictions(tmp_path / "c2")
    assert a == b and len(a) == 20
    r2 = json.loads((tmp_path / "c2" / "classify-report.json").read_text())
    assert r2["counts"] == {"done": 20, "skipped": 0, "failed": 0} and r2["settings"]["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "c1").iterdir()) == sorted(p.name for p in (tmp_path / "c2").iterdir())


def _predictions(out: Path) -> list[dict]:
    with open(out / "predictions.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if k != "scored_utc"} for row in csv.DictReader(fh)]


def test_a_rank_that_fails_stops_the_other(two_ranks):
    """A shared step and a training batch fail on rank 1 only: rank 1 raises its own error, rank 0 a
    RankFailed naming where; both returned (the spawn joined) instead of waiting for ever."""
    _, res = two_ranks
    r0, r1 = res["failures"], res["failures_of_rank_1"]
    assert r1["agree"] == "ValueError: rank 1 broke"
    assert r0["agree"].startswith("RankFailed: a test step on rank 1 failed (ValueError: rank 1 broke)")
    assert r1["train"] == "OSError: tile 33: unreadable"
    assert r0["train"].startswith("RankFailed: train: another rank could not load its batch in epoch 1, batch 1")
