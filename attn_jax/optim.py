"""The paper's optimiser (§5.3): Adam with beta1 = 0.9, beta2 = 0.98, epsilon = 1e-9 and the schedule

    lrate = d_model^-0.5 * min(step_num^-0.5, step_num * warmup_steps^-1.5)        (paper equation 3)

built from Optax pieces only. Gradient clipping and accumulation are options the paper does not use.
"""

import jax
import jax.numpy as jnp
import optax


def rsqrt_warmup_schedule(d_model: int, warmup_steps: int, *, scale: float = 1.0) -> optax.Schedule:
    """Linear warm-up for ``warmup_steps``, then decay with the inverse square root of the step (equation 3).

    Optax counts updates from 0; the paper's ``step_num`` starts at 1, so update ``k`` uses ``step_num = k + 1``.

    Args:
      d_model: the model width ``D``.
      warmup_steps: the paper uses 4000.
      scale: multiplies the whole schedule (1.0 is the paper's).

    Returns:
      An Optax schedule ``count -> learning rate``.

    Example:
      >>> lr = rsqrt_warmup_schedule(512, 4000)
      >>> round(float(lr(3999)), 7), round(float(lr(15999)), 7)  # the peak, then half of it at 4x the steps
      (0.0006988, 0.0003494)
    """
    if warmup_steps <= 0:
        raise ValueError(f"warmup_steps must be positive, got {warmup_steps}")

    def schedule(count):
        step_num = jnp.asarray(count, jnp.float32) + 1.0
        return scale * d_model**-0.5 * jnp.minimum(jnp.reciprocal(jnp.sqrt(step_num)), step_num * warmup_steps**-1.5)

    return schedule


def make_optimizer(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.98,
    eps: float = 1e-9,
    grad_clip_norm: float | None = None,
    weight_decay: float = 0.0,
    flat: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Adam with the paper's constants, optionally clipped and decoupled-weight-decayed.

    Gradient accumulation is not an optimiser here: ``attn_jax.train.accumulate_gradients`` sums micro-batches'
    gradients so that every token weighs the same, and the optimiser then makes one update.

    Args:
      learning_rate: a float or an Optax schedule (e.g. ``rsqrt_warmup_schedule``).
      b1, b2, eps: Adam's constants (paper: 0.9, 0.98, 1e-9).
      grad_clip_norm: clip the global gradient norm to this value first; None = no clipping (paper).
      weight_decay: AdamW decay; 0 = plain Adam (paper).
      flat: run the update over one flat vector of all parameters (``optax.flatten``): a few fused ops for the
        whole model instead of several per parameter array (finding 17 of experiments/results/NOTES.md). For
        replicated parameters only (data parallelism): concatenating sharded ones would gather them. The
        optimiser state is then flat vectors, so its checkpoints do not restore into the tree layout.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = make_optimizer(1e-3)
      >>> state = tx.init({"w": jnp.ones(2)})
      >>> updates, state = tx.update({"w": jnp.ones(2)}, state)
      >>> [round(float(u), 6) for u in updates["w"]]  # Adam's first step is -lr * sign(g)
      [-0.001, -0.001]
    """
    steps = []
    if grad_clip_norm is not None:
        steps.append(optax.clip_by_global_norm(grad_clip_norm))
    if weight_decay:
        steps.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    else:
        steps.append(optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))
    tx = optax.chain(*steps) if len(steps) > 1 else steps[0]
    if flat:
        tx = optax.flatten(tx)
    return _under_standard_promotion(tx)


def _under_standard_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``tx`` with its update traced under standard dtype promotion.

    Optax raises a float to its int32 step count (Adam's bias correction), which a caller running with
    ``jax_numpy_dtype_promotion="strict"`` would otherwise see as a TypePromotionError from deep inside Optax.
    """
    tx = optax.with_extra_args_support(tx)

    def update(updates, state, params=None, **extra_args):
        with jax.numpy_dtype_promotion("standard"):
            return tx.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(tx.init, update)
