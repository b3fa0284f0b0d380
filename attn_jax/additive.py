"""Alignment models of the recurrent translators: additive attention (Bahdanau, Cho & Bengio 2014, "Neural
Machine Translation by Jointly Learning to Align and Translate", §3.1 and appendix A.1.2), the model that the
Transformer's dot product replaced, and the ``dot`` and ``general`` scores of Luong, Pham & Manning 2015
("Effective Approaches to Attention-based Neural Machine Translation", §3.1, eq. 8).

    additive:  e_ts = v^T tanh(W_q q_t + W_k k_s + b)   (Bahdanau's  v_a^T tanh(W_a s_{i-1} + U_a h_j))
    dot:       e_ts = q_t^T k_s                          (Luong's  h_t^T h~_s)
    general:   e_ts = q_t^T W_a k_s                      (Luong's  h_t^T W_a h~_s, bilinear)
    alpha_ts = softmax_s(e_ts)
    c_t = sum_s alpha_ts v_s

Deviation from the paper: its alignment model has no bias; ``b`` here is initialised to zero, so an untrained
``b`` is the paper's model. The paper's decoder makes one query per step; here ``query`` carries a ``T`` axis
so a whole sequence of queries can attend at once (``T = 1`` for a recurrent decoder step).

Only ``W_q q_t`` depends on the query, so ``project_keys`` computes ``W_k k_s + b`` once per source sentence
and ``additive_attention_projected`` reuses it at every decoder step. Likewise ``general`` is ``dot`` against
the keys projected once by ``W_a`` (``project_keys_general``). ``SCORES`` names the three, and
``init_alignment`` / ``prepare_keys`` / ``align`` pick one by name, as a recurrent decoder's config does.
Luong's dot score is unscaled (no ``1 / sqrt(d)``, unlike the Transformer's).
"""

import math

import jax
import jax.numpy as jnp

from attn_jax.types import AdditiveAttentionParams, Array, Bool, Float, PRNGKeyArray

__all__ = [
    "SCORES",
    "init_additive_attention",
    "project_keys",
    "additive_attention_projected",
    "additive_attention",
    "dot_attention",
    "init_general_attention",
    "project_keys_general",
    "general_attention",
    "init_alignment",
    "prepare_keys",
    "align",
]

SCORES = ("additive", "dot", "general")


def init_additive_attention(
    rng: PRNGKeyArray, query_dim: int, key_dim: int, hidden_dim: int, *, dtype=jnp.float32
) -> AdditiveAttentionParams:
    """Glorot-uniform ``w_q``, ``w_k`` and ``v``, zero ``b`` (an implementation choice, not the paper's init).

    Args:
      rng: PRNG key.
      query_dim: ``Dq``, the size of a query (the paper's decoder state ``s_{i-1}``).
      key_dim: ``Dk``, the size of a key (the paper's annotation ``h_j``).
      hidden_dim: ``A``, the alignment model's hidden size (the paper's ``n'``).
      dtype: parameter dtype.

    Returns:
      ``{"w_q": [Dq, A], "w_k": [Dk, A], "b": [A], "v": [A]}``.

    Example:
      >>> p = init_additive_attention(jax.random.key(0), 4, 6, 8)
      >>> {name: w.shape for name, w in p.items()}
      {'w_q': (4, 8), 'w_k': (6, 8), 'b': (8,), 'v': (8,)}
    """
    for name, size in (("query_dim", query_dim), ("key_dim", key_dim), ("hidden_dim", hidden_dim)):
        if size <= 0:
            raise ValueError(f"{name} must be positive, got {size}")
    rq, rk, rv = jax.random.split(rng, 3)

    def glorot(r, shape, fan_in, fan_out):
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return jax.random.uniform(r, shape, dtype, -limit, limit)

    return {
        "w_q": glorot(rq, (query_dim, hidden_dim), query_dim, hidden_dim),
        "w_k": glorot(rk, (key_dim, hidden_dim), key_dim, hidden_dim),
        "b": jnp.zeros((hidden_dim,), dtype),
        "v": glorot(rv, (hidden_dim,), hidden_dim, 1),
    }


