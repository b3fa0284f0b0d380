"""Weight converters (attn_jax.interop) against the real thing: PyTorch's ``torch.nn.Transformer`` and Flax Linen.

The torch side is PyTorch's own encoder-decoder (``TorchTransformer`` wraps the paper's embeddings, sinusoids and
tied logits around it, in torch); a padded batch must give the same logits and the same parameter gradients as
``attn_jax.transformer``: to 1e-10 in float64, 1e-5 in float32. Padded positions are compared only where they are
real (torch lets padded queries attend; what a padded position outputs is a convention, never read). Sizes: D=12,
N=3 (H=4, torch's D/N), F=17, V=19, 2 encoder and 2 decoder layers.
"""

import copy
import dataclasses

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import attn_jax as aj
from attn_jax import interop
from tests.helpers import assert_trees_allclose

V = 19
CONFIG = aj.TransformerConfig(
    vocab_size=V, d_model=12, num_heads=3, d_ff=17, num_encoder_layers=2, num_decoder_layers=2, max_len=16,
)  # fmt: skip
SRC = np.array([[3, 4, 5, 6, 7, 8, 9], [11, 2, 13, 4, 0, 0, 0]])
TGT = np.array([[1, 15, 6, 17, 8], [1, 12, 3, 0, 0]])
TGT_REAL = TGT != 0
COTANGENT = np.random.default_rng(0).normal(size=(2, 5, V)) * TGT_REAL[..., None]  # a loss on real positions


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def _random_params(config, seed, dtype):
    shapes = jax.eval_shape(lambda key: aj.init_transformer(key, config), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        values = rng.normal(size=shape.shape)
        values = 1.0 + 0.2 * values if jax.tree_util.keystr(path).endswith("['scale']") else 0.3 * values
        return jnp.asarray(values, dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _ours(params, config):
    """Our logits and the gradients of sum(logits * COTANGENT)."""

    def loss(p):
        logits = aj.transformer(p, jnp.asarray(SRC, jnp.int32), jnp.asarray(TGT, jnp.int32), config=config)
        return jnp.sum(logits * jnp.asarray(COTANGENT, logits.dtype)), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(logits), grads


def _torch(module, config):
    """torch's logits and its parameter gradients, mapped back to our tree by the same converter."""
    module = copy.deepcopy(module)
    dtype = next(module.parameters()).dtype
    logits = module(torch.as_tensor(SRC), torch.as_tensor(TGT))
    (logits * torch.as_tensor(COTANGENT, dtype=dtype)).sum().backward()
    for p in module.parameters():  # the conversion is linear: converting the gradients maps them onto our tree
        p.data = p.grad if p.grad is not None else torch.zeros_like(p)
    return logits.detach().numpy(), interop.from_torch(module, config)


VARIANTS = {
    "post_norm": {},
    "pre_norm_learned_untied": {"norm_first": True, "positions": "learned", "tie_output_embedding": False},
    "torch_default_final_norm_separate_tables": {"final_norm": True, "share_embeddings": False},
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_same_logits_and_gradients_as_torch_in_float64(name, x64):
    config = dataclasses.replace(CONFIG, dtype="float64", **VARIANTS[name])
    params = _random_params(config, seed=list(VARIANTS).index(name), dtype=jnp.float64)
    module = interop.to_torch(params, config)
    assert isinstance(module.transformer, torch.nn.Transformer)
    assert (module.transformer.encoder.norm is None) == (not config.has_final_norm)
    logits, grads = _ours(params, config)
    torch_logits, torch_grads = _torch(module, config)
    np.testing.assert_allclose(logits[TGT_REAL], torch_logits[TGT_REAL], rtol=1e-10, atol=1e-10)
    assert_trees_allclose(grads, torch_grads, rtol=1e-10, atol=1e-10)


def test_same_logits_and_gradients_as_torch_in_float32():
    params = _random_params(CONFIG, seed=7, dtype=jnp.float32)
    logits, grads = _ours(params, CONFIG)
    torch_logits, torch_grads = _torch(interop.to_torch(params, CONFIG), CONFIG)
    np.testing.assert_allclose(logits[TGT_REAL], torch_logits[TGT_REAL], rtol=1e-5, atol=1e-5)
    # Gradients reach |10| (the tied embedding sums every position's): 1e-5 of each leaf's largest entry.
    for (path, ours), theirs in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(torch_grads), strict=True
    ):
        scale = max(1.0, float(np.abs(theirs).max()))
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_round_trip_is_exact():
    params = _random_params(CONFIG, seed=8, dtype=jnp.float32)
    assert_trees_allclose(interop.from_torch(interop.to_torch(params, CONFIG), CONFIG), params, rtol=0, atol=0)


def test_a_torch_model_built_in_torch_converts():
    """A model made in PyTorch (torch's default init, its final norms kept) loads with final_norm=True."""
    config = dataclasses.replace(CONFIG, final_norm=True, layer_norm_epsilon=1e-5)
    torch.manual_seed(0)
    module = interop._torch_class()(config)
    for p in module.parameters():
        if p.dim() == 2 and p.shape[0] == V:
            torch.nn.init.normal_(p, std=0.3)
    module.eval()
    params = interop.from_torch(module, config)
    logits = np.asarray(jax.jit(aj.transformer)(params, jnp.asarray(SRC), jnp.asarray(TGT), config=config))
    expected = module(torch.as_tensor(SRC), torch.as_tensor(TGT)).detach().numpy()
    np.testing.assert_allclose(logits[TGT_REAL], expected[TGT_REAL], rtol=1e-5, atol=1e-5)
    with pytest.raises(aj.ConfigError, match=r"TransformerConfig\.final_norm=False"):
        interop.from_torch(module, dataclasses.replace(config, final_norm=None))
    with pytest.raises(aj.ConfigError, match=r"TransformerConfig\.layer_norm_epsilon"):
        interop.from_torch(module, dataclasses.replace(config, layer_norm_epsilon=1e-6))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"num_heads": 6, "num_kv_heads": 2}, "num_kv_heads"), ({"head_dim": 5}, "head_dim"),
     ({"attention_bias": False}, "attention_bias")],
)  # fmt: skip
def test_configs_torch_cannot_hold_are_refused_by_field(overrides, field):
    config = dataclasses.replace(CONFIG, **overrides)
    params = jax.eval_shape(lambda key: aj.init_transformer(key, config), jax.random.key(0))
    with pytest.raises(aj.ConfigError, match=rf"TransformerConfig\.{field}"):
        interop.to_torch(params, config)


def test_flax_linen_normalize_qk_is_refused_by_name():
    """Linen's qk-normalisation layers have no counterpart: dropping them silently changed the output."""
    module = linen.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, normalize_qk=True)
    variables = jax.eval_shape(module.init, jax.random.key(0), jnp.ones((1, 3, 8)))  # names are what matter
    with pytest.raises(ValueError, match=r"\['key_ln', 'query_ln'\]"):
        aj.from_flax_linen_attention(variables)


def test_flax_linen_converter_keeps_its_top_level_name():
    assert aj.from_flax_linen_attention is interop.from_flax_linen_attention
