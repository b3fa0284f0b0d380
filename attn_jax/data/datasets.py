"""Everything a run reads, from the experiment's ``config.data`` section: ``prepare``, then ``build_datasets``.

The stages, in the order data flows (each reads what the one before wrote, nothing is measured twice):

1. ``sources.split_sources``: the data set's splits as random-access sources (TFDS or generated);
2. the tokenizer: trained once on a bounded random sample of the training split, kept in ``WORKDIR/tokenizer``;
3. ``prepared``: each split encoded once into ArrayRecord files of ids with every pair's lengths, in worker
   processes, resumable, cached under ``data.prepared_dir`` by (data set, tokenizer);
4. ``pipeline``: Grain batches (shuffle, pack or bucket, batch, shard) planned from the lengths, read as ids.

Options that add training signal, all off by default: ``data.lexicon_ratio`` mixes the Ding dictionary's entries
(split ``lexicon``, prepared like the others) into the training pairs; ``data.bidirectional`` trains both
directions: the tokenizer gets the two language tags, the training pairs (and entries) are prepared forward and
reversed, and every source, evaluation's and ``translate``'s included, starts with its target-language tag
(``tokenizer.SourceEncoder``).

``prepare(config, workdir)`` runs stages 1-3 (``attn-jax prepare``; ``build_datasets`` calls it and finds the
work done). On several hosts, process 0 trains the tokenizer while the others wait at a barrier, then every host
encodes its share of the shards into the shared folder and all meet at a barrier before reading; so the workdir
(or ``prepared_dir``) must be shared, as it is for checkpoints. Readers of a finished run (eval, translate) use
``load_run_tokenizer`` and ``build_eval_datasets``, which neither train a tokenizer nor touch the training split.
"""

import dataclasses
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping

import jax
import ml_collections
from etils import epath

from attn_jax import hosts
from attn_jax.data import sources as sources_lib
from attn_jax.data import tokenizer as tok
from attn_jax.data.pipeline import PipelineConfig, eval_batches, train_batches
from attn_jax.data.prepared import PreparedSplit, encode_split, load_split, prepared_key, shard_names

DATASETS = sources_lib.DATASETS
# Fields of config.data read with a default, so that configs saved before they existed still load.
_FIELD_DEFAULTS = {
    "packing": False,
    "worker_count": 0,
    "prepare_workers": 0,
    "examples_per_shard": 100_000,
    "prepared_dir": "",
    "in_memory_mb": 256,
} | sources_lib.FIELD_DEFAULTS
# Fields that change how fast data arrives, not which batches: left out of the fingerprint.
_RUNTIME_FIELDS = ("data_dir", "num_threads", "worker_count", "prepare_workers", "prepared_dir", "in_memory_mb")

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Prepared:
    """Stages 1-3 of the data path for a run (``prepare``'s result).

    Attributes:
      sources: the raw splits.
      tokenizer: the SentencePiece model, or None for token-id tasks (copy).
      vocab_size: the model's vocabulary size.
      splits: the prepared ids of each prepared split.
    """

    sources: Mapping
    tokenizer: object | None
    vocab_size: int
    splits: dict[str, PreparedSplit]


@dataclasses.dataclass
class Datasets:
    """What the training loop reads.

    Attributes:
      train: this host's training batches; ``get_state()``/``set_state()`` for checkpoints (None when built for
        evaluation only).
      eval_batches: a fresh single pass over this host's validation batches per call.
      tokenizer: the SentencePiece model, or None for token-id tasks (copy).
      vocab_size: the model's vocabulary size.
      validation_pairs / test_pairs: ``(source, reference)`` raw text (or id arrays for copy) for BLEU.
      batch_multiple: batch sizes are multiples of this.
      fingerprint: names the data, the tokenizer and the batching settings (stored in checkpoints).
      report: counts of what the pipeline dropped, truncated and padded (``padding_fraction``), and of the
        training texts that needed cleaning (invalid UTF-8, control characters): never silent.
    """

    train: Iterator[dict] | None
    eval_batches: Callable[[], Iterator[dict]]
    tokenizer: object | None
    vocab_size: int
    validation_pairs: list
    test_pairs: list
    batch_multiple: int
    fingerprint: str
    report: dict


def field(data: ml_collections.ConfigDict, name: str):
    """``data.name``, or its default for a config saved before the field existed."""
    return data.get(name, _FIELD_DEFAULTS.get(name))


