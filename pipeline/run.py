"""The EM run directory: the one owner of its layout, identity, progress and checkpoints.

``em-round`` writes a run directory, ``classify``, ``evaluate`` and the demo
read it; all of them go through :class:`RunDir`, so the layout below is
written down once::

    RUN/run.json                  identity (config, hashes, inputs) and progress
    RUN/best                      {"round": k}
    RUN/round_k/seg.pt, cls.pt    checkpoints (model, optimiser, scheduler, round, config, version)
    RUN/round_k/probmaps.zarr     theta1 maps of every train/val tile (pipeline.probmaps)
    RUN/round_k/heatmaps/*.png
    RUN/round_k/metrics.json      written last, with DONE
    RUN/round_k/DONE              the round is complete
    RUN/round_k/state/            in-progress checkpoints (removed when the round is done)

The config comes back typed (:meth:`RunDir.config`), never as raw dicts with
defaults written again at each use. Checkpoints are saved atomically and read
back with one clear error for a missing, truncated or foreign file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.batch import UsageError, utc_now
from pipeline.config import Config, ConfigError, config_from_dict
from wsi import __version__
from wsi.atomic import atomic_path, atomic_write_json, fsync_dir
from wsi.objstore import is_url
from wsi.store import store_path_for

log = logging.getLogger("wsi_pipeline")

__all__ = [
    "RUN_FORMAT", "RUN_FORMAT_VERSION", "RunFormatError", "RunDir", "annotation_shas", "changed_stores", "config_diff",
    "file_sha256", "run_identity", "load_trunk",
    "save_checkpoint", "load_checkpoint", "checkpoint_payload", "model_from_checkpoint", "new_model", "load_weights",
]

RUN_FORMAT = "wsi-pipeline.em-run"
RUN_FORMAT_VERSION = 1
RUN_JSON = "run.json"
BEST_FILE = "best"
DONE_FILE = "DONE"
METRICS_FILE = "metrics.json"
SEG_CKPT, CLS_CKPT = "seg.pt", "cls.pt"
PROBMAPS = "probmaps.zarr"
TRASH_PREFIX = ".trash-"


class RunFormatError(UsageError):
    """A run directory or checkpoint cannot be used (missing, incomplete, other format)."""


def file_sha256(path: str | Path, digits: int | None = None) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB pieces), optionally shortened to ``digits`` hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:digits] if digits else h.hexdigest()


def _read_json(path: Path, default: Any = ...) -> Any:
    """JSON of ``path``; a missing file gives ``default`` when one is given, else a RunFormatError."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        if default is not ...:
            return default
        raise RunFormatError(f"{path}: not found") from None
    except (OSError, ValueError) as exc:
        if default is not ...:
            return default
        raise RunFormatError(f"{path}: unreadable ({exc})") from None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _nan_to_none(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


# --------------------------------------------------------------------------- the directory


@dataclass(frozen=True)
class RunDir:
    """A run directory (see the module docstring for its layout)."""

    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    # paths ------------------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.path / RUN_JSON

    def round_dir(self, k: int) -> Path:
        return self.path / f"round_{int(k)}"

    def checkpoint(self, k: int, kind: str) -> Path:
        """``seg.pt`` (theta1) or ``cls.pt`` (theta2) of round ``k``."""
        return self.round_dir(k) / {"seg": SEG_CKPT, "cls": CLS_CKPT}[kind]

    def probmaps(self, k: int) -> Path:
        return self.round_dir(k) / PROBMAPS

    def state_dir(self, k: int) -> Path:
        return self.round_dir(k) / "state"

    # reading ----------------------------------------------------------------------
    def exists(self) -> bool:
        return self.meta_path.is_file()

    def read_meta(self) -> dict:
        """``run.json``, checked to be an EM run this software reads."""
        meta = _read_json(self.meta_path)
        if meta.get("format") != RUN_FORMAT:
            raise RunFormatError(f"{self.meta_path}: not an EM run directory (format {meta.get('format')!r})")
        if meta.get("format_version") != RUN_FORMAT_VERSION:
            raise RunFormatError(
                f"{self.meta_path}: run format version {meta.get('format_version')}, this software reads "
                f"{RUN_FORMAT_VERSION}; re-train with 'wsi-pipeline em-round' into a new --run directory"
            )
        return meta

    def config(self, meta: dict | None = None) -> Config:
        """The run's config, typed (unknown or invalid keys: one line naming run.json)."""
        meta = self.read_meta() if meta is None else meta
        try:
            return config_from_dict(meta.get("config") or {}, where=str(self.meta_path))
        except ConfigError as exc:
            raise RunFormatError(
                f"{exc}; this software version cannot read the run's settings: use the version that made it "
                f"({meta.get('software_version')}) or re-train"
            ) from None

    def is_done(self, k: int) -> bool:
        """A round is complete when its DONE marker and the files it promises (metrics, both models) are there."""
        r = self.round_dir(k)
        return all((r / f).is_file() for f in (DONE_FILE, METRICS_FILE, SEG_CKPT, CLS_CKPT))

    def metrics(self, k: int, required: bool = True) -> dict:
        return _read_json(self.round_dir(k) / METRICS_FILE, ... if required else {})

    def best_round(self, meta: dict | None = None) -> int | None:
        """The best round: ``run.json``'s ``best_round`` (the one source of truth; ``best`` is a copy
        for people and scripts, re-written on every ``em-round``)."""
        meta = self.read_meta() if meta is None else meta
        return None if meta.get("best_round") is None else int(meta["best_round"])

    def resolve_round(self, which: str | int = "best", meta: dict | None = None) -> int:
        """A finished round: ``'best'``, ``'last'`` or a number (RunFormatError naming what is missing)."""
        meta = self.read_meta() if meta is None else meta
        done = sorted(int(r) for r in meta.get("rounds_completed", []))
        if which == "best":
            k = self.best_round(meta)
            if k is None:
                raise RunFormatError(f"{self.path}: no finished round yet (no 'best'); run 'wsi-pipeline em-round'")
        elif which == "last":
            if not done:
                raise RunFormatError(f"{self.path}: no finished round yet; run 'wsi-pipeline em-round'")
            k = max(done)
        else:
            k = int(which)
        if not self.is_done(k):
            raise RunFormatError(f"{self.round_dir(k)}: round {k} is not finished (finished rounds: {done or 'none'})")
        return k

    def fingerprint(self, k: int, meta: dict | None = None) -> str:
        """Identity of round ``k``'s models: the run's training hash, the round and both checkpoints' bytes."""
        meta = self.read_meta() if meta is None else meta
        parts = [str(meta.get("train_hash")), str(k), file_sha256(self.checkpoint(k, "seg")),
                 file_sha256(self.checkpoint(k, "cls"))]
        return hashlib.sha256(":".join(parts).encode()).hexdigest()[:16]

    # writing ----------------------------------------------------------------------
    def create(self, identity: dict) -> dict:
        """Start a run in an empty folder: writes ``run.json`` and returns it."""
        leftovers = [p.name for p in self.path.iterdir() if not p.name.startswith(".")]
        if leftovers:
            raise UsageError(
                f"{self.path}: the folder is not empty ({', '.join(sorted(leftovers)[:5])}) and is not an EM run; "
                "choose an empty or new --run directory"
            )
        meta = {**identity, "created_utc": utc_now(), "rounds_completed": [], "best_round": None, "round_losses": {}}
        atomic_write_json(self.meta_path, meta)
        return meta

    def check_compatible(self, meta: dict, ident: dict, allow_restore: bool = False) -> list[str]:
        """Refuse to continue a run with other settings or inputs (one line naming the difference and the fix).

        Returns the ids of the tile stores whose content changed since the run read them: always empty
        unless ``allow_restore`` (``--allow-restore``), which accepts them (the caller redoes the rounds)."""
        where = self.meta_path
        if meta.get("mode") != ident["mode"]:
            raise UsageError(
                f"{self.path}: this run was trained with --mode {meta.get('mode')}, not {ident['mode']}; "
                "use a separate --run directory per mode"
            )
        if meta.get("tiling", {}).get("config_hash") != ident["tiling"]["config_hash"]:
            raise UsageError(
                f"{self.path}: the run was trained on stores tiled with {meta.get('tiling')}, the given stores have "
                f"{ident['tiling']}; use the stores it was trained on or a new --run directory"
            )
        # a run made before a setting existed records no value for it: read as its default, it is the same run
        diff = config_diff(meta.get("config", {}), ident["config"]) if meta.get("train_hash") != ident["train_hash"] else []
        if diff:
            shown = "; ".join(diff[:8]) + (f"; ... ({len(diff) - 8} more)" if len(diff) > 8 else "")
            raise UsageError(
                f"{self.path}: the run was made with a different config ({shown}); "
                f"pass the config it was made with (saved in {where}) or use a new --run directory"
            )
        if meta.get("theta1_from") != ident.get("theta1_from"):
            raise UsageError(
                f"{self.path}: the run took theta1 from {_theta1_source(meta)}, this call from "
                f"{_theta1_source(ident)}; give the same --theta1-from or use a new --run directory"
            )
        if meta.get("labels_sha256") != ident["labels_sha256"]:
            raise UsageError(
                f"{ident['labels']}: the labels differ from those the run was trained with ({meta.get('labels')}); "
                "use the same labels or a new --run directory"
            )
        changed = changed_stores(meta.get("store_content") or {}, ident["store_content"])
        if changed and not allow_restore:
            raise UsageError(_store_changed_message(self.path, meta["store_content"], ident, changed))
        old_ann, new_ann = annotation_shas(meta), annotation_shas(ident)
        if old_ann != new_ann:
            raise UsageError(
                f"{self.path}: the pixel annotations differ from those the run was trained with "
                f"(slides {sorted(old_ann)} before, {sorted(new_ann)} now); use the same --annotations or a new "
                "--run directory"
            )
        return changed

    def record_round(self, meta: dict, k: int, metrics: dict, cfg: Config) -> dict:
        """Add finished round ``k`` to ``run.json`` (its selection values too) and choose the best round."""
        done = sorted(set(int(r) for r in meta.get("rounds_completed", [])) | {k})
        values = {str(r): v for r, v in (meta.get("round_values") or {}).items()}
        values[str(k)] = round_values(metrics)
        losses = {r: v["stage2_loss"] for r, v in values.items()}
        meta = {**meta, "rounds_completed": done, "round_values": values, "round_losses": losses,
                "updated_utc": utc_now()}
        return self.select_best(meta, cfg)

    def select_best(self, meta: dict, cfg: Config) -> dict:
        """Choose the best round by the config's rule; ``run.json`` is the truth, ``best`` a copy of it."""
        from pipeline.sampling import choose_round

        e = cfg.em
        done = [int(r) for r in meta.get("rounds_completed", [])]
        allowed = done
        if e.select_rounds == "em" and e.mode == "mixed" and any(r >= 1 for r in done):
            allowed = [r for r in done if r >= 1]
        values = {int(r): v for r, v in (meta.get("round_values") or {}).items()}
        best, why = choose_round(values, e.select_by, allowed)
        if best is None and done:
            best, why = max(done), "the last round (no round has a stage-2 loss)"
        meta = {**meta, "best_round": best,
                "selection": {"select_by": e.select_by, "select_rounds": e.select_rounds, "eligible": allowed,
                              "chosen_by": why}}
        atomic_write_json(self.meta_path, meta)
        if best is not None:
            atomic_write_json(self.path / BEST_FILE, {"round": best})
        return meta

    def finish_round(self, k: int, metrics: dict) -> None:
        """Write round ``k``'s metrics, then its DONE marker, then drop its in-progress state."""
        atomic_write_json(self.round_dir(k) / METRICS_FILE, metrics)
        atomic_write_json(self.round_dir(k) / DONE_FILE, {"finished_utc": utc_now()})
        shutil.rmtree(self.state_dir(k), ignore_errors=True)

    def clear_rounds(self, meta: dict, why: str | None = "--force") -> dict:
        """``--force`` (``why``, logged unless None): move every round aside (one
        rename each, into a hidden trash folder) and reset the progress in ``run.json`` (written from ``meta``);
        :meth:`empty_trash` deletes them once the new rounds are done, so an interrupted ``--force`` never
        leaves a half-deleted round that looks complete."""
        trash = self.path / f"{TRASH_PREFIX}{uuid.uuid4().hex[:8]}"
        rounds = sorted(p for p in self.path.glob("round_*") if p.is_dir())
        if rounds:
            trash.mkdir()
            for p in rounds:
                os.replace(p, trash / p.name)
            fsync_dir(self.path)
        (self.path / BEST_FILE).unlink(missing_ok=True)
        meta = {**meta, "rounds_completed": [], "best_round": None, "round_losses": {}, "round_values": {}}
        atomic_write_json(self.meta_path, meta)
        if rounds and why:
            log.info("%s: moved the previous rounds of %s aside; they are deleted when the new ones are done",
                     why, self.path)
        return meta

    def restore_stores(self, meta: dict, ident: dict, changed: list[str]) -> dict:
        """``--allow-restore``: the stores ``changed`` since the run read them are accepted; every round read
        every train and val store (E-step, probability maps, stage 2), so all rounds are moved aside to be
        trained again, and ``run.json`` records the stores' new content."""
        shown = ", ".join(changed[:5]) + (f", ... ({len(changed) - 5} more)" if len(changed) > 5 else "")
        rounds = sorted(int(p.name.split("_", 1)[1]) for p in self.path.glob("round_*")
                        if p.is_dir() and p.name.split("_", 1)[1].isdigit())
        log.warning("--allow-restore: %d tile store(s) in %s changed since %s was trained on them (%s); %s",
                    len(changed), ident["stores"], self.path, shown,
                    f"round(s) {', '.join(map(str, rounds))} moved aside, to be trained again" if rounds
                    else "no round to redo")
        return self.clear_rounds({**meta, "store_content": ident["store_content"], "updated_utc": utc_now()},
                                 why=None)

    def empty_trash(self) -> None:
        """Delete rounds that ``--force`` moved aside (after the new rounds are complete)."""
        for p in self.path.glob(f"{TRASH_PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)


def annotation_shas(record: dict) -> dict:
    """slide_id -> the hashes of its annotation files, from a run identity or ``run.json`` (paths may move)."""
    return {k: [e["sha256"] for e in v] for k, v in record.get("annotations", {}).items()}


def _theta1_source(meta: dict) -> str:
    src = meta.get("theta1_from")
    return f"the run {src['run']} (--theta1-from)" if src else "its own training (no --theta1-from)"


def changed_stores(old: dict, new: dict) -> list[str]:
    """Ids of the slides whose tile store content (fingerprint, tile count) differs between two ``store_content``
    records. The run goes on only with the content it was trained on: a store re-tiled by cron between two
    calls would otherwise mix data silently, or put last round's pseudo labels on the wrong tiles."""
    return sorted(sid for sid in old.keys() & new.keys() if old[sid] != new[sid])


def _store_changed_message(run_path: Path, old: dict, ident: dict, changed: list[str]) -> str:
    sid, new = changed[0], ident["store_content"]
    more = f"; {len(changed) - 1} more store(s) changed" if len(changed) > 1 else ""
    return (
        f"{store_path_for(ident['stores'], sid)}: the tile store changed since {run_path} was trained on it "
        f"({old[sid]['n_tiles']} -> {new[sid]['n_tiles']} tiles, fingerprint {old[sid]['fingerprint']} -> "
        f"{new[sid]['fingerprint']}{more}); restore the stores the run was trained on, pass --allow-restore to "
        "train its rounds again on the stores as they are now, or train a new --run directory"
    )


def round_values(metrics: dict) -> dict:
    """What rounds are chosen by: stage-2 loss (train slides), val loss and val AUC (None when unknown)."""
    val = metrics.get("val") or {}
    return {"stage2_loss": _nan_to_none(metrics.get("stage2_loss")), "val_loss": _nan_to_none(val.get("loss")),
            "val_auc": _nan_to_none(val.get("auc"))}


def _with_defaults(cfg: dict) -> dict:
    """A recorded config as this version reads it: settings added since the run was made take their defaults
    (a new setting's default keeps the behaviour of the versions before it). As recorded when it does not load."""
    try:
        return config_from_dict(cfg).to_dict()
    except (ConfigError, TypeError, ValueError):
        return cfg


def config_diff(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """``'key: old -> new'`` for each training setting that differs between two configs (as dicts); keys in
    ``ignore`` (dotted keys or whole sections / prefixes) are left out."""
    sections = Config.TRAIN_SECTIONS
    old, new = _with_defaults(old), _with_defaults(new)
    a = _flatten({s: old.get(s, {}) for s in sections})
    b = _flatten({s: new.get(s, {}) for s in sections})
    skip = (*Config.TRAIN_EXCLUDE, *ignore)
    keys = sorted(k for k in set(a) | set(b) if not any(k == p or k.startswith(p + ".") for p in skip))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def run_identity(cfg: Config, cohort, annotations: dict, train, val, theta1_from: dict | None = None) -> dict:
    """What a run is made of: config, hashes, inputs and splits (compared on every resume); ``theta1_from``:
    the run whose theta1 it takes (:func:`pipeline.reuse.check_source`), None when it trains its own."""
    return {
        "format": RUN_FORMAT,
        "format_version": RUN_FORMAT_VERSION,
        "config": cfg.to_dict(),
        "train_hash": cfg.train_hash(tiling_hash=cohort.tiling["config_hash"]),
        "tiling": dict(cohort.tiling),
        "mode": cfg.em.mode,
        "stores": cohort.stores_dir if is_url(cohort.stores_dir) else str(cohort.stores_dir.resolve()),
        "labels": str(cohort.labels_path.resolve()),
        "labels_sha256": cohort.labels_sha256,
        "annotations": {
            sid: [{"path": str(Path(p).resolve()), "sha256": file_sha256(p, 16)} for p in a.sources]
            for sid, a in sorted(annotations.items())
        },
        "splits": {"train": [s.slide_id for s in train], "val": [s.slide_id for s in val]},
        "store_content": {s.slide_id: {"fingerprint": s.store_fingerprint, "n_tiles": s.n_tiles}
                          for s in sorted(list(train) + list(val), key=lambda e: e.slide_id)},
        "software_version": __version__,
        "theta1_from": theta1_from,
    }


# --------------------------------------------------------------------------- checkpoints and weights


def checkpoint_payload(model, trainer, cfg: Config, k: int, kind: str) -> dict:
    """What a checkpoint holds: how to rebuild the model, its (and the trainer's) state, round and config."""
    d = trainer.state_dict() if trainer is not None else {"model": model.state_dict()}
    return {
        "kind": kind,
        "arch": getattr(model, "model_name", None),
        "arch_kwargs": dict(getattr(model, "model_kwargs", {}) or {}),
        **d,
        "round": k,
        "config": cfg.to_dict(),
        "software_version": __version__,
    }


def save_checkpoint(obj: dict, path: str | Path) -> None:
    """``torch.save`` under a temporary name, fsynced, then renamed into place."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by :func:`save_checkpoint` (RunFormatError for a missing or foreign file)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise RunFormatError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated or foreign file
        raise RunFormatError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict):
        raise RunFormatError(f"{path}: not a wsi-pipeline checkpoint (a {type(ckpt).__name__})")
    return ckpt


def build_model(arch: str, arch_kwargs: dict | None = None):
    """A model from the registry (random weights; nothing is downloaded)."""
    import models

    try:
        return models.create_model(arch, **(arch_kwargs or {}))
    except models.UnknownModelError as exc:
        raise UsageError(f"{exc} (config model.seg_arch / model.cls_arch)") from None


def model_from_checkpoint(path: str | Path, device="cpu"):
    """Rebuild the model saved in a checkpoint (``{"arch", "arch_kwargs", "model", ...}``), in eval mode."""
    ckpt = load_checkpoint(path)
    if "arch" not in ckpt or "model" not in ckpt:
        raise RunFormatError(f"{path}: not a wsi-pipeline checkpoint (no 'arch'/'model' entries)")
    model = build_model(ckpt["arch"], ckpt.get("arch_kwargs"))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def new_model(arch: str, seed: int, arch_kwargs: dict | None = None):
    """A freshly initialised model, seeded so that the same seed gives the same weights."""
    import models

    models.seed_everything(seed)
    return build_model(arch, {"num_classes": 1, **(arch_kwargs or {})})


def load_trunk(model, seg_checkpoint: str | Path, prefix: str = "backbone.") -> str:
    """Start theta2 from theta1's trunk: the tensors under ``prefix`` in the checkpoint ``seg_checkpoint``
    (the timm DLA trunk that DLA34-up and the DLA34 classifier share, key for key); returns a line for the
    run's records. A UsageError when none fits (another backbone or width)."""
    import models

    sd = models.unwrap_state_dict(load_checkpoint(seg_checkpoint))
    rep = models.load_state_dict_flexible(model, {k: v for k, v in sd.items() if k.startswith(prefix)})
    if not rep.loaded_keys:
        raise UsageError(f"stage2.init: theta1, but none of theta1's trunk tensors ({seg_checkpoint}) fit theta2 "
                         f"({getattr(model, 'model_name', type(model).__name__)}): give model.seg_arch and "
                         "model.cls_arch the same backbone and width, or set stage2.init: random")
    if rep.mismatched_keys:
        log.warning("theta2 took %d of theta1's trunk tensors; %d differ in shape: %s", len(rep.loaded_keys),
                    len(rep.mismatched_keys), rep)
    return f"theta1 trunk {seg_checkpoint} ({len(rep.loaded_keys)} tensors)"


def load_weights(model, path: str | Path, what: str) -> str:
    """Load a user's local weights file into ``model``; returns a line for the run's records."""
    import models

    try:
        sd = load_checkpoint(path)
    except RunFormatError as exc:
        raise UsageError(f"{exc}; give a torch state dict or checkpoint for the {what} model") from None
    try:
        rep = models.load_state_dict_flexible(model, sd)
    except TypeError as exc:
        raise UsageError(f"{path}: {exc}") from None
    if not rep.loaded_keys:
        raise UsageError(f"{path}: none of its tensors fit the {what} model ({rep}); is it the right architecture?")
    if not rep.ok:
        log.warning("%s weights %s loaded partially: %s", what, path, rep)
    return f"weights {path} ({len(rep.loaded_keys)} tensors)"
