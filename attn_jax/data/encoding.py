"""From examples to token-id pairs: the encoders the pipeline calls, and a pass that measures lengths.

An encoder turns one example of a data source into ``(source ids [S], target ids [T])`` without special
ids: ``text_pair_encoder`` tokenizes text features (TFDS translation examples), ``token_pair_encoder``
reads examples that hold ids already (``CopySource``).
"""

import functools
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import grain
import numpy as np
import sentencepiece as spm

from attn_jax.data.tokenizer import encode

PairEncoder = Callable[[Any], tuple[np.ndarray, np.ndarray]]
# Examples read per call while measuring lengths.
_READ_CHUNK = 1024


def text_pair_encoder(
    tokenizer: spm.SentencePieceProcessor, source_key: str = "en", target_key: str = "de"
) -> PairEncoder:
    """Encodes ``{source_key: text, target_key: text}`` examples (e.g. TFDS translation examples).

    Args:
      tokenizer: the shared SentencePiece model.
      source_key: feature holding the source text.
      target_key: feature holding the target text.

    Returns:
      ``example -> (source ids [S], target ids [T])``, without special ids.
    """
    return functools.partial(_encode_text_pair, tokenizer, source_key, target_key)


def token_pair_encoder(source_key: str = "source", target_key: str = "target") -> PairEncoder:
    """Reads examples that already hold token ids (e.g. ``CopySource``).

    Args:
      source_key: feature holding the source ids.
      target_key: feature holding the target ids.

    Returns:
      ``example -> (source ids [S], target ids [T])``.

    Example:
      >>> token_pair_encoder()({"source": [5, 6], "target": [7]})
      (array([5, 6], dtype=int32), array([7], dtype=int32))
    """
    return functools.partial(_read_token_pair, source_key, target_key)


def measure_lengths(source: grain.sources.RandomAccessDataSource, encode_pair: PairEncoder) -> np.ndarray:
    """Token counts of every example, special ids excluded.

    Args:
      source: random-access examples.
      encode_pair: turns an example into ``(source ids, target ids)``.

    Returns:
      ``int64`` array ``[N, 2]``: source and target lengths.

    Example:
      >>> measure_lengths([{"source": [5, 6, 7], "target": [8]}], token_pair_encoder()).tolist()
      [[3, 1]]
    """
    lengths = np.zeros((len(source), 2), dtype=np.int64)
    for start in range(0, len(source), _READ_CHUNK):
        indices = list(range(start, min(start + _READ_CHUNK, len(source))))
        for index, example in zip(indices, read_examples(source, indices), strict=True):
            source_ids, target_ids = encode_pair(example)
            lengths[index] = len(source_ids), len(target_ids)
    return lengths


def load_or_measure_lengths(
    path: str | os.PathLike,
    source: grain.sources.RandomAccessDataSource,
    encode_pair: PairEncoder,
    *,
    fingerprint: str,
) -> np.ndarray:
    """``measure_lengths``, saved to ``path`` (``.npz``) and read back on later runs.

    A pass over WMT14 takes minutes, so a resumed run reads the lengths instead. They are reused only when
    ``fingerprint`` and the number of examples match what was saved.

    Args:
      path: file to keep the lengths in, e.g. ``workdir/lengths_train.npz``.
      source: random-access examples.
      encode_pair: turns an example into ``(source ids, target ids)``.
      fingerprint: names everything the lengths depend on, e.g. dataset, version, split and a hash of the
        tokenizer model.

    Returns:
      ``int64`` array ``[N, 2]``, as ``measure_lengths``.

    Example:
      >>> import tempfile, pathlib
      >>> path = pathlib.Path(tempfile.mkdtemp(), "lengths.npz")
      >>> examples = [{"source": [5, 6], "target": [7]}]
      >>> load_or_measure_lengths(path, examples, token_pair_encoder(), fingerprint="a").tolist()
      [[2, 1]]
      >>> load_or_measure_lengths(path, [], token_pair_encoder(), fingerprint="a").shape  # size differs
      (0, 2)
    """
    path = pathlib.Path(path)
    if path.is_file():
        with np.load(path) as saved:
            if str(saved["fingerprint"]) == fingerprint and len(saved["lengths"]) == len(source):
                return saved["lengths"]
    lengths = measure_lengths(source, encode_pair)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f"{path.name}.tmp{os.getpid()}.npz")
    np.savez(scratch, lengths=lengths, fingerprint=np.asarray(fingerprint))
    os.replace(scratch, path)  # atomic: a concurrent reader never sees half a file
    return lengths


def read_examples(source: grain.sources.RandomAccessDataSource, indices: list[int]) -> list[Any]:
    """Reads several examples, in one call when the source can (3x faster for TFDS ArrayRecord sources).

    Args:
      source: random-access examples.
      indices: which ones.

    Returns:
      The examples, in the order of ``indices``.

    Example:
      >>> read_examples(["a", "b", "c"], [2, 0])
      ['c', 'a']
    """
    read_many = getattr(source, "__getitems__", None)
    return list(read_many(indices)) if read_many else [source[index] for index in indices]


def _encode_text_pair(
    tokenizer: spm.SentencePieceProcessor, source_key: str, target_key: str, example: Mapping[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    return encode(tokenizer, example[source_key]), encode(tokenizer, example[target_key])


def _read_token_pair(source_key: str, target_key: str, example: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(example[source_key], np.int32), np.asarray(example[target_key], np.int32)
