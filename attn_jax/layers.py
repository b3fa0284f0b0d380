"""The pieces around attention: layer norm, the position-wise FFN, embeddings, positions, dropout, word dropout.

Paper references: §3.1 (residual + LayerNorm around each sub-layer), §3.3 (position-wise feed-forward,
equation 2), §3.4 (shared embeddings scaled by sqrt(d_model), pre-softmax projection through the same
matrix), §3.5 (sinusoidal positions), §5.4 (residual dropout). Not in the paper: dropout on the FFN's inner
activation and word dropout, regularisers of the low-resource recipe (Sennrich & Zhang 2019).
"""

import math

import jax
import jax.numpy as jnp

from attn_jax import fused_random
from attn_jax.types import (
    Array,
    Bool,
    EmbeddingParams,
    FeedForwardParams,
    Float,
    Int,
    LayerNormParams,
    PRNGKeyArray,
    ensure_static,
    upcast_dtype,
)


def _glorot(rng, shape, fan_in, fan_out, dtype):
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(rng, shape, dtype, -limit, limit)


# ----------------------------------------------------------------------------------------------------------
# Layer normalisation (Ba et al. 2016)
# ----------------------------------------------------------------------------------------------------------


def init_layer_norm(d_model: int, *, dtype=jnp.float32) -> LayerNormParams:
    """Unit scale, zero bias: ``{"scale": [D], "bias": [D]}``."""
    return {"scale": jnp.ones((d_model,), dtype), "bias": jnp.zeros((d_model,), dtype)}


def layer_norm(params: LayerNormParams, x: Float[Array, "*B D"], *, epsilon: float = 1e-6) -> Float[Array, "*B D"]:
    """(x - mean) / sqrt(var + epsilon) * scale + bias over the last axis, in ``promote(float32, x.dtype)``.

    Args:
      params: ``{"scale": [D], "bias": [D]}``.
      x: ``[..., D]``.
      epsilon: added to the variance.

    Returns:
      ``[..., D]`` in ``x``'s dtype.

    Example:
      >>> layer_norm(init_layer_norm(2), jnp.array([[1.0, 3.0]])).round(4).tolist()
      [[-1.0, 1.0]]
    """
    compute = upcast_dtype(x.dtype)
    x32 = x.astype(compute)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + jnp.asarray(epsilon, compute))
    scale, bias = (_lift(params[name].astype(compute), x.ndim) for name in ("scale", "bias"))
    return (y * scale + bias).astype(x.dtype)


