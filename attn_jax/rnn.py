"""RNNsearch (Bahdanau, Cho & Bengio 2014, §3 and appendix A): the recurrent encoder-decoder with additive
attention that the Transformer replaced.

    encoder (§3.2):  h_j = [h→_j ; h←_j], a forward and a backward GRU over the source embeddings
    decoder (§3.1):  c_i = sum_j alpha_ij h_j  (``attn_jax.additive`` with query s_{i-1})
                     s_i = GRU(s_{i-1}, [E y_{i-1} ; c_i])       s_0 = tanh(W_s h←_1 + b_s)
    readout (eq. 4): p(y_i | ...) = softmax(W_o maxout(U_o s_i + V_o E y_{i-1} + C_o c_i))

Shape letters (beyond ``attn_jax.types``): M embedding size (the paper's m), D GRU state size (n), I a GRU's
input size, Dk = 2 D the annotation size, A the alignment size (n'), R the maxout width (l), Vs / Vt the source /
target vocabularies.

Deviations from the paper, all named: biases everywhere (the paper omits them "to make the equations less
cluttered"); the GRU's update gate follows the paper (``s_i = (1 - z) s_{i-1} + z s~_i``) but
``reset_after=True`` switches to the cuDNN/Flax candidate ``tanh(W x + r * (U s + b_u))``; the three readout
matrices ``U_o, V_o, C_o`` are one matrix over the concatenation; Flax's GRUCell initialisers, not the paper's.
Padding is skipped by keeping the GRU state unchanged at padding positions, so padding never reaches a real
token's state whichever side it is on.
"""

import dataclasses
from typing import TypedDict

import jax
import jax.numpy as jnp

from attn_jax.additive import additive_attention_projected, init_additive_attention, project_keys
from attn_jax.types import AdditiveAttentionParams, Array, Bool, Float, Int, PRNGKeyArray


class GRUParams(TypedDict):
    """r = σ(x W_r + s U_r + b_r), z = σ(x W_z + s U_z + b_z), s~ = tanh(x W + (r ∘ s) U + b_u + b)."""

    w_r: Float[Array, "I D"]
    u_r: Float[Array, "D D"]
    b_r: Float[Array, " D"]
    w_z: Float[Array, "I D"]
    u_z: Float[Array, "D D"]
    b_z: Float[Array, " D"]
    w: Float[Array, "I D"]
    u: Float[Array, "D D"]
    b: Float[Array, " D"]
    b_u: Float[Array, " D"]


class ReadoutParams(TypedDict):
    w_t: Float[Array, "D+M+Dk 2*R"]
    b_t: Float[Array, " 2*R"]
    w_o: Float[Array, "R Vt"]
    b_o: Float[Array, " Vt"]


class RNNSearchParams(TypedDict):
    source_embedding: Float[Array, "Vs M"]
    target_embedding: Float[Array, "Vt M"]
    encoder_forward: GRUParams
    encoder_backward: GRUParams
    w_s: Float[Array, "D D"]
    b_s: Float[Array, " D"]
    attention: AdditiveAttentionParams
    decoder: GRUParams
    readout: ReadoutParams


@dataclasses.dataclass(frozen=True, kw_only=True)
class RNNSearchConfig:
    """Sizes default to the paper's RNNsearch (appendix A.2); hashable, so it can be a static argument."""

    source_vocab: int  # Vs
    target_vocab: int  # Vt
    embed_dim: int = 620  # M, the paper's m
    hidden_dim: int = 1000  # D, the paper's n
    alignment_dim: int = 1000  # A, the paper's n'
    maxout_dim: int = 500  # R, the paper's l
    pad_id: int = 0  # token id skipped by the encoder and the attention
    reset_after: bool = False  # False: the paper's GRU; True: the cuDNN/Flax variant

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type is int and field.name != "pad_id" and value <= 0:
                raise ValueError(f"RNNSearchConfig.{field.name} must be positive, got {value}")


# ----------------------------------------------------------------------------------------------------------
# GRU
# ----------------------------------------------------------------------------------------------------------


