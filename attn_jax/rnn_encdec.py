"""The RNN encoder-decoder without attention (Cho et al. 2014, "Learning Phrase Representations using RNN
Encoder-Decoder for Statistical Machine Translation", §2; the RNNencdec baseline of Bahdanau et al. 2014, and in
spirit Sutskever et al. 2014): the whole source is squeezed into one fixed-length vector ``c``.

    encoder:  h_t = GRU(h_{t-1}, E x_t)         c = tanh(h_N W_c + b_c)       (Cho et al. §2.2: c = tanh(V h_N))
    decoder:  s_0 = tanh(c W_s + b_s)           s_i = GRU(s_{i-1}, [E y_{i-1} ; c])
    readout:  p(y_i | ...) = softmax(W_o maxout(U_o s_i + V_o E y_{i-1} + C_o c))

It is RNNsearch (``attn_jax.rnnsearch``) with the attention's ``c_i`` replaced by the same ``c`` at every step,
built from the same ``attn_jax.rnn`` functions (GRU, decoder step, readout), so the two differ only in what
the decoder may look at. Cho et al. feed ``c`` to every gate of the decoder GRU through its own matrices
(``C_r c``, ``C_z c``, ``C c``); concatenating it to the input is the same function. Deviations: those of
``attn_jax.rnn`` (biases, initialisers, dropout) and a unidirectional GRU encoder as in Cho et al. (Sutskever
et al. used deep LSTMs on the reversed source).

Because ``c`` never changes, its share of the decoder's gates is computed once per sentence, and the recurrence
is a plain GRU. The decoding cache holds the state and ``c``.
"""

import dataclasses
from typing import TypedDict

import jax
import jax.numpy as jnp

from attn_jax.blocks import split_rngs
from attn_jax.rnn import (
    GRUParams,
    ReadoutParams,
    RecurrentSizes,
    check_config,
    compute_params,
    decoder_gru_step,
    embed_tokens,
    gru,
    gru_update,
    init_gru,
    init_readout,
    project_gru_inputs,
    readout,
)
from attn_jax.types import Array, Float, Int, PRNGKeyArray


class RNNEncDecParams(TypedDict):
    source_embedding: Float[Array, "Vs M"]
    target_embedding: Float[Array, "Vt M"]
    encoder: GRUParams
    w_c: Float[Array, "E E"]
    b_c: Float[Array, " E"]
    w_s: Float[Array, "E D"]
    b_s: Float[Array, " D"]
    decoder: GRUParams
    readout: ReadoutParams


@dataclasses.dataclass(frozen=True, kw_only=True)
class RNNEncDecConfig(RecurrentSizes):
    """Sizes default to Bahdanau et al.'s RNNencdec (1000 units, 620-wide embeddings, maxout 500); hashable.

    Example:
      >>> cfg = RNNEncDecConfig(source_vocab=7, target_vocab=7, hidden_dim=64)
      >>> cfg.d_model, cfg.resolved_encoder_dim
      (64, 64)
    """

    source_vocab: int  # Vs
    target_vocab: int  # Vt
    embed_dim: int = 620  # M
    hidden_dim: int = 1000  # D, the decoder state
    encoder_dim: int | None = None  # E, the encoder state and the summary c; None = hidden_dim
    maxout_dim: int = 500  # R
    pad_id: int = 0  # token id skipped by the encoder
    reset_after: bool = False  # False: the paper's GRU; True: the cuDNN/Flax variant
    dropout_rate: float = 0.0  # on embeddings and the maxout output (0 in the papers)
    max_len: int = 1024  # the longest output decoded (there is no position table)
    dtype: str = "float32"  # compute dtype; parameters stay float32
    reverse_source: bool = False  # read the source backwards (Sutskever et al. 2014); False: Cho et al.

    def __post_init__(self):
        check_config(self, ("hidden_dim", "source_vocab", "target_vocab", "embed_dim", "resolved_encoder_dim",
                            "maxout_dim", "max_len"))  # fmt: skip


