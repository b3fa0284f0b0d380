"""tests/test_resume.py's SIGKILL soak with the training batches packed and assembled in two Grain worker processes:
a run killed at random instants and restarted ends bit for bit where an uninterrupted run ends, and every kill
takes the run's worker processes with it (no orphans left blocked on their queues)."""

import signal
import subprocess
import time

import jax
import numpy as np
import psutil
import pytest

from tests import test_resume

WORKERS = ["--config.data.worker_count=2", "--config.data.packing=True"]
KILLS = 2


def _run_kill_and_reap(workdir, at_step: int, delay: float) -> bool:
    """``test_resume._run_and_kill``, then checks that the run's Grain workers died with it."""
    before = len(test_resume._train_records(workdir))
    process = subprocess.Popen(test_resume._command(workdir), env=test_resume._env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            if any(r["step"] >= at_step for r in test_resume._train_records(workdir)[before:]):
                break
            time.sleep(0.01)
        time.sleep(delay)
        if process.poll() is not None:
            return False
        workers = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"worker processes outlived the killed run: {alive}"
        return True
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_sigkill_with_worker_processes_resumes_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setattr(test_resume, "OVERRIDES", [*test_resume.OVERRIDES, *WORKERS])
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    test_resume._run_to_completion(reference)
    rng = np.random.default_rng(20261201)
    kills = sum(
        _run_kill_and_reap(killed, int(at_step), float(rng.uniform(0.0, 0.1)))
        for at_step in np.sort(rng.integers(2, test_resume.STEPS - 1, size=KILLS))
    )
    test_resume._run_to_completion(killed)
    assert kills == KILLS, f"only {kills} of {KILLS} kills landed before the run finished"
    expected, actual = test_resume._final_state(reference), test_resume._final_state(killed)
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(actual), strict=True):
        np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))
    assert test_resume._losses_by_step(killed) == test_resume._losses_by_step(reference)
