import math
import warnings
from collections import Counter

import numpy as np
import pytest

from pipeline.sampling import (
    MixedBatchSampler,
    balanced_slide_sampler,
    ratio_counts,
    select_best_round,
    topk_tiles,
)

# ------------------------------------------------------------ ratio_counts

# hand-computed with the documented rule (quotas b*2/10, b*1/10, b*7/10)
HAND = {
    1: (0, 0, 1),     # .2 .1 .7 -> largest remainder: source 2; b < 3, no minimum
    2: (1, 0, 1),     # .4 .2 1.4 -> floors 0 0 1, remainders .4 .2 .4 -> tie -> source 0
    3: (1, 1, 1),     # .6 .3 2.1 -> (1, 0, 2); minimum-one: source 2 gives one to 1
    4: (1, 1, 2),     # .8 .4 2.8 -> (1, 0, 3); source 2 (surplus .2) gives one
    5: (1, 1, 3),     # 1 .5 3.5 -> floors 1 0 3, tie .5/.5 -> source 1
    7: (1, 1, 5),     # 1.4 .7 4.9 -> floors 1 0 4, remainders .4 .7 .9 -> sources 2, 1
    10: (2, 1, 7),
    16: (3, 2, 11),   # 3.2 1.6 11.2 -> remainder .6 wins
    20: (4, 2, 14),
    32: (7, 3, 22),   # 6.4 3.2 22.4 -> tie .4/.4 -> source 0
    64: (13, 6, 45),  # 12.8 6.4 44.8 -> .8 .8 -> sources 0 and 2
}


@pytest.mark.parametrize("batch_size,expected", sorted(HAND.items()))
def test_ratio_counts_hand_checked(batch_size, expected):
    assert ratio_counts(batch_size) == expected
    assert ratio_counts(batch_size, (2, 1, 7)) == expected


def test_ratio_counts_other_ratios():
    assert ratio_counts(10, (0.2, 0.1, 0.7)) == (2, 1, 7)  # float ratios read exactly
    assert ratio_counts(10, (2, 0, 7)) == (2, 0, 8)        # 2.22 0 7.78 -> remainder .78
    assert ratio_counts(9, (1, 1, 1)) == (3, 3, 3)
    assert ratio_counts(4, (1, 1, 1)) == (2, 1, 1)         # tie in source order
    assert ratio_counts(0) == (0, 0, 0)
    assert ratio_counts(5, (0, 3, 0)) == (0, 5, 0)


def test_ratio_counts_properties():
    rng = np.random.default_rng(0)
    for _ in range(300):
        ratio = tuple(int(v) for v in rng.integers(0, 9, size=rng.integers(1, 6)))
        if sum(ratio) == 0:
            continue
        b = int(rng.integers(0, 80))
        counts = ratio_counts(b, ratio)
        assert sum(counts) == b
        quotas = [b * r / sum(ratio) for r in ratio]
        for c, q, r in zip(counts, quotas, ratio):
            if r == 0:
                assert c == 0
        active = sum(r > 0 for r in ratio)
        if b >= active:
            assert all(c >= 1 for c, r in zip(counts, ratio) if r > 0)
        else:  # pure Hamilton: within one of the quota
            assert all(abs(c - q) < 1 for c, q in zip(counts, quotas))


def test_ratio_counts_errors():
    with pytest.raises(ValueError):
        ratio_counts(-1)
    with pytest.raises(ValueError):
        ratio_counts(10, (0, 0, 0))
    with pytest.raises(ValueError):
        ratio_counts(10, (1, -1, 2))


# ------------------------------------------------------ MixedBatchSampler


@pytest.mark.parametrize("batch_size", [10, 20, 32, 7, 3])
def test_every_batch_has_exact_composition(batch_size):
    sizes = (23, 11, 500)
    sampler = MixedBatchSampler(sizes, batch_size, num_batches=60, seed=3)
    expected = ratio_counts(batch_size)
    n = 0
    for _epoch in range(3):
        for batch in sampler:
            assert len(batch) == batch_size
            per_source = Counter(s for s, _ in batch)
            assert tuple(per_source.get(s, 0) for s in range(3)) == expected
            # listed in source order, indices in range, no repeats within a batch
            assert [s for s, _ in batch] == sorted(s for s, _ in batch)
            assert all(0 <= i < sizes[s] for s, i in batch)
            assert len(set(batch)) == batch_size
            n += 1
    assert n == 180


def test_without_replacement_within_a_pass_and_cycling():
    sizes = (8, 4, 70)
    sampler = MixedBatchSampler(sizes, 10, seed=1, num_batches=12)  # counts (2, 1, 7)
    batches = sampler.epoch_batches(0)
    annotated = batches[:, :2, 1].ravel()  # 24 draws = 3 full passes over 8 items
    for k in range(3):
        assert sorted(annotated[8 * k: 8 * k + 8]) == list(range(8))
    hard = batches[:, 3:, 1].ravel()       # 84 draws: first 70 are one full pass
    assert sorted(hard[:70]) == list(range(70))


def test_default_len_one_pass_over_annotated():
    s = MixedBatchSampler((25, 40, 1000), 10)
    assert s.counts == (2, 1, 7)
    assert len(s) == math.ceil(25 / 2) == 13
    assert len(list(s)) == 13
    seen = {i for batch in s.epoch_batches(0) for src, i in batch if src == 0}
    assert seen == set(range(25))


