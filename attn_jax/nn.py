"""Flax NNX modules over the pure functions: no maths of their own.

Each module's ``__init__`` calls the core ``init_*`` function and wraps every leaf in ``nnx.Param`` under the
core's own key names, so ``nnx.to_pure_dict(nnx.state(module, nnx.Param))`` is exactly the parameter tree the
core function takes (and what checkpoints save). Each ``__call__`` is one call into the core.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from attn_jax import multi_head_attention
  >>> layer = MultiHeadAttention(16, 4, rngs=nnx.Rngs(0))
  >>> x = jnp.ones((2, 5, 16))
  >>> bool(jnp.allclose(layer(x, x), multi_head_attention(layer.pure_params(), x, x)))
  True
"""

import jax
from flax import nnx

from attn_jax import layers
from attn_jax.attention import init_multi_head_attention, multi_head_attention
from attn_jax.blocks import decoder_block, encoder_block, init_decoder_block, init_encoder_block
from attn_jax.model_config import TransformerConfig
from attn_jax.model import init_language_model, init_transformer, language_model, transformer


class ParamTree(nnx.Module):
    """A module whose parameters are one core parameter tree, each leaf an ``nnx.Param``."""

    def __init__(self, params: dict):
        for name, subtree in params.items():
            setattr(self, name, nnx.data(jax.tree.map(nnx.Param, subtree)))

    def pure_params(self) -> dict:
        """The core parameter tree (plain arrays) this module holds."""
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))


def _dropout_rng(rngs: nnx.Rngs | None):
    """A fresh dropout key from ``rngs``; no ``rngs`` means evaluation (no dropout), as in the core."""
    return None if rngs is None else rngs.dropout()


class MultiHeadAttention(ParamTree):
    """``attn_jax.multi_head_attention`` with its ``w_q, w_k, w_v, w_o`` (+ biases) as parameters."""

    def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs, **init_kwargs):
        super().__init__(init_multi_head_attention(rngs.params(), d_model, num_heads, **init_kwargs))

    def __call__(self, inputs_q, inputs_kv, *, rngs: nnx.Rngs | None = None, **kwargs):
        return multi_head_attention(self.pure_params(), inputs_q, inputs_kv, dropout_rng=_dropout_rng(rngs), **kwargs)


class LayerNorm(ParamTree):
    """``attn_jax.layer_norm`` with ``scale`` and ``bias``."""

    def __init__(self, d_model: int, *, epsilon: float = 1e-6):
        super().__init__(layers.init_layer_norm(d_model))
        self.epsilon = epsilon

    def __call__(self, x):
        return layers.layer_norm(self.pure_params(), x, epsilon=self.epsilon)


class PositionWiseFFN(ParamTree):
    """``attn_jax.position_wise_ffn`` with ``w_1, b_1, w_2, b_2``."""

    def __init__(self, d_model: int, d_ff: int, *, rngs: nnx.Rngs):
        super().__init__(layers.init_position_wise_ffn(rngs.params(), d_model, d_ff))

    def __call__(self, x):
        return layers.position_wise_ffn(self.pure_params(), x)


class Embedding(ParamTree):
    """``attn_jax.embed`` (with the sqrt(d_model) scale) and ``attn_jax.shared_logits`` through one table."""

    def __init__(self, vocab_size: int, d_model: int, *, rngs: nnx.Rngs):
        super().__init__(layers.init_embedding(rngs.params(), vocab_size, d_model))

    def __call__(self, tokens, *, scale: bool = True):
        return layers.embed(self.pure_params(), tokens, scale=scale)

    def attend(self, x):
        """Pre-softmax logits ``x E^T`` through the same table."""
        return layers.shared_logits(self.pure_params(), x)


class EncoderBlock(ParamTree):
    """``attn_jax.encoder_block``."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        super().__init__(init_encoder_block(rngs.params(), config))
        self.config = config

    def __call__(self, x, *, mask=None, rngs: nnx.Rngs | None = None, **kwargs):
        return encoder_block(
            self.pure_params(), x, mask=mask, config=self.config, dropout_rng=_dropout_rng(rngs), **kwargs
        )


class DecoderBlock(ParamTree):
    """``attn_jax.decoder_block``."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        super().__init__(init_decoder_block(rngs.params(), config))
        self.config = config

    def __call__(self, y, memory, *, self_mask, cross_mask=None, rngs: nnx.Rngs | None = None, **kwargs):
        return decoder_block(
            self.pure_params(), y, memory, self_mask=self_mask, cross_mask=cross_mask, config=self.config,
            dropout_rng=_dropout_rng(rngs), **kwargs,
        )  # fmt: skip


class Transformer(ParamTree):
    """``attn_jax.model.transformer``: the encoder-decoder model, parameters as ``init_transformer`` lays them out."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        super().__init__(init_transformer(rngs.params(), config))
        self.config = config

    def __call__(self, src_tokens, tgt_tokens, *, rngs: nnx.Rngs | None = None, **kwargs):
        return transformer(
            self.pure_params(), src_tokens, tgt_tokens, config=self.config, dropout_rng=_dropout_rng(rngs), **kwargs
        )


class LanguageModel(ParamTree):
    """``attn_jax.language_model``: the decoder-only model."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        super().__init__(init_language_model(rngs.params(), config))
        self.config = config

    def __call__(self, tokens, *, rngs: nnx.Rngs | None = None, **kwargs):
        return language_model(self.pure_params(), tokens, config=self.config, dropout_rng=_dropout_rng(rngs), **kwargs)


__all__ = [
    "ParamTree",
    "MultiHeadAttention",
    "LayerNorm",
    "PositionWiseFFN",
    "Embedding",
    "EncoderBlock",
    "DecoderBlock",
    "Transformer",
    "LanguageModel",
]