def init_gru(rng: PRNGKeyArray, input_dim: int, hidden_dim: int, *, dtype=jnp.float32) -> GRUParams:
    """LeCun-normal input weights, orthogonal recurrent weights, zero biases (Flax's GRUCell defaults).

    Args:
      rng: PRNG key.
      input_dim: ``I``.
      hidden_dim: ``D``.
      dtype: parameter dtype.

    Returns:
      ``GRUParams``: ``w_*: [I, D]``, ``u_*: [D, D]``, biases ``[D]``.

    Example:
      >>> p = init_gru(jax.random.key(0), 3, 5)
      >>> p["w_r"].shape, p["u"].shape, p["b_u"].shape
      ((3, 5), (5, 5), (5,))
    """
    keys = iter(jax.random.split(rng, 6))
    input_init, recurrent_init = jax.nn.initializers.lecun_normal(), jax.nn.initializers.orthogonal()
    params = {}
    for gate in ("_r", "_z", ""):
        params[f"w{gate}"] = input_init(next(keys), (input_dim, hidden_dim), dtype)
        params[f"u{gate}"] = recurrent_init(next(keys), (hidden_dim, hidden_dim), dtype)
        params[f"b{gate}"] = jnp.zeros((hidden_dim,), dtype)
    params["b_u"] = jnp.zeros((hidden_dim,), dtype)
    return params


def gru_cell(
    params: GRUParams, state: Float[Array, "B D"], inputs: Float[Array, "B I"], *, reset_after: bool = False
) -> Float[Array, "B D"]:
    """One GRU step (Cho et al. 2014; Bahdanau et al. 2014 appendix A.1.1): the new state ``[B, D]``.

    Args:
      params: from ``init_gru``.
      state: ``s_{i-1}``, ``[B, D]``.
      inputs: ``x_i``, ``[B, I]``.
      reset_after: apply the reset gate after the recurrent product (cuDNN/Flax) instead of before (paper).

    Returns:
      ``s_i = (1 - z) * s_{i-1} + z * s~_i``, ``[B, D]``.

    Example:
      >>> p = init_gru(jax.random.key(0), 3, 5)
      >>> gru_cell(p, jnp.zeros((2, 5)), jnp.ones((2, 3))).shape
      (2, 5)
    """

    def gate(name):
        return jax.nn.sigmoid(inputs @ params[f"w_{name}"] + state @ params[f"u_{name}"] + params[f"b_{name}"][None])

    r, z = gate("r"), gate("z")
    if reset_after:
        recurrent = r * (state @ params["u"] + params["b_u"][None])
    else:
        recurrent = (r * state) @ params["u"] + params["b_u"][None]
    candidate = jnp.tanh(inputs @ params["w"] + params["b"][None] + recurrent)
    return (1.0 - z) * state + z * candidate


def gru(
    params: GRUParams,
    inputs: Float[Array, "B L I"],
    mask: Bool[Array, "B L"],
    *,
    reverse: bool = False,
    reset_after: bool = False,
) -> Float[Array, "B L D"]:
    """Runs ``gru_cell`` over time with ``jax.lax.scan``, from a zero state, skipping masked positions.

    Args:
      params: from ``init_gru``.
      inputs: ``[B, L, I]``.
      mask: ``[B, L]``, True at real tokens; a masked position keeps the previous state.
      reverse: run from the last position to the first (the backward encoder).
      reset_after: see ``gru_cell``.

    Returns:
      The state after each position, ``[B, L, D]`` (in input order, also when ``reverse``).

    Example:
      >>> p = init_gru(jax.random.key(0), 3, 5)
      >>> gru(p, jnp.ones((2, 4, 3)), jnp.ones((2, 4), bool), reverse=True).shape
      (2, 4, 5)
    """

    def step(state, inputs_and_mask):
        x, real = inputs_and_mask
        new_state = gru_cell(params, state, x, reset_after=reset_after)
        state = jnp.where(real[:, None], new_state, state)
        return state, state

    initial = jnp.zeros((inputs.shape[0], params["u"].shape[0]), inputs.dtype)
    # [B, L, ...] -> [L, B, ...]: scan walks the leading axis.
    time_major = (jnp.swapaxes(inputs, 0, 1), jnp.swapaxes(mask, 0, 1))
    _, states = jax.lax.scan(step, initial, time_major, reverse=reverse)
    return jnp.swapaxes(states, 0, 1)  # [L, B, D] -> [B, L, D]


