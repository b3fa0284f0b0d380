"""The training state and the pure steps: ``train_step`` and ``eval_step`` (paper §5).

One ``train_step`` serves every parallel mode: sharded ``jit`` (the batch and parameters carry shardings, XLA
inserts the collectives) and ``pmap`` (pass ``axis_name`` and the gradient and metric sums are ``psum``-ed).
A step whose loss or gradients are not finite leaves the parameters and optimiser state untouched and reports
``finite = 0``; the loop then applies the configured policy (raise or skip).
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from attn_jax import fused_random
from attn_jax.families import ModelConfig, family
from attn_jax.losses import cross_entropy_sums
from attn_jax.model import init_language_model, language_model, transformer
from attn_jax.model_config import TransformerConfig
from attn_jax.types import PRNGKeyArray


@struct.dataclass
class TrainState:
    """Everything a step changes: ``{step, params, opt_state}``. The optimiser itself stays outside."""

    # Any: the same class also holds jax.eval_shape's ShapeDtypeStructs and the shardings derived from them.
    step: Any
    params: Any
    opt_state: Any


def init_train_state(rng: PRNGKeyArray, model_config: ModelConfig, tx, *, task: str = "translation"):
    """Fresh parameters (the model family's ``init``, or ``init_language_model``) and optimiser state at step 0."""
    init = family(model_config).init if task == "translation" else init_language_model
    params = init(rng, model_config)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def forward(params, batch: dict, *, model_config: ModelConfig, dropout_rng=None):
    """Logits ``[B, T, V]`` for a batch: translation when it has ``"inputs"``, language modelling otherwise.

    Batches hold ``"targets_in"`` (decoder inputs: BOS + target) and ``"targets_out"`` (target + EOS),
    and for translation ``"inputs"`` (source + EOS); ``0`` is padding. A recurrent family's config
    (``attn_jax.families``) runs that family's model.
    """
    if not isinstance(model_config, TransformerConfig):
        model = family(model_config)
        return model.apply(params, batch["inputs"], batch["targets_in"], config=model_config, dropout_rng=dropout_rng)
    # Packed batches (several sequences per row) carry segment ids and restarting positions.
    if "inputs" in batch:
        return transformer(
            params, batch["inputs"], batch["targets_in"], config=model_config, dropout_rng=dropout_rng,
            src_segment_ids=batch.get("inputs_segment_ids"), src_positions=batch.get("inputs_positions"),
            tgt_segment_ids=batch.get("targets_segment_ids"), tgt_positions=batch.get("targets_positions"),
        )  # fmt: skip
    return language_model(
        params, batch["targets_in"], config=model_config, dropout_rng=dropout_rng,
        segment_ids=batch.get("targets_segment_ids"), positions=batch.get("targets_positions"),
    )  # fmt: skip


def _loss_sums(params, batch, *, model_config, label_smoothing, dropout_rng):
    logits = forward(params, batch, model_config=model_config, dropout_rng=dropout_rng)
    return cross_entropy_sums(
        logits,
        batch["targets_out"],
        label_smoothing=label_smoothing,
        weights=batch.get("weights"),
        pad_id=model_config.pad_id,
    )


def _objective(params, **kwargs):
    """The summed smoothed loss, with every sum as the auxiliary output."""
    sums = _loss_sums(params, **kwargs)
    return sums["loss"], sums


def train_step(
    state: TrainState,
    batch: dict,
    rng: PRNGKeyArray,
    *,
    model_config: ModelConfig,
    tx: optax.GradientTransformation,
    label_smoothing: float = 0.1,
    axis_name: str | None = None,
    learning_rate_scale=1.0,
):
    """One optimiser update on the token-averaged, label-smoothed cross-entropy of one batch.

    Args:
      state: the current ``TrainState``.
      batch: ``{"inputs"?: [B, S], "targets_in": [B, T], "targets_out": [B, T], "weights"?: [B, T]}``.
      rng: the run's base PRNG key; this step's dropout key is ``fold_in(rng, step)``.
      model_config: static model configuration.
      tx: the Optax optimiser.
      label_smoothing: the paper's epsilon_ls.
      axis_name: the ``pmap`` axis to average over, or None under sharded ``jit``.
      learning_rate_scale: multiplies this update (a traced scalar): the loop's decay to zero at a time budget.

    Returns:
      ``(new_state, metrics)`` where metrics are sums over the global batch (``loss``, ``nll``, ``correct``,
      ``weight``) plus ``grad_norm`` and ``finite`` (1.0 when the update was applied).
    """
    grads, sums = gradient_sums(
        state.params, batch, _dropout_rng(rng, state.step, axis_name),
        model_config=model_config, label_smoothing=label_smoothing,
    )  # fmt: skip
    return apply_gradients(state, grads, sums, tx=tx, axis_name=axis_name, learning_rate_scale=learning_rate_scale)


def accumulate_gradients(
    accumulated,
    params,
    batch: dict,
    rng: PRNGKeyArray,
    step,
    micro_batch,
    *,
    model_config: ModelConfig,
    label_smoothing: float = 0.1,
    axis_name: str | None = None,
):
    """Adds one micro-batch's summed gradients and loss sums to ``accumulated`` (``start_accumulation``'s zeros).

    With ``train.accumulation_steps = k`` the loop calls this for k micro-batches, then ``apply_gradients`` once:
    the update divides the summed gradients by the total token count, so every real token weighs the same, as
    with one big batch (micro-batches of different lengths are not averaged per micro-batch). Micro-batch ``m``
    of update ``step`` draws its dropout from ``fold_in(fold_in(rng, step), m)``.

    Returns:
      ``(gradient sums, loss sums)`` with the pytree structure of ``gradient_sums``'s result.
    """
    dropout_rng = fused_random.fold_in(_dropout_rng(rng, step, axis_name), micro_batch)
    grads, sums = gradient_sums(params, batch, dropout_rng, model_config=model_config, label_smoothing=label_smoothing)
    return jax.tree.map(jnp.add, accumulated, (grads, sums))


def start_accumulation(params):
    """Zero gradient sums shaped (and, under ``jit``, sharded) like ``params``, and zero loss sums."""
    zero = jnp.zeros((), jnp.float32)
    return jax.tree.map(jnp.zeros_like, params), {name: zero for name in ("loss", "nll", "correct", "weight")}


def gradient_sums(params, batch: dict, dropout_rng, *, model_config: ModelConfig, label_smoothing: float):
    """Gradients of the *summed* smoothed loss of one batch, and its sums (``loss``, ``nll``, ``correct``,
    ``weight``); dividing by the token count is left to ``apply_gradients``."""
    return jax.grad(_objective, has_aux=True)(
        params, batch=batch, model_config=model_config, label_smoothing=label_smoothing, dropout_rng=dropout_rng
    )


def apply_gradients(
    state: TrainState, grads, sums: dict, *, tx: optax.GradientTransformation, axis_name=None, learning_rate_scale=1.0
):
    """The optimiser update from summed gradients and loss sums (one batch, or several accumulated).

    A non-finite loss or gradient leaves the parameters and optimiser state untouched (``finite = 0``); the step
    counts optimiser updates either way. ``learning_rate_scale`` multiplies the update, which for Adam (and
    decoupled weight decay) is the same as multiplying the learning rate.

    Returns:
      ``(new_state, metrics)`` as for ``train_step``.
    """
    if axis_name is not None:
        grads, sums = jax.lax.psum((grads, sums), axis_name)
    # Gradients of the *sum*, divided by the global token count: every real token weighs the same.
    denominator = jnp.maximum(sums["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grads)
    grad_norm = optax.tree.norm(grads)
    # One scalar guards the update: the norm is NaN/Inf when any gradient is (or when |g| > ~1.8e19, whose square
    # overflows float32), and lax.cond skips the whole update rather than selecting every array elementwise.
    finite = jnp.isfinite(sums["loss"]) & jnp.isfinite(grad_norm)

    def update(params, opt_state):
        updates, opt_state = tx.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: u * jnp.asarray(learning_rate_scale, u.dtype), updates)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.lax.cond(finite, update, lambda p, o: (p, o), state.params, state.opt_state)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    metrics = sums | {"grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}
    return new_state, metrics


def _dropout_rng(rng, step, axis_name):
    """This update's dropout key, ``fold_in(rng, step)``, and under ``pmap`` one stream per device."""
    dropout_rng = fused_random.fold_in(rng, step)  # jax.random.fold_in bit for bit, without XLA:CPU's loop
    if axis_name is not None:
        dropout_rng = fused_random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))
    return dropout_rng


def eval_step(params, batch: dict, *, model_config: ModelConfig, axis_name: str | None = None) -> dict:
    """Sums of the unsmoothed loss, correct tokens and token count on one batch (no dropout).

    ``loss`` here is the plain negative log-likelihood, so ``exp(loss / weight)`` is the perplexity.
    """
    sums = _loss_sums(params, batch, model_config=model_config, label_smoothing=0.0, dropout_rng=None)
    return jax.lax.psum(sums, axis_name) if axis_name is not None else sums
