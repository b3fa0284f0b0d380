"""Tests for attn_jax.additive (Bahdanau et al. 2014; Luong et al. 2015's dot and general scores) against float64
NumPy references and hand-worked cases.

Sizes use a different prime per axis (B=2, T=5, S=7, Dq=3, Dk=11, Dv=13, A=17) so an axis swap fails.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.additive import (
    SCORES,
    additive_attention,
    additive_attention_projected,
    align,
    dot_attention,
    general_attention,
    init_additive_attention,
    init_alignment,
    init_general_attention,
    prepare_keys,
    project_keys,
    project_keys_general,
)

B, T, S, DQ, DK, DV, A = 2, 5, 7, 3, 11, 13, 17
RTOL, ATOL = 1e-5, 1e-6
LN3 = math.log(3.0)


def reference_additive(params, query, keys, values, mask=None):
    """e_ts = v . tanh(q_t W_q + k_s W_k + b), alpha = softmax over s (zeros with no key), c_t = alpha_t V."""
    p = {name: np.asarray(w, np.float64) for name, w in params.items()}
    q, k, v = (np.asarray(x, np.float64) for x in (query, keys, values))
    batch, queries, keys_len = q.shape[0], q.shape[1], k.shape[1]
    scores = np.empty((batch, queries, keys_len))
    for b in range(batch):
        for t in range(queries):
            for s in range(keys_len):
                scores[b, t, s] = p["v"] @ np.tanh(q[b, t] @ p["w_q"] + k[b, s] @ p["w_k"] + p["b"])
    allowed = np.ones_like(scores, bool) if mask is None else np.broadcast_to(np.asarray(mask), scores.shape)
    row_max = np.max(np.where(allowed, scores, -np.inf), axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    unnormalised = np.where(allowed, np.exp(scores - row_max), 0.0)
    total = unnormalised.sum(axis=-1, keepdims=True)
    weights = np.divide(unnormalised, total, out=np.zeros_like(unnormalised), where=total > 0)
    return weights @ v, weights


def _normal(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.normal(size=shape), dtype)


def _inputs(seed, *, batch=B, queries=T, keys_len=S, dq=DQ, dk=DK, dv=DV, hidden=A, dtype=jnp.float32):
    """Random params (non-zero b) and inputs; the scale keeps tanh away from saturation."""
    rng = np.random.default_rng(seed)
    params = {
        "w_q": _normal(rng, (dq, hidden)) * 0.5,
        "w_k": _normal(rng, (dk, hidden)) * 0.3,
        "b": _normal(rng, (hidden,)) * 0.5,
        "v": _normal(rng, (hidden,)),
    }
    query = _normal(rng, (batch, queries, dq), dtype)
    keys = _normal(rng, (batch, keys_len, dk), dtype)
    values = _normal(rng, (batch, keys_len, dv), dtype)
    return params, query, keys, values


# Keys [B=2, S=7]: batch 0 has three real keys, batch 1 six.
KEY_PADDING = jnp.array([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]], jnp.bool_)[:, None, :]  # [B, 1, S]


def _mask(name):
    rng = np.random.default_rng(5)
    full = rng.random((B, T, S)) > 0.4
    full[0, 1] = False  # a query with nothing to attend to
    return {
        "none": None,
        "key_padding": KEY_PADDING,
        "full": jnp.asarray(full),
        "2d": jnp.asarray(full[1]),  # [T, S], left-padded to [1, T, S]
    }[name]


MASKS = ["none", "key_padding", "full", "2d"]


# ---------------------------------------------------------------------------------------------------------
# Hand-worked cases
# ---------------------------------------------------------------------------------------------------------
# Dq = Dk = A = 1 with w_q = w_k = 1, b = 1/4, v = 2 and query 1/4, so a key k scores 2 tanh(1/2 + k).
#   k_0 = -1/2                    -> 2 tanh(0) = 0
#   k_1 = atanh(ln 3 / 2) - 1/2   -> 2 (ln 3 / 2) = ln 3
# so the weights are [1, 3] / 4, and values [4, 8] give 1 + 6 = 7. Dropping the query's or the bias's 1/4
# moves both scores off these values.

HAND_PARAMS = {
    "w_q": jnp.array([[1.0]]),
    "w_k": jnp.array([[1.0]]),
    "b": jnp.array([0.25]),
    "v": jnp.array([2.0]),
}
HAND_QUERY = jnp.array([[[0.25]]])  # [B=1, T=1, Dq=1]
HAND_KEYS = jnp.array([[[-0.5], [math.atanh(LN3 / 2) - 0.5]]])  # [B=1, S=2, Dk=1]
HAND_VALUES = jnp.array([[[4.0], [8.0]]])  # [B=1, S=2, Dv=1]


def test_hand_worked():
    context, weights = additive_attention(HAND_PARAMS, HAND_QUERY, HAND_KEYS, HAND_VALUES, return_weights=True)
    np.testing.assert_allclose(np.asarray(weights).reshape(2), [0.25, 0.75], rtol=RTOL)
    np.testing.assert_allclose(np.asarray(context).reshape(1), [7.0], rtol=RTOL)


def test_hand_worked_mask():
    # Masking key 0 puts all the weight on key 1: the context is its value, 8.
    mask = jnp.array([[[False, True]]])
    context, weights = additive_attention(
        HAND_PARAMS, HAND_QUERY, HAND_KEYS, HAND_VALUES, mask=mask, return_weights=True
    )
    np.testing.assert_array_equal(np.asarray(weights).reshape(2), [0.0, 1.0])
    np.testing.assert_allclose(np.asarray(context).reshape(1), [8.0], rtol=RTOL)


def test_hand_worked_project_keys():
    # W_k k + b for the two keys: -1/2 + 1/4 and atanh(ln 3 / 2) - 1/2 + 1/4.
    projected = project_keys(HAND_PARAMS, HAND_KEYS)
    expected = [-0.25, math.atanh(LN3 / 2) - 0.25]
    np.testing.assert_allclose(np.asarray(projected).reshape(2), expected, rtol=RTOL)


# ---------------------------------------------------------------------------------------------------------
# Against the float64 NumPy reference
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_name", MASKS)
def test_matches_numpy_reference(mask_name):
    params, query, keys, values = _inputs(1)
    mask = _mask(mask_name)
    context, weights = additive_attention(params, query, keys, values, mask=mask, return_weights=True)
    ref_context, ref_weights = reference_additive(params, query, keys, values, mask)
    assert context.shape == (B, T, DV) and context.dtype == jnp.float32
    assert weights.shape == (B, T, S) and weights.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(context), ref_context, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(weights), ref_weights, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mask_name", ["none", "full"])
def test_weights_sum_to_one_and_reproduce_context(mask_name):
    params, query, keys, values = _inputs(2)
    mask = _mask(mask_name)
    context, weights = additive_attention(params, query, keys, values, mask=mask, return_weights=True)
    weights = np.asarray(weights, np.float64)
    attendable = np.ones((B, T), bool) if mask is None else np.asarray(mask).any(-1)
    np.testing.assert_allclose(weights.sum(-1)[attendable], 1.0, rtol=RTOL)
    np.testing.assert_array_equal(weights.sum(-1)[~attendable], 0.0)
    if mask is not None:
        np.testing.assert_array_equal(weights[~np.asarray(mask)], 0.0)
    np.testing.assert_allclose(np.asarray(context), weights @ np.asarray(values, np.float64), rtol=RTOL, atol=ATOL)


def test_projected_keys_reused_step_by_step():
    # A recurrent decoder projects the keys once and sends one query per step; that must equal one call
    # with all T queries.
    params, query, keys, values = _inputs(3)
    projected = project_keys(params, keys)
    full = additive_attention(params, query, keys, values, mask=KEY_PADDING)
    step = jax.jit(lambda q: additive_attention_projected(params, q, projected, values, mask=KEY_PADDING))
    steps = jnp.concatenate([step(query[:, t : t + 1]) for t in range(T)], axis=1)
    np.testing.assert_allclose(np.asarray(steps), np.asarray(full), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_keeps_dtype_and_float32_weights(dtype):
    params, query, keys, values = _inputs(4, dtype=dtype)
    context, weights = additive_attention(params, query, keys, values, mask=KEY_PADDING, return_weights=True)
    assert context.dtype == dtype
    assert weights.dtype == jnp.float32
    ref_context, ref_weights = reference_additive(params, query, keys, values, KEY_PADDING)
    # The params are rounded to the input dtype, and the score sums A=17 rounded tanh values.
    np.testing.assert_allclose(np.asarray(weights), ref_weights, rtol=5e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(context, np.float32), ref_context, rtol=5e-2, atol=5e-2)


# ---------------------------------------------------------------------------------------------------------
# Masking and gradients
# ---------------------------------------------------------------------------------------------------------


def test_fully_masked_rows_are_zero_with_zero_finite_gradients():
    params, query, keys, values = _inputs(6)
    mask = np.ones((B, T, S), bool)
    mask[0] = False  # batch 0 may attend to nothing
    mask[1, 3] = False  # batch 1, query 3 may attend to nothing
    mask = jnp.asarray(mask)

    def loss(params, query, keys, values):
        context = additive_attention(params, query, keys, values, mask=mask)
        return jnp.sum(context * context), context

    (_, context), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(params, query, keys, values)
    np.testing.assert_array_equal(np.asarray(context[0]), 0.0)
    np.testing.assert_array_equal(np.asarray(context[1, 3]), 0.0)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    _, grad_query, grad_keys, grad_values = grads
    np.testing.assert_array_equal(np.asarray(grad_query[0]), 0.0)
    np.testing.assert_array_equal(np.asarray(grad_query[1, 3]), 0.0)
    np.testing.assert_array_equal(np.asarray(grad_keys[0]), 0.0)
    np.testing.assert_array_equal(np.asarray(grad_values[0]), 0.0)


def test_masked_keys_get_no_gradient():
    params, query, keys, values = _inputs(7)
    grad_keys, grad_values = jax.grad(
        lambda k, v: jnp.sum(additive_attention(params, query, k, v, mask=KEY_PADDING) ** 2), argnums=(0, 1)
    )(keys, values)
    padded = ~np.asarray(KEY_PADDING)[:, 0]  # [B, S]
    np.testing.assert_array_equal(np.asarray(grad_keys)[padded], 0.0)
    np.testing.assert_array_equal(np.asarray(grad_values)[padded], 0.0)
    assert np.all(np.abs(np.asarray(grad_values)[~padded]).sum(-1) > 0.0)


def test_gradients_match_float64_finite_differences():
    # Small sizes: central differences of the float64 reference, one coordinate at a time.
    params, query, keys, values = _inputs(8, batch=1, queries=2, keys_len=3, dq=2, dk=3, dv=2, hidden=3)
    mask = jnp.array([[[True, True, False], [True, True, True]]])
    cotangent = np.random.default_rng(9).normal(size=(1, 2, 2))
    arguments = {"params": params, "query": query, "keys": keys, "values": values}

    def loss(arguments):
        context = additive_attention(
            arguments["params"], arguments["query"], arguments["keys"], arguments["values"], mask=mask
        )
        return jnp.sum(context * jnp.asarray(cotangent, jnp.float32))

    grads = jax.grad(loss)(arguments)
    # Flattened in NumPy: jax.flatten_util would round the float64 coordinates to float32.
    leaves, treedef = jax.tree.flatten(arguments)
    flat = np.concatenate([np.asarray(leaf, np.float64).ravel() for leaf in leaves])
    splits = np.cumsum([leaf.size for leaf in leaves])[:-1]

    def reference_loss(flat_arguments):
        parts = np.split(flat_arguments, splits)
        a = treedef.unflatten([part.reshape(leaf.shape) for part, leaf in zip(parts, leaves, strict=True)])
        context, _ = reference_additive(a["params"], a["query"], a["keys"], a["values"], mask)
        return float(np.sum(context * cotangent))

    eps = 1e-6
    numeric = np.array(
        [
            (reference_loss(flat + eps * basis) - reference_loss(flat - eps * basis)) / (2 * eps)
            for basis in np.eye(flat.size)
        ]
    )
    analytic = np.concatenate([np.asarray(g).ravel() for g in jax.tree.leaves(grads)])
    np.testing.assert_allclose(analytic, numeric, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# init_additive_attention
# ---------------------------------------------------------------------------------------------------------


def test_init_shapes_and_bias():
    params = init_additive_attention(jax.random.key(0), DQ, DK, A)
    assert {name: w.shape for name, w in params.items()} == {
        "w_q": (DQ, A),
        "w_k": (DK, A),
        "b": (A,),
        "v": (A,),
    }
    np.testing.assert_array_equal(np.asarray(params["b"]), 0.0)
    assert all(w.dtype == jnp.float32 for w in params.values())


def test_init_is_glorot_uniform_and_deterministic():
    params = init_additive_attention(jax.random.key(0), DQ, DK, A)
    for name, fan_in, fan_out in (("w_q", DQ, A), ("w_k", DK, A), ("v", A, 1)):
        w = np.asarray(params[name])
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        assert np.abs(w).max() <= limit, name
        assert w.std() > limit / 4, name
    again = init_additive_attention(jax.random.key(0), DQ, DK, A)
    other = init_additive_attention(jax.random.key(1), DQ, DK, A)
    np.testing.assert_array_equal(np.asarray(again["w_k"]), np.asarray(params["w_k"]))
    assert not np.allclose(np.asarray(other["w_k"]), np.asarray(params["w_k"]))


def test_init_dtype():
    params = init_additive_attention(jax.random.key(0), 2, 3, 4, dtype=jnp.bfloat16)
    assert all(w.dtype == jnp.bfloat16 for w in params.values())


def test_init_rejects_non_positive_sizes():
    with pytest.raises(ValueError, match="hidden_dim must be positive, got 0"):
        init_additive_attention(jax.random.key(0), 2, 3, 0)


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------


def _error_cases():
    params, query, keys, values = _inputs(10)
    cases = {
        "query rank": ((params, query[0], keys, values), {}, ValueError, "query must have rank 3"),
        "query dim": ((params, query[..., :2], keys, values), {}, ValueError, "must end in Dq=3"),
        "key dim": ((params, query, keys[..., :4], values), {}, ValueError, r"keys must be \[B, S, Dk\] with Dk=11"),
        "keys rank": ((params, query, keys[0], values), {}, ValueError, "must be"),
        "keys/values length": ((params, query, keys, values[:, :4]), {}, ValueError, "keys .* and values .* must be"),
        "batch": ((params, query[:1], keys, values), {}, ValueError, "must agree on B"),
        "mask dtype": ((params, query, keys, values), {"mask": jnp.ones((B, T, S))}, TypeError, "mask must be boolean"),
        "mask broadcast": (
            (params, query, keys, values),
            {"mask": jnp.ones((B, T, S - 1), jnp.bool_)},
            ValueError,
            r"mask of shape \(2, 5, 6\) does not broadcast to \[B, T, S\]",
        ),
        "mask rank": (
            (params, query, keys, values),
            {"mask": jnp.ones((1, B, T, S), jnp.bool_)},
            ValueError,
            "mask has rank 4",
        ),
        "empty keys": ((params, query, keys[:, :0], values[:, :0]), {}, ValueError, "empty key sequence"),
    }
    return [pytest.param(*case, id=name) for name, case in cases.items()]


@pytest.mark.parametrize(("args", "kwargs", "error", "match"), _error_cases())
def test_clear_errors(args, kwargs, error, match, without_runtime_typechecks):
    with pytest.raises(error, match=match):
        additive_attention(*args, **kwargs)


@pytest.mark.parametrize(("args", "kwargs", "error", "match"), _error_cases())
def test_errors_also_raised_under_runtime_typechecks(args, kwargs, error, match):
    # With the jaxtyping hook on, shape/dtype mistakes may be caught by the annotations first (a TypeError).
    with pytest.raises((error, TypeError)):
        additive_attention(*args, **kwargs)


def test_projected_keys_of_the_wrong_width_are_rejected(without_runtime_typechecks):
    params, query, keys, values = _inputs(11)
    with pytest.raises(ValueError, match="must end in A=17"):
        additive_attention_projected(params, query, keys, values)


# ---------------------------------------------------------------------------------------------------------
# Luong et al. 2015: dot and general scores
# ---------------------------------------------------------------------------------------------------------


def reference_luong(query, keys, values, mask=None, w_a=None):
    """e_ts = q_t . k_s (dot) or q_t W_a k_s (general), in float64, one score at a time; then softmax as above."""
    q, k, v = (np.asarray(x, np.float64) for x in (query, keys, values))
    w = None if w_a is None else np.asarray(w_a, np.float64)
    scores = np.empty((q.shape[0], q.shape[1], k.shape[1]))
    for b, t, s_ in np.ndindex(*scores.shape):
        scores[b, t, s_] = q[b, t] @ k[b, s_] if w is None else q[b, t] @ w @ k[b, s_]
    allowed = np.ones_like(scores, bool) if mask is None else np.broadcast_to(np.asarray(mask), scores.shape)
    row_max = np.max(np.where(allowed, scores, -np.inf), axis=-1, keepdims=True)
    unnormalised = np.where(allowed, np.exp(scores - np.where(np.isfinite(row_max), row_max, 0.0)), 0.0)
    total = unnormalised.sum(axis=-1, keepdims=True)
    weights = np.divide(unnormalised, total, out=np.zeros_like(unnormalised), where=total > 0)
    return weights @ v, weights


def test_dot_score_hand_worked():
    # Keys e_1, e_2 and query (ln 3, 0): scores ln 3 and 0, so the weights are 3/4 and 1/4.
    query = jnp.array([[[LN3, 0.0]]])
    keys = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
    context, weights = dot_attention(query, keys, jnp.array([[[4.0], [8.0]]]), return_weights=True)
    np.testing.assert_allclose(np.asarray(weights), [[[0.75, 0.25]]], rtol=RTOL)
    np.testing.assert_allclose(np.asarray(context), [[[5.0]]], rtol=RTOL)  # 3/4 * 4 + 1/4 * 8


@pytest.mark.parametrize("mask_name", MASKS)
def test_dot_attention_matches_numpy_reference(mask_name):
    rng = np.random.default_rng(12)
    query, keys, values = _normal(rng, (B, T, DQ)), _normal(rng, (B, S, DQ)), _normal(rng, (B, S, DV))
    mask = _mask(mask_name)
    context, weights = dot_attention(query, keys, values, mask=mask, return_weights=True)
    ref_context, ref_weights = reference_luong(query, keys, values, mask)
    np.testing.assert_allclose(np.asarray(weights), ref_weights, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(context), ref_context, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mask_name", MASKS)
def test_general_attention_matches_numpy_reference(mask_name):
    rng = np.random.default_rng(13)
    query, keys, values = _normal(rng, (B, T, DQ)), _normal(rng, (B, S, DK)), _normal(rng, (B, S, DV))
    params = {"w_a": _normal(rng, (DQ, DK)) * 0.3}
    mask = _mask(mask_name)
    context, weights = general_attention(params, query, keys, values, mask=mask, return_weights=True)
    ref_context, ref_weights = reference_luong(query, keys, values, mask, w_a=params["w_a"])
    np.testing.assert_allclose(np.asarray(weights), ref_weights, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(context), ref_context, rtol=RTOL, atol=ATOL)


def test_general_attention_gradients_match_finite_differences():
    rng = np.random.default_rng(14)
    query, keys, values = _normal(rng, (1, 2, 2)), _normal(rng, (1, 3, 3)), _normal(rng, (1, 3, 2))
    w_a = _normal(rng, (2, 3)) * 0.5
    mask = jnp.array([[[True, True, False], [True, True, True]]])
    cotangent = rng.normal(size=(1, 2, 2))

    def loss(w):
        return jnp.sum(
            general_attention({"w_a": w}, query, keys, values, mask=mask) * jnp.asarray(cotangent, jnp.float32)
        )

    analytic = np.asarray(jax.grad(loss)(w_a))
    eps, numeric = 1e-6, np.zeros(w_a.shape)
    for index in np.ndindex(*w_a.shape):
        step = np.zeros(w_a.shape)
        step[index] = eps
        plus, minus = (
            reference_luong(query, keys, values, mask, w_a=np.asarray(w_a, np.float64) + d)[0] for d in (step, -step)
        )
        numeric[index] = np.sum((plus - minus) * cotangent) / (2 * eps)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("score", SCORES)
def test_align_by_name_equals_the_named_function_step_by_step(score):
    # What a recurrent decoder does: prepare the keys once, then one query per step.
    rng = np.random.default_rng(15)
    dk = DQ if score == "dot" else DK
    query, keys, values = _normal(rng, (B, T, DQ)), _normal(rng, (B, S, dk)), _normal(rng, (B, S, DV))
    params = init_alignment(jax.random.key(1), score, DQ, dk, A)
    expected = {
        "additive": lambda: additive_attention(params, query, keys, values, mask=KEY_PADDING),
        "dot": lambda: dot_attention(query, keys, values, mask=KEY_PADDING),
        "general": lambda: general_attention(params, query, keys, values, mask=KEY_PADDING),
    }[score]()
    prepared = prepare_keys(score, params, keys)
    steps = [align(score, params, query[:, t : t + 1], prepared, values, mask=KEY_PADDING) for t in range(T)]
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, axis=1)), np.asarray(expected), rtol=RTOL, atol=ATOL)


def test_init_alignment_parameters_and_errors():
    assert sorted(init_alignment(jax.random.key(0), "additive", DQ, DK, A)) == ["b", "v", "w_k", "w_q"]
    assert init_alignment(jax.random.key(0), "dot", DQ, DQ, A) == {}
    w_a = np.asarray(init_general_attention(jax.random.key(0), DQ, DK)["w_a"])
    assert w_a.shape == (DQ, DK) and np.abs(w_a).max() <= math.sqrt(6.0 / (DQ + DK))
    # W_a k per key, against float64 NumPy: XLA:CPU's float32 matmuls round differently by processor.
    np.testing.assert_allclose(
        np.asarray(project_keys_general({"w_a": jnp.asarray(w_a)}, jnp.ones((1, 2, DK)))),
        np.broadcast_to(np.ones((1, 2, DK)) @ w_a.astype(np.float64).T, (1, 2, DQ)),
        rtol=1e-6,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="dot score needs queries and keys of one width, got 3 and 11"):
        init_alignment(jax.random.key(0), "dot", DQ, DK, A)
    with pytest.raises(ValueError, match="unknown alignment score 'luong'"):
        init_alignment(jax.random.key(0), "luong", DQ, DK, A)


def test_dot_attention_rejects_mismatched_widths(without_runtime_typechecks):
    with pytest.raises(ValueError, match="keys .* must have the query's width"):
        dot_attention(jnp.ones((B, T, DQ)), jnp.ones((B, S, DK)), jnp.ones((B, S, DV)))