def prepare(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    splits: tuple[str, ...] = ("train", "validation"),
    tokenizer=None,
    read_only: bool = False,
) -> Prepared:
    """Trains (or reuses) the run's tokenizer and encodes ``splits`` into prepared ids (or reuses them).

    Args:
      config: the experiment config (its ``data`` section).
      workdir: the run's directory, local or ``gs://`` (the tokenizer goes there, and the ids unless
        ``data.prepared_dir`` is set).
      splits: the splits to prepare (with ``"train"``, the ``"lexicon"`` too when the run mixes one in).
      tokenizer: use this tokenizer instead of training or loading the run's (readers pass the saved one).
      read_only: write nothing into the workdir: splits not prepared there yet are encoded into this machine's
        temp folder instead (for readers of a run, which never write into it).

    Returns:
      A ``Prepared``.
    """
    data = config.data
    sources = sources_lib.split_sources(data)
    if tokenizer is None and sources_lib.uses_tokenizer(data):
        tokenizer = _run_tokenizer(data, workdir, sources["train"])
    vocab_size = data.vocab_size if sources_lib.uses_tokenizer(data) else data.copy.vocab_size
    encoder = sources_lib.encoder(data, tokenizer)
    proto = tokenizer.serialized_model_proto() if tokenizer is not None else None
    root = epath.Path(field(data, "prepared_dir") or epath.Path(workdir) / "prepared")
    per_shard = field(data, "examples_per_shard")
    prepared = {}
    if "train" in splits and "lexicon" in sources:
        splits = (*splits, "lexicon")
    for split in splits:
        source = sources_lib.prepared_source(data, split, sources[split])
        key = prepared_key(sources_lib.identity(data, split, len(source)), tokenizer_proto=proto,
                           examples_per_shard=per_shard)  # fmt: skip
        directory = root / f"{split}-{key}"
        # Hosts share the work on the shared folder; a host writing into its own temp folder does all of it.
        host, hosts_count = jax.process_index(), jax.process_count()
        if read_only and not _complete(directory, len(source), per_shard):
            directory = epath.Path(tempfile.gettempdir(), "attn_jax_prepared", f"{split}-{key}")
            host, hosts_count = 0, 1
        encode_split(
            source, encoder, directory, vocab_size=vocab_size, examples_per_shard=per_shard,
            workers=field(data, "prepare_workers") or os.cpu_count() or 1, process_index=host,
            process_count=hosts_count,
        )  # fmt: skip
        hosts.barrier(f"prepared/{split}")  # every host has written its shards
        prepared[split] = load_split(directory, num_examples=len(source), examples_per_shard=per_shard)
        log.info("%s: %d pairs prepared in %s", split, len(source), directory)
    return Prepared(sources=sources, tokenizer=tokenizer, vocab_size=vocab_size, splits=prepared)


def _complete(directory: epath.Path, num_examples: int, examples_per_shard: int) -> bool:
    return all((directory / f"{name}.npz").exists() for name in shard_names(num_examples, examples_per_shard))


def _run_tokenizer(data, workdir, train_source):
    """Loads ``WORKDIR/tokenizer`` or trains it on a random sample of at most ``tokenizer_examples`` pairs."""
    keys = (data.source_key, data.target_key)
    model_dir = epath.Path(workdir) / tok.RUN_TOKENIZER_DIR

    def load_or_train():
        return tok.load_or_train_tokenizer(
            model_dir,
            lambda: tok.sample_texts(train_source, keys, max_examples=data.tokenizer_examples),
            vocab_size=data.vocab_size,
            model_type=data.tokenizer_type,
            max_sentences=0,  # all of the sample (already bounded by tokenizer_examples)
            user_defined_symbols=sources_lib.language_tags(data),
        )

    if jax.process_count() > 1:  # process 0 trains (or finds) the model in the shared workdir; the rest read it
        if jax.process_index() == 0:
            load_or_train()
        hosts.barrier("tokenizer")
    return load_or_train()


