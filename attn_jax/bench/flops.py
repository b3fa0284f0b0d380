"""Analytic FLOPs of a training step of the encoder-decoder Transformer and of the decoder-only LM.

The count follows Kaplan et al. 2020 ("Scaling Laws for Neural Language Models", §2.1 and Table 1) and the
PaLM paper (Chowdhery et al. 2022, Appendix B): a multiply-add is 2 FLOPs, so a weight matrix applied to one
token costs 2 FLOPs per weight in the forward pass, and the backward pass costs twice the forward (one
product for the gradient of the activations, one for the weights), so a training step is 3x the forward:

    forward = 2 * sum over weight matrices W of |W| * (tokens W is applied to)      "matmul" term
            + 4 * N * H * sum over attention layers and sequences of T_b * S_b      "attention" term
    train   = 3 * forward          (PaLM: 6 * params * tokens + 12 * L * H * Q * T per token)

For the encoder-decoder with ``n_src`` / ``n_tgt`` non-pad source / target tokens (D d_model, N heads, K
key/value heads, H head size, F d_ff, V vocabulary; ``attn_jax.types`` names the letters):

* each encoder layer: ``W_q W_o`` (``D*N*H`` each), ``W_k W_v`` (``D*K*H`` each) and the FFN (``2*D*F``) on
  ``n_src`` tokens;
* each decoder layer: the same self-attention and FFN plus the cross-attention ``W_q W_o`` on ``n_tgt``
  tokens, and the cross-attention ``W_k W_v`` on the ``n_src`` memory tokens;
* the pre-softmax projection (``V*D``, tied to the embedding or not) on ``n_tgt`` tokens; the embedding
  lookups are gathers, 0 FLOPs;
* attention: ``Q K^T`` and ``weights @ V`` are ``2*N*H`` FLOPs each per (query, key) pair: per sequence
  ``S_b^2`` pairs per encoder layer, ``T_b^2`` (decoder self-attention) and ``T_b * S_b`` (cross) per decoder
  layer. Causal self-attention is counted over the full square, as PaLM does and as the dense kernels compute.

Only non-pad tokens count (``lengths`` are per-sequence real lengths), so padding is wasted work, never
credited. Not counted, as in both references: biases, layer norm, softmax, dropout, the loss and the
optimiser update (elementwise, a few FLOPs per element), and the recomputation of ``remat`` (this is model
FLOPs, so ``mfu`` is model FLOPs utilisation, not hardware FLOPs utilisation). XLA's own count of a compiled
step (``cost_analysis()["flops"]``), which includes the elementwise work, agrees within a few per cent
(``tests/test_bench.py``).
"""

import dataclasses

import numpy as np

from attn_jax.model_config import TransformerConfig


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """Forward FLOPs of one step, split into the weight-matrix and the attention terms."""

    matmul: float  # 2 * weights * tokens they are applied to
    attention: float  # Q K^T and weights @ V

    @property
    def forward(self) -> float:
        return self.matmul + self.attention

    @property
    def train(self) -> float:
        """Forward + backward: the backward pass costs twice the forward (Kaplan et al. 2020, §2.1)."""
        return 3.0 * self.forward


def linear_flops(d_in: int, d_out: int, tokens: int) -> float:
    """Forward FLOPs of a ``[d_in, d_out]`` weight applied to ``tokens`` vectors: one multiply-add per weight.

    Example:
      >>> linear_flops(512, 2048, 10)
      20971520.0
    """
    return 2.0 * d_in * d_out * tokens


def attention_matmul_params(config: TransformerConfig) -> tuple[int, int]:
    """``(query-side, key/value-side)`` weights of one attention layer: ``W_q + W_o`` and ``W_k + W_v``."""
    D, N, K, H = config.d_model, config.num_heads, config.resolved_num_kv_heads, config.resolved_head_dim
    return 2 * D * N * H, 2 * D * K * H


def _ffn_params(config: TransformerConfig) -> int:
    return 2 * config.d_model * config.d_ff


def _lengths(lengths) -> np.ndarray:
    lengths = np.asarray(lengths, np.float64).reshape(-1)
    if (lengths < 0).any():
        raise ValueError(f"lengths must be >= 0, got {lengths}")
    return lengths


