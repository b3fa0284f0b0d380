"""The pure functions used the way JAX users use ``jax.nn.dot_product_attention`` or ``flax.nnx`` (issue 12).

Each test is written as a user writes code: ``jax.jit`` with the config as an ordinary argument, ``jax.vmap``
over unbatched examples, forward-mode autodiff, float64, masks by name, embeddings instead of ids. The
references are independent: NumPy float64 (tests/reference_numpy.py and the formulas below), ``jax.nn``,
``flax.nnx.MultiHeadAttention`` with the same weights, finite differences and ``jax.test_util.check_grads`` in
both modes. Sizes: T=5, S=7 (3 for the Jacobians), N=3 heads of H=11 (1 key/value head where stated), D=13,
F=17, V=19. The README's "Using the functions" example is run at the end.
"""

import dataclasses
import functools
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import attn_jax as aj
from tests import reference_numpy as ref

B, T, S, N, H, D, F, V = 2, 5, 7, 3, 11, 13, 17, 19
SAME = 1e-5
CONFIG = aj.TransformerConfig(
    vocab_size=V, d_model=D, num_heads=N, head_dim=H, d_ff=F, num_encoder_layers=1, num_decoder_layers=2,
    max_len=16,
)  # fmt: skip
SRC = jnp.array([[3, 4, 5, 6, 7, 8, 9], [11, 2, 13, 4, 0, 0, 0]], jnp.int32)
TGT = jnp.array([[1, 15, 6, 17, 8], [1, 12, 3, 0, 0]], jnp.int32)
TGT_REAL = np.asarray(TGT) != 0


