"""Evaluation: token-level loss, accuracy and perplexity, and translation quality by sacreBLEU (paper §6.1).

Translation decodes with beam search (beam 4, length penalty 0.6, at most input length + 50 tokens) in
batches of a few static shapes, so each shape compiles once, then detokenizes and scores the detokenized
text against the raw references with sacreBLEU.
"""

import functools
import math
from collections.abc import Callable, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from attn_jax import parallel
from attn_jax.bleu import bleu, tokenized_bleu
from attn_jax.data.tokenizer import EOS_ID, PAD_ID, SourceEncoder, decode
from attn_jax.decoding import beam_search
from attn_jax.families import ModelConfig

_LENGTH_QUANTUM = 16  # source lengths are padded up to a multiple of this, bounding the number of compiles


def loss_metrics(sums: dict) -> dict[str, float]:
    """Per-token averages from summed metrics: ``loss`` (NLL), ``accuracy`` and ``perplexity``.

    Example:
      >>> loss_metrics({"loss": 2.0, "correct": 3.0, "weight": 4.0})
      {'loss': 0.5, 'accuracy': 0.75, 'perplexity': 1.6487212707001282}
    """
    weight = max(float(sums["weight"]), 1.0)
    loss = float(sums["loss"]) / weight
    return {"loss": loss, "accuracy": float(sums["correct"]) / weight, "perplexity": math.exp(min(loss, 50.0))}


def evaluate_loss(eval_step: Callable, params, batches: Iterable[dict]) -> dict[str, float]:
    """Runs ``eval_step(params, batch) -> sums`` over every batch and averages per token."""
    totals: dict[str, float] = {}
    for batch in batches:
        sums = jax.device_get(eval_step(params, batch))
        for name, value in sums.items():
            totals[name] = totals.get(name, 0.0) + float(value)
    return loss_metrics(totals) if totals else {}


def _bucket_length(length: int) -> int:
    return max(_LENGTH_QUANTUM, -(-length // _LENGTH_QUANTUM) * _LENGTH_QUANTUM)


@functools.partial(jax.jit, static_argnames=("model_config", "beam_size", "alpha", "max_len"))
def _beam_search_jit(params, src_tokens, *, model_config, beam_size, alpha, max_len):
    # ``beam_search`` finds the model family from ``model_config``'s type (``attn_jax.families``).
    tokens, _ = beam_search(params, src_tokens, config=model_config, beam_size=beam_size, alpha=alpha, max_len=max_len)
    return tokens[:, 0]  # the best hypothesis: [B, beam, T] -> [B, T]


def translate_ids(
    params,
    sources: Sequence[np.ndarray],
    *,
    model_config: ModelConfig,
    beam_size: int = 4,
    alpha: float = 0.6,
    extra_length: int = 50,
    batch_size: int = 64,
    batch_multiple: int = 1,
    mesh: Mesh | None = None,
) -> list[np.ndarray]:
    """Beam-searches each tokenized source (ending in EOS); returns the best output ids, EOS and padding cut.

    Any model family: the Transformer on its key/value cache, the recurrent ones on their state per beam.

    Sources are sorted by length and decoded in batches padded to a few static shapes; the maximum output
    length is the bucket's source length + ``extra_length`` (capped at ``model_config.max_len``). With a
    ``mesh``, each batch is split over its batch axes (every process passes the same ``sources``, and each
    process gets every output), and ``params`` may be sharded on it.
    """
    order = np.argsort([len(s) for s in sources], kind="stable")
    outputs: list[np.ndarray] = [np.zeros(0, np.int32)] * len(sources)
    batch_size = max(batch_multiple, batch_size // batch_multiple * batch_multiple)
    decode = _beam_search_jit if mesh is None else parallel.lockstep(_beam_search_jit, "beam_search")
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        src_len = min(_bucket_length(max(len(sources[i]) for i in chosen)), model_config.max_len)
        batch = np.zeros((batch_size, src_len), np.int32)
        batch[:, 0] = EOS_ID  # filler rows hold a lone EOS
        for row, i in enumerate(chosen):
            batch[row, : len(sources[i])] = sources[i][:src_len]
        max_len = min(src_len + extra_length, model_config.max_len)
        batch = batch if mesh is None else parallel.put_replicated_host_batch(batch, mesh)
        best = parallel.fetch_global(
            decode(params, batch, model_config=model_config, beam_size=beam_size, alpha=alpha, max_len=max_len)
        )
        for row, i in enumerate(chosen):
            outputs[i] = _strip(best[row])
    return outputs


def _strip(ids: np.ndarray, eos_id: int = EOS_ID, pad_id: int = PAD_ID) -> np.ndarray:
    """Cuts at the first EOS and drops padding."""
    ends = np.flatnonzero(ids == eos_id)
    ids = ids[: ends[0]] if len(ends) else ids
    return ids[ids != pad_id]


def translation_quality(
    params,
    pairs: Sequence[tuple],
    tokenizer,
    *,
    model_config: ModelConfig,
    eval_config,
    batch_multiple: int = 1,
    mesh: Mesh | None = None,
) -> tuple[dict[str, float], list]:
    """Translates ``(source, reference)`` pairs with beam search and scores them.

    Text pairs (with a SentencePiece ``tokenizer``) are scored by sacreBLEU on the detokenized output (``bleu``)
    and by the paper's tokenized, compound-split BLEU on German (``bleu_compound_split``, ``attn_jax.bleu``); id
    pairs (``tokenizer=None``, e.g. the copy task) by exact match.

    Args:
      params: model parameters.
      pairs: raw-text sentence pairs, or id-array pairs.
      tokenizer: a SentencePiece processor, or None for id pairs.
      model_config: the model's config, of any family (``attn_jax.families``).
      eval_config: ``beam_size``, ``alpha``, ``extra_length`` and ``batch_size`` (the experiment's ``eval``).
      batch_multiple: decoding batches are a multiple of this (the number of batch shards).
      mesh: decode with each batch split over this mesh (see ``translate_ids``).

    Returns:
      ``({"bleu": score, "bleu_compound_split": score} or {"exact_match": fraction}, hypotheses)``.
    """
    limit = model_config.max_len - 1
    to_ids = (lambda src: src) if tokenizer is None else SourceEncoder(tokenizer)  # the run's language tag first
    sources = [np.append(to_ids(src)[:limit], EOS_ID).astype(np.int32) for src, _ in pairs]
    outputs = translate_ids(
        params, sources, model_config=model_config, beam_size=eval_config.beam_size, alpha=eval_config.alpha,
        extra_length=eval_config.extra_length, batch_size=eval_config.batch_size, batch_multiple=batch_multiple,
        mesh=mesh,
    )  # fmt: skip
    if tokenizer is None:
        matches = [np.array_equal(out, np.asarray(ref)) for out, (_, ref) in zip(outputs, pairs, strict=True)]
        return {"exact_match": float(np.mean(matches)) if matches else 0.0}, outputs
    hypotheses = [decode(tokenizer, ids) for ids in outputs]
    references = [ref for _, ref in pairs]
    scores = {"bleu": bleu(hypotheses, references), "bleu_compound_split": tokenized_bleu(hypotheses, references)}
    return scores, hypotheses
