"""Tests for attn_jax.attention against independent references.

The references are (1) a float64 NumPy transcription of the paper's equation 1,
softmax(Q K^T / sqrt(d_k) + bias) V, written without looking at the implementation; (2)
``jax.nn.dot_product_attention`` for outputs and gradients; (3) ``flax.linen.MultiHeadDotProductAttention``;
and (4) small cases worked out by hand. Shapes use a different prime per axis (B=2, T=5, S=7, N=3, H=11,
D=13) so that swapping two axes cannot pass. ``implementation="chunked"`` is tested in its own module.

KNOWN BUGS in attn_jax/attention.py, left failing on purpose (each test that trips one says so):
  * BUG 1: ``_xla_attention`` multiplies float32 weights by a bool array (``weights * jnp.any(mask, ...)``),
    which ``jax_numpy_dtype_promotion="strict"`` (tests/conftest.py) rejects with TypePromotionError, so
    every call with a mask or ``causal=True`` fails under the project's test config. Fix: cast the
    ``jnp.any(...)`` to ``weights.dtype``.
  * BUG 2: ``project_query`` / ``project_key_value`` / ``project_output`` add ``b_q [N, H]`` to
    ``[B, T, N, H]`` (and ``b_o [D]`` to ``[B, T, D]``) by implicit rank promotion, which
    ``jax_numpy_rank_promotion="raise"`` rejects, so ``multi_head_attention`` with ``use_bias=True`` fails.
    Fix: index the biases with ``[None, None]``.
With both one-line fixes applied to a scratch copy of attention.py every test in this file passes.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.attention import (
    init_multi_head_attention,
    multi_head_attention,
    scaled_dot_product_attention,
)
from attn_jax.interop import from_flax_linen_attention
from attn_jax.masks import causal_mask, combine_masks, padding_mask
from tests.helpers import assert_trees_allclose

B, T, S, N, H, D = 2, 5, 7, 3, 11, 13
RTOL, ATOL = 1e-5, 1e-6
LN3 = math.log(3.0)


# ---------------------------------------------------------------------------------------------------------
# Independent float64 reference (paper equation 1)
# ---------------------------------------------------------------------------------------------------------


def reference_attention(query, key, value, *, mask=None, bias=None, causal=False, scale=None):
    """softmax(Q K^T * scale + bias) V in float64, one query head per key/value head after repeating.

    Returns the output ``[B, T, N, H]``, the weights ``[B, N, T, S]`` and which logits may be attended
    ``[B, N, T, S]``. A row with no key to attend to gets zero weights, hence a zero output.
    """
    q, k, v = (np.asarray(a, np.float64) for a in (query, key, value))
    batch, queries, heads, head_dim = q.shape
    keys, kv_heads = k.shape[1], k.shape[2]
    # Grouped-query attention: query head n reads key/value head n // (N // K).
    k = np.repeat(k, heads // kv_heads, axis=2)
    v = np.repeat(v, heads // kv_heads, axis=2)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    logits = np.einsum("BTNH,BSNH->BNTS", q, k) * scale
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    allowed = np.ones((batch, heads, queries, keys), bool)
    if mask is not None:
        allowed = allowed & np.asarray(mask)
    if causal:
        allowed = allowed & np.tril(np.ones((queries, keys), bool))
    row_max = np.max(np.where(allowed, logits, -np.inf), axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    unnormalised = np.where(allowed, np.exp(logits - row_max), 0.0)
    total = unnormalised.sum(axis=-1, keepdims=True)
    weights = np.divide(unnormalised, total, out=np.zeros_like(unnormalised), where=total > 0)
    return np.einsum("BNTS,BSNH->BTNH", weights, v), weights, allowed


def reference_multi_head(params, inputs_q, inputs_kv, **attention_kwargs):
    """Q = x W_q + b_q, K = x W_k + b_k, V = x W_v + b_v, out = Concat(heads) W_o + b_o, in float64."""
    p = {name: np.asarray(w, np.float64) for name, w in params.items()}
    x_q, x_kv = np.asarray(inputs_q, np.float64), np.asarray(inputs_kv, np.float64)
    q = np.einsum("BTD,DNH->BTNH", x_q, p["w_q"]) + p.get("b_q", 0.0)
    k = np.einsum("BSD,DKH->BSKH", x_kv, p["w_k"]) + p.get("b_k", 0.0)
    v = np.einsum("BSD,DKH->BSKH", x_kv, p["w_v"]) + p.get("b_v", 0.0)
    heads, weights, _ = reference_attention(q, k, v, **attention_kwargs)
    return np.einsum("BTNH,NHD->BTD", heads, p["w_o"]) + p.get("b_o", 0.0), weights


# ---------------------------------------------------------------------------------------------------------
# Test inputs
# ---------------------------------------------------------------------------------------------------------


def _normal(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.normal(size=shape), dtype)


def _qkv(seed, *, heads=N, kv_heads=None, queries=T, keys=S, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    kv_heads = heads if kv_heads is None else kv_heads
    q = _normal(rng, (B, queries, heads, H), dtype)
    k = _normal(rng, (B, keys, kv_heads, H), dtype)
    v = _normal(rng, (B, keys, kv_heads, H), dtype)
    return q, k, v


# Batch 0 has two padded queries (rows with nothing to attend to) and five padded keys.
Q_TOKENS = jnp.array([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]], jnp.int32)  # [B, T]
KV_TOKENS = jnp.array([[1, 2, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 0]], jnp.int32)  # [B, S]


def _random_mask(seed, shape):
    mask = np.random.default_rng(seed).random(shape) > 0.4
    mask[(0,) * (len(shape) - 2) + (1, slice(None))] = False  # at least one row with no key at all
    return jnp.asarray(mask)


def _case(name):
    """Returns (q, k, v, kwargs) for ``scaled_dot_product_attention``; every case uses prime sizes."""
    heads, kv_heads = {"gqa_k2": (6, 2), "gqa_k3": (6, 3), "gqa_k1": (6, 1)}.get(name, (N, N))
    q, k, v = _qkv(CASES.index(name), heads=heads, kv_heads=kv_heads)
    rng = np.random.default_rng(7)
    bias = _normal(rng, (B, heads, T, S))
    kwargs = {
        "none": {},
        "padding": {"mask": padding_mask(Q_TOKENS, KV_TOKENS)},
        "causal": {"causal": True},
        "padding_causal": {"mask": padding_mask(Q_TOKENS, KV_TOKENS), "causal": True},
        "full_mask": {"mask": _random_mask(1, (B, heads, T, S))},
        "mask_broadcast": {"mask": _random_mask(2, (1, 1, T, S))},  # one [T, S] mask for every row and head
        "bias": {"bias": bias},
        "bias_padding": {"bias": bias[:1], "mask": padding_mask(Q_TOKENS, KV_TOKENS)},
        # Per-head masks and biases catch a wrong query-head -> key/value-head grouping.
        "gqa_k2": {"mask": _random_mask(3, (B, heads, T, S))},
        "gqa_k3": {"bias": bias[:1], "causal": True},
        "gqa_k1": {"mask": padding_mask(Q_TOKENS, KV_TOKENS)},
    }[name]
    return q, k, v, kwargs


CASES = [
    "none",
    "padding",
    "causal",
    "padding_causal",
    "full_mask",
    "mask_broadcast",
    "bias",
    "bias_padding",
    "gqa_k2",
    "gqa_k3",
    "gqa_k1",
]


def _full_mask(kwargs, heads):
    """The case's mask (with causal) as a plain [B, N, T, S] boolean array, for jax.nn and the reference."""
    mask = combine_masks(kwargs.get("mask"), causal_mask(T, S) if kwargs.get("causal") else None)
    return None if mask is None else jnp.broadcast_to(mask, (B, heads, T, S))


