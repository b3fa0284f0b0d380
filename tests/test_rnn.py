"""Tests for attn_jax.rnn (the GRU) and attn_jax.rnnsearch (RNNsearch, Bahdanau et al. 2014).

References: ``flax.linen.GRUCell``, a float64 NumPy transcription of the paper's equations that runs each
example on its real tokens only (so it knows nothing of padding masks), and a hand-worked GRU step. Sizes use
a different prime per axis: B=2, S=7, T=5, M=3, D=13, A=17, R=19, Vs=23, Vt=29, I=11.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attn_jax.decoding import greedy_decode
from attn_jax.rnn import from_flax_linen_gru, gru, gru_cell, init_gru
from attn_jax.rnnsearch import (
    RNNSearchConfig,
    decode,
    decode_step,
    encode,
    init_decode_cache,
    init_rnnsearch,
    rnnsearch,
)

B, S, T, M, D, A, R, VS, VT, I = 2, 7, 5, 3, 13, 17, 19, 23, 29, 11
RTOL, ATOL = 1e-5, 1e-6  # simple functions
COMPOSITE_RTOL, COMPOSITE_ATOL = 1e-4, 1e-5  # the whole encoder-decoder
CFG = RNNSearchConfig(source_vocab=VS, target_vocab=VT, embed_dim=M, hidden_dim=D, alignment_dim=A, maxout_dim=R)

# Batch 0 is right-padded (4 real tokens), batch 1 is left-padded (5 real tokens); pad id 0.
SOURCE = jnp.array([[5, 9, 3, 22, 0, 0, 0], [0, 0, 7, 1, 14, 2, 8]], jnp.int32)  # [B, S]
TARGET_INPUTS = jnp.array([[1, 4, 28, 6, 0], [1, 3, 3, 12, 9]], jnp.int32)  # [B, T]


def _normal(rng, shape, scale=1.0):
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)


def _random_tree(tree, seed, scale=0.4):
    """Replaces every leaf with random values, so zero-initialised biases are exercised too."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda w: _normal(rng, w.shape, scale), tree)


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def reference_gru_cell(params, state, inputs, *, reset_after=False):
    """Cho et al. (2014) GRU in float64: s = (1 - z) s_prev + z tanh(x W + (r s_prev) U + b)."""
    p = {name: np.asarray(w, np.float64) for name, w in params.items()}
    s, x = np.asarray(state, np.float64), np.asarray(inputs, np.float64)
    r = _sigmoid(x @ p["w_r"] + s @ p["u_r"] + p["b_r"])
    z = _sigmoid(x @ p["w_z"] + s @ p["u_z"] + p["b_z"])
    if reset_after:
        candidate = np.tanh(x @ p["w"] + p["b"] + r * (s @ p["u"] + p["b_u"]))
    else:
        candidate = np.tanh(x @ p["w"] + p["b"] + (r * s) @ p["u"] + p["b_u"])
    return (1.0 - z) * s + z * candidate


def reference_rnnsearch(params, source, target_inputs):
    """RNNsearch for ONE example, on its real source tokens only, in float64 (paper §3, appendix A)."""
    p = jax.tree.map(lambda w: np.asarray(w, np.float64), params)
    x = p["source_embedding"][source]  # [S_real, M]
    hidden = p["w_s"].shape[0]
    forward, state = [], np.zeros(hidden)
    for x_j in x:
        state = reference_gru_cell(p["encoder_forward"], state, x_j)
        forward.append(state)
    backward, state = [None] * len(x), np.zeros(hidden)
    for j in reversed(range(len(x))):
        state = reference_gru_cell(p["encoder_backward"], state, x[j])
        backward[j] = state
    annotations = np.concatenate([np.stack(forward), np.stack(backward)], axis=-1)  # [S_real, 2 D]
    s = np.tanh(backward[0] @ p["w_s"] + p["b_s"])
    att, readout, logits = p["attention"], p["readout"], []
    for previous in target_inputs:
        e = np.array([att["v"] @ np.tanh(s @ att["w_q"] + h @ att["w_k"] + att["b"]) for h in annotations])
        alpha = np.exp(e - e.max()) / np.exp(e - e.max()).sum()
        c = alpha @ annotations
        y = p["target_embedding"][previous]
        s = reference_gru_cell(p["decoder"], s, np.concatenate([y, c]))
        t_tilde = np.concatenate([s, y, c]) @ readout["w_t"] + readout["b_t"]
        t = t_tilde.reshape(-1, 2).max(axis=-1)  # maxout with pools of 2
        logits.append(t @ readout["w_o"] + readout["b_o"])
    return np.stack(logits)