def init_rnn_encdec(rng: PRNGKeyArray, config: RNNEncDecConfig, *, dtype=jnp.float32) -> RNNEncDecParams:
    """Initialises every parameter from its own split of ``rng``.

    Example:
      >>> cfg = RNNEncDecConfig(source_vocab=7, target_vocab=11, embed_dim=4, hidden_dim=5, maxout_dim=3)
      >>> p = init_rnn_encdec(jax.random.key(0), cfg)
      >>> p["decoder"]["w"].shape, p["readout"]["w_t"].shape
      ((9, 5), (14, 6))
    """
    M, D, E = config.embed_dim, config.hidden_dim, config.resolved_encoder_dim
    keys = jax.random.split(rng, 7)
    embedding_init, dense_init = jax.nn.initializers.normal(0.01), jax.nn.initializers.lecun_normal()
    return {
        "source_embedding": embedding_init(keys[0], (config.source_vocab, M), dtype),
        "target_embedding": embedding_init(keys[1], (config.target_vocab, M), dtype),
        "encoder": init_gru(keys[2], M, E, dtype=dtype),
        "w_c": dense_init(keys[3], (E, E), dtype),
        "b_c": jnp.zeros((E,), dtype),
        "w_s": dense_init(keys[4], (E, D), dtype),
        "b_s": jnp.zeros((D,), dtype),
        "decoder": init_gru(keys[5], M + E, D, dtype=dtype),
        "readout": init_readout(keys[6], D + M + E, config.maxout_dim, config.target_vocab, dtype=dtype),
    }


def encoder_states(
    params: RNNEncDecParams,
    source_tokens: Int[Array, "B S"],
    *,
    config: RNNEncDecConfig,
    dropout_rng: PRNGKeyArray | None = None,
) -> Float[Array, "B S E"]:
    """The encoder GRU's state after each source token, ``[B, S, E]`` (read backwards under ``reverse_source``).

    Example:
      >>> cfg = RNNEncDecConfig(source_vocab=7, target_vocab=11, embed_dim=4, hidden_dim=5, maxout_dim=3)
      >>> encoder_states(init_rnn_encdec(jax.random.key(0), cfg), jnp.ones((2, 3), int), config=cfg).shape
      (2, 3, 5)
    """
    params = compute_params(params, config.dtype)
    real = source_tokens != config.pad_id
    x = embed_tokens(params["source_embedding"], source_tokens, dropout_rate=config.dropout_rate, rng=dropout_rng)
    return gru(params["encoder"], x, real, reverse=config.reverse_source, reset_after=config.reset_after)


def encode(
    params: RNNEncDecParams,
    source_tokens: Int[Array, "B S"],
    *,
    config: RNNEncDecConfig,
    dropout_rng: PRNGKeyArray | None = None,
) -> tuple[Float[Array, "B E"], Float[Array, "B D"]]:
    """The encoder: the summary ``c = tanh(h_N W_c + b_c)`` and the decoder's ``s_0 = tanh(c W_s + b_s)``.

    Args:
      params: from ``init_rnn_encdec``.
      source_tokens: ``[B, S]``; ``config.pad_id`` marks padding.
      config: the sizes.
      dropout_rng: enables dropout on the source embeddings when given.

    Returns:
      ``(c [B, E], s_0 [B, D])``.

    Example:
      >>> cfg = RNNEncDecConfig(source_vocab=7, target_vocab=11, embed_dim=4, hidden_dim=5, maxout_dim=3)
      >>> c, s_0 = encode(init_rnn_encdec(jax.random.key(0), cfg), jnp.ones((2, 3), int), config=cfg)
      >>> c.shape, s_0.shape
      ((2, 5), (2, 5))
    """
    params = compute_params(params, config.dtype)
    states = encoder_states(params, source_tokens, config=config, dropout_rng=dropout_rng)
    # Padding keeps the state, so the end of the scan holds h_N of the last token read, wherever padding is.
    last = states[:, 0] if config.reverse_source else states[:, -1]  # [B, E]
    summary = jnp.tanh(last @ params["w_c"] + params["b_c"][None])
    return summary, jnp.tanh(summary @ params["w_s"] + params["b_s"][None])


def _with_summary(params, config, projected_embedding, summary):
    """Adds ``c``'s share of the decoder's gates, ``c [W_r | W_z | W][M:]``, to the embedding's."""
    context_part = project_gru_inputs(params["decoder"], summary, rows=slice(config.embed_dim, None), biases=False)
    return projected_embedding + (context_part[:, None] if projected_embedding.ndim == 3 else context_part)


