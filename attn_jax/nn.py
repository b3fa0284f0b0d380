"""Flax NNX modules over the pure functions: no maths of their own.

Each module's ``__init__`` calls the core ``init_*`` function and wraps every leaf in ``nnx.Param`` under the
core's own key names, so ``nnx.to_pure_dict(nnx.state(module, nnx.Param))`` is exactly the parameter tree the
core function takes (and what checkpoints save). Each ``__call__`` is one call into the core. Modules with
dropout honour ``.train()`` / ``.eval()`` (a ``deterministic`` attribute, as ``nnx.Dropout``) and keep the
``rngs`` they were built with for training mode; ``MultiHeadAttention`` also decodes on a key/value cache.

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
import jax.numpy as jnp
from flax import nnx

from attn_jax import layers
from attn_jax.attention import (
    init_attention_cache,
    init_multi_head_attention,
    multi_head_attention,
    self_attention_step,
)
from attn_jax.blocks import decoder_block, encoder_block, init_decoder_block, init_encoder_block
from attn_jax.model import init_language_model, init_transformer, language_model, transformer
from attn_jax.model_config import TransformerConfig


class ParamTree(nnx.Module):
    """A module whose parameters are one core parameter tree, each leaf an ``nnx.Param``."""

    def __init__(self, params: dict):
        for name, subtree in params.items():
            setattr(self, name, nnx.data(jax.tree.map(nnx.Param, subtree)))

    def pure_params(self) -> dict:
        """The core parameter tree (plain arrays) this module holds."""
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))


class _Dropout:
    """Dropout switching as ``nnx.Dropout`` does it, for modules whose core function takes a ``dropout_rng``.

    ``deterministic`` (set by ``module.eval()`` / ``module.train()``, or per call) decides: True, no dropout;
    False, dropout with the call's ``rngs`` or else the ``rngs`` the module was built with. Left at None (never
    set), the core's convention holds: dropout exactly when the call passes ``rngs``.
    """

    def _dropout_rng(self, rngs: nnx.Rngs | None, deterministic: bool | None):
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic:
            return None
        if rngs is not None:
            return rngs.dropout()
        if deterministic is None:
            return None
        if self.rngs is None:
            raise ValueError(f"{type(self).__name__} is in training mode but has no rngs: pass rngs= to the call")
        return self.rngs.dropout()


class MultiHeadAttention(ParamTree, _Dropout):
    """``attn_jax.multi_head_attention`` with its ``w_q, w_k, w_v, w_o`` (+ biases) as parameters.

    Called like ``flax.nnx.MultiHeadAttention``: ``layer(x)`` is self-attention, ``layer(q, k)`` reads keys and
    values from ``k``, ``layer(q, k, v)`` from separate inputs. Biases default to on, as
    ``TransformerConfig.attention_bias``. With ``decode=True`` (here or per call) each call is causal
    self-attention over the next positions, on the key/value cache made by ``init_cache``.

    Example:
      >>> layer = MultiHeadAttention(8, 2, rngs=nnx.Rngs(0), dropout_rate=0.1)
      >>> layer.eval()  # deterministic: no dropout
      >>> layer(jnp.ones((3, 5, 8))).shape
      (3, 5, 8)
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        rngs: nnx.Rngs,
        head_dim: int | None = None,
        num_kv_heads: int | None = None,
        use_bias: bool = True,
        dropout_rate: float = 0.0,
        deterministic: bool | None = None,
        decode: bool = False,
        implementation: str | None = None,
        dtype=jnp.float32,
    ):
        super().__init__(
            init_multi_head_attention(
                rngs.params(),
                d_model,
                num_heads,
                head_dim=head_dim,
                num_kv_heads=num_kv_heads,
                use_bias=use_bias,
                dtype=dtype,
            )  # fmt: skip
        )
        self.dropout_rate = dropout_rate
        self.deterministic = deterministic
        self.decode = decode
        self.implementation = implementation
        self.rngs = rngs
        self.cache = None

    def init_cache(self, input_shape: tuple[int, ...], dtype=jnp.float32) -> None:
        """An empty key/value cache for decoding, ``input_shape = (*B, max_len, D)`` (as flax's ``init_cache``)."""
        cache = init_attention_cache(self.pure_params(), tuple(input_shape[:-2]), input_shape[-2], dtype=dtype)
        self.cache = nnx.data(jax.tree.map(nnx.Cache, cache))

    def __call__(
        self,
        inputs_q,
        inputs_k=None,
        inputs_v=None,
        *,
        rngs: nnx.Rngs | None = None,
        deterministic: bool | None = None,
        decode: bool | None = None,
        dropout_rate: float | None = None,
        **kwargs,
    ):
        rate = self.dropout_rate if dropout_rate is None else dropout_rate
        dropout_rng = self._dropout_rng(rngs, deterministic) if rate > 0.0 else None
        kwargs.setdefault("implementation", self.implementation)
        if not (self.decode if decode is None else decode):
            return multi_head_attention(
                self.pure_params(), inputs_q, inputs_k, inputs_v, dropout_rate=rate, dropout_rng=dropout_rng,
                **kwargs,
            )  # fmt: skip
        if inputs_k is not None or inputs_v is not None or self.cache is None:
            raise ValueError("decode mode is cached self-attention: call init_cache first and pass inputs_q only")
        cache = jax.tree.map(lambda v: v[...], self.cache, is_leaf=lambda x: isinstance(x, nnx.Variable))
        out, cache = self_attention_step(
            self.pure_params(), cache, inputs_q, dropout_rate=rate, dropout_rng=dropout_rng, **kwargs
        )
        self.cache = nnx.data(jax.tree.map(nnx.Cache, cache))
        return out


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


