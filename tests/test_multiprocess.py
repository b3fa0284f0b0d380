"""Two processes on this machine (``jax.distributed`` over loopback, 4 simulated CPU devices each) train,
checkpoint and resume, and match one process with all 8 devices.

Each process reads only its half of every global batch (the pipeline's per-host shard), the state is sharded over
both processes' devices, Orbax writes one checkpoint from both, the final evaluation decodes with the batch
split across the two processes, and only process 0 writes logs. The reference is the same run in this test
process on its 8 devices: same global batches in the same row order, so the loss of every step and the final
parameters agree to float32 reduction-order noise.
"""

import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from attn_jax import loop
from attn_jax.checkpoint import Checkpointer
from attn_jax.config import load_experiment
from attn_jax.metrics import read_metrics
from tests.helpers import subprocess_env

TINY = str(pathlib.Path(__file__).resolve().parents[1] / "experiments" / "tiny.py")
# One batch shape (sequences of 4 to 7 tokens + EOS): one train-step compile per run.
OVERRIDES = [
    "train.log_every=1", "train.checkpoint_every=2", "train.eval_every=1000", "eval.beam_size=1",
    "data.max_length=8", "data.copy.max_length=7",
]  # fmt: skip
FIRST, TOTAL = 4, 6  # the two-process run stops at FIRST, then resumes to TOTAL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Process 1 traces its train step this much later than process 0, as a slow compile on a busy host would: longer
# than the 30 s XLA gives a Gloo communicator to assemble, so the first step fails unless the processes meet at a
# barrier after compiling (parallel.lockstep).
LAG_SECONDS = 35
_LAGGING = (
    "import sys, time; from attn_jax import loop, main; step = loop.train_step; "
    f"loop.train_step = lambda *a, **k: (time.sleep({LAG_SECONDS}), step(*a, **k))[1]; sys.argv[0] = 'attn-jax'; "
    "main.run()"
)


def _run_two_processes(workdir, steps: int, lag: bool = False) -> list[str]:
    """``attn-jax train`` as processes 0 and 1 of one distributed run (``lag``: process 1 traces its train step
    ``LAG_SECONDS`` late); returns their stderr."""
    address = f"127.0.0.1:{_free_port()}"
    env = subprocess_env(4, JAX_PLATFORMS="cpu")
    env.pop("PYTEST_CURRENT_TEST", None)
    overrides = [f"--config.{o}" for o in (*OVERRIDES, f"train.steps={steps}")]
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                *(["-c", _LAGGING] if lag and index == 1 else ["-m", "attn_jax"]),
                "train",
                "--config",
                TINY,
                "--workdir",
                str(workdir),
                *overrides,
                f"--config.parallel.coordinator_address={address}",
                "--config.parallel.num_processes=2",
                f"--config.parallel.process_id={index}",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for index in range(2)
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    for index, (process, (_, err)) in enumerate(zip(processes, outputs, strict=True)):
        assert process.returncode == 0, f"process {index}:\n{err[-4000:]}"
    return [err for _, err in outputs]


def _train_losses(workdir) -> dict[int, float]:
    records = [r for r in read_metrics(pathlib.Path(workdir) / "metrics.jsonl") if r["split"] == "train"]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"steps logged twice (by both processes?): {steps}"
    return {r["step"]: r["loss"] for r in records}


