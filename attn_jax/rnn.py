"""The gated recurrent unit (Cho et al. 2014) and the pieces both recurrent encoder-decoders share.

``attn_jax.rnnsearch`` (Bahdanau, Cho & Bengio 2014, with attention) and ``attn_jax.rnn_encdec`` (Cho et al.
2014, the fixed-length summary) are built from these functions:

    GRU (appendix A.1.1 of Bahdanau et al.):
        r = σ(x W_r + s U_r + b_r),  z = σ(x W_z + s U_z + b_z)
        s~ = tanh(x W + (r ∘ s) U + b_u + b),  s_new = (1 - z) ∘ s + z ∘ s~
    conditional decoder step:  s_i = GRU(s_{i-1}, [E y_{i-1} ; c_i])
    readout (Bahdanau eq. 4 / appendix A.2.2):  p(y_i | ...) = softmax(W_o maxout(U_o s_i + V_o E y_{i-1} + C_o c_i))

Only ``U`` acts on the state, so ``gru`` computes the input half ``x [W_r | W_z | W] + [b_r | b_z | b]`` for
every position at once, outside ``jax.lax.scan``, and the scan does only the recurrent half (as cuDNN does).

Shape letters (beyond ``attn_jax.types``): M embedding size (the paper's m), D GRU state size (n), I a GRU's
input size, G = 3 D the three gates side by side, C a decoder's context size, R the maxout width (l), Vt the
target vocabulary.

Deviations from the papers, all named: biases everywhere (Bahdanau et al. omit them "to make the equations less
cluttered"); ``reset_after=True`` switches to the cuDNN/Flax candidate ``tanh(W x + b + r * (U s + b_u))``;
the three readout matrices ``U_o, V_o, C_o`` are one matrix over the concatenation; Flax's GRUCell
initialisers, not the papers'; dropout (``dropout_rate``, 0 in the papers) on the embeddings and on the maxout
output. Padding is skipped by keeping the GRU state unchanged at padding positions.
"""

from typing import TypedDict

import jax
import jax.numpy as jnp

from attn_jax.layers import dropout
from attn_jax.model_config import DTYPES, ConfigError
from attn_jax.types import Array, Bool, Float, Int, PRNGKeyArray


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
    w_t: Float[Array, "D+M+C 2*R"]
    b_t: Float[Array, " 2*R"]
    w_o: Float[Array, "R Vt"]
    b_o: Float[Array, " Vt"]


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


def project_gru_inputs(
    params: GRUParams, inputs: Float[Array, "*batch I"], *, rows: slice = slice(None), biases: bool = True
) -> Float[Array, "*batch G"]:
    """The input half of every gate, ``x [W_r | W_z | W] + [b_r | b_z | b]``: ``[..., 3 D]``.

    Args:
      params: from ``init_gru``.
      inputs: ``[..., I]`` (or ``[..., I']`` for a slice of the input rows).
      rows: the rows of the ``W`` matrices that ``inputs`` meets (a decoder projects ``E y`` and ``c`` apart).
      biases: add the biases (once per sum of slices).

    Returns:
      ``[..., 3 D]``, the ``r``, ``z`` and candidate parts side by side.

    Example:
      >>> p = init_gru(jax.random.key(0), 3, 5)
      >>> project_gru_inputs(p, jnp.ones((2, 4, 3))).shape
      (2, 4, 15)
    """
    weights = jnp.concatenate([params["w_r"][rows], params["w_z"][rows], params["w"][rows]], axis=1)  # [I, 3 D]
    projected = inputs @ weights.astype(inputs.dtype)
    if biases:
        projected = projected + _bias(jnp.concatenate([params["b_r"], params["b_z"], params["b"]]), projected)
    return projected


def _bias(b, x):
    """``b [F]`` in ``x``'s dtype, with leading unit axes to ``x``'s rank (no implicit rank promotion)."""
    return b.astype(x.dtype).reshape((1,) * (x.ndim - 1) + b.shape)


