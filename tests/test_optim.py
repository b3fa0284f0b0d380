"""Tests for attn_jax.optim: the paper's learning-rate schedule (equation 3) and its Adam (§5.3).

References: equation 3 evaluated in float64, Adam written from Kingma & Ba's update rule in float64 NumPy
(bias-corrected moments, epsilon outside the square root, as the paper's tensor2tensor and Optax use), and
``optax.adam`` itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attn_jax.optim import make_optimizer, rsqrt_warmup_schedule

B1, B2, EPS = 0.9, 0.98, 1e-9  # the paper's Adam constants


@pytest.fixture(autouse=True)
def standard_dtype_promotion():
    # optax's adam mixes weakly typed Python scalars in ways the strict mode rejects.
    with jax.numpy_dtype_promotion("standard"):
        yield


def paper_lrate(step_num, d_model, warmup_steps):
    """Equation 3 of the paper, in float64: d_model^-0.5 * min(step_num^-0.5, step_num * warmup_steps^-1.5)."""
    step_num = np.asarray(step_num, np.float64)
    return d_model**-0.5 * np.minimum(step_num**-0.5, step_num * warmup_steps**-1.5)


def numpy_adam(grads_seq, lrs, *, b1=B1, b2=B2, eps=EPS, weight_decay=0.0, params=None):
    """float64 Adam(W) updates for a sequence of gradient dicts; ``lrs[t]`` is the rate of update t (0-based)."""
    m = {k: np.zeros_like(v, np.float64) for k, v in grads_seq[0].items()}
    v = {k: np.zeros_like(g, np.float64) for k, g in grads_seq[0].items()}
    params = {k: np.asarray(p, np.float64) for k, p in (params or {}).items()}
    updates_seq = []
    for t, grads in enumerate(grads_seq, start=1):
        updates = {}
        for k, g in grads.items():
            g = np.asarray(g, np.float64)
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g**2
            m_hat = m[k] / (1 - b1**t)
            v_hat = v[k] / (1 - b2**t)
            direction = m_hat / (np.sqrt(v_hat) + eps)
            if weight_decay:
                direction = direction + weight_decay * params[k]
            updates[k] = -lrs[t - 1] * direction
            if params:
                params[k] = params[k] + updates[k]
        updates_seq.append(updates)
    return updates_seq


def _grads(seed, scales=(1.0,)):
    """Gradient dicts with two leaves of prime sizes, one per scale."""
    rng = np.random.default_rng(seed)
    return [
        {
            "w": (s * rng.standard_normal((3, 5))).astype(np.float32),
            "b": (s * rng.standard_normal(7)).astype(np.float32),
        }
        for s in scales
    ]


def _params():
    return {"w": jnp.ones((3, 5), jnp.float32), "b": jnp.full((7,), -0.5, jnp.float32)}


def _run(tx, grads_seq, params=None, *, jit=True):
    """Feeds each gradient dict to ``tx`` (applying the updates); returns the update dicts, params and state."""
    params = _params() if params is None else params
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    out = []
    for grads in grads_seq:
        updates, state = update(jax.tree.map(jnp.asarray, grads), state, params)
        params = optax.apply_updates(params, updates)
        out.append(jax.tree.map(np.asarray, updates))
    return out, params, state


def _assert_updates_close(actual_seq, expected_seq, rtol=1e-5, atol=0.0):
    assert len(actual_seq) == len(expected_seq)
    for t, (actual, expected) in enumerate(zip(actual_seq, expected_seq, strict=True)):
        assert set(actual) == set(expected)
        for k in expected:
            np.testing.assert_allclose(actual[k], expected[k], rtol=rtol, atol=atol, err_msg=f"update {t}, {k}")


# ---------------------------------------------------------------------------------------------------------
# The schedule (equation 3)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("d_model", "warmup_steps"), [(512, 4000), (1024, 4000), (64, 100), (13, 7)])
def test_schedule_is_equation_3_with_step_num_count_plus_one(d_model, warmup_steps):
    schedule = rsqrt_warmup_schedule(d_model, warmup_steps)
    edges = [0, 1, warmup_steps - 2, warmup_steps - 1, warmup_steps, 100_000, 299_999]
    counts = np.unique(np.concatenate([np.arange(0, 3 * warmup_steps, max(1, warmup_steps // 97)), edges]))
    actual = np.array([float(schedule(int(c))) for c in counts])
    np.testing.assert_allclose(actual, paper_lrate(counts + 1, d_model, warmup_steps), rtol=1e-6)
    # The same values when traced (Optax calls schedules inside jit with an int32 count).
    traced = np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(counts, jnp.int32)))
    np.testing.assert_allclose(traced, actual, rtol=1e-6)


def test_schedule_peaks_at_warmup_steps():
    d_model, warmup_steps = 512, 4000
    schedule = rsqrt_warmup_schedule(d_model, warmup_steps)
    counts = jnp.arange(0, 20_000)
    values = np.asarray(jax.vmap(schedule)(counts))
    # The peak is at step_num = warmup_steps, i.e. Optax count warmup_steps - 1.
    assert int(np.argmax(values)) == warmup_steps - 1
    np.testing.assert_allclose(values.max(), d_model**-0.5 * warmup_steps**-0.5, rtol=1e-6)  # 6.99e-4
    # Linear warm-up: proportional to step_num before the peak; inverse square root after it.
    np.testing.assert_allclose(values[99] / values[9], 10.0, rtol=1e-5)
    np.testing.assert_allclose(values[4 * warmup_steps - 1] / values[warmup_steps - 1], 0.5, rtol=1e-5)
    assert np.all(np.diff(values[:warmup_steps]) > 0) and np.all(np.diff(values[warmup_steps:]) < 0)


@pytest.mark.parametrize("scale", [0.5, 2.0, 3.7])
def test_schedule_scale_multiplies_everything(scale):
    base = rsqrt_warmup_schedule(256, 800)
    scaled = rsqrt_warmup_schedule(256, 800, scale=scale)
    for count in (0, 10, 799, 800, 5000):
        np.testing.assert_allclose(float(scaled(count)), scale * paper_lrate(count + 1, 256, 800), rtol=1e-6)
        np.testing.assert_allclose(float(scaled(count)), scale * float(base(count)), rtol=1e-6)


@pytest.mark.parametrize("warmup_steps", [0, -5])
def test_schedule_rejects_non_positive_warmup(warmup_steps):
    with pytest.raises(ValueError, match="warmup_steps"):
        rsqrt_warmup_schedule(512, warmup_steps)


# ---------------------------------------------------------------------------------------------------------
# Adam with the paper's constants
# ---------------------------------------------------------------------------------------------------------


def test_updates_equal_numpy_adam_with_the_schedule():
    d_model, warmup_steps = 16, 3
    schedule = rsqrt_warmup_schedule(d_model, warmup_steps)
    grads_seq = _grads(seed=0, scales=(1.0, 0.3, 2.0, 1.0, 0.01, 5.0))
    actual, _, _ = _run(make_optimizer(schedule), grads_seq)
    lrs = paper_lrate(np.arange(1, len(grads_seq) + 1), d_model, warmup_steps)
    _assert_updates_close(actual, numpy_adam(grads_seq, lrs))


def test_updates_equal_optax_adam_with_the_papers_constants():
    schedule = rsqrt_warmup_schedule(32, 4)
    grads_seq = _grads(seed=1, scales=(1.0, 0.5, 3.0, 0.1, 1.0))
    actual, params, state = _run(make_optimizer(schedule), grads_seq)
    expected, expected_params, _ = _run(optax.adam(schedule, b1=0.9, b2=0.98, eps=1e-9), grads_seq)
    _assert_updates_close(actual, expected, rtol=1e-6)
    counts = optax.tree_utils.tree_get_all_with_path(state, "count")
    assert counts and all(int(count) == len(grads_seq) for _, count in counts)


def test_default_constants_are_the_papers():
    grads_seq = _grads(seed=2, scales=(1.0, 0.2, 4.0))
    actual, _, _ = _run(make_optimizer(1e-3), grads_seq)
    _assert_updates_close(actual, numpy_adam(grads_seq, [1e-3] * 3, b1=0.9, b2=0.98, eps=1e-9))
    # b2 = 0.999 (Adam's default) gives different updates from the second step on, so the test can tell.
    other = numpy_adam(grads_seq, [1e-3] * 3, b2=0.999)
    assert not np.allclose(actual[2]["w"], other[2]["w"], rtol=1e-3)


def test_custom_constants_are_used():
    grads_seq = _grads(seed=3, scales=(1.0, 0.2, 4.0))
    actual, _, _ = _run(make_optimizer(0.01, b1=0.5, b2=0.9, eps=1e-3), grads_seq)
    _assert_updates_close(actual, numpy_adam(grads_seq, [0.01] * 3, b1=0.5, b2=0.9, eps=1e-3))


def test_first_update_is_minus_lr_times_sign_of_gradient():
    schedule = rsqrt_warmup_schedule(64, 10)
    (grads,) = _grads(seed=4)
    (update,), _, _ = _run(make_optimizer(schedule), [grads])
    lr = paper_lrate(1, 64, 10)
    for k in grads:
        np.testing.assert_allclose(update[k], -lr * np.sign(grads[k]), rtol=1e-5)


def test_gradient_clipping_scales_the_global_norm_before_adam():
    clip = 1.0
    grads_seq = _grads(seed=5, scales=(10.0, 0.05, 3.0, 0.2))
    norms = [np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in grads.values())) for grads in grads_seq]
    assert norms[0] > clip > norms[1]  # both branches of the clip are exercised
    clipped = [{k: g * min(1.0, clip / n) for k, g in grads.items()} for grads, n in zip(grads_seq, norms, strict=True)]
    lrs = [1e-2] * len(grads_seq)
    actual, _, state = _run(make_optimizer(1e-2, grad_clip_norm=clip), grads_seq)
    _assert_updates_close(actual, numpy_adam(clipped, lrs))
    # Adam is nearly scale-invariant, but the moment history is not: unclipped gradients give other updates.
    unclipped = numpy_adam(grads_seq, lrs)
    assert not np.allclose(actual[1]["w"], unclipped[1]["w"], rtol=1e-2)
    # The second moment holds clipped gradients.
    nu = optax.tree_utils.tree_get(state, "nu")
    expected_nu = sum((1 - B2) * B2 ** (len(clipped) - 1 - t) * clipped[t]["b"] ** 2 for t in range(len(clipped)))
    np.testing.assert_allclose(np.asarray(nu["b"]), expected_nu, rtol=1e-5)


def test_no_clipping_by_default():
    grads_seq = _grads(seed=6, scales=(100.0, 0.01))
    actual, _, _ = _run(make_optimizer(1e-2), grads_seq)
    _assert_updates_close(actual, numpy_adam(grads_seq, [1e-2, 1e-2]))


def test_weight_decay_is_decoupled_adamw():
    grads_seq = _grads(seed=7, scales=(1.0, 0.5, 2.0))
    params = _params()
    actual, _, _ = _run(make_optimizer(1e-2, weight_decay=0.1), grads_seq, params=params)
    expected = numpy_adam(grads_seq, [1e-2] * 3, weight_decay=0.1, params=jax.tree.map(np.asarray, params))
    _assert_updates_close(actual, expected)


def test_optimizer_updates_under_strict_dtype_promotion():
    """The suite runs with strict promotion (tests/conftest.py), where a bare ``optax.adam`` raises on its
    float ** int32 bias correction; users who opt into strict promotion must still be able to train."""
    tx = make_optimizer(1e-3)
    params = {"w": jnp.ones(2)}
    with jax.numpy_dtype_promotion("strict"):
        state = tx.init(params)
        updates, state = tx.update({"w": jnp.ones(2)}, state, params)
    np.testing.assert_allclose(np.asarray(updates["w"]), [-1e-3, -1e-3], rtol=1e-6)


def test_optimizer_is_plain_adam():
    grads_seq = _grads(seed=9, scales=(1.0, 2.0))
    actual, _, _ = _run(make_optimizer(1e-3), grads_seq)
    _assert_updates_close(actual, numpy_adam(grads_seq, [1e-3, 1e-3]))


def test_optimizer_gives_the_same_updates_eagerly_and_under_jit(without_runtime_typechecks):
    tx = make_optimizer(rsqrt_warmup_schedule(16, 3), grad_clip_norm=1.0)
    grads_seq = _grads(seed=10, scales=(1.0, 0.5, 2.0, 0.1))
    eager, _, _ = _run(tx, grads_seq, jit=False)
    jitted, _, _ = _run(tx, grads_seq, jit=True)
    # Every update to 1e-6 of the largest update's size (~0.1): where a coordinate's gradients change sign, Adam's
    # first moment cancels to ~1e-3 of it, and one float32 rounding of the larger terms is then 1e-6 relative to
    # that small value. (This test once ran two micro-batches per update, which hid that coordinate.)
    _assert_updates_close(jitted, eager, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "options", [{}, {"grad_clip_norm": 1.0}, {"weight_decay": 0.1}], ids=["adam", "clipped", "adamw"]
)
def test_flat_optimizer_gives_the_tree_optimizers_updates(options):
    """``flat=True`` runs the same update over one concatenated vector: the same updates to float32 rounding
    (XLA fuses the vector's ops differently; clipping's global norm also sums in another order)."""
    grads_seq = _grads(seed=11, scales=(10.0, 0.5, 2.0))
    schedule = rsqrt_warmup_schedule(16, 2)
    flat, flat_params, state = _run(make_optimizer(schedule, flat=True, **options), grads_seq)
    tree, tree_params, _ = _run(make_optimizer(schedule, **options), grads_seq)
    nu = optax.tree_utils.tree_get(state, "nu")
    assert nu.shape == (3 * 5 + 7,)  # the second moment (like the first) is one vector
    _assert_updates_close(flat, tree, rtol=1e-6, atol=1e-9)
    if not options:
        _assert_updates_close(flat, numpy_adam(grads_seq, [float(schedule(t)) for t in range(3)]))
    np.testing.assert_allclose(np.asarray(flat_params["w"]), np.asarray(tree_params["w"]), rtol=1e-6)
