"""End-to-end tests of attn_jax.loop: ``train_and_evaluate`` on ``experiments/tiny.py`` and the copy task.

A run writes checkpoints, ``metrics.jsonl``, ``config.json``, ``results.json`` and plots; a second run in the same
workdir resumes from the newest checkpoint; ``attn-jax eval`` reads the result back; the copy task learns
to copy held-out sequences. The learning rates in the log are checked against the paper's equation 3.

The loop runs on the 8 simulated CPU devices of tests/conftest.py (a batch-sharded mesh).

``attn_jax.loop`` is imported inside the tests, not at the top: should it fail to import (under pytest the
jaxtyping hook type-checks it as it is imported), each test reports that instead of the whole session stopping
at collection.
"""

import gc
import importlib
import json
import logging
import math
import pathlib
import shutil
import subprocess
import sys
import traceback
import warnings

import jax
import numpy as np
import pytest

from attn_jax import checkpoint as ckpt_lib
from attn_jax.checkpoint import Checkpointer, environment_metadata
from attn_jax.config import load_experiment
from attn_jax.metrics import read_metrics
from tests.helpers import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "experiments" / "tiny.py")
COPY = str(ROOT / "experiments" / "copy_task.py")
# tiny.py with a shorter run: 4 steps, every step logged, an evaluation and a checkpoint every 2 steps.
TINY_OVERRIDES = ["train.steps=4", "train.log_every=1", "train.eval_every=2", "train.checkpoint_every=2"]


def _loop():
    return importlib.import_module("attn_jax.loop")


def _readers():
    """``(attn_jax.runs, attn_jax.commands)``, imported as ``_loop`` is."""
    return importlib.import_module("attn_jax.runs"), importlib.import_module("attn_jax.commands")


def _train(spec: str, workdir, *overrides: str) -> dict:
    """``train_and_evaluate``; if it raises, fails this test with the error and any files the run left open.

    (A run that dies leaves its metrics file open; its ResourceWarning, an error under this project's settings,
    would otherwise surface in whichever later test happens to run the garbage collector.)
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        try:
            return _loop().train_and_evaluate(load_experiment(spec, list(overrides)), str(workdir))
        except Exception:  # reported below, with its traceback
            message = traceback.format_exc(limit=-8)
        gc.collect()
    leaks = "".join(f"\n  left open: {w.message}" for w in caught if issubclass(w.category, ResourceWarning))
    pytest.fail(f"train_and_evaluate raised:\n{message}{leaks}", pytrace=False)


def _records(workdir, split: str) -> list[dict]:
    return [r for r in read_metrics(pathlib.Path(workdir) / "metrics.jsonl") if r["split"] == split]


def _paper_lrate(step_num, d_model, warmup_steps, scale=1.0):
    return scale * d_model**-0.5 * min(step_num**-0.5, step_num * warmup_steps**-1.5)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One 4-step run of experiments/tiny.py, shared by the tests that only read it."""
    workdir = tmp_path_factory.mktemp("tiny")
    results = _train(TINY, workdir, *TINY_OVERRIDES)
    return workdir, results


def test_loop_module_imports_under_runtime_type_checks():
    """The jaxtyping/beartype hook checks every annotation of attn_jax.loop as it is imported (point 7 of the
    house style); an annotation must be a type, e.g. ``collections.abc.Callable``, not the builtin ``callable``."""
    assert callable(_loop().train_and_evaluate)


# ---------------------------------------------------------------------------------------------------------
# What a run leaves in its workdir
# ---------------------------------------------------------------------------------------------------------


def test_run_writes_checkpoints_config_results_and_plots(tiny_run):
    workdir, results = tiny_run
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["steps"] == 4 and config["model"]["d_model"] == 32
    saved = json.loads((workdir / "results.json").read_text())
    assert set(saved["validation"]) >= {"loss", "accuracy", "perplexity", "exact_match"}
    assert 0.0 <= saved["test"]["exact_match"] <= 1.0
    png = workdir / "plots" / "learning_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The returned metrics are the final validation metrics.
    assert set(results) >= {"loss", "accuracy", "perplexity", "exact_match"}
    assert results["loss"] == pytest.approx(saved["validation"]["loss"], rel=1e-9)


