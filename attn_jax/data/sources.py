"""The first stage: the data set a config names, as one random-access source per split.

``ding_en_de`` and ``wmt14_translate/de-en`` come through TFDS (ArrayRecord, read without TensorFlow), ``copy`` is
generated. A source's examples are ``{"en": bytes, "de": bytes}`` (or ``{"source": ids, "target": ids}``);
``encoder`` says how the next stage turns one into ids, and ``identity`` names what those ids depend on.
"""

import os
from collections.abc import Mapping, Sequence

import grain
import ml_collections
import numpy as np

from attn_jax.data import ding, wmt14
from attn_jax.data.copy_task import CopySource
from attn_jax.data.encoding import TextPairEncoder, TokenPairEncoder, read_examples
from attn_jax.data.text import DataError, clean_text

DATASETS = ("ding_en_de", "wmt14_translate/de-en", "copy")
SPLITS = ("train", "validation", "test")
# The TFDS data dir when neither the config nor $TFDS_DATA_DIR names one (relative to the working directory).
DEFAULT_DATA_DIR = "data_cache/tfds"


def data_dir(data: ml_collections.ConfigDict) -> str:
    """``config.data.data_dir``, else ``$TFDS_DATA_DIR``, else ``DEFAULT_DATA_DIR``.

    Example:
      >>> data_dir(ml_collections.ConfigDict({"data_dir": "/data/tfds"}))
      '/data/tfds'
    """
    return data.data_dir or os.environ.get("TFDS_DATA_DIR") or DEFAULT_DATA_DIR


def split_sources(data: ml_collections.ConfigDict) -> Mapping[str, grain.sources.RandomAccessDataSource]:
    """``{"train", "validation", "test"}`` to random-access sources for ``config.data``.

    TFDS builds (downloads) the data set on first use; opening a source reads nothing else.
    """
    if data.name not in DATASETS:
        raise ValueError(f"config.data.name must be one of {DATASETS}, got {data.name!r}")
    if data.name == "copy":
        return copy_sources(data.copy)
    if data.name == "ding_en_de":
        return ding.ding_sources(data_dir(data), phrases=data.phrases, ding_file=data.ding_file or None)
    return wmt14.wmt14_sources(data_dir(data))


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
