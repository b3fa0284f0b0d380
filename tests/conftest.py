"""Strict numerics for every test: 8 CPU devices, no silent dtype or rank promotion."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_enable_x64", False)


import jaxtyping  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def without_runtime_typechecks():
    """Turns off the jaxtyping hook, so a test sees the checks a user sees outside pytest."""
    previous = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", previous)
