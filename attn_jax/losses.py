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

    Everything is written in terms of the logits' log-sum-exp and two sums over the vocabulary (all logits, and the
    target's through an ``iota == target`` mask), with no ``[B, T, V]`` log-probabilities, gather, scatter or
    argmax: XLA then reads the logits in a few fused reductions and writes the gradient ``softmax - q`` in one
    elementwise pass. On the default run's ``[64, 16, 4000]`` logits that took the loss with its gradient from
    23 to 6 ms on the 2-core CPU (experiments/results/NOTES.md, finding 18); the gradient is bitwise the same.

    Args:
      logits: ``[B, T, V]`` (computed in ``promote(float32, dtype)``: float32, or float64 for float64 logits).
      targets: ``[B, T]`` gold ids.
      label_smoothing: the paper's epsilon_ls.
      weights: ``[B, T]`` per-token weights; defaults to ``targets != pad_id``.
      pad_id: the padding id, used when ``weights`` is None.

    Returns:
      ``{"loss", "nll", "correct", "weight"}`` scalars, each a sum over tokens; divide by ``"weight"``.
      ``correct`` counts tokens whose target has the largest logit (a tie for the largest counts as correct,
      where an argmax would pick the first tied id).

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
    logits = logits.astype(compute)
    # [B, T, V] True at each token's target, built inside the fusions that read the logits.
    is_target = jax.lax.broadcasted_iota(targets.dtype, logits.shape, 2) == targets[..., None]
    target_logit = jnp.sum(jnp.where(is_target, logits, jnp.zeros((), compute)), axis=-1)
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    nll = log_normalizer - target_logit  # -log p(target)
    if label_smoothing > 0.0:
        off = label_smoothing / (V - 1)
        on = 1.0 - label_smoothing
        # -sum_v q_v log p_v = logsumexp - sum_v q_v z_v, with q = off everywhere except `on` at the target.
        smoothed = log_normalizer - off * jnp.sum(logits, axis=-1) - (on - off) * target_logit
        smoothed = smoothed - _entropy(on, off, V)
    else:
        smoothed = nll
    correct = (target_logit >= jnp.max(logits, axis=-1)).astype(compute)
    return {
        "loss": jnp.sum(smoothed * weights),
        "nll": jnp.sum(nll * weights),
        "correct": jnp.sum(correct * weights),
        "weight": jnp.sum(weights),
    }


def _entropy(on: float, off: float, V: int) -> float:
    """Entropy of the smoothed target distribution (a constant, so gradients are unchanged)."""
    return -(on * math.log(on) + (V - 1) * off * math.log(off + 1e-20))
