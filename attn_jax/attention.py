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
from attn_jax import fused_random
from attn_jax.masks import causal_mask, check_full_rank, combine_masks, flatten_batch, named_masks
from attn_jax.types import Array, AttentionParams, Bool, Float, Int, PRNGKeyArray, ensure_static, upcast_dtype

IMPLEMENTATIONS = ("xla", "chunked", "cudnn")

# Above this many logits per call, ``implementation=None`` stops materialising the [B, N, T, S] matrix
# (2**27 float32 logits = 512 MiB, and the backward pass keeps several such tensors).
_CHUNKED_THRESHOLD = 2**27


def scaled_dot_product_attention(
    query: Float[Array, "*B T N H"],
    key: Float[Array, "*B S K H"],
    value: Float[Array, "*B S K H"],
    *,
    mask: Bool[Array, "..."] | None = None,
    bias: Float[Array, "..."] | None = None,
    key_mask: Bool[Array, "*B S"] | None = None,
    query_seq_lengths: Int[Array, "*B"] | None = None,
    key_value_seq_lengths: Int[Array, "*B"] | None = None,
    causal: bool = False,
    scale: float | Float[Array, ""] | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: PRNGKeyArray | None = None,
    implementation: str | None = None,
    return_weights: bool = False,
):
    """softmax(Q K^T * scale + bias) V over the keys a query may attend to (paper equation 1).

    Any number of leading batch axes ``*B`` (none: ``[T, N, H]``, as ``jax.nn.dot_product_attention``
    accepts), so ``jax.vmap`` and per-example code work. The logits and the softmax are computed in
    ``promote(float32, dtype)`` (float32 for bfloat16, float64 for float64); the result has the query's dtype.
    A query that may attend to no key gets zeros (and zero gradients), never NaN.

    Masks are given by name, so none can broadcast onto the wrong axes: ``mask`` and ``bias`` have the full rank
    of the logits ``[*B, N, T, S]`` (size-1 axes broadcast; a lower rank is refused, since a ``[B, S]`` padding
    mask would silently broadcast as ``[T, S]``); a per-key padding mask is ``key_mask=[*B, S]``; lengths are
    ``query_seq_lengths`` / ``key_value_seq_lengths`` ``[*B]`` (as ``jax.nn``). All given masks are ANDed.

    Forward-mode differentiation (``jax.jvp``, ``jacfwd``, ``hessian``) works through ``"xla"`` (chosen by
    ``implementation=None`` below 2**27 logits) but not through ``"chunked"``: see ``attn_jax.chunked``.

    Args:
      query: ``[*B, T, N, H]``.
      key: ``[*B, S, K, H]``; ``N`` must be a multiple of ``K`` (grouped-query attention when ``K < N``).
      value: ``[*B, S, K, H]``.
      mask: boolean, True = attend, ``[*B|1, N|1, T|1, S|1]`` (full rank).
      bias: added to the logits before masking, ``[*B|1, N|1, T|1, S|1]`` (full rank).
      key_mask: ``[*B, S]``, True at keys that may be attended (False = padding).
      query_seq_lengths: ``[*B]`` number of real queries; later queries attend to nothing (zeros).
      key_value_seq_lengths: ``[*B]`` number of real keys.
      causal: also mask key ``s > t`` (top-left aligned, see ``attn_jax.causal_mask``).
      scale: multiplies the logits; defaults to ``1 / sqrt(H)``.
      dropout_rate: dropout on the attention weights, applied only when ``dropout_rng`` is given.
      dropout_rng: PRNG key for that dropout.
      implementation: ``"xla"``, ``"chunked"``, ``"cudnn"`` or ``None`` (the best for the shape and backend).
      return_weights: also return the attention weights (``"xla"`` only).

    Returns:
      ``[*B, T, N, H]``, and with ``return_weights`` also the weights ``[*B, N, T, S]`` (compute dtype).

    Example:
      >>> import numpy as np
      >>> q = jnp.ones((1, 2, 1, 4)); k = jnp.ones((1, 3, 1, 4)); v = jnp.arange(12.0).reshape(1, 3, 1, 4)
      >>> out = scaled_dot_product_attention(q, k, v)  # equal logits: each query gets the mean of the values
      >>> np.asarray(out[0, :, 0], np.float64).round(4).tolist()
      [[4.0, 5.0, 6.0, 7.0], [4.0, 5.0, 6.0, 7.0]]
      >>> scaled_dot_product_attention(q[0], k[0], v[0], key_mask=jnp.array([True, False, False]))[:, 0].tolist()
      [[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]]
    """
    ensure_static(
        "scaled_dot_product_attention", causal=causal, dropout_rate=dropout_rate, implementation=implementation,
        return_weights=return_weights,
    )  # fmt: skip
    batch, (T, N, H) = _check_shapes(query, key, value)
    S = key.shape[-3]
    full = (*batch, N, T, S)
    if mask is not None and mask.dtype != jnp.bool_:
        raise TypeError(f"mask must be boolean (True = attend), got dtype {mask.dtype}")
    mask = check_full_rank(mask, "mask", full)
    bias = check_full_rank(bias, "bias", full)
    mask = combine_masks(mask, named_masks(batch, T, S, key_mask, query_seq_lengths, key_value_seq_lengths))
    # Flatten the batch axes to one: [*B, ...] -> [B, ...] (B = 1 for unbatched inputs).
    B = math.prod(batch)
    query, key, value = (x.reshape(B, *x.shape[len(batch) :]) for x in (query, key, value))
    mask, bias = (None if x is None else flatten_batch(x, batch) for x in (mask, bias))
    result = _attention(
        query, key, value, mask=mask, bias=bias, causal=causal, scale=1.0 / math.sqrt(H) if scale is None else scale,
        dropout_rate=dropout_rate, dropout_rng=dropout_rng, implementation=implementation,
        return_weights=return_weights,
    )  # fmt: skip
    if return_weights:
        out, weights = result
        return out.reshape(*batch, T, N, H), weights.reshape(full)
    return result.reshape(*batch, T, N, H)


