"""Assembly: planned pairs laid out in batch arrays, special ids, segment ids and positions, with a few vectorised
NumPy operations per batch (no loop over pairs or tokens), so a CPU core assembles millions of tokens a second.

Each pair is ``source + EOS`` on the encoder side and ``BOS + target`` / ``target + EOS`` on the decoder side, at
the row and offsets its ``batching.Plan`` gives; a side longer than its limit is cut, and a cut target keeps no
EOS (the sentence goes on, and the model must not learn to stop there).
"""

import numpy as np

from attn_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID


def assemble(
    tokens: np.ndarray,
    lengths: np.ndarray,
    row: np.ndarray,
    offset: np.ndarray,
    rows: int,
    shape: tuple[int, int],
    limits: tuple[int, int],
    *,
    packed: bool,
    translation: bool,
    example: np.ndarray,
) -> dict[str, np.ndarray]:
    """Lays out pairs in a batch: each pair's source ids and target ids at its row and offsets, plus special ids.

    Args:
      tokens: every pair's ids, concatenated: pair ``k``'s source ids then its target ids (as stored).
      lengths: ``[M, 2]`` stored source and target lengths of the ``M`` pairs.
      row: ``[M]`` each pair's row.
      offset: ``[M, 2]`` its first column on the source and on the target side.
      rows: ``B``, rows of the batch.
      shape: ``(S, T)`` row lengths.
      limits: most tokens a pair takes per side (special ids included); longer pairs are cut.
      packed: add segment ids and positions (else ``example_index``).
      translation: build ``inputs`` (a language model reads the target side only).
      example: ``[M]`` the pairs' indices (``example_index`` of unpacked batches).

    Returns:
      The batch (see ``attn_jax.data.pipeline``).

    Example:
      >>> tokens = np.array([5, 6, 7, 8, 9, 9])  # pair 0: source [5, 6], target [7]; pair 1: [8], [9, 9]
      >>> batch = assemble(tokens, np.array([[2, 1], [1, 2]]), np.array([0, 0]), np.array([[0, 0], [3, 2]]), 1,
      ...                  (6, 6), (6, 6), packed=True, translation=True, example=np.array([0, 1]))
      >>> batch["inputs"].tolist(), batch["inputs_segment_ids"].tolist(), batch["inputs_positions"].tolist()
      ([[5, 6, 1, 8, 1, 0]], [[1, 1, 1, 2, 2, 0]], [[0, 1, 2, 0, 1, 0]])
      >>> batch["targets_in"].tolist(), batch["targets_out"].tolist(), batch["targets_segment_ids"].tolist()
      ([[2, 7, 2, 9, 9, 0]], [[7, 1, 9, 9, 1, 0]], [[1, 1, 2, 2, 2, 0]])
    """
    source_length, target_length = lengths[:, 0].astype(np.int64), lengths[:, 1].astype(np.int64)
    start = np.cumsum(source_length + target_length) - source_length - target_length  # each pair's first id
    batch = {}
    if translation:
        used = np.minimum(source_length, limits[0] - 1)  # source ids kept; EOS follows
        columns = row * shape[0] + offset[:, 0]
        batch["inputs"] = _side(rows, shape[0], tokens, start, used, columns, after=EOS_ID)
        if packed:
            batch["inputs_segment_ids"], batch["inputs_positions"] = _segments_and_positions(
                rows, shape[0], columns, used + 1, row, offset[:, 0]
            )
    out = np.minimum(target_length, limits[1])  # targets_out ids; EOS follows unless the pair was cut
    cut = target_length >= limits[1]
    columns = row * shape[1] + offset[:, 1]
    batch["targets_in"] = _side(rows, shape[1], tokens, start + source_length, out - cut, columns + 1)
    batch["targets_in"].reshape(-1)[columns] = BOS_ID
    batch["targets_out"] = _side(rows, shape[1], tokens, start + source_length, out, columns, after=EOS_ID, skip=cut)
    if packed:
        batch["targets_segment_ids"], batch["targets_positions"] = _segments_and_positions(
            rows, shape[1], columns, out + ~cut, row, offset[:, 1]
        )
    else:
        batch["example_index"] = np.full(rows, -1, np.int32)
        batch["example_index"][row] = example
    return batch


def _ranges(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(k, owner)``: ``0..counts[i]-1`` for every ``i`` in turn, and the ``i`` each belongs to."""
    owner = np.repeat(np.arange(len(counts)), counts)
    return np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts), owner


def _side(rows, length, tokens, start, count, columns, *, after=None, skip=None) -> np.ndarray:
    """``[rows, length]`` holding ``count[i]`` ids from ``tokens[start[i]:]`` at flat ``columns[i]``, then
    ``after`` (where ``skip`` is not set)."""
    side = np.full((rows, length), PAD_ID, np.int32)
    flat = side.reshape(-1)
    k, owner = _ranges(count)
    flat[columns[owner] + k] = tokens[start[owner] + k]
    if after is not None:
        ends = columns + count
        flat[ends if skip is None else ends[~skip]] = after
    return side


def _segments_and_positions(rows, length, columns, count, row, offset) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids (1, 2, ... in order along each row; 0 = padding) and positions restarting per segment."""
    order = np.lexsort((offset, row))  # pairs by row, then along the row
    first_in_row = np.searchsorted(row[order], row[order])
    segment = np.empty(len(row), np.int32)
    segment[order] = np.arange(len(row)) - first_in_row + 1
    segment_ids, positions = np.zeros((rows, length), np.int32), np.zeros((rows, length), np.int32)
    k, owner = _ranges(count)
    segment_ids.reshape(-1)[columns[owner] + k] = segment[owner]
    positions.reshape(-1)[columns[owner] + k] = k
    return segment_ids, positions