# ---------------------------------------------------------------------------------------------------------
# Hand-worked cases
# ---------------------------------------------------------------------------------------------------------
# One head, H=4 so the default scale is 1/sqrt(4) = 1/2. With q = [2, 0, 0, 0], k_0 = 0, k_1 = [ln 3, 0, 0, 0]:
#   logits = q.k / 2 = [0, ln 3]  ->  softmax = [1, 3] / 4 = [1/4, 3/4]
# and v_0 = [4, 0, 0, 0], v_1 = [8, 4, 0, 0]:  out = v_0 / 4 + 3 v_1 / 4 = [1 + 6, 3, 0, 0] = [7, 3, 0, 0].

HAND_Q = jnp.array([2.0, 0.0, 0.0, 0.0]).reshape(1, 1, 1, 4)  # [B=1, T=1, N=1, H=4]
HAND_K = jnp.array([[0.0, 0.0, 0.0, 0.0], [LN3, 0.0, 0.0, 0.0]]).reshape(1, 2, 1, 4)  # [B=1, S=2, K=1, H=4]
HAND_V = jnp.array([[4.0, 0.0, 0.0, 0.0], [8.0, 4.0, 0.0, 0.0]]).reshape(1, 2, 1, 4)


def test_hand_worked_single_head():
    out, weights = scaled_dot_product_attention(HAND_Q, HAND_K, HAND_V, return_weights=True)
    np.testing.assert_allclose(np.asarray(weights).reshape(2), [0.25, 0.75], rtol=RTOL)
    np.testing.assert_allclose(np.asarray(out).reshape(4), [7.0, 3.0, 0.0, 0.0], rtol=RTOL, atol=ATOL)


