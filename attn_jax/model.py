"""Encoder and decoder stacks, the encoder-decoder Transformer and a decoder-only language model (paper §3.1).

The layers themselves are in ``attn_jax.blocks``; with ``norm_first=True`` each stack ends in a final
LayerNorm. Dropout is applied only when a ``dropout_rng`` is passed: no PRNG key means evaluation.

The parameters of a stack's layers are stacked along a leading ``L`` axis, so the same tree runs scanned
(``jax.lax.scan``, compile time independent of depth) or unrolled (``scan_layers=False``).

Parameter tree of ``init_transformer``::

    {"embedding": {"embedding": [V, D]},        # or "source_embedding" / "target_embedding"
     "output_embedding": {"embedding": [V, D]}, # only with tie_output_embedding=False
     "encoder": {"layers": EncoderBlockParams with a leading [L] axis,
                 "positions": [max_len, D],     # only with positions="learned"
                 "norm": LayerNormParams},      # only with norm_first=True
     "decoder": {"layers": DecoderBlockParams [L, ...], "positions": ..., "norm": ...}}
"""

import jax
import jax.numpy as jnp

from attn_jax import layers
from attn_jax.attention import project_key_value
from attn_jax.blocks import (
    apply_decoder_block,
    apply_encoder_block,
    init_decoder_block,
    init_encoder_block,
    layer_rngs,
    run_stack,
    split_rngs,
)
from attn_jax.masks import causal_mask, combine_masks, padding_mask
from attn_jax.model_config import ConfigError, TransformerConfig
from attn_jax.types import Array, Float, Int, PRNGKeyArray

# ----------------------------------------------------------------------------------------------------------
# Embeddings and the encoder-decoder model
# ----------------------------------------------------------------------------------------------------------


def _embed(params, tokens, table: str, stack, *, config: TransformerConfig, rng, offset=0):
    """Token embedding (x sqrt(D)) plus positions, then dropout (§3.4, §3.5, §5.4)."""
    T = tokens.shape[1]
    if tokens.ndim != 2 or T == 0:
        raise ValueError(f"tokens must be a non-empty [B, T] array, got shape {tokens.shape}")
    if isinstance(offset, int) and offset + T > config.max_len:
        raise ValueError(f"sequence of length {offset + T} exceeds TransformerConfig.max_len={config.max_len}")
    dtype = jnp.dtype(config.dtype)
    x = layers.embed(params[table], tokens, scale=config.scale_embeddings, dtype=dtype)
    if config.positions == "learned":
        positions = layers.learned_positions(stack["positions"], T, offset=offset)
    else:
        positions = layers.sinusoidal_positions(T, config.d_model, offset=offset)
    return layers.dropout(x + positions[None].astype(dtype), config.dropout_rate, rng)


def _final_norm(stack, x, config: TransformerConfig):
    return layers.layer_norm(stack["norm"], x, epsilon=config.layer_norm_epsilon) if config.norm_first else x


# A decoder-only model has one vocabulary table, whatever share_embeddings says.
_LM_TABLE = "embedding"


def _table(kind: str, config: TransformerConfig) -> str:
    """The parameter key of the ``"source"`` or ``"target"`` embedding of the encoder-decoder model."""
    return "embedding" if config.share_embeddings else f"{kind}_embedding"


def encode(
    params,
    src_tokens: Int[Array, "B S"],
    *,
    config: TransformerConfig,
    dropout_rng: PRNGKeyArray | None = None,
    return_weights: bool = False,
):
    """The encoder stack: source tokens to the memory the decoder attends to.

    Args:
      params: from ``init_transformer``.
      src_tokens: ``[B, S]`` source ids, ``config.pad_id`` for padding.
      config: the model's ``TransformerConfig``.
      dropout_rng: enables dropout when given.
      return_weights: also return the self-attention weights ``[L, B, N, S, S]``.

    Returns:
      memory ``[B, S, D]`` (and the weights with ``return_weights``).
    """
    mask = padding_mask(src_tokens, src_tokens, config.pad_id)
    memory, weights = _self_attention_stack(
        params, "encoder", src_tokens, _table("source", config), mask, config=config, rng=dropout_rng,
        return_weights=return_weights,
    )  # fmt: skip
    return (memory, weights) if return_weights else memory


