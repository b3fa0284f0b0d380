"""Tests for attn_jax.rnn_encdec (the RNN encoder-decoder of Cho et al. 2014, without attention).

The reference is a float64 NumPy transcription of Cho et al.'s equations that runs each example on its real
tokens only and feeds ``c`` to the decoder's gates through their own matrices (``C_r c``, ``C_z c``, ``C c``),
as the paper writes it, rather than by concatenation. Sizes use a different prime per axis: B=2, S=7, T=5, M=3,
D=13, E=11, R=19, Vs=23, Vt=29.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.rnn_encdec import (
    RNNEncDecConfig,
    decode,
    decode_step,
    encode,
    init_decode_cache,
    init_rnn_encdec,
    rnn_encdec,
)

B, S, T, M, D, E, R, VS, VT = 2, 7, 5, 3, 13, 11, 19, 23, 29
RTOL, ATOL = 1e-5, 1e-6
COMPOSITE_RTOL, COMPOSITE_ATOL = 1e-4, 1e-5
CFG = RNNEncDecConfig(source_vocab=VS, target_vocab=VT, embed_dim=M, hidden_dim=D, encoder_dim=E, maxout_dim=R)

# Batch 0 is right-padded (4 real tokens), batch 1 is left-padded (5 real tokens); pad id 0.
SOURCE = jnp.array([[5, 9, 3, 22, 0, 0, 0], [0, 0, 7, 1, 14, 2, 8]], jnp.int32)  # [B, S]
TARGET_INPUTS = jnp.array([[1, 4, 28, 6, 0], [1, 3, 3, 12, 9]], jnp.int32)  # [B, T]


def _random_tree(tree, seed, scale=0.4):
    """Replaces every leaf with random values, so zero-initialised biases are exercised too."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda w: jnp.asarray(rng.normal(size=w.shape) * scale, jnp.float32), tree)


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _gru(p, s, x, c=None, embed=None):
    """Cho et al.'s GRU in float64; with ``c``, the decoder's gates read it through their own matrices."""

    def gate_input(w):
        if c is None:
            return x @ p[w]
        return x @ p[w][:embed] + c @ p[w][embed:]  # W y + C c

    r = _sigmoid(gate_input("w_r") + s @ p["u_r"] + p["b_r"])
    z = _sigmoid(gate_input("w_z") + s @ p["u_z"] + p["b_z"])
    candidate = np.tanh(gate_input("w") + p["b"] + (r * s) @ p["u"] + p["b_u"])
    return (1.0 - z) * s + z * candidate


def reference_rnn_encdec(params, source, target_inputs, *, reverse=False):
    """One example on its real source tokens, float64 (Cho et al. 2014 §2; Bahdanau et al.'s maxout readout)."""
    p = jax.tree.map(lambda w: np.asarray(w, np.float64), params)
    h = np.zeros(p["w_c"].shape[0])
    for x in p["source_embedding"][source[::-1] if reverse else source]:
        h = _gru(p["encoder"], h, x)
    c = np.tanh(h @ p["w_c"] + p["b_c"])
    s = np.tanh(c @ p["w_s"] + p["b_s"])
    out, logits = p["readout"], []
    for previous in target_inputs:
        y = p["target_embedding"][previous]
        s = _gru(p["decoder"], s, y, c=c, embed=len(y))
        t = (np.concatenate([s, y, c]) @ out["w_t"] + out["b_t"]).reshape(-1, 2).max(axis=-1)
        logits.append(t @ out["w_o"] + out["b_o"])
    return np.stack(logits)


@pytest.fixture(scope="module")
def random_params():
    return _random_tree(init_rnn_encdec(jax.random.key(0), CFG), seed=1)


def test_init_shapes():
    shapes = jax.tree.map(lambda w: w.shape, init_rnn_encdec(jax.random.key(0), CFG))
    assert shapes["source_embedding"] == (VS, M) and shapes["target_embedding"] == (VT, M)
    assert shapes["encoder"]["w"] == (M, E) and shapes["encoder"]["u"] == (E, E)
    assert shapes["w_c"] == (E, E) and shapes["w_s"] == (E, D)
    assert shapes["decoder"]["w"] == (M + E, D) and shapes["decoder"]["u"] == (D, D)
    assert shapes["readout"] == {"w_t": (D + M + E, 2 * R), "b_t": (2 * R,), "w_o": (R, VT), "b_o": (VT,)}


