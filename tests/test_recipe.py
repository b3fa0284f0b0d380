"""Tests of the low-resource recipe's model options (issue 13): word dropout, LayerDrop, activation dropout.

Each option is checked from the outside: the model trained with a PRNG key must equal, exactly (to float32
rounding), the evaluation model on inputs with the dropped tokens zeroed or replaced by UNK, or with the skipped
layers removed from the parameter tree; which tokens or layers were dropped is found by matching against every
candidate, so the tests share nothing with the implementation's key derivation. Counting the matches over many
keys gives the empirical rates, compared with the configured ones within 5 standard errors.
"""

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import TransformerConfig, init_transformer, transformer
from attn_jax.blocks import run_stack
from attn_jax.layers import position_wise_ffn, word_dropout_mask

V, D, N, F = 19, 8, 2, 16
BASE = TransformerConfig(
    vocab_size=V, d_model=D, num_heads=N, d_ff=F, num_encoder_layers=1, num_decoder_layers=1, max_len=16,
    dropout_rate=0.0,
)  # fmt: skip
# One pair with a padded position on each side; BOS (2) is a real decoder input like any other.
SRC = jnp.array([[5, 6, 7, 0]], jnp.int32)
TGT = jnp.array([[2, 8, 9, 0]], jnp.int32)
UNK = 3


def _params(config: TransformerConfig, seed: int = 0):
    """Random parameters with non-trivial layer norms and biases (init leaves biases at zero)."""
    shapes = jax.eval_shape(lambda r: init_transformer(r, config), jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape) + 0.1, s.dtype), shapes)


def _within_sampling_error(count: int, trials: int, rate: float):
    standard_error = math.sqrt(trials * rate * (1.0 - rate))
    assert abs(count - trials * rate) < 5 * standard_error, (count, trials, rate)


def _match(actual, candidates):
    """Index of the candidate each row of ``actual`` equals (to float32 rounding), checking it is unique."""
    distance = np.abs(actual[:, None] - candidates[None]).reshape(len(actual), len(candidates), -1).max(-1)
    order = np.sort(distance, axis=1)
    assert order[:, 0].max() < 1e-5, f"a training output matches no candidate: {order[:, 0].max()}"
    assert order[:, 1].min() > 1e-3, "two candidates are too close to tell apart"
    return distance.argmin(axis=1)


# ---------------------------------------------------------------------------------------------------------
# Word dropout
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_word_dropout_mask_drops_real_tokens_at_the_rate_and_never_padding(rate):
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, V, (300, 200)).astype(np.int32)
    tokens[rng.random(tokens.shape) < 0.2] = 0  # padding
    dropped = np.asarray(word_dropout_mask(jnp.asarray(tokens), rate, jax.random.key(2), pad_id=0))
    assert not dropped[tokens == 0].any()
    _within_sampling_error(int(dropped.sum()), int((tokens != 0).sum()), rate)
    assert word_dropout_mask(jnp.asarray(tokens), rate, None) is None
    assert word_dropout_mask(jnp.asarray(tokens), 0.0, jax.random.key(2)) is None


def _real_positions():
    return [("src", i) for i in range(SRC.shape[1]) if SRC[0, i]] + [
        ("tgt", i) for i in range(TGT.shape[1]) if TGT[0, i]
    ]


@functools.partial(jax.jit, static_argnames=("config", "mode"))
def _candidate_logits(params, patterns, *, config, mode):
    """Evaluation logits ``[P, 1, T, V]`` with the tokens of each pattern ``[P, S + T]`` dropped by hand."""
    S = SRC.shape[1]

    def one(pattern):
        drop_src, drop_tgt = pattern[None, :S], pattern[None, S:]
        if mode == "unk":
            src, tgt = jnp.where(drop_src, UNK, SRC), jnp.where(drop_tgt, UNK, TGT)
            return transformer(params, src, tgt, config=config)
        table = params["embedding"]["embedding"] * math.sqrt(D)
        src = jnp.where(drop_src[..., None], 0.0, table[SRC])
        tgt = jnp.where(drop_tgt[..., None], 0.0, table[TGT])
        return transformer(params, src, tgt, config=config, src_mask=SRC != 0, tgt_mask=TGT != 0)

    return jax.vmap(one)(patterns)


@functools.partial(jax.jit, static_argnames="config")
def _training_logits(params, rngs, *, config):
    """Logits ``[R, 1, T, V]`` with dropout on, one key after another (``lax.map``: no batching of the keys)."""
    return jax.lax.map(lambda r: transformer(params, SRC, TGT, config=config, dropout_rng=r), rngs)