# ---------------------------------------------------------------------------------------------------------
# GRU cell
# ---------------------------------------------------------------------------------------------------------
# Hand-worked, I = D = 1: all weights zero except u = 1 and b_u = 1, previous state 1, input 0. Then both
# gates are σ(0) = 1/2 and
#   paper  (reset before U): s~ = tanh((r s) u + b_u) = tanh(1/2 + 1) = tanh(3/2)
#   cuDNN  (reset after U):  s~ = tanh(r (s u + b_u)) = tanh((1 + 1) / 2) = tanh(1)
# and s = (1 - z) s_prev + z s~ = 1/2 + s~ / 2.

HAND_GRU = {name: jnp.zeros((1, 1)) for name in ("w_r", "u_r", "w_z", "u_z", "w")} | {
    "u": jnp.ones((1, 1)),
    "b_r": jnp.zeros(1),
    "b_z": jnp.zeros(1),
    "b": jnp.zeros(1),
    "b_u": jnp.ones(1),
}


@pytest.mark.parametrize(("reset_after", "candidate"), [(False, math.tanh(1.5)), (True, math.tanh(1.0))])
def test_gru_cell_hand_worked(reset_after, candidate):
    state = gru_cell(HAND_GRU, jnp.ones((1, 1)), jnp.zeros((1, 1)), reset_after=reset_after)
    np.testing.assert_allclose(np.asarray(state).reshape(1), [0.5 + candidate / 2], rtol=RTOL)


@pytest.mark.parametrize("reset_after", [False, True])
def test_gru_cell_matches_numpy_reference(reset_after):
    params = _random_tree(init_gru(jax.random.key(0), I, D), seed=1)
    rng = np.random.default_rng(2)
    state, inputs = _normal(rng, (B, D)), _normal(rng, (B, I))
    out = gru_cell(params, state, inputs, reset_after=reset_after)
    assert out.shape == (B, D)
    expected = reference_gru_cell(params, state, inputs, reset_after=reset_after)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=RTOL, atol=ATOL)


def test_gru_cell_matches_flax_linen():
    cell = nn.GRUCell(features=D)
    rng = np.random.default_rng(3)
    state, inputs = _normal(rng, (B, D)), _normal(rng, (B, I))
    variables = cell.init(jax.random.key(0), state, inputs)
    # Flax initialises biases to zero; random values make a dropped or misplaced bias visible.
    variables = _random_tree(variables, seed=4)
    expected, _ = cell.apply(variables, state, inputs)
    params = from_flax_linen_gru(variables)
    out = gru_cell(params, state, inputs, reset_after=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=RTOL, atol=ATOL)
    # The paper's variant is a different function of the same weights.
    assert not np.allclose(np.asarray(gru_cell(params, state, inputs)), np.asarray(expected), atol=1e-3)


def test_init_gru_shapes_and_recurrent_orthogonality():
    params = init_gru(jax.random.key(0), I, D)
    for name in ("w_r", "w_z", "w"):
        assert params[name].shape == (I, D)
    for name in ("u_r", "u_z", "u"):
        assert params[name].shape == (D, D)
        u = np.asarray(params[name], np.float64)
        np.testing.assert_allclose(u.T @ u, np.eye(D), atol=1e-5)
    for name in ("b_r", "b_z", "b", "b_u"):
        np.testing.assert_array_equal(np.asarray(params[name]), np.zeros(D))


# ---------------------------------------------------------------------------------------------------------
# GRU over a sequence
# ---------------------------------------------------------------------------------------------------------


def _padded_inputs(seed):
    rng = np.random.default_rng(seed)
    inputs = _normal(rng, (B, S, I))
    return inputs, SOURCE != 0


@pytest.mark.parametrize("reverse", [False, True])
def test_gru_matches_the_cell_on_real_tokens_only(reverse):
    # The reference sees only each example's real tokens; the scan sees the padded batch with its mask.
    params = _random_tree(init_gru(jax.random.key(0), I, D), seed=5)
    inputs, mask = _padded_inputs(6)
    states = np.asarray(gru(params, inputs, mask, reverse=reverse))
    assert states.shape == (B, S, D)
    for b in range(B):
        real = np.flatnonzero(np.asarray(mask[b]))
        order = real[::-1] if reverse else real
        state = np.zeros(D)
        for j in order:
            state = reference_gru_cell(params, state, np.asarray(inputs[b, j]))
            np.testing.assert_allclose(states[b, j], state, rtol=RTOL, atol=ATOL)