def test_metrics_log_has_train_and_eval_records(tiny_run):
    workdir, results = tiny_run
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert {r["split"] for r in records} >= {"train", "eval"}
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    # Tokens/s leave out the first update, whose time is mostly compilation: the first reading comes after it.
    assert "tokens_per_second" not in train[0] and all(r["tokens_per_second"] > 0 for r in train[1:])
    for record in train:
        assert {"loss", "nll", "accuracy", "grad_norm", "learning_rate"} <= set(record)
        assert math.isfinite(record["loss"]) and record["loss"] > 0
        assert 0.0 <= record["accuracy"] <= 1.0
        # Equation 3 with d_model = 32, warmup_steps = 10 (tiny.py), at the step just taken.
        assert record["learning_rate"] == pytest.approx(_paper_lrate(record["step"], 32, 10), rel=1e-6)
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    for record in evals:
        assert {"loss", "accuracy", "perplexity", "exact_match"} <= set(record)
        assert record["perplexity"] == pytest.approx(math.exp(record["loss"]), rel=1e-9)
    assert evals[-1]["loss"] == pytest.approx(results["loss"], rel=1e-9)


def test_eval_of_the_run_reads_back_the_final_metrics(tiny_run):
    workdir, _ = tiny_run
    runs, commands = _readers()
    model = runs.load_model(workdir, runs.read_config(workdir))
    results = commands.evaluate(model, workdir)
    validation = results["validation"]
    assert results["step"] == 4
    assert set(validation) >= {"loss", "accuracy", "perplexity", "exact_match"}
    assert validation["perplexity"] == pytest.approx(math.exp(validation["loss"]), rel=1e-9)
    assert 0.0 <= results["test"]["exact_match"] <= 1.0
    # The newest checkpoint holds the final parameters, so its metrics are the last evaluation's.
    final = _records(workdir, "eval")[-1]
    assert final["step"] == 4
    for name in ("loss", "accuracy", "exact_match"):
        assert validation[name] == pytest.approx(final[name], rel=1e-5, abs=1e-6), name


def test_load_model_reads_the_run_config_and_the_newest_parameters(tiny_run):
    workdir, _ = tiny_run
    runs, _ = _readers()
    model = runs.load_model(workdir, runs.read_config(workdir))
    assert model.model_config.d_model == 32 and model.model_config.vocab_size == 32 and model.step == 4
    assert model.params["embedding"]["embedding"].shape == (32, 32)
    assert model.config.train.steps == 4  # the run's own overrides, not tiny.py's defaults
    with Checkpointer(workdir / "checkpoints", read_only=True) as checkpointer:
        assert checkpointer.latest_step() == 4
        assert checkpointer.restore(_loop().abstract_checkpoint(model.config)[1], step=2).step == 2
    assert runs.load_model(workdir, model.config, checkpoint=2).step == 2


def test_bleu_examples_zero_evaluates_loss_only_during_training_and_scores_the_test_split_at_the_end(tmp_path):
    results = _train(TINY, tmp_path, "train.steps=3", "train.eval_every=1", "eval.bleu_examples=0",
                     "train.profile_steps=(1, 2)")  # fmt: skip
    evals = _records(tmp_path, "eval")
    assert [r["step"] for r in evals] == [1, 2, 3]
    # Each evaluation during training measures its own time, and what share of the run's wall time they took.
    timing = _records(tmp_path, "eval_time")
    assert [r["step"] for r in timing] == [1, 2]
    assert all(0 < r["seconds"] <= r["total_seconds"] and 0 < r["fraction_of_wall_time"] < 1 for r in timing)
    # train.profile_steps = (1, 2): a jax.profiler trace of update 2, for TensorBoard's profile plugin or Perfetto.
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))
    for record in evals:
        assert "loss" in record and "exact_match" not in record
    assert "exact_match" not in results
    assert 0.0 <= json.loads((tmp_path / "results.json").read_text())["test"]["exact_match"] <= 1.0