@pytest.mark.parametrize("mode", ["zero", "unk"])
def test_word_dropout_drops_whole_tokens_as_zero_or_unk_inputs(mode):
    rate = 0.3
    config = dataclasses.replace(BASE, word_dropout_rate=rate, word_dropout_mode=mode, unk_id=UNK)
    params = _params(config)
    positions = _real_positions()
    S = SRC.shape[1]
    patterns = np.zeros((2 ** len(positions), S + TGT.shape[1]), bool)
    for p, dropped in enumerate(itertools.product([False, True], repeat=len(positions))):
        for (side, i), d in zip(positions, dropped, strict=True):
            patterns[p, i if side == "src" else S + i] = d
    candidates = np.asarray(_candidate_logits(params, jnp.asarray(patterns), config=BASE, mode=mode))
    trained = np.asarray(_training_logits(params, jax.random.split(jax.random.key(3), 200), config=config))
    # Padding is never dropped: no candidate drops it, and every training output equals one candidate (the
    # padded target position's logits depend on its own input).
    matched = patterns[_match(trained, candidates)]
    _within_sampling_error(int(matched.sum()), matched.shape[0] * len(positions), rate)
    real_columns = [i if side == "src" else S + i for side, i in positions]
    assert matched[:, real_columns].any(0).all()  # each real token, source and target side, was dropped
    # Off without a key: the evaluation model, bit for bit.
    np.testing.assert_array_equal(
        np.asarray(transformer(params, SRC, TGT, config=config)), np.asarray(transformer(params, SRC, TGT, config=BASE))
    )


def test_unk_word_dropout_needs_a_valid_unk_id():
    from attn_jax import ConfigError

    with pytest.raises(ConfigError, match=r"TransformerConfig\.unk_id\b"):
        dataclasses.replace(BASE, word_dropout_rate=0.1, word_dropout_mode="unk", unk_id=0)  # the pad id
    with pytest.raises(ConfigError, match=r"TransformerConfig\.unk_id\b"):
        dataclasses.replace(BASE, word_dropout_rate=0.1, word_dropout_mode="unk", unk_id=V)
    assert dataclasses.replace(BASE, unk_id=V).unk_id == V  # not checked while unused


# ---------------------------------------------------------------------------------------------------------
# LayerDrop
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scan_layers", [True, False])
def test_layerdrop_keeps_the_expected_layers_and_a_skipped_layer_is_the_identity(scan_layers):
    """A toy stack whose layer adds 1 and emits 2: the output counts the layers that ran, exactly."""
    L, rate, keys = 4, 0.25, 500
    config = dataclasses.replace(BASE, scan_layers=scan_layers)

    def block(layer_params, h, rng):
        return h + layer_params, 2.0 * layer_params

    @jax.jit
    def run(rngs):
        def one(rng):
            return run_stack(block, jnp.ones(L), jnp.zeros(()), jax.random.split(rng, L), config=config, layerdrop=rate)

        return jax.lax.map(one, rngs)

    ran, outputs = (np.asarray(a) for a in run(jax.random.split(jax.random.key(4), keys)))
    # A skipped layer passes its input through unchanged and emits zeros; a kept one adds exactly 1 and emits 2.
    assert set(np.unique(outputs)) <= {0.0, 2.0}
    np.testing.assert_array_equal(ran, outputs.sum(1) / 2.0)
    _within_sampling_error(int(ran.sum()), keys * L, 1.0 - rate)
    # No keys (evaluation): every layer runs.
    x, _ = run_stack(block, jnp.ones(L), jnp.zeros(()), None, config=config, layerdrop=rate)
    assert float(x) == L


@functools.partial(jax.jit, static_argnames="config")
def _evaluate(params, *, config):
    return transformer(params, SRC, TGT, config=config)


