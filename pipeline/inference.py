"""Inference with a trained EM round: theta1 probability maps, top-K selection, theta2 slide score.

The EM loop (E-step, stage 2, validation) and the ``classify`` command use the
same functions, so a slide is scored identically during training and after:

* :func:`iter_predictions` / :func:`predict_tiles` -- theta1 on every tile:
  per-tile maximum pixel probability and a reduced-resolution probability map;
* :func:`classify_tiles` -- theta2 probabilities of given tiles;
* :func:`score_slide` -- slide probability = mean theta2 probability of the
  K tiles with the highest theta1 maximum (Li et al., stage 2);
* :func:`load_round` -- the models and settings of one round of a run directory.

Tiles are read by a DataLoader over the store (``loader_workers`` processes, 0
= in this process) while the model runs; uint8 tiles go to the device and are
scaled to [0, 1] there. On CUDA the forward pass runs under float16 autocast.

Multi-worker / multi-GPU inference: :func:`iter_predictions` takes a list of
``(store, indices)`` sources, so a caller can hand each process (torchrun rank)
its own share of slides -- ``sources[rank::world_size]`` -- and write each
slide's maps independently (per-slide groups in ``probmaps.zarr``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.batch import UsageError
from pipeline.config import Config
from pipeline.run import RunDir, model_from_checkpoint
from pipeline.sampling import topk_tiles
from wsi.store import TileStore

log = logging.getLogger("wsi_pipeline")

__all__ = [
    "RoundModels",
    "resolve_device",
    "load_round",
    "iter_predictions",
    "predict_tiles",
    "classify_tiles",
    "score_slide",
]

def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``'auto'``/None: CUDA if available, else CPU; otherwise the named device."""
    if isinstance(spec, torch.device):
        return spec
    if spec in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"runtime.device={spec!r} but CUDA is not available here; use 'auto' or 'cpu'")
    return dev


@dataclass
class RoundModels:
    """Everything needed to score slides with one round of a run."""

    seg_model: torch.nn.Module
    cls_model: torch.nn.Module
    config: Config
    tiling: dict
    round: int
    device: torch.device
    threshold_at_full_sensitivity: float | None = None
    run_dir: Path | None = None

    @classmethod
    def for_config(cls, seg_model, cls_model, config: Config, tiling: dict, *, round: int, device,
                   threshold_at_full_sensitivity: float | None = None, run_dir: Path | None = None) -> "RoundModels":
        return cls(seg_model, cls_model, config, dict(tiling), int(round), device, threshold_at_full_sensitivity,
                   run_dir)

    @property
    def top_k(self) -> int:
        return self.config.stage2.top_k

    @property
    def map_stride_px(self) -> int:
        return self.config.model.map_stride_px

    @property
    def amp(self) -> bool:
        return self.config.runtime.amp

    @property
    def tile_px(self) -> int:
        return int(self.tiling["tile_px"])

    @property
    def tiling_hash(self) -> str:
        return str(self.tiling["config_hash"])


def load_round(run_dir: str | Path, round: str | int = "best", device=None) -> RoundModels:
    """Load the models of a finished round (``'best'``, ``'last'`` or a round number).

    Raises :class:`pipeline.run.RunFormatError` naming the file when the run directory is not an EM run,
    the round is missing or unfinished, or a checkpoint is unreadable.
    """
    run = RunDir(run_dir)
    meta = run.read_meta()
    k = run.resolve_round(round, meta)
    cfg = run.config(meta)
    dev = resolve_device(device if device is not None else cfg.runtime.device)
    seg, _ = model_from_checkpoint(run.checkpoint(k, "seg"), dev)
    cls, _ = model_from_checkpoint(run.checkpoint(k, "cls"), dev)
    val = run.metrics(k).get("val") or {}
    return RoundModels.for_config(seg, cls, cfg, meta.get("tiling") or {}, round=k, device=dev,
                                  threshold_at_full_sensitivity=val.get("threshold_at_full_sensitivity"),
                                  run_dir=run.path)


# --------------------------------------------------------------------------- theta1


def _as_path(store) -> str:
    return str(store.path if isinstance(store, TileStore) else store)