def test_hand_worked_explicit_scale():
    # scale=1 doubles the logits: [0, 2 ln 3] -> softmax [1, 9] / 10 -> out = [0.4 + 7.2, 3.6, 0, 0].
    out = scaled_dot_product_attention(HAND_Q, HAND_K, HAND_V, scale=1.0)
    np.testing.assert_allclose(np.asarray(out).reshape(4), [7.6, 3.6, 0.0, 0.0], rtol=RTOL, atol=ATOL)


def test_hand_worked_bias():
    # A bias of -ln 3 on key 1 cancels its logit: [0, 0] -> uniform -> out = (v_0 + v_1) / 2 = [6, 2, 0, 0].
    bias = jnp.array([0.0, -LN3]).reshape(1, 1, 1, 2)
    out = scaled_dot_product_attention(HAND_Q, HAND_K, HAND_V, bias=bias)
    np.testing.assert_allclose(np.asarray(out).reshape(4), [6.0, 2.0, 0.0, 0.0], rtol=RTOL, atol=ATOL)


# Fails until BUG 1 (minimal reproduction) (module docstring) is fixed.
def test_hand_worked_mask():
    # Masking key 1 leaves all the weight on key 0: out = v_0.
    mask = jnp.array([True, False]).reshape(1, 1, 1, 2)
    out, weights = scaled_dot_product_attention(HAND_Q, HAND_K, HAND_V, mask=mask, return_weights=True)
    np.testing.assert_array_equal(np.asarray(weights).reshape(2), [1.0, 0.0])
    np.testing.assert_allclose(np.asarray(out).reshape(4), [4.0, 0.0, 0.0, 0.0], rtol=RTOL, atol=ATOL)


# Fails until BUG 1 (module docstring) is fixed.
def test_hand_worked_causal():
    # Two identical queries: query 0 may see key 0 only (out = v_0), query 1 sees both (out as above).
    q = jnp.concatenate([HAND_Q, HAND_Q], axis=1)  # [1, 2, 1, 4]
    out = scaled_dot_product_attention(q, HAND_K, HAND_V, causal=True)
    expected = [[4.0, 0.0, 0.0, 0.0], [7.0, 3.0, 0.0, 0.0]]
    np.testing.assert_allclose(np.asarray(out).reshape(2, 4), expected, rtol=RTOL, atol=ATOL)


def test_hand_worked_grouped_query():
    # Two query heads share the one key/value head: head 0 is q above ([7, 3, 0, 0]); head 1 is a zero
    # query, so uniform weights and out = (v_0 + v_1) / 2 = [6, 2, 0, 0].
    q = jnp.concatenate([HAND_Q, jnp.zeros_like(HAND_Q)], axis=2)  # [1, 1, N=2, 4]
    out = scaled_dot_product_attention(q, HAND_K, HAND_V)
    expected = [[7.0, 3.0, 0.0, 0.0], [6.0, 2.0, 0.0, 0.0]]
    np.testing.assert_allclose(np.asarray(out).reshape(2, 4), expected, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------------------
# Against the float64 NumPy reference
# ---------------------------------------------------------------------------------------------------------


# Fails until BUG 1 for every case with a mask or causal (module docstring) is fixed.
@pytest.mark.parametrize("name", CASES)
def test_matches_numpy_reference(name):
    q, k, v, kwargs = _case(name)
    out, weights = scaled_dot_product_attention(q, k, v, implementation="xla", return_weights=True, **kwargs)
    heads = q.shape[2]
    ref_out, ref_weights, _ = reference_attention(q, k, v, mask=_full_mask(kwargs, heads), bias=kwargs.get("bias"))
    assert out.shape == (B, T, heads, H) and out.dtype == jnp.float32
    assert weights.shape == (B, heads, T, S) and weights.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref_out, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(weights), ref_weights, rtol=RTOL, atol=ATOL)


def test_explicit_scale_matches_numpy_reference():
    q, k, v = _qkv(11)
    out = scaled_dot_product_attention(q, k, v, scale=0.37, implementation="xla")
    ref_out, _, _ = reference_attention(q, k, v, scale=0.37)
    np.testing.assert_allclose(np.asarray(out), ref_out, rtol=RTOL, atol=ATOL)