def test_layerdrop_in_the_model_equals_removing_the_skipped_layers():
    L_ENC, L_DEC, rate = 1, 2, 0.5
    config = dataclasses.replace(
        BASE, num_encoder_layers=L_ENC, num_decoder_layers=L_DEC, encoder_layerdrop=rate, decoder_layerdrop=rate
    )
    params = _params(config, seed=1)
    # With every decoder layer skipped the logits do not read the encoder at all: one candidate stands for all
    # encoder subsets there (its encoder layers are unknown, and left out of the encoder's count).
    no_decoder = (False,) * L_DEC
    subsets = [
        (enc, dec)
        for enc in itertools.product([False, True], repeat=L_ENC)
        for dec in itertools.product([False, True], repeat=L_DEC)
        if dec != no_decoder or not any(enc)
    ]
    candidates = []
    for enc, dec in subsets:
        keep = {"encoder": np.flatnonzero(enc), "decoder": np.flatnonzero(dec)}
        sliced = dict(params)
        for stack, index in keep.items():
            sliced[stack] = params[stack] | {"layers": jax.tree.map(lambda a, i=index: a[i], params[stack]["layers"])}
        layers = {f"num_{stack}_layers": len(index) for stack, index in keep.items()}
        candidates.append(np.asarray(_evaluate(sliced, config=dataclasses.replace(BASE, **layers))))
    trained = np.asarray(_training_logits(params, jax.random.split(jax.random.key(5), 64), config=config))
    kept = np.array([[*enc, *dec] for enc, dec in subsets])[_match(trained, np.stack(candidates))]
    _within_sampling_error(int(kept[:, L_ENC:].sum()), kept.shape[0] * L_DEC, 1.0 - rate)
    known = kept[kept[:, L_ENC:].any(1)]  # the decoder's draws are independent of the encoder's
    _within_sampling_error(int(known[:, :L_ENC].sum()), known.shape[0] * L_ENC, 1.0 - rate)
    plain = dataclasses.replace(config, encoder_layerdrop=0.0, decoder_layerdrop=0.0)
    np.testing.assert_array_equal(
        np.asarray(_evaluate(params, config=config)), np.asarray(_evaluate(params, config=plain))
    )


# ---------------------------------------------------------------------------------------------------------
# Activation dropout
# ---------------------------------------------------------------------------------------------------------


def test_activation_dropout_drops_the_ffn_inner_activation():
    """With ``w_2`` the identity, the FFN's output is its inner activation after dropout."""
    width, rate = 64, 0.3
    rng = np.random.default_rng(6)
    params = {
        "w_1": jnp.asarray(rng.normal(size=(width, width)), jnp.float32),
        "b_1": jnp.asarray(rng.normal(size=width), jnp.float32),
        "w_2": jnp.eye(width, dtype=jnp.float32),
        "b_2": jnp.zeros(width, jnp.float32),
    }
    x = jnp.asarray(rng.normal(size=(4, 50, width)), jnp.float32)
    hidden = np.maximum(
        np.asarray(x, np.float64) @ np.asarray(params["w_1"], np.float64) + np.asarray(params["b_1"]), 0
    )
    out = np.asarray(position_wise_ffn(params, x, dropout_rate=rate, dropout_rng=jax.random.key(7)))
    active = hidden > 1e-3
    kept = out != 0.0
    np.testing.assert_allclose(out[kept], hidden[kept] / (1.0 - rate), rtol=1e-5, atol=1e-5)
    _within_sampling_error(int((~kept & active).sum()), int(active.sum()), rate)
    np.testing.assert_array_equal(
        np.asarray(position_wise_ffn(params, x, dropout_rate=rate)), np.asarray(position_wise_ffn(params, x))
    )


def test_activation_dropout_acts_in_training_only():
    config = dataclasses.replace(BASE, activation_dropout_rate=0.3)
    params = _params(config, seed=2)
    trained = np.asarray(_training_logits(params, jax.random.split(jax.random.key(8), 2), config=config))
    evaluation = np.asarray(_evaluate(params, config=BASE))
    assert np.abs(trained[0] - evaluation).max() > 1e-3 and np.abs(trained[0] - trained[1]).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(_evaluate(params, config=config)), evaluation)


# ---------------------------------------------------------------------------------------------------------
# All together: forward and reverse mode agree
# ---------------------------------------------------------------------------------------------------------


def test_recipe_differentiates_in_forward_and_reverse_mode():
    config = dataclasses.replace(
        BASE, dropout_rate=0.1, activation_dropout_rate=0.2, word_dropout_rate=0.2,
        decoder_layerdrop=0.3, encoder_layerdrop=0.3,
    )  # fmt: skip
    params = _params(config, seed=3)

    def loss(p):
        return jnp.sum(transformer(p, SRC, TGT, config=config, dropout_rng=jax.random.key(9)) ** 2)

    @jax.jit
    def both(p):
        tangent = jax.tree.map(lambda a: jnp.full_like(a, 0.01), p)
        _, forward = jax.jvp(loss, (p,), (tangent,))
        pairs = zip(jax.tree.leaves(jax.grad(loss)(p)), jax.tree.leaves(tangent), strict=True)
        reverse = sum(jnp.vdot(g, t) for g, t in pairs)
        return forward, reverse

    forward, reverse = both(params)
    np.testing.assert_allclose(float(forward), float(reverse), rtol=1e-4)
