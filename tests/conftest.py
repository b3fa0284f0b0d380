"""Strict numerics for every test: 8 CPU devices, no silent dtype or rank promotion; one compilation cache."""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# LLVM without optimisation: the tests' tiny programs spend far longer compiling than running (about a third
# less CPU time for a training run). XLA's HLO passes, and so the fusions and numerics tested, are unchanged.
FAST_COMPILE = "--xla_backend_optimization_level=0"
# XLA:CPU aborts a process whose collective waits past a deadline for the other simulated devices' threads; with
# both pytest workers and 8 device threads on 2 cores, a pmap all-reduce once missed it (test_workflows.py's pmap
# run, 2026-12-03). A slow test is a test; an abort is a false failure.
PATIENT_COLLECTIVES = "--xla_cpu_collective_call_terminate_timeout_seconds=900"
for flag in (FAST_COMPILE, PATIENT_COLLECTIVES):
    if flag not in os.environ["XLA_FLAGS"]:
        os.environ["XLA_FLAGS"] += " " + flag
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_enable_x64", False)

# Many tests train the same tiny model through fresh jit wrappers, in this process and in the CLI subprocesses
# they start: one persistent compilation cache for the whole run (all xdist workers) compiles each program once.
# The first pytest process (xdist's controller) creates it empty and removes it at the end, so no test depends on
# programs compiled by an earlier run.
_OWNS_CACHE = "ATTN_JAX_TESTS_XLA_CACHE" not in os.environ
if _OWNS_CACHE:
    os.environ["ATTN_JAX_TESTS_XLA_CACHE"] = tempfile.mkdtemp(prefix="attn_jax_tests_xla_")
COMPILATION_CACHE = os.environ["ATTN_JAX_TESTS_XLA_CACHE"]
os.environ["ATTN_JAX_COMPILATION_CACHE"] = COMPILATION_CACHE  # read by attn_jax.main, here and in subprocesses
jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)  # attn_jax.main's threshold


import jaxtyping  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def without_runtime_typechecks():
    """Turns off the jaxtyping hook, so a test sees the checks a user sees outside pytest."""
    previous = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", previous)


def pytest_sessionfinish(session):
    if _OWNS_CACHE:  # after every xdist worker has finished
        shutil.rmtree(COMPILATION_CACHE, ignore_errors=True)