# Fails until BUG 1 (module docstring) is fixed.
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_keep_dtype_and_softmax_in_float32(dtype):
    q, k, v = _qkv(12, dtype=dtype)
    mask = padding_mask(Q_TOKENS, KV_TOKENS)
    out, weights = scaled_dot_product_attention(q, k, v, mask=mask, implementation="xla", return_weights=True)
    assert out.dtype == dtype
    assert weights.dtype == jnp.float32
    ref_out, ref_weights, _ = reference_attention(q, k, v, mask=np.asarray(mask))
    # The inputs are exact in float64; only the low-precision logits/product round (about 3 digits).
    np.testing.assert_allclose(np.asarray(weights), ref_weights, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, rtol=2e-2, atol=3e-2)


# Fails until BUG 1 (module docstring) is fixed.
def test_jit_matches_eager():
    q, k, v, kwargs = _case("padding_causal")
    fn = jax.jit(lambda q, k, v, m: scaled_dot_product_attention(q, k, v, mask=m, causal=True))
    np.testing.assert_allclose(
        np.asarray(fn(q, k, v, kwargs["mask"])),
        np.asarray(scaled_dot_product_attention(q, k, v, **kwargs)),
        rtol=RTOL,
        atol=ATOL,
    )


# ---------------------------------------------------------------------------------------------------------
# Against jax.nn.dot_product_attention: outputs and gradients
# ---------------------------------------------------------------------------------------------------------


# Fails until BUG 1 for every case with a mask or causal (module docstring) is fixed.
@pytest.mark.parametrize("name", CASES)
def test_outputs_and_gradients_match_jax_nn(name):
    q, k, v, kwargs = _case(name)
    heads = q.shape[2]
    bias = kwargs.get("bias")
    mask = _full_mask(kwargs, heads)
    # jax.nn returns the mean of the values where a row has nothing to attend to; we return zeros. Compare
    # only rows with at least one key, and give the other rows a zero cotangent so they add no gradient.
    attendable = np.ones((B, heads, T), bool) if mask is None else np.any(np.asarray(mask), -1)
    attendable = attendable.transpose(0, 2, 1)[..., None].astype(np.float32)  # [B, N, T] -> [B, T, N, 1]
    cotangent = _normal(np.random.default_rng(3), (B, T, heads, H)) * jnp.asarray(attendable, jnp.float32)

    def ours(q, k, v, bias):
        other = {name: value for name, value in kwargs.items() if name != "bias"}
        return scaled_dot_product_attention(q, k, v, bias=bias, implementation="xla", **other)

    def theirs(q, k, v, bias):
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation="xla")

    out, ours_vjp = jax.vjp(ours, q, k, v, bias)
    ref_out, theirs_vjp = jax.vjp(theirs, q, k, v, bias)
    np.testing.assert_allclose(np.asarray(out) * attendable, np.asarray(ref_out) * attendable, rtol=RTOL, atol=ATOL)
    assert_trees_allclose(ours_vjp(cotangent), theirs_vjp(cotangent), rtol=RTOL, atol=ATOL)


# Fails until BUG 1 (module docstring) is fixed.
def test_fully_masked_rows_are_zero_with_zero_gradients():
    q, k, v = _qkv(4)
    mask = np.ones((B, 1, T, S), bool)
    mask[0] = False  # batch 0: nothing to attend to at all
    mask[1, 0, 2] = False  # batch 1, query 2: nothing to attend to
    mask = jnp.asarray(mask)

    def loss(q, k, v):
        out = scaled_dot_product_attention(q, k, v, mask=mask, implementation="xla")
        return jnp.sum(out * out), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
    np.testing.assert_array_equal(np.asarray(out[1, 2]), 0.0)
    assert np.abs(np.asarray(out[1, :2])).min() > 0.0  # the other rows are real attention
    for grad in grads:
        assert np.all(np.isfinite(np.asarray(grad)))
    grad_q, grad_k, grad_v = (np.asarray(g) for g in grads)
    np.testing.assert_array_equal(grad_q[0], 0.0)
    np.testing.assert_array_equal(grad_q[1, 2], 0.0)
    np.testing.assert_array_equal(grad_k[0], 0.0)
    np.testing.assert_array_equal(grad_v[0], 0.0)


# Fails until BUG 1 (module docstring) is fixed.
def test_fully_masked_rows_zero_even_with_bias():
    # A large bias must not leak into a row that may attend to nothing.
    q, k, v = _qkv(5)
    mask = jnp.zeros((1, 1, T, S), jnp.bool_)
    bias = jnp.full((1, 1, T, S), 1e4, jnp.float32)
    out = scaled_dot_product_attention(q, k, v, mask=mask, bias=bias, implementation="xla")
    np.testing.assert_array_equal(np.asarray(out), 0.0)