class _ConfigModule(ParamTree, _Dropout):
    """A module built from a ``TransformerConfig`` whose dropout follows ``.train()`` / ``.eval()``."""

    def __init__(self, params: dict, config: TransformerConfig, rngs: nnx.Rngs, deterministic: bool | None):
        super().__init__(params)
        self.config = config
        self.deterministic = deterministic
        self.rngs = rngs


class EncoderBlock(_ConfigModule):
    """``attn_jax.encoder_block``."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs, deterministic: bool | None = None):
        super().__init__(init_encoder_block(rngs.params(), config), config, rngs, deterministic)

    def __call__(self, x, *, mask=None, rngs: nnx.Rngs | None = None, deterministic: bool | None = None, **kwargs):
        return encoder_block(
            self.pure_params(), x, mask=mask, config=self.config,
            dropout_rng=self._dropout_rng(rngs, deterministic), **kwargs,
        )  # fmt: skip


class DecoderBlock(_ConfigModule):
    """``attn_jax.decoder_block``."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs, deterministic: bool | None = None):
        super().__init__(init_decoder_block(rngs.params(), config), config, rngs, deterministic)

    def __call__(
        self, y, memory, *, self_mask, cross_mask=None, rngs: nnx.Rngs | None = None, deterministic=None, **kwargs
    ):
        return decoder_block(
            self.pure_params(), y, memory, self_mask=self_mask, cross_mask=cross_mask, config=self.config,
            dropout_rng=self._dropout_rng(rngs, deterministic), **kwargs,
        )  # fmt: skip


class Transformer(_ConfigModule):
    """``attn_jax.transformer``: the encoder-decoder model, parameters as ``init_transformer`` lays them out."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs, deterministic: bool | None = None):
        super().__init__(init_transformer(rngs.params(), config), config, rngs, deterministic)

    def __call__(self, src, tgt, *, rngs: nnx.Rngs | None = None, deterministic: bool | None = None, **kwargs):
        return transformer(
            self.pure_params(), src, tgt, config=self.config, dropout_rng=self._dropout_rng(rngs, deterministic),
            **kwargs,
        )  # fmt: skip


class LanguageModel(_ConfigModule):
    """``attn_jax.language_model``: the decoder-only model."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs, deterministic: bool | None = None):
        super().__init__(init_language_model(rngs.params(), config), config, rngs, deterministic)

    def __call__(self, tokens, *, rngs: nnx.Rngs | None = None, deterministic: bool | None = None, **kwargs):
        return language_model(
            self.pure_params(), tokens, config=self.config, dropout_rng=self._dropout_rng(rngs, deterministic),
            **kwargs,
        )  # fmt: skip


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
