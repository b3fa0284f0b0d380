"""glibc's allocator set up so that XLA:CPU's steps reuse memory instead of mapping fresh pages.

XLA:CPU allocates a step's buffers anew at every step, from the threads that run it. Under glibc's defaults
those threads get their own arenas, whose heaps are mapped and trimmed as the buffers come and go, so each
step of the default model touches ~110 MB of new pages: ~29,000 page faults and ~75 ms of kernel time per
~170 ms step on 2 CPU cores; set up as here, the training loop's steps were 1.24x-1.36x faster
(experiments/results/NOTES.md, finding 26). One arena that keeps what is freed serves the next step from pages
already mapped. glibc's ``mallopt`` is the interface, and it must run before the threads start allocating;
``GLIBC_TUNABLES`` does the same from the environment but only at a process's start, so the ``attn-jax``
command calls this first. Nothing on PyPI does it; allocators that do (jemalloc, tcmalloc) need a system package
and ``LD_PRELOAD``.
"""

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's malloc.h
KEEP_BYTES = 1 << 30  # freed memory kept for reuse, and the size from which a buffer gets its own mapping


def reuse_freed_memory() -> bool:
    """One malloc arena for all threads that keeps up to ``KEEP_BYTES`` of freed memory for reuse.

    Call it at the start of a process, before JAX runs anything. A no-op (False) where the C library is not
    glibc; True when set.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries: no mallopt
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, KEEP_BYTES), (_M_TRIM_THRESHOLD, KEEP_BYTES))
    return all(mallopt(option, value) == 1 for option, value in settings)
