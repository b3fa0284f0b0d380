"""Tests for attn_jax.evaluate.bleu against BLEU written from its definition (Papineni et al., 2002)."""

import collections
import math

import pytest

from attn_jax.evaluate import bleu


def _ngrams(words: list[str], n: int) -> collections.Counter:
    return collections.Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def _reference_bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU-4, one reference per sentence, whitespace tokens: brevity penalty x geometric mean of the
    clipped n-gram precisions, in percent."""
    matches, totals = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        h, r = hyp.split(), ref.split()
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for n in range(1, 5):
            hyp_counts, ref_counts = _ngrams(h, n), _ngrams(r, n)
            matches[n - 1] += sum(min(c, ref_counts[g]) for g, c in hyp_counts.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / 4
    brevity = min(0.0, 1 - ref_len / hyp_len)
    return 100 * math.exp(brevity + log_precision)


def test_bleu_matches_the_definition_on_a_small_corpus():
    hypotheses = ["the cat sat on the mat today", "there is a cat on the mat", "a b c d e"]
    references = ["the cat sat on a mat today", "the cat is on the mat", "a b c d e f g"]
    assert bleu(hypotheses, references) == pytest.approx(_reference_bleu(hypotheses, references), rel=1e-9)


def test_bleu_of_nothing_and_of_mismatched_lists_are_errors():
    with pytest.raises(ValueError, match="no sentences"):
        bleu([], [])
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        bleu(["a b", "c d"], ["a b"])
