"""Transformer layers (paper §3.1, Figure 1): the residual + layer-norm wrapper, encoder and decoder blocks.

Each sub-layer is wrapped as ``LayerNorm(x + Dropout(Sublayer(x)))`` (the paper's post-norm), or as
``x + Dropout(Sublayer(LayerNorm(x)))`` with ``norm_first=True``. Dropout is applied only when a
``dropout_rng`` is passed: no PRNG key means evaluation.

``encoder_block`` and ``decoder_block`` are the public one-layer functions. ``apply_encoder_block`` /
``apply_decoder_block`` are the same layers with everything a stack needs (a key/value cache for decoding
one token at a time, precomputed encoder keys/values), and ``run_stack`` applies a layer over a stacked ``[L]``
parameter tree, scanned or unrolled.
"""

import jax
import jax.numpy as jnp

from attn_jax import fused_random, layers
from attn_jax.attention import (
    init_multi_head_attention,
    project_key_value,
    project_output,
    project_query,
    scaled_dot_product_attention,
)
from attn_jax.model_config import TransformerConfig
from attn_jax.types import Array, Bool, DecoderBlockParams, EncoderBlockParams, Float, PRNGKeyArray, ensure_static

# ----------------------------------------------------------------------------------------------------------
# Sub-layers
# ----------------------------------------------------------------------------------------------------------


def split_rngs(rng: PRNGKeyArray | None, n: int) -> list:
    return [None] * n if rng is None else list(fused_random.split(rng, n))


# The recipe's extra randomness is drawn from fold_in(a layer's key, stream): the paper's dropout streams (split
# from the same key) are unchanged whether these options are on or off, and each option has its own bits.
_ACTIVATION_DROPOUT_STREAM, _LAYERDROP_STREAM = 0xAC7D, 0x1D0F


def _stream(rng: PRNGKeyArray | None, stream: int, rate: float):
    """``fold_in(rng, stream)`` when the option is on (``rate > 0``) and the model trains (``rng``), else None."""
    return None if rng is None or rate == 0.0 else fused_random.fold_in(rng, stream)


def _residual(norm_params, x, sublayer, *, config: TransformerConfig, rng):
    """Post-norm LN(x + Dropout(sublayer(x))), or pre-norm x + Dropout(sublayer(LN(x))).

    ``sublayer`` returns ``(y, aux)``; ``aux`` (attention weights, a cache) is passed through.
    """
    eps = config.layer_norm_epsilon
    if config.norm_first:
        y, aux = sublayer(layers.layer_norm(norm_params, x, epsilon=eps))
        return x + layers.dropout(y, config.dropout_rate, rng), aux
    y, aux = sublayer(x)
    return layers.layer_norm(norm_params, x + layers.dropout(y, config.dropout_rate, rng), epsilon=eps), aux


def _attend(params, x, kv, *, mask, config: TransformerConfig, rng, return_weights):
    """Multi-head attention on precomputed keys/values ``kv = (k [B,S,K,H], v [B,S,K,H])``."""
    out = scaled_dot_product_attention(
        project_query(params, x), *kv, mask=mask, dropout_rate=config.attention_dropout_rate,
        dropout_rng=rng, implementation=config.attention_implementation, return_weights=return_weights,
    )  # fmt: skip
    heads, weights = out if return_weights else (out, None)
    return project_output(params, heads), weights


def _self_attention(params, x, *, mask, config, rng, return_weights, cache=None, index=None):
    """Self-attention; with a cache, new keys/values are written at ``index`` and all cached ones attended."""
    k, v = project_key_value(params, x)
    if cache is not None:
        k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), index, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), index, axis=1)
        cache = {"k": k, "v": v}
    y, weights = _attend(params, x, (k, v), mask=mask, config=config, rng=rng, return_weights=return_weights)
    return y, (weights, cache)


# ----------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------


def init_encoder_block(rng: PRNGKeyArray, config: TransformerConfig) -> EncoderBlockParams:
    """One encoder layer: self-attention and FFN, each with its layer norm."""
    r_attn, r_ffn = jax.random.split(rng)
    D = config.d_model
    return {
        "self_attention": _init_attention(r_attn, config),
        "self_attention_norm": layers.init_layer_norm(D),
        "ffn": layers.init_position_wise_ffn(r_ffn, D, config.d_ff),
        "ffn_norm": layers.init_layer_norm(D),
    }


