"""theta1 probability maps of a round: written once per round, read by the E-step, stage 2 and heatmaps.

Layout of ``round_k/probmaps.zarr`` (Zarr v3)::

    <slide_id>/maps      (N, h, h) float16, h = tile_px / map_stride_px; one tile per chunk,
                         SHARD_TILES tiles per shard file
    <slide_id>/max_prob  (N,) float32, each tile's maximum (of the float16 map)
    attrs: format, tile_px, map_stride_px, round, complete; per slide label, split, n_tiles, complete

The Zarr is built as ``.probmaps.zarr.partial`` beside its final name; slides
already complete there are kept (resume per slide), and it is renamed into
place when every slide is done.

Under torchrun each rank predicts its share of the slides still to do (balanced by
tile count, :meth:`pipeline.distributed.Dist.shard`) and writes their groups into the
one ``.partial`` Zarr (sibling groups: no two ranks write the same file); rank 0
creates the root before and renames it into place after every rank is done.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.distributed import SINGLE, Dist
from pipeline.labels import SlideEntry
from wsi.atomic import fsync_dir

__all__ = ["PROBMAPS_FORMAT", "SHARD_TILES", "write_probmaps", "read_max_probs", "read_maps", "write_round_heatmaps"]

PROBMAPS_FORMAT = "wsi-pipeline.probmaps"
SHARD_TILES = 256


def read_max_probs(probmaps: str | Path, slide_id: str, n_tiles: int | None = None) -> np.ndarray:
    """(N,) float32 maximum theta1 probability of each tile of a slide; with ``n_tiles``, a map count
    that differs from the slide's store is an error (its maps would land on the wrong tiles)."""
    import zarr

    from pipeline.batch import UsageError

    out = np.asarray(zarr.open_array(str(Path(probmaps) / slide_id / "max_prob"), mode="r")[:], np.float32)
    if n_tiles is not None and len(out) != n_tiles:
        raise UsageError(f"{Path(probmaps) / slide_id}: {len(out)} tile maps, but the slide's store has {n_tiles} "
                         "tiles: the store changed after this round predicted it; re-tile consistently and train "
                         "a new --run directory")
    return out


def read_maps(probmaps: str | Path, slide_id: str, tiles: np.ndarray | None = None) -> np.ndarray:
    """(n, h, h) float32 maps of the given tiles of a slide (all tiles when ``tiles`` is None)."""
    import zarr

    arr = zarr.open_array(str(Path(probmaps) / slide_id / "maps"), mode="r")
    if tiles is None:
        return np.asarray(arr[:], np.float32)
    tiles = np.asarray(tiles, np.int64)
    if not len(tiles):
        return np.zeros((0, *arr.shape[1:]), np.float32)
    return np.asarray(arr.get_orthogonal_selection((tiles,)), np.float32)


