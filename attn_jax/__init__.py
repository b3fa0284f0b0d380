"""attn_jax: the Transformer of "Attention Is All You Need" (Vaswani et al. 2017) as pure JAX functions.

The core is pairs of pure functions, ``init_<block>(rng, ...) -> params`` and ``<block>(params, x, ...)``,
over plain parameter dicts; ``attn_jax.nn`` wraps them as Flax NNX modules. Shape letters are explained in
``attn_jax.types``.
"""

from attn_jax.additive import (
    additive_attention,
    dot_attention,
    general_attention,
    init_additive_attention,
    init_general_attention,
)
from attn_jax.attention import (
    init_attention_cache,
    init_multi_head_attention,
    multi_head_attention,
    project_key_value,
    project_output,
    project_query,
    scaled_dot_product_attention,
    self_attention_step,
)
from attn_jax.blocks import decoder_block, encoder_block, init_decoder_block, init_encoder_block
from attn_jax.decoding import beam_search, greedy_decode, length_penalty, sample_language_model
from attn_jax.families import FAMILIES, Family, family
from attn_jax.interop import from_flax_linen_attention
from attn_jax.layers import (
    dropout,
    embed,
    init_embedding,
    init_layer_norm,
    init_learned_positions,
    init_position_wise_ffn,
    layer_norm,
    learned_positions,
    position_wise_ffn,
    shared_logits,
    sinusoidal_positions,
)
from attn_jax.losses import cross_entropy_sums
from attn_jax.masks import (
    causal_mask,
    combine_masks,
    key_padding_mask,
    length_mask,
    padding_mask,
    segment_mask,
    segment_positions,
)
from attn_jax.model import (
    count_params,
    decode,
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
from attn_jax.model_config import ConfigError, TransformerConfig
from attn_jax.optim import make_optimizer, rsqrt_warmup_schedule

# The recurrent models' own functions keep their modules' names (aj.rnnsearch.rnnsearch): no name shadows a module.
from attn_jax.rnn_encdec import RNNEncDecConfig, init_rnn_encdec
from attn_jax.rnnsearch import RNNSearchConfig, init_rnnsearch

# The training step lives with the training code (attn_jax.train); imported on first use so that the core never
# imports training code at package import time.
_TRAIN_NAMES = ("TrainState", "init_train_state", "train_step", "eval_step", "forward")


def __getattr__(name: str):
    if name in _TRAIN_NAMES:
        from attn_jax import train

        return getattr(train, name)
    raise AttributeError(f"module 'attn_jax' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "FAMILIES",
    "Family",
    "RNNEncDecConfig",
    "RNNSearchConfig",
    "TrainState",
    "TransformerConfig",
    "additive_attention",
    "beam_search",
    "causal_mask",
    "combine_masks",
    "count_params",
    "cross_entropy_sums",
    "decode",
    "decode_step",
    "decoder_block",
    "dot_attention",
    "dropout",
    "embed",
    "encode",
    "encoder_block",
    "eval_step",
    "family",
    "forward",
    "from_flax_linen_attention",
    "general_attention",
    "greedy_decode",
    "init_additive_attention",
    "init_attention_cache",
    "init_decode_cache",
    "init_decoder_block",
    "init_embedding",
    "init_encoder_block",
    "init_general_attention",
    "init_language_model",
    "init_language_model_cache",
    "init_layer_norm",
    "init_learned_positions",
    "init_multi_head_attention",
    "init_position_wise_ffn",
    "init_rnn_encdec",
    "init_rnnsearch",
    "init_train_state",
    "init_transformer",
    "key_padding_mask",
    "language_model",
    "language_model_step",
    "layer_norm",
    "learned_positions",
    "length_mask",
    "length_penalty",
    "make_optimizer",
    "multi_head_attention",
    "padding_mask",
    "position_wise_ffn",
    "project_key_value",
    "project_output",
    "project_query",
    "rsqrt_warmup_schedule",
    "sample_language_model",
    "scaled_dot_product_attention",
    "segment_mask",
    "segment_positions",
    "self_attention_step",
    "shared_logits",
    "sinusoidal_positions",
    "train_step",
    "transformer",
]
