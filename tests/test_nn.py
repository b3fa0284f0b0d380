"""Tests for attn_jax.nn: every Flax NNX module is its core function over its own parameters, nothing more.

For each module: the ``nnx.Param`` state, as a pure dict, is the core's parameter tree (same keys, same
shapes); calling the module equals calling the core function on that dict exactly; ``nnx.grad`` through the
module equals ``jax.grad`` of the core; ``nnx.jit`` works; and ``rngs=nnx.Rngs(dropout=...)`` turns dropout on,
with the same key the core would get. Parameters are random (biases and scales included). Sizes as elsewhere:
B=2, S=7, T=5, N=3, H=11, D=13, F=17, V=19.

The small modules are initialised for real (with an "rbg" PRNG key, much cheaper to compile on CPU than
threefry) and compared with the core ``init_*`` under the same key. ``Transformer`` and ``LanguageModel`` are
built under ``nnx.eval_shape`` and filled with random values, which keeps this file within its time budget: a
real initialisation of the stacked layers costs tens of seconds of XLA compilation. For the same reason the
config unrolls its layers (``scan_layers=False``): eagerly, each call of a scanned stack compiles the scan
afresh, while unrolled layers reuse the operations already compiled for the blocks. (Scanned and unrolled stacks
are compared with each other in tests/test_model.py.)
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax import (
    TransformerConfig,
    causal_mask,
    combine_masks,
    decoder_block,
    embed,
    encoder_block,
    init_decoder_block,
    init_embedding,
    init_encoder_block,
    init_language_model,
    init_layer_norm,
    init_multi_head_attention,
    init_position_wise_ffn,
    init_transformer,
    language_model,
    layer_norm,
    multi_head_attention,
    padding_mask,
    position_wise_ffn,
    shared_logits,
    transformer,
)
from attn_jax import nn as attn_nn
from tests.helpers import assert_trees_allclose

B, S, T, N, H, D, F, V = 2, 7, 5, 3, 11, 13, 17, 19
SAME = 1e-5

CONFIG = TransformerConfig(
    vocab_size=V, d_model=D, num_heads=N, head_dim=H, d_ff=F, num_encoder_layers=2, num_decoder_layers=3,
    max_len=23, dropout_rate=0.2, scan_layers=False,
)  # fmt: skip

SRC = jnp.array([[3, 4, 5, 6, 7, 8, 9], [11, 2, 13, 4, 0, 0, 0]], jnp.int32)  # [B, S]
TGT = jnp.array([[1, 15, 6, 17, 8], [1, 12, 3, 0, 0]], jnp.int32)  # [B, T]


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


X_Q, X_KV = _normal(1, (B, T, D)), _normal(2, (B, S, D))
ATTENTION_MASK = padding_mask(TGT, SRC)  # [B, 1, T, S]
SELF_MASK = combine_masks(padding_mask(TGT, TGT), causal_mask(T))
SOURCE_MASK = padding_mask(SRC, SRC)


def _rbg_rngs(seed: int) -> nnx.Rngs:
    return nnx.Rngs(params=jax.random.key(seed, impl="rbg"))


@dataclasses.dataclass(frozen=True)
class Spec:
    """How to build a module, its core twin, and the inputs to call both with."""

    make: Callable[[nnx.Rngs], nnx.Module]  # the module, given its rngs
    core_init: Callable[[jax.Array], dict]  # the core init, given the key the module's rngs.params() returns
    core: Callable  # core(params, *args, **kwargs)
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)
    dropout_kwargs: dict | None = None  # extra call kwargs that turn dropout on; None: module has no dropout
    real_init: bool = True  # False: built under nnx.eval_shape (too costly to compile the real init)


SPECS = {
    "MultiHeadAttention": Spec(
        make=lambda rngs: attn_nn.MultiHeadAttention(D, N, head_dim=H, num_kv_heads=1, use_bias=True, rngs=rngs),
        core_init=lambda key: init_multi_head_attention(key, D, N, head_dim=H, num_kv_heads=1, use_bias=True),
        core=multi_head_attention,
        args=(X_Q, X_KV),
        kwargs={"mask": ATTENTION_MASK},
        dropout_kwargs={"dropout_rate": 0.3},
    ),
    "LayerNorm": Spec(
        make=lambda rngs: attn_nn.LayerNorm(D, epsilon=0.5),
        core_init=lambda key: init_layer_norm(D),
        core=functools.partial(layer_norm, epsilon=0.5),
        args=(X_Q,),
    ),
    "PositionWiseFFN": Spec(
        make=lambda rngs: attn_nn.PositionWiseFFN(D, F, rngs=rngs),
        core_init=lambda key: init_position_wise_ffn(key, D, F),
        core=position_wise_ffn,
        args=(X_Q,),
    ),
    "Embedding": Spec(
        make=lambda rngs: attn_nn.Embedding(V, D, rngs=rngs),
        core_init=lambda key: init_embedding(key, V, D),
        core=embed,
        args=(SRC,),
    ),
    "EncoderBlock": Spec(
        make=lambda rngs: attn_nn.EncoderBlock(CONFIG, rngs=rngs),
        core_init=lambda key: init_encoder_block(key, CONFIG),
        core=functools.partial(encoder_block, config=CONFIG),
        args=(X_KV,),
        kwargs={"mask": SOURCE_MASK},
        dropout_kwargs={},
    ),
    "DecoderBlock": Spec(
        make=lambda rngs: attn_nn.DecoderBlock(CONFIG, rngs=rngs),
        core_init=lambda key: init_decoder_block(key, CONFIG),
        core=functools.partial(decoder_block, config=CONFIG),
        args=(X_Q, X_KV),
        kwargs={"self_mask": SELF_MASK, "cross_mask": ATTENTION_MASK},
        dropout_kwargs={},
    ),
    "Transformer": Spec(
        make=lambda rngs: attn_nn.Transformer(CONFIG, rngs=rngs),
        core_init=lambda key: init_transformer(key, CONFIG),
        core=functools.partial(transformer, config=CONFIG),
        args=(SRC, TGT),
        dropout_kwargs={},
        real_init=False,
    ),
    "LanguageModel": Spec(
        make=lambda rngs: attn_nn.LanguageModel(CONFIG, rngs=rngs),
        core_init=lambda key: init_language_model(key, CONFIG),
        core=functools.partial(language_model, config=CONFIG),
        args=(TGT,),
        dropout_kwargs={},
        real_init=False,
    ),
}
DROPOUT = [name for name, spec in SPECS.items() if spec.dropout_kwargs is not None]


def _pure(module) -> dict:
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def _randomise(module, seed: int):
    """Replaces every parameter with a random value (layer-norm scales near 1), in place."""
    state = nnx.state(module, nnx.Param)
    rng = np.random.default_rng(seed)

    def leaf(path, value):
        values = rng.normal(size=value.shape)
        values = 1.0 + 0.2 * values if jax.tree_util.keystr(path).endswith("['scale']") else 0.3 * values
        return jnp.asarray(values, value.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(leaf, nnx.to_pure_dict(state)))
    nnx.update(module, state)
    return module


@functools.cache
def _module(name: str):
    """The module with random parameters, built once per test session."""
    spec = SPECS[name]
    module = spec.make(_rbg_rngs(0)) if spec.real_init else nnx.eval_shape(lambda: spec.make(nnx.Rngs(0)))
    if not spec.real_init:  # eval_shape left the kept rngs abstract; real ones, as restoring a state would give
        module.rngs = nnx.Rngs(dropout=0)
    return _randomise(module, seed=list(SPECS).index(name))


def _shapes(tree):
    return jax.tree.map(lambda x: tuple(x.shape), tree)


# ---------------------------------------------------------------------------------------------------------
# Parameters are the core's tree
# ---------------------------------------------------------------------------------------------------------


def test_every_module_is_covered():
    assert set(SPECS) == set(attn_nn.__all__) - {"ParamTree"}


@pytest.mark.parametrize("name", list(SPECS))
def test_pure_dict_has_the_core_keys_and_shapes(name):
    spec = SPECS[name]
    expected = jax.eval_shape(spec.core_init, jax.random.key(0))
    pure = _pure(_module(name))
    assert jax.tree.structure(pure) == jax.tree.structure(expected)  # same nested key names
    assert _shapes(pure) == _shapes(expected)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(pure))


@pytest.mark.parametrize("name", [name for name, spec in SPECS.items() if spec.real_init])
def test_init_is_the_core_init_under_the_same_key(name):
    spec = SPECS[name]
    module = spec.make(_rbg_rngs(3))
    expected = spec.core_init(_rbg_rngs(3).params())
    assert_trees_allclose(_pure(module), expected, rtol=0.0, atol=0.0)


# ---------------------------------------------------------------------------------------------------------
# Calls, gradients, jit
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SPECS))
def test_call_equals_core_exactly(name):
    spec, module = SPECS[name], _module(name)
    out = module(*spec.args, **spec.kwargs)
    expected = spec.core(_pure(module), *spec.args, **spec.kwargs)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    assert np.abs(np.asarray(out)).max() > 0.0


def test_embedding_attend_and_unscaled_call_equal_core():
    module = _module("Embedding")
    np.testing.assert_array_equal(np.asarray(module.attend(X_Q)), np.asarray(shared_logits(_pure(module), X_Q)))
    np.testing.assert_array_equal(
        np.asarray(module(SRC, scale=False)), np.asarray(embed(_pure(module), SRC, scale=False))
    )


def test_multi_head_attention_passes_keyword_arguments_through():
    module = _module("MultiHeadAttention")
    out, weights = module(X_Q, X_KV, mask=ATTENTION_MASK, return_weights=True)
    expected, expected_weights = multi_head_attention(
        _pure(module), X_Q, X_KV, mask=ATTENTION_MASK, return_weights=True
    )
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(weights), np.asarray(expected_weights))


def _cotangent(name):
    spec = SPECS[name]
    shape = jax.eval_shape(lambda p: spec.core(p, *spec.args, **spec.kwargs), _pure(_module(name))).shape
    return _normal(10, shape)


@pytest.mark.parametrize("name", list(SPECS))
def test_nnx_grad_matches_jax_grad_of_core(name):
    spec, module = SPECS[name], _module(name)
    cotangent = _cotangent(name)

    def module_loss(m):
        return jnp.sum(m(*spec.args, **spec.kwargs) * cotangent)

    def core_loss(params):
        return jnp.sum(spec.core(params, *spec.args, **spec.kwargs) * cotangent)

    grads = nnx.grad(module_loss)(module)
    expected = jax.grad(core_loss)(_pure(module))
    assert_trees_allclose(nnx.to_pure_dict(grads), expected, rtol=SAME, atol=SAME)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(expected)) > 0.0


@pytest.mark.parametrize("name", list(SPECS))
def test_nnx_jit_call_matches_eager(name):
    spec, module = SPECS[name], _module(name)
    jitted = nnx.jit(lambda m, args, kwargs: m(*args, **kwargs))(module, spec.args, spec.kwargs)
    expected = spec.core(_pure(module), *spec.args, **spec.kwargs)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(expected), rtol=SAME, atol=SAME)


# ---------------------------------------------------------------------------------------------------------
# Dropout through rngs
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DROPOUT)
def test_dropout_rngs_change_the_output_like_the_core(name):
    spec, module = SPECS[name], _module(name)
    kwargs = spec.kwargs | spec.dropout_kwargs
    evaluation = np.asarray(module(*spec.args, **kwargs))  # no rngs: no dropout
    first = np.asarray(module(*spec.args, rngs=nnx.Rngs(dropout=1), **kwargs))
    again = np.asarray(module(*spec.args, rngs=nnx.Rngs(dropout=1), **kwargs))
    other = np.asarray(module(*spec.args, rngs=nnx.Rngs(dropout=2), **kwargs))
    assert np.abs(first - evaluation).max() > 1e-3
    assert np.abs(first - other).max() > 1e-3
    np.testing.assert_array_equal(first, again)
    # The module hands the core the next key of its "dropout" stream.
    expected = spec.core(_pure(module), *spec.args, dropout_rng=nnx.Rngs(dropout=1).dropout(), **kwargs)
    np.testing.assert_array_equal(first, np.asarray(expected))


# ---------------------------------------------------------------------------------------------------------
# Used as flax.nnx layers are: self-attention call, default biases, .train()/.eval(), decode mode
# ---------------------------------------------------------------------------------------------------------


def _flax_twin(module: attn_nn.MultiHeadAttention, *, decode: bool = False) -> nnx.MultiHeadAttention:
    """``flax.nnx.MultiHeadAttention`` with our module's weights (its kernels have our [D, N, H] layout)."""
    params = _pure(module)
    N_, H_ = params["w_q"].shape[1:]
    twin = nnx.MultiHeadAttention(N_, D, N_ * H_, D, decode=decode, rngs=nnx.Rngs(0))
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")):
        getattr(twin, theirs).kernel[...] = params[f"w_{ours}"]
        getattr(twin, theirs).bias[...] = params[f"b_{ours}"]
    return twin


