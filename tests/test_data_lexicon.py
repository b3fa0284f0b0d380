"""The Ding dictionary's word and phrase entries as a source of their own: what the parser keeps, and that no
entry reveals a validation or test sentence, through the parser and through the real TFDS builder."""

import numpy as np
import pytest

from attn_jax.data import ding, ding_parser
from attn_jax.data.ding_parser import DingPair
from tests.test_data import _HANDWRITTEN, _PHRASES, _SENTENCES

# What words=True adds to the hand-written lines of test_data: headwords and inflections (tagged), and a tagged
# exclamation that is one word in German; not templates ("jdm. etw. verwehren"), ellipses, or phrases.
_WORDS = [
    DingPair("sunburn", "Sonnenbrand", "word"),
    DingPair("sunburns", "Sonnenbrandände", "word"),
    DingPair("I see!", "Aha!", "word"),
    DingPair("A and B horizons", "A- und B-Boden", "word"),
]


def _key(text: str) -> str:
    """The test's own normalisation: case and everything but letters and digits ignored."""
    return "".join(char for char in text.lower() if char.isalnum())


def test_words_are_headwords_and_inflections_and_leave_sentences_and_phrases_as_they_were():
    pairs, stats = ding_parser.parse_ding(_HANDWRITTEN, words=True)
    assert [p for p in pairs if p.kind == "word"] == _WORDS
    assert [p for p in pairs if p.kind == "sentence"] == _SENTENCES
    assert (stats.words, stats.phrases, stats.duplicates) == (4, 0, 2)  # "Sonnenbrand {m}" comes twice
    everything, _ = ding_parser.parse_ding(_HANDWRITTEN, phrases=True, words=True)
    assert [p for p in everything if p.kind == "phrase"] == _PHRASES
    assert [p for p in everything if p.kind == "word"] == _WORDS


def test_no_entry_shares_a_side_with_a_held_out_sentence():
    held_out = [DingPair("Revenge is sweet.", "Rache ist süß.", "sentence")]
    entries = [
        DingPair("revenge is sweet", "Rache ist süß", "phrase"),  # the sentence without its punctuation
        DingPair("REVENGE, is sweet", "Vergeltung ist süß", "phrase"),  # the English side only
        DingPair("sweet revenge", "rache ist SÜSS", "phrase"),  # German only, up to case (ß folds to ss)
        DingPair("sweet revenge", "Rache ist süß!", "phrase"),  # German only
        DingPair("sweet revenge", "süße Rache", "phrase"),  # another phrase of the same words
        DingPair("revenge", "Rache", "word"),  # a word of the sentence: what the lexicon is for
        DingPair("Revenge is sweet.", "Rache ist süß.", "sentence"),  # sentences are not entries
    ]
    splits = ding_parser.lexicon_splits(entries, held_out)
    assert splits == {
        "lexicon_words": [DingPair("revenge", "Rache", "word")],
        "lexicon_phrases": [DingPair("sweet revenge", "süße Rache", "phrase")],
    }


def _lexicon_lines(count: int) -> list[bytes]:
    """Entries in the Ding format: a headword, a sentence, the sentence again as a phrase (lower case, no final
    stop), another phrase, and on a line of its own a phrase sharing only the sentence's German side."""
    lines = []
    for i in range(count):
        lines.append(
            f"Wort{i} {{n}} | Das ist Satz Nummer {i}. | das ist Satz Nummer {i} | Satz Nummer {i} hier :: "
            f"word{i} | This is sentence number {i}. | this is sentence number {i} | sentence number {i} here".encode()
        )
        lines.append(f"Das ist Satz Nummer {i} :: it is the sentence numbered {i}".encode())
    return lines


def test_the_tfds_lexicon_config_keeps_the_sentence_splits_and_holds_no_held_out_sentence(tmp_path):
    path = tmp_path / "de-en"
    path.write_bytes(b"\n".join(_lexicon_lines(300)) + b"\n")
    data_dir = tmp_path / "tfds"
    lexicon = ding.ding_sources(data_dir, lexicon="all", ding_file=path, cache_dir=None)
    plain = ding.ding_sources(data_dir, ding_file=path, cache_dir=None)
    assert (data_dir / "ding_en_de/sentences_and_lexicon/1.0.0").is_dir()

    def read(source) -> list[tuple[str, str]]:
        return [(e["en"].decode(), e["de"].decode()) for e in source.__getitems__(list(range(len(source))))]

    for split in ding_parser.SPLITS:  # the same sentences, split alike, as the default config
        assert sorted(read(lexicon[split])) == sorted(read(plain[split]))
    held_out = read(lexicon["validation"]) + read(lexicon["test"])
    assert 10 <= len(held_out) <= 60  # about 10% of 300
    entries = read(lexicon["lexicon"])
    held_en, held_de = {_key(en) for en, _ in held_out}, {_key(de) for _, de in held_out}
    assert not [(en, de) for en, de in entries if _key(en) in held_en or _key(de) in held_de]
    # What goes is exactly the held-out sentences' look-alikes: two phrases per held-out sentence.
    numbers = {int(en.rsplit(" ", 1)[1].rstrip(".")) for en, _ in held_out}
    expected = {(f"word{i}", f"Wort{i}") for i in range(300)} | {
        (f"sentence number {i} here", f"Satz Nummer {i} hier") for i in range(300)
    }  # fmt: skip
    for i in set(range(300)) - numbers:
        expected |= {(f"this is sentence number {i}", f"das ist Satz Nummer {i}"),
                     (f"it is the sentence numbered {i}", f"Das ist Satz Nummer {i}")}  # fmt: skip
    assert sorted(entries) == sorted(expected)
    # One kind alone: the words are the tagged headwords.
    words = ding.ding_sources(data_dir, lexicon="words", ding_file=path, cache_dir=None)["lexicon"]
    assert sorted(read(words)) == sorted((f"word{i}", f"Wort{i}") for i in range(300))
    assert np.all([not ding_parser.is_sentence(en) for en, _ in entries])


def test_lexicon_and_phrases_exclude_each_other():
    with pytest.raises(ValueError, match="exclude each other"):
        ding.ding_sources("/nowhere", phrases=True, lexicon="all", cache_dir=None)
    with pytest.raises(ValueError, match="lexicon must be one of"):
        ding.ding_sources("/nowhere", lexicon="verbs", cache_dir=None)
