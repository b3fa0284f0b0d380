"""The first stage: the data set a config names, as one random-access source per split.

``ding_en_de`` and ``wmt14_translate/de-en`` come through TFDS (ArrayRecord, read without TensorFlow), ``copy`` is
generated. A source's examples are ``{"en": bytes, "de": bytes}`` (or ``{"source": ids, "target": ids}``);
``encoder`` says how the next stage turns one into ids, and ``identity`` names what those ids depend on.

Two options add training pairs: ``data.lexicon_ratio > 0`` opens the Ding dictionary's entries as one more source,
``"lexicon"`` (mixed into the training pairs by the pipeline), and ``data.bidirectional`` prepares the training
pairs (and the lexicon's) in both directions (``prepared_source``); evaluation splits stay as they are.
"""

import os
from collections.abc import Mapping, Sequence

import grain
import ml_collections
import numpy as np

from attn_jax.data import ding, wmt14
from attn_jax.data import tokenizer as tok
from attn_jax.data.copy_task import CopySource
from attn_jax.data.encoding import BothDirections, TextPairEncoder, TokenPairEncoder, read_examples
from attn_jax.data.text import DataError, clean_text

DATASETS = ("ding_en_de", "wmt14_translate/de-en", "copy")
SPLITS = ("train", "validation", "test")
# Splits read for training: prepared in both directions when data.bidirectional is set.
TRAINING_SPLITS = ("train", "lexicon")
# Fields added after runs were saved, with the values that leave a run as it was.
FIELD_DEFAULTS = {"lexicon_ratio": 0.0, "lexicon_entries": "all", "bidirectional": False}
# The TFDS data dir when neither the config nor $TFDS_DATA_DIR names one (relative to the working directory).
DEFAULT_DATA_DIR = "data_cache/tfds"


def data_dir(data: ml_collections.ConfigDict) -> str:
    """``config.data.data_dir``, else ``$TFDS_DATA_DIR``, else ``DEFAULT_DATA_DIR``.

    Example:
      >>> data_dir(ml_collections.ConfigDict({"data_dir": "/data/tfds"}))
      '/data/tfds'
    """
    return data.data_dir or os.environ.get("TFDS_DATA_DIR") or DEFAULT_DATA_DIR


def field(data: ml_collections.ConfigDict, name: str):
    """``data.name``, or ``FIELD_DEFAULTS[name]`` for a config saved before the field existed."""
    return data.get(name, FIELD_DEFAULTS.get(name))


def uses_lexicon(data: ml_collections.ConfigDict) -> bool:
    """Whether training mixes dictionary entries into its pairs (``data.lexicon_ratio > 0``)."""
    return field(data, "lexicon_ratio") > 0


def split_sources(data: ml_collections.ConfigDict) -> Mapping[str, grain.sources.RandomAccessDataSource]:
    """``{"train", "validation", "test"}`` (and ``"lexicon"``, see ``uses_lexicon``) to random-access sources for
    ``config.data``.

    TFDS builds (downloads) the data set on first use; opening a source reads nothing else.
    """
    if data.name not in DATASETS:
        raise ValueError(f"config.data.name must be one of {DATASETS}, got {data.name!r}")
    if uses_lexicon(data) and data.name != "ding_en_de":
        raise ValueError(f"config.data.lexicon_ratio: only ding_en_de has a lexicon, not {data.name!r}")
    if field(data, "bidirectional") and not uses_tokenizer(data):
        raise ValueError(f"config.data.bidirectional: needs a text data set, not {data.name!r}")
    if data.name == "copy":
        return copy_sources(data.copy)
    if data.name == "ding_en_de":
        lexicon = field(data, "lexicon_entries") if uses_lexicon(data) else None
        return ding.ding_sources(
            data_dir(data), phrases=data.phrases, lexicon=lexicon, ding_file=data.ding_file or None
        )
    return wmt14.wmt14_sources(data_dir(data))


def prepared_source(
    data: ml_collections.ConfigDict, split: str, source: grain.sources.RandomAccessDataSource
) -> grain.sources.RandomAccessDataSource:
    """What preparation encodes for ``split``: with ``data.bidirectional``, the training splits' examples in both
    directions (``BothDirections``: all forward, then all reversed); else ``source`` itself."""
    return BothDirections(source) if field(data, "bidirectional") and split in TRAINING_SPLITS else source


def language_tags(data: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The tokenizer's language tags (``tokenizer.language_tags``) when training in both directions, else ()."""
    return tok.language_tags(data.source_key, data.target_key) if field(data, "bidirectional") else ()


def copy_sources(copy: ml_collections.ConfigDict) -> dict[str, CopySource]:
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


def uses_tokenizer(data: ml_collections.ConfigDict) -> bool:
    """Text data sets share a SentencePiece model; the copy task's examples are ids already."""
    return data.name != "copy"


def encoder(data: ml_collections.ConfigDict, tokenizer) -> TextPairEncoder | TokenPairEncoder:
    """``example -> (source ids, target ids, text issues)`` for ``config.data``'s examples."""
    if not uses_tokenizer(data):
        return TokenPairEncoder("source", "target")
    return TextPairEncoder(tokenizer, data.source_key, data.target_key, invalid_utf8=data.invalid_utf8)


def identity(data: ml_collections.ConfigDict, split: str, num_examples: int) -> dict:
    """What a split's prepared ids depend on besides the tokenizer (the fields that change the examples or how
    text becomes ids; batching settings do not)."""
    fields = {"name": data.name, "split": split, "num_examples": num_examples}
    if data.name == "copy":
        return fields | {"copy": data.copy.to_dict()}
    fields |= {"keys": [data.source_key, data.target_key], "invalid_utf8": data.invalid_utf8}
    if split == "lexicon":
        fields["lexicon_entries"] = field(data, "lexicon_entries")
    if field(data, "bidirectional") and split in TRAINING_SPLITS:
        fields["bidirectional"] = True  # (absent otherwise, so the ids of earlier runs keep their names)
    return fields | ({"phrases": data.phrases} if data.name == "ding_en_de" else {})


def text_pairs(source: grain.sources.RandomAccessDataSource, data: ml_collections.ConfigDict) -> list:
    """Every example of a split as ``(source, reference)``: cleaned text, or id arrays for the copy task.

    Raises:
      DataError: a text cannot be decoded under ``invalid_utf8="error"``; names the record and feature.
    """
    examples = read_examples(source, list(range(len(source))))
    if not uses_tokenizer(data):
        return [(np.asarray(e["source"], np.int32), np.asarray(e["target"], np.int32)) for e in examples]
    keys: Sequence[str] = (data.source_key, data.target_key)
    return [tuple(_text(e, key, index, data) for key in keys) for index, e in enumerate(examples)]


def _text(example, key: str, index: int, data) -> str:
    try:
        return clean_text(example[key], invalid_utf8=data.invalid_utf8)[0]
    except DataError as error:
        raise DataError(f"{data.name}: record {index}, feature {key!r}: {error}") from None
