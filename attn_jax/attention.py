"""Scaled dot-product and multi-head attention (paper §3.2.1, §3.2.2, equation 1).

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V
    MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O,   head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)

Weights keep the heads axis (``w_q: [D, N, H]``, ``w_o: [N, H, D]``), so "concat then project" is one einsum
over ``N H``. With fewer key/value heads than query heads (``K < N``) the same code is grouped-query attention:
query head ``n`` reads key/value head ``n // (N // K)``, as in ``jax.nn.dot_product_attention``.

Three implementations sit behind one signature: ``"xla"`` (the reference einsum path, which can return the
weights), ``"chunked"`` (Rabe & Staats 2021, memory linear in sequence length, see ``attn_jax.chunked``) and
``"cudnn"`` (``jax.nn.dot_product_attention`` on a GPU).
"""

import math

import jax
import jax.numpy as jnp

from attn_jax import chunked as _chunked
from attn_jax.masks import causal_mask, combine_masks
from attn_jax.types import Array, AttentionParams, Bool, Float, PRNGKeyArray

IMPLEMENTATIONS = ("xla", "chunked", "cudnn")

# Above this many logits per call, ``implementation=None`` stops materialising the [B, N, T, S] matrix
# (2**27 float32 logits = 512 MiB, and the backward pass keeps several such tensors).
_CHUNKED_THRESHOLD = 2**27


def scaled_dot_product_attention(
    query: Float[Array, "B T N H"],
    key: Float[Array, "B S K H"],
    value: Float[Array, "B S K H"],
    *,
    mask: Bool[Array, "..."] | None = None,
    bias: Float[Array, "..."] | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: PRNGKeyArray | None = None,
    implementation: str | None = None,
    return_weights: bool = False,
):
    """softmax(Q K^T * scale + bias) V over the keys a query may attend to (paper equation 1).

    The logits and the softmax are computed in float32 whatever the input dtype; the result has the query's
    dtype. A query that may attend to no key gets zeros (and zero gradients), never NaN.

    Args:
      query: ``[B, T, N, H]``.
      key: ``[B, S, K, H]``; ``N`` must be a multiple of ``K`` (grouped-query attention when ``K < N``).
      value: ``[B, S, K, H]``.
      mask: boolean, True = attend, broadcastable to ``[B, N, T, S]``.
      bias: added to the logits before masking, broadcastable to ``[B, N, T, S]``.
      causal: also mask key ``s > t`` (top-left aligned, see ``attn_jax.causal_mask``).
      scale: multiplies the logits; defaults to ``1 / sqrt(H)``.
      dropout_rate: dropout on the attention weights, applied only when ``dropout_rng`` is given.
      dropout_rng: PRNG key for that dropout.
      implementation: ``"xla"``, ``"chunked"``, ``"cudnn"`` or ``None`` (the best for the shape and backend).
      return_weights: also return the attention weights (``"xla"`` only).

    Returns:
      ``[B, T, N, H]``, and with ``return_weights`` also the weights ``[B, N, T, S]`` (float32).

    Example:
      >>> import numpy as np
      >>> q = jnp.ones((1, 2, 1, 4)); k = jnp.ones((1, 3, 1, 4)); v = jnp.arange(12.0).reshape(1, 3, 1, 4)
      >>> out = scaled_dot_product_attention(q, k, v)  # equal logits: each query gets the mean of the values
      >>> np.asarray(out[0, :, 0], np.float64).round(4).tolist()
      [[4.0, 5.0, 6.0, 7.0], [4.0, 5.0, 6.0, 7.0]]
    """
    B, T, N, H = _check_shapes(query, key, value)
    S = key.shape[1]
    mask = _as_rank4(mask, "mask", (B, N, T, S))
    bias = _as_rank4(bias, "bias", (B, N, T, S))
    if mask is not None and mask.dtype != jnp.bool_:
        raise TypeError(f"mask must be boolean (True = attend), got dtype {mask.dtype}")
    scale = 1.0 / math.sqrt(H) if scale is None else scale
    use_dropout = dropout_rate > 0.0 and dropout_rng is not None
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    implementation = _choose_implementation(
        implementation, (B, N, T, S), return_weights=return_weights, dropout=use_dropout, dtype=query.dtype
    )
    if return_weights and implementation != "xla":
        raise ValueError(f"return_weights=True needs implementation='xla', not {implementation!r}")
    rate = dropout_rate if use_dropout else 0.0
    if implementation == "chunked":
        return _chunked.chunked_attention(
            query, key, value, mask=mask, bias=bias, causal=causal, scale=scale,
            dropout_rate=rate, dropout_rng=dropout_rng,
        )  # fmt: skip
    if causal:
        mask = combine_masks(mask, causal_mask(T, S))
    if implementation == "cudnn":
        return _cudnn_attention(query, key, value, mask=mask, bias=bias, scale=scale, dropout_rate=rate)
    out, weights = _xla_attention(query, key, value, mask, bias, scale, rate, dropout_rng)
    return (out, weights) if return_weights else out


