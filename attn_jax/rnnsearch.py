"""RNNsearch (Bahdanau, Cho & Bengio 2014, §3 and appendix A): the recurrent encoder-decoder with attention that
the Transformer replaced.

    encoder (§3.2):  h_j = [h→_j ; h←_j], a forward and a backward GRU over the source embeddings
    decoder (§3.1):  c_i = sum_j alpha_ij h_j  (``attn_jax.additive.align`` with query s_{i-1})
                     s_i = GRU(s_{i-1}, [E y_{i-1} ; c_i])       s_0 = tanh(W_s h←_1 + b_s)
    readout (eq. 4): p(y_i | ...) = softmax(W_o maxout(U_o s_i + V_o E y_{i-1} + C_o c_i))

The GRU, the decoder step and the readout are ``attn_jax.rnn``'s, shared with ``attn_jax.rnn_encdec``. The
alignment score is ``config.score``: ``"additive"`` (the paper), or Luong et al. 2015's ``"dot"`` and
``"general"``, always used the paper's way (query ``s_{i-1}``, context fed to the GRU and the readout), not
with Luong's input feeding. ``dot`` needs annotations as wide as the decoder state: ``2 * encoder_dim ==
hidden_dim``, each direction half the size as in OpenNMT's bidirectional encoder.

Decoding runs on a per-sentence cache (``init_decode_cache`` / ``decode_step``) whose only per-hypothesis part
is the decoder state ``s``; ``attn_jax.decoding``'s greedy and beam search drive it through
``attn_jax.families``. Shape letters as in ``attn_jax.rnn``, plus E each encoder direction's state size and
Dk = 2 E the annotation size.
"""

import dataclasses
from typing import TypedDict

import jax
import jax.numpy as jnp

from attn_jax.additive import SCORES, align, init_alignment, prepare_keys
from attn_jax.blocks import split_rngs
from attn_jax.model_config import ConfigError
from attn_jax.rnn import (
    GRUParams,
    ReadoutParams,
    RecurrentSizes,
    check_config,
    compute_params,
    decoder_gru_step,
    embed_tokens,
    gru,
    init_gru,
    init_readout,
    project_gru_inputs,
    readout,
)
from attn_jax.types import Array, Bool, Float, Int, PRNGKeyArray


class RNNSearchParams(TypedDict, total=False):
    source_embedding: Float[Array, "Vs M"]
    target_embedding: Float[Array, "Vt M"]
    encoder_forward: GRUParams
    encoder_backward: GRUParams
    w_s: Float[Array, "E D"]
    b_s: Float[Array, " D"]
    attention: dict  # additive {w_q, w_k, b, v}, general {w_a}; absent for dot
    decoder: GRUParams
    readout: ReadoutParams


@dataclasses.dataclass(frozen=True, kw_only=True)
class RNNSearchConfig(RecurrentSizes):
    """Sizes default to the paper's RNNsearch (appendix A.2); hashable, so it can be a static argument.

    Example:
      >>> cfg = RNNSearchConfig(source_vocab=7, target_vocab=7)
      >>> cfg.d_model, cfg.resolved_encoder_dim, cfg.vocab_size
      (1000, 1000, 7)
    """

    source_vocab: int  # Vs
    target_vocab: int  # Vt
    embed_dim: int = 620  # M, the paper's m
    hidden_dim: int = 1000  # D, the decoder state (the paper's n)
    encoder_dim: int | None = None  # E, each encoder direction's state; None = hidden_dim (the paper)
    alignment_dim: int = 1000  # A, the additive score's hidden size (the paper's n')
    maxout_dim: int = 500  # R, the paper's l
    score: str = "additive"  # "additive" (the paper), "dot" or "general" (Luong et al. 2015)
    pad_id: int = 0  # token id skipped by the encoder and the attention
    reset_after: bool = False  # False: the paper's GRU; True: the cuDNN/Flax variant
    dropout_rate: float = 0.0  # on embeddings and the maxout output (0 in the paper)
    max_len: int = 1024  # the longest output decoded (there is no position table)
    dtype: str = "float32"  # compute dtype; parameters stay float32

    def __post_init__(self):
        check_config(self, ("hidden_dim", "source_vocab", "target_vocab", "embed_dim", "resolved_encoder_dim",
                            "alignment_dim", "maxout_dim", "max_len"))  # fmt: skip
        if self.score not in SCORES:
            raise ConfigError(f"RNNSearchConfig.score: must be one of {SCORES}, got {self.score!r}")
        if self.score == "dot" and 2 * self.resolved_encoder_dim != self.hidden_dim:
            raise ConfigError(
                f"RNNSearchConfig.score: 'dot' needs annotations as wide as the decoder state, 2 * encoder_dim "
                f"({2 * self.resolved_encoder_dim}) == hidden_dim ({self.hidden_dim}); set encoder_dim to "
                f"{self.hidden_dim / 2:g} or use 'general'"
            )


