"""Tests for attn_jax.losses: label-smoothed cross-entropy against a float64 NumPy reference (paper §5.4).

The reference is written from the definition: the smoothed target ``q`` puts ``1 - eps`` on the gold token and
``eps / (V - 1)`` on every other one, and the loss is ``KL(q || p) = sum_v q_v (log q_v - log p_v)`` (the
cross-entropy minus the constant entropy of ``q``), summed over tokens with their weights.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.losses import cross_entropy_sums

B, T, V = 3, 5, 11  # distinct primes, so a swapped axis fails


def _log_softmax64(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _smoothed_targets64(targets: np.ndarray, vocab: int, eps: float) -> np.ndarray:
    q = np.full((*targets.shape, vocab), eps / (vocab - 1), np.float64)
    np.put_along_axis(q, targets[..., None], 1.0 - eps, axis=-1)
    return q


def reference_sums(logits, targets, *, eps, weights):
    """float64 NumPy sums of KL(q || p), -log p(target), argmax hits and weights."""
    log_p = _log_softmax64(logits)
    targets = np.asarray(targets)
    weights = np.asarray(weights, np.float64)
    q = _smoothed_targets64(targets, log_p.shape[-1], eps)
    q_log_q = np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0)
    kl = (q_log_q - q * log_p).sum(-1)
    nll = -np.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]
    correct = (np.argmax(logits, axis=-1) == targets).astype(np.float64)
    return {
        "loss": (kl * weights).sum(),
        "nll": (nll * weights).sum(),
        "correct": (correct * weights).sum(),
        "weight": weights.sum(),
    }


def reference_grad_logits(logits, targets, *, eps, weights):
    """d loss / d logits of KL(q || softmax(z)) summed with weights: (softmax(z) - q) * w."""
    p = np.exp(_log_softmax64(logits))
    q = _smoothed_targets64(np.asarray(targets), p.shape[-1], eps)
    return (p - q) * np.asarray(weights, np.float64)[..., None]


def _random_case(seed: int, *, pad_id: int = 0, scale: float = 3.0):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((B, T, V))).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    # Padding at the end of rows 1 and 2; the first token is never padding.
    targets[1, 3:] = pad_id
    targets[2, 1:] = pad_id
    targets[0, 0] = (pad_id + 1) % V
    return logits, targets


def _assert_sums_close(actual, expected, rtol=1e-5, atol=1e-5):
    assert set(actual) == {"loss", "nll", "correct", "weight"}
    for name, value in expected.items():
        assert actual[name].shape == (), name
        np.testing.assert_allclose(float(actual[name]), value, rtol=rtol, atol=atol, err_msg=name)


# ---------------------------------------------------------------------------------------------------------
# Hand-worked cases
# ---------------------------------------------------------------------------------------------------------


def test_hand_worked_nll_and_masking():
    # p = (1/2, 1/4, 1/4); target 0 -> -log(1/2); target 1 -> -log(1/4) but masked by weight 0.
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]], jnp.float32))
    sums = cross_entropy_sums(logits, jnp.array([[0, 1]], jnp.int32), weights=jnp.array([[1.0, 0.0]]))
    np.testing.assert_allclose(float(sums["nll"]), np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(float(sums["loss"]), np.log(2.0), rtol=1e-6)  # eps = 0: loss is the nll
    assert float(sums["correct"]) == 1.0 and float(sums["weight"]) == 1.0


def test_hand_worked_smoothing_that_matches_the_prediction_costs_nothing():
    # V = 3, eps = 0.5: q = (0.5, 0.25, 0.25) for target 0, exactly p, so KL = 0 while nll = log 2.
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25]]], jnp.float32))
    sums = cross_entropy_sums(logits, jnp.array([[0]], jnp.int32), label_smoothing=0.5, pad_id=-1)
    np.testing.assert_allclose(float(sums["loss"]), 0.0, atol=1e-6)
    np.testing.assert_allclose(float(sums["nll"]), np.log(2.0), rtol=1e-6)


def test_hand_worked_uniform_prediction():
    # Uniform p over V: nll = log V; KL(q || uniform) = log V - H(q) with H(q) = -(1-e)log(1-e) - e log(e/(V-1)).
    eps, vocab = 0.1, 7
    logits = jnp.zeros((1, 1, vocab), jnp.float32)
    sums = cross_entropy_sums(logits, jnp.array([[3]], jnp.int32), label_smoothing=eps)
    entropy = -(1 - eps) * np.log(1 - eps) - eps * np.log(eps / (vocab - 1))
    np.testing.assert_allclose(float(sums["nll"]), np.log(vocab), rtol=1e-6)
    np.testing.assert_allclose(float(sums["loss"]), np.log(vocab) - entropy, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Against the float64 reference
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.25, 0.6])
@pytest.mark.parametrize("pad_id", [0, 3])
def test_matches_float64_reference_with_default_padding_weights(eps, pad_id):
    logits, targets = _random_case(seed=int(eps * 100) + pad_id, pad_id=pad_id)
    weights = (targets != pad_id).astype(np.float64)
    sums = cross_entropy_sums(jnp.asarray(logits), jnp.asarray(targets), label_smoothing=eps, pad_id=pad_id)
    _assert_sums_close(sums, reference_sums(logits, targets, eps=eps, weights=weights))


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_matches_float64_reference_with_explicit_weights(eps):
    logits, targets = _random_case(seed=7)
    rng = np.random.default_rng(8)
    weights = rng.uniform(0.0, 2.0, size=(B, T)).astype(np.float32)
    weights[2] = 0.0  # a fully masked row
    # Explicit weights replace the padding mask: pad tokens with a non-zero weight count.
    sums = cross_entropy_sums(
        jnp.asarray(logits), jnp.asarray(targets), label_smoothing=eps, weights=jnp.asarray(weights)
    )
    _assert_sums_close(sums, reference_sums(logits, targets, eps=eps, weights=weights))


def test_nll_is_minus_log_softmax_at_the_target_whatever_the_smoothing():
    logits, targets = _random_case(seed=11)
    weights = (targets != 0).astype(np.float64)
    log_p = _log_softmax64(logits)
    expected = -(np.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0] * weights).sum()
    for eps in (0.0, 0.1, 0.5):
        sums = cross_entropy_sums(jnp.asarray(logits), jnp.asarray(targets), label_smoothing=eps)
        np.testing.assert_allclose(float(sums["nll"]), expected, rtol=1e-5)


def test_nll_agrees_with_optax():
    import optax

    logits, targets = _random_case(seed=12)
    weights = jnp.asarray(targets != 0, jnp.float32)
    per_token = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(targets))
    sums = cross_entropy_sums(jnp.asarray(logits), jnp.asarray(targets))
    np.testing.assert_allclose(float(sums["nll"]), float(jnp.sum(per_token * weights)), rtol=1e-5)


def test_correct_counts_argmax_hits_on_real_tokens_only():
    vocab = 5
    logits = np.full((1, 4, vocab), -1.0, np.float32)
    argmax = [1, 2, 3, 4]
    for t, a in enumerate(argmax):
        logits[0, t, a] = 2.0
    # Hits at t = 0 and t = 2; t = 3 is padding (target 0) and has weight 0.
    targets = np.array([[1, 4, 3, 0]], np.int32)
    sums = cross_entropy_sums(jnp.asarray(logits), jnp.asarray(targets))
    assert float(sums["correct"]) == 2.0
    assert float(sums["weight"]) == 3.0
    # A pad token the model "predicts" still does not count.
    logits[0, 3] = -1.0
    logits[0, 3, 0] = 2.0
    sums = cross_entropy_sums(jnp.asarray(logits), jnp.asarray(targets))
    assert float(sums["correct"]) == 2.0


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_a_perfect_smoothed_prediction_has_zero_loss_and_zero_gradient(eps):
    targets = np.array([[1, 4, 2], [3, 3, 5]], np.int32)
    vocab = 7
    logits = jnp.asarray(np.log(_smoothed_targets64(targets, vocab, eps)).astype(np.float32))

    def loss(z):
        return cross_entropy_sums(z, jnp.asarray(targets), label_smoothing=eps)["loss"]

    np.testing.assert_allclose(float(loss(logits)), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.grad(loss)(logits)), 0.0, atol=1e-6)
    # Any other prediction costs more (KL is non-negative).
    assert float(loss(logits + jax.random.normal(jax.random.key(0), logits.shape))) > 1e-3


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.4])
def test_gradient_matches_softmax_minus_smoothed_target(eps):
    logits, targets = _random_case(seed=21)
    weights = (targets != 0).astype(np.float64)

    def loss(z):
        return cross_entropy_sums(z, jnp.asarray(targets), label_smoothing=eps)["loss"]

    grad = np.asarray(jax.grad(loss)(jnp.asarray(logits)))
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, reference_grad_logits(logits, targets, eps=eps, weights=weights), atol=1e-6)
    np.testing.assert_array_equal(grad[2, 1:], 0.0)  # padding gets no gradient


def test_huge_logits_stay_finite():
    logits, targets = _random_case(seed=31, scale=1e4)
    weights = (targets != 0).astype(np.float64)
    for eps in (0.0, 0.1):

        def loss(z, eps=eps):
            return cross_entropy_sums(z, jnp.asarray(targets), label_smoothing=eps)["loss"]

        value, grad = jax.value_and_grad(loss)(jnp.asarray(logits))
        assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
        np.testing.assert_allclose(
            float(value), reference_sums(logits, targets, eps=eps, weights=weights)["loss"], rtol=1e-5
        )


def test_bfloat16_logits_are_computed_in_float32():
    logits, targets = _random_case(seed=41)
    low = jnp.asarray(logits, jnp.bfloat16)
    sums = cross_entropy_sums(low, jnp.asarray(targets), label_smoothing=0.1)
    assert all(v.dtype == jnp.float32 for v in sums.values())
    expected = reference_sums(np.asarray(low.astype(jnp.float32)), targets, eps=0.1, weights=targets != 0)
    _assert_sums_close(sums, expected)


def test_jit_gives_the_same_sums():
    logits, targets = _random_case(seed=51)
    eager = cross_entropy_sums(jnp.asarray(logits), jnp.asarray(targets), label_smoothing=0.1)
    jitted = jax.jit(lambda z, t: cross_entropy_sums(z, t, label_smoothing=0.1))(
        jnp.asarray(logits), jnp.asarray(targets)
    )
    for name in eager:
        np.testing.assert_allclose(float(jitted[name]), float(eager[name]), rtol=1e-6, err_msg=name)


def test_shape_mismatch_is_an_error(without_runtime_typechecks):
    with pytest.raises(ValueError, match="disagree"):
        cross_entropy_sums(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32))
