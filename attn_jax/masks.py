"""Attention masks (paper §3.2.3): padding, causal ("preventing leftward information flow"), and their union.

Every mask is boolean with True meaning "may attend", shaped to broadcast against attention logits
``[B, N, T, S]``.

Packing (several sequences in one row, as in T5 and the Flax WMT example) is described per token by integer
segment ids (0 = padding, 1, 2, ... = the sequence's number within its row) and positions that restart at 0 in
each segment: ``segment_mask`` keeps attention inside a segment and ``segment_positions`` derives the
positions from the ids.
"""

import math

import jax
import jax.numpy as jnp

from attn_jax.types import Array, Bool, Int


def padding_mask(q_tokens: Int[Array, "B T"], kv_tokens: Int[Array, "B S"], pad_id: int = 0) -> Bool[Array, "B 1 T S"]:
    """Lets a query attend to a key only when neither is padding.

    Args:
      q_tokens: query-side token ids, ``[B, T]``.
      kv_tokens: key-side token ids, ``[B, S]``.
      pad_id: the id that marks padding.

    Returns:
      ``[B, 1, T, S]``, True where both tokens are real.

    Example:
      >>> import jax.numpy as jnp
      >>> padding_mask(jnp.array([[5, 0]]), jnp.array([[7, 8, 0]]))[0, 0].astype(int).tolist()
      [[1, 1, 0], [0, 0, 0]]
    """
    q_real = q_tokens != pad_id
    kv_real = kv_tokens != pad_id
    # [B, T] x [B, S] -> [B, 1, T, S]
    return q_real[:, None, :, None] & kv_real[:, None, None, :]


def key_padding_mask(kv_real: Bool[Array, "*B S"]) -> Bool[Array, "*B 1 1 S"]:
    """A per-key mask ``[..., S]`` (True = a real key that may be attended) in the broadcastable form.

    Example:
      >>> key_padding_mask(jnp.array([[True, False]])).shape
      (1, 1, 1, 2)
    """
    return kv_real[..., None, None, :]


def length_mask(lengths: Int[Array, "*B"], length: int) -> Bool[Array, "*B T"]:
    """``[..., T]`` True at the first ``lengths`` positions (a real-token mask from sequence lengths).

    Example:
      >>> length_mask(jnp.array([1, 3]), 3).astype(int).tolist()
      [[1, 0, 0], [1, 1, 1]]
    """
    positions = jnp.arange(length).reshape((1,) * lengths.ndim + (length,))  # [1, ..., 1, T]
    return positions < lengths[..., None]


def segment_mask(q_segments: Int[Array, "*B T"], kv_segments: Int[Array, "*B S"]) -> Bool[Array, "*B 1 T S"]:
    """Lets a query attend to a key only inside the same packed sequence (equal, nonzero segment ids).

    Args:
      q_segments: query-side segment ids ``[..., T]``; 0 marks padding.
      kv_segments: key-side segment ids ``[..., S]``; 0 marks padding.

    Returns:
      ``[..., 1, T, S]``, True where the ids are equal and nonzero.

    Example:
      >>> segment_mask(jnp.array([[1, 1, 2, 0]]), jnp.array([[1, 1, 2, 0]]))[0, 0].astype(int).tolist()
      [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    """
    same = q_segments[..., :, None] == kv_segments[..., None, :]
    return (same & (q_segments != 0)[..., :, None])[..., None, :, :]


def segment_positions(segment_ids: Int[Array, "*B T"]) -> Int[Array, "*B T"]:
    """Positions that restart at 0 wherever the segment id changes (what a packer writes beside the ids).

    Example:
      >>> segment_positions(jnp.array([[1, 1, 1, 2, 2, 0]])).tolist()
      [[0, 1, 2, 0, 1, 0]]
    """
    index = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    index = jnp.broadcast_to(index, segment_ids.shape)
    previous = jnp.concatenate([jnp.full_like(segment_ids[..., :1], -1), segment_ids[..., :-1]], axis=-1)
    starts = jnp.where(segment_ids != previous, index, 0)
    return index - jax.lax.cummax(starts, axis=segment_ids.ndim - 1)


def real_tokens(
    ids: Int[Array, "*B T"] | None,
    *,
    mask: Bool[Array, "*B T"] | None = None,
    segment_ids: Int[Array, "*B T"] | None = None,
    pad_id: int = 0,
    shape: tuple[int, ...] | None = None,
    name: str = "",
) -> Bool[Array, "*B T"] | None:
    """True at real (non-padding) tokens: the AND of ``ids != pad_id``, ``mask`` and ``segment_ids != 0``.

    Args:
      ids: token ids, or None (embeddings: no ids to read).
      mask: the caller's per-token mask, True = real.
      segment_ids: packed-sequence ids, 0 = padding.
      pad_id: the padding id.
      shape: the ``[..., T]`` shape every given array must have (default: ``ids``'s).
      name: prefix of the argument names in error messages (``"src_"``).

    Returns:
      ``[..., T]`` boolean, or None when nothing was given (every token real).

    Example:
      >>> real_tokens(jnp.array([[5, 6, 0]]), segment_ids=jnp.array([[1, 0, 0]])).tolist()
      [[True, False, False]]
    """
    shape = tuple(ids.shape if shape is None else shape)
    for what, x in ((f"{name}mask", mask), (f"{name}segment_ids", segment_ids)):
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"{what} must be [B, T] = {shape} like the inputs, got shape {tuple(x.shape)}")
    if mask is not None and mask.dtype != jnp.bool_:
        raise TypeError(f"{name}mask must be boolean (True = a real token), got dtype {mask.dtype}")
    real = None if ids is None else ids != pad_id
    for extra in (mask, None if segment_ids is None else segment_ids != 0):
        if extra is not None:
            real = extra if real is None else real & extra
    return real