def test_gru_padding_carries_the_state():
    params = _random_tree(init_gru(jax.random.key(0), I, D), seed=7)
    inputs, mask = _padded_inputs(8)
    forward = np.asarray(gru(params, inputs, mask))
    backward = np.asarray(gru(params, inputs, mask, reverse=True))
    # Batch 0, right padding: the forward state stays at the last real token's, the backward state is 0.
    np.testing.assert_array_equal(forward[0, 4:], np.broadcast_to(forward[0, 3], (3, D)))
    np.testing.assert_array_equal(backward[0, 4:], 0.0)
    # Batch 1, left padding: the forward state is 0 and the backward one carries the first real token's.
    np.testing.assert_array_equal(forward[1, :2], 0.0)
    np.testing.assert_array_equal(backward[1, :2], np.broadcast_to(backward[1, 2], (2, D)))


# ---------------------------------------------------------------------------------------------------------
# RNNsearch
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_params():
    return _random_tree(init_rnnsearch(jax.random.key(0), CFG), seed=9)


def test_init_rnnsearch_shapes():
    params = init_rnnsearch(jax.random.key(0), CFG)
    shapes = jax.tree.map(lambda w: w.shape, params)
    assert shapes["source_embedding"] == (VS, M)
    assert shapes["target_embedding"] == (VT, M)
    assert shapes["encoder_forward"]["w"] == shapes["encoder_backward"]["w"] == (M, D)
    assert shapes["w_s"] == (D, D) and shapes["b_s"] == (D,)
    assert shapes["attention"] == {"w_q": (D, A), "w_k": (2 * D, A), "b": (A,), "v": (A,)}
    assert shapes["decoder"]["w"] == (M + 2 * D, D) and shapes["decoder"]["u"] == (D, D)
    assert shapes["readout"] == {"w_t": (D + M + 2 * D, 2 * R), "b_t": (2 * R,), "w_o": (R, VT), "b_o": (VT,)}
    # Every block draws from its own key.
    assert not np.allclose(np.asarray(params["encoder_forward"]["w"]), np.asarray(params["encoder_backward"]["w"]))


def test_config_rejects_non_positive_sizes():
    with pytest.raises(ValueError, match="hidden_dim: must be a positive integer, got 0"):
        RNNSearchConfig(source_vocab=3, target_vocab=3, hidden_dim=0)


def test_rnnsearch_matches_numpy_reference(random_params):
    logits = rnnsearch(random_params, SOURCE, TARGET_INPUTS, config=CFG)
    assert logits.shape == (B, T, VT) and logits.dtype == jnp.float32
    for b in range(B):
        real_source = np.asarray(SOURCE[b])[np.asarray(SOURCE[b]) != 0]
        expected = reference_rnnsearch(random_params, real_source, np.asarray(TARGET_INPUTS[b]))
        np.testing.assert_allclose(np.asarray(logits[b]), expected, rtol=COMPOSITE_RTOL, atol=COMPOSITE_ATOL)


def test_encode_annotations_and_initial_state(random_params):
    annotations, initial_state = encode(random_params, SOURCE, config=CFG)
    assert annotations.shape == (B, S, 2 * D) and initial_state.shape == (B, D)
    x = jnp.take(random_params["source_embedding"], SOURCE, axis=0)
    mask = SOURCE != 0
    forward = gru(random_params["encoder_forward"], x, mask)
    backward = gru(random_params["encoder_backward"], x, mask, reverse=True)
    np.testing.assert_allclose(np.asarray(annotations[..., :D]), np.asarray(forward), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(annotations[..., D:]), np.asarray(backward), rtol=RTOL, atol=ATOL)
    # s_0 reads h←_1 at the first REAL token: position 0 for batch 0, position 2 for the left-padded batch 1.
    first_real = np.asarray(backward)[[0, 1], [0, 2]]
    expected = np.tanh(first_real @ np.asarray(random_params["w_s"]) + np.asarray(random_params["b_s"]))
    np.testing.assert_allclose(np.asarray(initial_state), expected, rtol=RTOL, atol=ATOL)


