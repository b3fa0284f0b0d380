"""Tests for attn_jax.masks against hand-built NumPy masks (True = may attend)."""

import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.masks import (
    causal_mask,
    combine_masks,
    key_padding_mask,
    length_mask,
    padding_mask,
    pair_mask,
    real_tokens,
    segment_mask,
    segment_positions,
)

# ---------------------------------------------------------------------------------------------------------
# padding_mask
# ---------------------------------------------------------------------------------------------------------


def test_padding_mask_hand_built():
    q_tokens = np.array([[3, 4, 0], [5, 0, 0]], np.int32)  # [B=2, T=3]
    kv_tokens = np.array([[7, 0, 0, 0, 0], [1, 2, 3, 0, 9]], np.int32)  # [B=2, S=5]
    expected = np.zeros((2, 1, 3, 5), bool)
    # Batch 0: queries 0 and 1 are real and may see key 0 only.
    expected[0, 0, 0, 0] = expected[0, 0, 1, 0] = True
    # Batch 1: only query 0 is real; key 3 is padding although key 4 after it is not.
    expected[1, 0, 0, [0, 1, 2, 4]] = True

    mask = padding_mask(jnp.asarray(q_tokens), jnp.asarray(kv_tokens))

    assert mask.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(mask), expected)


def test_padding_mask_custom_pad_id():
    tokens = jnp.array([[0, 1, 1]], jnp.int32)  # with pad_id=1, only token 0 is real
    mask = padding_mask(tokens, tokens, pad_id=1)
    expected = np.zeros((1, 1, 3, 3), bool)
    expected[0, 0, 0, 0] = True
    np.testing.assert_array_equal(np.asarray(mask), expected)


@pytest.mark.parametrize(("B", "T", "S"), [(2, 5, 7), (3, 1, 2)])
def test_padding_mask_matches_outer_product(B, T, S):
    rng = np.random.default_rng(B * 100 + T * 10 + S)
    q_tokens = rng.integers(0, 3, (B, T)).astype(np.int32)
    kv_tokens = rng.integers(0, 3, (B, S)).astype(np.int32)
    expected = np.empty((B, 1, T, S), bool)
    for b in range(B):
        for t in range(T):
            for s in range(S):
                expected[b, 0, t, s] = q_tokens[b, t] != 0 and kv_tokens[b, s] != 0
    mask = padding_mask(jnp.asarray(q_tokens), jnp.asarray(kv_tokens))
    np.testing.assert_array_equal(np.asarray(mask), expected)


# ---------------------------------------------------------------------------------------------------------
# causal_mask
# ---------------------------------------------------------------------------------------------------------


def test_causal_mask_square_hand_built():
    expected = np.array(
        [
            [1, 0, 0, 0],
            [1, 1, 0, 0],
            [1, 1, 1, 0],
            [1, 1, 1, 1],
        ],
        bool,
    )
    mask = causal_mask(4)
    assert mask.shape == (1, 1, 4, 4)
    assert mask.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(mask)[0, 0], expected)


@pytest.mark.parametrize(("T", "S"), [(3, 5), (5, 3), (1, 7), (7, 1)])
def test_causal_mask_rectangular_is_top_left_aligned(T, S):
    # Top-left alignment: query t sees keys 0..t whatever S is, as in jax.nn.dot_product_attention.
    expected = np.array([[s <= t for s in range(S)] for t in range(T)], bool)
    mask = causal_mask(T, S)
    assert mask.shape == (1, 1, T, S)
    np.testing.assert_array_equal(np.asarray(mask)[0, 0], expected)


# ---------------------------------------------------------------------------------------------------------
# combine_masks
# ---------------------------------------------------------------------------------------------------------


def test_combine_masks_all_none_is_none():
    assert combine_masks() is None
    assert combine_masks(None) is None
    assert combine_masks(None, None) is None


