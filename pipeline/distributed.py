"""Running under torchrun: the one owner of the process group, ranks, barriers and sharding.

``torchrun --nproc-per-node N wsi-pipeline em-round ...`` (or ``classify``) starts N
processes with ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in their environment
(several nodes: ``--nnodes`` and a rendezvous endpoint, the same variables).
:func:`session` reads them: with ``WORLD_SIZE`` > 1 it joins the process group
(NCCL on CUDA, gloo on CPU), gives each rank the GPU of its ``LOCAL_RANK``, and
silences the log of every rank but 0; otherwise it hands back :data:`SINGLE`, on
which every helper below is a plain call, so one process behaves exactly as it
did before this module existed.

The rules every distributed step follows (:class:`Dist`):

* **Rank 0 writes** the run's shared files (``run.json``, ``best``, checkpoints,
  ``metrics.json``, the classify report) and decides from the file system (does a
  checkpoint exist?); :meth:`Dist.main_only` runs such a step on rank 0 and hands
  its result -- or its error -- to every rank, which doubles as the barrier.
* **Work is sharded by slide** (:meth:`Dist.shard`: largest first onto the least
  loaded rank, by tile count) and results come back with :meth:`Dist.gather` /
  :meth:`Dist.map_shards`; each rank writes only its own slides' files.
* **A failure never hangs the others**: a step without collectives inside runs
  under :meth:`Dist.agree`, which all-reduces an error flag at its end, so every
  rank stops with it; training all-reduces such flags at every step, before the
  forward pass and with the loss (:mod:`pipeline.trainers`). What still waits -- a
  rank killed outright -- ends with
  the process group's timeout (``runtime.dist_timeout_s``), or sooner because
  torchrun stops every worker when one exits.
* **Training** wraps the model in ``DistributedDataParallel``; each rank takes the
  slice ``batch[rank::world]`` of every global batch of the one seeded sampler
  (:class:`ShardedBatches`), so the global batch and its 2:1:7 composition are the
  single process's. On CUDA BatchNorm layers become ``SyncBatchNorm`` (statistics
  over the global batch); torch has no CPU SyncBatchNorm, so on CPU each rank
  normalises with its own slice's statistics (see docs/design.md for what that
  changes).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

log = logging.getLogger("wsi_pipeline")

__all__ = ["Dist", "SINGLE", "RankFailed", "ShardedBatches", "session", "env_world_size", "env_rank",
           "is_main_process", "shard_indices", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 1800


class RankFailed(RuntimeError):
    """Another rank failed; this one stops with it (the failing rank's log says why)."""


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when absent)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def env_rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def is_main_process() -> bool:
    """Whether this process is rank 0 (or the only one); readable before the process group exists."""
    return env_rank() == 0


def shard_indices(weights: Sequence[float], world: int) -> list[list[int]]:
    """Indices ``0..n-1`` split over ``world`` ranks, balanced by ``weights``.

    Largest weight first (ties: lower index), each onto the rank with the least weight so far
    (ties: lower rank); each rank's indices in ascending order. Deterministic: every rank computes
    the same split from the same weights."""
    load = [0.0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(weights)), key=lambda i: (-float(weights[i]), i)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[r].append(i)
        load[r] += float(weights[i])
    return [sorted(o) for o in out]


def _error_of(exc: BaseException) -> tuple[str, str]:
    """What other ranks need to re-raise ``exc``: its kind and its one line."""
    from pipeline.batch import UsageError
    from pipeline.config import ConfigError

    kind = "config" if isinstance(exc, ConfigError) else "usage" if isinstance(exc, UsageError) else "other"
    return kind, str(exc) if kind != "other" else f"{type(exc).__name__}: {exc}"


def _raise_from(kind: str, msg: str, where: str):
    from pipeline.batch import UsageError
    from pipeline.config import ConfigError

    if kind == "config":
        raise ConfigError(msg)
    if kind == "usage":
        raise UsageError(msg)
    raise RankFailed(f"{where} failed ({msg}); this rank stops too")


