"""The shape alphabet, array aliases and parameter schemas shared by every module.

Shape letters (used in einsum strings, jaxtyping annotations, comments and docstrings):

    B  batch                          T  query / target length
    S  key / source length            D  d_model
    N  query heads (the paper's h)    K  key/value heads (K = N: multi-head; K < N: grouped-query)
    H  head dim (the paper's d_k = d_v)
    F  feed-forward width (d_ff)      V  vocabulary
    L  layers (the leading axis of a scanned layer stack)
    A  additive-attention hidden size (Bahdanau et al. 2014)

Parameters are plain nested dicts; the ``TypedDict`` schemas below name their keys and shapes, and the same
tree is what the Flax layer exposes and what checkpoints save.
"""

from typing import Any, TypedDict

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

__all__ = [
    "Array",
    "Bool",
    "Float",
    "Int",
    "PRNGKeyArray",
    "AttentionParams",
    "AdditiveAttentionParams",
    "LayerNormParams",
    "FeedForwardParams",
    "EmbeddingParams",
    "EncoderBlockParams",
    "DecoderBlockParams",
    "upcast_dtype",
    "ensure_static",
]


def upcast_dtype(dtype) -> jnp.dtype:
    """``promote(float32, dtype)``: the dtype softmax, layer norm and logits are computed in.

    Low-precision inputs (bfloat16, float16) are computed in float32; float64 stays float64 (with
    ``jax_enable_x64``), so verification work in double precision is accurate to ~1e-12, not to float32.

    Example:
      >>> upcast_dtype(jnp.bfloat16)
      dtype('float32')
    """
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def ensure_static(function: str, **arguments: Any) -> None:
    """Raises a one-line TypeError when an argument that selects code (not data) is a traced value.

    ``jax.jit(f)(x, causal=True)`` traces ``causal`` into an array, and the first Python ``if`` on it would raise
    a TracerBoolConversionError from deep inside the function; this names the argument and the fix instead.

    Example:
      >>> ensure_static("f", causal=True)  # a Python value passes
    """
    for name, value in arguments.items():
        if isinstance(value, jax.core.Tracer):
            raise TypeError(
                f"{function}: `{name}` must be a static Python value, got a traced array; under jax.jit pass it "
                f"through static_argnames=({name!r},) or close over it (functools.partial)"
            )


class _AttentionWeights(TypedDict):
    w_q: Float[Array, "D N H"]
    w_k: Float[Array, "D K H"]
    w_v: Float[Array, "D K H"]
    w_o: Float[Array, "N H D"]


class AttentionParams(_AttentionWeights, total=False):
    """Multi-head attention; the biases exist only with ``use_bias=True``."""

    b_q: Float[Array, "N H"]
    b_k: Float[Array, "K H"]
    b_v: Float[Array, "K H"]
    b_o: Float[Array, " D"]


class AdditiveAttentionParams(TypedDict):
    """Bahdanau attention: score(q, k) = v^T tanh(W_q q + W_k k + b)."""

    w_q: Float[Array, "Dq A"]
    w_k: Float[Array, "Dk A"]
    b: Float[Array, " A"]
    v: Float[Array, " A"]


class LayerNormParams(TypedDict):
    scale: Float[Array, " D"]
    bias: Float[Array, " D"]


class FeedForwardParams(TypedDict):
    """FFN(x) = max(0, x W_1 + b_1) W_2 + b_2 (paper eq. 2)."""

    w_1: Float[Array, "D F"]
    b_1: Float[Array, " F"]
    w_2: Float[Array, "F D"]
    b_2: Float[Array, " D"]


class EmbeddingParams(TypedDict):
    embedding: Float[Array, "V D"]


class EncoderBlockParams(TypedDict):
    self_attention: AttentionParams
    self_attention_norm: LayerNormParams
    ffn: FeedForwardParams
    ffn_norm: LayerNormParams


class DecoderBlockParams(TypedDict):
    self_attention: AttentionParams
    self_attention_norm: LayerNormParams
    cross_attention: AttentionParams
    cross_attention_norm: LayerNormParams
    ffn: FeedForwardParams
    ffn_norm: LayerNormParams
