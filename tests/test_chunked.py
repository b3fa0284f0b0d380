"""Tests for attn_jax.chunked: outputs and gradients equal the "xla" path; memory does not grow as T * S."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from attn_jax import chunked
from attn_jax.attention import scaled_dot_product_attention
from attn_jax.chunked import chunked_attention

# A different prime per axis, so a swapped axis cannot pass; chunks of 4 and 8 give several blocks, none of
# them aligned with T or S.
B, T, S, N, H = 2, 13, 17, 3, 11
RTOL = ATOL = 1e-5


def _inputs(seed: int, *, T=T, S=S, N=N, K=N, dtype=jnp.float32):
    rq, rk, rv, rc = jax.random.split(jax.random.key(seed), 4)
    query = jax.random.normal(rq, (B, T, N, H), dtype)
    key = jax.random.normal(rk, (B, S, K, H), dtype)
    value = jax.random.normal(rv, (B, S, K, H), dtype)
    cotangent = jax.random.normal(rc, (B, T, N, H), dtype)
    return query, key, value, cotangent


def _mask(kind: str | None, seed: int, *, T=T, S=S, N=N):
    if kind is None:
        return None
    if kind == "padding":  # [B, 1, 1, S]: batch 0 has 12 real keys, batch 1 all 17
        return (jnp.arange(S)[None, :] < jnp.array([[12], [S]]))[:, None, None, :]
    return jax.random.bernoulli(jax.random.key(seed + 100), 0.7, (B, N, T, S))  # "full"


def _reference(query, key, value, *, mask, bias, causal):
    # attention.py's "xla" path multiplies the float weights by a boolean (any key attended), which strict
    # promotion rejects; the reference alone runs with standard promotion, the chunked path stays strict.
    with jax.numpy_dtype_promotion("standard"):
        return scaled_dot_product_attention(
            query, key, value, mask=mask, bias=bias, causal=causal, implementation="xla"
        )


def _chunked(query, key, value, *, mask, bias, causal, chunks=(4, 8), dropout_rate=0.0, dropout_rng=None):
    return chunked_attention(
        query, key, value, mask=mask, bias=bias, causal=causal, scale=query.shape[-1] ** -0.5,
        dropout_rate=dropout_rate, dropout_rng=dropout_rng, query_chunk_size=chunks[0], key_chunk_size=chunks[1],
    )  # fmt: skip


def _value_and_cotangents(attention, query, key, value, bias, cotangent):
    """Output and the vjp of a random cotangent w.r.t. (query, key, value[, bias])."""
    args = (query, key, value) if bias is None else (query, key, value, bias)

    def f(q, k, v, b=None):
        return attention(q, k, v, bias=b)

    @jax.jit  # one compilation instead of hundreds of eagerly dispatched ops
    def run(args, cotangent):
        out, vjp = jax.vjp(f, *args)
        return out, vjp(cotangent)

    return run(args, cotangent)


def _assert_matches_reference(query, key, value, cotangent, *, mask, bias, causal, chunks):
    common = dict(mask=mask, causal=causal)
    expected = _value_and_cotangents(functools.partial(_reference, **common), query, key, value, bias, cotangent)
    actual = _value_and_cotangents(
        functools.partial(_chunked, chunks=chunks, **common), query, key, value, bias, cotangent
    )
    names = ["out", "d_query", "d_key", "d_value", "d_bias"]
    for name, a, e in zip(names, jax.tree.leaves(actual), jax.tree.leaves(expected), strict=False):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=RTOL, atol=ATOL, err_msg=name)


# ---------------------------------------------------------------------------------------------------------
# Equality with the "xla" path, outputs and gradients
# ---------------------------------------------------------------------------------------------------------

CASES = {
    "no_mask": dict(),
    "padding_mask": dict(mask="padding"),
    "full_mask": dict(mask="full"),
    "causal": dict(causal=True),
    "causal_padding": dict(causal=True, mask="padding"),
    "bias_1NTS": dict(bias=(1, N, T, S)),
    "bias_B11S": dict(bias=(B, 1, 1, S)),
    "bias_BN1S_full_mask": dict(bias=(B, N, 1, S), mask="full"),
    "gqa_N6_K3_full_mask_bias": dict(N=6, K=3, mask="full", bias=(1, 6, T, S)),
    "gqa_N6_K2_causal_bias": dict(N=6, K=2, causal=True, bias=(B, 1, 1, S)),
    "causal_T_equals_S": dict(T=S, causal=True),
    "causal_T_greater_than_S": dict(T=19, causal=True, mask="padding"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_xla_path(case):
    T_, N_ = case.get("T", T), case.get("N", N)
    query, key, value, cotangent = _inputs(0, T=T_, N=N_, K=case.get("K", N_))
    mask = _mask(case.get("mask"), 0, T=T_, N=N_)
    bias = None
    if "bias" in case:
        bias = jax.random.normal(jax.random.key(7), tuple(T_ if d == T else d for d in case["bias"]))
    causal = case.get("causal", False)
    _assert_matches_reference(query, key, value, cotangent, mask=mask, bias=bias, causal=causal, chunks=(4, 8))


@pytest.mark.slow
@pytest.mark.parametrize("chunks", [(8, 4), (3, 5), (1, 32), (64, 64)], ids=str)
def test_matches_xla_path_for_any_chunk_sizes(chunks):
    """Chunks smaller than, straddling and larger than the lengths; causal block skipping at every size."""
    query, key, value, cotangent = _inputs(1, N=6, K=2)
    mask = _mask("full", 1, N=6)
    bias = jax.random.normal(jax.random.key(8), (B, 6, T, S))
    _assert_matches_reference(query, key, value, cotangent, mask=mask, bias=bias, causal=True, chunks=chunks)


def test_through_scaled_dot_product_attention():
    """The public entry point reaches the chunked path with its default chunks (a [1, 1, T, S] mask)."""
    query, key, value, _ = _inputs(2, N=6, K=3)
    mask = jax.random.bernoulli(jax.random.key(3), 0.8, (1, 1, T, S))
    expected = _reference(query, key, value, mask=mask, bias=None, causal=True)
    actual = scaled_dot_product_attention(query, key, value, mask=mask, causal=True, implementation="chunked")
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=RTOL, atol=ATOL)


def test_hand_worked_causal_average():
    """Equal logits: query t averages the values of keys 0..t, so with v_s = s the output is t / 2."""
    query = jnp.ones((1, 6, 1, 2))
    key = jnp.ones((1, 6, 1, 2))
    value = jnp.broadcast_to(jnp.arange(6.0)[None, :, None, None], (1, 6, 1, 2))
    out = _chunked(query, key, value, mask=None, bias=None, causal=True, chunks=(2, 4))
    np.testing.assert_allclose(np.asarray(out[0, :, 0, 0]), np.arange(6.0) / 2, rtol=RTOL)


def test_fully_masked_rows_give_zeros_and_finite_gradients():
    query, key, value, cotangent = _inputs(3)
    real_queries = jnp.arange(T)[None, :] < jnp.array([[T], [9]])  # batch 1: queries 9.. are padding
    mask = real_queries[:, None, :, None] & jnp.ones((1, N, 1, S), jnp.bool_)  # [B, N, T, S]
    mask = mask.at[0, 1, 2].set(False)  # and one row in the middle of a block
    bias = jax.random.normal(jax.random.key(9), (1, N, T, S))

    out, grads = _value_and_cotangents(
        functools.partial(_chunked, mask=mask, causal=False), query, key, value, bias, cotangent
    )

    np.testing.assert_array_equal(np.asarray(out[1, 9:]), 0.0)
    np.testing.assert_array_equal(np.asarray(out[0, 2, 1]), 0.0)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_array_equal(np.asarray(grads[0][1, 9:]), 0.0)  # no gradient reaches a padded query
    _assert_matches_reference(query, key, value, cotangent, mask=mask, bias=bias, causal=False, chunks=(4, 8))


def test_bfloat16_accumulates_in_float32():
    """bf16 in, bf16 out, and close to the float32 result on the same (rounded) inputs."""
    query, key, value, cotangent = _inputs(4, N=6, K=3, dtype=jnp.bfloat16)
    mask = _mask("padding", 4)
    out, grads = _value_and_cotangents(
        functools.partial(_chunked, mask=mask, causal=True), query, key, value, None, cotangent
    )
    upcast = [x.astype(jnp.float32) for x in (query, key, value, cotangent)]
    expected, expected_grads = _value_and_cotangents(
        functools.partial(_reference, mask=mask, causal=True), *upcast[:3], None, upcast[3]
    )
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    for a, e in zip((out, *grads), (expected, *expected_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a.astype(jnp.float32)), np.asarray(e), rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dropout_gradients_match_finite_differences():
    """The backward pass regenerates each block's keep mask from (rng, i, j): rev-mode check_grads passes."""
    query, key, value, _ = _inputs(5, N=6, K=2)
    mask = _mask("padding", 5)
    bias = jax.random.normal(jax.random.key(10), (B, 1, 1, S))
    rng = jax.random.key(11)

    @jax.jit  # check_grads passes NumPy arrays, which the jaxtyping annotations reject
    def f(q, k, v, b):
        return _chunked(q, k, v, mask=mask, bias=b, causal=True, dropout_rate=0.3, dropout_rng=rng)

    # A step of 1e-2 keeps float32 rounding in f(x + eps) - f(x - eps) well under check_grads' tolerance.
    check_grads(f, (query, key, value, bias), order=1, modes=["rev"], eps=1e-2)


