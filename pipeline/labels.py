"""Image-level labels: a CSV ``slide_id,label[,split]`` checked against the tile stores.

Format
------
A header row naming at least ``slide_id`` and ``label`` (any order, other
columns ignored), then one row per slide::

    slide_id,label,split
    slide_000,1,train
    slide_001,0,val

``label`` is 1 (positive) or 0 (negative). ``split`` is ``train``, ``val`` or
``test``; without the column, or with an empty cell, the slide is ``train``.
Blank lines and lines starting with ``#`` are skipped.

Everything wrong is collected and reported in one :class:`LabelError` that
names the file, the line and the fix: duplicate ids, labels other than 0/1,
unknown splits, slides without a store (or with an unreadable/outdated one).
Stores in the folder without a label are ignored (and listed in
:attr:`Cohort.unlabelled`).
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

from pipeline.batch import UsageError
from wsi.objstore import as_location, is_url
from wsi.store import StoreError, TileStore, list_stores, store_fingerprint, store_path_for

__all__ = ["LabelError", "SlideEntry", "Cohort", "LabelRow", "read_labels_csv", "read_labels_table", "load_cohort",
           "carve_val_split", "SPLITS"]

SPLITS = ("train", "val", "test")


class LabelError(UsageError):
    """The labels CSV or the stores it refers to cannot be used as given."""


@dataclass(frozen=True)
class SlideEntry:
    """One labelled slide and its tile store."""

    slide_id: str
    label: int
    split: str
    store_path: Path
    n_tiles: int = 0
    patient_id: str = ""
    """The patient the slide comes from ('' = not given: the slide counts as its own patient)."""
    store_fingerprint: str = ""
    """Identity of the store's content when the cohort was loaded (:func:`wsi.store.store_fingerprint`)."""

    @property
    def patient(self) -> str:
        return self.patient_id or self.slide_id


@dataclass
class Cohort:
    """The labelled slides of a run, all with complete, compatible tile stores."""

    slides: list[SlideEntry]
    labels_path: Path
    stores_dir: Path
    tiling: dict
    """``{"config_hash", "tile_px", "mpp", "overlap_px"}`` shared by every store."""
    labels_sha256: str
    unlabelled: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[SlideEntry]:
        return [s for s in self.slides if s.split == name]

    @property
    def train(self) -> list[SlideEntry]:
        return self.split("train")

    @property
    def val(self) -> list[SlideEntry]:
        return self.split("val")

    def by_id(self) -> dict[str, SlideEntry]:
        return {s.slide_id: s for s in self.slides}


class LabelRow(NamedTuple):
    slide_id: str
    label: int
    split: str
    patient_id: str


def read_labels_csv(path: str | Path) -> list[tuple[str, int, str]]:
    """Parse and check a labels CSV; returns ``[(slide_id, label, split), ...]`` in file order."""
    return [(r.slide_id, r.label, r.split) for r in read_labels_table(path)]


def read_labels_table(path: str | Path) -> list[LabelRow]:
    """Parse and check a labels CSV (``slide_id,label[,split][,patient_id]``); rows in file order."""
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"{path}: labels file not found; give a CSV with columns slide_id,label[,split]")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelError(f"{path}: cannot read the labels file ({exc})") from None
    rows = [
        (n, row)
        for n, row in enumerate(csv.reader(text.splitlines()), start=1)
        if row and any(c.strip() for c in row) and not row[0].lstrip().startswith("#")
    ]
    if not rows:
        raise LabelError(f"{path}: the labels file is empty; expected a header slide_id,label[,split]")
    header_line, header = rows[0]
    cols = [c.strip().lower() for c in header]
    missing = [c for c in ("slide_id", "label") if c not in cols]
    if missing:
        raise LabelError(
            f"{path}: line {header_line}: the header lacks column(s) {', '.join(missing)}; "
            f"the first row must name the columns, e.g. 'slide_id,label,split' (found {header})"
        )
    i_id, i_label = cols.index("slide_id"), cols.index("label")
    i_split = cols.index("split") if "split" in cols else None
    i_patient = cols.index("patient_id") if "patient_id" in cols else None
    problems: list[str] = []
    seen: dict[str, int] = {}
    out = []
    for line, row in rows[1:]:
        cells = [c.strip() for c in row] + [""] * len(cols)
        sid, lab = cells[i_id], cells[i_label]
        split = (cells[i_split] if i_split is not None else "").lower() or "train"
        if not sid:
            problems.append(f"line {line}: empty slide_id")
            continue
        if sid in seen:
            problems.append(f"line {line}: slide {sid!r} is listed again (first on line {seen[sid]}); keep one row per slide")
            continue
        seen[sid] = line
        if lab not in ("0", "1", "0.0", "1.0"):
            problems.append(f"line {line}: label {lab!r} of slide {sid!r} must be 1 (positive) or 0 (negative)")
            continue
        if split not in SPLITS:
            problems.append(f"line {line}: split {split!r} of slide {sid!r} must be one of {', '.join(SPLITS)}")
            continue
        out.append(LabelRow(sid, int(float(lab)), split, cells[i_patient] if i_patient is not None else ""))
    if problems:
        raise LabelError(_many(path, problems))
    if not out:
        raise LabelError(f"{path}: no slides listed under the header")
    _check_patient_splits(path, out)
    return out