def test_combine_masks_single_mask_is_unchanged():
    mask = jnp.array([[[[True, False, True]]]])
    np.testing.assert_array_equal(np.asarray(combine_masks(None, mask)), np.asarray(mask))


def test_combine_masks_padding_and_causal_hand_built():
    tokens = jnp.array([[4, 5, 0]], jnp.int32)  # [B=1, T=S=3], last token is padding
    expected = np.array(
        [
            [1, 0, 0],
            [1, 1, 0],
            [0, 0, 0],  # a padding query sees nothing
        ],
        bool,
    )
    combined = combine_masks(padding_mask(tokens, tokens), causal_mask(3))
    assert combined.shape == (1, 1, 3, 3)
    np.testing.assert_array_equal(np.asarray(combined)[0, 0], expected)


def test_combine_masks_broadcasts_and_left_pads_rank():
    rng = np.random.default_rng(0)
    a = rng.random((2, 3, 5, 7)) > 0.5  # [B, N, T, S]
    b = rng.random((5, 7)) > 0.5  # [T, S]
    c = rng.random((2, 1, 1, 7)) > 0.5  # [B, 1, 1, S]
    combined = combine_masks(jnp.asarray(a), None, jnp.asarray(b), jnp.asarray(c))
    assert combined.shape == (2, 3, 5, 7)
    np.testing.assert_array_equal(np.asarray(combined), a & b[None, None] & c)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.float32])
def test_combine_masks_rejects_non_bool(dtype, without_runtime_typechecks):
    good = jnp.ones((1, 1, 2, 2), jnp.bool_)
    bad = jnp.ones((1, 1, 2, 2), dtype)
    with pytest.raises(TypeError, match="masks must be boolean"):
        combine_masks(good, bad)
    with pytest.raises(TypeError, match="masks must be boolean"):
        combine_masks(bad)


def test_combine_masks_rejects_non_bool_under_typechecks():
    # Under pytest the jaxtyping hook sees the non-boolean mask first; either way it is a TypeError.
    with pytest.raises(TypeError):
        combine_masks(jnp.ones((1, 1, 2, 2), jnp.float32))


# ---------------------------------------------------------------------------------------------------------
# Packing, lengths and token masks
# ---------------------------------------------------------------------------------------------------------


def test_segment_mask_is_block_diagonal_without_padding():
    segments = np.array([[1, 1, 2, 2, 2, 0]])
    expected = (segments[0][:, None] == segments[0][None, :]) & (segments[0][:, None] != 0)
    out = segment_mask(jnp.asarray(segments), jnp.asarray(segments))
    assert out.shape == (1, 1, 6, 6)
    np.testing.assert_array_equal(np.asarray(out)[0, 0], expected)


def test_segment_positions_restart_at_each_sequence():
    segments = jnp.array([[1, 1, 1, 2, 3, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    assert segment_positions(segments).tolist() == [[0, 1, 2, 0, 0, 1, 0, 1], list(range(8))]


def test_length_and_token_masks():
    assert length_mask(jnp.array([0, 2]), 3).tolist() == [[False, False, False], [True, True, False]]
    ids = jnp.array([[4, 5, 0, 0]])
    real = real_tokens(ids, mask=jnp.array([[True, False, True, True]]), segment_ids=jnp.array([[1, 1, 1, 0]]))
    assert real.tolist() == [[True, False, False, False]]
    assert real_tokens(None, shape=(1, 4)) is None
    np.testing.assert_array_equal(
        np.asarray(pair_mask(real, real)), np.asarray(padding_mask(jnp.where(real, ids, 0), jnp.where(real, ids, 0)))
    )
    assert key_padding_mask(real).shape == (1, 1, 1, 4)


def test_token_mask_of_the_wrong_shape_is_refused(without_runtime_typechecks):
    with pytest.raises(ValueError, match=r"src_mask must be \[B, T\]"):
        real_tokens(jnp.ones((2, 3), jnp.int32), mask=jnp.ones((2, 4), jnp.bool_), name="src_")