def gru_update(
    params: GRUParams, state: Float[Array, "B D"], projected: Float[Array, "B G"], *, reset_after: bool = False
) -> Float[Array, "B D"]:
    """The recurrent half of a GRU step, given ``project_gru_inputs`` of its input: the new state ``[B, D]``.

    Example:
      >>> p = init_gru(jax.random.key(0), 3, 5)
      >>> gru_update(p, jnp.zeros((2, 5)), project_gru_inputs(p, jnp.ones((2, 3)))).shape
      (2, 5)
    """
    x_r, x_z, x = jnp.split(projected, 3, axis=-1)  # [B, 3 D] -> 3 x [B, D]
    dtype = state.dtype
    r = jax.nn.sigmoid(x_r + state @ params["u_r"].astype(dtype))
    z = jax.nn.sigmoid(x_z + state @ params["u_z"].astype(dtype))
    u, b_u = params["u"].astype(dtype), _bias(params["b_u"], state)
    recurrent = r * (state @ u + b_u) if reset_after else (r * state) @ u + b_u
    candidate = jnp.tanh(x + recurrent)
    return (1.0 - z) * state + z * candidate


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
    return gru_update(params, state, project_gru_inputs(params, inputs), reset_after=reset_after)


def gru(
    params: GRUParams,
    inputs: Float[Array, "B L I"],
    mask: Bool[Array, "B L"],
    *,
    reverse: bool = False,
    reset_after: bool = False,
) -> Float[Array, "B L D"]:
    """Runs the GRU over time with ``jax.lax.scan``, from a zero state, skipping masked positions.

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

    def step(state, projected_and_mask):
        projected, real = projected_and_mask
        new_state = gru_update(params, state, projected, reset_after=reset_after)
        state = jnp.where(real[:, None], new_state, state)
        return state, state

    initial = jnp.zeros((inputs.shape[0], params["u"].shape[0]), inputs.dtype)
    # [B, L, ...] -> [L, B, ...]: scan walks the leading axis.
    time_major = (jnp.swapaxes(project_gru_inputs(params, inputs), 0, 1), jnp.swapaxes(mask, 0, 1))
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
# What the two recurrent encoder-decoders share: embeddings, the conditional decoder step, the readout
# ----------------------------------------------------------------------------------------------------------


def embed_tokens(
    table: Float[Array, "V M"], tokens: Int[Array, "*batch"], *, dropout_rate: float = 0.0, rng=None
) -> Float[Array, "*batch M"]:
    """``E y``: rows of ``table``, with dropout when ``rng`` is given.

    Example:
      >>> embed_tokens(jnp.eye(3), jnp.array([[2, 0]])).tolist()
      [[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]]
    """
    return dropout(jnp.take(table, tokens, axis=0), dropout_rate, rng)


def decoder_gru_step(
    params: GRUParams,
    state: Float[Array, "B D"],
    projected_embedding: Float[Array, "B G"],
    context: Float[Array, "B C"],
    *,
    embed_dim: int,
    reset_after: bool,
) -> Float[Array, "B D"]:
    """``s_i = GRU(s_{i-1}, [E y_{i-1} ; c_i])`` given ``project_gru_inputs(params, E y, rows=slice(0, M))``.

    The embedding half of the input projection does not depend on the state, so teacher forcing computes it
    for every position at once; only the context half ``c_i [W_r | W_z | W][M:]`` is computed here.

    Example:
      >>> p = init_gru(jax.random.key(0), 3 + 4, 5)
      >>> y = project_gru_inputs(p, jnp.ones((2, 3)), rows=slice(0, 3))
      >>> decoder_gru_step(p, jnp.zeros((2, 5)), y, jnp.ones((2, 4)), embed_dim=3, reset_after=False).shape
      (2, 5)
    """
    projected = projected_embedding + project_gru_inputs(params, context, rows=slice(embed_dim, None), biases=False)
    return gru_update(params, state, projected, reset_after=reset_after)


def init_readout(rng: PRNGKeyArray, input_dim: int, maxout_dim: int, vocab_size: int, *, dtype=jnp.float32):
    """LeCun-normal ``w_t: [D + M + C, 2 R]`` and ``w_o: [R, Vt]``, zero biases.

    Example:
      >>> p = init_readout(jax.random.key(0), 7, 3, 11)
      >>> p["w_t"].shape, p["w_o"].shape
      ((7, 6), (3, 11))
    """
    rt, ro = jax.random.split(rng)
    dense_init = jax.nn.initializers.lecun_normal()
    return {
        "w_t": dense_init(rt, (input_dim, 2 * maxout_dim), dtype),
        "b_t": jnp.zeros((2 * maxout_dim,), dtype),
        "w_o": dense_init(ro, (maxout_dim, vocab_size), dtype),
        "b_o": jnp.zeros((vocab_size,), dtype),
    }


def readout(
    params: ReadoutParams,
    state: Float[Array, "*batch D"],
    embedding: Float[Array, "*batch M"],
    context: Float[Array, "*batch C"],
    *,
    dropout_rate: float = 0.0,
    rng=None,
) -> Float[Array, "*batch Vt"]:
    """Next-token logits (float32): ``W_o maxout([s_i ; E y_{i-1} ; c_i] W_t + b_t) + b_o``, pools of 2.

    Works on one step (``[B, ...]``) or on every teacher-forced position at once (``[B, T, ...]``): the
    readout is outside the recurrence, so training computes it as one large matrix product.

    Example:
      >>> p = init_readout(jax.random.key(0), 2 + 3 + 4, 5, 11)
      >>> readout(p, jnp.ones((6, 2)), jnp.ones((6, 3)), jnp.ones((6, 4))).shape
      (6, 11)
    """
    dtype = state.dtype
    t = jnp.concatenate([state, embedding, context], -1) @ params["w_t"].astype(dtype)
    t = t + _bias(params["b_t"], t)
    t = jnp.max(t.reshape(*t.shape[:-1], -1, 2), axis=-1)  # maxout over pairs: [..., 2 R] -> [..., R]
    t = dropout(t, dropout_rate, rng)
    logits = t @ params["w_o"].astype(dtype)
    logits = logits + _bias(params["b_o"], logits)
    return logits.astype(jnp.float32)


def compute_params(params, dtype: str):
    """The parameters in the compute dtype (they are stored in float32, as the Transformer's are)."""
    return jax.tree.map(lambda w: w.astype(dtype), params) if jnp.dtype(dtype) != jnp.float32 else params


class RecurrentSizes:
    """The sizes the training loop reads, derived the same way for both recurrent configs (``RNNSearchConfig``,
    ``RNNEncDecConfig``), which inherit them; it holds no fields of its own."""

    @property
    def resolved_encoder_dim(self) -> int:
        """``E``: ``encoder_dim``, or ``hidden_dim`` (the papers' equal sizes)."""
        return self.hidden_dim if self.encoder_dim is None else self.encoder_dim

    @property
    def d_model(self) -> int:
        """The model width the learning-rate schedule scales by: the decoder state size ``D``."""
        return self.hidden_dim

    @property
    def vocab_size(self) -> int:
        """The output vocabulary ``Vt``."""
        return self.target_vocab


def check_config(config, int_fields: tuple[str, ...]) -> None:
    """The checks both recurrent configs share; errors name ``<Class>.<field>`` as ``TransformerConfig``'s do."""
    name = type(config).__name__
    for field in int_fields:
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name}.{field}: must be a positive integer, got {value!r}")
    if not 0 <= config.pad_id < config.target_vocab or config.pad_id >= config.source_vocab:
        raise ConfigError(f"{name}.pad_id: must be in [0, vocab size), got {config.pad_id}")
    if not 0.0 <= config.dropout_rate < 1.0:
        raise ConfigError(f"{name}.dropout_rate: must be in [0, 1), got {config.dropout_rate}")
    if config.dtype not in DTYPES:
        raise ConfigError(f"{name}.dtype: must be one of {DTYPES}, got {config.dtype!r}")