# ----------------------------------------------------------------------------------------------------------
# Parameters and the encoder
# ----------------------------------------------------------------------------------------------------------


def init_rnnsearch(rng: PRNGKeyArray, config: RNNSearchConfig, *, dtype=jnp.float32) -> RNNSearchParams:
    """Initialises every RNNsearch parameter from its own split of ``rng``.

    Example:
      >>> cfg = RNNSearchConfig(source_vocab=7, target_vocab=11, embed_dim=4, hidden_dim=5, alignment_dim=6,
      ...                       maxout_dim=3)
      >>> p = init_rnnsearch(jax.random.key(0), cfg)
      >>> p["attention"]["w_k"].shape, p["readout"]["w_t"].shape
      ((10, 6), (19, 6))
    """
    M, D, E = config.embed_dim, config.hidden_dim, config.resolved_encoder_dim
    keys = jax.random.split(rng, 8)
    embedding_init, dense_init = jax.nn.initializers.normal(0.01), jax.nn.initializers.lecun_normal()
    params = {
        "source_embedding": embedding_init(keys[0], (config.source_vocab, M), dtype),
        "target_embedding": embedding_init(keys[1], (config.target_vocab, M), dtype),
        "encoder_forward": init_gru(keys[2], M, E, dtype=dtype),
        "encoder_backward": init_gru(keys[3], M, E, dtype=dtype),
        "w_s": dense_init(keys[4], (E, D), dtype),
        "b_s": jnp.zeros((D,), dtype),
        "decoder": init_gru(keys[6], M + 2 * E, D, dtype=dtype),
        "readout": init_readout(keys[7], D + M + 2 * E, config.maxout_dim, config.target_vocab, dtype=dtype),
    }
    attention = init_alignment(keys[5], config.score, D, 2 * E, config.alignment_dim, dtype=dtype)
    return params | ({"attention": attention} if attention else {})  # dot has no parameters


def encode(
    params: RNNSearchParams,
    source_tokens: Int[Array, "B S"],
    *,
    config: RNNSearchConfig,
    dropout_rng: PRNGKeyArray | None = None,
) -> tuple[Float[Array, "B S Dk"], Float[Array, "B D"]]:
    """The bidirectional encoder (§3.2) and the decoder's initial state (appendix A.2.2).

    Args:
      params: from ``init_rnnsearch``.
      source_tokens: ``[B, S]``; ``config.pad_id`` marks padding.
      config: the sizes.
      dropout_rng: enables dropout on the source embeddings when given.

    Returns:
      The annotations ``h_j = [h→_j ; h←_j]``, ``[B, S, 2 E]``, and ``s_0 = tanh(h←_1 W_s + b_s)``, ``[B, D]``.

    Example:
      >>> cfg = RNNSearchConfig(source_vocab=7, target_vocab=11, embed_dim=4, hidden_dim=5, alignment_dim=6,
      ...                       maxout_dim=3)
      >>> annotations, s_0 = encode(init_rnnsearch(jax.random.key(0), cfg), jnp.ones((2, 3), int), config=cfg)
      >>> annotations.shape, s_0.shape
      ((2, 3, 10), (2, 5))
    """
    params = compute_params(params, config.dtype)
    real = source_tokens != config.pad_id
    x = embed_tokens(params["source_embedding"], source_tokens, dropout_rate=config.dropout_rate, rng=dropout_rng)
    forward = gru(params["encoder_forward"], x, real, reset_after=config.reset_after)
    backward = gru(params["encoder_backward"], x, real, reverse=True, reset_after=config.reset_after)
    annotations = jnp.concatenate([forward, backward], axis=-1)  # [B, S, 2 E]
    # The backward state at position 0 has read the whole sentence (padding positions only carry it along).
    initial_state = jnp.tanh(backward[:, 0] @ params["w_s"] + params["b_s"][None])
    return annotations, initial_state