@pytest.mark.parametrize("reverse", [False, True])
def test_matches_numpy_reference(random_params, reverse):
    config = RNNEncDecConfig(**{**CFG.__dict__, "reverse_source": reverse})
    logits = rnn_encdec(random_params, SOURCE, TARGET_INPUTS, config=config)
    assert logits.shape == (B, T, VT) and logits.dtype == jnp.float32
    for b in range(B):
        real = np.asarray(SOURCE[b])[np.asarray(SOURCE[b]) != 0]
        expected = reference_rnn_encdec(random_params, real, np.asarray(TARGET_INPUTS[b]), reverse=reverse)
        np.testing.assert_allclose(np.asarray(logits[b]), expected, rtol=COMPOSITE_RTOL, atol=COMPOSITE_ATOL)


def test_the_decoder_sees_only_the_summary(random_params):
    # Two sources with the same summary c give the same translation: the decoder has nothing else to read.
    summary, state = encode(random_params, SOURCE, config=CFG)
    logits = decode(random_params, summary, state, TARGET_INPUTS, config=CFG)
    np.testing.assert_allclose(
        np.asarray(logits), np.asarray(rnn_encdec(random_params, SOURCE, TARGET_INPUTS, config=CFG)), rtol=RTOL
    )
    longer = jnp.concatenate([SOURCE, jnp.zeros((B, 4), jnp.int32)], axis=1)  # more padding changes nothing
    np.testing.assert_allclose(
        np.asarray(rnn_encdec(random_params, longer, TARGET_INPUTS, config=CFG)), np.asarray(logits), rtol=RTOL,
        atol=ATOL,
    )  # fmt: skip


def test_teacher_forced_decode_equals_step_by_step(random_params):
    encoded = encode(random_params, SOURCE, config=CFG)
    logits = decode(random_params, *encoded, TARGET_INPUTS, config=CFG)
    cache = init_decode_cache(random_params, encoded, SOURCE, config=CFG, max_len=T)
    step = jax.jit(lambda c, y: decode_step(random_params, c, y, config=CFG))
    for t in range(T):
        step_logits, cache = step(cache, TARGET_INPUTS[:, t])
        np.testing.assert_allclose(np.asarray(logits[:, t]), np.asarray(step_logits), rtol=RTOL, atol=ATOL)


def test_gradients_are_finite_skip_padding_and_reach_the_encoder(random_params):
    grads = jax.grad(lambda p: jnp.sum(rnn_encdec(p, SOURCE, TARGET_INPUTS, config=CFG) ** 2))(random_params)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    np.testing.assert_array_equal(np.asarray(grads["source_embedding"][0]), 0.0)  # pad is never read
    assert np.abs(np.asarray(grads["source_embedding"][5])).sum() > 0.0
    assert np.abs(np.asarray(grads["encoder"]["u"])).sum() > 0.0


def test_dropout_only_with_a_key_and_config_errors():
    config = RNNEncDecConfig(**{**CFG.__dict__, "dropout_rate": 0.5})
    params = init_rnn_encdec(jax.random.key(0), config)
    plain = rnn_encdec(params, SOURCE, TARGET_INPUTS, config=config)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(rnn_encdec(params, SOURCE, TARGET_INPUTS, config=CFG)))
    dropped = rnn_encdec(params, SOURCE, TARGET_INPUTS, config=config, dropout_rng=jax.random.key(1))
    assert not np.allclose(np.asarray(dropped), np.asarray(plain))
    with pytest.raises(ValueError, match="RNNEncDecConfig.maxout_dim: must be a positive integer, got 0"):
        RNNEncDecConfig(source_vocab=3, target_vocab=3, maxout_dim=0)
    with pytest.raises(ValueError, match="max_len=9 must be in"):
        init_decode_cache(params, encode(params, SOURCE, config=CFG), SOURCE, config=CFG.__class__(
            **{**CFG.__dict__, "max_len": 8}), max_len=9)  # fmt: skip