def _self_attention_stack(params, stack_name: str, tokens, table: str, mask, *, config, rng, return_weights):
    """Embedding, then encoder-style blocks (self-attention + FFN) under ``mask``, then the final norm.

    The encoder runs it with a padding mask, the decoder-only language model with a causal one.
    """
    r_embed, r_layers = split_rngs(rng, 2)
    stack = params[stack_name]
    x = _embed(params, tokens, table, stack, config=config, rng=r_embed)

    def block(p, h, layer_rng):
        h, (weights, _) = apply_encoder_block(
            p, h, mask=mask, config=config, rng=layer_rng, return_weights=return_weights
        )
        return h, weights

    num_layers = jax.tree.leaves(stack["layers"])[0].shape[0]
    x, weights = run_stack(block, stack["layers"], x, layer_rngs(r_layers, num_layers), config=config)
    return _final_norm(stack, x, config), weights


def decode(
    params,
    tgt_tokens: Int[Array, "B T"],
    memory: Float[Array, "B S D"],
    src_tokens: Int[Array, "B S"],
    *,
    config: TransformerConfig,
    dropout_rng: PRNGKeyArray | None = None,
    return_weights: bool = False,
):
    """The decoder stack with teacher forcing: logits for every target position at once.

    Args:
      params: from ``init_transformer``.
      tgt_tokens: ``[B, T]`` decoder inputs (the targets shifted right behind a start token).
      memory: ``[B, S, D]`` from ``encode``.
      src_tokens: ``[B, S]`` the source ids, for the encoder-decoder padding mask.
      config: the model's ``TransformerConfig``.
      dropout_rng: enables dropout when given.
      return_weights: also return ``{"self": [L,B,N,T,T], "cross": [L,B,N,T,S]}``.

    Returns:
      logits ``[B, T, V]`` in float32 (and the weights with ``return_weights``).
    """
    r_embed, r_layers = split_rngs(dropout_rng, 2)
    stack = params["decoder"]
    T = tgt_tokens.shape[1]
    y = _embed(params, tgt_tokens, _table("target", config), stack, config=config, rng=r_embed)
    self_mask = combine_masks(padding_mask(tgt_tokens, tgt_tokens, config.pad_id), causal_mask(T))
    cross_mask = padding_mask(tgt_tokens, src_tokens, config.pad_id)

    def block(p, h, rng):
        kv = project_key_value(p["cross_attention"], memory)
        h, (self_w, cross_w, _) = apply_decoder_block(
            p, h, kv, self_mask=self_mask, cross_mask=cross_mask, config=config, rng=rng,
            return_weights=return_weights,
        )  # fmt: skip
        return h, {"self": self_w, "cross": cross_w}

    y, weights = run_stack(block, stack["layers"], y, layer_rngs(r_layers, config.num_decoder_layers), config=config)
    logits = _logits(params, _final_norm(stack, y, config), config, _table("target", config))
    return (logits, weights) if return_weights else logits


def _logits(params, y, config: TransformerConfig, input_table: str):
    """Pre-softmax projection through the input embedding (tied, §3.4) or a separate output table."""
    table = input_table if config.tie_output_embedding else "output_embedding"
    return layers.shared_logits(params[table], y).astype(jnp.float32)