# ----------------------------------------------------------------------------------------------------------
# The decoder: one step, teacher forcing, and the decoding cache
# ----------------------------------------------------------------------------------------------------------


def _attend_and_update(params, state, projected_embedding, annotations, keys, source_mask, config, return_weights):
    """``c_i`` from ``s_{i-1}``, then ``s_i``: ``(s_i [B, D], c_i [B, Dk], alpha_i [B, S] or None)``."""
    context, weights = align(
        config.score, params.get("attention", {}), state[:, None], keys, annotations,
        mask=source_mask[:, None, :], return_weights=True,
    )  # fmt: skip
    context = context[:, 0]  # [B, 1, Dk] -> [B, Dk]
    state = decoder_gru_step(
        params["decoder"], state, projected_embedding, context, embed_dim=config.embed_dim,
        reset_after=config.reset_after,
    )  # fmt: skip
    return state, context, (weights[:, 0] if return_weights else None)


def decode(
    params: RNNSearchParams,
    annotations: Float[Array, "B S Dk"],
    initial_state: Float[Array, "B D"],
    source_mask: Bool[Array, "B S"],
    target_inputs: Int[Array, "B T"],
    *,
    config: RNNSearchConfig,
    dropout_rng: PRNGKeyArray | None = None,
    return_weights: bool = False,
):
    """Teacher-forced decoding: the recurrence under ``jax.lax.scan``, then the readout of all positions at once.

    Args:
      params: from ``init_rnnsearch``.
      annotations: from ``encode``, ``[B, S, 2 E]``.
      initial_state: ``s_0`` from ``encode``, ``[B, D]``.
      source_mask: ``[B, S]``, True at real source tokens.
      target_inputs: ``y_{i-1}`` for each position (the targets shifted right behind a BOS), ``[B, T]``.
      config: the sizes.
      dropout_rng: enables dropout when given.
      return_weights: also return the alignments ``alpha [B, T, S]`` (float32).

    Returns:
      The logits of ``y_i``, ``[B, T, Vt]`` float32 (and the alignments with ``return_weights``).

    Example:
      >>> cfg = RNNSearchConfig(source_vocab=7, target_vocab=11, embed_dim=4, hidden_dim=5, alignment_dim=6,
      ...                       maxout_dim=3)
      >>> p = init_rnnsearch(jax.random.key(0), cfg)
      >>> annotations, s_0 = encode(p, jnp.ones((2, 3), int), config=cfg)
      >>> decode(p, annotations, s_0, jnp.ones((2, 3), bool), jnp.ones((2, 4), int), config=cfg).shape
      (2, 4, 11)
    """
    params = compute_params(params, config.dtype)
    r_embed, r_out = split_rngs(dropout_rng, 2)
    y = embed_tokens(params["target_embedding"], target_inputs, dropout_rate=config.dropout_rate, rng=r_embed)
    projected = project_gru_inputs(params["decoder"], y, rows=slice(0, config.embed_dim))  # [B, T, 3 D]
    keys = prepare_keys(config.score, params.get("attention", {}), annotations)

    def step(state, projected_t):
        state, context, weights = _attend_and_update(
            params, state, projected_t, annotations, keys, source_mask, config, return_weights
        )
        return state, (state, context) + ((weights,) if return_weights else ())

    _, outputs = jax.lax.scan(step, initial_state, jnp.swapaxes(projected, 0, 1))  # [B, T, 3 D] -> [T, B, 3 D]
    outputs = [jnp.swapaxes(x, 0, 1) for x in outputs]  # [T, B, ...] -> [B, T, ...]
    logits = readout(params["readout"], outputs[0], y, outputs[1], dropout_rate=config.dropout_rate, rng=r_out)
    return (logits, outputs[2]) if return_weights else logits


