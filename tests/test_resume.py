"""A run killed with SIGKILL at random instants and restarted with the same command ends bit-for-bit where an
uninterrupted run ends: parameters, optimizer state, step, RNG and the logged loss of every step.

Each run is ``python -m attn_jax train`` in a subprocess on one CPU device (dropout on), checkpointing every few
steps so that kills land inside steps, between them and inside asynchronous saves. The kill instants come from a
seeded generator, so a failure reproduces. ``make soak`` runs the longer variant (20 kills).
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from attn_jax.checkpoint import Checkpointer
from attn_jax.config import load_experiment
from attn_jax.loop import abstract_checkpoint
from attn_jax.metrics import read_metrics
from tests.helpers import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPEC = str(ROOT / "experiments" / "tiny.py")
STEPS = 40
OVERRIDES = [
    f"--config.train.steps={STEPS}",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=3",
    "--config.train.keep_checkpoints=2",
    "--config.train.eval_every=1000",
]
KILLS = int(os.environ.get("ATTN_JAX_SOAK_KILLS", "5"))


def _command(workdir) -> list[str]:
    return [sys.executable, "-m", "attn_jax", "train", "--config", SPEC, "--workdir", str(workdir), *OVERRIDES]


def _env() -> dict:
    env = subprocess_env(1, JAX_PLATFORMS="cpu")
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def _train_records(workdir) -> list[dict]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return [r for r in read_metrics(path) if r["split"] == "train"] if path.exists() else []


def _run_to_completion(workdir) -> None:
    done = subprocess.run(_command(workdir), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _run_and_kill(workdir, at_step: int, delay: float) -> bool:
    """Starts the run and SIGKILLs it ``delay`` s after it logs step ``at_step``; False if it finished first."""
    before = len(_train_records(workdir))
    process = subprocess.Popen(_command(workdir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            if any(r["step"] >= at_step for r in _train_records(workdir)[before:]):
                break
            time.sleep(0.01)
        time.sleep(delay)
        if process.poll() is not None:
            return False
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        return True
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _final_state(workdir):
    config = load_experiment(SPEC, [o.removeprefix("--config.") for o in OVERRIDES])
    _, target = abstract_checkpoint(config)
    with Checkpointer(pathlib.Path(workdir) / "checkpoints", read_only=True) as checkpointer:
        restored = checkpointer.restore(target)
    assert restored.step == STEPS
    return jax.device_get(restored.state)


def _losses_by_step(workdir) -> dict[int, float]:
    # A resumed run redoes the steps after its checkpoint; the newest record of each step is the one that counts.
    return {r["step"]: r["loss"] for r in _train_records(workdir)}


@pytest.mark.slow
def test_sigkill_at_random_instants_resumes_bit_for_bit(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    _run_to_completion(reference)

    rng = np.random.default_rng(20261122)
    # Kill points spread over the run, each a few milliseconds after a logged step: inside the next step, inside
    # an asynchronous save or between the two. A resumed run logs again from its checkpoint, so later points
    # are always reached.
    kills = 0
    for at_step in np.sort(rng.integers(2, STEPS - 1, size=KILLS)):
        kills += _run_and_kill(killed, int(at_step), float(rng.uniform(0.0, 0.1)))
    _run_to_completion(killed)
    assert kills == KILLS, f"only {kills} of {KILLS} kills landed before the run finished"

    expected, actual = _final_state(reference), _final_state(killed)
    paths = jax.tree_util.tree_leaves_with_path(expected)
    assert len(paths) == len(jax.tree.leaves(actual))
    for (path, want), got in zip(paths, jax.tree.leaves(actual), strict=True):
        np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))
    expected_losses = _losses_by_step(reference)
    assert sorted(expected_losses) == list(range(1, STEPS + 1))
    assert _losses_by_step(killed) == expected_losses


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_next_step_boundary_and_exits(tmp_path):
    command = [*_command(tmp_path), "--config.train.steps=100000", "--config.train.checkpoint_every=100000"]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not any(r["step"] >= 5 for r in _train_records(tmp_path)) and time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read()[-3000:]
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr[-3000:]
    last_logged = max(r["step"] for r in _train_records(tmp_path))
    with Checkpointer(tmp_path / "checkpoints", read_only=True) as checkpointer:
        assert checkpointer.all_steps() == [last_logged]  # the only checkpoint: the step the signal ended on
    assert not (tmp_path / "results.json").exists()  # it stopped after the save, without the final evaluation