# ---------------------------------------------------------------------------------------------------------
# Returned weights
# ---------------------------------------------------------------------------------------------------------


# Fails until BUG 1 for every case with a mask or causal (module docstring) is fixed.
@pytest.mark.parametrize("name", ["none", "padding_causal", "full_mask", "gqa_k3", "gqa_k2"])
def test_weights_sum_to_one_and_reproduce_output(name):
    q, k, v, kwargs = _case(name)
    heads, kv_heads = q.shape[2], k.shape[2]
    out, weights = scaled_dot_product_attention(q, k, v, implementation="xla", return_weights=True, **kwargs)
    mask = _full_mask(kwargs, heads)
    attendable = np.ones((B, heads, T), bool) if mask is None else np.any(np.asarray(mask), -1)
    weights = np.asarray(weights, np.float64)
    assert np.all(weights >= 0.0)
    np.testing.assert_allclose(weights.sum(-1)[attendable], 1.0, rtol=RTOL)
    np.testing.assert_array_equal(weights.sum(-1)[~attendable], 0.0)
    if mask is not None:
        np.testing.assert_array_equal(weights[~np.asarray(mask)], 0.0)
    v_per_head = np.repeat(np.asarray(v, np.float64), heads // kv_heads, axis=2)
    np.testing.assert_allclose(np.asarray(out), np.einsum("BNTS,BSNH->BTNH", weights, v_per_head), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------------------
# Dropout on the attention weights
# ---------------------------------------------------------------------------------------------------------


def test_dropout_changes_output_and_is_deterministic_per_rng():
    q, k, v = _qkv(6)
    plain = scaled_dot_product_attention(q, k, v)
    rng = jax.random.key(0)
    dropped = scaled_dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=rng)
    again = scaled_dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=rng)
    other = scaled_dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(1))
    assert not np.allclose(np.asarray(dropped), np.asarray(plain))
    np.testing.assert_array_equal(np.asarray(dropped), np.asarray(again))
    assert not np.allclose(np.asarray(dropped), np.asarray(other))


def test_no_dropout_rng_means_no_dropout():
    q, k, v = _qkv(7)
    plain = scaled_dot_product_attention(q, k, v)
    np.testing.assert_array_equal(
        np.asarray(scaled_dot_product_attention(q, k, v, dropout_rate=0.5)), np.asarray(plain)
    )
    np.testing.assert_array_equal(
        np.asarray(scaled_dot_product_attention(q, k, v, dropout_rng=jax.random.key(0))), np.asarray(plain)
    )


def test_dropout_keeps_or_rescales_each_weight():
    # Inverted dropout: each weight is either dropped (0) or kept and divided by 1 - rate.
    q, k, v = _qkv(8)
    _, plain = scaled_dot_product_attention(q, k, v, return_weights=True)
    _, dropped = scaled_dot_product_attention(
        q, k, v, dropout_rate=0.25, dropout_rng=jax.random.key(2), return_weights=True
    )
    plain, dropped = np.asarray(plain), np.asarray(dropped)
    kept = dropped != 0.0
    assert 0.5 < kept.mean() < 0.95
    np.testing.assert_allclose(dropped[kept], plain[kept] / 0.75, rtol=RTOL)


def test_dropout_averages_to_the_undropped_output():
    q, k, v = _qkv(9, heads=1, queries=2, keys=3)
    plain = np.asarray(scaled_dot_product_attention(q, k, v), np.float64)
    samples = 4000
    rngs = jax.random.split(jax.random.key(3), samples)
    outs = jax.vmap(lambda r: scaled_dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=r))(rngs)
    outs = np.asarray(outs, np.float64)
    # Unbiased: the mean is within 5 standard errors of the undropped output.
    standard_error = outs.std(axis=0) / math.sqrt(samples)
    assert np.all(np.abs(outs.mean(axis=0) - plain) <= 5 * standard_error + 1e-6)


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------


