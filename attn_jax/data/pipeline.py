"""The Grain input pipeline: data source ▸ tokenize ▸ filter/truncate ▸ bucket by length ▸ batch ▸ shard.

Before batching, one pass tokenizes every example to learn its length (``measure_lengths``), so the counts
of dropped and truncated examples are exact and known up front (``PipelineStats``), and each epoch's
batches can be planned deterministically from the seed (``attn_jax.data.batching``). The batches then form
a random-access ``grain.MapDataset``: batch ``i`` depends on ``i`` alone, so its iterator's state is one
index (``get_state``/``set_state``), and a restored run sees byte-identical batches.

Each batch is a dict of ``int32`` NumPy arrays with ``0 = PAD_ID`` as padding, at the end of each row:

* ``inputs``       ``[B, L]``  source ids + ``EOS_ID``
* ``targets_in``   ``[B, L]``  ``BOS_ID`` + target ids (decoder input, teacher forcing)
* ``targets_out``  ``[B, L]``  target ids + ``EOS_ID`` (what the decoder predicts; weights are
  ``targets_out != 0``)
* ``example_index`` ``[B]``   index of the row's example in the source; ``-1`` for filler rows, which
  are all padding (evaluation only)

Batches are planned for the global batch; host ``shard_index`` of ``shard_count`` gets rows
``[shard_index * B, (shard_index + 1) * B)`` of each, so every host steps through the same bucket shapes
in the same order (needed to assemble one global array per step).
"""

import dataclasses
import functools
import math
import threading
from collections.abc import Callable, Iterator
from typing import Literal

import grain
import numpy as np

