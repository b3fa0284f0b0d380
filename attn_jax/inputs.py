"""What surrounds the stacks: inputs (token embeddings or the caller's, positions), token masks, logits.

Paper §3.4 (embeddings x sqrt(d_model), the pre-softmax projection through the embedding matrix) and §3.5
(positions). Shared by ``attn_jax.model``'s full-sequence functions and its key/value-cache steps. Packed rows
(several sequences per row) give per-token positions and segment ids (``attn_jax.masks``).
"""

import jax.numpy as jnp

from attn_jax import fused_random, layers
from attn_jax.masks import real_tokens, segment_positions
from attn_jax.model_config import ConfigError, TransformerConfig
from attn_jax.types import upcast_dtype


def is_embeddings(inputs) -> bool:
    return jnp.issubdtype(inputs.dtype, jnp.floating)


# Word dropout draws from fold_in(the embedding's dropout key, this): the dropout streams of the paper's model
# stay as they are when it is off, and it is independent of them when it is on.
_WORD_DROPOUT_STREAM = 0x57D0


def embed_inputs(params, inputs, table: str, stack, *, config: TransformerConfig, rng, offset=0, positions=None):
    """Token embedding (x sqrt(D)), or the caller's embeddings, plus positions, then dropout (§3.4, §3.5, §5.4).

    ``positions`` ``[B, T]`` (packed rows: restarting at 0 in each sequence) replaces ``offset + 0 .. T-1``.
    With ``config.word_dropout_rate`` and a ``rng`` (training), whole token ids are dropped first (``word_dropout``;
    the caller's embeddings are used as given).
    """
    embeddings = is_embeddings(inputs)
    if inputs.ndim != (3 if embeddings else 2) or inputs.shape[1] == 0:
        raise ValueError(f"inputs must be non-empty [B, T] token ids or [B, T, D] embeddings, got {inputs.shape}")
    T = inputs.shape[1]
    if isinstance(offset, int) and offset + T > config.max_len:
        raise ValueError(f"sequence of length {offset + T} exceeds TransformerConfig.max_len={config.max_len}")
    if positions is not None and positions.shape != inputs.shape[:2]:
        raise ValueError(f"positions must be [B, T] = {inputs.shape[:2]} like the inputs, got {positions.shape}")
    dtype = jnp.dtype(config.dtype)
    if embeddings:
        if inputs.shape[2] != config.d_model:
            raise ValueError(f"embeddings {inputs.shape} must end in d_model={config.d_model}")
        x = inputs.astype(dtype)
    else:
        x = word_dropout(params[table], inputs, config=config, rng=rng)
    which = T if positions is None else positions  # [T, D] broadcast over the batch, or [B, T, D] per token
    if config.positions == "learned":
        pe = layers.learned_positions(stack["positions"], which, offset=offset)
    else:
        pe = layers.sinusoidal_positions(which, config.d_model, offset=offset, dtype=upcast_dtype(dtype))
    pe = pe[None] if positions is None else pe
    return layers.dropout(x + pe.astype(dtype), config.dropout_rate, rng)


def word_dropout(table_params, tokens, *, config: TransformerConfig, rng):
    """The scaled embedding of ``tokens`` ``[B, T]`` after word dropout: ``[B, T, D]``.

    Each non-padding token is dropped with probability ``config.word_dropout_rate`` when ``rng`` is given:
    ``word_dropout_mode="zero"`` zeroes its embedding (its position is still added), ``"unk"`` embeds
    ``config.unk_id`` in its place. Only the model's inputs (source, decoder inputs) pass here; the targets the
    loss reads never do, and padding is never dropped.
    """
    dtype = jnp.dtype(config.dtype)
    word_rng = None if rng is None else fused_random.fold_in(rng, _WORD_DROPOUT_STREAM)
    dropped = layers.word_dropout_mask(tokens, config.word_dropout_rate, word_rng, pad_id=config.pad_id)
    if dropped is not None and config.word_dropout_mode == "unk":
        tokens = jnp.where(dropped, jnp.asarray(config.unk_id, tokens.dtype), tokens)
    x = layers.embed(table_params, tokens, scale=config.scale_embeddings, dtype=dtype)
    if dropped is not None and config.word_dropout_mode == "zero":
        x = jnp.where(dropped[..., None], jnp.zeros((), dtype), x)  # [B, T] -> [B, T, 1]
    return x


def real_of(inputs, mask, segment_ids, name: str, config: TransformerConfig, *, shape=None):
    """``[B, T]`` True at real tokens (see ``masks.real_tokens``); embeddings have no padding id to read."""
    ids = None if inputs is None or is_embeddings(inputs) else inputs
    shape = inputs.shape[:2] if shape is None else shape
    return real_tokens(ids, mask=mask, segment_ids=segment_ids, pad_id=config.pad_id, shape=shape, name=name)


def positions_of(positions, segment_ids):
    """The caller's positions; else, for packed rows, positions restarting at each segment; else None."""
    if positions is None and segment_ids is not None:
        return segment_positions(segment_ids)
    return positions


def final_norm(stack, x, config: TransformerConfig):
    return layers.layer_norm(stack["norm"], x, epsilon=config.layer_norm_epsilon) if config.has_final_norm else x


# A decoder-only model has one vocabulary table, whatever share_embeddings says.
LM_TABLE = "embedding"


def table_name(kind: str, config: TransformerConfig) -> str:
    """The parameter key of the ``"source"`` or ``"target"`` embedding of the encoder-decoder model."""
    return "embedding" if config.share_embeddings else f"{kind}_embedding"


def source_real(src_tokens, src_mask, src_segment_ids, memory, config: TransformerConfig):
    """``[B, S]`` True at real source positions (from ids, a mask and/or segment ids), or None."""
    if src_tokens is not None and (src_tokens.shape != memory.shape[:2] or is_embeddings(src_tokens)):
        raise ValueError(f"src_tokens must be [B, S] ids matching memory {memory.shape}, got {src_tokens.shape}")
    return real_of(src_tokens, src_mask, src_segment_ids, "src_", config, shape=memory.shape[:2])


def output_logits(params, y, config: TransformerConfig, input_table: str):
    """Pre-softmax projection through the input embedding (tied, §3.4) or a separate output table."""
    table = input_table if config.tie_output_embedding else "output_embedding"
    return layers.shared_logits(params[table], y).astype(upcast_dtype(y.dtype))


def check_vocab(params, config: TransformerConfig, table_name: str):
    table = params[table_name]["embedding"]
    if table.shape != (config.vocab_size, config.d_model):
        raise ConfigError(
            f"TransformerConfig.vocab_size/d_model: params have an embedding of shape {table.shape}, "
            f"config expects ({config.vocab_size}, {config.d_model})"
        )