def pair_mask(q_real: Bool[Array, "B T"] | None, kv_real: Bool[Array, "B S"] | None) -> Bool[Array, "B 1 #T #S"] | None:
    """``[B, T] x [B, S] -> [B, 1, T, S]``: query and key both real (``padding_mask`` for booleans); a None side
    is all real.

    Example:
      >>> pair_mask(jnp.array([[True, False]]), jnp.array([[True, True, False]]))[0, 0].astype(int).tolist()
      [[1, 1, 0], [0, 0, 0]]
    """
    if q_real is None and kv_real is None:
        return None
    if q_real is None:
        return kv_real[:, None, None, :]
    if kv_real is None:
        return q_real[:, None, :, None]
    return q_real[:, None, :, None] & kv_real[:, None, None, :]


def segment_pair_mask(q_segments, kv_segments, what: str):
    """``segment_mask`` when both sides are packed, None when neither is; one side alone is an error."""
    if (q_segments is None) != (kv_segments is None):
        raise ValueError(f"{what}: pass segment ids for both sides of a packed batch, or for neither")
    return None if q_segments is None else segment_mask(q_segments, kv_segments)


def causal_mask(T: int, S: int | None = None) -> Bool[Array, "1 1 T S"]:
    """Lets query t attend to keys 0..t (top-left aligned, as ``jax.nn.dot_product_attention``).

    Args:
      T: number of queries.
      S: number of keys; defaults to ``T``.

    Returns:
      ``[1, 1, T, S]`` lower-triangular mask.

    Example:
      >>> causal_mask(3)[0, 0].astype(int).tolist()
      [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    S = T if S is None else S
    return jnp.tril(jnp.ones((T, S), dtype=jnp.bool_))[None, None]


def combine_masks(*masks: Bool[Array, "..."] | None) -> Bool[Array, "..."] | None:
    """Intersects masks (a key is attended only if every mask allows it); ``None`` entries are ignored.

    Args:
      *masks: boolean masks broadcastable to one another, or ``None``.

    Returns:
      Their logical AND, broadcast to the common shape, or ``None`` when every input is ``None``.

    Example:
      >>> combine_masks(None, causal_mask(2), jnp.array([[[[True, False]]]]))[0, 0].astype(int).tolist()
      [[1, 0], [1, 0]]
    """
    present = [m for m in masks if m is not None]
    if not present:
        return None
    rank = max(m.ndim for m in present)
    result = None
    for m in present:
        if m.dtype != jnp.bool_:
            raise TypeError(f"masks must be boolean (True = attend), got dtype {m.dtype}")
        m = m.reshape((1,) * (rank - m.ndim) + m.shape)
        result = m if result is None else result & m
    return result


# ----------------------------------------------------------------------------------------------------------
# Mask forms accepted by scaled_dot_product_attention: full rank, or by name
# ----------------------------------------------------------------------------------------------------------


def check_full_rank(x, name: str, full: tuple[int, ...]):
    """Checks that ``x`` has the rank of the logits ``[*B, N, T, S]`` and broadcasts to them."""
    if x is None:
        return None
    if x.ndim != len(full):
        raise ValueError(
            f"{name} has shape {x.shape} but must have the rank of the logits [*B, N, T, S] = {full}: a lower rank "
            f"is ambiguous (a [B, S] padding mask would broadcast as [T, S]); add unit axes (e.g. "
            f"{name}[:, None, None, :]) or pass key_mask=[*B, S] / query_seq_lengths / key_value_seq_lengths"
        )
    if any(d not in (1, f) for d, f in zip(x.shape, full, strict=True)):
        raise ValueError(f"{name} of shape {x.shape} does not broadcast to [*B, N, T, S] = {full}")
    return x


def named_masks(batch, T: int, S: int, key_mask, query_seq_lengths, key_value_seq_lengths):
    """The per-key mask and the length masks as one full-rank ``[*B, 1, T|1, S|1]`` mask, or None."""
    masks = []
    if key_mask is not None:
        if key_mask.dtype != jnp.bool_ or tuple(key_mask.shape) != (*batch, S):
            raise ValueError(f"key_mask must be boolean [*B, S] = {(*batch, S)}, got {key_mask.dtype}{key_mask.shape}")
        masks.append(key_mask[..., None, None, :])  # [*B, S] -> [*B, 1, 1, S]
    for lengths, size, name in ((query_seq_lengths, T, "query"), (key_value_seq_lengths, S, "key_value")):
        if lengths is None:
            continue
        if tuple(lengths.shape) != tuple(batch):
            raise ValueError(f"{name}_seq_lengths must be [*B] = {batch}, got shape {lengths.shape}")
        real = length_mask(lengths, size)  # [*B, T|S]
        masks.append(real[..., None, :, None] if name == "query" else real[..., None, None, :])
    return combine_masks(*masks)


def flatten_batch(x, batch: tuple[int, ...]):
    """``[*B|1, N|1, T|1, S|1] -> [B|1, N|1, T|1, S|1]``, broadcasting the batch axes only when it must."""
    lead = x.shape[: len(batch)]
    if all(d == 1 for d in lead):
        return x.reshape(1, *x.shape[len(batch) :])
    if len(batch) > 1:
        x = jnp.broadcast_to(x, (*batch, *x.shape[len(batch) :]))
    return x.reshape(math.prod(batch), *x.shape[len(batch) :])