def test_dropout_matches_reference_with_the_same_keep_mask():
    """Rebuilds the documented per-block keep masks and compares outputs and gradients with plain jnp."""
    T_, S_, G, rate, rng = 16, 24, 3, 0.4, jax.random.key(14)  # 2 x 3 blocks of 8 x 8, no padding
    query, key, value, cotangent = _inputs(15, T=T_, S=S_, N=6, K=2)
    blocks = [
        [
            jax.random.bernoulli(jax.random.fold_in(jax.random.fold_in(rng, i), j), 1 - rate, (B, 2, G, 8, 8))
            for j in range(3)
        ]
        for i in range(2)
    ]
    keep = jnp.block(blocks).reshape(B, 6, T_, S_)  # [B, K, G, T, S] -> [B, N, T, S]

    def reference(q, k, v, bias=None):
        k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)  # [B, S, K, H] -> [B, S, N, H]
        logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) * H**-0.5
        logits = jnp.where(jnp.tril(jnp.ones((T_, S_), jnp.bool_))[None, None], logits, -jnp.inf)
        weights = jnp.where(keep, jax.nn.softmax(logits, axis=-1) / (1 - rate), 0.0)
        return jnp.einsum("BNTS,BSNH->BTNH", weights, v)

    def attention(q, k, v, bias=None):
        return _chunked(q, k, v, mask=None, bias=bias, causal=True, chunks=(8, 8), dropout_rate=rate, dropout_rng=rng)

    expected = _value_and_cotangents(reference, query, key, value, None, cotangent)
    actual = _value_and_cotangents(attention, query, key, value, None, cotangent)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=RTOL, atol=ATOL)