def _default_attention(**kwargs) -> attn_nn.MultiHeadAttention:
    module = attn_nn.MultiHeadAttention(D, N, head_dim=H, rngs=nnx.Rngs(params=0, dropout=5), **kwargs)
    return _randomise(module, seed=40)


def test_biases_default_on_as_in_transformer_config():
    assert TransformerConfig(vocab_size=V).attention_bias
    assert {"b_q", "b_k", "b_v", "b_o"} <= set(_pure(attn_nn.MultiHeadAttention(D, N, head_dim=H, rngs=_rbg_rngs(0))))


def test_self_attention_with_inputs_k_omitted_matches_flax_nnx():
    module = _default_attention()
    np.testing.assert_array_equal(np.asarray(module(X_Q)), np.asarray(module(X_Q, X_Q, X_Q)))
    expected = _flax_twin(module)(X_Q)
    np.testing.assert_allclose(np.asarray(module(X_Q)), np.asarray(expected), rtol=SAME, atol=SAME)


def test_train_and_eval_switch_dropout_like_nnx_dropout():
    module = _default_attention(dropout_rate=0.4)
    evaluation = np.asarray(multi_head_attention(_pure(module), X_Q))
    module.train()
    first, second = np.asarray(module(X_Q)), np.asarray(module(X_Q))
    # Training mode draws from the dropout stream the module was built with, one key per call.
    stream = nnx.Rngs(dropout=5)
    expected = multi_head_attention(_pure(module), X_Q, dropout_rate=0.4, dropout_rng=stream.dropout())
    np.testing.assert_array_equal(first, np.asarray(expected))
    assert np.abs(first - second).max() > 1e-3 and np.abs(first - evaluation).max() > 1e-3
    module.eval()
    np.testing.assert_array_equal(np.asarray(module(X_Q, rngs=nnx.Rngs(dropout=1))), evaluation)
    np.testing.assert_array_equal(np.asarray(module(X_Q, deterministic=True)), evaluation)