def transformer_flops(config: TransformerConfig, src_lengths, tgt_lengths) -> StepFlops:
    """FLOPs of the encoder-decoder on one batch (formula in the module docstring).

    Args:
      config: the model.
      src_lengths: ``[B]`` non-pad source tokens of each sequence.
      tgt_lengths: ``[B]`` non-pad target tokens of each sequence.

    Returns:
      ``StepFlops``; ``.train`` is a training step's, ``.forward`` a forward pass's.

    Example:
      >>> cfg = TransformerConfig.base(vocab_size=32000)
      >>> round(transformer_flops(cfg, [64] * 16, [64] * 16).train / 1e9, 1)  # GFLOP per step
      378.5
    """
    S, T = _lengths(src_lengths), _lengths(tgt_lengths)
    if S.shape != T.shape:
        raise ValueError(f"src_lengths {S.shape} and tgt_lengths {T.shape} must both be [B]")
    query_side, kv_side = attention_matmul_params(config)
    L_enc, L_dec = config.num_encoder_layers, config.num_decoder_layers
    n_src, n_tgt = float(S.sum()), float(T.sum())
    encoder = L_enc * (query_side + kv_side + _ffn_params(config)) * n_src
    decoder = L_dec * (2 * query_side + kv_side + _ffn_params(config)) * n_tgt + L_dec * kv_side * n_src
    output = config.vocab_size * config.d_model * n_tgt
    pairs = float(L_enc * (S * S).sum() + L_dec * (T * T).sum() + L_dec * (T * S).sum())
    NH = config.num_heads * config.resolved_head_dim
    return StepFlops(matmul=2.0 * (encoder + decoder + output), attention=4.0 * NH * pairs)


def language_model_flops(config: TransformerConfig, lengths) -> StepFlops:
    """FLOPs of the decoder-only LM (``num_decoder_layers`` self-attention + FFN layers) on one batch.

    Example:
      >>> cfg = TransformerConfig(vocab_size=100, d_model=8, num_heads=2, d_ff=16, num_decoder_layers=1)
      >>> f = language_model_flops(cfg, [3])  # 3 tokens: 2*(4*64 + 256 + 800)*3, then 4*8*9
      >>> f.matmul, f.attention
      (7872.0, 288.0)
    """
    T = _lengths(lengths)
    query_side, kv_side = attention_matmul_params(config)
    L = config.num_decoder_layers
    weights = L * (query_side + kv_side + _ffn_params(config)) + config.vocab_size * config.d_model
    NH = config.num_heads * config.resolved_head_dim
    return StepFlops(matmul=2.0 * weights * float(T.sum()), attention=4.0 * NH * L * float((T * T).sum()))


def batch_flops(config: TransformerConfig, batch: dict) -> StepFlops:
    """``transformer_flops`` (a batch with ``"inputs"``) or ``language_model_flops`` of a training batch.

    Lengths are the counts of non-pad tokens of ``inputs`` and ``targets_out`` (``config.pad_id`` is padding).
    """
    targets = np.asarray(batch["targets_out"]) != config.pad_id
    if "inputs" not in batch:
        return language_model_flops(config, targets.sum(axis=1))
    sources = np.asarray(batch["inputs"]) != config.pad_id
    return transformer_flops(config, sources.sum(axis=1), targets.sum(axis=1))


def mfu(flops: float, seconds: float, ceiling_flops_per_s: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the measured matmul ceiling (``attn_jax.bench.ceiling``).

    Example:
      >>> mfu(2e9, 0.5, 8e9)
      0.5
    """
    return flops / seconds / ceiling_flops_per_s


def step_rates(config: TransformerConfig, batch: dict, seconds: float, peak_flops_per_s: float | None) -> dict:
    """``{"flops_per_step", "step_s", "tokens_per_s", "mfu"}`` of a training step on ``batch`` taking ``seconds``.

    tokens/s counts non-pad target tokens; ``mfu`` is None without a peak.

    Example:
      >>> config = TransformerConfig(vocab_size=64, d_model=32, num_heads=2, d_ff=64)
      >>> batch = {"inputs": np.ones((2, 4), np.int32), "targets_out": np.array([[5, 6, 0, 0], [5, 6, 7, 0]])}
      >>> rates = step_rates(config, batch, 0.5, None)
      >>> rates["tokens_per_s"], rates["mfu"]
      (10.0, None)
    """
    train_flops = batch_flops(config, batch).train
    tokens = int(np.count_nonzero(batch["targets_out"] != config.pad_id))
    return {
        "flops_per_step": train_flops,
        "step_s": seconds,
        "tokens_per_s": tokens / seconds,
        "mfu": None if peak_flops_per_s is None else mfu(train_flops, seconds, peak_flops_per_s),
    }