def _normal(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _random_params(init, config, seed, dtype=jnp.float32):
    shapes = jax.eval_shape(lambda key: init(key, config), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        values = rng.normal(size=shape.shape)
        values = 1.0 + 0.2 * values if jax.tree_util.keystr(path).endswith("['scale']") else 0.3 * values
        return jnp.asarray(values, dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


@functools.cache
def _params():
    return _random_params(aj.init_transformer, CONFIG, seed=0)


@pytest.fixture
def x64():
    """64-bit JAX for the test (float64 arrays really are float64), restored afterwards."""
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def _softmax_attention_reference(q, k, v, *, bias=None, allowed=None, scale=None):
    """softmax(q k^T * scale + bias) v in float64 NumPy, per head; rows with nothing allowed are zeros.

    q ``[T, N, H]``, k and v ``[S, N, H]`` (heads already matched), bias and allowed ``[N, T, S]``.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = np.einsum("tnh,snh->nts", q, k) * scale + (0.0 if bias is None else np.asarray(bias, np.float64))
    allowed = np.ones(logits.shape, bool) if allowed is None else np.broadcast_to(np.asarray(allowed), logits.shape)
    logits = np.where(allowed, logits, -np.inf)
    top = np.where(allowed.any(-1, keepdims=True), logits.max(-1, keepdims=True), 0.0)
    e = np.where(allowed, np.exp(logits - top), 0.0)
    w = np.divide(e, e.sum(-1, keepdims=True), out=np.zeros_like(e), where=e.sum(-1, keepdims=True) > 0)
    return np.einsum("nts,snh->tnh", w, v)


# ---------------------------------------------------------------------------------------------------------
# The config is a static pytree: jit, vmap, grad and tree utilities take it as an ordinary argument
# ---------------------------------------------------------------------------------------------------------


def test_jit_of_transformer_takes_the_config_as_a_keyword_argument():
    params = _params()
    jitted = jax.jit(aj.transformer)(params, SRC, TGT, config=CONFIG)
    expected, _ = ref.transformer(params, SRC, TGT, CONFIG)
    np.testing.assert_allclose(np.asarray(jitted)[TGT_REAL], expected[TGT_REAL], rtol=1e-4, atol=1e-4)
    # A changed config is a different static value: recompiled, not reused.
    unscaled = dataclasses.replace(CONFIG, scale_embeddings=False)
    other = jax.jit(aj.transformer)(params, SRC, TGT, config=unscaled)
    assert np.abs(np.asarray(other) - np.asarray(jitted)).max() > 1e-3


def test_config_has_no_leaves_and_survives_tree_utilities():
    assert jax.tree.leaves(CONFIG) == []
    assert jax.tree.map(lambda x: x + 1, CONFIG) == CONFIG
    leaves, treedef = jax.tree.flatten({"params": _params(), "config": CONFIG})
    assert jax.tree.unflatten(treedef, leaves)["config"] is CONFIG
    hash(treedef)  # jit caches on it


def test_filter_jit_style_partition_keeps_the_config_static():
    """``eqx.filter_jit`` splits arguments into arrays (traced) and the rest (static, hashed): emulated here."""

    def filter_jit(fn):
        @functools.cache
        def compiled(treedef, static):
            def run(arrays):
                it = iter(arrays)
                leaves = [next(it) if s is None else s for s in static]
                args, kwargs = jax.tree.unflatten(treedef, leaves)
                return fn(*args, **kwargs)

            return jax.jit(run)

        def call(*args, **kwargs):
            leaves, treedef = jax.tree.flatten((args, kwargs))
            arrays = [x for x in leaves if isinstance(x, jax.Array)]
            static = tuple(None if isinstance(x, jax.Array) else x for x in leaves)
            return compiled(treedef, static)(arrays)

        return call

    out = filter_jit(aj.transformer)(_params(), SRC, TGT, config=CONFIG)
    expected = jax.jit(aj.transformer)(_params(), SRC, TGT, config=CONFIG)  # compiled once, in the test above
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_vmap_and_grad_take_the_config_as_an_argument():
    params = _params()
    stacked_src, stacked_tgt = jnp.stack([SRC, SRC[::-1]]), jnp.stack([TGT, TGT[::-1]])  # [E, B, S], [E, B, T]
    mapped = jax.jit(jax.vmap(aj.transformer, in_axes=(None, 0, 0)))(params, stacked_src, stacked_tgt, config=CONFIG)
    expected = jax.jit(aj.transformer)(params, SRC[::-1], TGT[::-1], config=CONFIG)
    np.testing.assert_allclose(np.asarray(mapped[1]), np.asarray(expected), rtol=1e-5, atol=1e-5)

    def loss(p, config):
        return jnp.sum(aj.transformer(p, SRC, TGT, config=config) ** 2)

    grads, config_grad = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, CONFIG)
    assert config_grad == CONFIG  # nothing to differentiate in it
    assert float(jnp.abs(grads["decoder"]["layers"]["ffn"]["w_1"]).max()) > 0.0


def _traced_static_calls():
    q = jnp.ones((B, T, N, H))
    p = aj.init_multi_head_attention(jax.random.key(0), D, N, head_dim=H)
    x = jnp.ones((B, T, D))
    return {
        "causal": lambda: jax.jit(aj.scaled_dot_product_attention)(q, q, q, causal=True),
        "dropout_rate": lambda: jax.jit(aj.multi_head_attention)(p, x, dropout_rate=0.1, dropout_rng=jax.random.key(1)),
        "return_weights": lambda: jax.jit(aj.multi_head_attention)(p, x, return_weights=True),
        "rate": lambda: jax.jit(aj.dropout)(x, 0.5, jax.random.key(0)),
    }


@pytest.mark.parametrize("name", list(_traced_static_calls()))
def test_a_traced_static_argument_is_a_clear_error(name, without_runtime_typechecks):
    with pytest.raises(TypeError, match=f"`{name}` must be a static Python value.*static_argnames"):
        _traced_static_calls()[name]()


def test_traced_return_weights_of_the_model_is_a_clear_error(without_runtime_typechecks):
    with pytest.raises(TypeError, match="`return_weights` must be a static"):
        jax.jit(aj.transformer)(_params(), SRC, TGT, config=CONFIG, return_weights=True)


def test_a_traced_scale_is_accepted():
    q, k, v = _normal(1, (B, T, N, H)), _normal(2, (B, S, 1, H)), _normal(3, (B, S, 1, H))
    for implementation in ("xla", "chunked"):
        traced = jax.jit(
            lambda s, i=implementation: aj.scaled_dot_product_attention(q, k, v, scale=s, implementation=i)
        )
        expected = aj.scaled_dot_product_attention(q, k, v, scale=0.3, implementation=implementation)
        np.testing.assert_allclose(np.asarray(traced(0.3)), np.asarray(expected), rtol=SAME, atol=SAME)


# ---------------------------------------------------------------------------------------------------------
# Forward-mode autodiff through the model (float64, against finite differences)
# ---------------------------------------------------------------------------------------------------------


def _jax(tree):
    """check_grads perturbs with NumPy arrays; the jaxtyping checks under pytest want jax.Arrays."""
    return jax.tree.map(jnp.asarray, tree)


def _small_config(**overrides):
    fields = {"d_model": 8, "num_heads": 2, "head_dim": None, "d_ff": 8, "num_encoder_layers": 1}
    return dataclasses.replace(CONFIG, **fields, num_decoder_layers=1, dtype="float64", **overrides)


def test_jvp_and_linearize_of_transformer_match_finite_differences(x64):
    config = _small_config()
    params = _random_params(aj.init_transformer, config, seed=1, dtype=jnp.float64)
    tangent = _random_params(aj.init_transformer, config, seed=2, dtype=jnp.float64)

    @jax.jit
    def f(p):
        return aj.transformer(p, SRC[:, :3], TGT[:, :4], config=config)

    primal, jvp = jax.jit(lambda p, t: jax.jvp(f, (p,), (t,)))(params, tangent)
    eps = 1e-6
    shifted = [f(jax.tree.map(lambda p, t, s=sign: p + s * eps * t, params, tangent)) for sign in (1.0, -1.0)]
    finite = (np.asarray(shifted[0]) - np.asarray(shifted[1])) / (2 * eps)
    assert jvp.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(jvp), finite, rtol=1e-6, atol=1e-8)
    linear_primal, f_jvp = jax.linearize(f, params)
    np.testing.assert_allclose(np.asarray(linear_primal), np.asarray(primal), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(f_jvp(tangent)), np.asarray(jvp), rtol=1e-10, atol=1e-12)


def test_check_grads_of_transformer_in_both_modes(x64):
    config = _small_config()
    params = _random_params(aj.init_transformer, config, seed=3, dtype=jnp.float64)
    f = jax.jit(lambda p: aj.transformer(p, SRC[:, :3], TGT[:, :3], config=config))
    check_grads(lambda p: f(_jax(p)), (params,), order=1, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)


def test_jacfwd_equals_jacrev_and_hessian_matches_finite_differences_of_the_gradient(x64):
    config = _small_config()
    params = _random_params(aj.init_language_model, config, seed=5, dtype=jnp.float64)
    tokens = TGT[:1, :3]
    embeddings = aj.embed(params["embedding"], tokens, dtype=jnp.float64)  # [1, 3, 8]

    def logits(x):  # embeddings in, logits out: the LM's Jacobian
        return aj.language_model(params, x, config=config)

    np.testing.assert_allclose(
        np.asarray(jax.jacfwd(logits)(embeddings)), np.asarray(jax.jacrev(logits)(embeddings)), rtol=1e-9, atol=1e-11
    )

    def loss(scale):  # a scalar of the decoder's last layer-norm scale [8]
        p = jax.tree.map(lambda x: x, params)
        p["decoder"]["layers"]["ffn_norm"]["scale"] = scale[None]
        return aj.cross_entropy_sums(aj.language_model(p, tokens, config=config), tokens)["loss"]

    scale = params["decoder"]["layers"]["ffn_norm"]["scale"][0]
    hessian = np.asarray(jax.hessian(loss)(scale))
    eps, grad = 1e-6, jax.jit(jax.grad(loss))
    finite = np.stack([(grad(scale + eps * e) - grad(scale - eps * e)) / (2 * eps) for e in np.eye(8)])
    np.testing.assert_allclose(hessian, finite, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(hessian, hessian.T, rtol=1e-10, atol=1e-12)


def test_forward_mode_through_chunked_attention_is_refused_as_documented():
    """``chunked`` keeps its FlashAttention backward (a custom_vjp): jvp is refused with JAX's error; the default
    (``xla`` at this size) gives the same values and supports both modes."""
    q, k, v = _normal(4, (1, T, N, H)), _normal(5, (1, S, N, H)), _normal(6, (1, S, N, H))
    with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
        jax.jvp(lambda q: aj.scaled_dot_product_attention(q, k, v, implementation="chunked"), (q,), (q,))
    out, tangent = jax.jvp(lambda q: aj.scaled_dot_product_attention(q, k, v), (q,), (q,))
    chunked = aj.scaled_dot_product_attention(q, k, v, implementation="chunked")
    np.testing.assert_allclose(np.asarray(out), np.asarray(chunked), rtol=SAME, atol=SAME)
    assert float(jnp.abs(tangent).max()) > 0.0


# ---------------------------------------------------------------------------------------------------------
# Unbatched inputs and any leading batch axes
# ---------------------------------------------------------------------------------------------------------


def test_unbatched_attention_matches_jax_nn():
    q, k, v = _normal(7, (T, N, H)), _normal(8, (S, N, H)), _normal(9, (S, N, H))
    bias = _normal(10, (N, T, S))
    mask = jnp.asarray(np.random.default_rng(11).random((1, T, S)) < 0.7).at[:, :, 0].set(True)
    ours = aj.scaled_dot_product_attention(q, k, v, bias=bias, mask=mask)
    expected = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), rtol=SAME, atol=SAME)


def test_two_leading_batch_axes_equal_a_loop_over_them():
    q, k, v = _normal(12, (2, 3, T, N, H)), _normal(13, (2, 3, S, 1, H)), _normal(14, (2, 3, S, 1, H))
    mask = jnp.asarray(np.random.default_rng(15).random((2, 1, 1, T, S)) < 0.7)  # broadcast over the 2nd axis
    out = aj.scaled_dot_product_attention(q, k, v, mask=mask, causal=True)
    assert out.shape == (2, 3, T, N, H)
    for i in range(2):
        for j in range(3):
            allowed = np.asarray(mask[i, 0]) & np.tril(np.ones((T, S), bool))
            kv = (np.repeat(np.asarray(x[i, j]), N, axis=1) for x in (k, v))
            expected = _softmax_attention_reference(q[i, j], *kv, allowed=allowed)
            np.testing.assert_allclose(np.asarray(out[i, j]), expected, rtol=1e-5, atol=1e-6)


def _nnx_twin(params, *, use_bias: bool):
    """``flax.nnx.MultiHeadAttention`` holding our weights (its kernels have our [D, N, H] / [N, H, D] layout)."""
    layer = nnx.MultiHeadAttention(N, D, N * H, D, use_bias=use_bias, decode=False, rngs=nnx.Rngs(0))
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")):
        getattr(layer, theirs).kernel[...] = params[f"w_{ours}"]
        if use_bias:
            getattr(layer, theirs).bias[...] = params[f"b_{ours}"]
    return layer


def test_vmap_of_multi_head_attention_over_unbatched_examples_matches_flax_nnx():
    params = _random_params(
        lambda r, _: aj.init_multi_head_attention(r, D, N, head_dim=H, use_bias=True), None, seed=16
    )
    x = _normal(17, (4, T, D))  # four [T, D] examples
    mask = jnp.asarray(np.random.default_rng(18).random((4, 1, T, T)) < 0.7).at[..., 0].set(True)
    mapped = jax.vmap(lambda x, m: aj.multi_head_attention(params, x, mask=m))(x, mask)
    expected = _nnx_twin(params, use_bias=True)(x, mask=mask)
    np.testing.assert_allclose(np.asarray(mapped), np.asarray(expected), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# float64
# ---------------------------------------------------------------------------------------------------------


def test_float64_attention_is_accurate_to_1e12(x64):
    q, k, v = (_normal(seed, shape, jnp.float64) for seed, shape in ((19, (T, N, H)), (20, (S, N, H)), (21, (S, N, H))))
    bias = _normal(22, (N, T, S), jnp.float64)
    for implementation in ("xla", "chunked"):
        out = aj.scaled_dot_product_attention(q, k, v, bias=bias, causal=True, implementation=implementation)
        assert out.dtype == jnp.float64
        expected = _softmax_attention_reference(q, k, v, bias=bias, allowed=np.tril(np.ones((T, S), bool)))
        np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-12, atol=1e-12)
    _, weights = aj.scaled_dot_product_attention(q, k, v, return_weights=True)
    assert weights.dtype == jnp.float64


def test_float64_layer_norm_and_sinusoids_are_accurate_to_1e12(x64):
    x = _normal(23, (3, D), jnp.float64) * 1e3 + 7.0
    norm = {"scale": _normal(24, (D,), jnp.float64), "bias": _normal(25, (D,), jnp.float64)}
    out = aj.layer_norm(norm, x, epsilon=1e-6)
    expected = ref.layer_norm(np.asarray(x), np.asarray(norm["scale"]), np.asarray(norm["bias"]), 1e-6)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-12, atol=1e-12)
    table = aj.sinusoidal_positions(300, D, dtype=jnp.float64)
    np.testing.assert_allclose(np.asarray(table), ref.sinusoid(300, D), rtol=1e-12, atol=1e-12)


def test_float64_transformer_matches_the_numpy_reference_to_1e10(x64):
    config = dataclasses.replace(CONFIG, dtype="float64")
    params = _random_params(aj.init_transformer, config, seed=26, dtype=jnp.float64)
    logits = jax.jit(aj.transformer)(params, SRC, TGT, config=config)
    assert logits.dtype == jnp.float64
    expected, _ = ref.transformer(params, SRC, TGT, config)
    np.testing.assert_allclose(np.asarray(logits)[TGT_REAL], expected[TGT_REAL], rtol=1e-10, atol=1e-10)


def test_check_grads_on_multi_head_attention_in_both_modes(x64):
    params = _random_params(
        lambda r, _: aj.init_multi_head_attention(r, D, N, head_dim=H, num_kv_heads=1, use_bias=True),
        None, seed=27, dtype=jnp.float64,
    )  # fmt: skip
    x_q, x_kv = _normal(28, (B, 3, D), jnp.float64), _normal(29, (B, 4, D), jnp.float64)
    key_mask = jnp.array([[True, True, True, True], [True, True, False, False]])
    f = jax.jit(lambda p, q, kv: aj.multi_head_attention(p, q, kv, key_mask=key_mask, causal=True))
    check_grads(lambda p, q, kv: f(_jax(p), _jax(q), _jax(kv)), (params, x_q, x_kv), order=2, modes=("fwd", "rev"))


def test_float64_config_needs_x64():
    with pytest.raises(aj.ConfigError, match="TransformerConfig.dtype: 'float64' needs 64-bit JAX"):
        dataclasses.replace(CONFIG, dtype="float64")


# ---------------------------------------------------------------------------------------------------------
# multi_head_attention: bias, scale, separate keys and values, lengths; masks by name
# ---------------------------------------------------------------------------------------------------------


def _attention_params(seed, **kwargs):
    return _random_params(lambda r, _: aj.init_multi_head_attention(r, D, N, head_dim=H, **kwargs), None, seed)


def test_separate_key_and_value_inputs_match_flax_nnx():
    params = _attention_params(30, use_bias=True)
    x_q, x_k, x_v = _normal(31, (B, T, D)), _normal(32, (B, S, D)), _normal(33, (B, S, D))
    ours = aj.multi_head_attention(params, x_q, x_k, x_v)
    expected = _nnx_twin(params, use_bias=True)(x_q, x_k, x_v)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), rtol=1e-5, atol=1e-5)
    # Self-attention when inputs_k is omitted, as in flax.
    np.testing.assert_array_equal(np.asarray(aj.multi_head_attention(params, x_q)),
                                  np.asarray(aj.multi_head_attention(params, x_q, x_q, x_q)))  # fmt: skip


def test_bias_scale_and_key_mask_match_the_float64_formula():
    params = _attention_params(34)
    x_q, x_kv = _normal(35, (B, T, D)), _normal(36, (B, S, D))
    bias = _normal(37, (B, N, T, S))
    key_mask = jnp.asarray(np.asarray(SRC) != 0)
    out = aj.multi_head_attention(params, x_q, x_kv, bias=bias, scale=0.2, key_mask=key_mask)
    p = {name: np.asarray(w, np.float64) for name, w in params.items()}
    for b in range(B):
        q = np.einsum("td,dnh->tnh", np.asarray(x_q[b], np.float64), p["w_q"])
        k = np.einsum("sd,dnh->snh", np.asarray(x_kv[b], np.float64), p["w_k"])
        v = np.einsum("sd,dnh->snh", np.asarray(x_kv[b], np.float64), p["w_v"])
        heads = _softmax_attention_reference(q, k, v, bias=bias[b], allowed=np.asarray(key_mask[b]), scale=0.2)
        expected = np.einsum("tnh,nhd->td", heads, p["w_o"])
        np.testing.assert_allclose(np.asarray(out[b]), expected, rtol=1e-4, atol=1e-5)


def test_sequence_lengths_match_jax_nn():
    q, k, v = _normal(38, (B, T, N, H)), _normal(39, (B, S, N, H)), _normal(40, (B, S, N, H))
    q_len, kv_len = jnp.array([T, 3], jnp.int32), jnp.array([S, 4], jnp.int32)
    ours = aj.scaled_dot_product_attention(q, k, v, query_seq_lengths=q_len, key_value_seq_lengths=kv_len)
    expected = jax.nn.dot_product_attention(q, k, v, query_seq_lengths=q_len, key_value_seq_lengths=kv_len)
    real = np.arange(T)[None, :] < np.asarray(q_len)[:, None]  # jax.nn leaves padded query rows unspecified
    np.testing.assert_allclose(np.asarray(ours)[real], np.asarray(expected)[real], rtol=SAME, atol=SAME)
    np.testing.assert_array_equal(np.asarray(ours)[~real], 0.0)  # ours: zeros for queries that attend to nothing


def test_key_padding_mask_by_name_when_batch_equals_query_length():
    """B == T: a [B, S] padding mask passed as ``mask`` used to broadcast as [T, S] silently. Now it is refused,
    and ``key_mask=[B, S]`` gives jax.nn's result for the explicit [B, 1, 1, S] mask."""
    q, k, v = _normal(41, (T, T, N, H)), _normal(42, (T, S, N, H)), _normal(43, (T, S, N, H))
    padding = jnp.asarray(np.arange(S)[None, :] < np.array([7, 6, 5, 4, 3])[:, None])  # [B=5, S]
    with pytest.raises(ValueError, match="ambiguous"):
        aj.scaled_dot_product_attention(q, k, v, mask=padding)
    ours = aj.scaled_dot_product_attention(q, k, v, key_mask=padding)
    expected = jax.nn.dot_product_attention(q, k, v, mask=padding[:, None, None, :])
    np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), rtol=SAME, atol=SAME)


# ---------------------------------------------------------------------------------------------------------
# The model with embeddings and masks of the caller's own
# ---------------------------------------------------------------------------------------------------------


def test_embeddings_with_token_masks_equal_token_ids():
    params = _params()
    table = params["embedding"]
    src_embeddings, tgt_embeddings = (aj.embed(table, x) for x in (SRC, TGT))  # x sqrt(D), as the model does
    from_ids = aj.transformer(params, SRC, TGT, config=CONFIG)
    from_embeddings = aj.transformer(
        params, src_embeddings, tgt_embeddings, config=CONFIG, src_mask=SRC != 0, tgt_mask=TGT != 0
    )
    np.testing.assert_allclose(np.asarray(from_embeddings), np.asarray(from_ids), rtol=SAME, atol=SAME)


def test_masks_of_the_callers_own_hide_a_source_token():
    """Encoder and cross-attention masks that exclude source position 2 make the logits independent of it."""
    params = _params()
    hide = jnp.ones((1, 1, 1, S), jnp.bool_).at[..., 2].set(False)  # key 2 may not be attended
    changed = SRC.at[:, 2].set(SRC[:, 2] % (V - 1) + 1)

    def run(src, **masks):
        return np.asarray(jax.jit(aj.transformer)(params, src, TGT, config=CONFIG, **masks))

    masks = {"encoder_attention_mask": hide, "cross_attention_mask": hide}
    np.testing.assert_allclose(run(changed, **masks)[TGT_REAL], run(SRC, **masks)[TGT_REAL], rtol=SAME, atol=SAME)
    assert np.abs(run(changed) - run(SRC))[TGT_REAL].max() > 1e-3  # without the masks, token 2 matters


# ---------------------------------------------------------------------------------------------------------
# Public API: loss, schedule, optimizer and train step at the top level; README example
# ---------------------------------------------------------------------------------------------------------


def test_training_pieces_are_top_level_names():
    assert callable(aj.transformer) and not hasattr(aj.transformer, "__path__")  # the function, not a module
    small = {"d_model": 8, "num_heads": 2, "head_dim": None, "d_ff": 8, "num_decoder_layers": 1, "scan_layers": False}
    config = dataclasses.replace(CONFIG, **small)
    params = _random_params(aj.init_transformer, config, seed=9)
    tx = aj.make_optimizer(aj.rsqrt_warmup_schedule(config.d_model, 10))
    state = aj.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    batch = {"inputs": SRC, "targets_in": TGT, "targets_out": jnp.roll(TGT, -1, axis=1)}
    new_state, metrics = jax.jit(functools.partial(aj.train_step, model_config=config, tx=tx))(
        state, batch, jax.random.key(0)
    )
    assert int(new_state.step) == 1 and float(metrics["finite"]) == 1.0
    assert float(metrics["weight"]) == float(jnp.sum(batch["targets_out"] != 0))  # cross_entropy_sums' count
    for name in ("cross_entropy_sums", "rsqrt_warmup_schedule", "make_optimizer", "train_step", "TrainState"):
        assert name in aj.__all__ and getattr(aj, name) is not None


def _readme_section(title: str) -> str:
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_readme_using_the_functions_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", _readme_section("Using the functions"), flags=re.DOTALL)
    assert blocks, "the section has no python example"
    for block in blocks:
        exec(compile(block, "README.md (Using the functions)", "exec"), {})  # asserts inside the example


def test_no_top_level_name_shadows_a_module_of_the_package():
    """``import attn_jax.model`` and ``from attn_jax import rnnsearch`` must give modules, not functions."""
    import importlib
    import pkgutil

    import attn_jax

    for info in pkgutil.iter_modules(attn_jax.__path__):
        if info.name.startswith("_"):  # __main__ runs the command line when imported
            continue
        module = importlib.import_module(f"attn_jax.{info.name}")
        assert getattr(attn_jax, info.name) is module, info.name
