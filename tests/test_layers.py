"""Tests for attn_jax.layers against the float64 NumPy reference of tests/reference_numpy.py and hand-worked cases.

Every axis has its own prime size (B=2, T=7, D=13, F=17, V=19), so a swapped axis cannot pass. Tolerances are
the house ones: fp32 1e-5 for these simple functions.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.layers import (
    dropout,
    embed,
    init_embedding,
    init_layer_norm,
    init_learned_positions,
    init_position_wise_ffn,
    layer_norm,
    learned_positions,
    position_wise_ffn,
    shared_logits,
    sinusoidal_positions,
)
from tests import reference_numpy as ref
from tests.helpers import assert_trees_allclose

B, T, D, F, V = 2, 7, 13, 17, 19
RTOL, ATOL = 1e-5, 1e-5


def _normal(seed, shape, scale=1.0, shift=0.0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=shape) * scale + shift, jnp.float32)


# ---------------------------------------------------------------------------------------------------------
# Layer norm
# ---------------------------------------------------------------------------------------------------------


def test_layer_norm_hand_worked():
    # x = [1, 3]: mean 2, biased variance 1, so (x - mean) / sqrt(1 + eps) = [-1, 1] (to 5e-7);
    # scale [2, 3] and bias [1, -1] give [-2 + 1, 3 - 1] = [-1, 2].
    params = {"scale": jnp.array([2.0, 3.0]), "bias": jnp.array([1.0, -1.0])}
    out = layer_norm(params, jnp.array([[1.0, 3.0]]))
    np.testing.assert_allclose(np.asarray(out), [[-1.0, 2.0]], rtol=RTOL, atol=ATOL)


def test_layer_norm_epsilon_is_added_to_the_variance():
    # x = [1, 3] with epsilon 3: (x - 2) / sqrt(1 + 3) = [-0.5, 0.5] (epsilon added to the std would give 1/4).
    out = layer_norm(init_layer_norm(2), jnp.array([[1.0, 3.0]]), epsilon=3.0)
    np.testing.assert_allclose(np.asarray(out), [[-0.5, 0.5]], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("epsilon", [1e-6, 0.5])
def test_layer_norm_matches_reference(epsilon):
    x = _normal(0, (B, T, D), scale=3.0, shift=1.5)
    params = {"scale": _normal(1, (D,)), "bias": _normal(2, (D,))}
    out = layer_norm(params, x, epsilon=epsilon)
    expected = ref.layer_norm(
        x, np.asarray(params["scale"], np.float64), np.asarray(params["bias"], np.float64), epsilon
    )
    assert out.shape == (B, T, D) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), expected, rtol=RTOL, atol=ATOL)


def test_layer_norm_large_offset_keeps_precision():
    # A mean of 1000 and a spread of 1. The float32 mean alone is off by about ulp(1000) = 6e-5, which bounds
    # what any float32 layer norm can do; the one-pass E[x^2] - E[x]^2 would be off by ~ulp(1e6) = 0.06 in
    # the variance, i.e. by several 1e-2 in the output, so 1e-3 separates the two.
    x = _normal(3, (B, T, D), shift=1000.0)
    out = layer_norm(init_layer_norm(D), x)
    expected = ref.layer_norm(x, np.ones(D), np.zeros(D), 1e-6)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=0.0, atol=1e-3)


def test_layer_norm_bfloat16_keeps_dtype():
    x = _normal(4, (B, T, D), scale=2.0)
    params = {"scale": _normal(5, (D,)), "bias": _normal(6, (D,))}
    out = layer_norm(params, x.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    expected = ref.layer_norm(np.asarray(x.astype(jnp.bfloat16), np.float64), np.asarray(params["scale"]),
                              np.asarray(params["bias"]), 1e-6)  # fmt: skip
    # Statistics in float32, one bfloat16 rounding of the result (8 bits of mantissa).
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=1e-2, atol=2e-2)


def test_layer_norm_gradients_match_naive_jnp():
    x = _normal(7, (B, T, D), scale=2.0)
    params = {"scale": _normal(8, (D,)), "bias": _normal(9, (D,))}
    cotangent = _normal(10, (B, T, D))

    def naive(params, x):  # written from Ba et al. 2016, in jnp so it can be differentiated
        mean = jnp.mean(x, axis=-1, keepdims=True)
        centred = x - mean
        variance = jnp.mean(centred * centred, axis=-1, keepdims=True)
        return centred / jnp.sqrt(variance + 1e-6) * params["scale"][None, None, :] + params["bias"][None, None, :]

    out, vjp = jax.vjp(lambda p, x: layer_norm(p, x), params, x)
    ref_out, ref_vjp = jax.vjp(naive, params, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=RTOL, atol=ATOL)
    assert_trees_allclose(vjp(cotangent), ref_vjp(cotangent), rtol=1e-4, atol=1e-4)


def test_init_layer_norm_is_identity_affine():
    params = init_layer_norm(D)
    np.testing.assert_array_equal(np.asarray(params["scale"]), np.ones(D))
    np.testing.assert_array_equal(np.asarray(params["bias"]), np.zeros(D))


# ---------------------------------------------------------------------------------------------------------
# Position-wise feed-forward network
# ---------------------------------------------------------------------------------------------------------


def _ffn_params(seed):
    return {
        "w_1": _normal(seed, (D, F), 0.5),
        "b_1": _normal(seed + 1, (F,)),
        "w_2": _normal(seed + 2, (F, D), 0.5),
        "b_2": _normal(seed + 3, (D,)),
    }


def test_ffn_hand_worked():
    # x W_1 + b_1 = [-1 + 0.5, 1 - 0.5] = [-0.5, 0.5] -> relu -> [0, 0.5] -> W_2 = [[2, 4], [6, 8]] -> [3, 4],
    # + b_2 [1, -1] = [4, 3].
    params = {
        "w_1": jnp.array([[1.0, -1.0], [0.0, 0.0]]),
        "b_1": jnp.array([0.5, -0.5]),
        "w_2": jnp.array([[2.0, 4.0], [6.0, 8.0]]),
        "b_2": jnp.array([1.0, -1.0]),
    }
    out = position_wise_ffn(params, jnp.array([[[-1.0, 7.0]]]))
    np.testing.assert_allclose(np.asarray(out), [[[4.0, 3.0]]], rtol=RTOL, atol=ATOL)


def test_ffn_matches_reference():
    params = _ffn_params(20)
    x = _normal(30, (B, T, D))
    out = position_wise_ffn(params, x)
    p = ref.to_float64(params)
    expected = ref.feed_forward(np.asarray(x, np.float64), p["w_1"], p["b_1"], p["w_2"], p["b_2"])
    assert out.shape == (B, T, D) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), expected, rtol=RTOL, atol=ATOL)


def test_ffn_is_position_wise():
    # The same input vector at two positions (and in two sentences) gives the same output.
    params = _ffn_params(21)
    row = _normal(31, (D,))
    x = jnp.broadcast_to(row, (B, T, D))
    out = np.asarray(position_wise_ffn(params, x))
    np.testing.assert_allclose(out, np.broadcast_to(out[0, 0], out.shape), rtol=RTOL, atol=ATOL)


def test_ffn_gradients_match_naive_jnp():
    params = _ffn_params(22)
    x = _normal(32, (B, T, D))
    cotangent = _normal(33, (B, T, D))

    def naive(p, x):
        hidden = jnp.maximum(x @ p["w_1"] + p["b_1"][None, None, :], 0.0)
        return hidden @ p["w_2"] + p["b_2"][None, None, :]

    out, vjp = jax.vjp(position_wise_ffn, params, x)
    ref_out, ref_vjp = jax.vjp(naive, params, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=RTOL, atol=ATOL)
    assert_trees_allclose(vjp(cotangent), ref_vjp(cotangent), rtol=1e-4, atol=1e-5)


def test_init_ffn_shapes_and_glorot_bounds():
    params = init_position_wise_ffn(jax.random.key(0), D, F)
    assert {name: value.shape for name, value in params.items()} == {
        "w_1": (D, F),
        "b_1": (F,),
        "w_2": (F, D),
        "b_2": (D,),
    }
    limit = math.sqrt(6.0 / (D + F))
    for name in ("w_1", "w_2"):
        w = np.asarray(params[name])
        assert np.abs(w).max() <= limit and np.abs(w).max() > 0.5 * limit
    np.testing.assert_array_equal(np.asarray(params["b_1"]), 0.0)
    np.testing.assert_array_equal(np.asarray(params["b_2"]), 0.0)


# ---------------------------------------------------------------------------------------------------------
# Embeddings and the pre-softmax projection
# ---------------------------------------------------------------------------------------------------------

TOKENS = jnp.array([[3, 0, 18, 7, 7, 1, 12], [5, 9, 2, 0, 0, 11, 18]], jnp.int32)  # [B, T]


def test_embed_hand_worked():
    # Row 2 of the 4x4 identity, times sqrt(4) = 2.
    out = embed({"embedding": jnp.eye(4)}, jnp.array([[2, 0]]))
    np.testing.assert_array_equal(np.asarray(out), [[[0.0, 0.0, 2.0, 0.0], [2.0, 0.0, 0.0, 0.0]]])


def test_embed_matches_reference_scaled_by_sqrt_d_model():
    table = _normal(40, (V, D))
    out = embed({"embedding": table}, TOKENS)
    expected = np.asarray(table, np.float64)[np.asarray(TOKENS)] * math.sqrt(D)
    assert out.shape == (B, T, D) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), expected, rtol=RTOL, atol=ATOL)


def test_embed_without_scale_and_in_bfloat16():
    table = _normal(41, (V, D))
    plain = embed({"embedding": table}, TOKENS, scale=False)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(table)[np.asarray(TOKENS)])
    low = embed({"embedding": table}, TOKENS, dtype=jnp.bfloat16)
    assert low.dtype == jnp.bfloat16
    expected = np.asarray(table, np.float64)[np.asarray(TOKENS)] * math.sqrt(D)
    np.testing.assert_allclose(np.asarray(low, np.float64), expected, rtol=1e-2, atol=1e-2)


def test_init_embedding_has_unit_variance_after_scaling():
    table = np.asarray(init_embedding(jax.random.key(1), 503, 64)["embedding"], np.float64)
    assert table.shape == (503, 64)
    # N(0, 1/d_model): times sqrt(d_model) the entries have unit variance (32192 samples, std error ~0.8%).
    assert abs(np.std(table * math.sqrt(64)) - 1.0) < 0.04
    assert abs(np.mean(table)) < 0.01


def test_shared_logits_hand_worked():
    # E = [[1, 0], [0, 1], [1, 1]]: x E^T for x = [2, 5] is [2, 5, 7].
    out = shared_logits({"embedding": jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])}, jnp.array([[[2.0, 5.0]]]))
    np.testing.assert_allclose(np.asarray(out), [[[2.0, 5.0, 7.0]]], rtol=RTOL, atol=ATOL)


def test_shared_logits_matches_reference():
    table = _normal(42, (V, D))
    x = _normal(43, (B, T, D))
    out = shared_logits({"embedding": table}, x)
    assert out.shape == (B, T, V)
    expected = np.asarray(x, np.float64) @ np.asarray(table, np.float64).T
    np.testing.assert_allclose(np.asarray(out), expected, rtol=RTOL, atol=ATOL)


def test_shared_logits_gradients_match_reference():
    """The hand-written backward pass: d table = g^T x and d x = g E, summed over B and T, in float64 NumPy."""
    table, x, g = _normal(44, (V, D)), _normal(45, (B, T, D)), _normal(46, (B, T, V))
    d_table, d_x = jax.grad(lambda t, x: jnp.sum(shared_logits({"embedding": t}, x) * g), argnums=(0, 1))(table, x)
    g64, x64, t64 = (np.asarray(a, np.float64) for a in (g, x, table))
    np.testing.assert_allclose(np.asarray(d_table), np.einsum("btv,btd->vd", g64, x64), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(d_x), np.einsum("btv,vd->btd", g64, t64), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------------------------


def test_sinusoidal_hand_worked():
    # d_model = 4: frequencies 10000^(0/4) = 1 and 10000^(2/4) = 100; columns sin, cos, sin, cos.
    out = np.asarray(sinusoidal_positions(3, 4), np.float64)
    expected = [
        [0.0, 1.0, 0.0, 1.0],
        [math.sin(1.0), math.cos(1.0), math.sin(0.01), math.cos(0.01)],
        [math.sin(2.0), math.cos(2.0), math.sin(0.02), math.cos(0.02)],
    ]
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("d_model", [D, 12, 1])
@pytest.mark.parametrize("offset", [0, 41])
def test_sinusoidal_matches_the_papers_formula(d_model, offset):
    out = sinusoidal_positions(T, d_model, offset=offset)
    assert out.shape == (T, d_model) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref.sinusoid(T, d_model, offset), rtol=RTOL, atol=ATOL)


def test_sinusoidal_traced_offset_matches_static_offset():
    table = jax.jit(lambda offset: sinusoidal_positions(T, D, offset=offset))(jnp.asarray(5, jnp.int32))
    np.testing.assert_allclose(np.asarray(table), ref.sinusoid(T, D, 5), rtol=RTOL, atol=ATOL)


def test_sinusoidal_relative_position_is_a_rotation():
    # §3.5: PE(pos + k) is a linear function of PE(pos): each (sin, cos) pair is rotated by the angle k * w_i.
    k, pairs = 3, np.asarray(sinusoidal_positions(T + 3, 12), np.float64).reshape(T + 3, 6, 2)
    omega = 1.0 / 10000.0 ** (np.arange(0, 12, 2) / 12)
    sin, cos = pairs[:T, :, 0], pairs[:T, :, 1]
    shifted_sin = sin * np.cos(k * omega) + cos * np.sin(k * omega)
    shifted_cos = cos * np.cos(k * omega) - sin * np.sin(k * omega)
    np.testing.assert_allclose(pairs[k:, :, 0], shifted_sin, atol=ATOL)
    np.testing.assert_allclose(pairs[k:, :, 1], shifted_cos, atol=ATOL)


def test_positions_of_packed_rows_index_each_token():
    positions = jnp.array([[0, 1, 2, 0, 1], [4, 3, 2, 1, 0]], jnp.int32)  # [B, T]: restarting, any order
    out = np.asarray(sinusoidal_positions(positions, D), np.float64)
    assert out.shape == (2, 5, D)
    table = ref.sinusoid(5, D)
    np.testing.assert_allclose(out, table[np.asarray(positions)], rtol=RTOL, atol=ATOL)
    learned = jnp.arange(7 * D, dtype=jnp.float32).reshape(7, D)
    np.testing.assert_array_equal(np.asarray(learned_positions(learned, positions)), np.asarray(learned)[positions])


def test_learned_positions_slices_rows():
    table = jnp.arange(23 * D, dtype=jnp.float32).reshape(23, D)
    np.testing.assert_array_equal(np.asarray(learned_positions(table, T)), np.asarray(table)[:T])
    np.testing.assert_array_equal(np.asarray(learned_positions(table, T, offset=5)), np.asarray(table)[5 : 5 + T])
    traced = jax.jit(lambda offset: learned_positions(table, T, offset=offset))(jnp.asarray(11, jnp.int32))
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(table)[11 : 11 + T])


def test_learned_positions_rejects_rows_past_the_table():
    table = jnp.zeros((23, D), jnp.float32)
    learned_positions(table, 23)  # exactly fits
    with pytest.raises(ValueError, match="exceed"):
        learned_positions(table, 24)
    with pytest.raises(ValueError, match="exceed"):
        learned_positions(table, T, offset=17)


def test_init_learned_positions_shape():
    table = init_learned_positions(jax.random.key(2), 23, D)
    assert table.shape == (23, D) and table.dtype == jnp.float32
    assert 0.0 < float(jnp.std(table)) < 0.1


# ---------------------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------------------

DROPOUT_SHAPE = (307, 311)  # 95477 draws: a keep-rate estimate has a standard error below 0.0017


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5])
def test_dropout_keep_rate_and_scaling(rate):
    x = _normal(50, DROPOUT_SHAPE, shift=2.0)
    out = np.asarray(dropout(x, rate, jax.random.key(3)))
    kept = out != 0.0
    assert abs(kept.mean() - (1.0 - rate)) < 0.008  # > 4.5 standard errors
    # Kept entries are scaled by 1 / (1 - rate); the rest are exactly zero.
    np.testing.assert_allclose(out[kept], np.asarray(x)[kept] / (1.0 - rate), rtol=1e-6)
    # Inverted dropout keeps the expectation: the mean of dropout(1) is 1.
    ones = np.asarray(dropout(jnp.ones(DROPOUT_SHAPE), rate, jax.random.key(4)), np.float64)
    assert abs(ones.mean() - 1.0) < 0.01


def test_dropout_without_rng_or_rate_is_identity():
    x = _normal(51, (B, T, D))
    np.testing.assert_array_equal(np.asarray(dropout(x, 0.5, None)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(dropout(x, 0.0, jax.random.key(0))), np.asarray(x))


def test_dropout_is_deterministic_per_key():
    x = jnp.ones((B, T, D))
    first = np.asarray(dropout(x, 0.5, jax.random.key(5)))
    np.testing.assert_array_equal(first, np.asarray(dropout(x, 0.5, jax.random.key(5))))
    assert not np.array_equal(first, np.asarray(dropout(x, 0.5, jax.random.key(6))))


def test_dropout_keeps_dtype_and_gradient_is_the_mask():
    x = _normal(52, (B, T, D))
    low = dropout(x.astype(jnp.bfloat16), 0.25, jax.random.key(7))
    assert low.dtype == jnp.bfloat16
    out = np.asarray(dropout(x, 0.25, jax.random.key(8)))
    grad = np.asarray(jax.grad(lambda x: jnp.sum(dropout(x, 0.25, jax.random.key(8))))(x))
    np.testing.assert_allclose(grad, np.where(out != 0.0, 1.0 / 0.75, 0.0), rtol=1e-6)
