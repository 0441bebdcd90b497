"""Shared fixtures: generated slides (the project's own generator) and the optional ../shared data."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_slides() -> Path:
    """``../shared/slides`` beside the checkout; tests using it skip when it is absent."""
    d = SHARED / "slides"
    if not (d / "cmu-1-small-region.svs").is_file():
        pytest.skip("../shared/slides is not available (only in CI and developer checkouts)")
    return d


@pytest.fixture(scope="session")
def synth_slides(tmp_path_factory) -> dict[str, Path]:
    """A few small generated slides covering the cases the tiler must handle."""
    from wsi.synth import write_slide

    d = tmp_path_factory.mktemp("synth_slides")
    out = {}
    out["tissue"] = d / "tissue.tif"
    write_slide(out["tissue"], 3072, 2560, mpp=0.5, seed=1, lesions=1)
    out["tissue40x"] = d / "tissue40x.tif"
    write_slide(out["tissue40x"], 3000, 2600, mpp=0.25, seed=2)
    out["blank"] = d / "blank.tif"
    write_slide(out["blank"], 2048, 2048, mpp=0.5, seed=3, tissue="none")
    out["nompp"] = d / "nompp.tif"
    write_slide(out["nompp"], 2048, 2048, mpp=None, seed=4)
    return out


@pytest.fixture
def two_torch_threads():
    """At most two torch threads for a model test (the CI machine's cores), restored afterwards."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)
