"""Tests for attn_jax.decoding: cached against uncached greedy, beam search against brute force, LM sampling.

Every decoder is run under ``jax.jit`` with its configuration static. The references are written from the
definitions: teacher-forced ``decode`` / ``language_model`` re-runs, and an exhaustive enumeration of every
hypothesis of a 5-token vocabulary for beam search, for the Transformer and the recurrent families alike.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attn_jax.decoding import (
    _run_beam_search,
    beam_search,
    greedy_decode,
    greedy_decode_uncached,
    length_penalty,
    max_output_length,
    sample_language_model,
)
from attn_jax.families import family, translate_logits
from attn_jax.model import decode, encode, init_language_model, init_transformer, language_model
from attn_jax.model_config import TransformerConfig
from attn_jax.rnn_encdec import RNNEncDecConfig
from attn_jax.rnnsearch import RNNSearchConfig

PAD, EOS, BOS = 0, 1, 2


def _jit(fn, *args, **kwargs):
    """Calls ``fn`` under ``jax.jit`` with every keyword argument but ``rng`` static, as users would."""
    return _jitted(fn, tuple(name for name in kwargs if name != "rng"))(*args, **kwargs)


@functools.cache
def _jitted(fn, static_argnames: tuple[str, ...]):
    # Compiling, not running, dominates these tiny models; XLA's cheapest backend optimisation halves it.
    return jax.jit(fn, static_argnames=static_argnames, compiler_options={"xla_backend_optimization_level": 0})


def _tiny_config(vocab_size: int = 13, **overrides) -> TransformerConfig:
    sizes = dict(d_model=12, num_heads=2, d_ff=20, num_encoder_layers=2, num_decoder_layers=2, max_len=32)
    return TransformerConfig(vocab_size=vocab_size, dropout_rate=0.0, **(sizes | overrides))


def _sources(rng: np.random.Generator, lengths, S: int, V: int) -> np.ndarray:
    """``[B, S]`` int32 sources of the given lengths, symbols in [3, V), padded with PAD."""
    src = np.zeros((len(lengths), S), np.int32)
    for b, n in enumerate(lengths):
        src[b, :n] = rng.integers(3, V, size=n)
    return src


def _assert_pad_only_after_eos(tokens: np.ndarray):
    """Along the last axis: no pad before the first EOS, only pad after it, no pad at all without EOS."""
    for row in tokens.reshape(-1, tokens.shape[-1]):
        ends = np.flatnonzero(row == EOS)
        stop = ends[0] + 1 if ends.size else row.size
        assert (row[:stop] != PAD).all(), row
        assert (row[stop:] == PAD).all(), row


# ---------------------------------------------------------------------------------------------------------
# Models: a random tiny one, and one overfit on the copy task so that outputs are not trivial
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_model():
    config = _tiny_config()
    return config, _jit(init_transformer, jax.random.key(0), config=config)


def _copy_batches(steps: int, B: int, S: int, V: int):
    """Sources of 2..S symbols; targets are the source then EOS; decoder inputs are targets shifted right."""
    rng = np.random.default_rng(0)
    src = np.stack([_sources(rng, rng.integers(2, S + 1, size=B), S, V) for _ in range(steps)])
    lengths = (src != PAD).sum(-1)
    tgt = np.concatenate([src, np.zeros((steps, B, 1), np.int32)], axis=-1)  # [steps, B, S + 1]
    np.put_along_axis(tgt, lengths[..., None], EOS, axis=-1)
    inputs = np.concatenate([np.full((steps, B, 1), BOS, np.int32), tgt[..., :-1]], axis=-1)
    return src, inputs, tgt


@pytest.fixture(scope="module")
def copy_model():
    """A tiny model trained with Adam to copy its source (300 steps; ~10-30 s on 2 shared cores, mostly compiling)."""
    config = _tiny_config(d_model=32, num_heads=4, d_ff=64, num_encoder_layers=1, num_decoder_layers=1)
    tx = optax.adam(3e-3)
    src, inputs, tgt = _copy_batches(steps=300, B=32, S=6, V=config.vocab_size)

    def loss_fn(params, batch):
        s, i, t = batch
        logits = decode(params, i, encode(params, s, config=config), s, config=config)
        weights = (t != PAD).astype(jnp.float32)
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, t) * weights) / jnp.sum(weights)

    def train_step(carry, batch):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    params = _jit(init_transformer, jax.random.key(1), config=config)
    # optax's Adam mixes Python floats with its int32 step count, which strict promotion rejects.
    with jax.numpy_dtype_promotion("standard"):
        train = jax.jit(lambda carry, batches: jax.lax.scan(train_step, carry, batches))
        (params, _), losses = train((params, tx.init(params)), (src, inputs, tgt))
    assert float(losses[-20:].mean()) < 0.25, f"the copy task did not train: final loss {losses[-20:].mean()}"
    return config, params


@pytest.fixture(scope="module")
def copy_sources():
    return _sources(np.random.default_rng(7), [6, 2, 5, 3, 4, 6], S=6, V=13)


# ---------------------------------------------------------------------------------------------------------
# Greedy
# ---------------------------------------------------------------------------------------------------------

RANDOM_SOURCES = _sources(np.random.default_rng(3), [7, 3, 5], S=7, V=13)
COPY_LEN = 10  # output budget for the copy model: copies are at most 7 tokens with their EOS


# The second variant unties the output projection, which makes a random model's outputs less repetitive.
VARIANTS = [{}, {"norm_first": True, "scan_layers": False, "num_kv_heads": 1, "tie_output_embedding": False}]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_cached_greedy_equals_uncached_random_model(overrides):
    config = _tiny_config(**overrides)
    params = _jit(init_transformer, jax.random.key(3), config=config)
    cached = np.asarray(_jit(greedy_decode, params, RANDOM_SOURCES, config=config, max_len=9))
    uncached = np.asarray(_jit(greedy_decode_uncached, params, RANDOM_SOURCES, config=config, max_len=9))
    np.testing.assert_array_equal(cached, uncached)
    _assert_pad_only_after_eos(cached)


def test_cached_greedy_equals_uncached_trained_model(copy_model, copy_sources):
    config, params = copy_model
    cached = np.asarray(_jit(greedy_decode, params, copy_sources, config=config, max_len=COPY_LEN))
    uncached = np.asarray(_jit(greedy_decode_uncached, params, copy_sources, config=config, max_len=COPY_LEN))
    np.testing.assert_array_equal(cached, uncached)
    # Non-trivial outputs: most sentences are copied exactly, then EOS, then pad.
    lengths = (copy_sources != PAD).sum(-1)
    copied = [
        (row[:n] == s[:n]).all() and row[n] == EOS and (row[n + 1 :] == PAD).all()
        for row, s, n in zip(cached, copy_sources, lengths, strict=True)
    ]
    assert np.mean(copied) >= 0.5, cached
    _assert_pad_only_after_eos(cached)


def test_greedy_without_eos_runs_full_length(copy_model, copy_sources):
    config, params = copy_model
    free = np.asarray(_jit(greedy_decode, params, copy_sources, config=config, max_len=COPY_LEN, eos_id=None))
    assert (free != PAD).all()
    # Up to and including its EOS, a row equals the run that ignores EOS: stopping changes nothing before it.
    stopped = np.asarray(_jit(greedy_decode, params, copy_sources, config=config, max_len=COPY_LEN))
    assert (stopped == EOS).any(-1).all()
    for row, full_row in zip(stopped, free, strict=True):
        n = int((row != PAD).sum())
        np.testing.assert_array_equal(row[:n], full_row[:n])


def test_padded_batch_decodes_each_sentence_as_alone(copy_model, copy_sources):
    config, params = copy_model
    kwargs = dict(config=config, max_len=COPY_LEN)
    greedy = np.asarray(_jit(greedy_decode, params, copy_sources, **kwargs))
    beam_tokens, beam_scores = _jit(beam_search, params, copy_sources, **kwargs)
    for b in (1, 4):  # source lengths 2 and 4 of a batch padded to 6
        alone = copy_sources[b : b + 1, : (copy_sources[b] != PAD).sum()]  # [1, S_b], no padding at all
        np.testing.assert_array_equal(_jit(greedy_decode, params, alone, **kwargs)[0], greedy[b])
        tokens, scores = _jit(beam_search, params, alone, **kwargs)
        np.testing.assert_array_equal(tokens[0], beam_tokens[b])
        np.testing.assert_allclose(scores[0], beam_scores[b], rtol=1e-5, atol=1e-5)


def test_max_output_length_and_bad_arguments(random_model):
    config, params = random_model
    src = np.array([[5, 6, 7, 0], [5, 0, 0, 0]], np.int32)
    assert max_output_length(src) == 53  # the paper's input length + 50
    assert max_output_length(src, extra=10, multiple_of=8) == 16
    assert float(length_penalty(1, 0.6)) == 1.0 and np.isclose(float(length_penalty(7, 0.5)), np.sqrt(2.0))
    src = jnp.asarray(src)
    with pytest.raises(ValueError, match="pad_id"):
        greedy_decode(params, src, config=config, max_len=4, pad_id=3)
    with pytest.raises(ValueError, match="alpha"):
        beam_search(params, src, config=config, max_len=4, alpha=-1.0)
    with pytest.raises(ValueError, match="max_len"):
        greedy_decode(params, src, config=config, max_len=config.max_len + 1)


# ---------------------------------------------------------------------------------------------------------
# Beam search
# ---------------------------------------------------------------------------------------------------------


def _all_hypotheses(V: int, T: int) -> list[tuple[int, ...]]:
    """Every output beam search can return: EOS-terminated of length <= T, or unterminated of length T."""
    words = [t for t in range(V) if t not in (PAD, EOS)]
    ended = [(*body, EOS) for n in range(T) for body in itertools.product(words, repeat=n)]
    return ended + list(itertools.product(words, repeat=T))


def _teacher_forced_log_probs(params, sources, inputs, *, config):
    # Any family: the Transformer's decode(encode(...)), or a recurrent model's teacher forcing.
    return jax.nn.log_softmax(translate_logits(params, sources, inputs, config=config))


def _brute_force_scores(params, src_row: np.ndarray, hypotheses, *, config, T: int, alpha: float) -> np.ndarray:
    """``log P(y | x) / lp(|y|)`` for every hypothesis, by teacher forcing with ``decode``."""
    n = len(hypotheses)
    targets = np.zeros((n, T), np.int32)
    for j, h in enumerate(hypotheses):
        targets[j, : len(h)] = h
    inputs = np.concatenate([np.full((n, 1), BOS, np.int32), targets[:, :-1]], axis=1)
    sources = np.repeat(src_row[None], n, axis=0)
    log_probs = np.asarray(_jit(_teacher_forced_log_probs, params, sources, inputs, config=config))
    token_log_probs = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # [n, T]
    lengths = np.array([len(h) for h in hypotheses], np.int32)
    total = np.where(np.arange(T)[None, :] < lengths[:, None], token_log_probs, 0.0).sum(-1)
    return total / np.asarray(length_penalty(jnp.asarray(lengths), alpha))


def _as_tuple(row: np.ndarray) -> tuple[int, ...]:
    """A returned row without its padding: up to the first EOS, or all of it."""
    ends = np.flatnonzero(row == EOS)
    return tuple(int(t) for t in row[: ends[0] + 1 if ends.size else row.size])


@pytest.mark.parametrize(("T", "alpha"), [(3, 2.0), (4, 0.6), (4, 0.0)])
def test_beam_search_is_exact_with_a_wide_beam(T, alpha):
    V = 5
    config = _tiny_config(vocab_size=V, num_encoder_layers=1)
    params = _jit(init_transformer, jax.random.key(T), config=config)
    src = _sources(np.random.default_rng(T), [4, 2], S=4, V=V)
    hypotheses = _all_hypotheses(V, T)
    beam = V ** (T - 1)  # more than a step's candidates (3^(t-1) alive x 4 tokens), so nothing is pruned
    tokens, scores = map(
        np.asarray, _jit(beam_search, params, src, config=config, max_len=T, beam_size=beam, alpha=alpha)
    )
    found = min(beam, len(hypotheses))
    for b in range(src.shape[0]):
        truth = _brute_force_scores(params, src[b], hypotheses, config=config, T=T, alpha=alpha)
        order = np.argsort(-truth, kind="stable")
        assert _as_tuple(tokens[b, 0]) == hypotheses[order[0]]
        # Every hypothesis is found, best first, with its exact score; the spare slots are empty.
        np.testing.assert_allclose(scores[b, :found], truth[order[:found]], rtol=1e-5, atol=1e-5)
        assert {_as_tuple(row) for row in tokens[b, :found]} == {hypotheses[j] for j in order[:found]}
        assert np.isneginf(scores[b, found:]).all() and (tokens[b, found:] == PAD).all()


# The recurrent families on the same exhaustive check: their cache is the decoder state, one per hypothesis.
RECURRENT_CONFIGS = {
    "rnnsearch": dict(cls=RNNSearchConfig, embed_dim=4, hidden_dim=6, alignment_dim=5, maxout_dim=3),
    "rnnsearch_dot": dict(cls=RNNSearchConfig, embed_dim=4, hidden_dim=6, encoder_dim=3, maxout_dim=3, score="dot"),
    "rnnsearch_general": dict(cls=RNNSearchConfig, embed_dim=4, hidden_dim=6, maxout_dim=3, score="general"),
    "rnn_encdec": dict(cls=RNNEncDecConfig, embed_dim=4, hidden_dim=6, maxout_dim=3),
}


def _recurrent_config(name: str, V: int):
    sizes = dict(RECURRENT_CONFIGS[name])
    return sizes.pop("cls")(source_vocab=V, target_vocab=V, max_len=32, **sizes)


def _random_recurrent(name: str, V: int, seed: int):
    """A random recurrent model with unit-normal weights and no biases (but the additive score's ``v``): its
    outputs depend on the source and vary along the output, where random biases would make every step alike."""
    config = _recurrent_config(name, V)
    params = _jit(family(config).init, jax.random.key(seed), config=config)
    rng = np.random.default_rng(seed)

    def randomise(path, w):
        if w.ndim == 1 and jax.tree_util.keystr(path) != "['attention']['v']":
            return jnp.zeros_like(w)
        return jnp.asarray(rng.normal(size=w.shape), jnp.float32)

    return config, jax.tree_util.tree_map_with_path(randomise, params)


@pytest.mark.parametrize("name", list(RECURRENT_CONFIGS))
@pytest.mark.parametrize(("T", "alpha"), [(3, 2.0), (4, 0.6)])
def test_recurrent_beam_search_is_exact_with_a_wide_beam(name, T, alpha):
    V = 5
    config, params = _random_recurrent(name, V, seed=T)
    src = _sources(np.random.default_rng(T), [4, 2], S=4, V=V)
    hypotheses = _all_hypotheses(V, T)
    beam = V ** (T - 1)
    tokens, scores = map(
        np.asarray, _jit(beam_search, params, src, config=config, max_len=T, beam_size=beam, alpha=alpha)
    )
    found = min(beam, len(hypotheses))
    for b in range(src.shape[0]):
        truth = _brute_force_scores(params, src[b], hypotheses, config=config, T=T, alpha=alpha)
        order = np.argsort(-truth, kind="stable")
        assert _as_tuple(tokens[b, 0]) == hypotheses[order[0]]
        np.testing.assert_allclose(scores[b, :found], truth[order[:found]], rtol=1e-5, atol=1e-5)
        assert {_as_tuple(row) for row in tokens[b, :found]} == {hypotheses[j] for j in order[:found]}
        assert np.isneginf(scores[b, found:]).all() and (tokens[b, found:] == PAD).all()


@pytest.mark.parametrize("name", list(RECURRENT_CONFIGS))
def test_recurrent_greedy_is_beam_one_and_the_argmax_of_its_own_teacher_forcing(name):
    config, params = _random_recurrent(name, 7, seed=21)
    src = _sources(np.random.default_rng(21), [4, 2, 3, 4], S=4, V=7)
    greedy = np.asarray(_jit(greedy_decode, params, src, config=config, max_len=6))
    assert len({tuple(row) for row in greedy}) > 1, greedy  # the outputs depend on the source
    tokens, _ = _jit(beam_search, params, src, config=config, max_len=6, beam_size=1, alpha=0.0)
    np.testing.assert_array_equal(np.asarray(tokens[:, 0]), greedy)
    _assert_pad_only_after_eos(greedy)
    # Up to its EOS, every greedy token is the argmax of the teacher-forced logits at that position.
    inputs = np.concatenate([np.full((len(src), 1), BOS, np.int32), greedy[:, :-1]], axis=1)
    logits = np.array(_jit(translate_logits, params, src, inputs, config=config))
    logits[..., PAD] = -np.inf
    for row, row_logits in zip(greedy, logits, strict=True):
        n = len(_as_tuple(row))
        np.testing.assert_array_equal(row_logits[:n].argmax(-1), row[:n])


def test_narrow_beam_scores_are_true_scores_of_its_outputs():
    V, T = 5, 4
    config = _tiny_config(vocab_size=V, num_encoder_layers=1)
    params = _jit(init_transformer, jax.random.key(11), config=config)
    src = _sources(np.random.default_rng(11), [3, 4, 1], S=4, V=V)
    tokens, scores = map(np.asarray, _jit(beam_search, params, src, config=config, max_len=T, beam_size=3))
    hypotheses = _all_hypotheses(V, T)
    for b in range(src.shape[0]):
        truth = _brute_force_scores(params, src[b], hypotheses, config=config, T=T, alpha=0.6)
        score_of = dict(zip(hypotheses, truth, strict=True))
        np.testing.assert_allclose(scores[b], [score_of[_as_tuple(row)] for row in tokens[b]], rtol=1e-5, atol=1e-5)
        assert len({_as_tuple(row) for row in tokens[b]}) == 3
        assert scores[b, 0] <= truth.max() + 1e-6
    _assert_pad_only_after_eos(tokens)


def _small_vocab_models():
    """Three random models over 5 tokens, where EOS is often a close second and early stopping often applies."""
    config = _tiny_config(vocab_size=5, num_encoder_layers=1)
    return [(config, _jit(init_transformer, jax.random.key(100 + seed), config=config)) for seed in range(3)]


SMALL_VOCAB_SOURCES = _sources(np.random.default_rng(5), [4, 2, 3, 4, 1, 2, 3, 4], S=4, V=5)


def test_beam_size_one_without_length_penalty_is_greedy(random_model, copy_model, copy_sources):
    # With alpha > 0 a longer hypothesis can outscore greedy's, so equality holds for alpha = 0 only. It also
    # needs EOS to finish a hypothesis only from within the beam: an EOS ranked second would win here.
    cases = [(random_model, RANDOM_SOURCES, 9), (copy_model, copy_sources, COPY_LEN)]
    cases += [(model, SMALL_VOCAB_SOURCES, 8) for model in _small_vocab_models()]
    for (config, params), src, T in cases:
        greedy = _jit(greedy_decode, params, src, config=config, max_len=T)
        tokens, _ = _jit(beam_search, params, src, config=config, max_len=T, beam_size=1, alpha=0.0)
        np.testing.assert_array_equal(tokens[:, 0], greedy)


def test_beam_scores_sorted_and_pad_after_eos(copy_model, copy_sources):
    config, params = copy_model
    tokens, scores = map(np.asarray, _jit(beam_search, params, copy_sources, config=config, max_len=COPY_LEN))
    assert tokens.shape == (6, 4, COPY_LEN) and scores.shape == (6, 4) and scores.dtype == np.float32
    assert np.isfinite(scores).all() and (np.diff(scores, axis=1) <= 0).all()
    assert (tokens == EOS).any(axis=-1).all(), "the copy model ends every hypothesis it keeps"
    _assert_pad_only_after_eos(tokens)
    # A model that learnt to copy ranks the copy first, as greedy decoding finds it.
    greedy = np.asarray(_jit(greedy_decode, params, copy_sources, config=config, max_len=COPY_LEN))
    assert np.mean((tokens[:, 0] == greedy).all(-1)) >= 0.5


def test_early_stopping_does_not_change_results(copy_model, copy_sources):
    config, params = copy_model
    stopped = _jit(beam_search, params, copy_sources, config=config, max_len=COPY_LEN)
    full = _jit(beam_search, params, copy_sources, config=config, max_len=COPY_LEN, early_stopping=False)
    np.testing.assert_array_equal(stopped[0], full[0])
    np.testing.assert_allclose(stopped[1], full[1], rtol=1e-6)
    # ...and the search did stop before the budget.
    run = functools.partial(
        _run_beam_search, config=config, beam_size=4, alpha=0.6, max_len=COPY_LEN, bos_id=BOS, eos_id=EOS,
        pad_id=PAD, early_stopping=True,
    )  # fmt: skip
    assert int(_jitted(run, ())(params, copy_sources)["step"]) < COPY_LEN


def test_early_stopping_is_exact_when_length_pays():
    # alpha = 2 rewards length strongly, so a wrong bound would stop before longer, better hypotheses. One
    # sentence per call: a batch stops only when all of its sentences may, which hides a wrong bound.
    for config, params in _small_vocab_models():
        kwargs = dict(config=config, max_len=8, beam_size=3, alpha=2.0)
        for row in SMALL_VOCAB_SOURCES:
            stopped = _jit(beam_search, params, row[None], **kwargs)
            full = _jit(beam_search, params, row[None], **kwargs, early_stopping=False)
            np.testing.assert_array_equal(stopped[0], full[0])
            np.testing.assert_allclose(stopped[1], full[1], rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Language-model sampling
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm():
    config = _tiny_config(vocab_size=11)
    return config, _jit(init_language_model, jax.random.key(4), config=config)


def _argmax_rollout(params, prompt: np.ndarray, *, config, max_len: int, eos_id) -> np.ndarray:
    """Greedy continuation by re-running the whole ``language_model`` on the sequence so far."""
    tokens, done = np.asarray(prompt), np.zeros(prompt.shape[0], bool)
    while tokens.shape[1] < max_len:
        logits = np.array(_jit(language_model, params, tokens, config=config)[:, -1])
        logits[:, PAD] = -np.inf
        new = np.where(done, PAD, logits.argmax(-1)).astype(np.int32)
        done |= new == eos_id
        tokens = np.concatenate([tokens, new[:, None]], axis=1)
    return tokens


def _prompt(B: int, P: int) -> np.ndarray:
    return np.random.default_rng(P).integers(3, 11, size=(B, P)).astype(np.int32)


@pytest.mark.parametrize(("prompt_len", "eos_id"), [(1, None), (3, None), (3, 5)])
def test_lm_temperature_zero_is_argmax_rollout(lm, prompt_len, eos_id):
    config, params = lm
    prompt = _prompt(3, prompt_len)
    out = _jit(
        sample_language_model, params, prompt, config=config, max_len=9, rng=jax.random.key(0), temperature=0.0,
        eos_id=eos_id,
    )  # fmt: skip
    np.testing.assert_array_equal(out, _argmax_rollout(params, prompt, config=config, max_len=9, eos_id=eos_id))


def test_lm_top_k_one_is_greedy_and_rng_is_respected(lm):
    config, params = lm
    prompt, kwargs = _prompt(3, 3), dict(config=config, max_len=9, eos_id=None)
    greedy = _jit(sample_language_model, params, prompt, rng=jax.random.key(0), temperature=0.0, **kwargs)
    top1 = _jit(sample_language_model, params, prompt, rng=jax.random.key(1), temperature=1.0, top_k=1, **kwargs)
    np.testing.assert_array_equal(top1, greedy)
    first = _jit(sample_language_model, params, prompt, rng=jax.random.key(2), **kwargs)
    again = _jit(sample_language_model, params, prompt, rng=jax.random.key(2), **kwargs)
    other = _jit(sample_language_model, params, prompt, rng=jax.random.key(3), **kwargs)
    np.testing.assert_array_equal(first, again)
    assert (np.asarray(first) != np.asarray(other)).any()
    np.testing.assert_array_equal(np.asarray(first)[:, :3], prompt)
    assert (np.asarray(first) != PAD).all()


@pytest.mark.parametrize(("temperature", "top_k"), [(2.0, None), (1.0, 3)])
def test_lm_sampling_follows_the_model_distribution(lm, temperature, top_k):
    config, params = lm
    prompt = np.full((4000, 2), [4, 7], np.int32)
    out = _jit(
        sample_language_model, params, prompt, config=config, max_len=3, rng=jax.random.key(9),
        temperature=temperature, top_k=top_k,
    )  # fmt: skip
    logits = np.array(_jit(language_model, params, prompt[:1], config=config)[0, -1]) / temperature
    logits[PAD] = -np.inf
    if top_k is not None:
        logits[logits < np.sort(logits)[-top_k]] = -np.inf
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    observed = np.bincount(np.asarray(out)[:, 2], minlength=config.vocab_size) / prompt.shape[0]
    np.testing.assert_allclose(observed, expected, atol=0.03)  # > 3.8 standard deviations at any p