def decode(
    params: RNNEncDecParams,
    summary: Float[Array, "B E"],
    initial_state: Float[Array, "B D"],
    target_inputs: Int[Array, "B T"],
    *,
    config: RNNEncDecConfig,
    dropout_rng: PRNGKeyArray | None = None,
) -> Float[Array, "B T Vt"]:
    """Teacher-forced decoding: a plain GRU over the target inputs (``c`` folded into the gates), then the readout.

    Args:
      params: from ``init_rnn_encdec``.
      summary: ``c`` from ``encode``, ``[B, E]``.
      initial_state: ``s_0`` from ``encode``, ``[B, D]``.
      target_inputs: the targets shifted right behind a BOS token, ``[B, T]``.
      config: the sizes.
      dropout_rng: enables dropout when given.

    Returns:
      The logits of ``y_i``, ``[B, T, Vt]`` float32.

    Example:
      >>> cfg = RNNEncDecConfig(source_vocab=7, target_vocab=11, embed_dim=4, hidden_dim=5, maxout_dim=3)
      >>> p = init_rnn_encdec(jax.random.key(0), cfg)
      >>> c, s_0 = encode(p, jnp.ones((2, 3), int), config=cfg)
      >>> decode(p, c, s_0, jnp.ones((2, 4), int), config=cfg).shape
      (2, 4, 11)
    """
    params = compute_params(params, config.dtype)
    r_embed, r_out = split_rngs(dropout_rng, 2)
    y = embed_tokens(params["target_embedding"], target_inputs, dropout_rate=config.dropout_rate, rng=r_embed)
    projected = project_gru_inputs(params["decoder"], y, rows=slice(0, config.embed_dim))  # [B, T, 3 D]
    projected = _with_summary(params, config, projected, summary)

    def step(state, projected_t):
        state = gru_update(params["decoder"], state, projected_t, reset_after=config.reset_after)
        return state, state

    _, states = jax.lax.scan(step, initial_state, jnp.swapaxes(projected, 0, 1))  # [B, T, 3 D] -> [T, B, 3 D]
    states = jnp.swapaxes(states, 0, 1)  # [T, B, D] -> [B, T, D]
    context = jnp.broadcast_to(summary[:, None], states.shape[:2] + summary.shape[-1:])  # [B, E] -> [B, T, E]
    return readout(params["readout"], states, y, context, dropout_rate=config.dropout_rate, rng=r_out)


def rnn_encdec(
    params: RNNEncDecParams,
    source_tokens: Int[Array, "B S"],
    target_inputs: Int[Array, "B T"],
    *,
    config: RNNEncDecConfig,
    dropout_rng: PRNGKeyArray | None = None,
) -> Float[Array, "B T Vt"]:
    """Encodes the source into ``c`` and teacher-forces the decoder: the logits of every target token.

    Example:
      >>> cfg = RNNEncDecConfig(source_vocab=7, target_vocab=11, embed_dim=4, hidden_dim=5, maxout_dim=3)
      >>> p = init_rnn_encdec(jax.random.key(0), cfg)
      >>> rnn_encdec(p, jnp.ones((2, 3), int), jnp.ones((2, 4), int), config=cfg).shape
      (2, 4, 11)
    """
    r_encode, r_decode = split_rngs(dropout_rng, 2)
    summary, initial_state = encode(params, source_tokens, config=config, dropout_rng=r_encode)
    return decode(params, summary, initial_state, target_inputs, config=config, dropout_rng=r_decode)


def init_decode_cache(
    params: RNNEncDecParams, encoded, source_tokens: Int[Array, "B S"], *, config: RNNEncDecConfig, max_len: int
) -> dict:
    """The decoding cache ``{"state": s_0 [B, D], "summary": c [B, E]}`` (the source is no longer needed)."""
    if not 0 < max_len <= config.max_len:
        raise ValueError(f"max_len={max_len} must be in [1, RNNEncDecConfig.max_len={config.max_len}]")
    summary, initial_state = encoded
    return {"state": initial_state, "summary": summary}


def decode_step(params: RNNEncDecParams, cache: dict, tokens: Int[Array, " B"], *, config: RNNEncDecConfig):
    """One decoder step on the cache: ``(logits [B, Vt] float32, the cache with s_i)``.

    Example:
      >>> cfg = RNNEncDecConfig(source_vocab=7, target_vocab=11, embed_dim=4, hidden_dim=5, maxout_dim=3)
      >>> p, src = init_rnn_encdec(jax.random.key(0), cfg), jnp.ones((2, 3), int)
      >>> cache = init_decode_cache(p, encode(p, src, config=cfg), src, config=cfg, max_len=4)
      >>> decode_step(p, cache, jnp.ones(2, int), config=cfg)[0].shape
      (2, 11)
    """
    params = compute_params(params, config.dtype)
    y = embed_tokens(params["target_embedding"], tokens)  # [B] -> [B, M]
    projected = project_gru_inputs(params["decoder"], y, rows=slice(0, config.embed_dim))
    state = decoder_gru_step(
        params["decoder"], cache["state"], projected, cache["summary"], embed_dim=config.embed_dim,
        reset_after=config.reset_after,
    )  # fmt: skip
    return readout(params["readout"], state, y, cache["summary"]), cache | {"state": state}


def reorder_cache(cache: dict, rows: Int[Array, " B"]) -> dict:
    """Beam search: hypothesis ``i`` continues from row ``rows[i]``; ``c`` is the same in a sentence's rows."""
    return cache | {"state": jnp.take(cache["state"], rows, axis=0)}
