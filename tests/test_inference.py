"""pipeline.inference: theta1 predictions, theta2 scores and loading a round of a real EM run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pipeline.run import RunFormatError  # noqa: E402
from pipeline.inference import (  # noqa: E402
    classify_tiles,
    iter_predictions,
    load_round,
    predict_tiles,
    score_slide,
)
from pipeline.sampling import topk_tiles  # noqa: E402
from tests.em_fixtures import em_cohort, em_run, em_threads  # noqa: E402,F401
from wsi.store import TileStore  # noqa: E402


@pytest.fixture(scope="module")
def seg_model():
    import models

    models.seed_everything(0)
    return models.create_model("dla34_up_tiny").eval()


def test_predict_tiles_shapes_and_consistency(em_cohort, seg_model, em_threads):
    st = TileStore(em_cohort.stores / "slide_001.zarr")
    maxp, maps = predict_tiles(seg_model, st, batch_size=16, device="cpu")
    n = len(st)
    assert maxp.shape == (n,) and maxp.dtype == np.float32
    assert maps.shape == (n, 32, 32) and maps.dtype == np.float16
    assert np.all((maps >= 0) & (maps <= 1))
    np.testing.assert_array_equal(maxp, maps.reshape(n, -1).max(1).astype(np.float32))
    # the same numbers as the model itself, batch size and loader workers do not matter
    with torch.inference_mode():
        x = torch.from_numpy(st[:4]).permute(0, 3, 1, 2).float() / 255
        ref = torch.sigmoid(seg_model(x, upsample=False)[:, 0]).numpy()
    np.testing.assert_allclose(maps[:4].astype(np.float32), ref, atol=1e-3)
    maxp2, maps2 = predict_tiles(seg_model, st.path, batch_size=7, device="cpu", loader_workers=1)
    np.testing.assert_allclose(maps2.astype(np.float32), maps.astype(np.float32), atol=1e-3)
    # coarser maps: average of the native stride-4 probabilities
    _, maps8 = predict_tiles(seg_model, st, indices=[0, 1], out_stride=8, device="cpu")
    assert maps8.shape == (2, 16, 16)
    pooled = maps[:2].astype(np.float32).reshape(2, 16, 2, 16, 2).mean((2, 4))
    np.testing.assert_allclose(maps8.astype(np.float32), pooled, atol=2e-3)


def test_iter_predictions_keeps_sources_apart(em_cohort, seg_model, em_threads):
    a, b = em_cohort.stores / "slide_001.zarr", em_cohort.stores / "slide_002.zarr"
    got = {0: [], 1: []}
    for si, idx, mp, maps in iter_predictions(seg_model, [(a, [5, 1, 3]), (b, None)], batch_size=4, device="cpu",
                                              with_maps=False):
        assert maps is None and len(idx) == len(mp) <= 4
        got[si].extend(idx.tolist())
    assert got[0] == [5, 1, 3]
    assert got[1] == list(range(len(TileStore(b))))


def test_load_round_and_score_slide(em_run, em_cohort, em_threads):
    meta = json.loads((em_run / "run.json").read_text())
    best = json.loads((em_run / "best").read_text())["round"]
    rm = load_round(em_run, device="cpu")
    assert rm.round == best == meta["best_round"]
    assert rm.top_k == meta["config"]["stage2"]["top_k"] == 4
    assert rm.tile_px == 128 and rm.tiling_hash == meta["tiling"]["config_hash"]
    metrics = json.loads((em_run / f"round_{best}" / "metrics.json").read_text())
    assert rm.threshold_at_full_sensitivity == metrics["val"]["threshold_at_full_sensitivity"]
    assert not rm.seg_model.training and not rm.cls_model.training
    assert load_round(em_run, round=0, device="cpu").round == 0
    assert load_round(em_run, round="last", device="cpu").round == 1

    # a val slide scores exactly as during validation, with or without the stored maps
    sid, entry = next((k, v) for k, v in metrics["val"]["slides"].items())
    store = TileStore(em_cohort.stores / f"{sid}.zarr")
    r = score_slide(rm, store, batch_size=32)
    assert r["probability"] == pytest.approx(entry["probability"], abs=1e-4)
    top = topk_tiles(r["tile_max_probs"], rm.top_k)
    np.testing.assert_array_equal(r["topk_indices"], top)
    np.testing.assert_allclose(r["topk_scores"], classify_tiles(rm.cls_model, store, top, device="cpu"), atol=1e-6)
    assert r["probability"] == pytest.approx(float(np.mean(r["topk_scores"])))
    assert r["prob_maps"].shape == (len(store), 32, 32) and r["n_tiles"] == len(store)
    r2 = score_slide(rm, store, tile_max_probs=r["tile_max_probs"])
    assert r2["probability"] == pytest.approx(r["probability"]) and r2["prob_maps"] is None


def test_load_round_errors_name_the_problem(em_run, tmp_path):
    with pytest.raises(RunFormatError, match="run.json: not found"):
        load_round(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(em_run, run, ignore=shutil.ignore_patterns("probmaps.zarr", "heatmaps"))
    with pytest.raises(RunFormatError, match="round_5: round 5 is not finished"):
        load_round(run, round=5)
    (run / "round_1" / "DONE").unlink()
    with pytest.raises(RunFormatError, match=r"round 1 is not finished \(finished rounds: \[0, 1\]\)"):
        load_round(run, round=1)
    (run / "round_0" / "cls.pt").write_bytes(b"truncated")
    with pytest.raises(RunFormatError, match="cls.pt: not a readable checkpoint"):
        load_round(run, round=0)
    meta = json.loads((run / "run.json").read_text())
    meta["format_version"] = 99
    (run / "run.json").write_text(json.dumps(meta))
    with pytest.raises(RunFormatError, match="run format version 99"):
        load_round(run)