def test_dropout_is_deterministic_given_the_rng():
    query, key, value, _ = _inputs(6)

    @jax.jit
    def f(rng):
        return _chunked(query, key, value, mask=None, bias=None, causal=False, dropout_rate=0.5, dropout_rng=rng)

    first, second, other = f(jax.random.key(0)), f(jax.random.key(0)), f(jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    assert not np.allclose(np.asarray(first), np.asarray(other))


def test_dropout_keep_fraction_and_scaling():
    """Uniform attention over one-hot values exposes every keep decision as out != 0."""
    rate, T_, S_ = 0.3, 64, 40
    query = jnp.zeros((1, T_, 2, S_))  # equal logits: every weight is 1 / S
    key = jnp.zeros((1, S_, 1, S_))
    value = jnp.eye(S_)[None, :, None, :]  # value of key s is e_s, so out[t, n, s] = weight[n, t, s]
    out = chunked_attention(
        query, key, value, mask=None, bias=None, causal=False, scale=1.0, dropout_rate=rate,
        dropout_rng=jax.random.key(12), query_chunk_size=16, key_chunk_size=16,
    )  # fmt: skip
    kept = np.asarray(out) != 0.0
    assert abs(kept.mean() - (1.0 - rate)) < 0.025  # 5120 draws: 4 standard deviations
    np.testing.assert_allclose(np.asarray(out)[kept], 1.0 / (S_ * (1.0 - rate)), rtol=RTOL)
    # Per-block keys: neighbouring query blocks and key blocks draw different patterns.
    assert not np.array_equal(kept[0, :16], kept[0, 16:32])
    assert not np.array_equal(kept[0, :, :, :16], kept[0, :, :, 16:32])


# ---------------------------------------------------------------------------------------------------------
# Memory: nothing of size T x S in the backward pass
# ---------------------------------------------------------------------------------------------------------

_MEM = dict(B=1, T=256, N=2, H=8, chunks=(64, 64))


def _loss(implementation: str):
    def attention(q, k, v):
        if implementation == "xla":
            return _reference(q, k, v, mask=None, bias=None, causal=True)
        return chunked_attention(
            q, k, v, mask=None, bias=None, causal=True, scale=q.shape[-1] ** -0.5, dropout_rate=0.0,
            dropout_rng=None, query_chunk_size=_MEM["chunks"][0], key_chunk_size=_MEM["chunks"][1],
        )  # fmt: skip

    def loss(q, k, v, cotangent):
        return jnp.sum(attention(q, k, v) * cotangent)

    return jax.value_and_grad(loss, argnums=(0, 1, 2))


def _memory_inputs():
    shape = (_MEM["B"], _MEM["T"], _MEM["N"], _MEM["H"])
    return [jax.random.normal(r, shape) for r in jax.random.split(jax.random.key(13), 4)]


def _largest_intermediate(jaxpr) -> int:
    """The most elements of any value produced anywhere in ``jaxpr``, loop bodies included."""
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            largest = max(largest, _largest_intermediate(sub))
    return largest


def test_jit_value_and_grad_matches_and_compiled_memory_is_smaller():
    inputs = _memory_inputs()
    (value, grads), (expected_value, expected_grads) = (jax.jit(_loss(i))(*inputs) for i in ("chunked", "xla"))
    np.testing.assert_allclose(float(value), float(expected_value), rtol=1e-4)
    for g, e in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-5)

    def temp_bytes(implementation):
        compiled = jax.jit(_loss(implementation)).lower(*inputs).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    # xla holds several [B, N, T, S] float32 buffers (512 KiB each here); chunked holds O(T) arrays and blocks.
    assert temp_bytes("chunked") * 3 < temp_bytes("xla")


