"""Tests for attn_jax.train: ``train_step`` and ``eval_step`` against a hand-made computation.

The reference loss is written here from the definition (label-smoothed KL over real tokens, averaged per token)
on the model's logits, differentiated with ``jax.grad`` and pushed through an Optax optimiser by hand. Sizes are
distinct primes (V=19, D=13, N=3, H=5, F=17, B=2, S=7, T=5) so that a swapped axis fails. Every step is jitted
with XLA's backend optimisations off: on CPU one such compile is much cheaper than an eager step or an optimised
compile, and the numbers are the same up to rounding.

``train_step`` calls ``optax.global_norm``, deprecated in Optax 0.2.8 in favour of ``optax.tree.norm``; under this
project's ``filterwarnings = error`` that deprecation would fail every test here. It is ignored for this module
only (``pytestmark``), and ``test_train_step_uses_no_deprecated_optax_api`` fails on it on its own.
"""

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attn_jax import TransformerConfig
from attn_jax.model import language_model, transformer
from attn_jax.optim import make_optimizer, rsqrt_warmup_schedule
from attn_jax.train import (
    TrainState,
    accumulate_gradients,
    apply_gradients,
    eval_step,
    init_train_state,
    start_accumulation,
    train_step,
)
from tests.helpers import assert_trees_allclose

V, D, N, H, F = 19, 13, 3, 5, 17
B, S, T = 2, 7, 5
PAD, EOS, BOS = 0, 1, 2
EPS_LS = 0.1
CFG = TransformerConfig(
    vocab_size=V, d_model=D, num_heads=N, head_dim=H, d_ff=F, num_encoder_layers=1, num_decoder_layers=1,
    max_len=16, dropout_rate=0.0,
)  # fmt: skip
CFG_DROPOUT = dataclasses.replace(CFG, dropout_rate=0.3)
LR = rsqrt_warmup_schedule(D, 3)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
GLOBAL_NORM_DEPRECATION = "ignore:optax.global_norm is deprecated:DeprecationWarning"
pytestmark = pytest.mark.filterwarnings(GLOBAL_NORM_DEPRECATION)


@pytest.fixture(autouse=True)
def standard_dtype_promotion():
    # optax's adam mixes weakly typed Python scalars in ways the strict mode rejects.
    with jax.numpy_dtype_promotion("standard"):
        yield


@functools.cache
def _tx():
    return make_optimizer(LR)


def _jit(fn, **kwargs):
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


@functools.cache
def _state(task="translation") -> TrainState:
    """One initial state per task, shared by every test (the dropout rate does not change the parameters)."""
    return _jit(functools.partial(init_train_state, model_config=CFG, tx=_tx(), task=task))(jax.random.key(0))


@functools.cache
def _step(cfg: TransformerConfig, label_smoothing: float = EPS_LS):
    return _jit(functools.partial(train_step, model_config=cfg, tx=_tx(), label_smoothing=label_smoothing))


@functools.cache
def _eval(cfg: TransformerConfig):
    return _jit(functools.partial(eval_step, model_config=cfg))


def _batch(task="translation", seed=0, weights=False) -> dict:
    """Random ids with EOS and padding: row 0 full length, row 1 shorter, on both sides."""
    rng = np.random.default_rng(seed)
    target = rng.integers(3, V, size=(B, T - 1)).astype(np.int32)
    target_len = [T - 1, 2]
    targets_in = np.zeros((B, T), np.int32)
    targets_out = np.zeros((B, T), np.int32)
    for b, n in enumerate(target_len):
        targets_in[b, : n + 1] = [BOS, *target[b, :n]]
        targets_out[b, : n + 1] = [*target[b, :n], EOS]
    batch = {"targets_in": jnp.asarray(targets_in), "targets_out": jnp.asarray(targets_out)}
    if task == "translation":
        inputs = np.zeros((B, S), np.int32)
        for b, n in enumerate([S - 1, 4]):
            inputs[b, : n + 1] = [*rng.integers(3, V, size=n), EOS]
        batch["inputs"] = jnp.asarray(inputs)
    if weights:
        w = rng.uniform(0.5, 2.0, size=(B, T)).astype(np.float32) * (targets_out != PAD)
        batch["weights"] = jnp.asarray(w)
    return batch


