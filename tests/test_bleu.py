"""The paper's tokenized, compound-split BLEU against n-gram counts worked out by hand, and the newstest2014 subset."""

import math

import pytest

from attn_jax import bleu

# Moses splits the final period, keeps the hyphenated word; compound splitting then gives 9 tokens each:
#   Die Nord ##AT##-##AT## Süd ##AT##-##AT## Verbindung ist {schlecht|gut} .
_COMPOUND = ("Die Nord-Süd-Verbindung ist schlecht.", "Die Nord-Süd-Verbindung ist gut.")
# 3 hypothesis tokens against 5 reference tokens: "Es regnet ." / "Es regnet heute stark ."
_SHORT = ("Es regnet.", "Es regnet heute stark.")


def test_one_sentence_by_hand():
    # Matches / n-grams: 1-grams 8/9, 2-grams 6/8, 3-grams 5/7, 4-grams 4/6 (all but those holding "schlecht");
    # equal lengths, so no brevity penalty.
    expected = 100 * (8 / 9 * 6 / 8 * 5 / 7 * 4 / 6) ** 0.25
    assert bleu.tokenized_bleu([_COMPOUND[0]], [_COMPOUND[1]]) == pytest.approx(expected, abs=1e-9)
    # Unsplit: "Die Nord-Süd-Verbindung ist schlecht ." has no matching 4-gram, and multi-bleu.perl does not smooth.
    assert bleu.tokenized_bleu([_COMPOUND[0]], [_COMPOUND[1]], split_compounds=False) == 0.0


def test_corpus_counts_and_brevity_penalty_by_hand():
    hypotheses, references = [_COMPOUND[0], _SHORT[0]], [_COMPOUND[1], _SHORT[1]]
    # n-gram matches summed over both sentences: (8 + 3)/(9 + 3), (6 + 1)/(8 + 2), (5 + 0)/(7 + 1), (4 + 0)/(6 + 0);
    # 12 hypothesis tokens against 14 reference tokens: brevity penalty exp(1 - 14/12).
    precisions = (11 / 12, 7 / 10, 5 / 8, 4 / 6)
    expected = 100 * math.exp(1 - 14 / 12) * math.exp(sum(map(math.log, precisions)) / 4)
    assert bleu.tokenized_bleu(hypotheses, references) == pytest.approx(expected, abs=1e-9)


def test_compound_splitting_follows_perl_substitution():
    assert bleu.compound_split("Ost-West a-b-c - x- -y") == "Ost ##AT##-##AT## West a ##AT##-##AT## b-c - x- -y"


def test_identical_text_scores_100_whatever_the_quotes_and_escapes():
    text = ["„Sie sagte: “Das ist 3-mal so teuer & 50% mehr”, oder?“"]
    assert bleu.tokenized_bleu(text, text) == pytest.approx(100.0)
    assert bleu.bleu(text, text) == pytest.approx(100.0)
    assert bleu.tokenized_bleu(['Er sagte "ja".'], ["Er sagte “ja”."]) == pytest.approx(100.0)
    assert "&amp;" in bleu.moses_tokenize(text[0])  # tokenizer.perl's default escaping, on both sides alike


def test_mismatched_lengths_and_empty_input_are_errors():
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        bleu.tokenized_bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no sentences"):
        bleu.tokenized_bleu([], [])


def test_filtered_newstest2014_is_found_in_the_sacrebleu_cache_only(tmp_path):
    full = ["A.", "B.", "A.", "C.", "D."]
    assert bleu.newstest2014_filtered(full, tmp_path) is None  # nothing downloaded: nothing scored
    (tmp_path / "wmt14").mkdir()
    (tmp_path / "wmt14" / "en-de.en").write_text("A.\nA.\nD.\n", encoding="utf-8")
    assert bleu.newstest2014_filtered(full, tmp_path) == [0, 2, 4]
    with pytest.raises(ValueError, match="not in the given test set"):
        bleu.newstest2014_filtered(full[:3], tmp_path)
