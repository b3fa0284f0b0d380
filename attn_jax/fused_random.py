"""``jax.random``'s Threefry ``split``, ``fold_in`` and ``bernoulli``, bit for bit, as ops XLA can fuse.

JAX lowers its Threefry-2x32 hash (Salmon et al. 2011) on CPU as a rolled loop of five iterations (a smaller
program to compile), so every dropout mask and key split becomes a ``while`` loop that passes over its whole
array five times, with a dozen bookkeeping thunks per iteration: on the default model's training step about
half of the ~4,700 thunks XLA:CPU runs and 178 MB of the memory it writes (experiments/results/NOTES.md,
finding 14). Written out as plain integer ops, the same hash is an elementwise expression that XLA fuses into
the op that consumes the mask, so the bits never reach memory.

Each function returns exactly what its ``jax.random`` namesake returns for a Threefry key (the default
``jax_threefry_partitionable`` counter layout; ``tests/test_fused_random.py`` checks it), so switching a model
to these changes no mask and no number. Other PRNG implementations, the legacy counter layout, float64
probabilities and arrays of 2**32 or more elements fall back to ``jax.random`` itself.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from attn_jax.types import Array, Bool, Int, PRNGKeyArray

# Threefry-2x32's rotation constants (two alternating groups of four rounds) and key-schedule parity.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)
_MANTISSA = 23  # float32: jax.random.uniform keeps the top 23 of 32 bits


def threefry2x32(k1, k2, x1, x2) -> tuple[Array, Array]:
    """The Threefry-2x32 hash with 20 rounds of counters ``(x1, x2)`` under key ``(k1, k2)``, all uint32.

    Example:
      >>> k = jnp.zeros((), jnp.uint32)
      >>> [hex(int(v)) for v in threefry2x32(k, k, k, k)]  # the reference implementation's known answer
      ['0x6b200159', '0x99ba4efe']
    """
    ks = (k1, k2, k1 ^ k2 ^ _PARITY)
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for group in range(5):
        for rotation in _ROTATIONS[group % 2]:
            x1 = x1 + x2
            x2 = (x2 << np.uint32(rotation)) | (x2 >> np.uint32(32 - rotation))
            x2 = x1 ^ x2
        x1 = x1 + ks[(group + 1) % 3]
        x2 = x2 + ks[(group + 2) % 3] + np.uint32(group + 1)
    return x1, x2


def _key_words(rng: PRNGKeyArray):
    """``(k1, k2, wrap)`` for a single Threefry key (typed or raw uint32[2]), or None to fall back to jax.random."""
    if not jax.config.jax_threefry_partitionable:
        return None
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if rng.shape or str(jax.random.key_impl(rng)) != "threefry2x32":
            return None
        impl = jax.random.key_impl(rng)
        data = jax.random.key_data(rng)
        return data[0], data[1], lambda words: jax.random.wrap_key_data(words, impl=impl)
    if rng.shape != (2,) or rng.dtype != jnp.uint32 or jax.config.jax_default_prng_impl != "threefry2x32":
        return None
    return rng[0], rng[1], lambda words: words


def _counters(shape: tuple[int, ...]):
    """The row-major index of every element as two uint32 words ``(high, low)`` (sizes below 2**32)."""
    low = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    return jnp.zeros(shape, jnp.uint32), low


def split(rng: PRNGKeyArray, num: int = 2) -> Array:
    """``jax.random.split(rng, num)``: ``num`` new keys.

    Example:
      >>> key = jax.random.key(42)
      >>> bool((jax.random.key_data(split(key, 3)) == jax.random.key_data(jax.random.split(key, 3))).all())
      True
    """
    words = _key_words(rng)
    if words is None:
        return jax.random.split(rng, num)
    k1, k2, wrap = words
    bits1, bits2 = threefry2x32(k1, k2, *_counters((num,)))
    return wrap(jnp.stack([bits1, bits2], axis=-1))  # [num], [num] -> [num, 2]


def fold_in(rng: PRNGKeyArray, data: int | Int[Array, ""]) -> PRNGKeyArray:
    """``jax.random.fold_in(rng, data)``: a new key from a 32-bit integer (a Python int or a traced scalar)."""
    words = _key_words(rng)
    if words is None or jnp.ndim(data):
        return jax.random.fold_in(rng, data)
    k1, k2, wrap = words
    low = jnp.asarray(data, dtype=jnp.uint32).reshape(1)  # as jax.random: the seed words are (0, data)
    bits1, bits2 = threefry2x32(k1, k2, jnp.zeros((1,), jnp.uint32), low)
    return wrap(jnp.concatenate([bits1, bits2]))  # [1], [1] -> [2]


def bernoulli(rng: PRNGKeyArray, p: float, shape: tuple[int, ...]) -> Bool[Array, "..."]:
    """``jax.random.bernoulli(rng, p, shape)`` for a Python float ``p``: True with probability ``p``.

    JAX draws ``u = m * 2**-23`` from the top 23 bits ``m`` of each 32-bit word and returns ``u < float32(p)``;
    the same test on integers is ``m < ceil(float32(p) * 2**23)``, one shift and one compare.

    Example:
      >>> key = jax.random.key(0)
      >>> bool((bernoulli(key, 0.9, (4, 5)) == jax.random.bernoulli(key, 0.9, (4, 5))).all())
      True
    """
    words = _key_words(rng)
    if words is None or jnp.result_type(p) != jnp.float32 or math.prod(shape) >= 2**32:
        return jax.random.bernoulli(rng, p, shape)
    k1, k2, _ = words
    bits1, bits2 = threefry2x32(k1, k2, *_counters(tuple(shape)))
    threshold = min(max(math.ceil(float(np.float32(p)) * 2**_MANTISSA), 0), 2**_MANTISSA)
    return ((bits1 ^ bits2) >> np.uint32(32 - _MANTISSA)) < np.uint32(threshold)