@pytest.mark.slow
def test_a_checkpoint_is_evaluated_on_a_different_number_of_devices(tiny_run, tmp_path):
    """Trained on 8 (simulated) devices, evaluated by a process with 1, as ``attn-jax eval`` (and ``translate``,
    ``average``) run after training on another machine."""
    env = subprocess_env(1)
    command = [sys.executable, "-m", "attn_jax", "eval", "--workdir", str(tiny_run[0])]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    validation = json.loads(result.stdout)["validation"]
    final = _records(tiny_run[0], "eval")[-1]
    assert validation["loss"] == pytest.approx(final["loss"], rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Resuming
# ---------------------------------------------------------------------------------------------------------


def test_second_run_resumes_from_the_newest_checkpoint(tiny_run, tmp_path, caplog, monkeypatch):
    workdir = tmp_path / "resumed"
    shutil.copytree(tiny_run[0], workdir)
    # Resuming under another config value and another library version: both are named in a warning.
    monkeypatch.setattr(ckpt_lib, "environment_metadata", lambda: {**environment_metadata(), "optax": "0.0.1"})
    with caplog.at_level(logging.WARNING, logger="attn_jax.loop"):
        _train(TINY, workdir, *TINY_OVERRIDES[1:], "train.steps=6")
    warned = [r.getMessage() for r in caplog.records if r.name == "attn_jax.loop"]
    assert "resuming step 4 with config train.steps = 6; the checkpoint was written with 4" in warned
    assert any(m.startswith("resuming step 4 with metadata optax = '0.0.1'; the checkpoint was written with '0.") for
               m in warned)  # fmt: skip
    assert not any("data_fingerprint" in m for m in warned)
    train_steps = [r["step"] for r in _records(workdir, "train")]
    # The log continues: the first resumed step is the checkpointed step + 1, nothing is redone.
    assert train_steps == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in _records(workdir, "eval")] == [2, 4, 6]
    with Checkpointer(workdir / "checkpoints", read_only=True) as checkpointer:
        assert checkpointer.latest_step() == 6
    # The schedule picks up where it was (equation 3 at step_num 5 and 6, not 1 and 2).
    for record in _records(workdir, "train")[4:]:
        assert record["learning_rate"] == pytest.approx(_paper_lrate(record["step"], 32, 10), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# The copy task is learned
# ---------------------------------------------------------------------------------------------------------


# copy_task.py (d_model 64, 2+2 layers, beam 4) on sequences of 4 to 6 tokens for 400 updates, at peak learning rate
# 8e-3 with the last 200 updates cooled down linearly to zero and the paper's Adam beta2 0.98: about 40-60 s on 2
# loaded CPU cores, as `attn-jax train` at XLA's default optimisation. Margin, measured on this 2-core AMD EPYC
# (AVX-512) with seeds 0-3: 100% exact match on validation and on test (256 sequences each; the test needs 99%) for
# every seed; with copy_task.py's beta2 0.999 instead, 99.6-100%. Without the cool-down, at copy_task.py's own peak
# (4e-3), 400 updates gave 97.7-100% on seeds 0-2 (two of them under 99% on some split; issue 11 saw 95.7% on seed 0)
# and 800 updates 98.8-100%: the last wrong sequences put a repeated neighbour token in the wrong place, which a
# learning rate still at its peak keeps doing.
COPY_SPEC = f"{COPY}:steps=400"
COPY_OVERRIDES = [
    "data.copy.max_length=6", "eval.attention_plots=0", "train.learning_rate_scale=1.0", "train.cooldown_steps=200",
    "train.b2=0.98",
]  # fmt: skip


@pytest.mark.slow
def test_copy_task_reaches_99_percent_exact_match_on_held_out_sequences(tmp_path):
    command = [sys.executable, "-m", "attn_jax", "train", "--config", COPY_SPEC, "--workdir", str(tmp_path)]
    command += [f"--config.{override}" for override in COPY_OVERRIDES]
    env = subprocess_env(8, fast_compile=False)
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "results.json").read_text())
    # 256 validation and 256 test sequences, drawn from other seeds than the training ones.
    assert saved["validation"]["exact_match"] >= 0.99, saved["validation"]
    assert saved["test"]["exact_match"] >= 0.99, saved["test"]


# ---------------------------------------------------------------------------------------------------------
# The low-resource recipe's loop options
# ---------------------------------------------------------------------------------------------------------


def test_final_evaluation_averages_the_last_checkpoints_and_picks_decoding_on_validation(tmp_path):
    results = _train(
        TINY, tmp_path, "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=3", "train.eval_every=1",
        "train.bleu_every=2", "eval.average_last=2", "eval.beam_sizes=(1, 2)", "eval.alphas=(0.6, 1.0)",
    )  # fmt: skip
    # BLEU-style scores (exact match here) only every train.bleu_every steps; loss at every evaluation.
    evals = {r["step"]: r for r in _records(tmp_path, "eval")}
    assert "exact_match" not in evals[1] and "exact_match" in evals[2] and "loss" in evals[3]
    # The final evaluation scored the average of checkpoints 2 and 4, which is also saved for readers.
    assert results["averaged_steps"] == [2, 4]
    runs, _ = _readers()
    config = runs.read_config(tmp_path)
    params = {step: runs.load_model(tmp_path, config, checkpoint=step).params for step in (2, 4)}
    averaged = runs.load_model(tmp_path, config, checkpoint="averaged").params
    for a, b, mean in zip(*(jax.tree.leaves(t) for t in (params[2], params[4], averaged)), strict=True):
        np.testing.assert_allclose(mean, (np.asarray(a) + np.asarray(b)) / 2, rtol=1e-6, atol=1e-7)
    # Four beam/alpha pairs were tried on validation; the best one decoded the test split.
    tried = results["decoding"]["tried"]
    assert sorted((r["beam_size"], r["alpha"]) for r in tried) == [(1, 0.6), (1, 1.0), (2, 0.6), (2, 1.0)]
    best = max(tried, key=lambda r: r["exact_match"])
    assert (results["decoding"]["beam_size"], results["decoding"]["alpha"]) == (best["beam_size"], best["alpha"])
    assert (
        json.loads((tmp_path / "results.json").read_text())["validation"]["decoding"]["beam_size"] == best["beam_size"]
    )


