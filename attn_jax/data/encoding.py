"""From examples to token-id pairs: the encoders that preparation (``attn_jax.data.prepare``) runs once per pair.

An encoder turns one example of a data source into ``(source ids [S], target ids [T], text issues)`` without
special ids: ``TextPairEncoder`` cleans and tokenizes text features (TFDS translation examples) and names what
cleaning fixed; ``TokenPairEncoder`` reads examples that hold ids already (``CopySource``). Both are plain
picklable objects, so preparation can run them in worker processes.

Training in both directions (``config.data.bidirectional``) reads the training split through ``BothDirections``:
every example once as it is, then once marked ``REVERSED``, which ``TextPairEncoder`` encodes the other way round
(German source, English target) behind the other language tag (``tokenizer.SourceEncoder``).
"""

from collections.abc import Mapping
from typing import Any

import grain
import numpy as np
import sentencepiece as spm

from attn_jax.data.text import DataError, clean_text
from attn_jax.data.tokenizer import SourceEncoder, encode

Encoded = tuple[np.ndarray, np.ndarray, tuple[str, ...]]
# The feature ``BothDirections`` adds to the examples it reverses.
REVERSED = "_reversed"


class TextPairEncoder:
    """Cleans and tokenizes ``{source_key: text, target_key: text}`` examples (e.g. TFDS translation examples).

    Args:
      tokenizer: the shared SentencePiece model.
      source_key: feature holding the source text.
      target_key: feature holding the target text.
      invalid_utf8: ``"replace"`` or ``"error"`` (see ``clean_text``); control characters become spaces.

    Calling it on an example returns ``(source ids [S], target ids [T], issues)``: the ids without special ids
    (the source led by its language tag when the tokenizer has tags, see ``SourceEncoder``), and which of
    ``TEXT_ISSUES`` cleaning fixed in either side. An example marked ``REVERSED`` (``BothDirections``) is encoded
    from ``target_key`` to ``source_key``. A class (not a closure) so that it pickles into worker processes (a
    SentencePiece model pickles as its serialized proto).
    """

    def __init__(
        self,
        tokenizer: spm.SentencePieceProcessor,
        source_key: str = "en",
        target_key: str = "de",
        *,
        invalid_utf8: str = "replace",
    ):
        self.tokenizer, self.keys, self.invalid_utf8 = tokenizer, (source_key, target_key), invalid_utf8
        self._sources: dict[bool, SourceEncoder] = {False: SourceEncoder(tokenizer)}

    def __call__(self, example: Mapping[str, Any]) -> Encoded:
        reverse = bool(example.get(REVERSED, False))
        keys = self.keys[::-1] if reverse else self.keys
        (source, source_issues), (target, target_issues) = (self._clean(example, key) for key in keys)
        issues = tuple(sorted(set(source_issues) | set(target_issues)))
        if reverse not in self._sources:
            self._sources[reverse] = SourceEncoder(self.tokenizer, reverse=reverse)
        return self._sources[reverse](source), encode(self.tokenizer, target), issues

    def _clean(self, example, key: str) -> tuple[str, tuple[str, ...]]:
        try:
            return clean_text(example[key], invalid_utf8=self.invalid_utf8)
        except DataError as error:
            raise DataError(f"feature {key!r}: {error}") from None


class TokenPairEncoder:
    """Reads examples that already hold token ids (e.g. ``CopySource``): ``(source ids, target ids, ())``.

    Example:
      >>> TokenPairEncoder()({"source": [5, 6], "target": [7]})
      (array([5, 6], dtype=int32), array([7], dtype=int32), ())
    """

    def __init__(self, source_key: str = "source", target_key: str = "target"):
        self.keys = (source_key, target_key)

    def __call__(self, example: Mapping[str, Any]) -> Encoded:
        return np.asarray(example[self.keys[0]], np.int32), np.asarray(example[self.keys[1]], np.int32), ()


class BothDirections:
    """A random-access source holding every example of ``source`` twice: examples ``0..N-1`` as they are, then
    ``N..2N-1`` the same ones marked ``REVERSED`` (for ``TextPairEncoder``: translated the other way round).

    Example:
      >>> both = BothDirections([{"en": b"Hi."}])
      >>> len(both), both[0], both[1]
      (2, {'en': b'Hi.'}, {'en': b'Hi.', '_reversed': True})
    """

    def __init__(self, source: grain.sources.RandomAccessDataSource):
        self.source = source

    def __len__(self) -> int:
        return 2 * len(self.source)

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        count = len(self.source)
        if any(not 0 <= index < 2 * count for index in indices):
            raise IndexError(f"indices out of range for {2 * count} examples")
        examples = read_examples(self.source, [index % count for index in indices])
        return [e if index < count else {**e, REVERSED: True} for index, e in zip(indices, examples, strict=True)]

    def __repr__(self) -> str:
        return f"BothDirections({describe(self.source)})"


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


def describe(source) -> str:
    """A short name for a data source in error messages (TFDS sources name their data set and split)."""
    text = repr(source) if not isinstance(source, list | tuple) else f"a list of {len(source)} examples"
    return text if len(text) <= 200 else text[:197] + "..."