def _check_patient_splits(path: Path, rows: list[LabelRow]) -> None:
    """Slides of one patient must share a split (else the model is validated on its training patients)."""
    splits: dict[str, dict[str, list[str]]] = {}
    for r in rows:
        if r.patient_id:
            splits.setdefault(r.patient_id, {}).setdefault(r.split, []).append(r.slide_id)
    bad = {p: sp for p, sp in splits.items() if len(sp) > 1}
    if bad:
        desc = "; ".join(f"patient {p}: " + ", ".join(f"{', '.join(ids)} in {sp}" for sp, ids in sorted(d.items()))
                         for p, d in sorted(bad.items())[:5])
        raise LabelError(f"{path}: {len(bad)} patient(s) have slides in more than one split ({desc}); "
                         "put all slides of a patient in one split")


def _many(path: Path, problems: list[str], limit: int = 10) -> str:
    head = "; ".join(problems[:limit])
    more = f"; ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{path}: {len(problems)} problem(s): {head}{more}"


def _tiling_of(store: TileStore) -> dict:
    t = store.attrs.get("tiling", {})
    return {
        "config_hash": store.attrs.get("config_hash"),
        "tile_px": int(store.tile_px),
        "mpp": float(t.get("target_mpp", store.mpp)),
        "overlap_px": int(t.get("overlap_px", 0)),
    }


def _is_store_folder(d) -> bool:
    if is_url(d):
        from wsi.objstore import Remote

        return Remote(d).isdir()
    return d.is_dir()


def load_cohort(
    stores_dir: str | Path,
    labels_csv: str | Path,
    *,
    require_train_classes: bool = True,
) -> Cohort:
    """Labels joined with their stores, every store opened and checked once.

    Raises
    ------
    LabelError
        Bad CSV, slides without a (complete, current-format) store, stores tiled
        with different settings, or (``require_train_classes``) a train split
        without both a positive and a negative slide.
    """
    stores_dir, labels_csv = as_location(stores_dir), Path(labels_csv)
    if not _is_store_folder(stores_dir):
        raise LabelError(f"{stores_dir}: no such store folder; pass the --out folder of 'wsi-pipeline tile'")
    rows = read_labels_table(labels_csv)
    remote_stores = set(list_stores(stores_dir)) if is_url(stores_dir) else set()  # one listing, not a look-up each
    missing, broken, entries, tilings = [], [], [], {}
    for sid, label, split, patient in rows:
        p = store_path_for(stores_dir, sid)
        if not (p in remote_stores if is_url(p) else p.exists()):
            missing.append(sid)
            continue
        try:
            st = TileStore(p)
        except StoreError as exc:
            broken.append(str(exc))
            continue
        entries.append(SlideEntry(sid, label, split, p, len(st), patient, store_fingerprint(st)))
        tilings[sid] = _tiling_of(st)
    problems = []
    if missing:
        shown = ", ".join(missing[:10]) + (f" ... ({len(missing) - 10} more)" if len(missing) > 10 else "")
        problems.append(
            f"{len(missing)} labelled slide(s) have no store in {stores_dir}: {shown}; tile them with "
            f"'wsi-pipeline tile ... --out {stores_dir}' or remove them from the CSV"
        )
    problems.extend(broken)
    if problems:
        raise LabelError(_many(labels_csv, problems))
    distinct = {tuple(sorted(t.items())) for t in tilings.values()}
    if len(distinct) > 1:
        groups: dict[tuple, list[str]] = {}
        for sid, t in tilings.items():
            groups.setdefault(tuple(sorted(t.items())), []).append(sid)
        desc = "; ".join(f"{dict(k)}: {', '.join(v[:4])}{' ...' if len(v) > 4 else ''}" for k, v in groups.items())
        raise LabelError(
            f"{stores_dir}: the stores were tiled with different settings ({desc}); re-tile all slides "
            "with one config"
        )
    tiling = next(iter(tilings.values()))
    if require_train_classes:
        train = [e for e in entries if e.split == "train"]
        n_pos = sum(e.label for e in train)
        if n_pos == 0 or n_pos == len(train):
            raise LabelError(
                f"{labels_csv}: the train split has {n_pos} positive and {len(train) - n_pos} negative "
                "slides; stage 2 needs at least one of each (check the label and split columns)"
            )
    labelled = {e.slide_id for e in entries}
    names = [str(p).rstrip("/").rsplit("/", 1)[-1][: -len(".zarr")] for p in list_stores(stores_dir)]
    unlabelled = [n for n in names if n not in labelled]
    return Cohort(
        slides=entries,
        labels_path=labels_csv,
        stores_dir=stores_dir,
        tiling=tiling,
        labels_sha256=hashlib.sha256(labels_csv.read_bytes()).hexdigest(),
        unlabelled=unlabelled,
    )


def carve_val_split(train: list[SlideEntry], fraction: float, seed: int) -> tuple[list[SlideEntry], list[SlideEntry]]:
    """Move about ``fraction`` of the training *patients* to a validation split, per class (a patient is
    positive when any of its slides is), seeded; returns ``(train, val)`` in the input order."""
    import numpy as np

    by_patient: dict[str, list[SlideEntry]] = {}
    for s in train:
        by_patient.setdefault(s.patient, []).append(s)
    rng = np.random.default_rng(seed)
    val_patients: set[str] = set()
    for cls in (0, 1):
        pts = sorted(p for p, ss in by_patient.items() if max(s.label for s in ss) == cls)
        n = int(round(fraction * len(pts)))
        if fraction > 0 and len(pts) >= 2:
            n = min(max(n, 1), len(pts) - 1)  # keep both classes in both splits
        val_patients.update(pts[i] for i in rng.permutation(len(pts))[:n])
    val = [replace(s, split="val") for s in train if s.patient in val_patients]
    return [s for s in train if s.patient not in val_patients], val