def test_backward_jaxpr_has_no_T_by_S_array():
    inputs = _memory_inputs()
    logits = _MEM["B"] * _MEM["N"] * _MEM["T"] * _MEM["T"]
    largest_xla = _largest_intermediate(jax.make_jaxpr(_loss("xla"))(*inputs).jaxpr)
    largest_chunked = _largest_intermediate(jax.make_jaxpr(_loss("chunked"))(*inputs).jaxpr)
    assert largest_xla >= logits  # the check can see a T x S array when there is one
    assert largest_chunked < _MEM["T"] * _MEM["T"]  # not even one head's T x S matrix


# ---------------------------------------------------------------------------------------------------------
# Arguments and layout
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [dict(query_chunk_size=0), dict(key_chunk_size=-1), dict(dropout_rate=0.1)])
def test_rejects_bad_arguments(bad):
    query, key, value, _ = _inputs(0)
    kwargs = dict(mask=None, bias=None, causal=False, scale=1.0, dropout_rate=0.0, dropout_rng=None) | bad
    with pytest.raises(ValueError):
        chunked_attention(query, key, value, **kwargs)


@pytest.mark.parametrize("length", [1, 7, 13, 100, 1025, 8192])
@pytest.mark.parametrize("chunk", [1, 4, 8, 512])
def test_chunk_layout_covers_the_length_with_little_padding(length, chunk):
    size, count = chunked._chunk_layout(length, chunk)
    assert 1 <= size <= chunk
    assert size * count >= length > size * (count - 1)  # covers the length, no chunk entirely padding
    assert count == -(-length // chunk)  # as few chunks as the chunk size allows