def from_flax_linen_gru(variables) -> GRUParams:
    """Maps ``flax.linen.GRUCell`` variables onto ``GRUParams``, for ``gru_cell(..., reset_after=True)``.

    Flax updates ``h = (1 - z) n + z h``, so its ``z`` is the paper's ``1 - z``; since
    ``1 - σ(a) = σ(-a)``, the update-gate weights are negated.

    Args:
      variables: the cell's variables, with or without the top-level ``"params"`` collection.

    Returns:
      ``GRUParams``.

    Example:
      >>> import flax.linen as nn
      >>> v = nn.GRUCell(features=5).init(jax.random.key(0), jnp.zeros((1, 5)), jnp.ones((1, 3)))
      >>> from_flax_linen_gru(v)["w_z"].shape
      (3, 5)
    """
    linen = variables.get("params", variables)
    return {
        "w_r": jnp.asarray(linen["ir"]["kernel"]),
        "u_r": jnp.asarray(linen["hr"]["kernel"]),
        "b_r": jnp.asarray(linen["ir"]["bias"]),
        "w_z": -jnp.asarray(linen["iz"]["kernel"]),
        "u_z": -jnp.asarray(linen["hz"]["kernel"]),
        "b_z": -jnp.asarray(linen["iz"]["bias"]),
        "w": jnp.asarray(linen["in"]["kernel"]),
        "u": jnp.asarray(linen["hn"]["kernel"]),
        "b": jnp.asarray(linen["in"]["bias"]),
        "b_u": jnp.asarray(linen["hn"]["bias"]),
    }


# ----------------------------------------------------------------------------------------------------------
# RNNsearch
# ----------------------------------------------------------------------------------------------------------


def init_rnnsearch(rng: PRNGKeyArray, cfg: RNNSearchConfig, *, dtype=jnp.float32) -> RNNSearchParams:
    """Initialises every RNNsearch parameter from its own split of ``rng``.

    Args:
      rng: PRNG key.
      cfg: the sizes.
      dtype: parameter dtype.

    Returns:
      ``RNNSearchParams``.

    Example:
      >>> cfg = RNNSearchConfig(source_vocab=7, target_vocab=11, embed_dim=4, hidden_dim=5, alignment_dim=6,
      ...                       maxout_dim=3)
      >>> p = init_rnnsearch(jax.random.key(0), cfg)
      >>> p["attention"]["w_k"].shape, p["readout"]["w_t"].shape
      ((10, 6), (19, 6))
    """
    M, D, A, R = cfg.embed_dim, cfg.hidden_dim, cfg.alignment_dim, cfg.maxout_dim
    keys = jax.random.split(rng, 8)
    embedding_init, dense_init = jax.nn.initializers.normal(0.01), jax.nn.initializers.lecun_normal()
    return {
        "source_embedding": embedding_init(keys[0], (cfg.source_vocab, M), dtype),
        "target_embedding": embedding_init(keys[1], (cfg.target_vocab, M), dtype),
        "encoder_forward": init_gru(keys[2], M, D, dtype=dtype),
        "encoder_backward": init_gru(keys[3], M, D, dtype=dtype),
        "w_s": dense_init(keys[4], (D, D), dtype),
        "b_s": jnp.zeros((D,), dtype),
        "attention": init_additive_attention(keys[5], D, 2 * D, A, dtype=dtype),
        "decoder": init_gru(keys[6], M + 2 * D, D, dtype=dtype),
        "readout": _init_readout(keys[7], D + M + 2 * D, R, cfg.target_vocab, dtype),
    }


def _init_readout(rng, input_dim, R, V, dtype) -> ReadoutParams:
    rt, ro = jax.random.split(rng)
    dense_init = jax.nn.initializers.lecun_normal()
    return {
        "w_t": dense_init(rt, (input_dim, 2 * R), dtype),
        "b_t": jnp.zeros((2 * R,), dtype),
        "w_o": dense_init(ro, (R, V), dtype),
        "b_o": jnp.zeros((V,), dtype),
    }


