"""Fixtures of the EM tests: a generated cohort with lesions, tiled, and a two-round EM run.

``tests/conftest.py`` belongs to the tiling tests, so these live here and the
test modules import them (``from tests.em_fixtures import em_cohort, ...``).
A fixture imported into several modules is a separate fixture in each, so the
expensive work is cached on disk under pytest's session base temp and shared:
the cohort is generated and tiled once per session, the EM run made once.
"""

from __future__ import annotations

import fcntl
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

# The cohort: 10 positive + 10 negative slides of 1024 x 1024 px at 2 um/px (2 x 2 mm),
# half train / half val (stratified), 2 train positives with pixel annotations.
EM_COHORT = dict(n_positive=10, n_negative=10, width_px=1024, height_px=1024, mpp=2.0, seed=3, annotate=2,
                 split=(0.5, 0.5, 0.0))


@dataclass(frozen=True)
class EmCohort:
    root: Path
    cohort: Path
    stores: Path
    labels: Path
    annotations: list  # GeoJSON files of the pixel-annotated slides
    annotated_ids: list
    info: dict


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def build_em_cohort(base: Path) -> EmCohort:
    """Generate + tile the cohort under ``base/em_cohort`` (once; later calls reuse it)."""
    import json

    from pipeline.config import load_config
    from pipeline.tile import run_tile
    from wsi.synth import make_cohort

    root = base / "em_cohort"
    with _locked(base / ".em_cohort.lock"):
        if not (root / "READY").is_file():
            shutil.rmtree(root, ignore_errors=True)
            make_cohort(root / "cohort", workers=2, **EM_COHORT)
            cfg = load_config("tiny")
            rep = run_tile(sorted((root / "cohort").glob("*.tif")), root / "stores", cfg, workers=0, quiet=True,
                           progress=False)
            assert rep.ok, rep.summary()
            (root / "READY").write_text("ok\n")
    cohort = root / "cohort"
    info = json.loads((cohort / "cohort.json").read_text())
    ids = (cohort / "pixel_annotated.txt").read_text().split()
    return EmCohort(root, cohort, root / "stores", cohort / "labels.csv",
                    [cohort / "annotations" / f"{sid}.geojson" for sid in ids], ids, info)


def build_em_run(base: Path, cohort: EmCohort) -> Path:
    """Two rounds of ``em-round`` (mixed mode, tiny config) through the command line, once per session."""
    from click.testing import CliRunner

    from pipeline.cli import main

    run = base / "em_run"
    with _locked(base / ".em_run.lock"):
        if not (run / "round_1" / "DONE").is_file():
            shutil.rmtree(run, ignore_errors=True)
            args = ["em-round", "--stores", str(cohort.stores), "--labels", str(cohort.labels), "--run", str(run),
                    "--config", "tiny", "--rounds", "2", "--quiet"]
            for a in cohort.annotations:
                args += ["--annotations", str(a)]
            res = CliRunner().invoke(main, args, catch_exceptions=False)
            assert res.exit_code == 0, res.output
    return run


@pytest.fixture(scope="session")
def em_cohort(tmp_path_factory) -> EmCohort:
    return build_em_cohort(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def em_run(tmp_path_factory, em_cohort) -> Path:
    return build_em_run(tmp_path_factory.getbasetemp(), em_cohort)


@pytest.fixture
def em_threads():
    """Keep torch at one thread (2-core CI machines) for the duration of a test."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
