"""How every section times things: compile ahead of time, warm up, then the median of interleaved repeats.

* ``compile_ahead`` lowers and compiles a jitted function on concrete or abstract arguments
  (``jit(f).lower(...).compile()``) and reports the compile time apart, so no timed run includes tracing or
  compilation.
* ``interleave`` runs one repeat of every contender per round, after warm-up rounds: the load of a shared
  machine, which can stretch wall times 2-3x from one minute to the next, then falls on all of them alike,
  and the median drops the odd slow round. The process CPU time and the load average are kept beside the
  wall time, so a reader can tell a slow run from a busy machine.
* Every timed callable blocks until its result is ready (``jax.block_until_ready``); JAX dispatches
  asynchronously, so a timer around an unblocked call measures only the dispatch.
"""

import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

# ``--quick`` runs (tests) compile without LLVM optimisation: about half the compile time of a tiny step on
# 2 cores, and what they check (that every section runs and reports) does not depend on it.
QUICK_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def compile_ahead(fn: Callable, *args, compiler_options: dict | None = None, **jit_kwargs) -> tuple[Any, float]:
    """``(jax.jit(fn, **jit_kwargs).lower(*args).compile(), compile seconds)``; ``args`` may be abstract.

    Example:
      >>> import jax.numpy as jnp
      >>> compiled, seconds = compile_ahead(jnp.sin, jax.ShapeDtypeStruct((3,), jnp.float32))
      >>> compiled(jnp.zeros(3)).tolist(), seconds > 0
      ([0.0, 0.0, 0.0], True)
    """
    start = time.perf_counter()
    compiled = jax.jit(fn, **jit_kwargs).lower(*args).compile(compiler_options=compiler_options)
    return compiled, time.perf_counter() - start


def memory_bytes(compiled) -> dict[str, int] | None:
    """XLA's buffer assignment of a compiled function: temporary, argument and output bytes (None if unknown)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return {
        "temp_bytes": int(analysis.temp_size_in_bytes),
        "argument_bytes": int(analysis.argument_size_in_bytes),
        "output_bytes": int(analysis.output_size_in_bytes),
    }


def blocking(compiled, *args) -> Callable[[], Any]:
    """A no-argument callable that runs ``compiled(*args)`` and waits for the result."""
    return lambda: jax.block_until_ready(compiled(*args))


def interleave(runs: dict[str, Callable[[], Any]], *, repeats: int | dict[str, int], warmup: int = 1) -> dict:
    """Times each blocking callable ``repeats`` times, one of each per round, after ``warmup`` rounds.

    Args:
      runs: name -> callable that does one unit of work and returns when it is finished.
      repeats: timed runs of each, or a dict name -> timed runs (a slow baseline can run fewer times).
      warmup: untimed rounds first (caches, allocator, thread pools).

    Returns:
      name -> ``{"median_s", "min_s", "runs_s", "cpu_median_s", "load"}`` (``load``: 1-minute load averages
      seen during the runs).

    Example:
      >>> result = interleave({"noop": lambda: None}, repeats=3)
      >>> len(result["noop"]["runs_s"]), result["noop"]["median_s"] >= 0
      (3, True)
    """
    counts = repeats if isinstance(repeats, dict) else dict.fromkeys(runs, repeats)
    for _ in range(warmup):
        for run in runs.values():
            run()
    walls: dict[str, list[float]] = {name: [] for name in runs}
    cpus: dict[str, list[float]] = {name: [] for name in runs}
    loads: list[float] = []
    for round_ in range(max(counts.values(), default=0)):
        for name, run in runs.items():
            if round_ < counts[name]:
                start, cpu_start = time.perf_counter(), time.process_time()
                run()
                walls[name].append(time.perf_counter() - start)
                cpus[name].append(time.process_time() - cpu_start)
        loads.append(round(os.getloadavg()[0], 2))
    return {
        name: {
            "median_s": float(np.median(walls[name])),
            "min_s": float(np.min(walls[name])),
            "runs_s": [round(t, 6) for t in walls[name]],
            "cpu_median_s": float(np.median(cpus[name])),
            "load": loads,
        }
        for name in runs
        if walls[name]
    }