def _logits(params, batch, cfg, dropout_rng):
    if "inputs" in batch:
        return transformer(params, batch["inputs"], batch["targets_in"], config=cfg, dropout_rng=dropout_rng)
    return language_model(params, batch["targets_in"], config=cfg, dropout_rng=dropout_rng)


def _reference_sums(params, batch, cfg, eps, dropout_rng):
    """Sums written from the definition: KL(q || p) with q = 1 - eps on the target, eps / (V - 1) elsewhere."""
    logits = _logits(params, batch, cfg, dropout_rng)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    onehot = jax.nn.one_hot(batch["targets_out"], V, dtype=jnp.float32)
    q = onehot * (1.0 - eps) + (1.0 - onehot) * (eps / (V - 1))
    q_log_q = jnp.where(q > 0, q * jnp.log(jnp.where(q > 0, q, 1.0)), 0.0)
    kl = jnp.sum(q_log_q - q * log_p, axis=-1)
    nll = -jnp.sum(onehot * log_p, axis=-1)
    w = batch.get("weights", (batch["targets_out"] != PAD).astype(jnp.float32))
    hits = (jnp.argmax(logits, axis=-1) == batch["targets_out"]).astype(jnp.float32)
    return {"loss": jnp.sum(kl * w), "nll": jnp.sum(nll * w), "correct": jnp.sum(hits * w), "weight": jnp.sum(w)}


@functools.cache
def _reference_grad(cfg, eps, keys):
    """jit(grad) of the per-token mean smoothed loss; ``keys`` fixes the batch structure for the cache."""

    def mean_loss(params, batch, dropout_rng):
        sums = _reference_sums(params, batch, cfg, eps, dropout_rng)
        return sums["loss"] / sums["weight"], sums

    return _jit(jax.grad(mean_loss, has_aux=True))


def _reference_step(state, batch, rng, cfg, eps=EPS_LS):
    """Gradient of the mean loss with this step's dropout key, then the optimiser by hand."""
    dropout_rng = jax.random.fold_in(rng, state.step) if cfg.dropout_rate else None
    grads, sums = _reference_grad(cfg, eps, tuple(sorted(batch)))(state.params, batch, dropout_rng)
    updates, opt_state = _tx().update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), opt_state, grads, sums