def test_determinism_by_seed_and_epochs():
    a = MixedBatchSampler((10, 5, 200), 20, seed=7, num_batches=5)
    b = MixedBatchSampler((10, 5, 200), 20, seed=7, num_batches=5)
    c = MixedBatchSampler((10, 5, 200), 20, seed=8, num_batches=5)
    ea = [list(a) for _ in range(3)]
    eb = [list(b) for _ in range(3)]
    assert ea == eb
    assert ea[0] != ea[1]                 # epochs differ
    assert list(c) != ea[0]               # seeds differ
    # jumping to an epoch reproduces the continuous run
    fresh = MixedBatchSampler((10, 5, 200), 20, seed=7, num_batches=5)
    fresh.set_epoch(2)
    assert list(fresh) == ea[2]
    fresh.set_epoch(1)
    assert list(fresh) == ea[1]
    np.testing.assert_array_equal(fresh.epoch_batches(0), a.epoch_batches(0))


def test_empty_source_redistribution_warns():
    with pytest.warns(UserWarning, match="empty"):
        s = MixedBatchSampler((6, 0, 100), 10, seed=0)
    assert s.counts == (2, 0, 8)
    assert s.notes and "redistributed" in s.notes[0]
    for batch in s:
        assert [src for src, _ in batch] == [0, 0] + [2] * 8
    with pytest.warns(UserWarning):
        s2 = MixedBatchSampler((0, 3, 100), 10)
    assert s2.counts == ratio_counts(10, (0, 1, 7)) == (0, 1, 9)
    assert s2.epoch_source == 1 and len(s2) == 3


def test_no_warning_when_all_sources_present():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = MixedBatchSampler((10, 10, 10), 10)
    assert s.notes == []


def test_all_sources_empty_error():
    with pytest.raises(ValueError, match="no items"):
        MixedBatchSampler((0, 0, 0), 10)
    with pytest.raises(ValueError, match="no items"):
        MixedBatchSampler((0, 5, 5), 10, ratio=(1, 0, 0))


def test_short_source():
    with pytest.warns(UserWarning, match="smaller than"):
        s = MixedBatchSampler((1, 5, 100), 20, num_batches=4)  # needs 4 annotated per batch
    for batch in s:
        assert [i for src, i in batch if src == 0] == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="replacement_when_short"):
        MixedBatchSampler((1, 5, 100), 20, replacement_when_short=False)


def test_flat_indices_for_batch_sampler():
    sizes = (5, 3, 40)
    s = MixedBatchSampler(sizes, 10, seed=2, num_batches=6)
    pairs = s.epoch_batches(0)
    flat = s.as_flat_indices()
    assert len(flat) == 6
    batches = list(flat)
    assert all(isinstance(b, list) and all(type(i) is int for i in b) for b in batches)
    np.testing.assert_array_equal(np.array(batches), np.array([0, 5, 8])[pairs[..., 0]] + pairs[..., 1])
    assert s.epoch == 1  # shared epoch counter
    custom = s.as_flat_indices(offsets=[100, 200, 300])
    custom.set_epoch(0)
    first = next(iter(custom))
    assert first[:2] == [100 + int(i) for i in pairs[0, :2, 1]]
    with pytest.raises(ValueError):
        s.as_flat_indices(offsets=[0, 1])


# ----------------------------------------------------------- stage 2


def test_topk_ties_and_order():
    scores = np.array([0.5, 0.9, 0.5, 0.1, 0.9, 0.5])
    np.testing.assert_array_equal(topk_tiles(scores, k=4), [1, 4, 0, 2])
    np.testing.assert_array_equal(topk_tiles(scores, k=100), [1, 4, 0, 2, 5, 3])  # K > N
    assert topk_tiles(scores, k=0).size == 0
    assert topk_tiles(np.array([]), k=16).size == 0
    np.testing.assert_array_equal(topk_tiles([np.nan, 0.2, -np.inf, 0.3], k=4), [3, 1, 2, 0])
    assert topk_tiles(np.arange(40.0)).tolist() == list(range(39, 23, -1))  # default K=16


def test_balanced_slide_sampler():
    labels = np.array([1, 0, 0, 0, 0, 0, 0, 1, 0, 0])
    idx = balanced_slide_sampler(labels, 100, seed=0)
    assert idx.shape == (100,)
    assert (labels[idx] == 1).sum() == 50
    # positives cycle without replacement: each of the 2 positives 25 times
    assert Counter(idx[labels[idx] == 1].tolist()) == {0: 25, 7: 25}
    np.testing.assert_array_equal(idx, balanced_slide_sampler(labels, 100, seed=0))
    assert not np.array_equal(idx, balanced_slide_sampler(labels, 100, seed=1))
    odd = balanced_slide_sampler(labels, 7, seed=3)
    assert abs(int((labels[odd] == 1).sum()) - 3.5) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        balanced_slide_sampler([1, 1, 1], 4, seed=0)


def test_select_best_round():
    assert select_best_round({0: 0.7, 1: 0.4, 2: 0.5}) == 1
    assert select_best_round({0: 0.7, 3: 0.4, 1: 0.4}) == 1         # tie -> earlier round
    assert select_best_round({0: float("nan"), 1: 0.9, 2: float("nan")}) == 1
    assert select_best_round({2: 0.3, 1: float("inf")}) == 2
    with pytest.raises(ValueError):
        select_best_round({})
    with pytest.raises(ValueError):
        select_best_round({0: float("nan")})