def project_keys(params: AdditiveAttentionParams, keys: Float[Array, "B S Dk"]) -> Float[Array, "B S A"]:
    """``W_k k_s + b``: the query-independent half of the score, computed once per source sentence.

    Args:
      params: from ``init_additive_attention``.
      keys: ``[B, S, Dk]``.

    Returns:
      ``[B, S, A]``.

    Example:
      >>> p = init_additive_attention(jax.random.key(0), 4, 6, 8)
      >>> project_keys(p, jnp.ones((2, 5, 6))).shape
      (2, 5, 8)
    """
    if keys.ndim != 3 or keys.shape[-1] != params["w_k"].shape[0]:
        raise ValueError(f"keys must be [B, S, Dk] with Dk={params['w_k'].shape[0]}, got shape {keys.shape}")
    # [B, S, Dk] @ [Dk, A] -> [B, S, A]
    return keys @ params["w_k"].astype(keys.dtype) + params["b"].astype(keys.dtype)[None, None]


def additive_attention_projected(
    params: AdditiveAttentionParams,
    query: Float[Array, "B T Dq"],
    projected_keys: Float[Array, "B S A"],
    values: Float[Array, "B S Dv"],
    *,
    mask: Bool[Array, "..."] | None = None,
    return_weights: bool = False,
) -> Float[Array, "B T Dv"] | tuple[Float[Array, "B T Dv"], Float[Array, "B T S"]]:
    """Additive attention given ``project_keys(params, keys)``; what a recurrent decoder calls every step.

    The scores and the softmax are computed in float32; the result has the values' dtype. A query that may
    attend to no key gets zeros (and zero gradients), never NaN.

    Args:
      params: from ``init_additive_attention``.
      query: ``[B, T, Dq]``.
      projected_keys: ``[B, S, A]``, from ``project_keys``.
      values: ``[B, S, Dv]`` (in the paper, the annotations ``h_j`` again).
      mask: boolean, True = attend, broadcastable to ``[B, T, S]``.
      return_weights: also return the attention weights.

    Returns:
      The context ``[B, T, Dv]``, and with ``return_weights`` also the weights ``[B, T, S]`` (float32).

    Example:
      >>> p = init_additive_attention(jax.random.key(0), 4, 6, 8)
      >>> keys = jnp.ones((2, 5, 6))
      >>> additive_attention_projected(p, jnp.ones((2, 1, 4)), project_keys(p, keys), keys).shape
      (2, 1, 6)
    """
    B, T, S = _check_shapes(params, query, projected_keys, values)
    mask = _as_rank3(mask, (B, T, S))
    projected_query = query @ params["w_q"].astype(query.dtype)  # [B, T, Dq] @ [Dq, A] -> [B, T, A]
    # [B, T, 1, A] + [B, 1, S, A] -> [B, T, S, A]
    hidden = jnp.tanh(projected_query[:, :, None, :] + projected_keys.astype(query.dtype)[:, None, :, :])
    scores = jnp.einsum("BTSA,A->BTS", hidden, params["v"].astype(hidden.dtype), preferred_element_type=jnp.float32)
    return _attend(scores, values, mask, return_weights)


def _attend(scores, values, mask, return_weights: bool):
    """Masked float32 softmax over ``S`` of ``scores [B, T, S]``, then the weighted sum of ``values``."""
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)
    if mask is not None:
        # A row with nothing to attend to has a uniform softmax over finfo.min; zero it instead.
        weights = jnp.where(jnp.any(mask, axis=-1, keepdims=True), weights, 0.0)
    context = weights.astype(values.dtype) @ values  # [B, T, S] @ [B, S, Dv] -> [B, T, Dv]
    return (context, weights) if return_weights else context


