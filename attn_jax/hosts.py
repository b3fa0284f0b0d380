"""Coordination between the processes of a multi-host run, through ``jax.distributed``'s coordination service.

Kept apart from ``parallel`` (meshes and shardings) so the data package can wait for process 0 without
importing model code.
"""

import collections

import jax
from jax._src import distributed

# How long a barrier waits for the slowest process (a tokenizer to train, a compile on a loaded host).
BARRIER_TIMEOUT_MS = 60 * 60 * 1000
_barrier_counts: collections.Counter = collections.Counter()


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (no-op on one process).

    It goes through the coordination service, not a device collective: a process's first collective must be
    joined by the others within XLA's fixed 30 s (the CPU/Gloo communicator set-up), too short for a host that is
    still training a tokenizer or compiling. Each call with the same ``name`` is a new barrier.
    """
    if jax.process_count() == 1:
        return
    count = _barrier_counts[name]
    _barrier_counts[name] += 1
    distributed.global_state.client.wait_at_barrier(f"attn_jax/{name}/{count}", BARRIER_TIMEOUT_MS)
