"""The Grain pipeline: prepared ids ▸ shuffle ▸ pack or bucket ▸ batch ▸ shard, in threads or worker processes.

It starts from a ``PreparedSplit`` (ids in ArrayRecord files and the length of every pair) and reads nothing
else: the lengths decide, per epoch and from the seed alone, which pairs go where (a ``batching.Plan``: length
buckets, or rows packed by ``attn_jax.data.packing``), and batch ``i`` then reads exactly its pairs' ids and lays
them out with a few vectorised NumPy operations. As batch ``i`` depends on ``i`` alone, the batches form a
random-access ``grain.MapDataset``; the iterator's state is the index of the next batch
(``{"next_index": i}``), so a restored run sees byte-identical batches whatever the number of threads or worker
processes (``worker_count``: Grain's multiprocess prefetch, each worker assembling every ``worker_count``-th batch).
A second prepared split can be mixed into the training pairs at a ratio (``mixed_in``, ``mix_ratio``: the Ding
dictionary's entries among its sentences), per epoch and from the seed alone (``attn_jax.data.epochs``), so this
holds with mixing too. Ids come from memory when the split fits under ``in_memory_bytes``, else from its files.

Each batch is a dict of ``int32`` NumPy arrays with ``0 = PAD_ID`` as padding:

* ``inputs``       ``[B, S]``  source ids + ``EOS_ID`` (translation only)
* ``targets_in``   ``[B, T]``  ``BOS_ID`` + target ids (decoder input, teacher forcing)
* ``targets_out``  ``[B, T]``  target ids + ``EOS_ID`` (what the decoder predicts; weights are
  ``targets_out != 0``); a pair cut at the row length keeps no EOS (the sentence goes on)
* packed batches: ``inputs_segment_ids``, ``inputs_positions``, ``targets_segment_ids``, ``targets_positions``
  ``[B, S]`` / ``[B, T]``: 1, 2, ... per pair in its row (0 = padding) and positions restarting at 0 per pair
* unpacked batches: ``example_index`` ``[B]``: the row's pair, ``-1`` for all-padding filler rows (evaluation)

Bucketed batches have ``S = T`` = the bucket length; packed rows are ``(L_s, L_t)`` long (see ``packing``).
Batches are planned for the global batch; host ``shard_index`` of ``shard_count`` gets rows
``[shard_index * B, (shard_index + 1) * B)`` of each, so every host steps through the same shapes.
"""

import ctypes
import dataclasses
import functools
import math
import os
import signal
import sys
from collections.abc import Iterator
from typing import Literal

import grain
import numpy as np
from absl import flags

from attn_jax.data import batching, epochs, packing
from attn_jax.data.assembly import assemble
from attn_jax.data.prepared import PreparedSplit, concatenate