def _group_complete(path: Path) -> bool:
    """Whether a slide's group is complete, from its ``zarr.json`` directly (cheap)."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(meta.get("attributes", {}).get("complete"))


class _MapWriter:
    """All Zarr work of :func:`write_probmaps`, in order, on one background thread.

    Maps arrive batch by batch; per slide they are buffered until a shard is full,
    so each shard file is written whole, once. A slide is marked complete only
    after all its maps are written.
    """

    def __init__(self, root, part: Path, h: int, on_slide: Callable[[int], None] | None, done_slides: int):
        self.root, self.part, self.h = root, part, h
        self.on_slide, self.done_slides = on_slide, done_slides
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="probmaps-writer")
        self.pending: deque = deque()  # (future, slide finished by it or None)
        self.slide, self.buf, self.start, self.maxp = None, [], 0, None

    def _prepare(self, s: SlideEntry) -> None:
        from zarr.codecs import ZstdCodec

        if (self.part / s.slide_id).exists():
            shutil.rmtree(self.part / s.slide_id)
        g = self.root.create_group(s.slide_id, attributes={
            "label": s.label, "split": s.split, "n_tiles": s.n_tiles, "complete": False})
        n, h = s.n_tiles, self.h
        g.create_array(
            "maps", shape=(n, h, h), chunks=(1, h, h), shards=(max(1, min(n, SHARD_TILES)), h, h) if n else None,
            dtype="float16", compressors=ZstdCodec(level=1), fill_value=0, dimension_names=("tile", "map_y", "map_x"),
        )
        g.create_array("max_prob", shape=(n,), chunks=(max(1, n),), dtype="float32", fill_value=0, dimension_names=("tile",))

    def _write_maps(self, sid: str, a: int, data: np.ndarray) -> None:
        self.root[sid]["maps"][a : a + len(data)] = data

    def _write_done(self, sid: str, maxp: np.ndarray) -> None:
        g = self.root[sid]
        if len(maxp):
            g["max_prob"][:] = maxp
        g.attrs.update({"complete": True})

    def begin(self, s: SlideEntry) -> None:
        self.pending.append((self.pool.submit(self._prepare, s), None))
        if s.n_tiles == 0:
            self.pending.append((self.pool.submit(self._write_done, s.slide_id, np.zeros(0, np.float32)), s))

    def add(self, s: SlideEntry, idx: np.ndarray, maxp: np.ndarray, maps: np.ndarray) -> None:
        if self.slide is not s:
            self.slide, self.buf, self.start, self.maxp = s, [], 0, np.zeros(s.n_tiles, np.float32)
        self.buf.append(maps)
        self.maxp[idx] = maxp
        last = idx[-1] == s.n_tiles - 1
        self._flush(last)
        if last:
            self.pending.append((self.pool.submit(self._write_done, s.slide_id, self.maxp), s))
        self._poll(block=False)

    def _flush(self, final: bool) -> None:
        if not self.buf:
            return
        data = np.concatenate(self.buf)
        n_full = len(data) if final else (len(data) // SHARD_TILES) * SHARD_TILES
        if n_full:
            self.pending.append((self.pool.submit(self._write_maps, self.slide.slide_id, self.start, data[:n_full]), None))
            self.start += n_full
        self.buf = [data[n_full:]] if n_full < len(data) else []

    def _poll(self, block: bool) -> None:
        while self.pending and (block or self.pending[0][0].done()):
            fut, s = self.pending.popleft()
            fut.result()
            if s is not None:
                self.done_slides += 1
                if self.on_slide is not None:
                    self.on_slide(self.done_slides)

    def close(self, ok: bool) -> None:
        try:
            if ok:
                self._poll(block=True)
        finally:
            for f, _ in self.pending:
                f.cancel()
            self.pool.shutdown(wait=True)


def write_probmaps(
    seg_model,
    slides: Sequence[SlideEntry],
    out: str | Path,
    *,
    tile_px: int,
    map_stride_px: int,
    batch_size: int = 64,
    device=None,
    loader_workers: int = 0,
    amp: bool = True,
    progress: bool = False,
    desc: str = "predict",
    attrs: dict | None = None,
    on_slide: Callable[[int], None] | None = None,
    dist: Dist = SINGLE,
) -> dict:
    """The E-step's prediction pass: theta1 maps of every tile of ``slides`` into ``out`` (layout above).

    Forward passes overlap the Zarr writes (one background thread). ``on_slide(n_done)``
    runs after each slide is on disk. Returns timing figures for ``metrics.json``. Under
    torchrun (``dist``) every rank calls it with the same arguments and predicts its share.
    """
    import zarr

    out = Path(out)
    part = out.with_name(f".{out.name}.partial")
    todo = [s for s in slides if not _group_complete(part / s.slide_id)]
    root_attrs = {"format": PROBMAPS_FORMAT, "format_version": 1, "tile_px": tile_px,
                  "map_stride_px": map_stride_px, "complete": False, **(attrs or {})}
    dist.main_only(lambda: _open_root(part, root_attrs), what="creating the maps' Zarr")  # after every rank read todo
    root = zarr.open_group(str(part), mode="a", zarr_format=3)
    mine = dist.shard(todo, [s.n_tiles for s in todo])
    t0 = time.perf_counter()
    with dist.agree("predicting probability maps"):
        _predict_into(root, part, seg_model, mine, tile_px // map_stride_px, on_slide, len(slides) - len(todo),
                      batch_size=batch_size, device=device, loader_workers=loader_workers, out_stride=map_stride_px,
                      amp=amp, progress=progress, desc=desc)
    secs = time.perf_counter() - t0
    ranks = dist.gather({"tiles": sum(s.n_tiles for s in mine), "seconds": round(secs, 3)})
    dist.main_only(lambda: _finish(root, part, out), what="renaming the maps' Zarr")
    n_tiles = sum(s.n_tiles for s in todo)
    secs = max(r["seconds"] for r in ranks) if dist.enabled else secs
    res = {
        "slides": len(slides),
        "tiles": n_tiles,
        "seconds": round(secs, 3),
        "tiles_per_s": round(n_tiles / secs, 1) if secs > 0 and n_tiles else None,
        "map_px": tile_px // map_stride_px,
    }
    if dist.enabled:
        res["ranks"] = ranks
    return res


def _open_root(part: Path, attrs: dict) -> None:
    import zarr

    root = zarr.open_group(str(part), mode="a", zarr_format=3)
    if not root.attrs.get("format"):
        root.attrs.update(attrs)


def _predict_into(root, part: Path, seg_model, todo: Sequence[SlideEntry], h: int, on_slide, done: int, *,
                  desc: str, **predict) -> None:
    """theta1 on every tile of ``todo``; each slide's group written (and marked complete) in ``root``."""
    from pipeline.inference import iter_predictions

    active = [s for s in todo if s.n_tiles]
    writer = _MapWriter(root, part, h, on_slide, done)
    ok = False
    try:
        for s in todo:
            writer.begin(s)
        for si, idx, mp, maps in iter_predictions(seg_model, [(s.store_path, None) for s in active], desc=desc,
                                                  **predict):
            writer.add(active[si], idx, mp, maps)
        ok = True
    finally:
        writer.close(ok)


