"""From examples to token-id pairs: the encoders the pipeline calls, and a pass that measures lengths.

An encoder turns one example of a data source into ``(source ids [S], target ids [T])`` without special
ids: ``text_pair_encoder`` tokenizes text features (TFDS translation examples), ``token_pair_encoder``
reads examples that hold ids already (``CopySource``).
"""

import collections
import functools
import json
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import grain
import numpy as np
import sentencepiece as spm

from attn_jax.data.text import DataError, clean_text
from attn_jax.data.tokenizer import encode

PairEncoder = Callable[[Any], tuple[np.ndarray, np.ndarray]]
# Examples read per call while measuring lengths.
_READ_CHUNK = 1024


def text_pair_encoder(
    tokenizer: spm.SentencePieceProcessor,
    source_key: str = "en",
    target_key: str = "de",
    *,
    invalid_utf8: str = "replace",
) -> "TextPairEncoder":
    """Encodes ``{source_key: text, target_key: text}`` examples (e.g. TFDS translation examples).

    Args:
      tokenizer: the shared SentencePiece model.
      source_key: feature holding the source text.
      target_key: feature holding the target text.
      invalid_utf8: ``"replace"`` or ``"error"`` (see ``clean_text``); control characters become spaces.

    Returns:
      ``example -> (source ids [S], target ids [T])``, without special ids; its ``text_issues(example)``
      names what cleaning fixed, for the data report.
    """
    return TextPairEncoder(tokenizer, source_key, target_key, invalid_utf8)


class TextPairEncoder:
    """See ``text_pair_encoder``. A class (not a closure) so that Grain can pickle it into worker processes."""

    def __init__(self, tokenizer: spm.SentencePieceProcessor, source_key: str, target_key: str, invalid_utf8: str):
        self.tokenizer, self.keys, self.invalid_utf8 = tokenizer, (source_key, target_key), invalid_utf8

    def __call__(self, example: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        source, target = (self._clean(example, key)[0] for key in self.keys)
        return encode(self.tokenizer, source), encode(self.tokenizer, target)

    def text_issues(self, example: Mapping[str, Any]) -> set[str]:
        return {issue for key in self.keys for issue in self._clean(example, key)[1]}

    def _clean(self, example, key: str) -> tuple[str, tuple[str, ...]]:
        try:
            return clean_text(example[key], invalid_utf8=self.invalid_utf8)
        except DataError as error:
            raise DataError(f"feature {key!r}: {error}") from None


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


def measure_lengths(
    source: grain.sources.RandomAccessDataSource,
    encode_pair: PairEncoder,
    *,
    issues: collections.Counter | None = None,
) -> np.ndarray:
    """Token counts of every example, special ids excluded.

    Args:
      source: random-access examples.
      encode_pair: turns an example into ``(source ids, target ids)``.
      issues: when given, gains one count per example for each text issue it had (``TextPairEncoder``).

    Returns:
      ``int64`` array ``[N, 2]``: source and target lengths.

    Raises:
      DataError: an example cannot be encoded; the message names its record index and the source.

    Example:
      >>> measure_lengths([{"source": [5, 6, 7], "target": [8]}], token_pair_encoder()).tolist()
      [[3, 1]]
    """
    lengths = np.zeros((len(source), 2), dtype=np.int64)
    text_issues = getattr(encode_pair, "text_issues", None) if issues is not None else None
    for start in range(0, len(source), _READ_CHUNK):
        indices = list(range(start, min(start + _READ_CHUNK, len(source))))
        for index, example in zip(indices, read_examples(source, indices), strict=True):
            try:
                source_ids, target_ids = encode_pair(example)
            except DataError as error:
                raise DataError(f"record {index} of {_describe(source)}: {error}") from None
            lengths[index] = len(source_ids), len(target_ids)
            if text_issues is not None:
                issues.update(text_issues(example))
    return lengths


def load_or_measure_lengths(
    path: str | os.PathLike,
    source: grain.sources.RandomAccessDataSource,
    encode_pair: PairEncoder,
    *,
    fingerprint: str,
    issues: collections.Counter | None = None,
) -> np.ndarray:
    """``measure_lengths``, saved to ``path`` (``.npz``) and read back on later runs.

    A pass over WMT14 takes minutes, so a resumed run reads the lengths (and the text issue counts) instead.
    They are reused only when ``fingerprint`` and the number of examples match what was saved.

    Args:
      path: file to keep the lengths in, e.g. ``workdir/lengths_train.npz``.
      source: random-access examples.
      encode_pair: turns an example into ``(source ids, target ids)``.
      fingerprint: names everything the lengths depend on, e.g. dataset, version, split and a hash of the
        tokenizer model.
      issues: as for ``measure_lengths`` (filled from the file when the lengths are read back).

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
    issues = collections.Counter() if issues is None else issues
    path = pathlib.Path(path)
    if path.is_file():
        with np.load(path) as saved:
            if str(saved["fingerprint"]) == fingerprint and len(saved["lengths"]) == len(source):
                issues.update(json.loads(str(saved["issues"])) if "issues" in saved else {})
                return saved["lengths"]
    lengths = measure_lengths(source, encode_pair, issues=issues)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f"{path.name}.tmp{os.getpid()}.npz")
    np.savez(scratch, lengths=lengths, fingerprint=np.asarray(fingerprint), issues=np.asarray(json.dumps(issues)))
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


def _describe(source) -> str:
    """A short name for a data source in error messages (TFDS sources name their data set and split)."""
    text = repr(source) if not isinstance(source, list | tuple) else f"a list of {len(source)} examples"
    return text if len(text) <= 200 else text[:197] + "..."


def _read_token_pair(source_key: str, target_key: str, example: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(example[source_key], np.int32), np.asarray(example[target_key], np.int32)