def init_decoder_block(rng: PRNGKeyArray, config: TransformerConfig) -> DecoderBlockParams:
    """One decoder layer: masked self-attention, encoder-decoder attention and FFN, each with its norm."""
    r_self, r_cross, r_ffn = jax.random.split(rng, 3)
    D = config.d_model
    return {
        "self_attention": _init_attention(r_self, config),
        "self_attention_norm": layers.init_layer_norm(D),
        "cross_attention": _init_attention(r_cross, config),
        "cross_attention_norm": layers.init_layer_norm(D),
        "ffn": layers.init_position_wise_ffn(r_ffn, D, config.d_ff),
        "ffn_norm": layers.init_layer_norm(D),
    }


def _init_attention(rng, config: TransformerConfig):
    return init_multi_head_attention(
        rng, config.d_model, config.num_heads, head_dim=config.resolved_head_dim,
        num_kv_heads=config.resolved_num_kv_heads, use_bias=config.attention_bias,
    )  # fmt: skip


def encoder_block(
    params: EncoderBlockParams,
    x: Float[Array, "B S D"],
    *,
    mask: Bool[Array, "..."] | None,
    config: TransformerConfig,
    dropout_rng: PRNGKeyArray | None = None,
    return_weights: bool = False,
):
    """Self-attention then the position-wise FFN, each in a residual + layer-norm wrapper (paper Figure 1, left).

    Args:
      params: one layer's ``EncoderBlockParams`` (no leading ``L`` axis).
      x: ``[B, S, D]``.
      mask: self-attention mask ``[B|1, N|1, S, S]`` (a causal one makes this a decoder-only block).
      config: the model's ``TransformerConfig``.
      dropout_rng: enables dropout when given.
      return_weights: also return the self-attention weights ``[B, N, S, S]``.

    Returns:
      ``[B, S, D]`` (and the weights with ``return_weights``).

    Example:
      >>> cfg = TransformerConfig(vocab_size=11, d_model=8, num_heads=2, d_ff=16)
      >>> p = init_encoder_block(jax.random.key(0), cfg)
      >>> encoder_block(p, jnp.ones((2, 3, 8)), mask=None, config=cfg).shape
      (2, 3, 8)
    """
    ensure_static("encoder_block", return_weights=return_weights)
    y, (weights, _) = apply_encoder_block(
        params, x, mask=mask, config=config, rng=dropout_rng, return_weights=return_weights
    )
    return (y, weights) if return_weights else y


def apply_encoder_block(params, x, *, mask, config, rng, return_weights, cache=None, index=None):
    """``encoder_block`` for stacks: returns ``(x, (weights | None, cache | None))``.

    With ``cache={"k", "v": [B, M, K, H]}`` the new keys/values are written at position ``index`` and the
    queries attend over the whole cache (decoder-only language models decode this way).
    """
    r_attn, r_res1, r_res2 = split_rngs(rng, 3)

    def attention(h):
        return _self_attention(
            params["self_attention"], h, mask=mask, config=config, rng=r_attn,
            return_weights=return_weights, cache=cache, index=index,
        )  # fmt: skip

    x, (weights, cache) = _residual(params["self_attention_norm"], x, attention, config=config, rng=r_res1)
    x, _ = _residual(params["ffn_norm"], x, _ffn(params["ffn"], config, rng), config=config, rng=r_res2)
    return x, (weights, cache)


def _ffn(params, config: TransformerConfig, layer_rng):
    """The FFN sub-layer, with dropout on its inner activation at ``config.activation_dropout_rate``."""
    rate = config.activation_dropout_rate
    rng = _stream(layer_rng, _ACTIVATION_DROPOUT_STREAM, rate)
    return lambda h: (layers.position_wise_ffn(params, h, dropout_rate=rate, dropout_rng=rng), None)


def decoder_block(
    params: DecoderBlockParams,
    y: Float[Array, "B T D"],
    memory: Float[Array, "B S D"],
    *,
    self_mask: Bool[Array, "..."] | None,
    cross_mask: Bool[Array, "..."] | None,
    config: TransformerConfig,
    dropout_rng: PRNGKeyArray | None = None,
    return_weights: bool = False,
):
    """Masked self-attention, encoder-decoder attention over ``memory``, then the FFN (paper Figure 1, right).

    Args:
      params: one layer's ``DecoderBlockParams``.
      y: decoder activations ``[B, T, D]``.
      memory: encoder output ``[B, S, D]``.
      self_mask: ``[B|1, N|1, T, T]``; must include the causal mask.
      cross_mask: ``[B|1, N|1, T|1, S]``.
      config: the model's ``TransformerConfig``.
      dropout_rng: enables dropout when given.
      return_weights: also return ``(self_weights [B,N,T,T], cross_weights [B,N,T,S])``.

    Returns:
      ``[B, T, D]`` (and the weights with ``return_weights``).
    """
    ensure_static("decoder_block", return_weights=return_weights)
    cross_kv = project_key_value(params["cross_attention"], memory)
    out, (self_w, cross_w, _) = apply_decoder_block(
        params, y, cross_kv, self_mask=self_mask, cross_mask=cross_mask, config=config, rng=dropout_rng,
        return_weights=return_weights,
    )  # fmt: skip
    return (out, (self_w, cross_w)) if return_weights else out