@dataclass(frozen=True)
class Dist:
    """This process's place among the ranks (``world == 1``: the single-process run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: Any = field(default=None, compare=False)  # where collectives put their tensors

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- agreement ----------------------------------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as tdist

            tdist.barrier()

    def main_only(self, fn: Callable[[], Any], what: str = "rank 0") -> Any:
        """``fn()`` on rank 0; every rank returns its (picklable) result or raises its error
        (a UsageError / ConfigError as itself, anything else as :class:`RankFailed`). A barrier too."""
        if not self.enabled:
            return fn()
        import torch.distributed as tdist

        result, err, payload = None, None, [None]
        if self.is_main:
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 -- handed to every rank, then re-raised
                err = exc
            payload = [(None, _error_of(err)) if err is not None else (result, None)]
        tdist.broadcast_object_list(payload, src=0)
        if err is not None:
            raise err
        result, failure = payload[0]
        if failure is not None:
            _raise_from(*failure, where=what)
        return result

    @contextlib.contextmanager
    def agree(self, what: str) -> Iterator[None]:
        """Run a step without collectives inside; at its end every rank learns whether any rank
        failed, and then all raise (the failing rank its own error)."""
        if not self.enabled:
            yield
            return
        err = None
        try:
            yield
        except BaseException as exc:  # noqa: BLE001 -- re-raised below, after the others know
            err = exc
        failures = self.gather(None if err is None else _error_of(err))
        if err is not None:
            raise err
        bad = [(r, f) for r, f in enumerate(failures) if f is not None]
        if bad:
            r, (kind, msg) = bad[0]
            _raise_from(kind, msg, where=f"{what} on rank {r}")

    @contextlib.contextmanager
    def held_by_main(self, make: Callable[[], Any]) -> Iterator[Any]:
        """A context (a folder lock, a batch run) that rank 0 alone enters and leaves; its errors
        reach every rank. Yields what rank 0's ``__enter__`` returned (None elsewhere)."""
        cm = make() if self.is_main else contextlib.nullcontext()
        held: dict = {}

        def enter() -> None:
            held["value"] = cm.__enter__()

        self.main_only(enter, what="rank 0 taking its lock")
        try:
            yield held.get("value")
        except BaseException:
            info = sys.exc_info()
            self.main_only(lambda: cm.__exit__(*info), what="rank 0 releasing its lock")
            raise
        self.main_only(lambda: cm.__exit__(None, None, None), what="rank 0 finishing")

    # -- sharding and gathering ---------------------------------------------------------
    def shard(self, items: Sequence, weights: Sequence[float] | None = None) -> list:
        """This rank's share of ``items``: ``items[rank::world]``, or balanced by ``weights``."""
        if not self.enabled:
            return list(items)
        if weights is None:
            return list(items)[self.rank :: self.world]
        return [items[i] for i in shard_indices(weights, self.world)[self.rank]]

    def gather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        import torch.distributed as tdist

        out: list = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def map_shards(self, items: Sequence, fn: Callable[[list], list], weights: Sequence[float] | None = None,
                   what: str = "a sharded step") -> list:
        """``fn`` on this rank's share of ``items`` (it returns one result per item, in order); the
        results of all ranks come back in the order of ``items``, on every rank."""
        if not self.enabled:
            return list(fn(list(items)))
        idx = list(range(len(items)))
        mine = self.shard(idx, weights)
        with self.agree(what):
            res = list(fn([items[i] for i in mine]))
        out: list = [None] * len(items)
        for ids, vals in self.gather((mine, res)):
            for i, v in zip(ids, vals):
                out[i] = v
        return out

    def all_reduce_sum(self, tensor) -> None:
        if self.enabled:
            import torch.distributed as tdist

            tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)

    # -- models -------------------------------------------------------------------------
    def prepare_model(self, model):
        """BatchNorm -> SyncBatchNorm on CUDA (global-batch statistics); unchanged on CPU, where
        torch has no SyncBatchNorm and each rank normalises with its own slice."""
        import torch

        if self.enabled and self.device is not None and self.device.type == "cuda":
            return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def wrap(self, model):
        """``DistributedDataParallel`` around ``model`` (already on this rank's device)."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def sync_buffers(self, model) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank, so every rank holds the
        model rank 0 saves."""
        if not self.enabled:
            return
        import torch.distributed as tdist

        for buf in model.buffers():
            tdist.broadcast(buf.data, src=0)

    def describe(self) -> dict:
        return {"world_size": self.world, "backend": self.backend,
                "batchnorm": "sync" if self.device is not None and self.device.type == "cuda" else "per-rank"}


