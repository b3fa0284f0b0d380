"""Packing: several sentence pairs share each row of a batch, on the encoder and the decoder side alike.

Length bucketing (``attn_jax.data.batching``) pads every pair to its bucket: on WMT-like lengths about a quarter
of the tokens of a batch are padding. Packing instead lays pairs end to end in rows of fixed length, as
tensor2tensor, T5X, MaxText and flax's wmt example do; each pair keeps its own segment id (1, 2, ... in its row,
0 = padding) and positions that restart at 0, so that attention, positions and the loss see every pair alone.

A pair occupies the same row on both sides, at its own offset on each. Rows hold ``L_s`` source and ``L_t``
target tokens: the side with more tokens in all gets ``max_length``, the other the corresponding share (rounded
to a multiple of 8). With equal lengths, the shorter side (English next to German) would keep its whole length
difference as padding (~10% on WMT).

The plan is pure NumPy on the prepared lengths, no ids read: best-fit over ``open_rows`` open rows per window of
``window`` pairs, all windows advancing in lockstep (one vectorised step per pair position), so an epoch of
WMT's 4.5M pairs is planned in about a second. A pair goes to the open row it fills most tightly on its tighter
side; when none has room, the fullest row closes and a new one opens.
"""

import math

import numpy as np

from attn_jax.data.batching import Plan, take_batches

# Open rows per window and pairs per window: measured on WMT-like lengths (log-normal, median 23 tokens, target
# 8% longer, rows of 256), padding falls from 5.4% (16 rows, one length for both sides) to 3.6% (16 rows, per-side
# lengths); 64 open rows gain 0.1% more. Windows of 8192 pairs leave the partly filled last rows of each window
# under 1% of its rows.
OPEN_ROWS = 16
WINDOW = 8192


def packed_row_lengths(segments: np.ndarray, max_length: int, *, multiple: int = 8) -> tuple[int, int]:
    """Row lengths ``(L_s, L_t)``: ``max_length`` for the side with more tokens, its share for the other.

    Args:
      segments: ``[N, 2]`` tokens each pair takes on each side (special ids included), at most ``max_length``.
      max_length: the longer side's row length.
      multiple: the shorter side's length is rounded to a multiple of this (and kept in ``[multiple,
        max_length]``).

    Returns:
      ``(L_s, L_t)``.

    Example:
      >>> packed_row_lengths(np.array([[10, 12], [20, 24]]), 64)
      (56, 64)
    """
    totals = segments.sum(axis=0, dtype=np.int64)
    if totals.min() == 0:
        return max_length, max_length
    ratio = float(totals.min() / totals.max())
    shorter = min(max_length, max(multiple, round(max_length * ratio / multiple) * multiple))
    return (shorter, max_length) if totals[0] < totals[1] else (max_length, shorter)