def _attention(
    query, key, value, *, mask, bias, causal, scale, dropout_rate, dropout_rng, implementation, return_weights
):
    """The three implementations on ``[B, T, N, H]`` inputs and rank-4 masks."""
    B, T, N, _ = query.shape
    S = key.shape[1]
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
        if isinstance(scale, jax.core.Tracer):  # the chunked kernel's scale is static: fold a traced one into Q
            query, scale = query * scale.astype(query.dtype), 1.0
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


def _check_shapes(query, key, value) -> tuple[tuple[int, ...], tuple[int, int, int]]:
    """``(batch axes *B, (T, N, H))`` after checking that the three inputs agree."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim < 3:
            raise ValueError(f"{name} must be [*B, T|S, heads, H], got shape {x.shape}")
    if key.shape != value.shape:
        raise ValueError(f"key {key.shape} and value {value.shape} must have the same shape [*B, S, K, H]")
    *batch, T, N, H = query.shape
    if key.ndim != query.ndim or tuple(key.shape[:-3]) != tuple(batch) or key.shape[-1] != H:
        raise ValueError(f"key {key.shape} does not match query {query.shape}: batch axes and head dim must agree")
    if N % key.shape[-2]:
        raise ValueError(f"query heads N={N} must be a multiple of key/value heads K={key.shape[-2]}")
    if T == 0 or key.shape[-3] == 0:
        raise ValueError(f"empty sequence: query length {T}, key length {key.shape[-3]}")
    return tuple(batch), (T, N, H)


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
    compute = upcast_dtype(query.dtype)
    q = query.reshape(B, T, K, N // K, H)  # [B, T, N, H] -> [B, T, K, G, H]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, key, preferred_element_type=compute)
    logits = logits * jnp.asarray(scale, compute)
    if bias is not None:
        logits = logits + _group_heads(bias, K).astype(compute)
    mask = _group_heads(mask, K)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(compute).min)
    weights = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        # A row with nothing to attend to has a uniform softmax over finfo.min; zero it instead.
        weights = jnp.where(jnp.any(mask, axis=-1, keepdims=True), weights, jnp.zeros((), compute))
    if dropout_rate > 0.0:
        keep = fused_random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / jnp.asarray(1.0 - dropout_rate, compute), jnp.zeros((), compute))
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


def _lift(b, ndim: int):
    """A bias ``[N, H]`` or ``[D]`` with unit axes in front, to add to a rank-``ndim`` array explicitly."""
    return b.reshape((1,) * (ndim - b.ndim) + b.shape)


def project_query(params: AttentionParams, x: Float[Array, "*B T D"]) -> Float[Array, "*B T N H"]:
    """Q = x W^Q (+ b_q), one slice per head."""
    q = jnp.einsum("...TD,DNH->...TNH", x, params["w_q"].astype(x.dtype))
    return q + _lift(params["b_q"].astype(x.dtype), q.ndim) if "b_q" in params else q


def project_key_value(
    params: AttentionParams, x: Float[Array, "*B S D"], x_v: Float[Array, "*B S D"] | None = None
) -> tuple[Float[Array, "*B S K H"], Float[Array, "*B S K H"]]:
    """K = x W^K (+ b_k) and V = x_v W^V (+ b_v), ``x_v`` defaulting to ``x``; cached once per source sentence."""
    x_v = x if x_v is None else x_v
    k = jnp.einsum("...SD,DKH->...SKH", x, params["w_k"].astype(x.dtype))
    v = jnp.einsum("...SD,DKH->...SKH", x_v, params["w_v"].astype(x_v.dtype))
    if "b_k" in params:
        k = k + _lift(params["b_k"].astype(x.dtype), k.ndim)
        v = v + _lift(params["b_v"].astype(x_v.dtype), v.ndim)
    return k, v


def project_output(params: AttentionParams, heads: Float[Array, "*B T N H"]) -> Float[Array, "*B T D"]:
    """Concat(head_1..head_h) W^O (+ b_o): the concatenation is the contraction over ``N H``."""
    out = jnp.einsum("...TNH,NHD->...TD", heads, params["w_o"].astype(heads.dtype))
    return out + _lift(params["b_o"].astype(heads.dtype), out.ndim) if "b_o" in params else out


def multi_head_attention(
    params: AttentionParams,
    inputs_q: Float[Array, "*B T D"],
    inputs_k: Float[Array, "*B S D"] | None = None,
    inputs_v: Float[Array, "*B S D"] | None = None,
    *,
    mask: Bool[Array, "..."] | None = None,
    bias: Float[Array, "..."] | None = None,
    key_mask: Bool[Array, "*B S"] | None = None,
    query_seq_lengths: Int[Array, "*B"] | None = None,
    key_value_seq_lengths: Int[Array, "*B"] | None = None,
    causal: bool = False,
    scale: float | Float[Array, ""] | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: PRNGKeyArray | None = None,
    implementation: str | None = None,
    return_weights: bool = False,
):
    """MultiHead(Q, K, V) with Q from ``inputs_q``, K from ``inputs_k`` and V from ``inputs_v``.

    ``inputs_k`` defaults to ``inputs_q`` (self-attention) and ``inputs_v`` to ``inputs_k`` (the paper's
    encoder-decoder attention reads keys and values from the same memory), as in ``flax.nnx.MultiHeadAttention``.
    Any number of leading batch axes, none included (``jax.vmap`` over ``[T, D]`` examples works).

    Args:
      params: from ``init_multi_head_attention``.
      inputs_q: ``[*B, T, D]``.
      inputs_k: ``[*B, S, D]``, or None for ``inputs_q``.
      inputs_v: ``[*B, S, D]``, or None for ``inputs_k``.
      mask, bias, key_mask, query_seq_lengths, key_value_seq_lengths, causal, scale: see
        ``scaled_dot_product_attention`` (``mask`` and ``bias`` have the full rank ``[*B, N, T, S]``).
      dropout_rate: dropout on the attention weights (only with ``dropout_rng``).
      dropout_rng: PRNG key for that dropout.
      implementation: see ``scaled_dot_product_attention``.
      return_weights: also return the weights ``[*B, N, T, S]``.

    Returns:
      ``[*B, T, D]`` (and the weights with ``return_weights``).

    Example:
      >>> p = init_multi_head_attention(jax.random.key(0), 8, 2)
      >>> multi_head_attention(p, jnp.ones((3, 5, 8)), jnp.ones((3, 7, 8))).shape
      (3, 5, 8)
      >>> jax.vmap(lambda x: multi_head_attention(p, x))(jnp.ones((3, 5, 8))).shape  # per-example self-attention
      (3, 5, 8)
    """
    inputs_k = inputs_q if inputs_k is None else inputs_k
    inputs_v = inputs_k if inputs_v is None else inputs_v
    D = params["w_q"].shape[0]
    if any(x.shape[-1] != D for x in (inputs_q, inputs_k, inputs_v)):
        raise ValueError(
            f"inputs_q {inputs_q.shape} / inputs_k {inputs_k.shape} / inputs_v {inputs_v.shape} do not end in "
            f"d_model={D}"
        )
    q = project_query(params, inputs_q)
    k, v = project_key_value(params, inputs_k, inputs_v)
    result = scaled_dot_product_attention(
        q, k, v, mask=mask, bias=bias, key_mask=key_mask, query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths, causal=causal, scale=scale, dropout_rate=dropout_rate,
        dropout_rng=dropout_rng, implementation=implementation, return_weights=return_weights,
    )  # fmt: skip
    if return_weights:
        heads, weights = result
        return project_output(params, heads), weights
    return project_output(params, result)


# ----------------------------------------------------------------------------------------------------------
# Self-attention one step at a time, on a key/value cache
# ----------------------------------------------------------------------------------------------------------


def init_attention_cache(params: AttentionParams, batch_shape: tuple[int, ...], max_len: int, *, dtype=jnp.float32):
    """An empty key/value cache for ``self_attention_step``.

    Returns:
      ``{"k": [*B, max_len, K, H], "v": [*B, max_len, K, H], "index": int32 scalar}`` (the next position).
    """
    _, K, H = params["w_k"].shape
    shape = (*batch_shape, max_len, K, H)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "index": jnp.zeros((), jnp.int32)}


def self_attention_step(
    params: AttentionParams,
    cache: dict,
    inputs: Float[Array, "*B T D"],
    *,
    dropout_rate: float = 0.0,
    dropout_rng: PRNGKeyArray | None = None,
    implementation: str | None = None,
) -> tuple[Float[Array, "*B T D"], dict]:
    """Causal self-attention for the next ``T`` positions (usually one), reusing the cached keys and values.

    Equals ``multi_head_attention(params, x, causal=True)`` at those positions when ``x`` is the whole prefix; the
    caller keeps ``index + T <= max_len`` (under ``jit`` the index is traced, so an overflow cannot raise).

    Args:
      params: from ``init_multi_head_attention``.
      cache: from ``init_attention_cache`` or a previous step.
      inputs: ``[*B, T, D]`` the next positions' inputs.
      dropout_rate, dropout_rng, implementation: as for ``scaled_dot_product_attention``.

    Returns:
      ``(outputs [*B, T, D], the updated cache)``.

    Example:
      >>> p = init_multi_head_attention(jax.random.key(0), 8, 2)
      >>> x = jax.random.normal(jax.random.key(1), (3, 8))
      >>> y0, cache = self_attention_step(p, init_attention_cache(p, (), 4), x[:1])
      >>> y1, cache = self_attention_step(p, cache, x[1:2])
      >>> bool(jnp.allclose(y1, multi_head_attention(p, x[:2], causal=True)[1:], atol=1e-6))
      True
    """
    index, max_len = cache["index"], cache["k"].shape[-3]
    T = inputs.shape[-2]
    k, v = project_key_value(params, inputs)
    k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), index, axis=k.ndim - 3)
    v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), index, axis=v.ndim - 3)
    # Query index + t attends to cached keys 0 .. index + t: [T, max_len] -> [1, ..., 1, T, max_len].
    allowed = jnp.arange(max_len)[None, :] <= (index + jnp.arange(T))[:, None]
    mask = allowed.reshape((1,) * (inputs.ndim - 1) + allowed.shape)
    heads = scaled_dot_product_attention(
        project_query(params, inputs), k, v, mask=mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
        implementation=implementation,
    )  # fmt: skip
    return project_output(params, heads), {"k": k, "v": v, "index": index + T}