def test_transformer_module_eval_and_train():
    module = _module("Transformer")
    evaluation = np.asarray(transformer(_pure(module), SRC, TGT, config=CONFIG))
    module.eval()
    np.testing.assert_array_equal(np.asarray(module(SRC, TGT, rngs=nnx.Rngs(dropout=1))), evaluation)
    trained = np.asarray(module(SRC, TGT, deterministic=False, rngs=nnx.Rngs(dropout=1)))
    assert np.abs(trained - evaluation).max() > 1e-3
    module.set_attributes(deterministic=None)  # back to the session's shared module's default


def test_decode_mode_matches_flax_nnx_decode_and_the_causal_call():
    module = _default_attention(decode=True)
    twin = _flax_twin(module, decode=True)
    module.init_cache((B, 8, D))
    twin.init_cache((B, 8, D))
    step = nnx.jit(lambda m, x: m(x))
    ours = [step(module, X_Q[:, t : t + 1]) for t in range(T)]
    theirs = [twin(X_Q[:, t : t + 1]) for t in range(T)]
    np.testing.assert_allclose(np.concatenate(ours, 1), np.concatenate(theirs, 1), rtol=SAME, atol=SAME)
    causal = module(X_Q, decode=False, causal=True)
    np.testing.assert_allclose(np.concatenate(ours, 1), np.asarray(causal), rtol=SAME, atol=SAME)
    assert int(module.cache["index"][...]) == T


def test_decode_mode_without_a_cache_is_a_clear_error():
    with pytest.raises(ValueError, match="init_cache"):
        _default_attention(decode=True)(X_Q)
