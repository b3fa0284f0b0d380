"""Encoder and decoder stacks, the encoder-decoder Transformer and a decoder-only language model (paper §3.1).

The layers themselves are in ``attn_jax.blocks``; with ``norm_first=True`` (or ``final_norm=True``) each stack
ends in a final LayerNorm. Dropout is applied only when a ``dropout_rng`` is passed: no PRNG key means evaluation.
The same holds for the low-resource regularisers of ``TransformerConfig``: word dropout on the source and the
decoder inputs (``attn_jax.inputs.word_dropout``), LayerDrop per stack (``encoder_layerdrop`` for the encoder,
``decoder_layerdrop`` for the decoder and the language model) and activation dropout in every FFN.

The parameters of a stack's layers are stacked along a leading ``L`` axis, so the same tree runs scanned
(``jax.lax.scan``, compile time independent of depth) or unrolled (``scan_layers=False``).

Parameter tree of ``init_transformer``::

    {"embedding": {"embedding": [V, D]},        # or "source_embedding" / "target_embedding"
     "output_embedding": {"embedding": [V, D]}, # only with tie_output_embedding=False
     "encoder": {"layers": EncoderBlockParams with a leading [L] axis,
                 "positions": [max_len, D],     # only with positions="learned"
                 "norm": LayerNormParams},      # only with norm_first=True (or final_norm=True)
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
from attn_jax.inputs import (
    LM_TABLE,
    check_vocab,
    embed_inputs,
    final_norm,
    is_embeddings,
    output_logits,
    positions_of,
    real_of,
    source_real,
    table_name,
)
from attn_jax.masks import causal_mask, combine_masks, pair_mask, segment_pair_mask
from attn_jax.model_config import TransformerConfig
from attn_jax.types import Array, Bool, Float, Int, PRNGKeyArray, ensure_static

# Token ids or the caller's embeddings in their place: source [B, S] | [B, S, D], target [B, T] | [B, T, D].
Source = Int[Array, "B S"] | Float[Array, "B S D"]
Target = Int[Array, "B T"] | Float[Array, "B T D"]

# ----------------------------------------------------------------------------------------------------------
# The encoder-decoder model
# ----------------------------------------------------------------------------------------------------------


def encode(
    params,
    src: Source,
    *,
    config: TransformerConfig,
    src_mask: Bool[Array, "B S"] | None = None,
    positions: Int[Array, "B S"] | None = None,
    segment_ids: Int[Array, "B S"] | None = None,
    attention_mask: Bool[Array, "#B #N #S #S"] | None = None,
    dropout_rng: PRNGKeyArray | None = None,
    return_weights: bool = False,
):
    """The encoder stack: source tokens (or embeddings) to the memory the decoder attends to.

    Args:
      params: from ``init_transformer``.
      src: ``[B, S]`` source ids (``config.pad_id`` for padding), or ``[B, S, D]`` embeddings used in place of
        the scaled embedding lookup (positions and dropout are still added).
      config: the model's ``TransformerConfig``.
      src_mask: ``[B, S]`` True at real tokens; ANDed with ``src != pad_id`` for ids (needed for embeddings).
      positions: ``[B, S]`` position of each token (default ``0 .. S-1``, or restarting per segment).
      segment_ids: ``[B, S]`` packed-sequence ids (0 = padding): tokens attend only inside their sequence.
      attention_mask: a mask of your own, ``[B|1, N|1, S, S]``, True = attend; ANDed with the above.
      dropout_rng: enables dropout when given.
      return_weights: also return the self-attention weights ``[L, B, N, S, S]``.

    Returns:
      memory ``[B, S, D]`` (and the weights with ``return_weights``).
    """
    ensure_static("encode", return_weights=return_weights)
    real = real_of(src, src_mask, segment_ids, "src_", config)
    mask = combine_masks(pair_mask(real, real), segment_pair_mask(segment_ids, segment_ids, "encode"), attention_mask)
    memory, weights = _self_attention_stack(
        params, "encoder", src, table_name("source", config), mask, positions_of(positions, segment_ids),
        config=config, rng=dropout_rng, return_weights=return_weights, layerdrop=config.encoder_layerdrop,
    )  # fmt: skip
    return (memory, weights) if return_weights else memory


def _self_attention_stack(
    params, stack_name: str, inputs, table: str, mask, positions, *, config, rng, return_weights, layerdrop
):
    """Embedding, then encoder-style blocks (self-attention + FFN) under ``mask``, then the final norm.

    The encoder runs it with a padding mask, the decoder-only language model with a causal one.
    """
    r_embed, r_layers = split_rngs(rng, 2)
    stack = params[stack_name]
    x = embed_inputs(params, inputs, table, stack, config=config, rng=r_embed, positions=positions)

    def block(p, h, layer_rng):
        h, (weights, _) = apply_encoder_block(
            p, h, mask=mask, config=config, rng=layer_rng, return_weights=return_weights
        )
        return h, weights

    num_layers = jax.tree.leaves(stack["layers"])[0].shape[0]
    x, weights = run_stack(
        block, stack["layers"], x, layer_rngs(r_layers, num_layers), config=config, layerdrop=layerdrop
    )
    return final_norm(stack, x, config), weights


def decode(
    params,
    tgt: Target,
    memory: Float[Array, "B S D"],
    src_tokens: Int[Array, "B S"] | None = None,
    *,
    config: TransformerConfig,
    tgt_mask: Bool[Array, "B T"] | None = None,
    src_mask: Bool[Array, "B S"] | None = None,
    positions: Int[Array, "B T"] | None = None,
    segment_ids: Int[Array, "B T"] | None = None,
    src_segment_ids: Int[Array, "B S"] | None = None,
    self_attention_mask: Bool[Array, "#B #N #T #T"] | None = None,
    cross_attention_mask: Bool[Array, "#B #N #T #S"] | None = None,
    dropout_rng: PRNGKeyArray | None = None,
    return_weights: bool = False,
):
    """The decoder stack with teacher forcing: logits for every target position at once.

    Args:
      params: from ``init_transformer``.
      tgt: ``[B, T]`` decoder inputs (the targets shifted right behind a start token), or ``[B, T, D]``
        embeddings.
      memory: ``[B, S, D]`` from ``encode``.
      src_tokens: ``[B, S]`` the source ids, for the encoder-decoder padding mask (or give ``src_mask``).
      config: the model's ``TransformerConfig``.
      tgt_mask: ``[B, T]`` True at real target tokens (ANDed with ``tgt != pad_id`` for ids).
      src_mask: ``[B, S]`` True at real source tokens (ANDed with ``src_tokens != pad_id``).
      positions: ``[B, T]`` target positions (default ``0 .. T-1``, or restarting per segment).
      segment_ids: ``[B, T]`` packed-sequence ids of the targets; needs ``src_segment_ids``: target sequence
        ``k`` attends to source sequence ``k`` only.
      src_segment_ids: ``[B, S]`` packed-sequence ids of the sources.
      self_attention_mask: your own ``[B|1, N|1, T, T]`` mask, ANDed with the causal and padding masks.
      cross_attention_mask: your own ``[B|1, N|1, T, S]`` mask, ANDed with the padding masks.
      dropout_rng: enables dropout when given.
      return_weights: also return ``{"self": [L,B,N,T,T], "cross": [L,B,N,T,S]}``.

    Returns:
      logits ``[B, T, V]`` in ``promote(float32, config.dtype)`` (and the weights with ``return_weights``).
    """
    ensure_static("decode", return_weights=return_weights)
    r_embed, r_layers = split_rngs(dropout_rng, 2)
    stack = params["decoder"]
    T = tgt.shape[1]
    positions = positions_of(positions, segment_ids)
    y = embed_inputs(params, tgt, table_name("target", config), stack, config=config, rng=r_embed, positions=positions)
    tgt_real = real_of(tgt, tgt_mask, segment_ids, "tgt_", config)
    src_real = source_real(src_tokens, src_mask, src_segment_ids, memory, config)
    self_mask = combine_masks(
        pair_mask(tgt_real, tgt_real), causal_mask(T), segment_pair_mask(segment_ids, segment_ids, "decode"),
        self_attention_mask,
    )  # fmt: skip
    cross_segments = segment_pair_mask(segment_ids, src_segment_ids, "decode (segment_ids, src_segment_ids)")
    cross_mask = combine_masks(pair_mask(tgt_real, src_real), cross_segments, cross_attention_mask)

    def block(p, h, rng):
        kv = project_key_value(p["cross_attention"], memory)
        h, (self_w, cross_w, _) = apply_decoder_block(
            p, h, kv, self_mask=self_mask, cross_mask=cross_mask, config=config, rng=rng,
            return_weights=return_weights,
        )  # fmt: skip
        return h, {"self": self_w, "cross": cross_w}

    y, weights = run_stack(
        block, stack["layers"], y, layer_rngs(r_layers, config.num_decoder_layers), config=config,
        layerdrop=config.decoder_layerdrop,
    )  # fmt: skip
    logits = output_logits(params, final_norm(stack, y, config), config, table_name("target", config))
    return (logits, weights) if return_weights else logits


def transformer(
    params,
    src: Source,
    tgt: Target,
    *,
    config: TransformerConfig,
    src_mask: Bool[Array, "B S"] | None = None,
    tgt_mask: Bool[Array, "B T"] | None = None,
    src_positions: Int[Array, "B S"] | None = None,
    tgt_positions: Int[Array, "B T"] | None = None,
    src_segment_ids: Int[Array, "B S"] | None = None,
    tgt_segment_ids: Int[Array, "B T"] | None = None,
    encoder_attention_mask: Bool[Array, "#B #N #S #S"] | None = None,
    decoder_attention_mask: Bool[Array, "#B #N #T #T"] | None = None,
    cross_attention_mask: Bool[Array, "#B #N #T #S"] | None = None,
    dropout_rng: PRNGKeyArray | None = None,
    return_weights: bool = False,
):
    """The encoder-decoder Transformer of the paper, with teacher forcing.

    Args:
      params: from ``init_transformer``.
      src: ``[B, S]`` source ids, or ``[B, S, D]`` embeddings (see ``encode``).
      tgt: ``[B, T]`` decoder inputs (targets shifted right), or ``[B, T, D]`` embeddings.
      config: the model's ``TransformerConfig``; a static pytree, so ``jax.jit(transformer)`` takes it as is.
      src_mask, tgt_mask: ``[B, S]``, ``[B, T]`` True at real tokens (ANDed with ``!= pad_id`` for ids).
      src_positions, tgt_positions: per-token positions (default ``0 ..``, or restarting per segment).
      src_segment_ids, tgt_segment_ids: packed-sequence ids (0 = padding); sequence ``k`` of a row attends only
        within itself, and its target only to its own source.
      encoder_attention_mask, decoder_attention_mask, cross_attention_mask: masks of your own,
        ``[B|1, N|1, S|T, S|T]``, ANDed with the padding, causal and segment masks.
      dropout_rng: enables dropout when given.
      return_weights: also return ``{"encoder": [L,B,N,S,S], "decoder": [L,B,N,T,T], "cross": [L,B,N,T,S]}``.

    Returns:
      logits ``[B, T, V]`` in ``promote(float32, config.dtype)`` (and the attention weights with
      ``return_weights``).

    Example:
      >>> cfg = TransformerConfig(vocab_size=11, d_model=8, num_heads=2, d_ff=16, num_encoder_layers=2,
      ...                         num_decoder_layers=2)
      >>> params = init_transformer(jax.random.key(0), cfg)
      >>> transformer(params, jnp.ones((2, 5), jnp.int32), jnp.ones((2, 3), jnp.int32), config=cfg).shape
      (2, 3, 11)
    """
    ensure_static("transformer", return_weights=return_weights)
    check_vocab(params, config, table_name("target", config))
    r_enc, r_dec = split_rngs(dropout_rng, 2)
    encoded = encode(
        params, src, config=config, src_mask=src_mask, positions=src_positions, segment_ids=src_segment_ids,
        attention_mask=encoder_attention_mask, dropout_rng=r_enc, return_weights=return_weights,
    )  # fmt: skip
    memory = encoded[0] if return_weights else encoded
    decoded = decode(
        params, tgt, memory, None if is_embeddings(src) else src, config=config, tgt_mask=tgt_mask,
        src_mask=src_mask, positions=tgt_positions, segment_ids=tgt_segment_ids, src_segment_ids=src_segment_ids,
        self_attention_mask=decoder_attention_mask, cross_attention_mask=cross_attention_mask, dropout_rng=r_dec,
        return_weights=return_weights,
    )  # fmt: skip
    if not return_weights:
        return decoded
    logits, dec_w = decoded
    return logits, {"encoder": encoded[1], "decoder": dec_w["self"], "cross": dec_w["cross"]}


# ----------------------------------------------------------------------------------------------------------
# Decoder-only language model
# ----------------------------------------------------------------------------------------------------------


def language_model(
    params,
    tokens: Target,
    *,
    config: TransformerConfig,
    mask: Bool[Array, "B T"] | None = None,
    positions: Int[Array, "B T"] | None = None,
    segment_ids: Int[Array, "B T"] | None = None,
    attention_mask: Bool[Array, "#B #N #T #T"] | None = None,
    dropout_rng: PRNGKeyArray | None = None,
    return_weights: bool = False,
):
    """A decoder-only Transformer LM: the encoder block with a causal mask, ``num_decoder_layers`` deep.

    Args:
      params: from ``init_language_model``.
      tokens: ``[B, T]`` ids, or ``[B, T, D]`` embeddings.
      config: the model's ``TransformerConfig`` (``num_encoder_layers`` is ignored).
      mask: ``[B, T]`` True at real tokens (ANDed with ``tokens != pad_id`` for ids).
      positions: ``[B, T]`` positions (default ``0 .. T-1``, or restarting per segment).
      segment_ids: ``[B, T]`` packed-sequence ids (0 = padding): causal attention inside each sequence only.
      attention_mask: your own ``[B|1, N|1, T, T]`` mask, ANDed with the causal and padding masks.
      dropout_rng: enables dropout when given.
      return_weights: also return the self-attention weights ``[L, B, N, T, T]``.

    Returns:
      logits ``[B, T, V]`` predicting token ``t + 1`` at position ``t`` (and the weights).
    """
    ensure_static("language_model", return_weights=return_weights)
    check_vocab(params, config, LM_TABLE)
    real = real_of(tokens, mask, segment_ids, "", config)
    segments = segment_pair_mask(segment_ids, segment_ids, "language_model")
    full_mask = combine_masks(pair_mask(real, real), causal_mask(tokens.shape[1]), segments, attention_mask)
    x, weights = _self_attention_stack(
        params, "decoder", tokens, LM_TABLE, full_mask, positions_of(positions, segment_ids), config=config,
        rng=dropout_rng, return_weights=return_weights, layerdrop=config.decoder_layerdrop,
    )  # fmt: skip
    logits = output_logits(params, x, config, LM_TABLE)
    return (logits, weights) if return_weights else logits


# ----------------------------------------------------------------------------------------------------------
# Incremental decoding with a key/value cache
# ----------------------------------------------------------------------------------------------------------


def init_decode_cache(
    params,
    memory: Float[Array, "B S D"],
    src_tokens: Int[Array, "B S"] | None,
    *,
    config: TransformerConfig,
    max_len: int,
    src_mask: Bool[Array, "B S"] | None = None,
) -> dict:
    """Cache for ``decode_step``: empty self-attention keys/values and the encoder's keys/values, once.

    Args:
      params: from ``init_transformer``.
      memory: ``[B, S, D]`` from ``encode``.
      src_tokens: ``[B, S]``, for the encoder-decoder padding mask (None: use ``src_mask`` alone).
      config: the model's ``TransformerConfig``.
      max_len: the most target tokens that will be decoded (``<= config.max_len``).
      src_mask: ``[B, S]`` source positions the decoder may attend to, ANDed with ``src_tokens != pad_id``. To
        decode sequence ``k`` of a packed source (encoded with its ``segment_ids``), pass
        ``src_segment_ids == k``.

    Returns:
      ``{"self": {"k", "v"}: [L, B, max_len, K, H], "cross": {"k", "v"}: [L, B, S, K, H],
      "source_real": [B, S] bool, "index": int32 scalar}``.
    """
    if not 0 < max_len <= config.max_len:
        raise ValueError(f"max_len={max_len} must be in [1, TransformerConfig.max_len={config.max_len}]")
    real = source_real(src_tokens, src_mask, None, memory, config)
    cross = params["decoder"]["layers"]["cross_attention"]
    k, v = jax.vmap(lambda p: project_key_value(p, memory))(cross)  # [L, B, S, K, H] each
    return {
        "self": _empty_self_cache(config, memory.shape[0], max_len, config.num_decoder_layers),
        "cross": {"k": k, "v": v},
        "source_real": jnp.ones(memory.shape[:2], jnp.bool_) if real is None else real,
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
      ``(logits [B, T, V], the updated cache)``.
    """
    index, max_len = cache["index"], cache["self"]["k"].shape[2]
    stack = params["decoder"]
    y = embed_inputs(params, tokens, table_name("target", config), stack, config=config, rng=None, offset=index)
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
    logits = output_logits(params, final_norm(stack, y, config), config, table_name("target", config))
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
    x = embed_inputs(params, tokens, LM_TABLE, stack, config=config, rng=None, offset=index)
    mask = _cached_self_mask(index, tokens.shape[1], max_len)

    def block(p, h, layer_cache):
        h, (_, new_cache) = apply_encoder_block(
            p, h, mask=mask, config=config, rng=None, return_weights=False, cache=layer_cache, index=index
        )
        return h, new_cache

    x, self_cache = run_stack(block, stack["layers"], x, cache["self"], config=config)
    logits = output_logits(params, final_norm(stack, x, config), config, LM_TABLE)
    return logits, {"self": self_cache, "index": index + tokens.shape[1]}


# ----------------------------------------------------------------------------------------------------------
# Initialisation and counting
# ----------------------------------------------------------------------------------------------------------


def _init_stack(rng, init_block, num_layers: int, config: TransformerConfig):
    r_layers, r_pos = jax.random.split(rng)
    stack = {"layers": jax.vmap(lambda r: init_block(r, config))(jax.random.split(r_layers, num_layers))}
    if config.positions == "learned":
        stack["positions"] = layers.init_learned_positions(r_pos, config.max_len, config.d_model)
    if config.has_final_norm:
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
    names = [LM_TABLE] + ([] if config.tie_output_embedding else ["output_embedding"])
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
