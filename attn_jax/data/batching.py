"""Length bucketing with a token budget (paper §5.1: "Sentence pairs were batched together by approximate
sequence length. Each training batch contained a set of sentence pairs containing approximately 25000
source tokens and 25000 target tokens").

Pure NumPy, no I/O: given the padded length of every example, these functions decide which examples go
into which batch. Every batch has one of a few static shapes ``[B_b, L_b]``: ``L_b`` is a bucket
boundary (a multiple of 8) and ``B_b = tokens_per_batch // L_b`` rounded down to a multiple of
``batch_multiple``, so a jitted step compiles once per bucket and batches split evenly across devices.
"""

import dataclasses
import math

import numpy as np

# Dummy rows in evaluation batches point here.
NO_EXAMPLE = -1


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where each pair goes in the batches of one epoch (or of one evaluation pass): for bucketed and packed
    batches alike, so one function assembles both (``attn_jax.data.pipeline``).

    Attributes:
      starts: ``[num_batches + 1]``: the items of batch ``k`` are ``starts[k]:starts[k + 1]``.
      example: ``[M]`` pair index of each item.
      row: ``[M]`` its row in the (global) batch.
      offset: ``[M, 2]`` the first column of its source and of its target segment in that row.
      rows: ``[num_batches]`` rows of each global batch.
      lengths: ``[num_batches, 2]`` row lengths of each batch (source side, target side).
    """

    starts: np.ndarray
    example: np.ndarray
    row: np.ndarray
    offset: np.ndarray
    rows: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def items(self, index: int) -> slice:
        """The items of batch ``index``."""
        return slice(int(self.starts[index]), int(self.starts[index + 1]))


def bucket_plan(batches: list[tuple[int, np.ndarray]], boundaries: tuple[int, ...]) -> Plan:
    """A ``Plan`` of one pair per row from ``plan_epoch`` or ``plan_single_pass`` output (``NO_EXAMPLE`` rows
    stay empty).

    Example:
      >>> plan = bucket_plan([(0, np.array([4, -1])), (1, np.array([2, 3]))], (8, 16))
      >>> plan.starts.tolist(), plan.example.tolist(), plan.row.tolist(), plan.lengths.tolist()
      ([0, 1, 3], [4, 2, 3], [0, 0, 1], [[8, 8], [16, 16]])
    """
    examples = [rows for _, rows in batches]
    flat = np.concatenate(examples) if examples else np.zeros(0, np.int64)
    row = np.concatenate([np.arange(len(rows)) for rows in examples]) if examples else np.zeros(0, np.int64)
    real = flat != NO_EXAMPLE
    counts = np.array([int((rows != NO_EXAMPLE).sum()) for rows in examples], np.int64)
    length = np.array([boundaries[bucket] for bucket, _ in batches], np.int64)
    return Plan(
        starts=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        example=flat[real],
        row=row[real],
        offset=np.zeros((int(real.sum()), 2), np.int64),
        rows=np.array([len(rows) for rows in examples], np.int64),
        lengths=np.stack([length, length], axis=1) if len(length) else np.zeros((0, 2), np.int64),
    )


def take_batches(plan: Plan, num_batches: int) -> Plan:
    """``plan`` cut (or cycled) to ``num_batches`` batches: batch ``k`` is ``plan``'s batch ``k % len(plan)``.

    For epochs whose batch count varies (packing, mixed sources): every epoch gets the same count, so that batch
    ``i`` of a run stays a function of ``i``.

    Example:
      >>> plan = bucket_plan([(0, np.array([4, 5])), (1, np.array([2]))], (8, 16))
      >>> cut = take_batches(plan, 3)
      >>> cut.starts.tolist(), cut.example.tolist(), cut.lengths[:, 0].tolist()
      ([0, 2, 3, 5], [4, 5, 2, 4, 5], [8, 16, 8])
    """
    chosen = np.arange(num_batches) % max(len(plan), 1)
    sizes = (plan.starts[1:] - plan.starts[:-1])[chosen]
    items = [np.arange(plan.starts[k], plan.starts[k + 1]) for k in chosen]
    items = np.concatenate(items).astype(np.int64) if items else np.zeros(0, np.int64)
    return Plan(
        starts=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        example=plan.example[items],
        row=plan.row[items],
        offset=plan.offset[items],
        rows=plan.rows[chosen],
        lengths=plan.lengths[chosen],
    )


def bucket_boundaries(max_length: int, *, multiple: int = 8, growth: float = 1.5) -> tuple[int, ...]:
    """Bucket lengths: multiples of ``multiple``, growing by about ``growth``, the last covering ``max_length``.

    Args:
      max_length: longest padded sequence.
      multiple: every boundary is a multiple of this.
      growth: ratio between neighbouring boundaries; fewer, coarser buckets as it grows.

    Returns:
      Increasing boundaries; an example of length ``n`` goes to the first one ``>= n``.

    Example:
      >>> bucket_boundaries(256)
      (8, 16, 24, 40, 64, 96, 144, 216, 256)
    """
    if max_length < 1 or multiple < 1 or growth <= 1:
        raise ValueError(f"need max_length, multiple >= 1 and growth > 1, got {max_length}, {multiple}, {growth}")
    last = _round_up(max_length, multiple)
    boundaries = [multiple]
    while boundaries[-1] < last:
        grown = _round_up(math.ceil(boundaries[-1] * growth), multiple)
        boundaries.append(min(max(grown, boundaries[-1] + multiple), last))
    return tuple(boundaries)


def batch_sizes(boundaries: tuple[int, ...], tokens_per_batch: int, batch_multiple: int) -> tuple[int, ...]:
    """Rows per batch of each bucket: as many as the token budget allows, a multiple of ``batch_multiple``.

    Args:
      boundaries: bucket lengths.
      tokens_per_batch: most padded tokens per batch and per side (source, target), across all hosts.
      batch_multiple: every batch size is a multiple of this (e.g. the number of devices).

    Returns:
      One batch size per bucket, each ``* boundary <= tokens_per_batch``.

    Raises:
      ValueError: the budget cannot hold ``batch_multiple`` rows of some bucket.

    Example:
      >>> batch_sizes((8, 16, 24), tokens_per_batch=100, batch_multiple=2)
      (12, 6, 4)
    """
    sizes = tuple((tokens_per_batch // length) // batch_multiple * batch_multiple for length in boundaries)
    if min(sizes) < 1:
        raise ValueError(
            f"tokens_per_batch={tokens_per_batch} cannot hold {batch_multiple} rows of length "
            f"{max(boundaries)}: raise it to at least {batch_multiple * max(boundaries)}"
        )
    return sizes


def assign_buckets(lengths: np.ndarray, boundaries: tuple[int, ...]) -> np.ndarray:
    """Index of the smallest bucket that holds each length.

    Args:
      lengths: padded lengths, ``[N]``; each at most ``boundaries[-1]``.
      boundaries: bucket lengths.

    Returns:
      ``int64`` bucket indices, ``[N]``.

    Example:
      >>> assign_buckets(np.array([1, 8, 9, 24]), (8, 16, 24)).tolist()
      [0, 0, 1, 2]
    """
    if lengths.size and lengths.max() > boundaries[-1]:
        raise ValueError(f"length {lengths.max()} exceeds the last bucket {boundaries[-1]}")
    return np.searchsorted(np.asarray(boundaries), lengths, side="left")


def plan_epoch(
    buckets: np.ndarray, sizes: tuple[int, ...], *, seed: int, epoch: int, shuffle: bool = True
) -> list[tuple[int, np.ndarray]]:
    """Training batches of one epoch: full batches only, examples and batch order shuffled per epoch.

    The examples left over in each bucket (fewer than a batch) are skipped this epoch; as the shuffle
    changes per epoch, other examples are skipped next time. The number of batches is the same every
    epoch.

    Args:
      buckets: bucket index per example, ``[N]``; negative means "not used".
      sizes: batch size per bucket.
      seed: shuffle seed.
      epoch: epoch number, mixed into the seed.
      shuffle: if False, examples keep index order and batches are ordered by bucket.

    Returns:
      ``(bucket, example indices [sizes[bucket]])`` per batch.

    Example:
      >>> batches = plan_epoch(np.array([0, 0, 1, 0, 1]), (2, 2), seed=0, epoch=0, shuffle=False)
      >>> [(bucket, rows.tolist()) for bucket, rows in batches]
      [(0, [0, 1]), (1, [2, 4])]
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(buckets)) if shuffle else np.arange(len(buckets))
    order = order[buckets[order] >= 0]
    # A stable sort keeps the shuffled order inside each bucket.
    order = order[np.argsort(buckets[order], kind="stable")]
    batches = []
    for bucket, size in enumerate(sizes):
        members = order[buckets[order] == bucket]
        full = len(members) // size * size
        batches += [(bucket, rows) for rows in members[:full].reshape(-1, size)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def plan_single_pass(buckets: np.ndarray, sizes: tuple[int, ...]) -> list[tuple[int, np.ndarray]]:
    """Evaluation batches: every example exactly once, in index order within each bucket.

    The last batch of a bucket is filled up with ``NO_EXAMPLE`` rows.

    Args:
      buckets: bucket index per example, ``[N]``; all must be ``>= 0``.
      sizes: batch size per bucket.

    Returns:
      ``(bucket, example indices [sizes[bucket]])`` per batch, ordered by bucket.

    Example:
      >>> [(b, rows.tolist()) for b, rows in plan_single_pass(np.array([0, 1, 0, 0]), (2, 2))]
      [(0, [0, 2]), (0, [3, -1]), (1, [1, -1])]
    """
    if (buckets < 0).any():
        raise ValueError("every example needs a bucket in a single pass")
    batches = []
    for bucket, size in enumerate(sizes):
        members = np.flatnonzero(buckets == bucket)
        padded = np.full(_round_up(len(members), size), NO_EXAMPLE, dtype=np.int64)
        padded[: len(members)] = members
        batches += [(bucket, rows) for rows in padded.reshape(-1, size)]
    return batches


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
