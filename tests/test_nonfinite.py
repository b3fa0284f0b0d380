"""NaN injected through the whole training loop, in a batch, a gradient and a parameter.

Each run is ``train_and_evaluate`` on ``experiments/tiny.py`` (8 simulated devices, sharded ``jit``) with the
fault planted from outside the library: a data iterator that corrupts the batch of one step, an objective whose
backward pass returns NaN at marked steps, an initialiser that leaves one weight NaN. The loop must name the
step, keep the batch, keep the last good checkpoint, or, under ``nonfinite="skip"``, skip and go on.
"""

import os
import pathlib
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import loop, train
from attn_jax.checkpoint import Checkpointer
from attn_jax.config import load_experiment
from attn_jax.metrics import read_metrics

TINY = str(pathlib.Path(__file__).resolve().parents[1] / "experiments" / "tiny.py")
VOCAB = 32  # tiny.py's copy task: ids 0..31


class _Corrupting:
    """The training iterator with ``transform(step, batch)`` applied to every batch (steps count from 1)."""

    def __init__(self, inner, transform):
        self._inner, self._transform, self._step = inner, transform, 0
        self.seen = {}

    def __iter__(self):
        return self

    def __next__(self):
        self._step += 1
        self.seen[self._step] = self._transform(self._step, dict(next(self._inner)))
        return self.seen[self._step]

    def get_state(self):
        return self._inner.get_state()

    def set_state(self, state):
        self._inner.set_state(state)


def _corrupt_data(monkeypatch, transform) -> dict:
    """Wraps ``build_datasets`` so the run reads transformed batches; returns ``{"iterator": ...}`` once built."""
    built = {}
    real = loop.build_datasets

    def build(*args, **kwargs):
        datasets = real(*args, **kwargs)
        datasets.train = built["iterator"] = _Corrupting(datasets.train, transform)
        return datasets

    monkeypatch.setattr(loop, "build_datasets", build)
    return built


def _run(workdir, *overrides):
    config = load_experiment(TINY, ["train.eval_every=1000", "eval.beam_size=1", *overrides])
    return loop.train_and_evaluate(config, str(workdir))


def _train_records(workdir) -> list[dict]:
    return [r for r in read_metrics(pathlib.Path(workdir) / "metrics.jsonl") if r["split"] == "train"]


def _out_of_vocabulary(batch):
    """An id past the vocabulary: the embedding gather fills its row with NaN, as it would for corrupt data."""
    targets_in = batch["targets_in"].copy()
    targets_in[0, 1] = VOCAB + 7
    return batch | {"targets_in": targets_in}


# ---------------------------------------------------------------------------------------------------------
# A NaN from a batch
# ---------------------------------------------------------------------------------------------------------


def test_nan_batch_stops_naming_the_step_and_keeping_the_batch_and_the_last_good_checkpoint(tmp_path, monkeypatch):
    built = _corrupt_data(monkeypatch, lambda step, batch: _out_of_vocabulary(batch) if step == 3 else batch)
    # Metrics are fetched only every 100 steps, but the step-4 save must not happen past the bad step 3.
    with pytest.raises(loop.NonFiniteError, match=r"at step 3\b.*nonfinite=skip") as raised:
        _run(tmp_path, "train.steps=6", "train.log_every=100", "train.checkpoint_every=2")
    dumped = tmp_path / "nonfinite" / "step_3.npz"
    assert str(dumped) in str(raised.value)
    with np.load(dumped) as saved:
        for key, value in built["iterator"].seen[3].items():
            np.testing.assert_array_equal(saved[key], value)
    # The step-2 checkpoint is the newest, and whole: it restores, with finite parameters.
    config = load_experiment(TINY, [])
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    assert checkpointer.all_steps() == [2]
    restored = checkpointer.restore(loop.abstract_checkpoint(config)[1])
    checkpointer.close()
    assert restored.step == 2
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored.state["params"]))


# ---------------------------------------------------------------------------------------------------------
# A NaN in a gradient (the loss itself finite)
# ---------------------------------------------------------------------------------------------------------


@jax.custom_vjp
def _nan_gradient_if(params, flag):
    return params


def _forward(params, flag):
    return params, flag


def _backward(flag, cotangent):
    poison = jnp.where(flag > 0, jnp.nan, 1.0)
    return jax.tree.map(lambda g: g * poison, cotangent), jnp.zeros_like(flag)


_nan_gradient_if.defvjp(_forward, _backward)


def _poison_gradients(monkeypatch, steps):
    """Steps in ``steps`` get a finite loss and NaN gradients: the batch carries a flag the objective reads."""
    real = train._objective

    def objective(params, *, batch, **kwargs):
        return real(_nan_gradient_if(params, jnp.max(batch["poison"])), batch=batch, **kwargs)

    def flag(step, batch):
        return batch | {"poison": np.full(batch["targets_out"].shape[:1], float(step in steps), np.float32)}

    monkeypatch.setattr(train, "_objective", objective)
    _corrupt_data(monkeypatch, flag)


def test_nan_gradient_is_skipped_and_training_goes_on(tmp_path, monkeypatch):
    _poison_gradients(monkeypatch, {2})
    # SIGTERM while step 4's batch is read ends the run there, checkpointed, without the final evaluation.
    real_next = _Corrupting.__next__
    monkeypatch.setattr(_Corrupting, "__next__", lambda self: _terminate_at(4, self, real_next))
    assert _run(tmp_path, "train.steps=10", "train.log_every=1", "train.nonfinite=skip") == {}
    records = {r["step"]: r for r in _train_records(tmp_path)}
    assert [records[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 1, 0, 0]
    assert records[2]["loss"] is None  # no applied step in that interval: nothing to average
    assert all(np.isfinite(records[s]["loss"]) for s in (1, 3, 4))
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    restored = checkpointer.restore(loop.abstract_checkpoint(load_experiment(TINY, []))[1])
    checkpointer.close()
    # Adam counted the three applied updates only: the skipped one left the optimiser state alone.
    assert restored.step == 4
    assert int(restored.state["opt_state"][0].count) == 3
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored.state["params"]))


def _terminate_at(step, iterator, real_next):
    batch = real_next(iterator)
    if iterator._step == step:
        os.kill(os.getpid(), signal.SIGTERM)
    return batch


# ---------------------------------------------------------------------------------------------------------
# A NaN in a parameter
# ---------------------------------------------------------------------------------------------------------


def test_nan_parameter_exhausts_the_consecutive_skip_limit(tmp_path, monkeypatch):
    real = loop.init_train_state

    def init_with_nan(rng, **kwargs):
        state = real(rng, **kwargs)
        params = jax.tree.map(lambda x: x, state.params)
        params["decoder"]["layers"]["ffn"]["w_1"] = params["decoder"]["layers"]["ffn"]["w_1"].at[0, 1, 2].set(jnp.nan)
        return state.replace(params=params)

    monkeypatch.setattr(loop, "init_train_state", init_with_nan)
    with pytest.raises(loop.NonFiniteError, match=r"3 consecutive non-finite steps up to step 3"):
        _run(tmp_path, "train.steps=6", "train.log_every=1", "train.nonfinite=skip", "train.max_consecutive_skips=2")
    assert (tmp_path / "nonfinite" / "step_3.npz").is_file()