def _seg_probs(model: torch.nn.Module, x: torch.Tensor, out_stride: int) -> torch.Tensor:
    """(B, h, w) float32 positive probabilities at ``tile / out_stride``."""
    native = int(getattr(model, "output_stride", 1))
    logits = model(x, upsample=False) if native > 1 else model(x)
    p = logits[:, 0].float().sigmoid()
    h = x.shape[-2] // out_stride
    if p.shape[-1] != h:
        if p.shape[-1] % h == 0:
            p = F.avg_pool2d(p[:, None], p.shape[-1] // h)[:, 0]
        else:
            p = F.interpolate(p[:, None], size=(h, h), mode="bilinear", align_corners=False)[:, 0]
    return p


def iter_predictions(
    seg_model: torch.nn.Module,
    sources: Sequence[tuple],
    *,
    batch_size: int = 64,
    device=None,
    loader_workers: int = 0,
    out_stride: int = 4,
    amp: bool = True,
    with_maps: bool = True,
    progress: bool = False,
    desc: str = "predict",
) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray | None]]:
    """theta1 on many tiles, batch by batch, in order.

    Parameters
    ----------
    sources : sequence of (store, indices)
        ``store`` a :class:`TileStore` or its path; ``indices`` the tiles to
        predict (None = all). Batches never mix sources.
    out_stride : int
        Maps are ``tile_px / out_stride`` pixels square.

    Yields
    ------
    (source_index, tile_indices, max_probs, maps)
        ``max_probs`` (n,) float32 = maximum of each (float16) map; ``maps``
        (n, h, w) float16, or None when ``with_maps`` is False.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from pipeline.data import StoreTilesDataset, collate
    from pipeline.trainers import autocast

    dev = resolve_device(device)
    paths, slides, indices = [], [], []
    batches: list[list[int]] = []
    pos = 0
    for s, (store, idx) in enumerate(sources):
        if idx is None:
            n = len(store) if isinstance(store, TileStore) else len(TileStore(store))
            idx = np.arange(n)
        idx = np.asarray(idx, np.int64)
        paths.append(_as_path(store))
        slides.append(np.full(len(idx), s, np.int64))
        indices.append(idx)
        for a in range(0, len(idx), batch_size):
            batches.append(list(range(pos + a, pos + min(a + batch_size, len(idx)))))
        pos += len(idx)
    if pos == 0:
        return
    ds = StoreTilesDataset(paths, np.concatenate(slides), np.concatenate(indices))
    loader = DataLoader(
        ds,
        batch_sampler=batches,
        num_workers=loader_workers,
        collate_fn=collate,
        pin_memory=dev.type == "cuda",
        prefetch_factor=4 if loader_workers > 0 else None,
    )
    was_training = seg_model.training
    seg_model.eval()
    bar = tqdm(total=pos, desc=desc, unit="tile", disable=True if not progress else None, leave=False)
    try:
        with torch.inference_mode():
            for batch in loader:
                x = batch["image"].to(dev, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
                with autocast(dev, amp):
                    p = _seg_probs(seg_model, x, out_stride)
                maps = p.to(torch.float16)
                maxp = maps.amax(dim=(1, 2)).float().cpu().numpy()
                maps_np = maps.cpu().numpy() if with_maps else None
                bar.update(len(maxp))
                yield int(batch["slide"][0]), batch["index"].numpy(), maxp, maps_np
    finally:
        bar.close()
        seg_model.train(was_training)


def predict_tiles(
    seg_model: torch.nn.Module,
    store: TileStore | str | Path,
    *,
    batch_size: int = 64,
    device=None,
    loader_workers: int = 0,
    out_stride: int = 4,
    indices=None,
    amp: bool = True,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """theta1 on the tiles of one store.

    Returns
    -------
    max_probs : (N,) float32
        Each tile's maximum pixel probability.
    prob_maps : (N, h, w) float16
        Probability maps at ``tile_px / out_stride``.
    """
    st = store if isinstance(store, TileStore) else TileStore(store)
    idx = np.arange(len(st)) if indices is None else np.asarray(indices, np.int64)
    h = st.tile_px // out_stride
    maxp = np.zeros(len(idx), np.float32)
    maps = np.zeros((len(idx), h, h), np.float16)
    pos = 0
    for _, _, mp, mm in iter_predictions(
        seg_model, [(st, idx)], batch_size=batch_size, device=device, loader_workers=loader_workers,
        out_stride=out_stride, amp=amp, progress=progress,
    ):
        maxp[pos : pos + len(mp)] = mp
        maps[pos : pos + len(mp)] = mm
        pos += len(mp)
    return maxp, maps


# --------------------------------------------------------------------------- theta2


def classify_tiles(
    cls_model: torch.nn.Module,
    store: TileStore | str | Path,
    indices,
    *,
    batch_size: int = 64,
    device=None,
    amp: bool = True,
) -> np.ndarray:
    """theta2 probabilities (float32) of the given tiles of one store (no augmentation)."""
    from pipeline.trainers import autocast

    from wsi.store import FastTileReader

    st = store if isinstance(store, TileStore) else TileStore(store)
    reader = FastTileReader(st)
    idx = np.asarray(indices, np.int64).reshape(-1)
    dev = resolve_device(device)
    out = np.zeros(len(idx), np.float32)
    was_training = cls_model.training
    cls_model.eval()
    try:
        with torch.inference_mode():
            for a in range(0, len(idx), batch_size):
                tiles = torch.from_numpy(np.stack([reader[int(i)] for i in idx[a : a + batch_size]]))
                x = tiles.to(dev).permute(0, 3, 1, 2).float().div_(255.0)
                with autocast(dev, amp):
                    logits = cls_model(x)
                out[a : a + len(tiles)] = logits.float().reshape(len(tiles)).sigmoid().cpu().numpy()
    finally:
        cls_model.train(was_training)
    return out


def score_slide(
    round_models: RoundModels,
    store: TileStore | str | Path,
    *,
    batch_size: int = 64,
    loader_workers: int = 0,
    tile_max_probs: np.ndarray | None = None,
    prob_maps: np.ndarray | None = None,
    progress: bool = False,
) -> dict:
    """Slide probability: by default (``stage2.slide_score: theta2``, the paper) the mean theta2
    probability over theta1's top-K tiles; ``theta1_max`` / ``theta1_topk_mean`` use theta1 alone.
    All three are returned in ``slide_scores``.

    ``tile_max_probs`` (and ``prob_maps``) may be passed when theta1 already ran on
    the slide (the EM loop reuses its E-step maps); otherwise theta1 runs here.

    Returns
    -------
    dict
        ``probability`` (float; NaN for a slide without tiles), ``topk_indices``
        (tile indices, highest theta1 maximum first), ``topk_scores`` (theta2
        probability of each), ``topk_max_probs`` (their theta1 maxima),
        ``tile_max_probs`` (N,), ``prob_maps`` ((N, h, w) float16 or None), ``n_tiles``.
    """
    rm = round_models
    st = store if isinstance(store, TileStore) else TileStore(store)
    if tile_max_probs is None:
        tile_max_probs, prob_maps = predict_tiles(
            rm.seg_model, st, batch_size=batch_size, device=rm.device, loader_workers=loader_workers,
            out_stride=rm.map_stride_px, amp=rm.amp, progress=progress,
        )
    tile_max_probs = np.asarray(tile_max_probs, np.float32)
    top = topk_tiles(tile_max_probs, rm.top_k)
    scores = classify_tiles(rm.cls_model, st, top, batch_size=batch_size, device=rm.device, amp=rm.amp)
    nan = float("nan")
    slide_scores = {
        "theta2": float(scores.mean()) if len(scores) else nan,
        "theta1_max": float(tile_max_probs.max()) if len(tile_max_probs) else nan,
        "theta1_topk_mean": float(tile_max_probs[top].mean()) if len(top) else nan,
    }
    return {
        "probability": slide_scores[rm.config.stage2.slide_score],
        "slide_scores": slide_scores,
        "topk_indices": top,
        "topk_scores": scores,
        "topk_max_probs": tile_max_probs[top],
        "tile_max_probs": tile_max_probs,
        "prob_maps": prob_maps,
        "n_tiles": int(len(tile_max_probs)),
    }