def _check_shapes(query, key, value) -> tuple[int, int, int, int]:
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [B, T|S, heads, H], got shape {x.shape}")
    B, T, N, H = query.shape
    if key.shape != value.shape:
        raise ValueError(f"key {key.shape} and value {value.shape} must have the same shape [B, S, K, H]")
    if key.shape[0] != B or key.shape[3] != H:
        raise ValueError(f"key {key.shape} does not match query {query.shape}: batch and head dim must agree")
    if N % key.shape[2]:
        raise ValueError(f"query heads N={N} must be a multiple of key/value heads K={key.shape[2]}")
    if T == 0 or key.shape[1] == 0:
        raise ValueError(f"empty sequence: query length {T}, key length {key.shape[1]}")
    return B, T, N, H


def _as_rank4(x, name: str, full: tuple[int, int, int, int]):
    """Left-pads ``x`` with unit axes to rank 4 (numpy broadcasting) and checks it broadcasts to ``full``."""
    if x is None:
        return None
    if x.ndim > 4:
        raise ValueError(f"{name} has rank {x.ndim}; it must broadcast to [B, N, T, S] = {full}")
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    if any(d not in (1, f) for d, f in zip(x.shape, full, strict=True)):
        raise ValueError(f"{name} of shape {x.shape} does not broadcast to [B, N, T, S] = {full}")
    return x


def _choose_implementation(implementation, logits_shape, *, return_weights, dropout, dtype) -> str:
    if implementation is not None:
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
        return implementation
    if return_weights:
        return "xla"
    if jax.default_backend() == "gpu" and not dropout and dtype in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "chunked" if math.prod(logits_shape) > _CHUNKED_THRESHOLD else "xla"


def _group_heads(x, K: int):
    """``[B, N|1, T, S] -> [B, K|1, G|1, T, S]``, matching query head n to key/value head n // G."""
    if x is None or x.shape[1] == 1:
        return None if x is None else x[:, :, None]
    return x.reshape(x.shape[0], K, x.shape[1] // K, *x.shape[2:])


def _xla_attention(query, key, value, mask, bias, scale, dropout_rate, dropout_rng):
    B, T, N, H = query.shape
    K = key.shape[2]
    q = query.reshape(B, T, K, N // K, H)  # [B, T, N, H] -> [B, T, K, G, H]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, key, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + _group_heads(bias, K).astype(jnp.float32)
    mask = _group_heads(mask, K)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        # A row with nothing to attend to has a uniform softmax over finfo.min; zero it instead.
        weights = jnp.where(jnp.any(mask, axis=-1, keepdims=True), weights, 0.0)
    if dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", weights.astype(value.dtype), value)
    # [B, T, K, G, H] -> [B, T, N, H];  [B, K, G, T, S] -> [B, N, T, S]
    return out.reshape(B, T, N, H), weights.reshape(B, N, T, key.shape[1])


def _cudnn_attention(query, key, value, *, mask, bias, scale, dropout_rate):
    if jax.default_backend() != "gpu":
        raise ValueError(f"implementation='cudnn' needs a GPU backend, this one is {jax.default_backend()!r}")
    if dropout_rate > 0.0:
        raise ValueError("implementation='cudnn' does not support attention dropout; use 'xla' or 'chunked'")
    if query.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"implementation='cudnn' needs bfloat16 or float16 inputs, got {query.dtype}")
    # jax.nn gives a fully-masked row the mean of the values; our contract is zeros.
    out = jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask, scale=scale, implementation="cudnn")
    if mask is None:
        return out
    any_key = jnp.any(jnp.broadcast_to(mask, (*mask.shape[:3], key.shape[1])), axis=-1)  # [B, N|1, T]
    return out * jnp.swapaxes(any_key, 1, 2)[..., None].astype(out.dtype)  # [B, T, N|1, 1]


