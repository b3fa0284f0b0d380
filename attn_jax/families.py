"""Model families: the one interface through which training, evaluation and decoding use a translation model.

Three families share the training loop, the data pipeline, checkpoints, sharding, beam search and the CLI:

    transformer  the paper's model (``attn_jax.model``; ``TransformerConfig``)
    rnnsearch    Bahdanau et al. 2014, recurrent with attention (``attn_jax.rnnsearch``; ``RNNSearchConfig``)
    rnn_encdec   Cho et al. 2014, recurrent through one fixed vector (``attn_jax.rnn_encdec``; ``RNNEncDecConfig``)

The family is the type of the model config (``config.model.family`` in an experiment picks which config
``attn_jax.config.model_config`` builds), so every function that already takes the static config finds its
family with ``family(config)`` and the loop never names one. A ``Family`` is what those functions need:

    init(rng, config) -> params
    apply(params, src [B, S], tgt_in [B, T], *, config, dropout_rng=None) -> logits [B, T, V] float32
    encode(params, src, *, config) -> encoded            (a pytree whose leaves have the batch axis first)
    init_cache(params, encoded, src, *, config, max_len) -> cache
    step(params, cache, tokens [B], *, config) -> (logits [B, V], cache)
    reorder_cache(cache, rows [B]) -> cache              (beam search: row i continues from row rows[i])
    attention(params, src, tgt_in, *, config) -> {kind: [L, B, N, T, S]}, or None without attention

``attn_jax.decoding`` drives ``encode`` / ``init_cache`` / ``step`` / ``reorder_cache`` for greedy and beam
search; ``attn_jax.report`` plots ``attention``'s kinds (``attn_jax.plots.ATTENTION_KINDS``).
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from attn_jax import model, rnn_encdec, rnnsearch
from attn_jax.model_config import TransformerConfig
from attn_jax.rnn_encdec import RNNEncDecConfig
from attn_jax.rnnsearch import RNNSearchConfig

FAMILIES = ("transformer", "rnnsearch", "rnn_encdec")

# Every model config a family function accepts (for annotations).
ModelConfig = TransformerConfig | RNNSearchConfig | RNNEncDecConfig


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family's functions (signatures in the module docstring)."""

    name: str
    init: Callable
    apply: Callable
    encode: Callable
    init_cache: Callable
    step: Callable
    reorder_cache: Callable
    attention: Callable | None


# ----------------------------------------------------------------------------------------------------------
# The Transformer, adapted: one token per step, its self-attention cache has the batch on axis 1
# ----------------------------------------------------------------------------------------------------------


def _transformer_apply(params, src_tokens, tgt_tokens, *, config, dropout_rng=None):
    return model.transformer(params, src_tokens, tgt_tokens, config=config, dropout_rng=dropout_rng)


def _transformer_encode(params, src_tokens, *, config):
    return model.encode(params, src_tokens, config=config)


def _transformer_step(params, cache, tokens, *, config):
    logits, cache = model.decode_step(params, cache, tokens[:, None], config=config)  # [B] -> [B, 1]
    return logits[:, 0], cache


def _transformer_reorder(cache, rows):
    # Only the decoder's own keys/values differ between hypotheses; the cross-attention cache is per sentence.
    return cache | {"self": jax.tree.map(lambda x: jnp.take(x, rows, axis=1), cache["self"])}


def _transformer_attention(params, src_tokens, tgt_tokens, *, config):
    return model.transformer(params, src_tokens, tgt_tokens, config=config, return_weights=True)[1]


TRANSFORMER = Family(
    name="transformer",
    init=model.init_transformer,
    apply=_transformer_apply,
    encode=_transformer_encode,
    init_cache=model.init_decode_cache,
    step=_transformer_step,
    reorder_cache=_transformer_reorder,
    attention=_transformer_attention,
)


# ----------------------------------------------------------------------------------------------------------
# The recurrent families
# ----------------------------------------------------------------------------------------------------------


def _rnnsearch_attention(params, src_tokens, tgt_tokens, *, config):
    _, alignments = rnnsearch.rnnsearch(params, src_tokens, tgt_tokens, config=config, return_weights=True)
    return {"cross": alignments[None, :, None]}  # one layer, one head: [B, T, S] -> [1, B, 1, T, S]


RNNSEARCH = Family(
    name="rnnsearch",
    init=rnnsearch.init_rnnsearch,
    apply=rnnsearch.rnnsearch,
    encode=rnnsearch.encode,
    init_cache=rnnsearch.init_decode_cache,
    step=rnnsearch.decode_step,
    reorder_cache=rnnsearch.reorder_cache,
    attention=_rnnsearch_attention,
)

RNN_ENCDEC = Family(
    name="rnn_encdec",
    init=rnn_encdec.init_rnn_encdec,
    apply=rnn_encdec.rnn_encdec,
    encode=rnn_encdec.encode,
    init_cache=rnn_encdec.init_decode_cache,
    step=rnn_encdec.decode_step,
    reorder_cache=rnn_encdec.reorder_cache,
    attention=None,  # nothing to plot: the decoder sees only the fixed vector
)

_BY_CONFIG = {TransformerConfig: TRANSFORMER, RNNSearchConfig: RNNSEARCH, RNNEncDecConfig: RNN_ENCDEC}


def family(config: ModelConfig) -> Family:
    """The family of a model config.

    Example:
      >>> family(RNNSearchConfig(source_vocab=7, target_vocab=7)).name
      'rnnsearch'
    """
    found = _BY_CONFIG.get(type(config))
    if found is None:
        raise TypeError(f"no model family for a config of type {type(config).__name__}")
    return found


def translate_logits(params, src_tokens, tgt_tokens, *, config: ModelConfig, dropout_rng=None):
    """Teacher-forced logits ``[B, T, V]`` (float32) of any family: ``family(config).apply``.

    Example:
      >>> cfg = RNNSearchConfig(source_vocab=7, target_vocab=7, embed_dim=4, hidden_dim=6, maxout_dim=3,
      ...                       alignment_dim=5)
      >>> params = family(cfg).init(jax.random.key(0), cfg)
      >>> translate_logits(params, jnp.ones((2, 3), int), jnp.ones((2, 4), int), config=cfg).shape
      (2, 4, 7)
    """
    return family(config).apply(params, src_tokens, tgt_tokens, config=config, dropout_rng=dropout_rng)
