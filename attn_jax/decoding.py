"""Autoregressive inference (paper §6.1): greedy decoding, beam search and language-model sampling.

Greedy decoding and beam search work for every model family (``attn_jax.families``): the Transformer on its
key/value cache, RNNsearch and the RNN encoder-decoder on their recurrent state. They take the family's
``encode`` / ``init_cache`` / ``step`` / ``reorder_cache`` from ``family(config)``, so one driver serves all.

The paper uses "beam search with a beam size of 4 and length penalty alpha = 0.6" and a maximum output length of
"input length + 50, but terminate early when possible". The penalty is GNMT's (Wu et al. 2016, eq. 14): a
hypothesis Y scores ``log P(Y | X) / ((5 + |Y|) / 6) ** alpha``, ``|Y|`` counting the tokens including EOS.

Each decoder runs on a cache (``decode_step``, ``language_model_step``) inside one
``jax.lax.while_loop``, under ``jax.jit`` with ``config`` and ``max_len`` static, and stops once every sequence
has finished; ``greedy_decode_uncached`` re-runs ``decode`` on the prefix instead (reference and baseline).
Token ids: pad 0, eos 1, bos 2 (shared with the data pipeline). Outputs omit the start token, only pad follows
EOS, and ``eos_id=None`` decodes all ``max_len`` tokens. Pad is never emitted: training gives it no weight, so
its logit means nothing, and ``decode`` masks pad inputs. Shapes: ``T`` is ``max_len``, ``beam`` the beam size.
``max_len`` is a static shape: take ``max_output_length`` (input length + 50) rounded up to a few buckets.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from attn_jax.families import ModelConfig, family
from attn_jax.model import decode, encode, init_language_model_cache, language_model_step
from attn_jax.model_config import TransformerConfig
from attn_jax.types import Array, Float, Int, PRNGKeyArray

# ----------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------


def max_output_length(
    src_tokens: Int[Array, "B S"] | Int[np.ndarray, "B S"],
    *,
    pad_id: int = 0,
    extra: int = 50,
    multiple_of: int = 1,
) -> int:
    """The paper's output budget, longest real source length + ``extra``, rounded up to ``multiple_of``.

    Call it outside ``jax.jit`` (it reads values) and pass the result as the static ``max_len``; buckets
    (``multiple_of``) keep the number of compiled shapes small.

    Args:
      src_tokens: ``[B, S]`` source ids, ``pad_id`` for padding.
      pad_id: the padding id.
      extra: tokens allowed beyond the input length (50 in the paper, §6.1).
      multiple_of: round the result up to a multiple of this.

    Returns:
      A Python int.

    Example:
      >>> max_output_length(np.array([[5, 6, 0], [7, 0, 0]]), extra=50, multiple_of=8)
      56
    """
    longest = int(np.max(np.sum(np.asarray(src_tokens) != pad_id, axis=1), initial=0))
    return -(-(longest + extra) // multiple_of) * multiple_of


def length_penalty(length: int | Int[Array, "..."], alpha: float) -> Float[Array, "..."]:
    """GNMT's length penalty ``((5 + length) / 6) ** alpha`` (Wu et al. 2016, eq. 14), in float32.

    Example:
      >>> round(float(length_penalty(7, 0.6)), 4)
      1.5157
    """
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _without_pad(logits, pad_id: int):
    return logits.at[..., pad_id].set(jnp.finfo(logits.dtype).min)


def _emitted_eos(tokens, eos_id: int | None):
    return jnp.zeros(tokens.shape, jnp.bool_) if eos_id is None else tokens == eos_id


def _check_args(config: ModelConfig, *, max_len: int, bos_id: int | None, eos_id: int | None, pad_id: int):
    """Fails before any work is done, rather than after encoding or deep inside a trace."""
    if not 0 < max_len <= config.max_len:
        raise ValueError(f"max_len={max_len} must be in [1, {type(config).__name__}.max_len={config.max_len}]")
    # ``decode`` masks ``config.pad_id``; a different output pad would be attended as a real token.
    if pad_id != config.pad_id:
        raise ValueError(f"pad_id={pad_id} must equal {type(config).__name__}.pad_id={config.pad_id}")
    for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
        if value is not None and not (0 <= value < config.vocab_size and value != pad_id):
            raise ValueError(f"{name}={value} must be a non-pad id in [0, vocab_size={config.vocab_size})")


def _decode_loop(step_fn, carry, first_inputs, *, num_steps: int, choose, eos_id: int | None, pad_id: int):
    """Feeds each chosen token back until ``num_steps`` are out or every row has emitted EOS.

    ``step_fn(carry, inputs [B], i) -> (logits [B, V], carry)``; ``choose(logits, i) -> tokens [B]``.
    Returns the tokens ``[B, num_steps]``, pad after each row's EOS.
    """

    def unfinished(state):
        i, _, done, _, _ = state
        return (i < num_steps) & ~jnp.all(done)

    def body(state):
        i, tokens, done, inputs, carry = state
        logits, carry = step_fn(carry, inputs, i)
        new = jnp.where(done, pad_id, choose(logits, i)).astype(jnp.int32)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, new[:, None], i, axis=1)
        return i + 1, tokens, done | _emitted_eos(new, eos_id), new, carry

    B = first_inputs.shape[0]
    tokens = jnp.full((B, num_steps), pad_id, jnp.int32)
    state = (jnp.zeros((), jnp.int32), tokens, jnp.zeros((B,), jnp.bool_), first_inputs.astype(jnp.int32), carry)
    return jax.lax.while_loop(unfinished, body, state)[1]


def _argmax(pad_id: int) -> Callable:
    return lambda logits, i: jnp.argmax(_without_pad(logits, pad_id), axis=-1)  # i: the step, unused


# ----------------------------------------------------------------------------------------------------------
# Greedy decoding
# ----------------------------------------------------------------------------------------------------------


def greedy_decode(
    params,
    src_tokens: Int[Array, "B S"],
    *,
    config: ModelConfig,
    max_len: int,
    bos_id: int = 2,
    eos_id: int | None = 1,
    pad_id: int = 0,
) -> Int[Array, "B T"]:
    """Greedy decoding on the family's cache: each step feeds one token through its ``step``.

    Args:
      params: the model's parameters (``family(config).init``).
      src_tokens: ``[B, S]`` source ids, ``config.pad_id`` for padding.
      config: the model's config, of any family (static under ``jax.jit``).
      max_len: ``T``, the most tokens generated (static; at most ``config.max_len``).
      bos_id: the decoder's start token.
      eos_id: the end token; ``None`` always decodes ``max_len`` tokens.
      pad_id: written after EOS; must equal ``config.pad_id``.

    Returns:
      ``[B, T]`` int32 tokens without the start token, pad after EOS.

    Example:
      >>> from attn_jax import init_transformer
      >>> cfg = TransformerConfig(vocab_size=11, d_model=8, num_heads=2, d_ff=16, num_encoder_layers=1,
      ...                         num_decoder_layers=1)
      >>> greedy_decode(init_transformer(jax.random.key(0), cfg), jnp.array([[5, 6, 7]]), config=cfg, max_len=4).shape
      (1, 4)
    """
    _check_args(config, max_len=max_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    model = family(config)
    encoded = model.encode(params, src_tokens, config=config)
    cache = model.init_cache(params, encoded, src_tokens, config=config, max_len=max_len)

    def step(cache, inputs, i):
        return model.step(params, cache, inputs, config=config)

    start = jnp.full((src_tokens.shape[0],), bos_id, jnp.int32)
    return _decode_loop(step, cache, start, num_steps=max_len, choose=_argmax(pad_id), eos_id=eos_id, pad_id=pad_id)


def greedy_decode_uncached(
    params,
    src_tokens: Int[Array, "B S"],
    *,
    config: TransformerConfig,
    max_len: int,
    bos_id: int = 2,
    eos_id: int | None = 1,
    pad_id: int = 0,
) -> Int[Array, "B T"]:
    """``greedy_decode`` without the cache: every step re-runs ``decode`` (teacher forcing) on the prefix.

    Static shapes make the prefix a ``[B, T]`` buffer whose unwritten tail is pad, which ``decode`` masks, so
    every step costs a full ``T``-token decoder pass (about twice a growing prefix's average).

    Args:
      params, src_tokens, config, max_len, bos_id, eos_id, pad_id: as in ``greedy_decode``.

    Returns:
      ``[B, T]`` int32 tokens, equal to ``greedy_decode``'s up to floating-point ties.

    Example:
      >>> from attn_jax import init_transformer
      >>> cfg = TransformerConfig(vocab_size=11, d_model=8, num_heads=2, d_ff=16, num_encoder_layers=1,
      ...                         num_decoder_layers=1)
      >>> greedy_decode_uncached(init_transformer(jax.random.key(0), cfg), jnp.array([[5, 6]]), config=cfg,
      ...                        max_len=3).shape
      (1, 3)
    """
    _check_args(config, max_len=max_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    memory = encode(params, src_tokens, config=config)

    def step(prefix, inputs, i):
        prefix = jax.lax.dynamic_update_slice_in_dim(prefix, inputs[:, None], i, axis=1)
        logits = decode(params, prefix, memory, src_tokens, config=config)  # [B, T, V]
        return jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False), prefix

    B = src_tokens.shape[0]
    prefix = jnp.full((B, max_len), pad_id, jnp.int32)
    start = jnp.full((B,), bos_id, jnp.int32)
    return _decode_loop(step, prefix, start, num_steps=max_len, choose=_argmax(pad_id), eos_id=eos_id, pad_id=pad_id)


# ----------------------------------------------------------------------------------------------------------
# Beam search
# ----------------------------------------------------------------------------------------------------------


def _top_hypotheses(scores, sequences, W: int, *extra):
    """The ``W`` best of ``scores [B, X]`` (sorted), with their ``sequences [B, X, T]`` and ``extra [B, X]``."""
    top, index = jax.lax.top_k(scores, W)  # [B, W]
    picked = [jnp.take_along_axis(sequences, index[..., None], axis=1)]
    return top, *picked, *(jnp.take_along_axis(x, index, axis=1) for x in extra)


def _expand(state, log_probs, W: int):
    """The ``2W`` best one-token extensions of the alive hypotheses: ``(log_probs, tokens, parents, seqs)``.

    ``2W`` is enough: at most ``W`` of them end in EOS, so the ``W`` best that do not are among them.
    """
    V = log_probs.shape[-1]
    candidates = state["alive_log_probs"][..., None] + log_probs  # [B, W, V]
    top, flat = jax.lax.top_k(candidates.reshape(candidates.shape[0], W * V), 2 * W)  # [B, 2W]
    parents, tokens = flat // V, flat % V
    seqs = jnp.take_along_axis(state["alive_seqs"], parents[..., None], axis=1)  # [B, 2W, T]
    seqs = jax.lax.dynamic_update_slice_in_dim(seqs, tokens[..., None], state["step"], axis=2)
    return top, tokens, parents, seqs


def _beam_step(params, state, *, config: ModelConfig, alpha: float, bos_id, eos_id, pad_id):
    """One step of beam search: extend, update the finished set, keep the ``W`` best unfinished, reorder."""
    B, W, T = state["alive_seqs"].shape
    i = state["step"]
    previous = jax.lax.dynamic_index_in_dim(state["alive_seqs"], jnp.maximum(i - 1, 0), axis=2, keepdims=False)
    inputs = jnp.where(i == 0, bos_id, previous).reshape(B * W)  # [B, W] -> [B*W]
    model = family(config)
    logits, cache = model.step(params, state["cache"], inputs, config=config)
    log_probs = jax.nn.log_softmax(logits).reshape(B, W, -1)  # [B*W, V] -> [B, W, V]
    log_probs = log_probs.at[..., pad_id].set(-jnp.inf)
    top, tokens, parents, seqs = _expand(state, log_probs, W)
    ends = _emitted_eos(tokens, eos_id)

    # As in fairseq and Hugging Face, a hypothesis finishes only if it ranks among the step's W best, so
    # beam 1 with alpha 0 is greedy decoding. At max_len every surviving hypothesis finishes, truncated.
    in_beam = (jnp.arange(2 * W) < W)[None, :]
    finishing = in_beam & (ends | (i + 1 == T))
    new_scores = jnp.where(finishing, top / length_penalty(i + 1, alpha), -jnp.inf)
    finished_scores, finished_seqs = _top_hypotheses(
        jnp.concatenate([state["finished_scores"], new_scores], axis=1),
        jnp.concatenate([state["finished_seqs"], seqs], axis=1),
        W,
    )
    alive_log_probs, alive_seqs, alive_parents = _top_hypotheses(jnp.where(ends, -jnp.inf, top), seqs, W, parents)

    # Each surviving hypothesis continues from its parent's cache (keys/values, or recurrent state); what is
    # the same for every beam of a sentence (cross-attention keys, annotations) the family leaves alone.
    rows = (jnp.arange(B)[:, None] * W + alive_parents).reshape(B * W)
    cache = model.reorder_cache(cache, rows)
    alive = {"alive_seqs": alive_seqs, "alive_log_probs": alive_log_probs}
    finished = {"finished_seqs": finished_seqs, "finished_scores": finished_scores}
    return {"step": i + 1, "cache": cache} | alive | finished


def _could_improve(state, *, alpha: float, max_len: int):
    """False once no sentence's best alive hypothesis can beat its worst finished one.

    Log-probabilities only fall as a hypothesis grows and the penalty is largest at ``max_len``, so
    ``alive_log_prob / lp(max_len)`` bounds every score an alive hypothesis can still reach.
    """
    best_reachable = state["alive_log_probs"][:, 0] / length_penalty(max_len, alpha)
    return ~jnp.all(state["finished_scores"][:, -1] > best_reachable)


def _run_beam_search(params, src_tokens, *, config, beam_size, alpha, max_len, bos_id, eos_id, pad_id, early_stopping):
    """The beam-search loop; returns its final state (the tests read ``step`` to see early stopping)."""
    B, W = src_tokens.shape[0], beam_size
    model = family(config)
    encoded = model.encode(params, src_tokens, config=config)
    # [B, ...] -> [B*W, ...], beam-minor, as the flat row index b * W + w of ``_beam_step``.
    encoded = jax.tree.map(lambda x: jnp.repeat(x, W, axis=0), encoded)
    sources = jnp.repeat(src_tokens, W, axis=0)
    first_only = jnp.where(jnp.arange(W) == 0, 0.0, -jnp.inf).astype(jnp.float32)  # the W beams start equal
    state = {
        "step": jnp.zeros((), jnp.int32),
        "alive_seqs": jnp.full((B, W, max_len), pad_id, jnp.int32),
        "alive_log_probs": jnp.broadcast_to(first_only, (B, W)),
        "finished_seqs": jnp.full((B, W, max_len), pad_id, jnp.int32),
        "finished_scores": jnp.full((B, W), -jnp.inf, jnp.float32),
        "cache": model.init_cache(params, encoded, sources, config=config, max_len=max_len),
    }

    def unfinished(state):
        running = state["step"] < max_len
        return running & _could_improve(state, alpha=alpha, max_len=max_len) if early_stopping else running

    def body(state):
        return _beam_step(params, state, config=config, alpha=alpha, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)

    return jax.lax.while_loop(unfinished, body, state)


def beam_search(
    params,
    src_tokens: Int[Array, "B S"],
    *,
    config: ModelConfig,
    max_len: int,
    beam_size: int = 4,
    alpha: float = 0.6,
    bos_id: int = 2,
    eos_id: int | None = 1,
    pad_id: int = 0,
    early_stopping: bool = True,
) -> tuple[Int[Array, "B beam T"], Float[Array, "B beam"]]:
    """Beam search with GNMT's length penalty (paper §6.1: beam 4, alpha 0.6) on any family's cache.

    Alive and finished hypotheses are two sets of ``beam_size`` (as in tensor2tensor and the Flax WMT example):
    each step extends the alive ones by a token, keeps the best ``2 * beam_size`` candidates, and moves those
    ending in EOS (or reaching ``max_len``) to the finished set. The finishing rule is fairseq's (and Hugging
    Face's), not tensor2tensor's: an EOS candidate finishes only if it ranks among the step's ``beam_size`` best of
    the ``2 * beam_size`` (tensor2tensor lets any of the ``2 * beam_size`` finish), so beam 1 with alpha 0 is
    greedy decoding. The best non-EOS candidates stay alive. It stops when no alive hypothesis can beat the worst
    finished one.

    Args:
      params: the model's parameters (``family(config).init``).
      src_tokens: ``[B, S]`` source ids, ``config.pad_id`` for padding.
      config: the model's config, of any family (static under ``jax.jit``).
      max_len: ``T``, the most tokens generated (static); a hypothesis reaching it finishes unterminated.
      beam_size: the number of alive (and of finished) hypotheses per sentence.
      alpha: length-penalty exponent, ``>= 0``; 0 ranks by log-probability alone.
      bos_id, eos_id, pad_id: as in ``greedy_decode``.
      early_stopping: stop when the result can no longer change; False always runs ``max_len`` steps.

    Returns:
      ``(tokens [B, beam, T] int32, scores [B, beam] float32)`` best first, where a score is
      ``log P(tokens | source) / ((5 + length) / 6) ** alpha`` and length counts the EOS. Pad follows EOS;
      a slot left empty (fewer hypotheses than ``beam_size`` exist) has score ``-inf`` and only pad.

    Example:
      >>> from attn_jax import init_transformer
      >>> cfg = TransformerConfig(vocab_size=11, d_model=8, num_heads=2, d_ff=16, num_encoder_layers=1,
      ...                         num_decoder_layers=1)
      >>> params = init_transformer(jax.random.key(0), cfg)
      >>> tokens, scores = beam_search(params, jnp.array([[5, 6]]), config=cfg, max_len=4)
      >>> tokens.shape, scores.shape, bool(scores[0, 0] >= scores[0, 1])
      ((1, 4, 4), (1, 4), True)
    """
    _check_args(config, max_len=max_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    if beam_size < 1 or alpha < 0:
        raise ValueError(f"need beam_size >= 1 and alpha >= 0, got beam_size={beam_size}, alpha={alpha}")
    state = _run_beam_search(
        params, src_tokens, config=config, beam_size=beam_size, alpha=alpha, max_len=max_len, bos_id=bos_id,
        eos_id=eos_id, pad_id=pad_id, early_stopping=early_stopping,
    )  # fmt: skip
    scores = state["finished_scores"]
    tokens = jnp.where(jnp.isfinite(scores)[..., None], state["finished_seqs"], pad_id)
    return tokens, scores


# ----------------------------------------------------------------------------------------------------------
# Language-model sampling
# ----------------------------------------------------------------------------------------------------------


def _sampler(rng, temperature: float, top_k: int | None, pad_id: int) -> Callable:
    def choose(logits, i):
        logits = _without_pad(logits / temperature, pad_id)
        if top_k is not None:
            kth_best = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
            logits = jnp.where(logits < kth_best, jnp.finfo(logits.dtype).min, logits)
        # One key per step, derived from the step index: the same rng gives the same sample.
        return jax.random.categorical(jax.random.fold_in(rng, i), logits, axis=-1)

    return choose


def sample_language_model(
    params,
    prompt: Int[Array, "B P"],
    *,
    config: TransformerConfig,
    max_len: int,
    rng: PRNGKeyArray,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_id: int | None = 1,
    pad_id: int = 0,
) -> Int[Array, "B T"]:
    """Continues ``prompt`` with ``language_model_step``: ancestral sampling, top-k, or greedy at temperature 0.

    Args:
      params: from ``init_language_model``.
      prompt: ``[B, P]`` ids, no padding (every row the same length), ``1 <= P < max_len``.
      config: the model's ``TransformerConfig`` (static under ``jax.jit``).
      max_len: ``T``, the total length, prompt included (static; at most ``config.max_len``).
      rng: PRNG key for sampling (unused at temperature 0).
      temperature: divides the logits (static); 0 takes the argmax.
      top_k: sample among the ``top_k`` most likely tokens only (static); None: the whole vocabulary.
      eos_id: a row stops at this id (pad follows); None samples to ``max_len``.
      pad_id: never sampled; written after EOS.

    Returns:
      ``[B, T]`` int32: the prompt followed by ``T - P`` new tokens.

    Example:
      >>> from attn_jax import init_language_model
      >>> cfg = TransformerConfig(vocab_size=11, d_model=8, num_heads=2, d_ff=16, num_decoder_layers=1)
      >>> params = init_language_model(jax.random.key(0), cfg)
      >>> out = sample_language_model(params, jnp.array([[3, 4]]), config=cfg, max_len=6, rng=jax.random.key(1))
      >>> out.shape, out[0, :2].tolist()
      ((1, 6), [3, 4])
    """
    _check_args(config, max_len=max_len, bos_id=None, eos_id=eos_id, pad_id=pad_id)
    B, P = prompt.shape
    if not 1 <= P < max_len:
        raise ValueError(f"need 1 <= prompt length < max_len, got {P} and max_len={max_len}")
    if temperature < 0 or (top_k is not None and not 1 <= top_k <= config.vocab_size):
        raise ValueError(f"need temperature >= 0 and 1 <= top_k <= vocab_size, got {temperature}, {top_k}")
    prompt = prompt.astype(jnp.int32)
    cache = init_language_model_cache(config, B, max_len)
    if P > 1:  # all but the last prompt token in one pass; the loop feeds the last one
        _, cache = language_model_step(params, cache, prompt[:, :-1], config=config)

    def step(cache, inputs, i):
        logits, cache = language_model_step(params, cache, inputs[:, None], config=config)
        return logits[:, 0], cache

    choose = _argmax(pad_id) if temperature == 0 else _sampler(rng, temperature, top_k, pad_id)
    new = _decode_loop(step, cache, prompt[:, -1], num_steps=max_len - P, choose=choose, eos_id=eos_id, pad_id=pad_id)
    return jnp.concatenate([prompt, new], axis=1)
