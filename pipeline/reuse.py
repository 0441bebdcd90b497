"""Stage 2 on another run's theta1 (``em-round --theta1-from RUN``).

theta1's rounds never read theta2: round k's E-step pseudo-labels the slides with round k-1's theta1, its
M-step trains theta1 on them, and theta2 only ranks the slides afterwards (a test checks that theta1 is bit
for bit the same whatever stage 2 does). A run that changes only stage 2 (``stage2.*``, ``model.cls_*``:
another slide classifier, a mixer, other top-K) would therefore train every theta1 again for nothing, which
is most of a round's cost. With ``--theta1-from`` it takes each round's ``seg.pt`` and ``probmaps.zarr``
from a finished run instead and trains only stage 2.

The source must be made of the same inputs (mode, tile stores and their content, labels, annotations,
splits) and the same theta1 settings, else one line names the difference. The files are copied (temp name,
then rename), so the new run stands on its own once written; ``run.json`` records the source, and a later
call must name the same one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.batch import UsageError
from pipeline.run import RunDir, annotation_shas, config_diff, file_sha256
from wsi.atomic import atomic_path, fsync_dir, temp_sibling

__all__ = ["THETA2_ONLY", "check_source", "copy_theta1"]

THETA2_ONLY = ("stage2", "model.cls_arch", "model.cls_arch_kwargs", "model.cls_weights", "model.cls_trainer",
               "model.cls_mix")
"""Config keys (and sections) that only stage 2 reads; every other training key shapes theta1."""


def check_source(src: RunDir, ident: dict, rounds: int) -> dict:
    """The record of ``src`` for ``run.json``, once it is shown to hold the theta1 this run would train for
    rounds ``0 .. rounds-1``; otherwise one line naming what differs or is missing, and the fix."""
    meta = src.read_meta()
    fix = "give a run made from the same inputs and theta1 settings, or train theta1 here (no --theta1-from)"
    same = {"mode": "--mode", "labels_sha256": "labels", "splits": "train/val splits",
            "store_content": "tile store content", "tiling": "tiling"}
    for key, what in same.items():
        if meta.get(key) != ident.get(key):
            raise UsageError(f"{src.path}: --theta1-from run differs in its {what}; {fix}")
    if annotation_shas(meta) != annotation_shas(ident):
        raise UsageError(f"{src.path}: --theta1-from run was trained with other pixel annotations; {fix}")
    diff = config_diff(meta.get("config") or {}, ident["config"], ignore=THETA2_ONLY)
    if diff:
        raise UsageError(f"{src.path}: --theta1-from run has other theta1 settings ({'; '.join(diff[:6])}); {fix}")
    missing = [k for k in range(rounds) if not src.is_done(k)]
    if missing:
        raise UsageError(f"{src.path}: round(s) {', '.join(map(str, missing))} are not finished in the "
                         f"--theta1-from run; finish them there first (em-round --run {src.path} --rounds {rounds}) "
                         f"or ask for --rounds {missing[0]}")
    return {"run": str(src.path.resolve()), "train_hash": meta.get("train_hash")}


def copy_theta1(src: RunDir, dst: RunDir, k: int) -> dict:
    """Round ``k``'s theta1 of ``src`` into ``dst``: the probability maps first, then ``seg.pt`` (a round
    counts its theta1 as there when ``seg.pt`` is), each under a temporary name and then renamed."""
    dst.round_dir(k).mkdir(parents=True, exist_ok=True)
    if not dst.probmaps(k).is_dir():
        _copy_tree(src.probmaps(k), dst.probmaps(k))
    with atomic_path(dst.checkpoint(k, "seg")) as tmp:
        shutil.copyfile(src.checkpoint(k, "seg"), tmp)
    return {"round_dir": str(src.round_dir(k).resolve()), "seg_sha256": file_sha256(dst.checkpoint(k, "seg"), 16)}


def _copy_tree(src: Path, dst: Path) -> None:
    tmp = temp_sibling(dst)
    try:
        shutil.copytree(src, tmp, copy_function=shutil.copyfile)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(dst.parent)