def transformer(
    params,
    src_tokens: Int[Array, "B S"],
    tgt_tokens: Int[Array, "B T"],
    *,
    config: TransformerConfig,
    dropout_rng: PRNGKeyArray | None = None,
    return_weights: bool = False,
):
    """The encoder-decoder Transformer of the paper, with teacher forcing.

    Args:
      params: from ``init_transformer``.
      src_tokens: ``[B, S]`` source ids.
      tgt_tokens: ``[B, T]`` decoder inputs (targets shifted right).
      config: the model's ``TransformerConfig``.
      dropout_rng: enables dropout when given.
      return_weights: also return ``{"encoder": [L,B,N,S,S], "decoder": [L,B,N,T,T], "cross": [L,B,N,T,S]}``.

    Returns:
      logits ``[B, T, V]`` in float32 (and the attention weights with ``return_weights``).

    Example:
      >>> cfg = TransformerConfig(vocab_size=11, d_model=8, num_heads=2, d_ff=16, num_encoder_layers=2,
      ...                         num_decoder_layers=2)
      >>> params = init_transformer(jax.random.key(0), cfg)
      >>> transformer(params, jnp.ones((2, 5), jnp.int32), jnp.ones((2, 3), jnp.int32), config=cfg).shape
      (2, 3, 11)
    """
    _check_vocab(params, config, _table("target", config))
    r_enc, r_dec = split_rngs(dropout_rng, 2)
    encoded = encode(params, src_tokens, config=config, dropout_rng=r_enc, return_weights=return_weights)
    memory = encoded[0] if return_weights else encoded
    decoded = decode(
        params,
        tgt_tokens,
        memory,
        src_tokens,
        config=config,
        dropout_rng=r_dec,
        return_weights=return_weights,
    )
    if not return_weights:
        return decoded
    logits, dec_w = decoded
    return logits, {"encoder": encoded[1], "decoder": dec_w["self"], "cross": dec_w["cross"]}


def _check_vocab(params, config: TransformerConfig, table_name: str):
    table = params[table_name]["embedding"]
    if table.shape != (config.vocab_size, config.d_model):
        raise ConfigError(
            f"TransformerConfig.vocab_size/d_model: params have an embedding of shape {table.shape}, "
            f"config expects ({config.vocab_size}, {config.d_model})"
        )


# ----------------------------------------------------------------------------------------------------------
# Decoder-only language model
# ----------------------------------------------------------------------------------------------------------


def language_model(
    params,
    tokens: Int[Array, "B T"],
    *,
    config: TransformerConfig,
    dropout_rng: PRNGKeyArray | None = None,
    return_weights: bool = False,
):
    """A decoder-only Transformer LM: the encoder block with a causal mask, ``num_decoder_layers`` deep.

    Args:
      params: from ``init_language_model``.
      tokens: ``[B, T]`` ids.
      config: the model's ``TransformerConfig`` (``num_encoder_layers`` is ignored).
      dropout_rng: enables dropout when given.
      return_weights: also return the self-attention weights ``[L, B, N, T, T]``.

    Returns:
      logits ``[B, T, V]`` predicting token ``t + 1`` at position ``t`` (and the weights).
    """
    _check_vocab(params, config, _LM_TABLE)
    mask = combine_masks(padding_mask(tokens, tokens, config.pad_id), causal_mask(tokens.shape[1]))
    x, weights = _self_attention_stack(
        params, "decoder", tokens, _LM_TABLE, mask, config=config, rng=dropout_rng, return_weights=return_weights
    )
    logits = _logits(params, x, config, _LM_TABLE)
    return (logits, weights) if return_weights else logits


# ----------------------------------------------------------------------------------------------------------
# Incremental decoding with a key/value cache
# ----------------------------------------------------------------------------------------------------------


