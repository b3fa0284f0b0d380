"""The machine's measured float32 matmul ceiling, the denominator of every MFU in the suite.

    .venv/bin/python -c "from attn_jax.bench.ceiling import matmul_ceiling; print(matmul_ceiling())"

A jitted ``[n, n] @ [n, n]`` (``2 n^3`` FLOPs) for a few sizes ``n``, each timed after a warm-up; the
ceiling is the best rate over sizes and repeats (a ceiling, so the best run, not the median). On the 2-core
development CPU this is a few tens of GFLOP/s and moves with the load of the machine, which is why every
section that reports MFU measures it again in the same run. On a GPU the vendor's peak is higher than any
float32 matmul reaches; the measured figure is the honest denominator.
"""

import time

import jax
import jax.numpy as jnp

from attn_jax.bench.timing import compile_ahead

CPU_SIZES = (512, 1024, 2048)
ACCELERATOR_SIZES = (2048, 4096, 8192)
QUICK_SIZES = (128, 256)


def default_sizes(quick: bool = False) -> tuple[int, ...]:
    """Matrix sizes worth timing on this backend (tiny ones with ``quick``)."""
    if quick:
        return QUICK_SIZES
    return CPU_SIZES if jax.default_backend() == "cpu" else ACCELERATOR_SIZES


def matmul_ceiling(sizes: tuple[int, ...] | None = None, *, repeats: int = 5, dtype=jnp.float32) -> dict:
    """Best measured matmul rate over ``sizes``.

    Args:
      sizes: square matrix sizes; default ``default_sizes()``.
      repeats: timed runs per size after one warm-up.
      dtype: the element type (the suite's results are float32).

    Returns:
      ``{"flops_per_s": best, "gflops": best / 1e9, "by_size": {n: best GFLOP/s at n}, "dtype": ...}``.

    Example:
      >>> ceiling = matmul_ceiling((64,), repeats=2)
      >>> ceiling["flops_per_s"] > 0, list(ceiling["by_size"])
      (True, ['64'])
    """
    sizes = default_sizes() if sizes is None else sizes
    by_size = {}
    for n in sizes:
        a, b = jax.random.normal(jax.random.key(n), (2, n, n), dtype)
        matmul, _ = compile_ahead(jnp.matmul, a, b)
        jax.block_until_ready(matmul(a, b))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(matmul(a, b))
            best = min(best, time.perf_counter() - start)
        by_size[str(n)] = 2.0 * n**3 / best / 1e9
    peak = max(by_size.values())
    return {"flops_per_s": peak * 1e9, "gflops": peak, "by_size": by_size, "dtype": jnp.dtype(dtype).name}
