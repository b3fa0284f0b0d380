"""The pieces around attention: layer norm, the position-wise FFN, embeddings, positions, dropout.

Paper references: §3.1 (residual + LayerNorm around each sub-layer), §3.3 (position-wise feed-forward,
equation 2), §3.4 (shared embeddings scaled by sqrt(d_model), pre-softmax projection through the same
matrix), §3.5 (sinusoidal positions), §5.4 (residual dropout).
"""

import math

import jax
import jax.numpy as jnp

from attn_jax.types import (
    Array,
    EmbeddingParams,
    FeedForwardParams,
    Float,
    Int,
    LayerNormParams,
    PRNGKeyArray,
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
    """(x - mean) / sqrt(var + epsilon) * scale + bias over the last axis, computed in float32.

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
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + epsilon)
    scale, bias = (_lift(params[name].astype(jnp.float32), x.ndim) for name in ("scale", "bias"))
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


def position_wise_ffn(params: FeedForwardParams, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
    """FFN(x) = max(0, x W_1 + b_1) W_2 + b_2 (paper equation 2), applied at every position alike.

    Args:
      params: ``{"w_1": [D, F], "b_1": [F], "w_2": [F, D], "b_2": [D]}``.
      x: ``[B, T, D]``.

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
    hidden = jax.nn.relu(hidden)
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


def shared_logits(params: EmbeddingParams, x: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
    """The pre-softmax linear transformation through the (shared) embedding matrix: x E^T.

    Reverse-mode only (``jax.grad``, not ``jax.jvp``): its gradient is written by hand, see ``_logits_bwd``.

    Example:
      >>> shared_logits({"embedding": jnp.eye(3)}, jnp.array([[[1.0, 2.0, 3.0]]])).tolist()
      [[[1.0, 2.0, 3.0]]]
    """
    return _logits(params["embedding"].astype(x.dtype), x)


@jax.custom_vjp
def _logits(table: Float[Array, "V D"], x: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
    return jnp.einsum("BTD,VD->BTV", x, table)


def _logits_fwd(table, x):
    return _logits(table, x), (table, x)


def _logits_bwd(residuals, d_logits: Float[Array, "B T V"]):
    """d table = dlogits^T x, computed as (x^T dlogits)^T.

    Autodiff's form makes XLA:CPU materialise the [V, B*T] transpose of dlogits, the step's largest array: 12% of
    the small benchmark's training step (experiments/results/NOTES.md). This form transposes only x and the
    [D, V] product.
    """
    table, x = residuals
    d_table = jnp.einsum("BTD,BTV->DV", x, d_logits).T
    return d_table, jnp.einsum("BTV,VD->BTD", d_logits, table)


_logits.defvjp(_logits_fwd, _logits_bwd)


# ----------------------------------------------------------------------------------------------------------
# Positions (§3.5)
# ----------------------------------------------------------------------------------------------------------


def sinusoidal_positions(length: int, d_model: int, *, offset: int | Int[Array, ""] = 0) -> Float[Array, "T D"]:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d_model)),  PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)).

    Sine on even and cosine on odd dimensions, interleaved exactly as the paper writes it (some libraries
    concatenate the two halves instead).

    Args:
      length: ``T``, the number of positions.
      d_model: ``D``; may be odd (the last column is then a sine).
      offset: the first position (used when decoding one token at a time).

    Returns:
      ``[T, D]`` float32.

    Example:
      >>> import numpy as np
      >>> np.asarray(sinusoidal_positions(2, 4), np.float64).round(3).tolist()
      [[0.0, 1.0, 0.0, 1.0], [0.841, 0.54, 0.01, 1.0]]
    """
    positions = jnp.arange(length, dtype=jnp.float32) + jnp.asarray(offset, jnp.float32)
    two_i = jnp.arange(0, d_model, 2, dtype=jnp.float32)
    angles = positions[:, None] / jnp.power(10000.0, two_i / d_model)[None, :]  # [T, ceil(D/2)]
    # [T, D/2] sin, [T, D/2] cos -> [T, D/2, 2] -> [T, D], so sin lands on even and cos on odd columns.
    interleaved = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(length, -1)
    return interleaved[:, :d_model]


def init_learned_positions(rng: PRNGKeyArray, max_len: int, d_model: int, *, dtype=jnp.float32) -> Float[Array, "T D"]:
    """A learned position table ``[max_len, D]`` (the paper's Table 3 row (E) alternative)."""
    return jax.random.normal(rng, (max_len, d_model), dtype) * 0.02


def learned_positions(table: Float[Array, "P D"], length: int, *, offset: int | Int[Array, ""] = 0):
    """Rows ``offset .. offset + length`` of a learned position table, ``[T, D]``.

    Example:
      >>> learned_positions(jnp.arange(6.0).reshape(3, 2), 2, offset=1).tolist()
      [[2.0, 3.0], [4.0, 5.0]]
    """
    if isinstance(offset, int) and offset + length > table.shape[0]:
        raise ValueError(f"positions {offset}..{offset + length - 1} exceed the learned table of {table.shape[0]}")
    return jax.lax.dynamic_slice_in_dim(table, offset, length, axis=0)


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
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))