def test_the_final_average_skips_a_periodic_save_made_just_before_the_last_one(tmp_path):
    # Saves at 4 and 8 (every 4) and at the last step, 9: 8 is less than half an interval before 9, so the two
    # checkpoints averaged are 4 and 9, not 8 and 9 (a run stopped by its budget would weigh its end twice).
    results = _train(
        TINY, tmp_path, "train.steps=9", "train.checkpoint_every=4", "train.keep_checkpoints=4",
        "train.eval_every=100", "eval.average_last=2",
    )  # fmt: skip
    assert results["averaged_steps"] == [4, 9]
    # Readers pick the steps the same way: `attn-jax average`, and load_model(average=) up to a step (bench families).
    runs, _ = _readers()
    main = importlib.import_module("attn_jax.main").main
    assert main(["average", "--workdir", str(tmp_path), "--last", "2"]) == 0
    config = runs.read_config(tmp_path)
    written = ckpt_lib.read_params(tmp_path / "checkpoints", runs.abstract_params(config)[1], checkpoint="averaged")
    assert written.metadata["averaged_steps"] == [4, 9]
    params = {step: runs.load_model(tmp_path, config, checkpoint=step).params for step in (4, 8, 9)}
    for until, expected in (("latest", [4, 9]), (9, [4, 9]), (8, [4, 8])):
        model = runs.load_model(tmp_path, config, checkpoint=until, average=2)
        assert list(model.averaged_steps) == expected and model.step == expected[-1]
        mean = jax.tree.map(lambda a, b: (np.float64(a) + np.float64(b)) / 2, *(params[s] for s in expected))
        for got, want in zip(jax.tree.leaves(model.params), jax.tree.leaves(mean), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    with pytest.raises(runs.ConfigError, match="already an average"):
        runs.load_model(tmp_path, config, checkpoint="averaged", average=2)


def test_decay_to_budget_takes_the_learning_rate_linearly_to_zero_at_the_deadline(monkeypatch):
    loop = _loop()
    now = [1000.0]
    monkeypatch.setattr(loop.time, "monotonic", lambda: now[0])
    train = load_experiment(TINY, ["train.time_budget_minutes=10", "train.decay_to_budget=True"]).train
    decision = loop._StopDecision(train, checkpointer=None)
    try:
        scales = []
        for minute in (0, 2.5, 5, 7.5, 9.9):
            now[0] = 1000.0 + 60 * minute
            assert not decision(step=1)
            scales.append(decision.learning_rate_scale())
        np.testing.assert_allclose(scales, [1.0, 0.75, 0.5, 0.25, 0.01], atol=1e-9)
        now[0] = 1000.0 + 600
        assert decision(step=2) and decision.learning_rate_scale() == 0.0
    finally:
        decision.close()
    off = loop._StopDecision(load_experiment(TINY, ["train.time_budget_minutes=10"]).train, checkpointer=None)
    now[0] += 300
    off(step=3)
    assert off.learning_rate_scale() == 1.0
    off.close()


def test_cooldown_ramps_the_learning_rate_linearly_to_zero_over_the_last_updates():
    cooldown = _loop()._cooldown
    total, n = 100, 9
    scales = [cooldown(update, total, n) for update in range(1, total + 1)]
    assert scales[: total - n] == [1.0] * (total - n)  # untouched until the last n updates
    np.testing.assert_allclose(scales[total - n :], [k / (n + 1) for k in range(n, 0, -1)])  # 0.9, 0.8, ..., 0.1
    assert cooldown(total + 1, total, n) == 0.0 and cooldown(5, total, 0) == 1.0
