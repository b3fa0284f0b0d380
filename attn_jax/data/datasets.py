"""``build_datasets``: everything a run reads, from the experiment's ``config.data`` section, in one object.

It picks the source (``ding_en_de``, ``wmt14_translate/de-en`` or the synthetic ``copy`` task), trains or
reuses the shared SentencePiece model in the workdir, and builds this host's training iterator (whose state
goes into checkpoints) and evaluation batches, plus the raw validation and test pairs that BLEU is scored on.
"""

import collections
import dataclasses
import functools
import hashlib
import pathlib
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np

from attn_jax import hosts
from attn_jax.data import tokenizer as tok
from attn_jax.data.copy_task import CopySource
from attn_jax.data.ding import ding_sources
from attn_jax.data.encoding import load_or_measure_lengths, read_examples, text_pair_encoder, token_pair_encoder
from attn_jax.data.pipeline import PipelineConfig, eval_batches, train_batches
from attn_jax.data.text import TEXT_ISSUES, DataError, clean_text
from attn_jax.data.wmt14 import wmt14_sources

DATASETS = ("ding_en_de", "wmt14_translate/de-en", "copy")
_MODEL_KEYS = ("inputs", "targets_in", "targets_out")


@dataclasses.dataclass
class Datasets:
    """What the training loop reads.

    Attributes:
      train: this host's training batches; ``get_state()``/``set_state()`` for checkpoints.
      eval_batches: a fresh single pass over this host's validation batches per call.
      tokenizer: the SentencePiece model, or None for token-id tasks (copy).
      vocab_size: the model's vocabulary size.
      validation_pairs / test_pairs: ``(source, reference)`` raw text (or id arrays for copy) for BLEU.
      batch_multiple: batch sizes are multiples of this.
      fingerprint: names the data, the tokenizer and the pipeline settings (stored in checkpoints).
      report: counts of what the pipeline dropped, truncated and padded, and of the training texts that
        needed cleaning (invalid UTF-8, control characters): never silent.
    """

    train: Iterator[dict]
    eval_batches: Callable[[], Iterator[dict]]
    tokenizer: object | None
    vocab_size: int
    validation_pairs: list
    test_pairs: list
    batch_multiple: int
    fingerprint: str
    report: dict


class _ModelBatches:
    """Keeps only the model's keys (LM: only the target side) and forwards the iterator state."""

    def __init__(self, iterator, task: str):
        self._iterator = iterator
        self._keys = _MODEL_KEYS if task == "translation" else _MODEL_KEYS[1:]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._iterator)
        return {key: batch[key] for key in self._keys}

    def get_state(self):
        return self._iterator.get_state()

    def set_state(self, state) -> None:
        self._iterator.set_state(state)