def additive_attention(
    params: AdditiveAttentionParams,
    query: Float[Array, "B T Dq"],
    keys: Float[Array, "B S Dk"],
    values: Float[Array, "B S Dv"],
    *,
    mask: Bool[Array, "..."] | None = None,
    return_weights: bool = False,
) -> Float[Array, "B T Dv"] | tuple[Float[Array, "B T Dv"], Float[Array, "B T S"]]:
    """c_t = sum_s softmax_s(v^T tanh(W_q q_t + W_k k_s + b)) v_s (Bahdanau et al. 2014, §3.1).

    Args:
      params: from ``init_additive_attention``.
      query: ``[B, T, Dq]``.
      keys: ``[B, S, Dk]``.
      values: ``[B, S, Dv]``.
      mask: boolean, True = attend, broadcastable to ``[B, T, S]``.
      return_weights: also return the attention weights.

    Returns:
      The context ``[B, T, Dv]``, and with ``return_weights`` also the weights ``[B, T, S]`` (float32).

    Example:
      >>> p = init_additive_attention(jax.random.key(0), 4, 6, 8)
      >>> additive_attention(p, jnp.ones((2, 3, 4)), jnp.ones((2, 5, 6)), jnp.ones((2, 5, 7))).shape
      (2, 3, 7)
    """
    if keys.ndim != 3 or values.ndim != 3 or keys.shape[:2] != values.shape[:2]:
        raise ValueError(f"keys {keys.shape} and values {values.shape} must be [B, S, Dk] and [B, S, Dv]")
    return additive_attention_projected(
        params, query, project_keys(params, keys), values, mask=mask, return_weights=return_weights
    )


# ----------------------------------------------------------------------------------------------------------
# Luong et al. 2015: dot and general (bilinear) scores
# ----------------------------------------------------------------------------------------------------------


def dot_attention(
    query: Float[Array, "B T Dq"],
    keys: Float[Array, "B S Dq"],
    values: Float[Array, "B S Dv"],
    *,
    mask: Bool[Array, "..."] | None = None,
    return_weights: bool = False,
) -> Float[Array, "B T Dv"] | tuple[Float[Array, "B T Dv"], Float[Array, "B T S"]]:
    """c_t = sum_s softmax_s(q_t^T k_s) v_s, Luong et al.'s ``dot`` score (unscaled), softmax in float32.

    Args:
      query: ``[B, T, Dq]``.
      keys: ``[B, S, Dq]``, the same width as the query.
      values: ``[B, S, Dv]``.
      mask: boolean, True = attend, broadcastable to ``[B, T, S]``.
      return_weights: also return the attention weights.

    Returns:
      The context ``[B, T, Dv]``, and with ``return_weights`` also the weights ``[B, T, S]`` (float32).

    Example:
      >>> q = jnp.array([[[1.0, 0.0]]])             # [B=1, T=1, Dq=2]
      >>> k = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])  # [B=1, S=2, Dq=2]
      >>> context, w = dot_attention(q, k, jnp.array([[[2.0], [4.0]]]), return_weights=True)
      >>> round(float(w[0, 0, 0]), 4), round(float(context[0, 0, 0]), 4)  # e / (e + 1), 2 w + 4 (1 - w)
      (0.7311, 2.5379)
    """
    for name, x in (("query", query), ("keys", keys), ("values", values)):
        if x.ndim != 3:
            raise ValueError(f"{name} must have rank 3 ([B, T|S, features]), got shape {x.shape}")
    if keys.shape[-1] != query.shape[-1]:
        raise ValueError(f"dot score: keys {keys.shape} must have the query's width, query {query.shape}")
    if keys.shape[:2] != values.shape[:2] or keys.shape[0] != query.shape[0]:
        raise ValueError(
            f"query {query.shape}, keys {keys.shape} and values {values.shape} must agree on B, and keys and "
            "values on S"
        )
    if values.shape[1] == 0:
        raise ValueError("empty key sequence: S = 0 leaves nothing to attend to")
    B, T, S = query.shape[0], query.shape[1], keys.shape[1]
    mask = _as_rank3(mask, (B, T, S))
    scores = jnp.einsum("BTQ,BSQ->BTS", query, keys.astype(query.dtype), preferred_element_type=jnp.float32)
    return _attend(scores, values, mask, return_weights)


