"""A synthetic copy task: random token sequences whose target is the source itself, or its reverse.

It needs no files and no tokenizer, so tests and the tiny experiment can train end to end on it (the
Annotated Transformer's first sanity check). Examples are already token ids; feed them to the pipeline
with ``attn_jax.data.encoding.token_pair_encoder()``.
"""

import dataclasses

import numpy as np

from attn_jax.data.tokenizer import UNK_ID

# Ids below this are special (pad, eos, bos, unk); the task draws real tokens only.
FIRST_TOKEN_ID = UNK_ID + 1


@dataclasses.dataclass(frozen=True)
class CopySource:
    """A random-access source of ``{"source": ids, "target": ids}`` examples.

    Example ``i`` is drawn from ``seed`` and ``i`` alone, so any example can be read in any order, and two
    sources with the same fields hold the same data.

    Attributes:
      num_examples: number of examples.
      vocab_size: ids are drawn from ``[FIRST_TOKEN_ID, vocab_size)``.
      min_length: shortest sequence.
      max_length: longest sequence.
      reverse: the target is the reversed source instead of a copy.
      seed: seed of the data.

    Example:
      >>> source = CopySource(num_examples=3, vocab_size=10, min_length=2, max_length=4, reverse=True)
      >>> example = source[1]
      >>> bool((example["target"] == example["source"][::-1]).all()), len(source)
      (True, 3)
    """

    num_examples: int
    vocab_size: int
    min_length: int = 1
    max_length: int = 16
    reverse: bool = False
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError(f"need 1 <= min_length <= max_length, got {self.min_length}, {self.max_length}")
        if self.vocab_size <= FIRST_TOKEN_ID:
            raise ValueError(f"vocab_size must exceed {FIRST_TOKEN_ID} (the special ids), got {self.vocab_size}")

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        rng = np.random.default_rng([self.seed, index])
        length = int(rng.integers(self.min_length, self.max_length + 1))
        source = rng.integers(FIRST_TOKEN_ID, self.vocab_size, size=length).astype(np.int32)
        target = source[::-1].copy() if self.reverse else source.copy()
        return {"source": source, "target": target}