def _finish(root, part: Path, out: Path) -> None:
    """Mark the Zarr complete and rename it into place."""
    root.attrs.update({"complete": True})
    if out.exists():
        shutil.rmtree(out)
    os.replace(part, out)
    fsync_dir(out.parent)


def _heatmap_choice(slides: Sequence[SlideEntry], n: int) -> list[SlideEntry]:
    """``n`` slides with tissue: half positive, half negative where possible."""
    pool = [s for s in slides if s.n_tiles > 0]
    pos = [s for s in pool if s.label == 1]
    neg = [s for s in pool if s.label == 0]
    chosen = pos[: (n + 1) // 2] + neg[: n // 2]
    return chosen + [s for s in pool if s not in chosen][: n - len(chosen)]


def write_round_heatmaps(slides: Sequence[SlideEntry], probmaps: str | Path, out_dir: str | Path, n: int) -> list[Path]:
    """Heatmap PNGs (theta1 over the thumbnail) of ``n`` of ``slides``, painted from a round's maps."""
    from wsi.atomic import atomic_path
    from wsi.heatmap import store_heatmap
    from wsi.preview import render_heatmap_overlay, save_png
    from wsi.store import TileStore

    written = []
    for s in _heatmap_choice(slides, n) if n > 0 else []:
        store = TileStore(s.store_path)
        heat, tissue, _ = store_heatmap(store, read_maps(probmaps, s.slide_id))
        with atomic_path(Path(out_dir) / f"{s.slide_id}.png", durable=False) as tmp:
            save_png(tmp, render_heatmap_overlay(store.thumbnail, heat, tissue))
        written.append(Path(out_dir) / f"{s.slide_id}.png")
    return written
