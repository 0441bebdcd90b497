"""Batch composition and selection rules of the mixed-supervision EM loop.

Li et al., "Mixed Supervision Learning for Whole Slide Image Classification",
Algorithm 1:

* M-step: ``theta_1`` is retrained on batches that mix annotated tiles,
  pseudo-positive tiles and hard-negative tiles at the ratio 2 : 1 : 7
  (:func:`ratio_counts`, :class:`MixedBatchSampler`);
* stage 2: the top-K tiles of each slide feed the slide classifier
  ``theta_2`` (:func:`topk_tiles`), trained on class-balanced slides
  (:func:`balanced_slide_sampler`);
* the EM round with the lowest stage-2 loss is kept (:func:`select_best_round`).

Pure numpy; nothing here imports torch, but :meth:`MixedBatchSampler.as_flat_indices`
is a drop-in ``batch_sampler`` for a ``torch.utils.data.DataLoader`` over a
``ConcatDataset([annotated, pseudo_positive, hard_negative])``.
"""

from __future__ import annotations

import math
import warnings
from fractions import Fraction
from typing import Iterator, Mapping, Sequence

import numpy as np

__all__ = [
    "ratio_counts",
    "MixedBatchSampler",
    "FlatBatchSampler",
    "topk_tiles",
    "balanced_slide_sampler",
    "select_best_round",
]


# --------------------------------------------------------------------------
# Apportionment
# --------------------------------------------------------------------------


def _as_fraction(r) -> Fraction:
    if isinstance(r, (int, np.integer)):
        return Fraction(int(r))
    r = float(r)
    if not math.isfinite(r):
        raise ValueError(f"ratio entries must be finite, got {r}")
    # 0.2/0.1/0.7 mean 2/10, 1/10, 7/10 - not their binary approximations
    return Fraction(r).limit_denominator(10**9)


def ratio_counts(batch_size: int, ratio: Sequence[float] = (2, 1, 7)) -> tuple[int, ...]:
    """Exact number of items per source in a batch of ``batch_size``.

    Rounding rule (largest remainder / Hamilton method, then a minimum of one):

    1. Each source ``i`` has the quota ``q_i = batch_size * r_i / sum(r)``
       (computed exactly, in rational arithmetic) and first receives
       ``floor(q_i)`` items.
    2. The ``batch_size - sum(floor(q_i))`` items left over go one each to
       the sources with the largest fractional remainders ``q_i - floor(q_i)``;
       equal remainders are broken in source order (lower index first).
    3. Minimum of one: if ``batch_size >= m`` (``m`` = number of sources with
       ``r_i > 0``), every source with ``r_i > 0`` gets at least one item.
       Each such source left at 0 (taken in source order) receives one item
       taken from the source, among those holding at least 2, with the
       largest surplus ``count_i - q_i`` (ties: lower index first).
       When ``batch_size < m`` step 3 is skipped and some sources get 0.

    Sources with ``r_i = 0`` always get 0.  The counts always sum to
    ``batch_size``.

    Parameters
    ----------
    batch_size : int
        Items per batch, >= 0.
    ratio : sequence of float
        Non-negative relative weights per source, not all zero; the paper's
        annotated : pseudo-positive : hard-negative ratio is (2, 1, 7).

    Returns
    -------
    counts : tuple of int

    Examples
    --------
    >>> ratio_counts(10)
    (2, 1, 7)
    >>> ratio_counts(32)   # quotas 6.4, 3.2, 22.4: tie .4/.4 -> source 0
    (7, 3, 22)
    >>> ratio_counts(7)    # quotas 1.4, 0.7, 4.9 -> remainders .9 and .7 win
    (1, 1, 5)
    >>> ratio_counts(3)    # Hamilton gives (1, 0, 2); minimum-one moves one
    (1, 1, 1)
    """
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 0:
        raise ValueError(f"batch_size must be a non-negative integer, got {batch_size!r}")
    batch_size = int(batch_size)
    fr = [_as_fraction(r) for r in ratio]
    if not fr:
        raise ValueError("ratio must not be empty")
    if any(r < 0 for r in fr):
        raise ValueError(f"ratio entries must be >= 0, got {tuple(ratio)}")
    total = sum(fr)
    if total == 0:
        raise ValueError(f"ratio must have a positive entry, got {tuple(ratio)}")

    quotas = [batch_size * r / total for r in fr]
    counts = [math.floor(q) for q in quotas]
    left = batch_size - sum(counts)
    # sort by remainder descending, index ascending (stable sort keeps source order)
    order = sorted(range(len(fr)), key=lambda i: -(quotas[i] - counts[i]))
    for i in order[:left]:
        counts[i] += 1

    active = [i for i, r in enumerate(fr) if r > 0]
    if batch_size >= len(active):
        for i in active:
            if counts[i] == 0:
                donors = [j for j in range(len(fr)) if counts[j] >= 2]
                # largest surplus first, lower index on ties
                donor = min(donors, key=lambda j: (-(counts[j] - quotas[j]), j))
                counts[donor] -= 1
                counts[i] += 1
    return tuple(counts)