def _error_cases():
    q, k, v = _qkv(10)
    gqa_k = jnp.zeros((B, S, 2, H))
    cases = {
        "query rank": ((q[0, :, 0], k, v), {}, ValueError, r"query must be \[\*B, T\|S, heads, H\]"),
        "key rank": ((q, k[..., None], v[..., None]), {}, ValueError, "batch axes and head dim must agree"),
        "key/value shapes": ((q, k, v[:, :3]), {}, ValueError, "must have the same shape"),
        "batch": ((q, k[:1], v[:1]), {}, ValueError, "batch axes and head dim must agree"),
        "head dim": ((q, k[..., :5], v[..., :5]), {}, ValueError, "batch axes and head dim must agree"),
        "heads multiple": ((q, gqa_k, gqa_k), {}, ValueError, "N=3 must be a multiple of .* K=2"),
        "mask broadcast": (
            (q, k, v),
            {"mask": jnp.ones((B, 1, T - 1, S), jnp.bool_)},
            ValueError,
            r"mask of shape \(2, 1, 4, 7\) does not broadcast",
        ),
        "mask rank": ((q, k, v), {"mask": jnp.ones((1, B, 1, T, S), jnp.bool_)}, ValueError, "rank of the logits"),
        # A [B, S] padding mask would broadcast as [1, 1, T, S]: refused as ambiguous, never broadcast.
        "key padding as mask": ((q, k, v), {"mask": jnp.ones((B, S), jnp.bool_)}, ValueError, "ambiguous.*key_mask"),
        "bias rank": ((q, k, v), {"bias": jnp.ones((S, T))}, ValueError, "bias has shape .* rank of the logits"),
        "bias broadcast": ((q, k, v), {"bias": jnp.ones((1, 1, S, T))}, ValueError, "bias of shape .* does not broad"),
        "key_mask shape": ((q, k, v), {"key_mask": jnp.ones((B, T), jnp.bool_)}, ValueError, r"key_mask must be"),
        "mask dtype": ((q, k, v), {"mask": jnp.ones((B, 1, T, S))}, TypeError, "mask must be boolean"),
        "implementation": ((q, k, v), {"implementation": "flash"}, ValueError, "implementation must be one of"),
        "weights chunked": (
            (q, k, v),
            {"implementation": "chunked", "return_weights": True},
            ValueError,
            "return_weights=True needs implementation='xla'",
        ),
        "empty query": ((q[:, :0], k, v), {}, ValueError, "empty sequence"),
        "empty key": ((q, k[:, :0], v[:, :0]), {}, ValueError, "empty sequence"),
        "dropout rate": ((q, k, v), {"dropout_rate": 1.0}, ValueError, r"dropout_rate must be in \[0, 1\)"),
    }
    return [pytest.param(*case, id=name) for name, case in cases.items()]


@pytest.mark.parametrize(("args", "kwargs", "error", "match"), _error_cases())
def test_clear_errors(args, kwargs, error, match, without_runtime_typechecks):
    with pytest.raises(error, match=match):
        scaled_dot_product_attention(*args, **kwargs)


@pytest.mark.parametrize(("args", "kwargs", "error", "match"), _error_cases())
def test_errors_also_raised_under_runtime_typechecks(args, kwargs, error, match):
    # With the jaxtyping hook on, shape/dtype mistakes may be caught by the annotations first (a TypeError).
    with pytest.raises((error, TypeError)):
        scaled_dot_product_attention(*args, **kwargs)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="tests the error raised off-GPU")
def test_cudnn_needs_a_gpu():
    q, k, v = _qkv(13, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="needs a GPU backend"):
        scaled_dot_product_attention(q, k, v, implementation="cudnn")


def test_return_weights_with_cudnn_is_rejected():
    q, k, v = _qkv(14)
    with pytest.raises(ValueError, match="return_weights=True needs implementation='xla'"):
        scaled_dot_product_attention(q, k, v, implementation="cudnn", return_weights=True)


# ---------------------------------------------------------------------------------------------------------
# init_multi_head_attention
# ---------------------------------------------------------------------------------------------------------


def test_init_shapes_without_bias():
    params = init_multi_head_attention(jax.random.key(0), D, N, head_dim=H)
    assert sorted(params) == ["w_k", "w_o", "w_q", "w_v"]
    assert params["w_q"].shape == (D, N, H)
    assert params["w_k"].shape == params["w_v"].shape == (D, N, H)
    assert params["w_o"].shape == (N, H, D)
    assert all(w.dtype == jnp.float32 for w in params.values())


def test_init_shapes_with_bias_are_zero():
    params = init_multi_head_attention(jax.random.key(0), D, N, head_dim=H, use_bias=True)
    expected = {"b_q": (N, H), "b_k": (N, H), "b_v": (N, H), "b_o": (D,)}
    assert {name: params[name].shape for name in expected} == expected
    for name in expected:
        np.testing.assert_array_equal(np.asarray(params[name]), 0.0)


