"""attn_jax.malloc: with glibc's allocator set up, a training step maps no fresh pages; the command sets it up.

Page faults are counted by the kernel (``getrusage``), in a fresh process per setting: the allocator can only
be set up before JAX runs anything.
"""

import platform
import subprocess
import sys

import pytest

from attn_jax import malloc
from tests.helpers import subprocess_env

# A small model's training step, 3 warm-ups, then the minor page faults of 10 steps.
_STEPS = """
import resource, sys
from attn_jax import malloc
applied = malloc.reuse_freed_memory() if sys.argv[1] == "on" else None
from attn_jax import TransformerConfig
from attn_jax.bench import training
config = TransformerConfig(vocab_size=1000, d_model=64, num_heads=4, d_ff=256, num_encoder_layers=2,
                           num_decoder_layers=2, max_len=64)
run, _ = training.attn_jax_contender(config, training.synthetic_batch(config, 32, 16, 16))
for _ in range(3):
    run()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    run()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def _faults_per_step(mode: str) -> tuple[str, float]:
    # Optimised code, as users run it: the test suite's unoptimised LLVM makes other allocations (~400 faults a
    # step remain with it).
    result = subprocess.run([sys.executable, "-c", _STEPS, mode], capture_output=True, text=True, timeout=300,
                            env=subprocess_env(1, fast_compile=False), check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    applied, faults = result.stdout.split()[-2:]
    return applied, float(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's; elsewhere the call is a no-op")
def test_a_step_maps_no_fresh_pages_once_freed_memory_is_reused():
    applied, faults = _faults_per_step("on")
    default = _faults_per_step("off")[1]
    assert applied == "True"
    assert faults <= max(10.0, default / 20), (faults, default)  # glibc's defaults: ~500 a step on this model


def test_the_command_sets_up_the_allocator_before_anything_else(monkeypatch, capsys):
    from attn_jax import main

    calls = []
    monkeypatch.setattr(malloc, "reuse_freed_memory", lambda: calls.append("malloc"))
    monkeypatch.setattr(main, "_parser", lambda: calls.append("parse") or pytest.fail("stop here"))
    with pytest.raises(pytest.fail.Exception):
        main.main(["eval", "--workdir", "nowhere"])
    assert calls == ["malloc", "parse"]