def init_decode_cache(
    params,
    memory: Float[Array, "B S D"],
    src_tokens: Int[Array, "B S"],
    *,
    config: TransformerConfig,
    max_len: int,
) -> dict:
    """Cache for ``decode_step``: empty self-attention keys/values and the encoder's keys/values, once.

    Args:
      params: from ``init_transformer``.
      memory: ``[B, S, D]`` from ``encode``.
      src_tokens: ``[B, S]``, for the encoder-decoder padding mask.
      config: the model's ``TransformerConfig``.
      max_len: the most target tokens that will be decoded (``<= config.max_len``).

    Returns:
      ``{"self": {"k", "v"}: [L, B, max_len, K, H], "cross": {"k", "v"}: [L, B, S, K, H],
      "source_real": [B, S] bool, "index": int32 scalar}``.
    """
    if not 0 < max_len <= config.max_len:
        raise ValueError(f"max_len={max_len} must be in [1, TransformerConfig.max_len={config.max_len}]")
    cross = params["decoder"]["layers"]["cross_attention"]
    k, v = jax.vmap(lambda p: project_key_value(p, memory))(cross)  # [L, B, S, K, H] each
    return {
        "self": _empty_self_cache(config, memory.shape[0], max_len, config.num_decoder_layers),
        "cross": {"k": k, "v": v},
        "source_real": src_tokens != config.pad_id,
        "index": jnp.zeros((), jnp.int32),
    }


def _empty_self_cache(config: TransformerConfig, batch: int, max_len: int, num_layers: int) -> dict:
    shape = (num_layers, batch, max_len, config.resolved_num_kv_heads, config.resolved_head_dim)
    return {"k": jnp.zeros(shape, config.dtype), "v": jnp.zeros(shape, config.dtype)}


def _cached_self_mask(index, T: int, max_len: int):
    """Query ``index + t`` attends to cached keys ``0 .. index + t``: ``[1, 1, T, max_len]``."""
    query_pos = index + jnp.arange(T)
    return (jnp.arange(max_len)[None, :] <= query_pos[:, None])[None, None]


def decode_step(params, cache: dict, tokens: Int[Array, "B T"], *, config: TransformerConfig):
    """Feeds the next ``T`` target tokens (usually one) through the decoder, reusing the cached prefix.

    The logits equal ``decode``'s at the same positions; each new token costs one layer pass, not a re-run
    of the prefix. The caller keeps ``index + T <= max_len``: under ``jit`` the index is a traced value, so a
    write past the end cannot raise, and ``dynamic_update_slice`` would clamp it onto the last slots.

    Args:
      params: from ``init_transformer``.
      cache: from ``init_decode_cache`` or a previous ``decode_step``.
      tokens: ``[B, T]`` the next decoder inputs.
      config: the model's ``TransformerConfig``.

    Returns:
      ``(logits [B, T, V] float32, the updated cache)``.
    """
    index, max_len = cache["index"], cache["self"]["k"].shape[2]
    stack = params["decoder"]
    y = _embed(params, tokens, _table("target", config), stack, config=config, rng=None, offset=index)
    self_mask = _cached_self_mask(index, tokens.shape[1], max_len)
    cross_mask = cache["source_real"][:, None, None, :]  # [B, S] -> [B, 1, 1, S]

    def block(p, h, layer_cache):
        h, (_, _, self_cache) = apply_decoder_block(
            p, h, (layer_cache["cross"]["k"], layer_cache["cross"]["v"]), self_mask=self_mask,
            cross_mask=cross_mask, config=config, rng=None, return_weights=False,
            cache=layer_cache["self"], index=index,
        )  # fmt: skip
        return h, self_cache

    per_layer = {"self": cache["self"], "cross": cache["cross"]}
    y, self_cache = run_stack(block, stack["layers"], y, per_layer, config=config)
    logits = _logits(params, _final_norm(stack, y, config), config, _table("target", config))
    return logits, cache | {"self": self_cache, "index": index + tokens.shape[1]}


def init_language_model_cache(config: TransformerConfig, batch: int, max_len: int) -> dict:
    """Empty cache for ``language_model_step``: ``{"self": {"k", "v"}: [L, B, max_len, K, H], "index"}``."""
    if not 0 < max_len <= config.max_len:
        raise ValueError(f"max_len={max_len} must be in [1, TransformerConfig.max_len={config.max_len}]")
    self_cache = _empty_self_cache(config, batch, max_len, config.num_decoder_layers)
    return {"self": self_cache, "index": jnp.zeros((), jnp.int32)}