def test_init_grouped_query_shapes():
    params = init_multi_head_attention(jax.random.key(0), 12, 6, num_kv_heads=2, use_bias=True)
    assert params["w_q"].shape == (12, 6, 2)  # head_dim defaults to D // N = 2
    assert params["w_k"].shape == params["w_v"].shape == (12, 2, 2)
    assert params["b_k"].shape == params["b_v"].shape == (2, 2)
    assert params["w_o"].shape == (6, 2, 12)


def test_init_is_glorot_uniform_and_deterministic():
    params = init_multi_head_attention(jax.random.key(0), D, N, head_dim=H)
    limit = math.sqrt(6.0 / (D + N * H))
    for name, w in params.items():
        w = np.asarray(w)
        assert np.abs(w).max() <= limit, name
        assert w.std() > limit / 4, name  # spread over the range, not a constant
    assert_trees_allclose(params, init_multi_head_attention(jax.random.key(0), D, N, head_dim=H))
    other = init_multi_head_attention(jax.random.key(1), D, N, head_dim=H)
    assert not np.allclose(np.asarray(other["w_q"]), np.asarray(params["w_q"]))
    # Each projection draws from its own key.
    assert not np.allclose(np.asarray(params["w_q"]), np.asarray(params["w_k"]))


def test_init_dtype():
    params = init_multi_head_attention(jax.random.key(0), 8, 2, use_bias=True, dtype=jnp.bfloat16)
    assert all(w.dtype == jnp.bfloat16 for w in params.values())


def test_init_errors():
    with pytest.raises(ValueError, match="d_model=13 is not divisible by num_heads=3"):
        init_multi_head_attention(jax.random.key(0), 13, 3)
    with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
        init_multi_head_attention(jax.random.key(0), 12, 6, num_kv_heads=4)


# ---------------------------------------------------------------------------------------------------------
# multi_head_attention
# ---------------------------------------------------------------------------------------------------------


def _random_params(seed, *, kv_heads=N, use_bias=True):
    """Random weights and (non-zero) biases, so a dropped or misplaced bias shows."""
    params = init_multi_head_attention(jax.random.key(seed), D, N, head_dim=H, num_kv_heads=kv_heads, use_bias=use_bias)
    rng = np.random.default_rng(seed)
    return {name: _normal(rng, w.shape) * 0.3 for name, w in params.items()}


# Fails until BUG 2 (minimal reproduction) (module docstring) is fixed.
def test_multi_head_hand_worked():
    # D=2, N=2 heads of H=1. W_q = W_k route feature n to head n; W_v swaps the features; W_o is identity.
    #   x_q = [1, 0], x_kv = [[0, 4], [ln 3, 8]], so per head (scale 1/sqrt(1) = 1):
    #   head 0: q = 1, keys [0, ln 3] -> weights [1/4, 3/4]; values (feature 1) [4, 8] -> 1 + 6 = 7
    #   head 1: q = 0, keys [4, 8]    -> weights [1/2, 1/2]; values (feature 0) [0, ln 3] -> ln 3 / 2
    # and b_o = [1, -1] gives [8, ln 3 / 2 - 1].
    eye = jnp.eye(2).reshape(2, 2, 1)  # [D, N, H=1]
    params = {
        "w_q": eye,
        "w_k": eye,
        "w_v": jnp.array([[0.0, 1.0], [1.0, 0.0]]).reshape(2, 2, 1),
        "w_o": jnp.eye(2).reshape(2, 1, 2),  # [N, H=1, D]
        "b_q": jnp.zeros((2, 1)),
        "b_k": jnp.zeros((2, 1)),
        "b_v": jnp.zeros((2, 1)),
        "b_o": jnp.array([1.0, -1.0]),
    }
    x_q = jnp.array([[[1.0, 0.0]]])  # [B=1, T=1, D=2]
    x_kv = jnp.array([[[0.0, 4.0], [LN3, 8.0]]])  # [B=1, S=2, D=2]
    out, weights = multi_head_attention(params, x_q, x_kv, return_weights=True)
    np.testing.assert_allclose(np.asarray(weights).reshape(2, 2), [[0.25, 0.75], [0.5, 0.5]], rtol=RTOL)
    np.testing.assert_allclose(np.asarray(out).reshape(2), [8.0, LN3 / 2 - 1.0], rtol=RTOL, atol=ATOL)