# --------------------------------------------------------------------------
# Mixed batch sampler
# --------------------------------------------------------------------------


class _CyclingStream:
    """Indices ``0..n-1`` drawn without replacement in shuffled passes; a new
    shuffle starts when a pass is exhausted.  A batch that straddles two
    passes never repeats an index (as long as ``count <= n``)."""

    def __init__(self, n: int, rng: np.random.Generator):
        self.n = n
        self.rng = rng
        self.perm = rng.permutation(n)
        self.pos = 0

    def take(self, count: int) -> np.ndarray:
        out = []
        need = count
        while need > 0:
            avail = self.n - self.pos
            if avail == 0:
                taken = np.concatenate(out) if out else np.empty(0, dtype=np.int64)
                perm = self.rng.permutation(self.n)
                if 0 < len(taken) < self.n:
                    # move indices already in this batch behind the others
                    clash = np.isin(perm, taken)
                    perm = np.concatenate([perm[~clash], perm[clash]])
                self.perm, self.pos = perm, 0
                avail = self.n
            k = min(need, avail)
            out.append(self.perm[self.pos:self.pos + k])
            self.pos += k
            need -= k
        return np.concatenate(out).astype(np.int64) if out else np.empty(0, dtype=np.int64)

    def state(self):
        return (self.rng.bit_generator.state, self.perm.copy(), self.pos)

    def restore(self, state):
        self.rng.bit_generator.state = state[0]
        self.perm, self.pos = state[1].copy(), state[2]