Batch = dict[str, np.ndarray]
_PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How prepared pairs become batches.

    Attributes:
      max_length: longest row (special ids included); longer pairs are dropped or truncated.
      overlong: what training does with longer pairs: ``"drop"`` or ``"truncate"``. Evaluation always
        truncates, as it never drops.
      tokens_per_batch: most padded tokens per batch and per side, over all hosts (the paper: 25000).
      batch_multiple: global batch sizes are multiples of this (the number of devices).
      bucket_boundaries: bucket lengths (multiples of 8 advised); ``None`` derives them from
        ``max_length`` with ``batching.bucket_boundaries``.
      packing: pack several pairs into each row (training only) instead of one pair per bucketed row.
      task: ``"translation"`` or ``"lm"`` (target side only: no ``inputs``).
      seed: seed of the per-epoch shuffle.
      shuffle: shuffle training pairs and batches each epoch.
      num_epochs: training epochs; ``None`` repeats forever.
      num_threads: threads that assemble batches ahead of the training step (without worker processes).
      prefetch_buffer_size: batches assembled ahead.
      worker_count: Grain worker processes assembling batches; 0 = threads of this process.
      worker_buffer_size: batches each worker process prepares ahead.
      mix_ratio: share of each training epoch's pairs drawn from the ``mixed_in`` split of ``train_batches``,
        in ``[0, 1)``.
      in_memory_bytes: a split whose ids take at most this many bytes is read into memory once (per process)
        instead of from its files per batch; 0 always reads the files.
    """

    max_length: int = 256
    overlong: Literal["drop", "truncate"] = "drop"
    tokens_per_batch: int = 4096
    batch_multiple: int = 1
    bucket_boundaries: tuple[int, ...] | None = None
    packing: bool = False
    task: Literal["translation", "lm"] = "translation"
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    num_threads: int = 4
    prefetch_buffer_size: int = 16
    worker_count: int = 0
    worker_buffer_size: int = 2
    mix_ratio: float = 0.0
    in_memory_bytes: int = 256 << 20

    def __post_init__(self):
        if not 0 <= self.mix_ratio < 1:
            raise ValueError(f"mix_ratio must be in [0, 1), got {self.mix_ratio}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (one token and EOS), got {self.max_length}")
        if self.overlong not in ("drop", "truncate"):
            raise ValueError(f"overlong must be 'drop' or 'truncate', got {self.overlong!r}")
        if self.task not in ("translation", "lm"):
            raise ValueError(f"task must be 'translation' or 'lm', got {self.task!r}")
        if self.bucket_boundaries is not None and (
            list(self.bucket_boundaries) != sorted(set(self.bucket_boundaries))
            or self.bucket_boundaries[-1] < self.max_length
        ):
            raise ValueError(
                f"bucket_boundaries must increase and end at >= max_length={self.max_length}, "
                f"got {self.bucket_boundaries}"
            )

    @property
    def boundaries(self) -> tuple[int, ...]:
        """The bucket lengths in use."""
        return self.bucket_boundaries or batching.bucket_boundaries(self.max_length)


@dataclasses.dataclass(frozen=True)
class PipelineStats:
    """Exact counts of what happened to the pairs (the same on every host).

    Attributes:
      num_examples: pairs in the split (with the mixed-in split's after them, when mixing).
      dropped_empty: pairs with an empty side (the target side for ``lm``), left out (training only).
      dropped_too_long: pairs longer than a row, left out (``overlong="drop"``).
      truncated: pairs longer than a row, cut to it.
      batched_per_epoch: pairs in the batches of one epoch (training: full batches only; the rest waits for a
        later epoch).
      filler_rows: all-padding rows added to fill the last batch of each bucket (evaluation only).
      batches_per_epoch: batches in one epoch.
      examples_per_bucket: bucket length -> pairs in that bucket (empty when packing).
      batch_shapes: the static ``(B, S, T)`` shapes this host sees (rows, source and target row length).
      packing: whether rows are packed.
      pairs_per_row: pairs per row, averaged over the epoch.
      padding_fraction: share of padding among the token slots of the epoch's batches, both sides together.
      padding_fraction_inputs / padding_fraction_targets: the same per side (``inputs`` is 0 for ``lm``).
      mixed_in_per_epoch: pairs of the mixed-in split among ``batched_per_epoch`` (0 without mixing).
    """

    num_examples: int
    dropped_empty: int
    dropped_too_long: int
    truncated: int
    batched_per_epoch: int
    filler_rows: int
    batches_per_epoch: int
    examples_per_bucket: dict[int, int]
    batch_shapes: tuple[tuple[int, int, int], ...]
    packing: bool
    pairs_per_row: float
    padding_fraction: float
    padding_fraction_inputs: float
    padding_fraction_targets: float
    mixed_in_per_epoch: int = 0


class Batches:
    """Batches of one split for one host: ``iterator()`` gives a fresh, checkpointable iterator.

    Attributes:
      dataset: random-access batches (``len`` is huge when repeating forever).
      stats: what happened to the pairs.
      config: the pipeline settings (threads, worker processes).
    """

    def __init__(self, dataset: grain.MapDataset, stats: PipelineStats, config: PipelineConfig):
        self.dataset, self.stats, self.config = dataset, stats, config

    def iterator(self) -> "BatchIterator":
        """An iterator with ``get_state()`` / ``set_state()`` for checkpoints; workers start at the first batch."""
        return BatchIterator(self.dataset, self.config)

    def __iter__(self) -> Iterator[Batch]:
        return self.iterator()


class BatchIterator:
    """Iterates over a ``Batches`` dataset from a given index, in threads or Grain worker processes.

    Its state is ``{"next_index": i}`` (the form Grain's own ``MapDataset`` iterators save): batch ``i`` is a
    function of ``i``, so restoring it, with any number of threads or workers, continues byte for byte.
    """

    def __init__(self, dataset: grain.MapDataset, config: PipelineConfig, next_index: int = 0):
        self._dataset, self._config, self._next_index = dataset, config, next_index
        self._iterator = None

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> Batch:
        if self._iterator is None:
            self._iterator = iter(self._grain_dataset(self._next_index))
        batch = next(self._iterator)
        self._next_index += 1
        return batch

    def get_state(self) -> dict:
        return {"next_index": self._next_index}

    def set_state(self, state: dict) -> None:
        self.close()
        self._next_index = int(state["next_index"])

    def close(self) -> None:
        """Stops the worker processes or threads (a later ``next`` starts them again)."""
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None

    def _grain_dataset(self, start: int) -> grain.IterDataset:
        config = self._config
        remaining = self._dataset[start:] if start else self._dataset
        if config.worker_count == 0:
            options = grain.ReadOptions(
                num_threads=config.num_threads, prefetch_buffer_size=config.prefetch_buffer_size
            )
            return remaining.to_iter_dataset(options)
        # Grain reads its options from absl flags, which a program that is not an absl app never parses: their
        # defaults then stand.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        # In the workers a batch is assembled in one thread; the parent only passes batches on.
        dataset = remaining.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        options = grain.MultiprocessingOptions(
            num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size
        )
        return dataset.mp_prefetch(options, worker_init_fn=functools.partial(_exit_with_parent, os.getpid()))


def _exit_with_parent(parent: int, worker_index: int, worker_count: int) -> None:
    """Runs first in each Grain worker: the worker dies with the training process, so a run killed with SIGKILL
    (preemption) leaves no orphans blocked on a full queue."""
    del worker_index, worker_count
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(0)


def train_batches(
    split: PreparedSplit,
    config: PipelineConfig,
    *,
    mixed_in: PreparedSplit | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
) -> Batches:
    """Shuffled training batches, bucketed or packed, reshuffled (and repacked) every epoch.

    Args:
      split: the prepared ids and lengths.
      config: batching settings.
      mixed_in: a second split mixed into every epoch's pairs at ``config.mix_ratio`` (``attn_jax.data.epochs``);
        its pairs are indexed after ``split``'s (``example_index``). Unused when the ratio is 0.
      shard_index: this host's index (``jax.process_index()``).
      shard_count: number of hosts (``jax.process_count()``).

    Returns:
      The batches of this host, with stats.
    """
    _check_shard(shard_index, shard_count)
    primary = len(split)
    select = None
    if mixed_in is not None and config.mix_ratio > 0:
        split = concatenate(split, mixed_in)
    limits, status = _row_limits(split.lengths, config, evaluation=False, primary=primary)
    segments = _segments(split.lengths, limits, config.task)
    kept = status >= 0
    if len(split) > primary:
        kept_primary, kept_mixed = np.flatnonzero(kept[:primary]), primary + np.flatnonzero(kept[primary:])
        select = functools.partial(epochs.epoch_pairs, kept_primary, kept_mixed, config.mix_ratio, seed=config.seed)
    multiple = math.lcm(config.batch_multiple, shard_count)
    common = {"select": select, "seed": config.seed, "shuffle": config.shuffle}
    if config.packing:
        rows = config.tokens_per_batch // max(limits) // multiple * multiple
        if rows < 1:
            raise ValueError(f"tokens_per_batch={config.tokens_per_batch} cannot hold {multiple} rows of {max(limits)}")
        buckets = None
        make_plan = functools.partial(epochs.packed_epoch, segments, kept, limits, rows, **common)
    else:
        boundaries = config.boundaries
        buckets = np.where(kept, batching.assign_buckets(segments.max(axis=1), boundaries), -1)
        sizes = batching.batch_sizes(boundaries, config.tokens_per_batch, multiple)
        make_plan = functools.partial(epochs.bucket_epoch, buckets, sizes, boundaries, **common)
    full = len(make_plan(epoch=0, num_batches=None))
    # The number of packed rows (and, mixing, of each bucket's pairs) varies a little per epoch, the batch count
    # may not: every epoch gets the count of the first less 0.5% (thousands of rows on WMT, far above the
    # variation), see batching.take_batches. One split's bucketed epochs all have the same count.
    num_batches = full - full // 200 if config.packing or select is not None else full
    if num_batches < 1:
        raise ValueError(
            f"{len(split)} pairs fill no batch of {config.tokens_per_batch} tokens: lower tokens_per_batch"
        )
    planner = epochs.Planner(make_plan, num_batches)
    first = planner(0)
    assemble = _Assembler(split, limits, config, shard_index, shard_count, planner)
    dataset = grain.MapDataset.range(planner.num_batches).repeat(config.num_epochs).map_with_index(assemble)
    stats = _stats(split.lengths, status, segments, buckets, first, config, shard_count, filler_rows=0)
    stats = dataclasses.replace(stats, mixed_in_per_epoch=int((first.example >= primary).sum()))
    return Batches(dataset, stats, config)


def eval_batches(
    split: PreparedSplit, config: PipelineConfig, *, shard_index: int = 0, shard_count: int = 1
) -> Batches:
    """One pass over every pair, bucketed (never packed), in a fixed order; nothing is dropped.

    Over-long pairs are truncated to ``max_length`` (counted in ``stats.truncated``), and the last batch of each
    bucket is filled with all-padding rows whose ``example_index`` is ``-1`` (so their weights ``targets_out !=
    0`` are zero). Arguments as in ``train_batches``; ``packing``, ``seed``, ``shuffle``, ``num_epochs`` and
    ``worker_count`` are ignored.

    Returns:
      The batches of this host, with stats.
    """
    _check_shard(shard_index, shard_count)
    config = dataclasses.replace(config, packing=False, worker_count=0)
    limits, status = _row_limits(split.lengths, config, evaluation=True)
    segments = _segments(split.lengths, limits, config.task)
    boundaries = config.boundaries
    buckets = batching.assign_buckets(segments.max(axis=1), boundaries)
    sizes = batching.batch_sizes(boundaries, config.tokens_per_batch, math.lcm(config.batch_multiple, shard_count))
    single_pass = batching.plan_single_pass(buckets, sizes)
    plan = batching.bucket_plan(single_pass, boundaries)
    fillers = sum(int((rows == batching.NO_EXAMPLE).sum()) for _, rows in single_pass)
    planner = epochs.Planner(lambda epoch, num_batches: plan, len(plan))
    dataset = grain.MapDataset.range(len(plan)).map_with_index(_Assembler(split, limits, config, shard_index,
                                                                          shard_count, planner))  # fmt: skip
    stats = _stats(split.lengths, status, segments, buckets, plan, config, shard_count, filler_rows=fillers)
    return Batches(dataset, stats, config)


# Status of a pair, from `_row_limits`.
_KEPT, _TRUNCATED, _DROPPED_EMPTY, _DROPPED_TOO_LONG = 0, 1, -1, -2


def _row_limits(
    lengths: np.ndarray, config: PipelineConfig, *, evaluation: bool, primary: int | None = None
) -> tuple[tuple[int, int], np.ndarray]:
    """The most tokens a pair may take on each side (special ids included) and each pair's status.

    Unpacked rows allow ``max_length`` on each side; packed rows are ``packing.packed_row_lengths`` long, measured
    on the pairs an epoch holds (the first ``primary`` pairs, and the mixed-in ones after them as often as an
    epoch takes them).
    """
    limits = (config.max_length, config.max_length)
    if config.packing and not evaluation:
        segments = _segments(lengths, limits, config.task)
        if primary is not None and len(lengths) > primary:
            mixed = epochs.extra_per_epoch(primary, len(lengths) - primary, config.mix_ratio)
            share = np.where(np.arange(len(lengths)) < primary, 1.0, mixed / (len(lengths) - primary))
            segments = segments * share[:, None]
        limits = packing.packed_row_lengths(segments, config.max_length)
    segments_uncut = _segments(lengths, (np.iinfo(np.int32).max,) * 2, config.task)
    too_long = (segments_uncut > np.asarray(limits)).any(axis=1)
    status = np.where(too_long, _TRUNCATED, _KEPT)
    if not evaluation:
        if config.overlong == "drop":
            status = np.where(too_long, _DROPPED_TOO_LONG, status)
        sides = lengths if config.task == "translation" else lengths[:, 1:]
        status = np.where(sides.min(axis=1, initial=np.iinfo(np.int32).max) == 0, _DROPPED_EMPTY, status)
    return limits, status


def _segments(lengths: np.ndarray, limits: tuple[int, int], task: str) -> np.ndarray:
    """``[N, 2]`` tokens each pair takes in its row(s): source + EOS, BOS + target (or target + EOS), capped."""
    source = np.minimum(lengths[:, 0].astype(np.int64) + 1, limits[0])
    target = np.minimum(lengths[:, 1].astype(np.int64) + 1, limits[1])
    return np.stack([source if task == "translation" else np.zeros_like(source), target], axis=1)


def _check_shard(shard_index: int, shard_count: int) -> None:
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")


class _Assembler:
    """``(index, _) -> this host's rows of batch index``: reads the planned pairs' ids and lays them out."""

    def __init__(self, split: PreparedSplit, limits, config: PipelineConfig, shard_index, shard_count, planner):
        self._ids, self._lengths = split.reader(config.in_memory_bytes), split.lengths
        self._limits, self._config, self._planner = limits, config, planner
        self._shard_index, self._shard_count = shard_index, shard_count

    def __call__(self, index: int, _: int) -> Batch:
        per_epoch = self._planner.num_batches
        plan = self._planner(index // per_epoch)
        batch = index % per_epoch
        items = plan.items(batch)
        rows = int(plan.rows[batch]) // self._shard_count
        first_row = self._shard_index * rows
        row = plan.row[items]
        mine = (row >= first_row) & (row < first_row + rows)
        example = plan.example[items][mine]
        return assemble(
            self._ids.read(example), self._lengths[example], row[mine] - first_row, plan.offset[items][mine], rows,
            tuple(int(n) for n in plan.lengths[batch]), self._limits, packed=self._config.packing,
            translation=self._config.task == "translation", example=example,
        )  # fmt: skip


def _stats(
    lengths, status, segments, buckets, plan: batching.Plan, config, shard_count, *, filler_rows
) -> PipelineStats:
    used = segments[plan.example]
    slots = (plan.rows[:, None] * plan.lengths).sum(axis=0) if len(plan) else np.zeros(2, np.int64)
    real = used.sum(axis=0)
    padding = 1 - real / np.maximum(slots, 1)
    sides = slice(0, 2) if config.task == "translation" else slice(1, 2)
    counts = {}
    if buckets is not None:
        histogram = np.bincount(buckets[buckets >= 0], minlength=len(config.boundaries))
        counts = {length: int(n) for length, n in zip(config.boundaries, histogram, strict=True)}
    shapes = {(int(r) // shard_count, int(s), int(t)) for r, (s, t) in zip(plan.rows, plan.lengths, strict=True)}
    return PipelineStats(
        num_examples=len(lengths),
        dropped_empty=int((status == _DROPPED_EMPTY).sum()),
        dropped_too_long=int((status == _DROPPED_TOO_LONG).sum()),
        truncated=int((status == _TRUNCATED).sum()),
        batched_per_epoch=len(plan.example),
        filler_rows=filler_rows,
        batches_per_epoch=len(plan),
        examples_per_bucket=counts,
        batch_shapes=tuple(sorted(shapes)),
        packing=config.packing,
        pairs_per_row=float(len(plan.example) / max(int(plan.rows.sum()), 1)),
        padding_fraction=float(1 - real[sides].sum() / max(int(slots[sides].sum()), 1)),
        padding_fraction_inputs=float(padding[0]) if config.task == "translation" else 0.0,
        padding_fraction_targets=float(padding[1]),
    )