def _lift(v, ndim: int):
    """``[D] -> [1, ..., 1, D]``: explicit broadcasting (tests run with implicit rank promotion off)."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


# ----------------------------------------------------------------------------------------------------------
# Position-wise feed-forward network (§3.3)
# ----------------------------------------------------------------------------------------------------------


def init_position_wise_ffn(rng: PRNGKeyArray, d_model: int, d_ff: int, *, dtype=jnp.float32) -> FeedForwardParams:
    """Glorot-uniform ``w_1 [D, F]``, ``w_2 [F, D]`` and zero biases."""
    r1, r2 = jax.random.split(rng)
    return {
        "w_1": _glorot(r1, (d_model, d_ff), d_model, d_ff, dtype),
        "b_1": jnp.zeros((d_ff,), dtype),
        "w_2": _glorot(r2, (d_ff, d_model), d_ff, d_model, dtype),
        "b_2": jnp.zeros((d_model,), dtype),
    }


def position_wise_ffn(
    params: FeedForwardParams,
    x: Float[Array, "B T D"],
    *,
    dropout_rate: float = 0.0,
    dropout_rng: PRNGKeyArray | None = None,
) -> Float[Array, "B T D"]:
    """FFN(x) = max(0, x W_1 + b_1) W_2 + b_2 (paper equation 2), applied at every position alike.

    Args:
      params: ``{"w_1": [D, F], "b_1": [F], "w_2": [F, D], "b_2": [D]}``.
      x: ``[B, T, D]``.
      dropout_rate: dropout on the inner activation ``max(0, x W_1 + b_1)`` (fairseq's ``activation_dropout``,
        not in the paper), applied only when ``dropout_rng`` is given.
      dropout_rng: PRNG key for that dropout.

    Returns:
      ``[B, T, D]``.

    Example:
      >>> p = {"w_1": jnp.array([[1.0, -1.0]]), "b_1": jnp.zeros(2), "w_2": jnp.array([[2.0], [3.0]]),
      ...      "b_2": jnp.array([0.5])}
      >>> position_wise_ffn(p, jnp.array([[[-2.0], [4.0]]])).tolist()  # relu picks one hidden unit each
      [[[6.5], [8.5]]]
    """
    dtype = x.dtype
    hidden = jnp.einsum("BTD,DF->BTF", x, params["w_1"].astype(dtype)) + _lift(params["b_1"].astype(dtype), 3)
    hidden = dropout(jax.nn.relu(hidden), dropout_rate, dropout_rng)
    return jnp.einsum("BTF,FD->BTD", hidden, params["w_2"].astype(dtype)) + _lift(params["b_2"].astype(dtype), 3)


# ----------------------------------------------------------------------------------------------------------
# Embeddings and the pre-softmax projection (§3.4)
# ----------------------------------------------------------------------------------------------------------


def init_embedding(rng: PRNGKeyArray, vocab_size: int, d_model: int, *, dtype=jnp.float32) -> EmbeddingParams:
    """Normal(0, d_model^-1/2): after the sqrt(d_model) scale the embeddings have unit variance."""
    return {"embedding": jax.random.normal(rng, (vocab_size, d_model), dtype) * (d_model**-0.5)}


def embed(
    params: EmbeddingParams, tokens: Int[Array, "B T"], *, scale: bool = True, dtype=None
) -> Float[Array, "B T D"]:
    """Looks tokens up and multiplies by sqrt(d_model) (§3.4; ``scale=False`` drops that factor).

    Args:
      params: ``{"embedding": [V, D]}``.
      tokens: ``[B, T]`` integer ids in ``[0, V)``.
      scale: multiply by sqrt(D), as the paper does.
      dtype: compute dtype of the result; defaults to the table's dtype.

    Returns:
      ``[B, T, D]``.

    Example:
      >>> embed({"embedding": jnp.eye(4)}, jnp.array([[2]])).tolist()
      [[[0.0, 0.0, 2.0, 0.0]]]
    """
    table = params["embedding"]
    x = jnp.take(table, tokens, axis=0).astype(dtype or table.dtype)
    return x * math.sqrt(table.shape[1]) if scale else x


def shared_logits(params: EmbeddingParams, x: Float[Array, "*B T D"]) -> Float[Array, "*B T V"]:
    """The pre-softmax linear transformation through the (shared) embedding matrix: x E^T.

    Computed as one ``[B*T, D] x [V, D]^T`` matrix product over the flattened tokens. Plain autodiff of that
    form gives the embedding's gradient as ``dlogits^T x`` on ``[B*T, V]``, which XLA:CPU runs as a matmul with
    a transposed operand; the rank-3 form (``einsum("BTD,VD->BTV")``) made it materialise the ``[V, B*T]``
    transpose of dlogits, the step's largest array (12% of the small benchmark's step,
    experiments/results/NOTES.md). No custom derivative is needed, so forward mode (``jax.jvp``, ``jacfwd``,
    ``hessian``) works as well as ``jax.grad``.

    Example:
      >>> shared_logits({"embedding": jnp.eye(3)}, jnp.array([[[1.0, 2.0, 3.0]]])).tolist()
      [[[1.0, 2.0, 3.0]]]
    """
    table = params["embedding"].astype(x.dtype)
    tokens = x.reshape(-1, x.shape[-1])  # [..., T, D] -> [B*T, D]
    logits = jax.lax.dot_general(tokens, table, (((1,), (1,)), ((), ())))  # [B*T, D] x [V, D] -> [B*T, V]
    return logits.reshape(*x.shape[:-1], table.shape[0])  # [B*T, V] -> [..., T, V]


# ----------------------------------------------------------------------------------------------------------
# Positions (§3.5)
# ----------------------------------------------------------------------------------------------------------


def sinusoidal_positions(
    positions: int | Int[Array, "*B T"], d_model: int, *, offset: int | Int[Array, ""] = 0, dtype=jnp.float32
) -> Float[Array, "*B T D"]:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d_model)),  PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)).

    Sine on even and cosine on odd dimensions, interleaved exactly as the paper writes it (some libraries
    concatenate the two halves instead).

    Args:
      positions: ``T``, for positions ``0 .. T-1``; or an integer array ``[..., T]`` of positions (packed rows,
        where each sequence's positions restart at 0).
      d_model: ``D``; may be odd (the last column is then a sine).
      offset: added to every position (used when decoding one token at a time).
      dtype: the compute dtype (float32; float64 gives float64 accuracy).

    Returns:
      ``[T, D]`` for a length, ``[..., T, D]`` for an array of positions.

    Example:
      >>> import numpy as np
      >>> np.asarray(sinusoidal_positions(2, 4), np.float64).round(3).tolist()
      [[0.0, 1.0, 0.0, 1.0], [0.841, 0.54, 0.01, 1.0]]
      >>> sinusoidal_positions(jnp.array([[0, 1, 0]]), 4)[0, 2].tolist()  # a packed row's second sequence
      [0.0, 1.0, 0.0, 1.0]
    """
    if isinstance(positions, int):
        positions = jnp.arange(positions, dtype=dtype)
    positions = positions.astype(dtype) + jnp.asarray(offset, dtype)
    two_i = jnp.arange(0, d_model, 2, dtype=dtype)
    frequencies = jnp.power(jnp.asarray(10000.0, dtype), two_i / jnp.asarray(d_model, dtype))
    angles = positions[..., None] / _lift(frequencies, positions.ndim + 1)  # [..., T, ceil(D/2)]
    # [..., T, D/2] sin, cos -> [..., T, D/2, 2] -> [..., T, D]: sin lands on even and cos on odd columns.
    interleaved = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*positions.shape, -1)
    return interleaved[..., :d_model]