def build_datasets(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    batch_multiple: int = 1,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> Datasets:
    """Sources, tokenizer and batches for ``config`` (its ``data`` section, ``task`` and ``seed``).

    Args:
      config: the experiment config.
      workdir: the run's directory (the tokenizer and cached lengths live there).
      batch_multiple: global batch sizes are made multiples of this (the number of batch shards).
      shard_index / shard_count: this host's data shard; default ``jax.process_index()/process_count()``.

    Returns:
      A ``Datasets``.
    """
    data = config.data
    if data.name not in DATASETS:
        raise ValueError(f"config.data.name must be one of {DATASETS}, got {data.name!r}")
    workdir = pathlib.Path(workdir)
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    sources, tokenizer, encode_pair, vocab_size = _sources(config, workdir)
    if config.task == "lm":
        encode_pair = _target_only(encode_pair)
    fingerprint = _fingerprint(config, workdir, tokenizer)
    train_config = PipelineConfig(
        max_length=data.max_length, overlong=data.overlong, tokens_per_batch=data.tokens_per_batch,
        batch_multiple=batch_multiple, seed=config.seed, num_threads=data.num_threads,
    )  # fmt: skip
    eval_config = dataclasses.replace(train_config, tokens_per_batch=data.eval_tokens_per_batch, shuffle=False)
    text_issues = collections.Counter()
    lengths = load_or_measure_lengths(
        workdir / "lengths_train.npz", sources["train"], encode_pair, fingerprint=fingerprint, issues=text_issues
    )
    train = train_batches(
        sources["train"], encode_pair, train_config, shard_index=shard_index, shard_count=shard_count, lengths=lengths
    )
    validation = eval_batches(
        sources["validation"], encode_pair, eval_config, shard_index=shard_index, shard_count=shard_count
    )
    return Datasets(
        train=_ModelBatches(train.iterator(), config.task),
        eval_batches=lambda: _ModelBatches(validation.iterator(), config.task),
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        validation_pairs=_pairs(sources["validation"], data),
        test_pairs=_pairs(sources["test"], data),
        batch_multiple=batch_multiple,
        fingerprint=fingerprint,
        report={
            "train": dataclasses.asdict(train.stats) | {issue: text_issues[issue] for issue in TEXT_ISSUES},
            "validation": dataclasses.asdict(validation.stats),
        },
    )


def _sources(config, workdir: pathlib.Path):
    """``(sources per split, tokenizer or None, pair encoder, vocabulary size)``."""
    data = config.data
    if data.name == "copy":
        return _copy_sources(data.copy), None, token_pair_encoder("source", "target"), data.copy.vocab_size
    if data.name == "ding_en_de":
        sources = ding_sources(data.data_dir or None, phrases=data.phrases, ding_file=data.ding_file or None)
    else:
        sources = wmt14_sources(data.data_dir or None)
    keys = (data.source_key, data.target_key)
    load_or_train = functools.partial(
        tok.load_or_train_tokenizer,
        workdir / "tokenizer",
        lambda: tok.training_texts(sources["train"], keys=keys, max_examples=data.tokenizer_examples),
        vocab_size=data.vocab_size,
        model_type=data.tokenizer_type,
    )
    if jax.process_count() > 1:  # process 0 trains (or finds) the model in the shared workdir; the rest read it
        if jax.process_index() == 0:
            load_or_train()
        hosts.barrier("tokenizer")
    tokenizer = load_or_train()
    encoder = text_pair_encoder(tokenizer, *keys, invalid_utf8=data.invalid_utf8)
    return sources, tokenizer, encoder, data.vocab_size


def _copy_sources(copy) -> dict[str, CopySource]:
    """Train, validation and test copy sets drawn from different seeds, so evaluation is held out."""
    sizes = {"train": copy.train_examples, "validation": copy.eval_examples, "test": copy.eval_examples}
    return {
        split: CopySource(
            num_examples=size,
            vocab_size=copy.vocab_size,
            min_length=copy.min_length,
            max_length=copy.max_length,
            reverse=copy.reverse,
            seed=copy.seed * len(sizes) + i,
        )  # fmt: skip
        for i, (split, size) in enumerate(sizes.items())
    }


def _target_only(encode_pair):
    """Language modelling reads only the target side: both halves of the pair are the target."""

    def encode(example):
        _, target = encode_pair(example)
        return target, target

    return encode


def _pairs(source, data) -> list:
    """Every example of a split as ``(source, reference)``: text, or id arrays for the copy task."""
    examples = read_examples(source, list(range(len(source))))
    if data.name == "copy":
        return [(np.asarray(e["source"], np.int32), np.asarray(e["target"], np.int32)) for e in examples]
    return [tuple(_text(e, key, index, data) for key in (data.source_key, data.target_key)) for index, e in
            enumerate(examples)]  # fmt: skip


def _text(example, key: str, index: int, data) -> str:
    try:
        return clean_text(example[key], invalid_utf8=data.invalid_utf8)[0]
    except DataError as error:
        raise DataError(f"{data.name}: record {index}, feature {key!r}: {error}") from None


def _fingerprint(config, workdir: pathlib.Path, tokenizer) -> str:
    """A short hash of the data settings and the tokenizer model: lengths caches and checkpoints compare it."""
    digest = hashlib.sha256(config.data.to_json_best_effort(sort_keys=True).encode())
    digest.update(config.task.encode())
    model_file = workdir / "tokenizer" / "sentencepiece.model"
    if tokenizer is not None and model_file.is_file():
        digest.update(model_file.read_bytes())
    return digest.hexdigest()[:16]
