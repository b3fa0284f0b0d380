"""Attention masks (paper §3.2.3): padding, causal ("preventing leftward information flow"), and their union.

Every mask is boolean with True meaning "may attend", shaped to broadcast against attention logits
``[B, N, T, S]``.
"""

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
