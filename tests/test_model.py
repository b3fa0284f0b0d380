"""Tests for attn_jax.model (and the blocks under it) against the float64 NumPy model of the paper.

The reference, tests/reference_numpy.py, is written from the paper's equations with explicit loops; it shares
nothing with ``attn_jax`` except the parameter tree's key names and weight shapes. Parameters are random
(biases and layer-norm scales included, so none of them can be silently ignored) and every axis has its own
size: B=2, S=7, T=5, N=3 query heads, H=11 (set explicitly, 13 is not divisible by 3), D=13, F=17, V=19,
2 encoder and 3 decoder layers. Tolerances: fp32 1e-4 for the composite model against float64, 1e-5 for
one float32 computation against another. The jitted callables below are module-level so that every test with
the same config and shapes reuses one compilation.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import (
    ConfigError,
    TransformerConfig,
    count_params,
    decode_step,
    encode,
    init_decode_cache,
    init_language_model,
    init_language_model_cache,
    init_transformer,
    language_model,
    language_model_step,
    transformer,
)
from tests import reference_numpy as ref
from tests.helpers import assert_trees_allclose

B, S, T, N, H, D, F, V = 2, 7, 5, 3, 11, 13, 17, 19
L_ENC, L_DEC, MAX_LEN = 2, 3, 23
LM_T = 7
RTOL = ATOL = 1e-4  # composite model against float64
SAME = 1e-5  # float32 against float32

CONFIG = TransformerConfig(
    vocab_size=V, d_model=D, num_heads=N, head_dim=H, d_ff=F, num_encoder_layers=L_ENC,
    num_decoder_layers=L_DEC, max_len=MAX_LEN, dropout_rate=0.1,
)  # fmt: skip

VARIANTS = {
    "post_norm": {},
    "pre_norm_large_epsilon": {"norm_first": True, "layer_norm_epsilon": 0.1},
    "learned_positions": {"positions": "learned"},
    "separate_untied_embeddings": {"share_embeddings": False, "tie_output_embedding": False},
    "grouped_query": {"num_heads": 6, "num_kv_heads": 2},
    "no_bias_no_embedding_scale": {"attention_bias": False, "scale_embeddings": False},
    "unrolled": {"scan_layers": False},
}
LM_VARIANTS = {
    "post_norm": {},
    "pre_norm_learned_untied": {"norm_first": True, "positions": "learned", "tie_output_embedding": False},
}

# Batch 1 has three source and two target pads; pad_id is 0 and no real token is 0.
SRC = jnp.array([[3, 4, 5, 6, 7, 8, 9], [11, 2, 13, 4, 0, 0, 0]], jnp.int32)  # [B, S]
TGT = jnp.array([[1, 15, 6, 17, 8], [1, 12, 3, 0, 0]], jnp.int32)  # [B, T]
TGT_FULL = jnp.array([[1, 15, 6, 17, 8], [1, 12, 3, 18, 10]], jnp.int32)
LM_TOKENS = jnp.array([[1, 15, 6, 17, 8, 3, 3], [1, 12, 3, 18, 0, 0, 0]], jnp.int32)  # [B, LM_T]
TGT_REAL = np.asarray(TGT) != 0
SRC_REAL = np.asarray(SRC) != 0
LM_REAL = np.asarray(LM_TOKENS) != 0

_transformer = jax.jit(transformer, static_argnames=("config", "return_weights"))
_language_model = jax.jit(language_model, static_argnames=("config", "return_weights"))
_encode = jax.jit(encode, static_argnames=("config",))
_init_decode_cache = jax.jit(init_decode_cache, static_argnames=("config", "max_len"))
_decode_step = jax.jit(decode_step, static_argnames=("config",))
_language_model_step = jax.jit(language_model_step, static_argnames=("config",))


def _config(**overrides) -> TransformerConfig:
    return dataclasses.replace(CONFIG, **overrides)


def random_params(init, config: TransformerConfig, seed: int):
    """A parameter tree with ``init``'s structure and shapes, every leaf random (layer-norm scales near 1)."""
    shapes = jax.eval_shape(lambda key: init(key, config), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        values = rng.normal(size=shape.shape)
        values = 1.0 + 0.2 * values if jax.tree_util.keystr(path).endswith("['scale']") else 0.3 * values
        return jnp.asarray(values, shape.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


@functools.cache
def _variant(name: str):
    """(config, params, logits, weights) of the transformer on SRC, TGT, computed once per variant."""
    config = _config(**VARIANTS[name])
    params = random_params(init_transformer, config, seed=len(VARIANTS) + list(VARIANTS).index(name))
    logits, weights = _transformer(params, SRC, TGT, config=config, return_weights=True)
    return config, params, np.asarray(logits), jax.tree.map(np.asarray, weights)


@functools.cache
def _lm_variant(name: str):
    config = _config(**LM_VARIANTS[name])
    params = random_params(init_language_model, config, seed=100 + list(LM_VARIANTS).index(name))
    logits, weights = _language_model(params, LM_TOKENS, config=config, return_weights=True)
    return config, params, np.asarray(logits), np.asarray(weights)


def _other_token(token: int) -> int:
    return token % (V - 1) + 1  # a different real (non-zero) token


# ---------------------------------------------------------------------------------------------------------
# The whole model against the float64 reference
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_transformer_matches_reference(name):
    config, params, logits, weights = _variant(name)
    expected, expected_weights = ref.transformer(params, SRC, TGT, config)
    assert logits.shape == (B, T, V) and logits.dtype == np.float32
    np.testing.assert_allclose(logits[TGT_REAL], expected[TGT_REAL], rtol=RTOL, atol=ATOL)
    # Attention weights of real queries (rows of padded queries are a convention the paper leaves open).
    np.testing.assert_allclose(
        weights["encoder"].transpose(1, 3, 0, 2, 4)[SRC_REAL],
        expected_weights["encoder"].transpose(1, 3, 0, 2, 4)[SRC_REAL],
        rtol=RTOL,
        atol=ATOL,
    )
    for kind in ("decoder", "cross"):
        np.testing.assert_allclose(
            weights[kind].transpose(1, 3, 0, 2, 4)[TGT_REAL],  # [L, B, N, T, *] -> [B, T, L, N, *]
            expected_weights[kind].transpose(1, 3, 0, 2, 4)[TGT_REAL],
            rtol=RTOL,
            atol=ATOL,
            err_msg=kind,
        )


def test_reference_comparison_is_sensitive():
    # The comparison above fails for a model that differs in one detail, e.g. a post-norm reference for pre-norm
    # params or one layer-norm bias changed: the test can fail.
    config, params, logits, _ = _variant("pre_norm_large_epsilon")
    post_norm, _ = ref.transformer(params, SRC, TGT, dataclasses.replace(config, norm_first=False))
    assert np.abs(logits - post_norm)[TGT_REAL].max() > 1e-2
    nudged = jax.tree.map(lambda x: x, params)
    nudged["decoder"]["layers"]["ffn_norm"]["bias"] = params["decoder"]["layers"]["ffn_norm"]["bias"].at[1, 3].add(0.1)
    other, _ = ref.transformer(nudged, SRC, TGT, config)
    assert np.abs(logits - other)[TGT_REAL].max() > 1e-3


@pytest.mark.parametrize("name", list(LM_VARIANTS))
def test_language_model_matches_reference(name):
    config, params, logits, weights = _lm_variant(name)
    expected, expected_weights = ref.language_model(params, LM_TOKENS, config)
    assert logits.shape == (B, LM_T, V) and logits.dtype == np.float32
    np.testing.assert_allclose(logits[LM_REAL], expected[LM_REAL], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        weights.transpose(1, 3, 0, 2, 4)[LM_REAL], expected_weights.transpose(1, 3, 0, 2, 4)[LM_REAL],
        rtol=RTOL, atol=ATOL,
    )  # fmt: skip


def test_language_model_with_share_embeddings_false():
    # A decoder-only model has one vocabulary table whatever share_embeddings says (init_language_model makes
    # only "embedding"). share_embeddings=False must then either give the same model or be rejected as a
    # ConfigError naming the field; a KeyError for a table init never made is neither.
    config, params, logits, _ = _lm_variant("post_norm")
    unshared = dataclasses.replace(config, share_embeddings=False)
    assert set(jax.eval_shape(lambda key: init_language_model(key, unshared), jax.random.key(0))) == set(params)
    try:
        other, _ = _language_model(params, LM_TOKENS, config=unshared, return_weights=True)
    except ConfigError as error:
        assert "share_embeddings" in str(error)
    else:
        np.testing.assert_allclose(np.asarray(other), logits, rtol=SAME, atol=SAME)


def test_empty_encoder_stack_unrolled():
    # num_encoder_layers=0 is a valid config (TransformerConfig allows >= 0): the memory is then the embedded
    # source. The unrolled stack must handle zero layers as the scanned one does.
    config = _config(num_encoder_layers=0, scan_layers=False)
    params = random_params(init_transformer, config, seed=50)
    logits = np.asarray(_transformer(params, SRC, TGT, config=config))
    expected, _ = ref.transformer(params, SRC, TGT, config)
    np.testing.assert_allclose(logits[TGT_REAL], expected[TGT_REAL], rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------------------
# Scanned, unrolled and rematerialised stacks; gradients
# ---------------------------------------------------------------------------------------------------------
# Every stack (encoder, decoder, language model) goes through the same ``run_stack``; gradients are compared on
# the language model, the cheapest stack to differentiate three times, and the unrolled transformer's logits
# are compared with the reference above and with the scanned ones here.


def test_unrolled_transformer_equals_scanned():
    _, params, scanned, scanned_weights = _variant("post_norm")
    # The same static config as the "unrolled" variant, so this reuses its compilation.
    logits, weights = _transformer(params, SRC, TGT, config=_config(scan_layers=False), return_weights=True)
    np.testing.assert_allclose(np.asarray(logits), scanned, rtol=SAME, atol=SAME)
    assert_trees_allclose(weights, scanned_weights, rtol=SAME, atol=SAME)


# Zero at padded positions, whose outputs are a convention the reference does not share.
LM_COTANGENT = np.random.default_rng(5).normal(size=(B, LM_T, V)) * LM_REAL[:, :, None]


@functools.partial(jax.jit, static_argnames="config")
def _lm_loss_and_grads(params, *, config):
    def loss(params):
        logits = language_model(params, LM_TOKENS, config=config)
        return jnp.sum(logits * jnp.asarray(LM_COTANGENT, jnp.float32)), logits

    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return logits, grads


@pytest.fixture(scope="module")
def scanned_lm_grads():
    config, params, _, _ = _lm_variant("post_norm")
    return config, params, _lm_loss_and_grads(params, config=config)


def test_language_model_gradient_matches_reference_finite_differences(scanned_lm_grads):
    # The directional derivative <grad, u> against a central difference of the float64 reference.
    config, params, (_, grads) = scanned_lm_grads
    rng = np.random.default_rng(6)
    direction = jax.tree.map(lambda g: rng.normal(size=g.shape), grads)
    analytic = sum(float(np.vdot(np.asarray(g, np.float64), u)) for g, u in
                   zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True))  # fmt: skip

    def reference_loss(step):
        moved = jax.tree.map(lambda p, u: np.asarray(p, np.float64) + step * u, params, direction)
        logits, _ = ref.language_model(moved, LM_TOKENS, config)
        return float(np.sum(logits * LM_COTANGENT))

    numeric = (reference_loss(1e-5) - reference_loss(-1e-5)) / 2e-5
    np.testing.assert_allclose(analytic, numeric, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("overrides", [{"scan_layers": False}, {"remat": True}], ids=["unrolled", "remat"])
def test_stack_variants_give_the_same_logits_and_gradients(scanned_lm_grads, overrides):
    config, params, (logits, grads) = scanned_lm_grads
    other_logits, other_grads = _lm_loss_and_grads(params, config=dataclasses.replace(config, **overrides))
    np.testing.assert_allclose(np.asarray(other_logits), np.asarray(logits), rtol=SAME, atol=SAME)
    assert_trees_allclose(other_grads, grads, rtol=1e-4, atol=1e-5)
    for g in jax.tree.leaves(grads):  # every parameter gets a finite gradient, and not all of them zero
        assert np.all(np.isfinite(np.asarray(g))) and np.abs(np.asarray(g)).max() > 0.0


# ---------------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", range(1, T))
def test_transformer_is_causal(t):
    config, params, _, _ = _variant("post_norm")
    before, _ = _transformer(params, SRC, TGT_FULL, config=config, return_weights=True)
    changed = TGT_FULL.at[:, t].set(jnp.array([_other_token(int(x)) for x in TGT_FULL[:, t]], jnp.int32))
    after, _ = _transformer(params, SRC, changed, config=config, return_weights=True)
    before, after = np.asarray(before), np.asarray(after)
    np.testing.assert_allclose(after[:, :t], before[:, :t], rtol=0.0, atol=1e-6)
    assert np.abs(after[:, t] - before[:, t]).max(axis=-1).min() > 1e-4  # the changed position does change


@pytest.mark.parametrize("t", [1, 3, 6])
def test_language_model_is_causal(t):
    config, params, _, _ = _lm_variant("post_norm")
    tokens = jnp.where(LM_TOKENS == 0, 5, LM_TOKENS)  # no padding
    before, _ = _language_model(params, tokens, config=config, return_weights=True)
    changed = tokens.at[:, t].set(jnp.array([_other_token(int(x)) for x in tokens[:, t]], jnp.int32))
    after, _ = _language_model(params, changed, config=config, return_weights=True)
    before, after = np.asarray(before), np.asarray(after)
    np.testing.assert_allclose(after[:, :t], before[:, :t], rtol=0.0, atol=1e-6)
    assert np.abs(after[:, t] - before[:, t]).max(axis=-1).min() > 1e-4


def test_appended_padding_leaves_real_positions_unchanged():
    # Three pads appended to every source and two to every target sentence (one compilation for both).
    config, params, logits, _ = _variant("post_norm")
    src = jnp.concatenate([SRC, jnp.zeros((B, 3), jnp.int32)], axis=1)
    tgt = jnp.concatenate([TGT, jnp.zeros((B, 2), jnp.int32)], axis=1)
    padded, _ = _transformer(params, src, tgt, config=config, return_weights=True)
    padded = np.asarray(padded)[:, :T]
    np.testing.assert_allclose(padded[TGT_REAL], logits[TGT_REAL], rtol=SAME, atol=SAME)


def test_language_model_appended_padding_leaves_real_positions_unchanged():
    config, params, logits, _ = _lm_variant("post_norm")
    tokens = jnp.concatenate([LM_TOKENS, jnp.zeros((B, 4), jnp.int32)], axis=1)
    padded, _ = _language_model(params, tokens, config=config, return_weights=True)
    np.testing.assert_allclose(np.asarray(padded)[:, :LM_T][LM_REAL], logits[LM_REAL], rtol=SAME, atol=SAME)


def _without_encoder_positions(params):
    params = jax.tree.map(lambda x: x, params)  # a new tree of the same arrays
    params["encoder"]["positions"] = jnp.zeros_like(params["encoder"]["positions"])
    return params


PERMUTATION = np.array([4, 0, 6, 2, 5, 1, 3])  # a permutation of the S=7 source positions, no fixed point


def test_encoder_without_positions_is_permutation_equivariant():
    config, params, _, _ = _variant("learned_positions")
    params = _without_encoder_positions(params)
    memory = np.asarray(_encode(params, SRC, config=config))
    permuted = np.asarray(_encode(params, SRC[:, PERMUTATION], config=config))
    # Pads move with their tokens; every position, pad or not, is equivariant.
    np.testing.assert_allclose(permuted, memory[:, PERMUTATION], rtol=SAME, atol=SAME)


def test_decoder_output_is_invariant_to_permuting_the_source():
    config, params, logits, _ = _variant("learned_positions")
    without = _without_encoder_positions(params)
    reference, _ = _transformer(without, SRC, TGT, config=config, return_weights=True)
    permuted, _ = _transformer(without, SRC[:, PERMUTATION], TGT, config=config, return_weights=True)
    reference, permuted = np.asarray(reference), np.asarray(permuted)
    np.testing.assert_allclose(permuted[TGT_REAL], reference[TGT_REAL], rtol=SAME, atol=SAME)
    # With its positions the encoder does see the order, so the same permutation changes the logits.
    with_positions, _ = _transformer(params, SRC[:, PERMUTATION], TGT, config=config, return_weights=True)
    assert np.abs(np.asarray(with_positions) - logits)[TGT_REAL].max() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Incremental decoding with a key/value cache
# ---------------------------------------------------------------------------------------------------------


def _step_through(step, params, cache, tokens, chunks, config):
    outputs, start = [], 0
    for size in chunks:
        logits, cache = step(params, cache, tokens[:, start : start + size], config=config)
        assert logits.shape == (B, size, V)
        outputs.append(np.asarray(logits))
        start += size
    assert start == tokens.shape[1]
    assert int(cache["index"]) == tokens.shape[1]
    return np.concatenate(outputs, axis=1)


@pytest.mark.parametrize(
    "name, chunks",
    [("post_norm", [1] * T), ("post_norm", [1, 3, 1]), ("learned_positions", [1] * T), ("grouped_query", [1] * T)],
)
def test_decode_step_matches_teacher_forcing(name, chunks):
    config, params, logits, _ = _variant(name)
    memory = _encode(params, SRC, config=config)
    cache = _init_decode_cache(params, memory, SRC, config=config, max_len=11)  # longer than T: slots masked
    assert cache["self"]["k"].shape == (L_DEC, B, 11, config.resolved_num_kv_heads, H)
    stepped = _step_through(_decode_step, params, cache, TGT, chunks, config)
    np.testing.assert_allclose(stepped[TGT_REAL], logits[TGT_REAL], rtol=SAME, atol=SAME)


@pytest.mark.parametrize(
    "name, chunks", [("post_norm", [1] * LM_T), ("post_norm", [3, 1, 3]), ("pre_norm_learned_untied", [1] * LM_T)]
)
def test_language_model_step_matches_full_forward(name, chunks):
    config, params, logits, _ = _lm_variant(name)
    cache = init_language_model_cache(config, B, 13)
    assert cache["self"]["k"].shape == (L_DEC, B, 13, N, H)
    stepped = _step_through(_language_model_step, params, cache, LM_TOKENS, chunks, config)
    np.testing.assert_allclose(stepped[LM_REAL], logits[LM_REAL], rtol=SAME, atol=SAME)


@pytest.mark.parametrize("max_len", [0, MAX_LEN + 1])
def test_caches_reject_bad_max_len(max_len):
    _, params, _, _ = _variant("post_norm")
    memory = jnp.zeros((B, S, D), jnp.float32)
    with pytest.raises(ValueError, match="max_len"):
        init_decode_cache(params, memory, SRC, config=CONFIG, max_len=max_len)
    with pytest.raises(ValueError, match="max_len"):
        init_language_model_cache(CONFIG, B, max_len)


# ---------------------------------------------------------------------------------------------------------
# Returned attention weights
# ---------------------------------------------------------------------------------------------------------


def test_return_weights_shapes_rows_and_causality():
    _, _, _, weights = _variant("post_norm")
    assert set(weights) == {"encoder", "decoder", "cross"}
    assert weights["encoder"].shape == (L_ENC, B, N, S, S)
    assert weights["decoder"].shape == (L_DEC, B, N, T, T)
    assert weights["cross"].shape == (L_DEC, B, N, T, S)
    for kind, query_real, key_real in [
        ("encoder", SRC_REAL, SRC_REAL),
        ("decoder", TGT_REAL, TGT_REAL),
        ("cross", TGT_REAL, SRC_REAL),
    ]:
        w = weights[kind].astype(np.float64)
        assert np.all(w >= 0.0), kind
        rows = w.transpose(1, 3, 0, 2, 4)[query_real].sum(-1)  # [real queries, L, N]
        np.testing.assert_allclose(rows, 1.0, rtol=SAME, atol=SAME, err_msg=kind)
        # No weight on padded keys.
        np.testing.assert_array_equal(w.transpose(1, 4, 0, 2, 3)[~key_real], 0.0, err_msg=kind)
    upper = np.triu(np.ones((T, T), bool), k=1)
    np.testing.assert_array_equal(weights["decoder"][..., upper], 0.0)
    assert np.all(weights["decoder"][..., ~upper].sum(-1) > 0.0)


# ---------------------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="config")
def _with_dropout(params, rng, *, config):
    return transformer(params, SRC, TGT, config=config, dropout_rng=rng)


def test_dropout_changes_output_deterministically_per_key():
    config, params, eval_logits, _ = _variant("post_norm")
    assert config.dropout_rate > 0.0
    first = np.asarray(_with_dropout(params, jax.random.key(1), config=config))
    again = np.asarray(_with_dropout(params, jax.random.key(1), config=config))
    other = np.asarray(_with_dropout(params, jax.random.key(2), config=config))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - eval_logits)[TGT_REAL].max() > 1e-3
    assert np.abs(first - other)[TGT_REAL].max() > 1e-3


def test_no_dropout_key_is_deterministic_evaluation():
    # dropout_rate is 0.1, but without a key the model is the dropout-free reference, call after call.
    config, params, eval_logits, _ = _variant("post_norm")
    again, _ = _transformer(params, SRC, TGT, config=config, return_weights=True)
    np.testing.assert_array_equal(np.asarray(again), eval_logits)
    expected, _ = ref.transformer(params, SRC, TGT, config)
    np.testing.assert_allclose(eval_logits[TGT_REAL], expected[TGT_REAL], rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------------------
# Initialisation and parameter counts
# ---------------------------------------------------------------------------------------------------------


def _abstract_count(init, config):
    return count_params(jax.eval_shape(lambda key: init(key, config), jax.random.key(0)))


def test_base_model_has_63_million_parameters():
    assert abs(_abstract_count(init_transformer, TransformerConfig.base(37000)) - 63.1e6) <= 0.01 * 63.1e6


def test_big_model_has_214_million_parameters():
    assert abs(_abstract_count(init_transformer, TransformerConfig.big(37000)) - 214.3e6) <= 0.01 * 214.3e6


def _hand_count(config: TransformerConfig, *, language_model: bool) -> int:
    """The parameter count from the architecture, term by term."""
    d, f, v = config.d_model, config.d_ff, config.vocab_size
    n, k, h = config.num_heads, config.resolved_num_kv_heads, config.resolved_head_dim
    attention = d * n * h + 2 * d * k * h + n * h * d + ((n * h + 2 * k * h + d) if config.attention_bias else 0)
    norm = 2 * d
    ffn = d * f + f + f * d + d
    encoder_layer = attention + ffn + 2 * norm
    decoder_layer = 2 * attention + ffn + 3 * norm
    stack_extra = (config.max_len * d if config.positions == "learned" else 0) + (norm if config.norm_first else 0)
    output_table = 0 if config.tie_output_embedding else v * d
    if language_model:
        return v * d + output_table + config.num_decoder_layers * encoder_layer + stack_extra
    tables = v * d * (1 if config.share_embeddings else 2) + output_table
    encoder = config.num_encoder_layers * encoder_layer + stack_extra
    decoder = config.num_decoder_layers * decoder_layer + stack_extra
    return tables + encoder + decoder


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_heads": 6, "num_kv_heads": 2, "attention_bias": False},
        {"positions": "learned", "norm_first": True, "share_embeddings": False, "tie_output_embedding": False},
    ],
    ids=["paper", "gqa_no_bias", "learned_pre_norm_untied"],
)
def test_tiny_parameter_count_by_hand(overrides):
    config = _config(**overrides)
    assert _abstract_count(init_transformer, config) == _hand_count(config, language_model=False)
    assert _abstract_count(init_language_model, config) == _hand_count(config, language_model=True)


def test_paper_tiny_count_in_numbers():
    # Worked once in numbers for the default tiny config (N=3, H=11, D=13, F=17, V=19, 2 + 3 layers):
    # attention 13*33 + 2*13*33 + 33*13 + (33 + 33 + 33 + 13) = 1828; FFN 13*17 + 17 + 17*13 + 13 = 472;
    # encoder layer 1828 + 472 + 52 = 2352; decoder layer 2*1828 + 472 + 78 = 4206;
    # total 19*13 + 2*2352 + 3*4206 = 247 + 4704 + 12618 = 17569.
    assert _abstract_count(init_transformer, CONFIG) == 17569


def test_init_transformer_tree_layout():
    config = _config(positions="learned", norm_first=True, share_embeddings=False, tie_output_embedding=False)
    params = jax.eval_shape(lambda key: init_transformer(key, config), jax.random.key(3))
    assert set(params) == {"source_embedding", "target_embedding", "output_embedding", "encoder", "decoder"}
    assert params["output_embedding"]["embedding"].shape == (V, D)
    assert set(params["encoder"]) == {"layers", "positions", "norm"}
    assert params["encoder"]["positions"].shape == (MAX_LEN, D)
    assert params["decoder"]["norm"]["scale"].shape == (D,)
    layers = params["decoder"]["layers"]
    assert set(layers) == {
        "self_attention", "self_attention_norm", "cross_attention", "cross_attention_norm", "ffn", "ffn_norm"
    }  # fmt: skip
    assert layers["self_attention"]["w_q"].shape == (L_DEC, D, N, H)
    assert layers["cross_attention"]["w_o"].shape == (L_DEC, N, H, D)
    assert layers["cross_attention"]["b_k"].shape == (L_DEC, N, H)
    assert params["encoder"]["layers"]["ffn"]["w_1"].shape == (L_ENC, D, F)
    assert set(params["encoder"]["layers"]) == {"self_attention", "self_attention_norm", "ffn", "ffn_norm"}
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    paper = jax.eval_shape(lambda key: init_transformer(key, CONFIG), jax.random.key(3))
    assert set(paper) == {"embedding", "encoder", "decoder"}
    assert set(paper["encoder"]) == {"layers"}
    lm = jax.eval_shape(lambda key: init_language_model(key, CONFIG), jax.random.key(3))
    assert set(lm) == {"embedding", "decoder"}
    assert set(lm["decoder"]["layers"]) == {"self_attention", "self_attention_norm", "ffn", "ffn_norm"}


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------


def test_tokens_longer_than_max_len_are_rejected():
    _, params, _, _ = _variant("post_norm")
    too_long = jnp.ones((B, MAX_LEN + 1), jnp.int32)
    with pytest.raises(ValueError, match="max_len"):
        _transformer(params, too_long, TGT, config=CONFIG)
    with pytest.raises(ValueError, match="max_len"):
        _transformer(params, SRC, too_long, config=CONFIG)
    _, lm_params, _, _ = _lm_variant("post_norm")
    with pytest.raises(ValueError, match="max_len"):
        _language_model(lm_params, too_long, config=CONFIG)


def test_empty_tokens_are_rejected():
    _, params, _, _ = _variant("post_norm")
    empty = jnp.zeros((B, 0), jnp.int32)
    with pytest.raises(ValueError, match="non-empty"):
        _transformer(params, empty, TGT, config=CONFIG)
    with pytest.raises(ValueError, match="non-empty"):
        _transformer(params, SRC, empty, config=CONFIG)


@pytest.mark.parametrize("overrides", [{"vocab_size": 23}, {"d_model": 22, "head_dim": None, "num_heads": 2}])
def test_params_config_mismatch_is_a_config_error(overrides):
    _, params, _, _ = _variant("post_norm")
    with pytest.raises(ConfigError, match=r"TransformerConfig\.vocab_size"):
        transformer(params, SRC, TGT, config=_config(**overrides))
    _, lm_params, _, _ = _lm_variant("post_norm")
    with pytest.raises(ConfigError, match=r"TransformerConfig\.vocab_size"):
        language_model(lm_params, LM_TOKENS, config=_config(**overrides))


# ---------------------------------------------------------------------------------------------------------
# bfloat16
# ---------------------------------------------------------------------------------------------------------


def test_bfloat16_is_close_to_float32():
    config, params, logits, _ = _variant("post_norm")
    low = _config(dtype="bfloat16")
    low_logits, _ = _transformer(params, SRC, TGT, config=low, return_weights=True)
    assert low_logits.dtype == jnp.float32
    memory = jax.eval_shape(lambda p: encode(p, SRC, config=low), params)
    assert memory.dtype == jnp.bfloat16  # the activations really are bfloat16
    error = np.abs(np.asarray(low_logits) - logits)[TGT_REAL].max()
    scale = np.abs(logits[TGT_REAL]).max()
    assert 0.0 < error <= 5e-2 * scale, (error, scale)
    assert math.isfinite(error)