def init_learned_positions(rng: PRNGKeyArray, max_len: int, d_model: int, *, dtype=jnp.float32) -> Float[Array, "T D"]:
    """A learned position table ``[max_len, D]`` (the paper's Table 3 row (E) alternative)."""
    return jax.random.normal(rng, (max_len, d_model), dtype) * 0.02


def learned_positions(
    table: Float[Array, "P D"], positions: int | Int[Array, "*B T"], *, offset: int | Int[Array, ""] = 0
) -> Float[Array, "*B T D"]:
    """Rows ``offset .. offset + T`` of a learned position table ``[T, D]``, or the rows of given positions.

    Args:
      table: ``[max_len, D]``.
      positions: ``T`` (rows ``offset .. offset + T - 1``), or an integer array ``[..., T]`` of positions.
      offset: the first position, for a length.

    Returns:
      ``[T, D]`` or ``[..., T, D]``.

    Example:
      >>> learned_positions(jnp.arange(6.0).reshape(3, 2), 2, offset=1).tolist()
      [[2.0, 3.0], [4.0, 5.0]]
      >>> learned_positions(jnp.arange(6.0).reshape(3, 2), jnp.array([[2, 0]])).tolist()
      [[[4.0, 5.0], [0.0, 1.0]]]
    """
    if not isinstance(positions, int):
        return jnp.take(table, positions + offset, axis=0)
    if isinstance(offset, int) and offset + positions > table.shape[0]:
        raise ValueError(f"positions {offset}..{offset + positions - 1} exceed the learned table of {table.shape[0]}")
    return jax.lax.dynamic_slice_in_dim(table, offset, positions, axis=0)


# ----------------------------------------------------------------------------------------------------------
# Dropout (§5.4)
# ----------------------------------------------------------------------------------------------------------


def dropout(x: Float[Array, "..."], rate: float, rng: PRNGKeyArray | None) -> Float[Array, "..."]:
    """Inverted dropout: zeroes each element with probability ``rate`` and rescales the rest.

    Applied only when ``rng`` is given and ``rate > 0``: passing no PRNG key is how callers say "evaluate".

    Example:
      >>> dropout(jnp.ones(3), 0.5, None).tolist()
      [1.0, 1.0, 1.0]
    """
    ensure_static("dropout", rate=rate)
    if rng is None or rate == 0.0:
        return x
    keep = fused_random.bernoulli(rng, 1.0 - rate, x.shape)  # jax.random's bits, fused into this op
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def word_dropout_mask(
    tokens: Int[Array, "*B T"], rate: float, rng: PRNGKeyArray | None, *, pad_id: int = 0
) -> Bool[Array, "*B T"] | None:
    """Which whole tokens word dropout drops: each non-padding token with probability ``rate`` (padding never).

    Word dropout (Gal & Ghahramani 2016; Sennrich & Zhang 2019) removes a token's identity from the input, not
    single activations; the caller zeroes the dropped tokens' embeddings or replaces them by an unknown-token id.
    No rescaling: a dropped word is absent, not a noisier copy of itself.

    Args:
      tokens: ``[..., T]`` integer ids.
      rate: probability of dropping each real token, in ``[0, 1)``.
      rng: PRNG key; None (evaluation) or ``rate == 0`` drops nothing.
      pad_id: the padding id, never dropped.

    Returns:
      ``[..., T]`` True at dropped tokens, or None when nothing can be dropped.

    Example:
      >>> word_dropout_mask(jnp.array([[5, 6, 0]]), 0.5, None) is None
      True
      >>> word_dropout_mask(jnp.array([[5, 6, 0]]), 0.999, jax.random.key(0)).tolist()  # never the padding
      [[True, True, False]]
    """
    ensure_static("word_dropout_mask", rate=rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"word dropout rate must be in [0, 1), got {rate}")
    if rng is None or rate == 0.0:
        return None
    return fused_random.bernoulli(rng, rate, tokens.shape) & (tokens != pad_id)