def apply_decoder_block(
    params, y, cross_kv, *, self_mask, cross_mask, config, rng, return_weights, cache=None, index=None
):
    """``decoder_block`` for stacks: returns ``(y, (self_weights, cross_weights, cache))``.

    ``cross_kv`` are the encoder memory's keys and values ``([B, S, K, H], [B, S, K, H])``, projected once per
    sentence; ``cache`` and ``index`` as in ``apply_encoder_block``.
    """
    r_self, r_cross, r_res1, r_res2, r_res3 = split_rngs(rng, 5)

    def self_attention(h):
        return _self_attention(
            params["self_attention"], h, mask=self_mask, config=config, rng=r_self,
            return_weights=return_weights, cache=cache, index=index,
        )  # fmt: skip

    def cross_attention(h):
        return _attend(
            params["cross_attention"], h, cross_kv, mask=cross_mask, config=config, rng=r_cross,
            return_weights=return_weights,
        )  # fmt: skip

    y, (self_w, cache) = _residual(params["self_attention_norm"], y, self_attention, config=config, rng=r_res1)
    y, cross_w = _residual(params["cross_attention_norm"], y, cross_attention, config=config, rng=r_res2)
    y, _ = _residual(params["ffn_norm"], y, _ffn(params["ffn"], config, rng), config=config, rng=r_res3)
    return y, (self_w, cross_w, cache)


# ----------------------------------------------------------------------------------------------------------
# Stacks
# ----------------------------------------------------------------------------------------------------------


def run_stack(block, stack_layers, x, per_layer, *, config: TransformerConfig, layerdrop: float = 0.0):
    """Applies ``block(layer_params, x, layer_inputs) -> (x, layer_outputs)`` over the leading ``L`` axis.

    Scanned by default; unrolled with ``scan_layers=False``. ``per_layer`` (PRNG keys, cache slices) has the
    same leading axis; the per-layer outputs come back stacked on ``L``.

    ``layerdrop > 0`` (LayerDrop, Fan et al. 2019; training only, ``per_layer`` then holds the layers' PRNG keys,
    and None turns it off) skips each layer with that probability: a skipped layer's output is its input,
    exactly, its per-layer outputs are zeros, and its computation is not run (``lax.cond``). No rescaling, and
    every layer runs at evaluation, as in the paper.
    """
    if config.remat:
        block = jax.checkpoint(block)
    if layerdrop > 0.0 and per_layer is not None:
        block = _layerdrop(block, layerdrop)
    num_layers = jax.tree.leaves(stack_layers)[0].shape[0]
    if config.scan_layers or num_layers == 0:  # a scan of length 0 still yields [0, ...] outputs
        return jax.lax.scan(lambda h, inputs: block(inputs[0], h, inputs[1]), x, (stack_layers, per_layer))
    outputs = []
    for i in range(num_layers):
        layer_params, layer_inputs = jax.tree.map(lambda a, i=i: a[i], (stack_layers, per_layer))
        x, out = block(layer_params, x, layer_inputs)
        outputs.append(out)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *outputs)


def layer_rngs(rng: PRNGKeyArray | None, num_layers: int):
    """One dropout key per layer, or None (no dropout)."""
    return None if rng is None else fused_random.split(rng, num_layers)


def _layerdrop(block, rate: float):
    """``block`` run with probability ``1 - rate``, else the identity on ``x`` (decided by the layer's key)."""

    def maybe(layer_params, x, rng):
        keep = fused_random.bernoulli(fused_random.fold_in(rng, _LAYERDROP_STREAM), 1.0 - rate, ())
        _, outputs = jax.eval_shape(block, layer_params, x, rng)

        def skip():
            return x, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), outputs)

        return jax.lax.cond(keep, lambda: block(layer_params, x, rng), skip)

    return maybe