def pack_rows(
    segments: np.ndarray,
    capacity: tuple[int, int],
    *,
    open_rows: int = OPEN_ROWS,
    window: int = WINDOW,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Packs pairs, in the order given, into rows of ``capacity`` tokens per side.

    Args:
      segments: ``[N, 2]`` tokens of each pair on the source and target side, each ``<= capacity``.
      capacity: ``(L_s, L_t)`` tokens per row on each side.
      open_rows: rows a pair can go to (per window).
      window: pairs packed together; windows are independent, their rows numbered one after the other.

    Returns:
      ``(row [N], offset [N, 2], num_rows)``: each pair's row, and the first column it takes on each side.
      Rows are numbered in the order they were opened; no row is empty.

    Example:
      >>> row, offset, count = pack_rows(np.array([[3, 4], [5, 4], [2, 2]]), (8, 8))
      >>> row.tolist(), offset.tolist(), count
      ([0, 0, 1], [[0, 0], [3, 4], [0, 0]], 2)
    """
    count = len(segments)
    if count == 0:
        return np.zeros(0, np.int64), np.zeros((0, 2), np.int64), 0
    if (segments > np.asarray(capacity)).any() or (segments < 0).any():
        raise ValueError(f"every pair must fit a row of {capacity} tokens")
    windows = math.ceil(count / window)
    width = math.ceil(count / windows)
    # [pairs] -> [windows, width]; empty pairs (0, 0) fill the last window and fit anywhere.
    filled = np.zeros((windows * width, 2), np.int64)
    filled[:count] = segments
    source, target = filled[:, 0].reshape(windows, width), filled[:, 1].reshape(windows, width)
    length_s, length_t = capacity
    free_s = np.full((windows, open_rows), length_s)
    free_t = np.full((windows, open_rows), length_t)
    row_id = np.tile(np.arange(open_rows), (windows, 1))  # the row each open slot holds
    next_row = np.full(windows, open_rows)
    rows = np.empty((windows, width), np.int64)
    offsets = np.empty((windows, width, 2), np.int64)
    every = np.arange(windows)
    for column in range(width):
        left_s, left_t = free_s - source[:, column, None], free_t - target[:, column, None]
        fits = (left_s >= 0) & (left_t >= 0)
        # Room left on the tighter side, in a common unit (length_s * length_t per row): smaller is tighter.
        tightness = np.maximum(left_s * length_t, left_t * length_s)
        slot = np.where(fits, tightness, np.iinfo(np.int64).max).argmin(axis=1)
        stuck = ~fits[every, slot]
        if stuck.any():  # close the fullest row, open a new one in its slot
            fullest = np.minimum(free_s * length_t, free_t * length_s).argmin(axis=1)
            slot = np.where(stuck, fullest, slot)
            which, where = every[stuck], slot[stuck]
            free_s[which, where], free_t[which, where] = length_s, length_t
            row_id[which, where] = next_row[which]
            next_row[which] += 1
        rows[:, column] = row_id[every, slot]
        offsets[:, column] = np.stack([length_s - free_s[every, slot], length_t - free_t[every, slot]], axis=1)
        free_s[every, slot] -= source[:, column]
        free_t[every, slot] -= target[:, column]
    # Rows of window w follow those of windows < w; slots never used are dropped by renumbering.
    first_row = np.concatenate([[0], np.cumsum(next_row)[:-1]])
    global_rows = (rows + first_row[:, None]).reshape(-1)[:count]
    used, renumbered = np.unique(global_rows, return_inverse=True)
    return renumbered.astype(np.int64), offsets.reshape(-1, 2)[:count], len(used)


def packed_plan(
    segments: np.ndarray,
    kept: np.ndarray,
    capacity: tuple[int, int],
    rows_per_batch: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    num_batches: int | None = None,
) -> Plan:
    """Packed training batches of one epoch: the kept pairs shuffled (per epoch), packed, rows cut into batches.

    Args:
      segments: ``[N, 2]`` tokens each pair takes on each side, special ids included.
      kept: ``[N]`` bool: pairs to use.
      capacity: ``(L_s, L_t)`` row lengths.
      rows_per_batch: rows of each (global) batch.
      seed: shuffle seed; the epoch is mixed in, so every epoch packs differently.
      epoch: the epoch.
      shuffle: if False, pairs are packed in index order.
      num_batches: batches the epoch must have: packing varies a little from epoch to epoch, so every epoch is
        cut to the same count (a few spare rows go unused); the rare epoch that packs into fewer repeats its first
        batches. None keeps all full batches.

    Returns:
      The ``Plan``; the rows left over after the last full batch wait for a later epoch.

    Example:
      >>> segments = np.array([[3, 4], [5, 4], [2, 2], [6, 6], [1, 1]])
      >>> plan = packed_plan(segments, np.ones(5, bool), (8, 8), 1, seed=0, epoch=0, shuffle=False)
      >>> len(plan), plan.example.tolist(), plan.row.tolist(), plan.offset[:, 1].tolist()
      (3, [0, 1, 2, 3, 4], [0, 0, 0, 0, 0], [0, 4, 0, 2, 0])
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(segments)) if shuffle else np.arange(len(segments))
    order = order[kept[order]]
    row, offset, count = pack_rows(segments[order], capacity)
    full = count // rows_per_batch
    by_row = np.argsort(row, kind="stable")
    by_row = by_row[row[by_row] < full * rows_per_batch]
    batch = row[by_row] // rows_per_batch
    plan = Plan(
        starts=np.searchsorted(batch, np.arange(full + 1)).astype(np.int64),
        example=order[by_row].astype(np.int64),
        row=row[by_row] % rows_per_batch,
        offset=offset[by_row],
        rows=np.full(full, rows_per_batch, np.int64),
        lengths=np.tile(np.asarray(capacity, np.int64), (full, 1)),
    )
    # Batch k of the epoch is packed batch k % full: the cut and the (rare) repeats stay deterministic.
    return plan if num_batches is None else take_batches(plan, num_batches)