from attn_jax.data import batching
from attn_jax.data.encoding import PairEncoder, measure_lengths, read_examples
from attn_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How examples become batches.

    Attributes:
      max_length: longest padded row, special ids included.
      overlong: what training does with longer pairs: ``"drop"`` or ``"truncate"``. Evaluation always
        truncates, as it never drops.
      tokens_per_batch: most padded tokens per batch and per side, over all hosts (the paper: 25000).
      batch_multiple: global batch sizes are multiples of this (the number of devices).
      bucket_boundaries: bucket lengths (multiples of 8 advised); ``None`` derives them from
        ``max_length`` with ``batching.bucket_boundaries``.
      seed: seed of the per-epoch shuffle.
      shuffle: shuffle training examples and batches each epoch.
      num_epochs: training epochs; ``None`` repeats forever.
      num_threads: threads that prepare batches ahead of the training step.
      prefetch_buffer_size: batches prepared ahead.
    """

    max_length: int = 256
    overlong: Literal["drop", "truncate"] = "drop"
    tokens_per_batch: int = 4096
    batch_multiple: int = 1
    bucket_boundaries: tuple[int, ...] | None = None
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    num_threads: int = 4
    prefetch_buffer_size: int = 16

    def __post_init__(self):
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (one token and EOS), got {self.max_length}")
        if self.overlong not in ("drop", "truncate"):
            raise ValueError(f"overlong must be 'drop' or 'truncate', got {self.overlong!r}")
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
    """Exact counts of what happened to the examples (the same on every host).

    Attributes:
      num_examples: examples in the source.
      dropped_empty: examples with an empty source or target side, left out (training only).
      dropped_too_long: examples longer than ``max_length``, left out (``overlong="drop"``).
      truncated: examples longer than ``max_length``, cut to it.
      batched_per_epoch: examples in the batches of one epoch (training: full batches only; the rest of
        each bucket waits for a later epoch).
      filler_rows: all-padding rows added to fill the last batch of each bucket (evaluation only).
      batches_per_epoch: number of batches in one epoch.
      examples_per_bucket: bucket length -> examples in that bucket.
      batch_shapes: the static ``(B, L)`` shapes this host sees.
    """

    num_examples: int
    dropped_empty: int
    dropped_too_long: int
    truncated: int
    batched_per_epoch: int
    filler_rows: int
    batches_per_epoch: int
    examples_per_bucket: dict[int, int]
    batch_shapes: tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class Batches:
    """Batches of one split for one host.

    Attributes:
      dataset: random-access batches (``len`` is huge when repeating forever).
      stats: what happened to the examples.
      read_options: threads and prefetch used by ``iterator``.
    """

    dataset: grain.MapDataset
    stats: PipelineStats
    read_options: grain.ReadOptions

    def iterator(self) -> grain.DatasetIterator:
        """A prefetching iterator with ``get_state()``/``set_state()`` for checkpoints."""
        return iter(self.dataset.to_iter_dataset(self.read_options))

    def __iter__(self) -> Iterator[Batch]:
        return self.iterator()


def train_batches(
    source: grain.sources.RandomAccessDataSource,
    encode_pair: PairEncoder,
    config: PipelineConfig,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
    lengths: np.ndarray | None = None,
) -> Batches:
    """Shuffled, length-bucketed training batches, reshuffled every epoch.

    Args:
      source: random-access examples (a TFDS data source, ``CopySource``, a list).
      encode_pair: turns an example into ``(source ids, target ids)``.
      config: batching settings.
      shard_index: this host's index (``jax.process_index()``; ``grain.sharding.ShardByJaxProcess()``
        holds both as ``shard_index`` and ``shard_count``).
      shard_count: number of hosts (``jax.process_count()``).
      lengths: output of ``measure_lengths`` when already known (it is computed otherwise).

    Returns:
      The batches of this host, with stats.

    Example:
      >>> from attn_jax.data.copy_task import CopySource
      >>> from attn_jax.data.encoding import token_pair_encoder
      >>> config = PipelineConfig(max_length=16, tokens_per_batch=64, num_threads=0)
      >>> batches = train_batches(CopySource(50, vocab_size=20, max_length=10), token_pair_encoder(), config)
      >>> batch = next(iter(batches))
      >>> sorted(batch), batch["inputs"].shape in batches.stats.batch_shapes
      (['example_index', 'inputs', 'targets_in', 'targets_out'], True)
    """
    lengths = measure_lengths(source, encode_pair) if lengths is None else lengths
    padded, status = _padded_lengths(lengths, config, evaluation=False)
    boundaries = config.boundaries
    buckets = np.where(status >= 0, batching.assign_buckets(padded, boundaries), -1)
    sizes = batching.batch_sizes(boundaries, config.tokens_per_batch, _multiple(config, shard_count))
    planner = _EpochPlanner(buckets, sizes, seed=config.seed, shuffle=config.shuffle)
    epoch_batches = planner(0)
    if not epoch_batches:
        raise ValueError(f"{len(source)} examples fill no batch of sizes {sizes}: lower tokens_per_batch")
    make_batch = _batch_maker(source, encode_pair, config, shard_index, shard_count)
    num_batches = len(epoch_batches)

    def batch_at(index: int, _: int) -> Batch:
        bucket, examples = planner(index // num_batches)[index % num_batches]
        return make_batch(bucket, examples)

    dataset = grain.MapDataset.range(num_batches).repeat(config.num_epochs).map_with_index(batch_at)
    stats = _stats(lengths, status, buckets, boundaries, sizes, epoch_batches, shard_count)
    return Batches(dataset, stats, _read_options(config))


def eval_batches(
    source: grain.sources.RandomAccessDataSource,
    encode_pair: PairEncoder,
    config: PipelineConfig,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
    lengths: np.ndarray | None = None,
) -> Batches:
    """One pass over every example, bucketed, in a fixed order; nothing is dropped.

    Over-long examples are truncated to ``max_length`` (counted in ``stats.truncated``), and the last batch
    of each bucket is filled with all-padding rows whose ``example_index`` is ``-1`` (so their weights
    ``targets_out != 0`` are zero). Arguments as in ``train_batches``; ``seed``, ``shuffle`` and
    ``num_epochs`` are ignored.

    Returns:
      The batches of this host, with stats.

    Example:
      >>> from attn_jax.data.encoding import token_pair_encoder
      >>> examples = [{"source": [5] * n, "target": [6] * n} for n in (1, 2, 12, 3)]
      >>> config = PipelineConfig(max_length=16, tokens_per_batch=32)
      >>> [batch["example_index"].tolist() for batch in eval_batches(examples, token_pair_encoder(), config)]
      [[0, 1, 3, -1], [2, -1]]
    """
    lengths = measure_lengths(source, encode_pair) if lengths is None else lengths
    padded, status = _padded_lengths(lengths, config, evaluation=True)
    boundaries = config.boundaries
    buckets = batching.assign_buckets(padded, boundaries)
    sizes = batching.batch_sizes(boundaries, config.tokens_per_batch, _multiple(config, shard_count))
    plan = batching.plan_single_pass(buckets, sizes)
    make_batch = _batch_maker(source, encode_pair, config, shard_index, shard_count)
    dataset = grain.MapDataset.range(len(plan)).map(lambda index: make_batch(*plan[index]))
    stats = _stats(lengths, status, buckets, boundaries, sizes, plan, shard_count)
    return Batches(dataset, stats, _read_options(config))


# Status of an example, from `_padded_lengths`.
_KEPT, _TRUNCATED, _DROPPED_EMPTY, _DROPPED_TOO_LONG = 0, 1, -1, -2


def _padded_lengths(lengths: np.ndarray, config: PipelineConfig, *, evaluation: bool) -> tuple[np.ndarray, np.ndarray]:
    """Row length of each example (special ids included, capped) and its status code."""
    # +1: EOS after the source; BOS before / EOS after the target.
    longest = lengths.max(axis=1, initial=0) + 1
    too_long = longest > config.max_length
    status = np.where(too_long, _TRUNCATED, _KEPT)
    if not evaluation:
        if config.overlong == "drop":
            status = np.where(too_long, _DROPPED_TOO_LONG, status)
        status = np.where(lengths.min(axis=1) == 0, _DROPPED_EMPTY, status)
    return np.minimum(longest, config.max_length), status


def _batch_maker(
    source: grain.sources.RandomAccessDataSource,
    encode_pair: PairEncoder,
    config: PipelineConfig,
    shard_index: int,
    shard_count: int,
) -> Callable[[int, np.ndarray], Batch]:
    """``(bucket, planned example indices) -> this host's batch``."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    return functools.partial(
        _collate,
        source=source,
        encode_pair=encode_pair,
        max_length=config.max_length,
        boundaries=config.boundaries,
        # This host's contiguous block of rows of the global batch.
        rows=lambda examples: np.split(examples, shard_count)[shard_index],
    )