def encode(
    params: RNNSearchParams, source_tokens: Int[Array, "B S"], *, cfg: RNNSearchConfig
) -> tuple[Float[Array, "B S Dk"], Float[Array, "B D"]]:
    """The bidirectional encoder (§3.2) and the decoder's initial state (appendix A.2.2).

    Args:
      params: from ``init_rnnsearch``.
      source_tokens: ``[B, S]``; ``cfg.pad_id`` marks padding.
      cfg: the sizes.

    Returns:
      The annotations ``h_j = [h→_j ; h←_j]``, ``[B, S, 2 D]``, and ``s_0 = tanh(h←_1 W_s + b_s)``, ``[B, D]``.

    Example:
      >>> cfg = RNNSearchConfig(source_vocab=7, target_vocab=11, embed_dim=4, hidden_dim=5, alignment_dim=6,
      ...                       maxout_dim=3)
      >>> annotations, s_0 = encode(init_rnnsearch(jax.random.key(0), cfg), jnp.ones((2, 3), int), cfg=cfg)
      >>> annotations.shape, s_0.shape
      ((2, 3, 10), (2, 5))
    """
    real = source_tokens != cfg.pad_id
    x = jnp.take(params["source_embedding"], source_tokens, axis=0)  # [B, S] -> [B, S, M]
    forward = gru(params["encoder_forward"], x, real, reset_after=cfg.reset_after)
    backward = gru(params["encoder_backward"], x, real, reverse=True, reset_after=cfg.reset_after)
    annotations = jnp.concatenate([forward, backward], axis=-1)  # [B, S, 2 D]
    # The backward state at position 0 has read the whole sentence (padding positions only carry it along).
    initial_state = jnp.tanh(backward[:, 0] @ params["w_s"] + params["b_s"][None])
    return annotations, initial_state


def decoder_step(
    params: RNNSearchParams,
    state: Float[Array, "B D"],
    previous_tokens: Int[Array, " B"],
    annotations: Float[Array, "B S Dk"],
    projected_keys: Float[Array, "B S A"],
    source_mask: Bool[Array, "B S"],
    *,
    cfg: RNNSearchConfig,
) -> tuple[Float[Array, "B D"], Float[Array, "B Vt"]]:
    """One decoder step (§3.1): attend with ``s_{i-1}``, update the GRU, read out the next-token logits.

    Args:
      params: from ``init_rnnsearch``.
      state: ``s_{i-1}``, ``[B, D]``.
      previous_tokens: ``y_{i-1}``, ``[B]``.
      annotations: from ``encode``, ``[B, S, 2 D]``.
      projected_keys: ``project_keys(params["attention"], annotations)``, ``[B, S, A]``, computed once.
      source_mask: ``[B, S]``, True at real source tokens.
      cfg: the sizes.

    Returns:
      ``s_i``, ``[B, D]``, and the logits of ``y_i``, ``[B, Vt]``.

    Example:
      >>> cfg = RNNSearchConfig(source_vocab=7, target_vocab=11, embed_dim=4, hidden_dim=5, alignment_dim=6,
      ...                       maxout_dim=3)
      >>> p = init_rnnsearch(jax.random.key(0), cfg)
      >>> annotations, s_0 = encode(p, jnp.ones((2, 3), int), cfg=cfg)
      >>> keys = project_keys(p["attention"], annotations)
      >>> s_1, logits = decoder_step(p, s_0, jnp.ones(2, int), annotations, keys, jnp.ones((2, 3), bool), cfg=cfg)
      >>> s_1.shape, logits.shape
      ((2, 5), (2, 11))
    """
    y = jnp.take(params["target_embedding"], previous_tokens, axis=0)  # [B] -> [B, M]
    context = additive_attention_projected(
        params["attention"], state[:, None], projected_keys, annotations, mask=source_mask[:, None, :]
    )[:, 0]  # [B, 1, 2 D] -> [B, 2 D]
    state = gru_cell(params["decoder"], state, jnp.concatenate([y, context], -1), reset_after=cfg.reset_after)
    readout = params["readout"]
    t = jnp.concatenate([state, y, context], -1) @ readout["w_t"] + readout["b_t"][None]  # [B, 2 R]
    t = jnp.max(t.reshape(t.shape[0], -1, 2), axis=-1)  # maxout over pairs: [B, 2 R] -> [B, R]
    return state, t @ readout["w_o"] + readout["b_o"][None]


