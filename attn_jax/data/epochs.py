"""Training epochs: which pairs each holds, and their batching plan, as a function of the seed and the epoch alone,
so batch ``i`` of a run stays a function of ``i`` (``attn_jax.data.pipeline``).

An epoch holds the kept pairs of one split, or those of two splits mixed at a fixed ratio (the Ding dictionary's
entries among its example sentences: ``epoch_pairs``); ``bucket_epoch`` and ``packed_epoch`` plan its batches
(length buckets, or packed rows), and ``Planner`` keeps the plans of recent epochs for the threads that assemble
batches.

A mixed epoch holds every primary pair once and ``extra_per_epoch`` pairs of the extra source, taken in turn from one
endless stream over it: the stream runs through a fresh permutation of the extra pairs per cycle, so each is seen
once before any is seen twice, whatever the ratio. The pipeline then shuffles, buckets or packs the epoch's pairs
as it would one split's, so a batch holds pairs of both sources and packing fills rows with the short entries.

Mixing here, on pair indices before the batching plan, instead of with ``grain.MapDataset.mix`` on two streams
of examples: the pipeline's batches are planned per epoch from the pairs' lengths (``attn_jax.data.pipeline``), so
the plan has to know the epoch's pairs of both sources; mixing two batched streams would give batches of one
source each (all short entries, or all sentences) and a ratio in batches rather than in pairs.
"""

import dataclasses
import threading
from collections.abc import Callable

import numpy as np

from attn_jax.data import batching, packing

# Mixed into the stream's seed, so its permutations differ from the epoch shuffles drawn from the same seed.
_STREAM = 0x6D6978


def extra_per_epoch(num_primary: int, num_extra: int, ratio: float) -> int:
    """Extra pairs per epoch so that they are ``ratio`` of the epoch's pairs: ``num_primary * ratio / (1 - ratio)``,
    rounded (0 without extra pairs).

    Example:
      >>> extra_per_epoch(800, 5000, 0.2), extra_per_epoch(800, 0, 0.2), extra_per_epoch(800, 10, 0.0)
      (200, 0, 0)
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"the mixing ratio must be in [0, 1), got {ratio}")
    return round(num_primary * ratio / (1 - ratio)) if num_extra else 0


def epoch_pairs(primary: np.ndarray, extra: np.ndarray, ratio: float, *, seed: int, epoch: int) -> np.ndarray:
    """The pairs of one epoch: every ``primary`` index, then the epoch's slice of the stream over ``extra``.

    Args:
      primary: ``[N]`` indices of the primary pairs (e.g. the sentences kept for training).
      extra: ``[M]`` indices of the extra pairs (e.g. the dictionary entries kept).
      ratio: the extra pairs' share of each epoch, in ``[0, 1)``.
      seed: seed of the stream's permutations.
      epoch: the epoch (its slice of the stream).

    Returns:
      ``[N + K]`` indices, ``K = extra_per_epoch(N, M, ratio)``, in no particular order (the caller shuffles); an
      extra index appears more than once only when ``K > M``.

    Example:
      >>> epoch_pairs(np.array([0, 1, 2]), np.array([10, 11]), 0.5, seed=0, epoch=0).tolist()[:3]
      [0, 1, 2]
      >>> sorted(np.concatenate([epoch_pairs(np.arange(3), np.array([10, 11]), 0.25, seed=0, epoch=e)[3:]
      ...                        for e in (0, 1)]).tolist())  # two epochs of 1 = one cycle of 2
      [10, 11]
    """
    count = extra_per_epoch(len(primary), len(extra), ratio)
    first, last = epoch * count, (epoch + 1) * count  # this epoch's positions in the stream
    taken = []
    for cycle in range(first // max(len(extra), 1), -(-last // max(len(extra), 1))):
        permutation = np.random.default_rng([seed, _STREAM, cycle]).permutation(len(extra))
        start = cycle * len(extra)
        taken.append(permutation[max(first - start, 0) : last - start])
    chosen = extra[np.concatenate(taken)] if taken else np.zeros(0, np.int64)
    return np.concatenate([primary, chosen]).astype(np.int64)


def bucket_epoch(
    buckets, sizes, boundaries, *, select, seed: int, shuffle: bool, epoch: int, num_batches
) -> batching.Plan:
    """One pair per row, length-bucketed. ``select(epoch=)`` gives the epoch's pairs when mixing (else every kept
    pair); a mixed epoch is cut to ``num_batches``."""
    if select is None:  # one split: every epoch has the same number of batches
        return batching.bucket_plan(
            batching.plan_epoch(buckets, sizes, seed=seed, epoch=epoch, shuffle=shuffle), boundaries
        )
    pairs = select(epoch=epoch)
    plan = batching.bucket_plan(
        batching.plan_epoch(buckets[pairs], sizes, seed=seed, epoch=epoch, shuffle=shuffle), boundaries
    )
    plan = dataclasses.replace(plan, example=pairs[plan.example])
    return plan if num_batches is None else batching.take_batches(plan, num_batches)


def packed_epoch(segments, kept, limits, rows, *, select, seed: int, shuffle: bool, epoch: int, num_batches):
    """Packed rows of the epoch's pairs (``select(epoch=)`` when mixing, else every kept pair)."""
    if select is None:
        return packing.packed_plan(segments, kept, limits, rows, seed=seed, epoch=epoch, shuffle=shuffle,
                                   num_batches=num_batches)  # fmt: skip
    pairs = select(epoch=epoch)
    plan = packing.packed_plan(segments[pairs], np.ones(len(pairs), bool), limits, rows, seed=seed, epoch=epoch,
                               shuffle=shuffle, num_batches=num_batches)  # fmt: skip
    return dataclasses.replace(plan, example=pairs[plan.example])


class Planner:
    """Plans of recent epochs, computed once per process and shared by its prefetch threads.

    Args:
      make_plan: ``(epoch=, num_batches=) -> Plan``; picklable (each worker process plans for itself).
      num_batches: batches per epoch.
    """

    def __init__(self, make_plan: Callable[..., batching.Plan], num_batches: int):
        self.make_plan, self.num_batches = make_plan, num_batches
        self._lock, self._plans = threading.Lock(), {}

    def __getstate__(self):  # a lock does not pickle
        return {"make_plan": self.make_plan, "num_batches": self.num_batches}

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock(), _plans={})

    def __call__(self, epoch: int) -> batching.Plan:
        with self._lock:
            if epoch not in self._plans:
                # Prefetching crosses at most one epoch boundary, so two plans suffice.
                self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
                self._plans[epoch] = self.make_plan(epoch=epoch, num_batches=self.num_batches)
            return self._plans[epoch]