# Fails until BUGs 1 and 2 for every case with a mask, causal or use_bias (module docstring) is fixed.
@pytest.mark.parametrize(
    ("use_bias", "kv_heads", "masking"),
    [
        (False, N, "none"),
        (True, N, "padding"),
        (True, N, "causal"),
        (False, 1, "padding_causal"),
        (True, 1, "padding"),
    ],
)
def test_multi_head_matches_numpy_reference(use_bias, kv_heads, masking):
    params = _random_params(20, kv_heads=kv_heads, use_bias=use_bias)
    rng = np.random.default_rng(21)
    x_q = _normal(rng, (B, T, D))
    causal = masking in ("causal", "padding_causal")
    # Causal masking is self-attention, so keys come from the queries' own sequence there.
    x_kv = x_q if causal else _normal(rng, (B, S, D))
    keys = x_kv.shape[1]
    q_tokens = Q_TOKENS
    kv_tokens = Q_TOKENS if causal else KV_TOKENS
    mask = padding_mask(q_tokens, kv_tokens) if masking.startswith("padding") else None

    out, weights = multi_head_attention(params, x_q, x_kv, mask=mask, causal=causal, return_weights=True)
    full_mask = combine_masks(mask, causal_mask(T, keys) if causal else None)
    full_mask = None if full_mask is None else np.broadcast_to(np.asarray(full_mask), (B, N, T, keys))
    ref_out, ref_weights = reference_multi_head(params, x_q, x_kv, mask=full_mask)
    assert out.shape == (B, T, D)
    np.testing.assert_allclose(np.asarray(out), ref_out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(weights), ref_weights, rtol=1e-4, atol=1e-5)


def test_multi_head_rejects_wrong_d_model(without_runtime_typechecks):
    params = _random_params(22)
    with pytest.raises(ValueError, match="do not end in d_model=13"):
        multi_head_attention(params, jnp.ones((B, T, D + 1)), jnp.ones((B, S, D)))
    with pytest.raises(ValueError, match="do not end in d_model=13"):
        multi_head_attention(params, jnp.ones((B, T, D)), jnp.ones((B, S, D - 1)))


# Fails until BUG 2 (module docstring) is fixed.
def test_multi_head_dropout_only_with_rng():
    params = _random_params(23)
    x = _normal(np.random.default_rng(24), (B, T, D))
    plain = multi_head_attention(params, x, x)
    np.testing.assert_array_equal(np.asarray(multi_head_attention(params, x, x, dropout_rate=0.5)), plain)
    dropped = multi_head_attention(params, x, x, dropout_rate=0.5, dropout_rng=jax.random.key(0))
    assert not np.allclose(np.asarray(dropped), np.asarray(plain))


# ---------------------------------------------------------------------------------------------------------
# flax.linen.MultiHeadDotProductAttention
# ---------------------------------------------------------------------------------------------------------


# Fails until BUGs 1 and 2 for every case with a mask or use_bias (module docstring) is fixed.
@pytest.mark.parametrize(
    ("use_bias", "masking"),
    [(False, "none"), (True, "none"), (True, "padding"), (False, "padding_causal")],
)
def test_matches_flax_linen(use_bias, masking):
    module = nn.MultiHeadDotProductAttention(num_heads=N, qkv_features=N * H, out_features=D, use_bias=use_bias)
    rng = np.random.default_rng(30)
    x_q = _normal(rng, (B, T, D))
    x_kv = _normal(rng, (B, S, D))
    variables = module.init(jax.random.key(0), x_q, x_kv)
    # Linen initialises biases to zero; random values make a dropped or misplaced bias visible.
    variables = jax.tree.map(lambda w: _normal(rng, w.shape), variables)
    # Every query keeps at least one key, because Linen averages the values where we return zeros.
    kv_tokens = jnp.array([[1, 2, 3, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 0]], jnp.int32)
    all_real = jnp.ones((B, T), jnp.int32)
    mask = {
        "none": None,
        "padding": padding_mask(all_real, kv_tokens),
        "padding_causal": combine_masks(padding_mask(all_real, kv_tokens), causal_mask(T, S)),
    }[masking]

    expected = module.apply(variables, x_q, x_kv, mask=mask)
    params = from_flax_linen_attention(variables)
    assert sorted(params) == (
        ["b_k", "b_o", "b_q", "b_v", "w_k", "w_o", "w_q", "w_v"] if use_bias else ["w_k", "w_o", "w_q", "w_v"]
    )
    np.testing.assert_allclose(
        np.asarray(multi_head_attention(params, x_q, x_kv, mask=mask)), np.asarray(expected), rtol=1e-5, atol=1e-5
    )
    # The mapping also accepts the inner "params" collection.
    assert_trees_allclose(from_flax_linen_attention(variables["params"]), params)


def test_from_flax_linen_rejects_other_variables():
    with pytest.raises(KeyError, match="not MultiHeadDotProductAttention variables"):
        from_flax_linen_attention({"params": {"query": {}, "key": {}}})
