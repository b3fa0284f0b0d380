"""Tests for attn_jax.fused_random: the same keys and masks as jax.random, bit for bit, without XLA loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import fused_random

SHAPES = [(1,), (7,), (5, 3), (2, 16, 3, 11)]
RATES = [0.0, 0.1, 0.5, 0.9, 1.0, 1.0 - 2.0**-24, 1e-9]


def _data(keys):
    return np.asarray(jax.random.key_data(keys)) if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) else keys


def test_threefry_known_answers():
    """Random123's known-answer vectors for Threefry-2x32, 20 rounds (kat_vectors)."""
    words = [jnp.asarray(v, jnp.uint32) for v in (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)]
    assert [int(v) for v in fused_random.threefry2x32(*words)] == [0x1CB996FC, 0xBB002BE7]
    words = [jnp.asarray(v, jnp.uint32) for v in (0x13198A2E, 0x03707344, 0x243F6A88, 0x85A308D3)]
    assert [int(v) for v in fused_random.threefry2x32(*words)] == [0xC4923A9C, 0x483DF7A0]


@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey], ids=["typed", "raw"])
@pytest.mark.parametrize("seed", [0, 7, 2**31 + 5])
def test_split_and_fold_in_equal_jax_random(make_key, seed):
    key = make_key(seed)
    for num in (1, 2, 3, 8):
        np.testing.assert_array_equal(_data(fused_random.split(key, num)), _data(jax.random.split(key, num)))
    for data in (0, 1, 0x57D0, 2**32 - 1):
        np.testing.assert_array_equal(_data(fused_random.fold_in(key, data)), _data(jax.random.fold_in(key, data)))


@pytest.mark.parametrize("shape", SHAPES)
def test_bernoulli_equals_jax_random_for_every_rate(shape):
    for seed in range(3):
        key = jax.random.key(seed)
        for p in RATES:
            np.testing.assert_array_equal(
                np.asarray(fused_random.bernoulli(key, p, shape)),
                np.asarray(jax.random.bernoulli(key, p, shape)),
                err_msg=f"p={p}, seed={seed}",
            )


def test_fold_in_of_a_traced_index_equals_jax_random():
    key, indices = jax.random.key(5), jnp.arange(4, dtype=jnp.int32)
    ours = jax.jit(jax.vmap(lambda i: jax.random.key_data(fused_random.fold_in(key, i))))(indices)
    theirs = jax.jit(jax.vmap(lambda i: jax.random.key_data(jax.random.fold_in(key, i))))(indices)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_bernoulli_equals_jax_random_under_jit_and_vmap():
    keys = jax.random.split(jax.random.key(3), 5)
    ours = jax.jit(jax.vmap(lambda k: fused_random.bernoulli(fused_random.fold_in(k, 9), 0.7, (4, 33))))(keys)
    theirs = jax.jit(jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, 9), 0.7, (4, 33))))(keys)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_other_implementations_fall_back_to_jax_random():
    key = jax.random.key(1, impl="rbg")
    np.testing.assert_array_equal(
        np.asarray(fused_random.bernoulli(key, 0.3, (50,))), np.asarray(jax.random.bernoulli(key, 0.3, (50,)))
    )
    np.testing.assert_array_equal(_data(fused_random.split(key, 3)), _data(jax.random.split(key, 3)))


def test_compiled_mask_has_no_loop_where_jax_random_has_one_on_cpu():
    """The point of the module: the hash is straight-line code XLA fuses, not a rolled ``while`` loop."""
    key = jax.random.key(0)

    def compiled(bernoulli):
        return (
            jax.jit(lambda k, x: jnp.where(bernoulli(k, 0.9, x.shape), x, 0.0)).lower(key, jnp.ones((8, 16))).compile()
        )

    assert " while(" not in compiled(fused_random.bernoulli).as_text()
    if jax.default_backend() == "cpu":
        assert " while(" in compiled(jax.random.bernoulli).as_text()
