"""Small shared test utilities."""

import os
import re

import jax
import numpy as np


def assert_trees_allclose(actual, expected, *, rtol=1e-5, atol=1e-6):
    """Asserts two pytrees have the same structure and allclose leaves."""
    actual_leaves, actual_def = jax.tree.flatten(actual)
    expected_leaves, expected_def = jax.tree.flatten(expected)
    assert actual_def == expected_def, f"tree structures differ:\n{actual_def}\n{expected_def}"
    for path_and_a, e in zip(jax.tree_util.tree_leaves_with_path(actual), expected_leaves, strict=True):
        path, a = path_and_a
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(e), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
        )


def subprocess_env(device_count: int, *, fast_compile: bool = True, **variables: str) -> dict[str, str]:
    """This process's environment for a subprocess with ``device_count`` simulated CPU devices and ``variables``
    set, keeping the test run's other XLA flags; ``fast_compile=False`` drops conftest's unoptimised LLVM."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+\s*", "", os.environ.get("XLA_FLAGS", ""))
    if not fast_compile:
        flags = re.sub(r"--xla_backend_optimization_level=\d+\s*", "", flags)
    flags = f"--xla_force_host_platform_device_count={device_count} {flags}".strip()
    return dict(os.environ, XLA_FLAGS=flags, **variables)