def test_extra_source_padding_changes_nothing(random_params):
    longer = jnp.concatenate([SOURCE, jnp.zeros((B, 4), jnp.int32)], axis=1)  # [B, S + 4]
    np.testing.assert_allclose(
        np.asarray(rnnsearch(random_params, longer, TARGET_INPUTS, config=CFG)),
        np.asarray(rnnsearch(random_params, SOURCE, TARGET_INPUTS, config=CFG)),
        rtol=RTOL,
        atol=ATOL,
    )


def test_teacher_forced_decode_equals_step_by_step(random_params):
    encoded = encode(random_params, SOURCE, config=CFG)
    source_mask = SOURCE != 0
    logits = decode(random_params, *encoded, source_mask, TARGET_INPUTS, config=CFG)
    cache = init_decode_cache(random_params, encoded, SOURCE, config=CFG, max_len=T)
    step = jax.jit(lambda c, y: decode_step(random_params, c, y, config=CFG))
    for t in range(T):
        step_logits, cache = step(cache, TARGET_INPUTS[:, t])
        np.testing.assert_allclose(np.asarray(logits[:, t]), np.asarray(step_logits), rtol=RTOL, atol=ATOL)


def test_greedy_decode_feeds_back_its_argmax(random_params):
    # pad 0 is never emitted; eos_id=None decodes all T tokens.
    tokens = greedy_decode(random_params, SOURCE, config=CFG, bos_id=1, eos_id=None, max_len=T)
    assert tokens.shape == (B, T) and tokens.dtype == jnp.int32
    # Teacher-forcing the greedy output must reproduce the same argmax at every position.
    inputs = jnp.concatenate([jnp.ones((B, 1), jnp.int32), tokens[:, :-1]], axis=1)
    logits = np.array(rnnsearch(random_params, SOURCE, inputs, config=CFG))
    logits[..., 0] = -np.inf
    np.testing.assert_array_equal(logits.argmax(-1), np.asarray(tokens))


def test_gradients_are_finite_and_skip_padding(random_params):
    def loss(params):
        return jnp.sum(rnnsearch(params, SOURCE, TARGET_INPUTS, config=CFG) ** 2)

    grads = jax.grad(loss)(random_params)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    # The pad token's source embedding is never read by a real position.
    np.testing.assert_array_equal(np.asarray(grads["source_embedding"][0]), 0.0)
    assert np.abs(np.asarray(grads["source_embedding"][5])).sum() > 0.0


# ---------------------------------------------------------------------------------------------------------
# Convergence: the copy task
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_overfits_the_copy_task():
    vocab, length, batch, pad, bos, steps = 10, 6, 64, 0, 1, 150
    rng = np.random.default_rng(0)
    source = rng.integers(2, vocab, (batch, length))
    source[np.arange(length)[None] >= rng.integers(3, length + 1, (batch, 1))] = pad  # lengths 3..6
    source = jnp.asarray(source, jnp.int32)
    target_inputs = jnp.concatenate([jnp.full((batch, 1), bos, jnp.int32), source[:, :-1]], axis=1)
    weights = (source != pad).astype(jnp.float32)
    cfg = RNNSearchConfig(
        source_vocab=vocab, target_vocab=vocab, embed_dim=16, hidden_dim=32, alignment_dim=32, maxout_dim=16
    )
    tx = optax.adam(1e-2)

    def loss_fn(params):
        logits = rnnsearch(params, source, target_inputs, config=cfg)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, source)
        return jnp.sum(losses * weights) / jnp.sum(weights), logits

    def train_step(carry, _):
        params, opt_state = carry
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        # Optax's Adam bias correction raises a float to an int32 step count, which strict promotion rejects.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    @jax.jit
    def train(params):
        # One compiled program for all the steps: compiling dominates this test's time on CPU.
        (params, _), losses = jax.lax.scan(train_step, (params, tx.init(params)), None, length=steps)
        _, logits = loss_fn(params)
        return losses, jnp.argmax(logits, axis=-1)

    params = jax.jit(init_rnnsearch, static_argnames="config")(jax.random.key(0), cfg)
    losses, predictions = train(params)
    assert float(losses[0]) > 2.0  # about ln(10) at the start
    assert float(losses[-1]) < 0.01
    real = np.asarray(source) != pad
    np.testing.assert_array_equal(np.asarray(predictions)[real], np.asarray(source)[real])