def init_general_attention(rng: PRNGKeyArray, query_dim: int, key_dim: int, *, dtype=jnp.float32) -> dict:
    """Glorot-uniform ``W_a`` of Luong's ``general`` score ``q^T W_a k`` (an implementation choice).

    Args:
      rng: PRNG key.
      query_dim: ``Dq``.
      key_dim: ``Dk``.
      dtype: parameter dtype.

    Returns:
      ``{"w_a": [Dq, Dk]}``.

    Example:
      >>> init_general_attention(jax.random.key(0), 4, 6)["w_a"].shape
      (4, 6)
    """
    for name, size in (("query_dim", query_dim), ("key_dim", key_dim)):
        if size <= 0:
            raise ValueError(f"{name} must be positive, got {size}")
    limit = math.sqrt(6.0 / (query_dim + key_dim))
    return {"w_a": jax.random.uniform(rng, (query_dim, key_dim), dtype, -limit, limit)}


def project_keys_general(params: dict, keys: Float[Array, "B S Dk"]) -> Float[Array, "B S Dq"]:
    """``W_a k_s``, once per source sentence: ``general`` is then ``dot_attention`` against these keys.

    Example:
      >>> p = init_general_attention(jax.random.key(0), 4, 6)
      >>> project_keys_general(p, jnp.ones((2, 5, 6))).shape
      (2, 5, 4)
    """
    if keys.ndim != 3 or keys.shape[-1] != params["w_a"].shape[1]:
        raise ValueError(f"keys must be [B, S, Dk] with Dk={params['w_a'].shape[1]}, got shape {keys.shape}")
    return jnp.einsum("BSK,QK->BSQ", keys, params["w_a"].astype(keys.dtype))  # [B, S, Dk] -> [B, S, Dq]


def general_attention(
    params: dict,
    query: Float[Array, "B T Dq"],
    keys: Float[Array, "B S Dk"],
    values: Float[Array, "B S Dv"],
    *,
    mask: Bool[Array, "..."] | None = None,
    return_weights: bool = False,
) -> Float[Array, "B T Dv"] | tuple[Float[Array, "B T Dv"], Float[Array, "B T S"]]:
    """c_t = sum_s softmax_s(q_t^T W_a k_s) v_s, Luong et al.'s ``general`` (bilinear) score.

    Args:
      params: from ``init_general_attention``.
      query: ``[B, T, Dq]``.
      keys: ``[B, S, Dk]``.
      values: ``[B, S, Dv]``.
      mask: boolean, True = attend, broadcastable to ``[B, T, S]``.
      return_weights: also return the attention weights.

    Returns:
      The context ``[B, T, Dv]``, and with ``return_weights`` also the weights ``[B, T, S]`` (float32).

    Example:
      >>> p = init_general_attention(jax.random.key(0), 4, 6)
      >>> general_attention(p, jnp.ones((2, 3, 4)), jnp.ones((2, 5, 6)), jnp.ones((2, 5, 7))).shape
      (2, 3, 7)
    """
    return dot_attention(query, project_keys_general(params, keys), values, mask=mask, return_weights=return_weights)


# ----------------------------------------------------------------------------------------------------------
# One score by name (what a recurrent decoder's config chooses)
# ----------------------------------------------------------------------------------------------------------


def init_alignment(
    rng: PRNGKeyArray, score: str, query_dim: int, key_dim: int, hidden_dim: int, *, dtype=jnp.float32
) -> dict:
    """Parameters of one alignment model: additive ``{w_q, w_k, b, v}``, general ``{w_a}``, dot ``{}``.

    Example:
      >>> sorted(init_alignment(jax.random.key(0), "general", 4, 6, 8))
      ['w_a']
    """
    _check_score(score)
    if score == "additive":
        return init_additive_attention(rng, query_dim, key_dim, hidden_dim, dtype=dtype)
    if score == "general":
        return init_general_attention(rng, query_dim, key_dim, dtype=dtype)
    if query_dim != key_dim:
        raise ValueError(f"the dot score needs queries and keys of one width, got {query_dim} and {key_dim}")
    return {}