def language_model_step(params, cache: dict, tokens: Int[Array, "B T"], *, config: TransformerConfig):
    """``language_model`` for the next ``T`` tokens given the cached prefix: ``(logits [B, T, V], cache)``."""
    index, max_len = cache["index"], cache["self"]["k"].shape[2]
    stack = params["decoder"]
    x = _embed(params, tokens, _LM_TABLE, stack, config=config, rng=None, offset=index)
    mask = _cached_self_mask(index, tokens.shape[1], max_len)

    def block(p, h, layer_cache):
        h, (_, new_cache) = apply_encoder_block(
            p, h, mask=mask, config=config, rng=None, return_weights=False, cache=layer_cache, index=index
        )
        return h, new_cache

    x, self_cache = run_stack(block, stack["layers"], x, cache["self"], config=config)
    logits = _logits(params, _final_norm(stack, x, config), config, _LM_TABLE)
    return logits, {"self": self_cache, "index": index + tokens.shape[1]}


# ----------------------------------------------------------------------------------------------------------
# Initialisation and counting
# ----------------------------------------------------------------------------------------------------------


def _init_stack(rng, init_block, num_layers: int, config: TransformerConfig):
    r_layers, r_pos = jax.random.split(rng)
    stack = {"layers": jax.vmap(lambda r: init_block(r, config))(jax.random.split(r_layers, num_layers))}
    if config.positions == "learned":
        stack["positions"] = layers.init_learned_positions(r_pos, config.max_len, config.d_model)
    if config.norm_first:
        stack["norm"] = layers.init_layer_norm(config.d_model)
    return stack


def _init_embeddings(rng, names: list[str], config: TransformerConfig) -> dict:
    rngs = jax.random.split(rng, len(names))
    return {
        name: layers.init_embedding(r, config.vocab_size, config.d_model) for name, r in zip(names, rngs, strict=True)
    }


def init_transformer(rng: PRNGKeyArray, config: TransformerConfig) -> dict:
    """Parameters of the encoder-decoder Transformer (tree layout in the module docstring).

    Example:
      >>> cfg = TransformerConfig(vocab_size=11, d_model=8, num_heads=2, d_ff=16, num_encoder_layers=2)
      >>> init_transformer(jax.random.key(0), cfg)["encoder"]["layers"]["ffn"]["w_1"].shape
      (2, 8, 16)
    """
    r_emb, r_enc, r_dec = jax.random.split(rng, 3)
    names = ["embedding"] if config.share_embeddings else ["source_embedding", "target_embedding"]
    names += [] if config.tie_output_embedding else ["output_embedding"]
    return _init_embeddings(r_emb, names, config) | {
        "encoder": _init_stack(r_enc, init_encoder_block, config.num_encoder_layers, config),
        "decoder": _init_stack(r_dec, init_decoder_block, config.num_decoder_layers, config),
    }


def init_language_model(rng: PRNGKeyArray, config: TransformerConfig) -> dict:
    """Parameters of ``language_model``: ``{"embedding", ["output_embedding"], "decoder": {...}}``."""
    r_emb, r_dec = jax.random.split(rng)
    names = [_LM_TABLE] + ([] if config.tie_output_embedding else ["output_embedding"])
    return _init_embeddings(r_emb, names, config) | {
        "decoder": _init_stack(r_dec, init_encoder_block, config.num_decoder_layers, config)
    }


def count_params(params) -> int:
    """Total number of scalar parameters in a tree.

    Example:
      >>> count_params({"a": jnp.zeros((2, 3)), "b": {"c": jnp.zeros(4)}})
      10
    """
    return sum(int(x.size) for x in jax.tree.leaves(params))