class MixedBatchSampler:
    """Batches mixing several sources at a fixed ratio (M-step of the EM loop).

    Every batch holds exactly ``counts = ratio_counts(batch_size, ratio)``
    items from each source (see :func:`ratio_counts` for the rounding rule),
    listed in source order.

    Parameters
    ----------
    source_sizes : sequence of int
        Number of items per source, in the paper's order
        ``(n_annotated, n_pseudo_positive, n_hard_negative)``.
    batch_size : int
        Items per batch.
    ratio : sequence of float
        Relative share per source (paper: 2 : 1 : 7).
    num_batches : int, optional
        Batches per epoch.  Default: enough batches to show every item of the
        *epoch source* once, ``ceil(n_s / counts[s])``, where the epoch source
        is the annotated set (source 0) or, if that one is empty, the first
        non-empty source with a non-zero share.
    seed : int
        Seed; the sequence of batches depends only on ``seed`` and the
        epoch number.
    replacement_when_short : bool
        A source smaller than its per-batch count must repeat items within a
        batch.  If True (default) this is allowed (with a warning); if False
        a ``ValueError`` is raised.

    Attributes
    ----------
    counts : tuple of int
        Items per batch from each source.
    notes : list of str
        Warnings issued at construction (empty-source redistribution,
        short sources); each is also emitted with :func:`warnings.warn`.

    Notes
    -----
    *Sampling.*  Each source is an independent stream of shuffled passes:
    within a pass indices are drawn without replacement; when it is
    exhausted, a new shuffle starts (cycling), so a small annotated set is
    revisited while a large hard-negative set is swept across epochs.  A
    batch that straddles two passes has no repeated index when the source
    holds at least ``counts[i]`` items.

    *Empty sources.*  When a source with a non-zero ratio is empty, its ratio
    is set to 0 and the whole batch is re-apportioned over the remaining
    sources with the same rule (e.g. (2, 1, 7) with no pseudo-positives and
    batch 10 gives (2, 0, 8)).

    *Epochs.*  Iterating yields one epoch of ``len(self)`` batches and
    advances the epoch counter; the streams continue where the previous
    epoch stopped.  :meth:`set_epoch` jumps to any epoch (e.g. after
    resuming from a checkpoint) and reproduces exactly the batches a
    continuous run would have produced.

    *Output.*  Iteration yields lists of ``(source_id, index)`` pairs, with
    ``index`` local to its source.  :meth:`as_flat_indices` gives a view
    yielding lists of global ints for a concatenated dataset, usable as a
    torch ``batch_sampler``.
    """

    def __init__(
        self,
        source_sizes: Sequence[int],
        batch_size: int,
        ratio: Sequence[float] = (2, 1, 7),
        num_batches: int | None = None,
        seed: int = 0,
        replacement_when_short: bool = True,
    ):
        sizes = tuple(int(n) for n in source_sizes)
        if any(n < 0 for n in sizes):
            raise ValueError(f"source_sizes must be >= 0, got {sizes}")
        if len(sizes) != len(tuple(ratio)):
            raise ValueError(f"source_sizes {sizes} and ratio {tuple(ratio)} differ in length")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.source_sizes = sizes
        self.batch_size = int(batch_size)
        self.ratio = tuple(ratio)
        self.seed = int(seed)
        self.notes: list[str] = []

        eff = [0 if n == 0 else r for n, r in zip(sizes, self.ratio)]
        if all(_as_fraction(r) == 0 for r in eff):
            raise ValueError(
                f"no items to sample: every source with a non-zero ratio {self.ratio} is empty "
                f"(source_sizes={sizes})")
        empty = [i for i, (n, r) in enumerate(zip(sizes, self.ratio)) if n == 0 and _as_fraction(r) > 0]
        self.effective_ratio = tuple(eff)
        self.counts = ratio_counts(self.batch_size, eff)
        if empty:
            self._note(f"sources {empty} are empty; their share of ratio {self.ratio} is "
                       f"redistributed: per-batch counts {self.counts} instead of "
                       f"{ratio_counts(self.batch_size, self.ratio)}")
        short = [i for i, (n, c) in enumerate(zip(sizes, self.counts)) if 0 < n < c]
        if short:
            msg = (f"sources {short} (sizes {[sizes[i] for i in short]}) are smaller than their "
                   f"per-batch counts {[self.counts[i] for i in short]}; items repeat within a batch")
            if not replacement_when_short:
                raise ValueError(msg + " (replacement_when_short=False)")
            self._note(msg)

        if num_batches is None:
            ref = 0 if self.counts[0] > 0 else next(i for i, c in enumerate(self.counts) if c > 0)
            self.epoch_source = ref
            num_batches = math.ceil(sizes[ref] / self.counts[ref])
        else:
            self.epoch_source = None
            if int(num_batches) != num_batches or num_batches < 0:
                raise ValueError(f"num_batches must be a non-negative integer, got {num_batches!r}")
        self.num_batches = int(num_batches)

        self._epoch = 0
        self._cache_epoch = None  # epoch whose start state is cached
        self._cache_state = None

    def _note(self, msg: str) -> None:
        self.notes.append(msg)
        warnings.warn(msg, UserWarning, stacklevel=3)

    # -- streams -----------------------------------------------------------
    def _new_streams(self) -> list[_CyclingStream | None]:
        children = np.random.SeedSequence(self.seed).spawn(len(self.source_sizes))
        return [_CyclingStream(n, np.random.default_rng(ss)) if c > 0 else None
                for n, c, ss in zip(self.source_sizes, self.counts, children)]

    def _one_epoch(self, streams) -> np.ndarray:
        """(num_batches, batch_size, 2) array of (source_id, index)."""
        out = np.empty((self.num_batches, self.batch_size, 2), dtype=np.int64)
        for b in range(self.num_batches):
            col = 0
            for s, (stream, c) in enumerate(zip(streams, self.counts)):
                if c == 0:
                    continue
                out[b, col:col + c, 0] = s
                out[b, col:col + c, 1] = stream.take(c)
                col += c
        return out

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """All batches of ``epoch`` as an int64 array of shape
        ``(len(self), batch_size, 2)`` holding ``(source_id, index)``.

        Deterministic in ``(seed, epoch)``; does not change the epoch counter.
        """
        epoch = int(epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        streams = self._new_streams()
        start = 0
        if self._cache_epoch is not None and self._cache_epoch <= epoch:
            for st, saved in zip(streams, self._cache_state):
                if st is not None:
                    st.restore(saved)
            start = self._cache_epoch
        for _ in range(start, epoch):
            self._one_epoch(streams)
        batches = self._one_epoch(streams)
        self._cache_epoch = epoch + 1
        self._cache_state = [st.state() if st is not None else None for st in streams]
        return batches

    # -- iteration -----------------------------------------------------------
    @property
    def epoch(self) -> int:
        """Epoch that the next iteration will produce."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration produce ``epoch`` (0-based)."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = self.epoch_batches(self._epoch)
        self._epoch += 1
        for batch in batches:
            yield [(int(s), int(i)) for s, i in batch]

    def as_flat_indices(self, offsets: Sequence[int] | None = None) -> "FlatBatchSampler":
        """View yielding lists of global ints, for a torch ``batch_sampler``.

        Parameters
        ----------
        offsets : sequence of int, optional
            Global index of the first item of each source.  Default: the
            ``ConcatDataset`` layout ``(0, n0, n0 + n1, ...)`` from
            ``source_sizes``.

        Returns
        -------
        FlatBatchSampler
            Iterable of ``list[int]`` with ``len()``; item ``(s, i)`` becomes
            ``offsets[s] + i``.  It shares the epoch counter with this sampler.
        """
        if offsets is None:
            offsets = np.concatenate([[0], np.cumsum(self.source_sizes)[:-1]])
        offsets = np.asarray(offsets, dtype=np.int64)
        if offsets.shape != (len(self.source_sizes),):
            raise ValueError(f"offsets must have one entry per source ({len(self.source_sizes)}), "
                             f"got shape {offsets.shape}")
        return FlatBatchSampler(self, offsets)


class FlatBatchSampler:
    """Global-index view of a :class:`MixedBatchSampler` (see
    :meth:`MixedBatchSampler.as_flat_indices`)."""

    def __init__(self, sampler: MixedBatchSampler, offsets: np.ndarray):
        self.sampler = sampler
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        s = self.sampler
        batches = s.epoch_batches(s.epoch)
        s.set_epoch(s.epoch + 1)
        flat = self.offsets[batches[..., 0]] + batches[..., 1]
        for row in flat:
            yield row.tolist()


# --------------------------------------------------------------------------
# Stage 2 selection
# --------------------------------------------------------------------------


def topk_tiles(scores, k: int = 16) -> np.ndarray:
    """Indices of the K highest-scoring tiles of a slide.

    Parameters
    ----------
    scores : ndarray, shape (N,)
        One score per tile (e.g. the maximum or mean of ``theta_1``'s
        probability map).
    k : int
        Paper's K (default 16).  If ``k > N`` all N tiles are returned.

    Returns
    -------
    idx : ndarray of int64, shape (min(k, N),)
        Sorted by score descending; equal scores keep index order (lower index
        first).  NaN scores rank after every number.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    if int(k) != k or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    nan = np.isnan(s)
    # lexsort is stable: primary key NaN-last, then score descending, then index
    order = np.lexsort((-np.where(nan, 0.0, s), nan))
    return order[: int(k)].astype(np.int64)


def balanced_slide_sampler(labels, num_samples: int, seed: int = 0) -> np.ndarray:
    """Slide indices with positive and negative slides drawn equally often.

    Parameters
    ----------
    labels : array_like of int/bool, shape (S,)
        Slide labels, 1 = positive, 0 = negative.  Both classes must occur.
    num_samples : int
        Number of slide indices to draw.
    seed : int
        Seed; the result is deterministic in ``(labels, num_samples, seed)``.

    Returns
    -------
    idx : ndarray of int64, shape (num_samples,)
        ``num_samples // 2`` positives and as many negatives, plus, for odd
        ``num_samples``, one slide of a randomly chosen class; within a class
        slides are drawn without replacement in shuffled passes (cycling when
        the class is smaller than its share).  The order is shuffled.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if not np.all(np.isin(y, (0, 1))):
        raise ValueError("labels must be 0/1")
    if int(num_samples) != num_samples or num_samples < 0:
        raise ValueError(f"num_samples must be a non-negative integer, got {num_samples!r}")
    num_samples = int(num_samples)
    pos = np.flatnonzero(y == 1)
    neg = np.flatnonzero(y == 0)
    if num_samples and (len(pos) == 0 or len(neg) == 0):
        raise ValueError(f"need both classes to balance, got {len(pos)} positive and "
                         f"{len(neg)} negative slides")
    rng = np.random.default_rng(seed)
    n_pos = n_neg = num_samples // 2
    if num_samples % 2:
        if rng.random() < 0.5:
            n_pos += 1
        else:
            n_neg += 1
    picks = []
    for members, n in ((pos, n_pos), (neg, n_neg)):
        if n:
            picks.append(members[_CyclingStream(len(members), rng).take(n)])
    idx = np.concatenate(picks) if picks else np.empty(0, dtype=np.int64)
    return rng.permutation(idx).astype(np.int64)


def select_best_round(round_losses: Mapping[int, float]) -> int:
    """The EM round with the lowest stage-2 loss.

    Parameters
    ----------
    round_losses : mapping of int to float
        Stage-2 (slide classifier ``theta_2``) loss of each EM round.

    Returns
    -------
    round : int
        Round with the minimum loss; ties go to the earlier (smaller) round
        number; NaN (or None) losses are ignored.

    Raises
    ------
    ValueError
        If there is no round with a non-NaN loss.
    """
    valid = []
    for rnd, loss in round_losses.items():
        if loss is None:
            continue
        loss = float(loss)
        if math.isnan(loss):
            continue
        valid.append((loss, int(rnd)))
    if not valid:
        raise ValueError(f"no round with a valid (non-NaN) loss: {dict(round_losses)}")
    return min(valid)[1]


def choose_round(values: Mapping[int, Mapping[str, float | None]], select_by: str = "stage2_loss",
                 allowed: Sequence[int] | None = None) -> tuple[int | None, str]:
    """The best round by ``select_by`` among ``allowed`` rounds, and why.

    ``values[k]`` holds ``stage2_loss``, ``val_loss`` and ``val_auc`` of round k (None when unknown).
    Losses: lowest wins; ``val_auc``: highest wins, ties broken by the lower val loss. Ties go to
    the earlier round. When no allowed round has the criterion, the stage-2 loss decides and the
    reason says so; None when no round has any value.
    """
    pool = {int(k): v for k, v in values.items() if allowed is None or int(k) in set(allowed)}

    def ok(v):
        return v is not None and not (isinstance(v, float) and math.isnan(v))

    if select_by == "val_auc":
        have = {k: (-v["val_auc"], v["val_loss"] if ok(v.get("val_loss")) else math.inf)
                for k, v in pool.items() if ok(v.get("val_auc"))}
    else:
        have = {k: (v[select_by],) for k, v in pool.items() if ok(v.get(select_by))}
    if have:
        return min(have, key=lambda k: (have[k], k)), select_by
    losses = {k: v.get("stage2_loss") for k, v in pool.items()}
    try:
        return select_best_round(losses), "stage2_loss (no round has " + select_by + ")"
    except ValueError:
        return None, "no round has a value"


def round_seed(seed: int, k: int, step: int) -> int:
    """The seed of one random step of EM round ``k`` (initialisation, sampling, augmentation...):
    distinct per (seed, round, step), so steps never share a stream and a resumed round repeats."""
    return int(seed) * 1_000_003 + int(k) * 1009 + int(step)