def rnnsearch(
    params: RNNSearchParams,
    source_tokens: Int[Array, "B S"],
    target_inputs: Int[Array, "B T"],
    *,
    config: RNNSearchConfig,
    dropout_rng: PRNGKeyArray | None = None,
    return_weights: bool = False,
):
    """Encodes the source and teacher-forces the decoder: the logits of every target token.

    Args:
      params: from ``init_rnnsearch``.
      source_tokens: ``[B, S]``; ``config.pad_id`` marks padding.
      target_inputs: the targets shifted right behind a BOS token, ``[B, T]``.
      config: the sizes.
      dropout_rng: enables dropout when given.
      return_weights: also return the alignments ``alpha [B, T, S]`` (Bahdanau et al.'s Figure 3).

    Returns:
      ``[B, T, Vt]`` float32 logits (and the alignments with ``return_weights``).

    Example:
      >>> cfg = RNNSearchConfig(source_vocab=7, target_vocab=11, embed_dim=4, hidden_dim=5, alignment_dim=6,
      ...                       maxout_dim=3)
      >>> p = init_rnnsearch(jax.random.key(0), cfg)
      >>> rnnsearch(p, jnp.ones((2, 3), int), jnp.ones((2, 4), int), config=cfg).shape
      (2, 4, 11)
    """
    r_encode, r_decode = split_rngs(dropout_rng, 2)
    annotations, initial_state = encode(params, source_tokens, config=config, dropout_rng=r_encode)
    source_mask = source_tokens != config.pad_id
    return decode(
        params, annotations, initial_state, source_mask, target_inputs, config=config, dropout_rng=r_decode,
        return_weights=return_weights,
    )  # fmt: skip


def init_decode_cache(params: RNNSearchParams, encoded, source_tokens: Int[Array, "B S"], *, config, max_len: int):
    """The decoding cache: ``{"state": s_0 [B, D], "annotations", "keys" (prepared once), "source_real"}``.

    Args:
      params: from ``init_rnnsearch``.
      encoded: ``encode``'s ``(annotations, s_0)``.
      source_tokens: ``[B, S]``, for the attention mask.
      config: the sizes.
      max_len: the most tokens that will be decoded (checked against ``config.max_len``).

    Returns:
      The cache dict; ``decode_step`` replaces only its ``"state"``.
    """
    if not 0 < max_len <= config.max_len:
        raise ValueError(f"max_len={max_len} must be in [1, RNNSearchConfig.max_len={config.max_len}]")
    annotations, initial_state = encoded
    keys = prepare_keys(config.score, compute_params(params, config.dtype).get("attention", {}), annotations)
    real = source_tokens != config.pad_id
    return {"state": initial_state, "annotations": annotations, "keys": keys, "source_real": real}


def decode_step(params: RNNSearchParams, cache: dict, tokens: Int[Array, " B"], *, config: RNNSearchConfig):
    """One decoder step (§3.1) on the cache: attend with ``s_{i-1}``, update the GRU, read out ``y_i``'s logits.

    Args:
      params: from ``init_rnnsearch``.
      cache: from ``init_decode_cache`` or a previous ``decode_step``.
      tokens: ``y_{i-1}``, ``[B]``.
      config: the sizes.

    Returns:
      ``(logits [B, Vt] float32, the cache with s_i)``; the logits equal ``decode``'s at the same position.

    Example:
      >>> cfg = RNNSearchConfig(source_vocab=7, target_vocab=11, embed_dim=4, hidden_dim=5, alignment_dim=6,
      ...                       maxout_dim=3)
      >>> p, src = init_rnnsearch(jax.random.key(0), cfg), jnp.ones((2, 3), int)
      >>> cache = init_decode_cache(p, encode(p, src, config=cfg), src, config=cfg, max_len=4)
      >>> logits, cache = decode_step(p, cache, jnp.ones(2, int), config=cfg)
      >>> logits.shape, cache["state"].shape
      ((2, 11), (2, 5))
    """
    params = compute_params(params, config.dtype)
    y = embed_tokens(params["target_embedding"], tokens)  # [B] -> [B, M]
    projected = project_gru_inputs(params["decoder"], y, rows=slice(0, config.embed_dim))
    state, context, _ = _attend_and_update(
        params, cache["state"], projected, cache["annotations"], cache["keys"], cache["source_real"], config, False
    )
    return readout(params["readout"], state, y, context), cache | {"state": state}


def reorder_cache(cache: dict, rows: Int[Array, " B"]) -> dict:
    """Beam search: hypothesis ``i`` continues from row ``rows[i]``. Only the state differs between a sentence's
    hypotheses (its annotations are the same in every row of the sentence), so only the state is gathered."""
    return cache | {"state": jnp.take(cache["state"], rows, axis=0)}