def build_datasets(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    batch_multiple: int = 1,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> Datasets:
    """Tokenizer, prepared ids and batches for ``config`` (its ``data`` section, ``task`` and ``seed``).

    Args:
      config: the experiment config.
      workdir: the run's directory (local or ``gs://``).
      batch_multiple: global batch sizes are made multiples of this (the number of batch shards).
      shard_index / shard_count: this host's data shard; default ``jax.process_index()/process_count()``.

    Returns:
      A ``Datasets``.
    """
    prepared = prepare(config, workdir)
    return _datasets(config, prepared, batch_multiple, shard_index, shard_count, train=True)


def build_eval_datasets(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    tokenizer=None,
    batch_multiple: int = 1,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> Datasets:
    """Validation batches and validation/test pairs of a run, for its readers (``train`` is None).

    It trains no tokenizer, never reads the training split and writes nothing into the workdir: the validation
    ids the run prepared are reused, or encoded into the temp folder. Other arguments as for ``build_datasets``.

    Args:
      tokenizer: the run's tokenizer when the caller has it; else it is read from the workdir.

    Raises:
      FileNotFoundError: a text data set and no tokenizer in the workdir.
    """
    if tokenizer is None and sources_lib.uses_tokenizer(config.data):
        tokenizer = tok.load_run_tokenizer(workdir)
    prepared = prepare(config, workdir, splits=("validation",), tokenizer=tokenizer, read_only=True)
    return _datasets(config, prepared, batch_multiple, shard_index, shard_count, train=False)


def _datasets(config, prepared: Prepared, batch_multiple, shard_index, shard_count, *, train: bool) -> Datasets:
    data = config.data
    shard = {
        "shard_index": jax.process_index() if shard_index is None else shard_index,
        "shard_count": jax.process_count() if shard_count is None else shard_count,
    }
    train_config = PipelineConfig(
        max_length=data.max_length, overlong=data.overlong, tokens_per_batch=data.tokens_per_batch,
        batch_multiple=batch_multiple, packing=field(data, "packing"), task=config.task, seed=config.seed,
        num_threads=data.num_threads, worker_count=field(data, "worker_count"),
        mix_ratio=field(data, "lexicon_ratio"), in_memory_bytes=field(data, "in_memory_mb") << 20,
    )  # fmt: skip
    eval_config = dataclasses.replace(train_config, tokens_per_batch=data.eval_tokens_per_batch, shuffle=False)
    validation = eval_batches(prepared.splits["validation"], eval_config, **shard)
    report = {"validation": dataclasses.asdict(validation.stats)}
    training = None
    if train:
        batches = train_batches(
            prepared.splits["train"], train_config, mixed_in=prepared.splits.get("lexicon"), **shard
        )
        training = _ModelBatches(batches.iterator())
        report = {"train": dataclasses.asdict(batches.stats) | prepared.splits["train"].issues} | report
    return Datasets(
        train=training,
        eval_batches=lambda: _ModelBatches(validation.iterator()),
        tokenizer=prepared.tokenizer,
        vocab_size=prepared.vocab_size,
        validation_pairs=sources_lib.text_pairs(prepared.sources["validation"], data),
        test_pairs=sources_lib.text_pairs(prepared.sources["test"], data),
        batch_multiple=batch_multiple,
        fingerprint=fingerprint(config, prepared.tokenizer),
        report=report,
    )


class _ModelBatches:
    """Keeps only the model's keys (drops ``example_index``) and forwards the iterator state."""

    def __init__(self, iterator):
        self._iterator = iterator

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._iterator)
        return {key: value for key, value in batch.items() if key != "example_index"}

    def get_state(self):
        return self._iterator.get_state()

    def set_state(self, state) -> None:
        self._iterator.set_state(state)

    def close(self) -> None:
        self._iterator.close()


def fingerprint(config: ml_collections.ConfigDict, tokenizer) -> str:
    """A short hash of the data settings that shape the batches, the task and the tokenizer model (checkpoints
    compare it; settings of speed alone, such as worker counts, are left out, and so are the options added since
    runs were first saved while they keep their neutral values, so a run's fingerprint does not change with them)."""
    settings = {k: v for k, v in config.data.to_dict().items() if k not in _RUNTIME_FIELDS}
    for name, neutral in sources_lib.FIELD_DEFAULTS.items():
        if settings.get(name, neutral) == neutral or (
            name == "lexicon_entries" and not sources_lib.uses_lexicon(config.data)
        ):
            settings.pop(name, None)
    digest = hashlib.sha256(ml_collections.ConfigDict(settings).to_json_best_effort(sort_keys=True).encode())
    digest.update(config.task.encode())
    if tokenizer is not None:
        digest.update(tokenizer.serialized_model_proto())
    return digest.hexdigest()[:16]