def decode(
    params: RNNSearchParams,
    annotations: Float[Array, "B S Dk"],
    initial_state: Float[Array, "B D"],
    source_mask: Bool[Array, "B S"],
    target_inputs: Int[Array, "B T"],
    *,
    cfg: RNNSearchConfig,
) -> Float[Array, "B T Vt"]:
    """Teacher-forced decoding: one ``decoder_step`` per target position under ``jax.lax.scan``.

    Args:
      params: from ``init_rnnsearch``.
      annotations: from ``encode``, ``[B, S, 2 D]``.
      initial_state: ``s_0`` from ``encode``, ``[B, D]``.
      source_mask: ``[B, S]``, True at real source tokens.
      target_inputs: ``y_{i-1}`` for each position (the targets shifted right behind a BOS), ``[B, T]``.
      cfg: the sizes.

    Returns:
      The logits of ``y_i``, ``[B, T, Vt]``.

    Example:
      >>> cfg = RNNSearchConfig(source_vocab=7, target_vocab=11, embed_dim=4, hidden_dim=5, alignment_dim=6,
      ...                       maxout_dim=3)
      >>> p = init_rnnsearch(jax.random.key(0), cfg)
      >>> annotations, s_0 = encode(p, jnp.ones((2, 3), int), cfg=cfg)
      >>> decode(p, annotations, s_0, jnp.ones((2, 3), bool), jnp.ones((2, 4), int), cfg=cfg).shape
      (2, 4, 11)
    """
    projected_keys = project_keys(params["attention"], annotations)

    def step(state, previous_tokens):
        return decoder_step(params, state, previous_tokens, annotations, projected_keys, source_mask, cfg=cfg)

    _, logits = jax.lax.scan(step, initial_state, jnp.swapaxes(target_inputs, 0, 1))  # [B, T] -> [T, B]
    return jnp.swapaxes(logits, 0, 1)  # [T, B, Vt] -> [B, T, Vt]


def rnnsearch(
    params: RNNSearchParams,
    source_tokens: Int[Array, "B S"],
    target_inputs: Int[Array, "B T"],
    *,
    cfg: RNNSearchConfig,
) -> Float[Array, "B T Vt"]:
    """Encodes the source and teacher-forces the decoder: the logits of every target token.

    Args:
      params: from ``init_rnnsearch``.
      source_tokens: ``[B, S]``; ``cfg.pad_id`` marks padding.
      target_inputs: the targets shifted right behind a BOS token, ``[B, T]``.
      cfg: the sizes.

    Returns:
      ``[B, T, Vt]`` logits.

    Example:
      >>> cfg = RNNSearchConfig(source_vocab=7, target_vocab=11, embed_dim=4, hidden_dim=5, alignment_dim=6,
      ...                       maxout_dim=3)
      >>> p = init_rnnsearch(jax.random.key(0), cfg)
      >>> rnnsearch(p, jnp.ones((2, 3), int), jnp.ones((2, 4), int), cfg=cfg).shape
      (2, 4, 11)
    """
    annotations, initial_state = encode(params, source_tokens, cfg=cfg)
    source_mask = source_tokens != cfg.pad_id
    return decode(params, annotations, initial_state, source_mask, target_inputs, cfg=cfg)


def greedy_decode(
    params: RNNSearchParams, source_tokens: Int[Array, "B S"], *, cfg: RNNSearchConfig, bos_id: int, length: int
) -> Int[Array, "B L"]:
    """Feeds back the most likely token ``length`` times, starting from ``bos_id``.

    Args:
      params: from ``init_rnnsearch``.
      source_tokens: ``[B, S]``.
      cfg: the sizes.
      bos_id: the first decoder input.
      length: how many tokens to produce.

    Returns:
      ``[B, length]`` token ids.

    Example:
      >>> cfg = RNNSearchConfig(source_vocab=7, target_vocab=11, embed_dim=4, hidden_dim=5, alignment_dim=6,
      ...                       maxout_dim=3)
      >>> p = init_rnnsearch(jax.random.key(0), cfg)
      >>> greedy_decode(p, jnp.ones((2, 3), int), cfg=cfg, bos_id=1, length=4).shape
      (2, 4)
    """
    annotations, state = encode(params, source_tokens, cfg=cfg)
    source_mask = source_tokens != cfg.pad_id
    projected_keys = project_keys(params["attention"], annotations)

    def step(carry, _):
        state, previous_tokens = carry
        state, logits = decoder_step(params, state, previous_tokens, annotations, projected_keys, source_mask, cfg=cfg)
        tokens = jnp.argmax(logits, axis=-1).astype(previous_tokens.dtype)
        return (state, tokens), tokens

    start = jnp.full((source_tokens.shape[0],), bos_id, source_tokens.dtype)
    _, tokens = jax.lax.scan(step, (state, start), None, length=length)
    return jnp.swapaxes(tokens, 0, 1)  # [length, B] -> [B, length]