SINGLE = Dist()


# --------------------------------------------------------------------------- the process group


def rank_device(spec, local_rank: int):
    """The device of the rank with ``local_rank``: its own GPU (``auto`` with CUDA, ``cuda``), or the CPU."""
    import torch

    from pipeline.batch import UsageError

    spec = "auto" if spec in (None, "") else str(spec)
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if spec not in ("auto", "cuda"):
        raise UsageError(f"device {spec!r}: under torchrun each rank uses the GPU of its LOCAL_RANK; use 'auto', "
                         "'cuda' or 'cpu' (runtime.device / --device)")
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise UsageError(f"LOCAL_RANK {local_rank} but this node has {n} GPU(s); start at most {n} processes per "
                         "node (torchrun --nproc-per-node) or use the CPU (device 'cpu')")
    return torch.device("cuda", local_rank)


def _quiet_this_rank() -> None:
    """Ranks other than 0 log errors only, and not to the log file (rank 0 writes it)."""
    root = logging.getLogger("wsi_pipeline")
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, logging.FileHandler)]
    root.setLevel(logging.ERROR)


@contextlib.contextmanager
def session(device_spec="auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[tuple[Dist, Any]]:
    """``(Dist, device)`` for one command: the process group from torchrun's environment when
    ``WORLD_SIZE`` > 1 (joined here and left at the end, unless the caller joined it already),
    else :data:`SINGLE` and the device ``device_spec`` names."""
    world = env_world_size()
    if world <= 1:
        from pipeline.inference import resolve_device

        yield SINGLE, resolve_device(device_spec)
        return
    import torch
    import torch.distributed as tdist

    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    device = rank_device(device_spec, local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    owner = not tdist.is_initialized()
    if owner:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tdist.init_process_group(backend, timeout=_dt.timedelta(seconds=float(timeout_s)))
    d = Dist(tdist.get_rank(), tdist.get_world_size(), local, tdist.get_backend(), device)
    if not d.is_main:
        _quiet_this_rank()
    log.info("torchrun: %d ranks (%s), rank 0 on %s", d.world, d.backend, device)
    try:
        yield d, device
    finally:
        if owner:
            tdist.destroy_process_group()


# --------------------------------------------------------------------------- batches


class ShardedBatches:
    """Each rank's slice of every global batch of a batch sampler.

    ``inner`` yields global batches (lists of dataset keys, e.g. ``(index, seed)`` from
    :class:`pipeline.data.SeededBatches`); this yields ``batch[rank::world]``, each key extended by
    its position in the global batch and the global batch's size (``(index, seed, pos, size)``), which
    the trainers need to draw their per-item randomness and to scale the loss (:mod:`pipeline.trainers`).
    A rank whose slice would be empty (a global batch smaller than the world) gets the batch's first
    item with position -1: the trainers give it weight 0, so every rank still joins the gradient
    all-reduce.
    """

    def __init__(self, inner, rank: int, world: int):
        self.inner, self.rank, self.world = inner, int(rank), int(world)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        for batch in self.inner:
            keys = [k if isinstance(k, (tuple, list)) else (k, None) for k in batch]
            n = len(keys)
            mine = [(*keys[p][:2], p, n) for p in range(self.rank, n, self.world)]
            yield mine or [(*keys[0][:2], -1, n)]