# ----------------------------------------------------------------------------------------------------------
# Multi-head attention
# ----------------------------------------------------------------------------------------------------------


def init_multi_head_attention(
    rng: PRNGKeyArray,
    d_model: int,
    num_heads: int,
    *,
    head_dim: int | None = None,
    num_kv_heads: int | None = None,
    use_bias: bool = False,
    dtype=jnp.float32,
) -> AttentionParams:
    """Glorot-uniform projections (fan-in D, fan-out N*H, as one D x N*H matrix) and zero biases.

    Args:
      rng: PRNG key.
      d_model: ``D``.
      num_heads: ``N``.
      head_dim: ``H``; defaults to ``D // N`` (the paper's d_k = d_model / h).
      num_kv_heads: ``K``; defaults to ``N``.
      use_bias: add ``b_q, b_k, b_v, b_o``.
      dtype: parameter dtype.

    Returns:
      ``{"w_q": [D,N,H], "w_k": [D,K,H], "w_v": [D,K,H], "w_o": [N,H,D]}`` (+ biases).

    Example:
      >>> p = init_multi_head_attention(jax.random.key(0), 16, 4)
      >>> p["w_q"].shape, p["w_o"].shape
      ((16, 4, 4), (4, 4, 16))
    """
    if head_dim is None:
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}; pass head_dim")
        head_dim = d_model // num_heads
    K = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % K:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={K}")
    D, N, H = d_model, num_heads, head_dim
    rq, rk, rv, ro = jax.random.split(rng, 4)

    def glorot(r, shape, fan_in, fan_out):
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return jax.random.uniform(r, shape, dtype, -limit, limit)

    params: AttentionParams = {
        "w_q": glorot(rq, (D, N, H), D, N * H),
        "w_k": glorot(rk, (D, K, H), D, K * H),
        "w_v": glorot(rv, (D, K, H), D, K * H),
        "w_o": glorot(ro, (N, H, D), N * H, D),
    }
    if use_bias:
        params |= {
            "b_q": jnp.zeros((N, H), dtype),
            "b_k": jnp.zeros((K, H), dtype),
            "b_v": jnp.zeros((K, H), dtype),
            "b_o": jnp.zeros((D,), dtype),
        }
    return params


def project_query(params: AttentionParams, x: Float[Array, "B T D"]) -> Float[Array, "B T N H"]:
    """Q = x W^Q (+ b_q), one slice per head."""
    q = jnp.einsum("BTD,DNH->BTNH", x, params["w_q"].astype(x.dtype))
    return q + params["b_q"].astype(x.dtype)[None, None] if "b_q" in params else q


def project_key_value(
    params: AttentionParams, x: Float[Array, "B S D"]
) -> tuple[Float[Array, "B S K H"], Float[Array, "B S K H"]]:
    """K = x W^K (+ b_k) and V = x W^V (+ b_v); cached once per source sentence when decoding."""
    k = jnp.einsum("BSD,DKH->BSKH", x, params["w_k"].astype(x.dtype))
    v = jnp.einsum("BSD,DKH->BSKH", x, params["w_v"].astype(x.dtype))
    if "b_k" in params:
        k = k + params["b_k"].astype(x.dtype)[None, None]
        v = v + params["b_v"].astype(x.dtype)[None, None]
    return k, v