def _assert_trees_equal(actual, expected):
    actual_leaves, actual_def = jax.tree.flatten(actual)
    expected_leaves, expected_def = jax.tree.flatten(expected)
    assert actual_def == expected_def
    for a, e in zip(actual_leaves, expected_leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def _first_moment(opt_state):
    return optax.tree_utils.tree_get(opt_state, "mu")


@pytest.mark.filterwarnings("error")
def test_train_step_uses_no_deprecated_optax_api():
    """Tracing a step must not warn: the project turns warnings into errors (attn_jax/train.py calls the
    deprecated ``optax.global_norm``; ``optax.tree.norm`` is its replacement)."""
    fn = functools.partial(train_step, model_config=CFG, tx=_tx(), label_smoothing=EPS_LS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.eval_shape(fn, _state(), _batch(), jax.random.key(0))


def test_train_state_can_be_built_abstractly():
    """``jax.eval_shape`` of the initialisation gives the abstract state that checkpoints are restored into (the
    loop does exactly this). Its leaves are ``ShapeDtypeStruct``s, so ``TrainState``'s annotations must admit
    them: under pytest the jaxtyping hook checks ``TrainState.__init__`` when the tree is rebuilt."""
    abstract = jax.eval_shape(functools.partial(init_train_state, model_config=CFG, tx=_tx()), jax.random.key(0))
    assert abstract.step.shape == () and abstract.step.dtype == jnp.int32
    assert abstract.params["embedding"]["embedding"].shape == (V, D)
    # The same holds for host copies (numpy leaves), e.g. from jax.device_get.
    host = jax.device_get(_state())
    assert isinstance(host.params["embedding"]["embedding"], np.ndarray)


# ---------------------------------------------------------------------------------------------------------
# One step equals the computation by hand
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "task", "weights"),
    [(CFG, "translation", False), (CFG_DROPOUT, "translation", True), (CFG, "lm", False)],
    ids=["translation", "dropout-and-explicit-weights", "lm"],
)
def test_one_step_equals_grad_of_the_mean_smoothed_loss_and_adam_by_hand(cfg, task, weights):
    state, batch, rng = _state(task), _batch(task, weights=weights), jax.random.key(7)
    params, opt_state, grads, sums = _reference_step(state, batch, rng, cfg)
    new_state, metrics = _step(cfg)(state, batch, rng)

    assert int(new_state.step) == 1
    # Adam's first moment after one step is (1 - b1) * g: the gradient train_step used, exactly scaled.
    used_grads = jax.tree.map(lambda m: m / (1 - 0.9), _first_moment(new_state.opt_state))
    assert_trees_allclose(used_grads, grads, rtol=1e-4, atol=1e-6)
    assert_trees_allclose(new_state.opt_state, opt_state, rtol=1e-4, atol=1e-8)
    # The parameters moved by Adam's update of those gradients...
    updates, _ = _tx().update(used_grads, state.opt_state, state.params)
    assert_trees_allclose(new_state.params, optax.apply_updates(state.params, updates), rtol=1e-5, atol=1e-6)
    # ...which is the update by hand wherever the gradient is not rounding noise (Adam's first step is about
    # -lr * sign(g), so a gradient that is 0 in exact arithmetic, e.g. of the key bias, moves by a random sign).
    lr = float(LR(0))
    for new, expected, g in zip(*map(jax.tree.leaves, (new_state.params, params, grads)), strict=True):
        clear = np.abs(np.asarray(g)) > 1e-4
        np.testing.assert_allclose(np.asarray(new)[clear], np.asarray(expected)[clear], rtol=0, atol=1e-3 * lr)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new_state.params, state.params)
    assert max(jax.tree.leaves(moved)) > 0.5 * lr

    # Metrics are sums over the real tokens of the whole batch.
    for name in ("loss", "nll", "correct", "weight"):
        np.testing.assert_allclose(float(metrics[name]), float(sums[name]), rtol=1e-5, atol=1e-6, err_msg=name)
    expected_weight = float(jnp.sum(batch["weights"])) if weights else float(jnp.sum(batch["targets_out"] != PAD))
    np.testing.assert_allclose(float(metrics["weight"]), expected_weight, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(grads)), rtol=1e-4)
    assert float(metrics["finite"]) == 1.0


