"""Label-smoothed cross-entropy (paper §5.4, epsilon_ls = 0.1), returned as sums so averages skip padding."""

import math

import jax
import jax.numpy as jnp

from attn_jax.types import Array, Float, Int, upcast_dtype


def cross_entropy_sums(
    logits: Float[Array, "B T V"],
    targets: Int[Array, "B T"],
    *,
    label_smoothing: float = 0.0,
    weights: Float[Array, "B T"] | None = None,
    pad_id: int = 0,
) -> dict[str, Float[Array, ""]]:
    """Sums of the smoothed loss, the plain negative log-likelihood and correct predictions over real tokens.

    The smoothed target puts ``1 - label_smoothing`` on the true token and spreads ``label_smoothing`` over the
    other ``V - 1`` tokens. Its entropy is subtracted, so a model that predicts that distribution exactly scores
    0 (as tensor2tensor does); ``nll`` is the unsmoothed loss that perplexity is computed from.

    Args:
      logits: ``[B, T, V]`` (computed in ``promote(float32, dtype)``: float32, or float64 for float64 logits).
      targets: ``[B, T]`` gold ids.
      label_smoothing: the paper's epsilon_ls.
      weights: ``[B, T]`` per-token weights; defaults to ``targets != pad_id``.
      pad_id: the padding id, used when ``weights`` is None.

    Returns:
      ``{"loss", "nll", "correct", "weight"}`` scalars, each a sum over tokens; divide by ``"weight"``.

    Example:
      >>> logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]]))
      >>> sums = cross_entropy_sums(logits, jnp.array([[0, 0]]), weights=jnp.array([[1.0, 0.0]]))
      >>> round(float(sums["nll"]), 4), float(sums["weight"])  # -log 0.5; the second token is masked
      (0.6931, 1.0)
    """
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits {logits.shape} and targets {targets.shape} disagree on [B, T]")
    V = logits.shape[-1]
    compute = upcast_dtype(logits.dtype)
    weights = (targets != pad_id) if weights is None else weights
    weights = weights.astype(compute)
    log_probs = jax.nn.log_softmax(logits.astype(compute), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    if label_smoothing > 0.0:
        off = label_smoothing / (V - 1)
        on = 1.0 - label_smoothing
        # -sum_v q_v log p_v  with q = off everywhere except `on` at the target.
        smoothed = -off * jnp.sum(log_probs, axis=-1) - (on - off) * (-nll)
        smoothed = smoothed - _entropy(on, off, V)
    else:
        smoothed = nll
    correct = (jnp.argmax(logits, axis=-1).astype(targets.dtype) == targets).astype(compute)
    return {
        "loss": jnp.sum(smoothed * weights),
        "nll": jnp.sum(nll * weights),
        "correct": jnp.sum(correct * weights),
        "weight": jnp.sum(weights),
    }


def _entropy(on: float, off: float, V: int) -> float:
    """Entropy of the smoothed target distribution (a constant, so gradients are unchanged)."""
    return -(on * math.log(on) + (V - 1) * off * math.log(off + 1e-20))