def _collate(
    bucket: int,
    examples: np.ndarray,
    *,
    source: grain.sources.RandomAccessDataSource,
    encode_pair: PairEncoder,
    max_length: int,
    boundaries: tuple[int, ...],
    rows: Callable[[np.ndarray], np.ndarray],
) -> Batch:
    """This host's rows of one planned batch, tokenized and padded to the bucket length."""
    examples = rows(examples)
    shape = (len(examples), boundaries[bucket])
    batch = {name: np.full(shape, PAD_ID, np.int32) for name in ("inputs", "targets_in", "targets_out")}
    real = np.flatnonzero(examples != batching.NO_EXAMPLE)
    for row, example in zip(real, read_examples(source, examples[real].tolist()), strict=True):
        inputs, targets_in, targets_out = _teacher_forcing(*encode_pair(example), max_length)
        batch["inputs"][row, : len(inputs)] = inputs
        batch["targets_in"][row, : len(targets_in)] = targets_in
        batch["targets_out"][row, : len(targets_out)] = targets_out
    batch["example_index"] = examples.astype(np.int32)
    return batch


def _teacher_forcing(
    source_ids: np.ndarray, target_ids: np.ndarray, max_length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source + EOS, BOS + target, target + EOS), each cut to ``max_length``.

    A cut target keeps no EOS: the sentence goes on, and the model must not learn to stop there.
    """
    inputs = np.append(source_ids[: max_length - 1], EOS_ID)
    targets_in = np.insert(target_ids[: max_length - 1], 0, BOS_ID)
    fits = len(target_ids) < max_length
    targets_out = np.append(target_ids, EOS_ID) if fits else target_ids[:max_length]
    return inputs, targets_in, targets_out


def _multiple(config: PipelineConfig, shard_count: int) -> int:
    """Global batch sizes must split over devices and over hosts."""
    return math.lcm(config.batch_multiple, shard_count)


def _read_options(config: PipelineConfig) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=config.num_threads, prefetch_buffer_size=config.prefetch_buffer_size)


class _EpochPlanner:
    """Plans of recent epochs, computed once and shared by the prefetch threads."""

    def __init__(self, buckets: np.ndarray, sizes: tuple[int, ...], *, seed: int, shuffle: bool):
        self._buckets, self._sizes, self._seed, self._shuffle = buckets, sizes, seed, shuffle
        self._lock = threading.Lock()
        self._plans: dict[int, list[tuple[int, np.ndarray]]] = {}

    def __call__(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        with self._lock:
            if epoch not in self._plans:
                # Prefetching crosses at most one epoch boundary, so two plans suffice.
                self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
                self._plans[epoch] = batching.plan_epoch(
                    self._buckets, self._sizes, seed=self._seed, epoch=epoch, shuffle=self._shuffle
                )
            return self._plans[epoch]


def _stats(
    lengths: np.ndarray,
    status: np.ndarray,
    buckets: np.ndarray,
    boundaries: tuple[int, ...],
    sizes: tuple[int, ...],
    plan: list[tuple[int, np.ndarray]],
    shard_count: int,
) -> PipelineStats:
    used = np.concatenate([examples for _, examples in plan]) if plan else np.zeros(0, np.int64)
    counts = np.bincount(buckets[buckets >= 0], minlength=len(boundaries))
    shapes = sorted({(sizes[bucket] // shard_count, boundaries[bucket]) for bucket, _ in plan})
    return PipelineStats(
        num_examples=len(lengths),
        dropped_empty=int((status == _DROPPED_EMPTY).sum()),
        dropped_too_long=int((status == _DROPPED_TOO_LONG).sum()),
        truncated=int((status == _TRUNCATED).sum()),
        batched_per_epoch=int((used != batching.NO_EXAMPLE).sum()),
        filler_rows=int((used == batching.NO_EXAMPLE).sum()),
        batches_per_epoch=len(plan),
        examples_per_bucket={length: int(count) for length, count in zip(boundaries, counts, strict=True)},
        batch_shapes=tuple(shapes),
    )