def _final_params(workdir):
    config = load_experiment(TINY, [])
    with Checkpointer(pathlib.Path(workdir) / "checkpoints", read_only=True) as checkpointer:
        restored = checkpointer.restore(loop.abstract_checkpoint(config)[1])
    return restored.step, jax.device_get(restored.state["params"])


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume_like_one_process(tmp_path):
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (make test)"
    two = tmp_path / "two_processes"
    _run_two_processes(two, FIRST, lag=True)
    with Checkpointer(two / "checkpoints", read_only=True) as checkpointer:
        assert checkpointer.all_steps() == [2, 4]
    assert sorted(_train_losses(two)) == [1, 2, 3, 4]
    assert (two / "results.json").is_file() and (two / "plots" / "learning_curves.png").is_file()

    errors = _run_two_processes(two, TOTAL)
    assert all("resumed from step 4" in err for err in errors)
    losses = _train_losses(two)
    assert sorted(losses) == list(range(1, TOTAL + 1))

    one = tmp_path / "one_process"
    loop.train_and_evaluate(load_experiment(TINY, [*OVERRIDES, f"train.steps={TOTAL}"]), str(one))
    expected = _train_losses(one)
    np.testing.assert_allclose([losses[s] for s in expected], list(expected.values()), rtol=1e-5)
    (step_two, params_two), (step_one, params_one) = _final_params(two), _final_params(one)
    assert step_two == step_one == TOTAL
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params_two), jax.tree.leaves(params_one), strict=True):
        if jax.tree_util.keystr(path).endswith("['b_k']"):
            continue  # exact gradient 0 (softmax ignores q.b_k): Adam scales rounding noise up (test_parallel.py)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------------------------------------
# Stopping together: one decision for every process
# ---------------------------------------------------------------------------------------------------------


def _start_two_processes(workdir, per_process: list[list[str]]) -> list[subprocess.Popen]:
    """``attn-jax train`` on tiny.py as processes 0 and 1 of one run, each with its own extra overrides."""
    address = f"127.0.0.1:{_free_port()}"
    env = subprocess_env(4, JAX_PLATFORMS="cpu")
    env.pop("PYTEST_CURRENT_TEST", None)
    common = [f"--config.{o}" for o in (*OVERRIDES, "train.steps=100000", "train.checkpoint_every=100000")]
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "attn_jax",
                "train",
                "--config",
                TINY,
                "--workdir",
                str(workdir),
                *common,
                *[f"--config.{o}" for o in extra],
                f"--config.parallel.coordinator_address={address}",
                "--config.parallel.num_processes=2",
                f"--config.parallel.process_id={index}",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for index, extra in enumerate(per_process)
    ]


def _finish(processes) -> list[str]:
    outputs = [process.communicate(timeout=600) for process in processes]
    for index, (process, (_, err)) in enumerate(zip(processes, outputs, strict=True)):
        assert process.returncode == 0, f"process {index}:\n{err[-4000:]}"
    return [err for _, err in outputs]


def _saved_steps(workdir) -> list[int]:
    with Checkpointer(pathlib.Path(workdir) / "checkpoints", read_only=True) as checkpointer:
        return checkpointer.all_steps()


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    processes = _start_two_processes(tmp_path, [[], []])
    try:
        # Once training runs (process 0 has logged a few steps), preempt process 1 only.
        while not (tmp_path / "metrics.jsonl").is_file() or len(_train_losses_so_far(tmp_path)) < 3:
            assert all(p.poll() is None for p in processes), processes[0].stderr.read()[-3000:]
            time.sleep(0.5)
        processes[1].send_signal(signal.SIGTERM)
        errors = _finish(processes)
    finally:
        for process in processes:
            process.kill()
    steps = _saved_steps(tmp_path)
    assert len(steps) == 1, steps  # one checkpoint, written by both processes at the step they agreed on
    for err in errors:
        assert f"SIGTERM: checkpointed step {steps[0]} and stopped" in err, err[-3000:]
    assert not (tmp_path / "results.json").exists()  # no final evaluation after a preemption


@pytest.mark.slow
def test_the_time_budget_is_process_0s_clock_even_when_the_clocks_disagree(tmp_path):
    # Process 0's budget runs out after a few seconds; process 1's never would. Both must stop at one step.
    processes = _start_two_processes(tmp_path, [["train.time_budget_minutes=0.05"], ["train.time_budget_minutes=0"]])
    try:
        errors = _finish(processes)
    finally:
        for process in processes:
            process.kill()
    steps = _saved_steps(tmp_path)
    assert len(steps) == 1, steps
    for err in errors:
        assert f"stopped early at step {steps[0]} (time budget)" in err, err[-3000:]
    assert (tmp_path / "results.json").is_file()


def _train_losses_so_far(workdir) -> list:
    return [r for r in read_metrics(pathlib.Path(workdir) / "metrics.jsonl") if r["split"] == "train"]