def test_ids_behind_the_padding_do_not_change_the_step():
    """Decoder inputs after a sequence's end are masked (causally and by zero weight): changing them changes
    neither the loss nor the update."""
    state, batch, rng = _state(), _batch(), jax.random.key(1)
    targets_in = np.asarray(batch["targets_in"]).copy()
    assert np.all(targets_in[1, 3:] == PAD)
    targets_in[1, 3:] = [5, 6]
    s1, m1 = _step(CFG)(state, batch, rng)
    s2, m2 = _step(CFG)(state, dict(batch, targets_in=jnp.asarray(targets_in)), rng)
    assert_trees_allclose(s2.params, s1.params, rtol=1e-6, atol=1e-7)
    for name in ("loss", "weight", "correct"):
        np.testing.assert_allclose(float(m2[name]), float(m1[name]), rtol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------------------
# Dropout randomness
# ---------------------------------------------------------------------------------------------------------


def test_dropout_key_is_folded_with_the_step():
    state, batch, rng = _state(), _batch(weights=True), jax.random.key(3)
    step = _step(CFG_DROPOUT)
    a_state, a = step(state, batch, rng)
    b_state, b = step(state, batch, rng)
    # Same state, batch and key: bit-identical.
    _assert_trees_equal((a_state, a), (b_state, b))
    # Same parameters at another step: another dropout mask, another loss.
    _, later = step(state.replace(step=jnp.asarray(1, jnp.int32)), batch, rng)
    assert float(later["loss"]) != float(a["loss"])
    # ...and it is exactly the reference with fold_in(rng, 1).
    _, _, _, sums = _reference_step(state.replace(step=jnp.asarray(1, jnp.int32)), batch, rng, CFG_DROPOUT)
    np.testing.assert_allclose(float(later["loss"]), float(sums["loss"]), rtol=1e-5)
    # Another base key: another mask.
    _, other = step(state, batch, jax.random.key(4))
    assert float(other["loss"]) != float(a["loss"])


def test_without_dropout_the_step_number_and_key_do_not_matter():
    state, batch = _state(), _batch()
    _, a = _step(CFG)(state, batch, jax.random.key(0))
    _, b = _step(CFG)(state.replace(step=jnp.asarray(5, jnp.int32)), batch, jax.random.key(9))
    np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Metrics agree with eval_step
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["translation", "lm"])
def test_train_metrics_match_eval_step_without_dropout(task):
    state, batch = _state(task), _batch(task, seed=5)
    _, train_metrics = _step(CFG)(state, batch, jax.random.key(0))
    sums = _eval(CFG)(state.params, batch)
    assert set(sums) == {"loss", "nll", "correct", "weight"}
    for name in ("nll", "correct", "weight"):
        np.testing.assert_allclose(float(sums[name]), float(train_metrics[name]), rtol=1e-5, err_msg=name)
    # eval's loss is the unsmoothed NLL (what perplexity is computed from); training's is smoothed.
    np.testing.assert_allclose(float(sums["loss"]), float(train_metrics["nll"]), rtol=1e-5)
    assert abs(float(sums["loss"]) - float(train_metrics["loss"])) > 1e-3
    _, _, _, reference = _reference_step(state, batch, jax.random.key(0), CFG)
    for name in ("nll", "correct", "weight"):
        np.testing.assert_allclose(float(sums[name]), float(reference[name]), rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(float(sums["loss"]), float(reference["nll"]), rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Non-finite steps are not applied
# ---------------------------------------------------------------------------------------------------------


def _poisoned(kind: str):
    """The shared state with one NaN weight, or one embedding row so large that layer norm overflows."""
    state = _state()
    params = jax.tree.map(lambda x: x, state.params)  # a new tree with the same leaves
    if kind == "nan-parameter":
        params["decoder"]["layers"]["ffn"]["w_1"] = params["decoder"]["layers"]["ffn"]["w_1"].at[0, 2, 3].set(jnp.nan)
    else:  # "huge-parameter": a real token's embedding at 1e30; its variance overflows float32 to inf
        token = int(_batch()["targets_in"][0, 1])
        params["embedding"]["embedding"] = params["embedding"]["embedding"].at[token].set(1e30)
    return state.replace(params=params), _batch()


@pytest.mark.parametrize("kind", ["nan-parameter", "huge-parameter"])
def test_non_finite_step_leaves_params_and_optimizer_state_unchanged(kind):
    state, batch = _poisoned(kind)
    # Move the optimiser state off zero first, so "unchanged" is not just "still zero".
    warm, _ = _step(CFG)(_state(), _batch(seed=9), jax.random.key(0))
    state = state.replace(opt_state=warm.opt_state)
    new_state, metrics = _step(CFG)(state, batch, jax.random.key(0))
    assert float(metrics["finite"]) == 0.0
    assert not np.isfinite(float(metrics["loss"]))
    _assert_trees_equal(new_state.params, state.params)  # NaN compares equal to NaN here
    _assert_trees_equal(new_state.opt_state, state.opt_state)


def test_training_goes_on_normally_after_a_skipped_step():
    state, batch = _state(), _batch()
    rng = jax.random.key(0)
    bad_state, _ = _poisoned("nan-parameter")
    skipped, metrics = _step(CFG)(bad_state, batch, rng)
    assert float(metrics["finite"]) == 0.0
    # Putting the good parameters back, the next update is the one the untouched state would have made.
    resumed, metrics = _step(CFG)(skipped.replace(params=state.params), batch, rng)
    assert float(metrics["finite"]) == 1.0
    fresh, _ = _step(CFG)(state, batch, rng)
    assert_trees_allclose(resumed.params, fresh.params, rtol=1e-6, atol=1e-8)
    assert_trees_allclose(resumed.opt_state, fresh.opt_state, rtol=1e-6, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------
# pmap-style averaging over a named axis
# ---------------------------------------------------------------------------------------------------------


def test_axis_name_sums_gradients_and_metrics_over_shards():
    """Two shards under ``vmap(axis_name=...)`` (what pmap does per device) give the one-batch step."""
    state, rng = _state(), jax.random.key(0)
    batch = {k: jnp.concatenate([v, v[::-1]]) for k, v in _batch(seed=4).items()}  # B = 4, rows of both kinds
    whole_state, whole = _step(CFG)(state, batch, rng)
    shards = jax.tree.map(lambda x: x.reshape(2, x.shape[0] // 2, *x.shape[1:]), batch)
    sharded = _jit(
        jax.vmap(
            functools.partial(train_step, model_config=CFG, tx=_tx(), label_smoothing=EPS_LS, axis_name="shards"),
            in_axes=(None, 0, None),
            axis_name="shards",
        )
    )
    shard_states, shard_metrics = sharded(state, shards, rng)
    for i in range(2):
        assert_trees_allclose(jax.tree.map(lambda x, i=i: x[i], shard_states.params), whole_state.params, atol=1e-6)
        for name in ("loss", "nll", "correct", "weight", "grad_norm"):
            np.testing.assert_allclose(float(shard_metrics[name][i]), float(whole[name]), rtol=1e-5, err_msg=name)


# ---------------------------------------------------------------------------------------------------------
# Convergence: a tiny model learns to copy
# ---------------------------------------------------------------------------------------------------------


def _copy_batch(rng: np.random.Generator, size: int, vocab: int, max_length: int) -> dict:
    """Random sequences of 3..max_length real tokens; the target is the source, then EOS, then padding."""
    width = max_length + 1
    inputs = np.zeros((size, width), np.int32)
    targets_in = np.zeros((size, width), np.int32)
    targets_out = np.zeros((size, width), np.int32)
    for row, length in enumerate(rng.integers(3, max_length + 1, size=size)):
        tokens = rng.integers(3, vocab, size=length)
        inputs[row, : length + 1] = [*tokens, EOS]
        targets_in[row, : length + 1] = [BOS, *tokens]
        targets_out[row, : length + 1] = [*tokens, EOS]
    return {"inputs": inputs, "targets_in": targets_in, "targets_out": targets_out}


def test_jitted_train_step_learns_the_copy_task():
    vocab, max_length, steps = 12, 6, 400
    cfg = TransformerConfig(
        vocab_size=vocab, d_model=32, num_heads=2, d_ff=64, num_encoder_layers=1, num_decoder_layers=1, max_len=16,
        dropout_rate=0.0,
    )  # fmt: skip
    tx = make_optimizer(rsqrt_warmup_schedule(cfg.d_model, 50))
    state = _jit(functools.partial(init_train_state, model_config=cfg, tx=tx))(jax.random.key(0))
    step = _jit(functools.partial(train_step, model_config=cfg, tx=tx, label_smoothing=0.0), donate_argnums=0)
    data = np.random.default_rng(0)
    rng = jax.random.key(1)
    first = None
    for _ in range(steps):
        state, metrics = step(state, _copy_batch(data, 32, vocab, max_length), rng)
        first = float(metrics["loss"] / metrics["weight"]) if first is None else first
    assert first > 2.0  # about log(12) at the start
    held_out = _copy_batch(np.random.default_rng(123), 64, vocab, max_length)
    sums = _jit(functools.partial(eval_step, model_config=cfg))(state.params, held_out)
    assert float(sums["loss"] / sums["weight"]) < 0.05
    assert float(sums["correct"] / sums["weight"]) > 0.99


def _padded_to(batch: dict, length: int) -> dict:
    return {k: jnp.pad(v, ((0, 0), (0, max(length - v.shape[1], 0)))) for k, v in batch.items()}


def test_accumulated_micro_batches_make_the_update_of_one_batch_with_every_token_weighted_alike():
    """Two micro-batches of different lengths and token counts, accumulated, give the update of their union: the
    gradient sums are divided by the total token count (not averaged per micro-batch), and the step counts one
    update. The reference is ``train_step`` on both micro-batches padded to one length and stacked as one batch."""
    long, short = _batch(seed=1), _batch(seed=2)
    short = {k: v[:, : v.shape[1] - 2] for k, v in short.items()}  # fewer tokens, shorter rows
    short = {**short, "targets_out": short["targets_out"].at[:, -1].set(EOS)}
    assert float(jnp.sum(long["targets_out"] != PAD)) != float(jnp.sum(short["targets_out"] != PAD))
    union = {k: jnp.concatenate([_padded_to(long, n)[k], _padded_to(short, n)[k]])
             for k, n in (("inputs", S), ("targets_in", T), ("targets_out", T))}  # fmt: skip
    expected, expected_metrics = _step(CFG)(_state(), union, jax.random.key(1))

    common = {"model_config": CFG, "label_smoothing": EPS_LS}
    accumulate = _jit(functools.partial(accumulate_gradients, **common))
    sums = _jit(start_accumulation)(_state().params)
    for index, micro in enumerate((long, short)):
        sums = accumulate(sums, _state().params, micro, jax.random.key(1), _state().step, index)
    state, metrics = _jit(functools.partial(apply_gradients, tx=_tx()))(_state(), *sums)

    assert int(state.step) == int(_state().step) + 1
    for name in ("loss", "nll", "correct", "weight"):
        np.testing.assert_allclose(metrics[name], expected_metrics[name], rtol=1e-6)
    for (path, actual), want in zip(jax.tree_util.tree_leaves_with_path(state.params),
                                    jax.tree.leaves(expected.params), strict=True):  # fmt: skip
        if jax.tree_util.keystr(path).endswith("['b_k']"):
            continue  # exact gradient 0 (softmax ignores q.b_k): Adam scales rounding noise up (test_parallel.py)
        np.testing.assert_allclose(actual, want, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    # Averaging per micro-batch instead would weigh the short micro-batch's tokens more: a different update.
    grads = [jax.grad(lambda p, b=b: _reference_sums(p, b, CFG, EPS_LS, None)["loss"])(_state().params)
             for b in (long, short)]  # fmt: skip
    weights = [float(jnp.sum(b["targets_out"] != PAD)) for b in (long, short)]
    per_batch_mean = jax.tree.map(lambda a, b: (a / weights[0] + b / weights[1]) / 2, *grads)
    token_mean = jax.tree.map(lambda a, b: (a + b) / sum(weights), *grads)
    assert not np.allclose(per_batch_mean["embedding"]["embedding"], token_mean["embedding"]["embedding"])