def prepare_keys(score: str, params: dict, keys: Float[Array, "B S Dk"]) -> Float[Array, "B S X"]:
    """The query-independent part of a score, once per sentence: ``[B, S, A]``, ``[B, S, Dq]`` or the keys.

    Example:
      >>> p = init_alignment(jax.random.key(0), "additive", 4, 6, 8)
      >>> prepare_keys("additive", p, jnp.ones((2, 5, 6))).shape
      (2, 5, 8)
    """
    _check_score(score)
    if score == "additive":
        return project_keys(params, keys)
    return project_keys_general(params, keys) if score == "general" else keys


def align(
    score: str,
    params: dict,
    query: Float[Array, "B T Dq"],
    prepared_keys: Float[Array, "B S X"],
    values: Float[Array, "B S Dv"],
    *,
    mask: Bool[Array, "..."] | None = None,
    return_weights: bool = False,
) -> Float[Array, "B T Dv"] | tuple[Float[Array, "B T Dv"], Float[Array, "B T S"]]:
    """Attention with the named score, given ``prepare_keys(score, params, keys)``.

    Args:
      score: one of ``SCORES``.
      params: from ``init_alignment(rng, score, ...)``.
      query: ``[B, T, Dq]``.
      prepared_keys: from ``prepare_keys``.
      values: ``[B, S, Dv]``.
      mask: boolean, True = attend, broadcastable to ``[B, T, S]``.
      return_weights: also return the attention weights.

    Returns:
      The context ``[B, T, Dv]``, and with ``return_weights`` also the weights ``[B, T, S]`` (float32).

    Example:
      >>> p = init_alignment(jax.random.key(0), "dot", 4, 4, 8)
      >>> keys = jnp.ones((2, 5, 4))
      >>> align("dot", p, jnp.ones((2, 1, 4)), prepare_keys("dot", p, keys), keys).shape
      (2, 1, 4)
    """
    _check_score(score)
    if score == "additive":
        return additive_attention_projected(
            params, query, prepared_keys, values, mask=mask, return_weights=return_weights
        )
    return dot_attention(query, prepared_keys, values, mask=mask, return_weights=return_weights)


def _check_score(score: str) -> None:
    if score not in SCORES:
        raise ValueError(f"unknown alignment score {score!r}; expected one of {SCORES}")


def _check_shapes(params, query, projected_keys, values) -> tuple[int, int, int]:
    for name, x in (("query", query), ("projected_keys", projected_keys), ("values", values)):
        if x.ndim != 3:
            raise ValueError(f"{name} must have rank 3 ([B, T|S, features]), got shape {x.shape}")
    (B, T, Dq), (Dq_params, A) = query.shape, params["w_q"].shape
    if Dq != Dq_params:
        raise ValueError(f"query {query.shape} must end in Dq={Dq_params}, the first axis of w_q")
    if projected_keys.shape[-1] != A or params["v"].shape != (A,):
        raise ValueError(f"projected_keys {projected_keys.shape} and v {params['v'].shape} must end in A={A}")
    if projected_keys.shape[:2] != values.shape[:2] or values.shape[0] != B:
        raise ValueError(
            f"query {query.shape}, keys {projected_keys.shape[:2]} and values {values.shape} "
            "must agree on B, and keys and values on S"
        )
    if values.shape[1] == 0:
        raise ValueError("empty key sequence: S = 0 leaves nothing to attend to")
    return B, T, values.shape[1]


def _as_rank3(mask, full: tuple[int, int, int]):
    """Left-pads ``mask`` to rank 3 (numpy broadcasting) and checks it is boolean and broadcasts to ``full``."""
    if mask is None:
        return None
    if mask.dtype != jnp.bool_:
        raise TypeError(f"mask must be boolean (True = attend), got dtype {mask.dtype}")
    if mask.ndim > 3:
        raise ValueError(f"mask has rank {mask.ndim}; it must broadcast to [B, T, S] = {full}")
    mask = mask.reshape((1,) * (3 - mask.ndim) + mask.shape)
    if any(d not in (1, f) for d, f in zip(mask.shape, full, strict=True)):
        raise ValueError(f"mask of shape {mask.shape} does not broadcast to [B, T, S] = {full}")
    return mask