def project_output(params: AttentionParams, heads: Float[Array, "B T N H"]) -> Float[Array, "B T D"]:
    """Concat(head_1..head_h) W^O (+ b_o): the concatenation is the contraction over ``N H``."""
    out = jnp.einsum("BTNH,NHD->BTD", heads, params["w_o"].astype(heads.dtype))
    return out + params["b_o"].astype(heads.dtype)[None, None] if "b_o" in params else out


def multi_head_attention(
    params: AttentionParams,
    inputs_q: Float[Array, "B T D"],
    inputs_kv: Float[Array, "B S D"],
    *,
    mask: Bool[Array, "..."] | None = None,
    causal: bool = False,
    dropout_rate: float = 0.0,
    dropout_rng: PRNGKeyArray | None = None,
    implementation: str | None = None,
    return_weights: bool = False,
):
    """MultiHead(Q, K, V) with Q from ``inputs_q`` and K, V from ``inputs_kv`` (self-attention: the same array).

    Args:
      params: from ``init_multi_head_attention``.
      inputs_q: ``[B, T, D]``.
      inputs_kv: ``[B, S, D]``.
      mask: boolean, True = attend, broadcastable to ``[B, N, T, S]``.
      causal: mask keys after the query position.
      dropout_rate: dropout on the attention weights (only with ``dropout_rng``).
      dropout_rng: PRNG key for that dropout.
      implementation: see ``scaled_dot_product_attention``.
      return_weights: also return the weights ``[B, N, T, S]``.

    Returns:
      ``[B, T, D]`` (and the weights with ``return_weights``).

    Example:
      >>> p = init_multi_head_attention(jax.random.key(0), 8, 2)
      >>> multi_head_attention(p, jnp.ones((3, 5, 8)), jnp.ones((3, 7, 8))).shape
      (3, 5, 8)
    """
    if inputs_q.shape[-1] != params["w_q"].shape[0] or inputs_kv.shape[-1] != params["w_k"].shape[0]:
        raise ValueError(
            f"inputs_q {inputs_q.shape} / inputs_kv {inputs_kv.shape} do not end in d_model={params['w_q'].shape[0]}"
        )
    q = project_query(params, inputs_q)
    k, v = project_key_value(params, inputs_kv)
    result = scaled_dot_product_attention(
        q, k, v, mask=mask, causal=causal, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
        implementation=implementation, return_weights=return_weights,
    )  # fmt: skip
    if return_weights:
        heads, weights = result
        return project_output(params, heads), weights
    return project_output(params, result)


def from_flax_linen_attention(variables) -> AttentionParams:
    """Maps ``flax.linen.MultiHeadDotProductAttention`` variables onto this module's parameter dict.

    Linen's ``DenseGeneral`` kernels already have our layout (query/key/value ``[D, N, H]``, out ``[N, H, D]``),
    so this only renames keys.

    Args:
      variables: the module's variables, with or without the top-level ``"params"`` collection.

    Returns:
      ``AttentionParams``, with biases when the Linen module had them.

    Example:
      >>> import flax.linen as nn
      >>> m = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
      >>> v = m.init(jax.random.key(0), jnp.ones((1, 3, 8)))
      >>> sorted(from_flax_linen_attention(v))
      ['b_k', 'b_o', 'b_q', 'b_v', 'w_k', 'w_o', 'w_q', 'w_v']
    """
    linen = variables.get("params", variables)
    names = {"q": "query", "k": "key", "v": "value", "o": "out"}
    missing = [n for n in names.values() if n not in linen]
    if missing:
        raise KeyError(f"not MultiHeadDotProductAttention variables: missing {missing}, found {sorted(linen)}")
    params = {f"w_{ours}": jnp.asarray(linen[theirs]["kernel"]) for ours, theirs in names.items()}
    params |= {
        f"b_{ours}": jnp.asarray(linen[theirs]["bias"]) for ours, theirs in names.items() if "bias" in linen[theirs]
    }
    return params
