"""Sentence pairs from the Ding German-English dictionary (Debian's ``trans-de-en``, file ``de-en``).

The file has one entry per line, ``GERMAN :: ENGLISH``; ``#`` lines are comments. Each side holds
sub-entries separated by `` | `` that align one to one across the sides (a headword, its plural, then
usage examples). A sub-entry holds synonyms separated by ``;``, any of which translates any synonym on
the other side. Markup decorates the words::

    Sonnenbrand {m} [med.] | Haben Sie etwas gegen Sonnenbrand? :: sunburn | Have you anything for sunburn?

Cleaning, decided per kind of markup:

* ``{m}``, ``{vt}``, ``{prp; +Dat.}``: grammar tags, removed.
* ``[coll.]``, ``[Br.]``, ``[med.]``: usage and domain labels, removed.
* ``<Aalmolch>``: search keys and alternative spellings, removed.
* ``(that)``, ``(Bibelzitat)``: optional words or explanations, removed (innermost first, so nested
  parentheses go too). Dropping an optional word leaves a correct sentence ("Do you suppose he will
  accept the offer?"); keeping it would leave brackets in the text.
* `` /RTM/ ``: a standalone abbreviation, removed.
* ``a/b`` and ``a / b`` inside a sentence: inline alternatives, **kept**. Their scope is ambiguous
  ("von selbst/von alleine"), so any rewrite would break some sentences; a sentence with a slash is
  still a faithful translation with the alternatives spelled out.
* Markup is removed before splitting on ``;``, because tags such as ``{prp; +Dat.}`` hold semicolons.
  A synonym with an unbalanced bracket left over is rejected.

A sub-entry gives one pair: the first synonym on each side that is a full sentence (``is_sentence``).
With ``phrases=True`` a sub-entry without such a pair gives its first synonyms instead when it is a usage
example: both sides have at least two words, the German side carries no grammar tag (tagged sub-entries
are headwords and their inflections, e.g. "Aalsuppe {f}"), and neither side is a template with
placeholders ("jdm. etw. verwehren"). This gives phrases such as "Sonnenbrand bekommen :: to get
sunburn". With ``words=True`` the other sub-entries give their first synonyms as word pairs: headwords and
their inflections (a grammar-tagged German side, e.g. "Sonnenbrand {m} :: sunburn", "Abholorte {pl} ::
collection locations") and untagged sub-entries with a one-word side ("abgearbeitet :: worked off"); templates
and ellipses are left out here too. Exact duplicate pairs are kept once.

On the Debian file of 2023-01-30 (``trans-de-en`` 1.9-6) this keeps 20,699 sentence pairs (18,637 train,
1,019 validation, 1,043 test) and 52,701 more phrase pairs (47,479 of them in the training split).
``words=True`` adds about 290k word pairs (the dictionary's ~206k lines hold ~330k aligned sub-entries).

Splits are keyed on the English (source) side: ``split_of`` hashes a normalised form of it (case folded,
letters and digits only), so the split of a pair never changes when other lines change, and one source
sentence (up to case and punctuation) never appears in two splits. Evaluation splits hold sentences only,
so they are the same with and without phrases; a phrase whose key hashes into them is left out.

``lexicon_splits`` keeps dictionary entries (words and phrases) apart from the sentences, as an extra training
source: an entry is left out when its English or its German side, normalised as ``split_of`` normalises, is that
of a validation or test sentence, so no held-out sentence (in either direction) is ever trained on. Entries are
not split by hash: a word of a held-out sentence is what a dictionary is for, the sentence itself is not.
"""

import dataclasses
import hashlib
import re
from collections.abc import Iterable
from typing import Literal

Split = Literal["train", "validation", "test"]
Kind = Literal["sentence", "phrase", "word"]

SPLITS: tuple[Split, ...] = ("train", "validation", "test")
# The lexicon's splits (see lexicon_splits), named after the kind of entry they hold.
LEXICON_SPLITS: dict[Kind, str] = {"word": "lexicon_words", "phrase": "lexicon_phrases"}
# Out of _HASH_BUCKETS hash buckets, [0, 500) is test and [500, 1000) validation: 5% each, about 1000
# pairs each out of the ~20k sentences.
_HASH_BUCKETS = 10_000
_TEST_BUCKETS = 500
_VALIDATION_BUCKETS = 500

_SEPARATOR = " :: "
_SUBENTRY = " | "
_TAG = re.compile(r"\{[^{}]*\}|\[[^\[\]]*\]|<[^<>]*>")
_PARENTHESES = re.compile(r"\([^()]*\)")
# A standalone /ABBR/ (the slash must touch neither a word before nor after it, unlike "is/stands").
_ABBREVIATION = re.compile(r"(?<!\S)/[^/\s]+/(?!\w)")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([,.;:!?])")
_BRACKETS = frozenset("{}[]<>()")
# Placeholders (etwas, jemanden, something, somebody) mark templates, not sentences.
_PLACEHOLDER = re.compile(r"(?<!\w)(?:etw|jd[nms]?|sth|sb)\.", re.IGNORECASE)
_OPENERS = "„“”\"'‘’‚»«¡¿"
_CLOSERS = "“”\"'‘’«»)"
_FINAL = frozenset(".!?")
# Unicode category Cc; the file has a few stray C1 controls (Windows-1252 punctuation decoded as Latin-1).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclasses.dataclass(frozen=True)
class DingPair:
    """One English-German pair.

    Attributes:
      en: English text (the source side).
      de: German text (the target side).
      kind: ``"sentence"`` when both sides are full sentences, ``"phrase"`` for a usage example, ``"word"`` for
        a headword or an inflection (see the module docstring).
    """

    en: str
    de: str
    kind: Kind


@dataclasses.dataclass
class ParseStats:
    """What ``parse_ding`` read and why it skipped lines (so nothing is dropped silently).

    Attributes:
      lines: lines read, comments and blanks included.
      bad_utf8: lines that are not valid UTF-8, skipped.
      malformed: entry lines without exactly one ``" :: "`` or with unaligned ``" | "`` counts, skipped.
      sentences: distinct sentence pairs kept.
      phrases: distinct phrase pairs kept (0 unless ``phrases=True``).
      words: distinct word pairs kept (0 unless ``words=True``).
      duplicates: pairs skipped because an identical pair came earlier.
    """

    lines: int = 0
    bad_utf8: int = 0
    malformed: int = 0
    sentences: int = 0
    phrases: int = 0
    words: int = 0
    duplicates: int = 0


def clean_synonym(text: str) -> str | None:
    """Strips Ding markup from one synonym (or a whole sub-entry, before splitting on ``;``).

    Args:
      text: raw text, e.g. ``"Das ist mir egal! [ugs.]"``.

    Returns:
      The text without tags, labels, parentheses and abbreviations, whitespace normalised; ``None``
      when an unbalanced bracket is left.

    Example:
      >>> clean_synonym("Do you suppose (that) he will come? [coll.] {adj} <kommen>")
      'Do you suppose he will come?'
      >>> clean_synonym("Read the manual! /RTM/ (chat jargon)")
      'Read the manual!'
    """
    # The substring tests skip regex work that would change nothing: most synonyms have little markup.
    if "{" in text or "[" in text or "<" in text:
        text = _TAG.sub(" ", text)
    while "(" in text:  # innermost parentheses first, until none are left
        text, count = _PARENTHESES.subn(" ", text)
        if not count:
            break
    if "/" in text:
        text = _ABBREVIATION.sub(" ", text)
    text = " ".join(text.split())
    if " " in text:
        text = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", text)
    if _BRACKETS.intersection(text):
        return None
    return text


def is_sentence(text: str) -> bool:
    """Tells whether cleaned text reads as one or more full sentences.

    A sentence has at least two words, starts with a capital letter, a digit or an opening quote, ends with
    ``.``, ``!`` or ``?`` (optionally inside closing quotes), and holds no ellipsis, no template placeholder
    (``etw.``, ``jdn.``, ``sth.``, ``sb.`` ...) and no control character.

    Args:
      text: output of ``clean_synonym``.

    Returns:
      Whether it is a sentence.

    Example:
      >>> is_sentence("Rache ist süß."), is_sentence("to hype sth."), is_sentence("Revival von etw.")
      (True, False, False)
    """
    if text.rstrip(_CLOSERS)[-1:] not in _FINAL:  # the cheapest test rejects most sub-entries
        return False
    body = text.lstrip(_OPENERS)
    if not body or not (body[0].isupper() or body[0].isdigit()) or len(text.split()) < 2:
        return False
    return not ("…" in text or "..." in text or _PLACEHOLDER.search(text) or _CONTROL.search(text))


def normalised(text: str) -> str:
    """The form two texts must share to count as the same sentence: case folded, letters and digits only.

    Example:
      >>> normalised("Revenge is sweet!") == normalised("revenge is SWEET.")
      True
    """
    return "".join(char for char in text.casefold() if char.isalnum())


def split_of(en: str) -> Split:
    """Assigns a pair to a split from its English side alone, stably across file versions.

    Args:
      en: the English text.

    Returns:
      ``"train"``, ``"validation"`` or ``"test"`` (about 90/5/5 %).

    Example:
      >>> split_of("Revenge is sweet.") == split_of("revenge is SWEET!")
      True
    """
    bucket = int.from_bytes(hashlib.sha256(normalised(en).encode("utf-8")).digest()[:8], "big") % _HASH_BUCKETS
    if bucket < _TEST_BUCKETS:
        return "test"
    if bucket < _TEST_BUCKETS + _VALIDATION_BUCKETS:
        return "validation"
    return "train"


def _synonyms(subentry: str) -> list[str]:
    """Cleaned, non-empty synonyms of one sub-entry, in file order."""
    cleaned = clean_synonym(subentry)
    if cleaned is not None:
        candidates: list[str | None] = cleaned.split(";")
    else:
        # An unbalanced bracket somewhere: clean each synonym alone so the others survive.
        candidates = [clean_synonym(part) for part in subentry.split(";")]
    return [text.strip() for text in candidates if text and text.strip()]


def _pair_of(de_subentry: str, en_subentry: str, *, phrases: bool, words: bool = False) -> DingPair | None:
    """The pair one aligned sub-entry gives, if any."""
    de_synonyms, en_synonyms = _synonyms(de_subentry), _synonyms(en_subentry)
    de_sentence = next((text for text in de_synonyms if is_sentence(text)), None)
    en_sentence = next((text for text in en_synonyms if is_sentence(text)), None)
    if de_sentence and en_sentence:
        return DingPair(en=en_sentence, de=de_sentence, kind="sentence")
    if not ((phrases or words) and de_synonyms and en_synonyms):
        return None
    de, en = de_synonyms[0], en_synonyms[0]
    if "…" in de + en or _PLACEHOLDER.search(de + " " + en):
        return None
    # A grammar tag marks a headword or its inflection (a term, not a phrase), e.g. "Aalsuppe {f}".
    if "{" not in de_subentry and min(len(de.split()), len(en.split())) >= 2:
        return DingPair(en=en, de=de, kind="phrase") if phrases else None
    return DingPair(en=en, de=de, kind="word") if words else None


def parse_ding(
    lines: Iterable[bytes], *, phrases: bool = False, words: bool = False
) -> tuple[list[DingPair], ParseStats]:
    """Extracts distinct English-German pairs from the raw lines of the Ding ``de-en`` file.

    Args:
      lines: raw lines (bytes, newline optional), e.g. an open binary file.
      phrases: also keep multi-word phrase pairs, not just sentence pairs.
      words: also keep word pairs (headwords and inflections).

    Returns:
      The pairs in file order, and counts of what was read and skipped.

    Example:
      >>> pairs, stats = parse_ding([
      ...     b"# comment",
      ...     b"Rache {f} | Rache ist s\\xc3\\xbc\\xc3\\x9f. [Sprw.] :: revenge | Revenge is sweet. [prov.]",
      ... ])
      >>> pairs, stats.sentences
      ([DingPair(en='Revenge is sweet.', de='Rache ist süß.', kind='sentence')], 1)
    """
    stats = ParseStats()
    seen: set[tuple[str, str]] = set()
    pairs: list[DingPair] = []
    for raw in lines:
        stats.lines += 1
        try:
            # Only the line break goes: a leading " | " (an empty first sub-entry) keeps the alignment.
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            stats.bad_utf8 += 1
            continue
        if not line.strip() or line.startswith("#"):
            continue
        sides = line.split(_SEPARATOR)
        de_subentries = sides[0].split(_SUBENTRY)
        en_subentries = sides[-1].split(_SUBENTRY)
        if len(sides) != 2 or len(de_subentries) != len(en_subentries):
            stats.malformed += 1
            continue
        for de_subentry, en_subentry in zip(de_subentries, en_subentries, strict=True):
            # Without ".!?" on both sides there is no sentence; skipping these makes the parse 3x faster.
            if not (phrases or words or (_FINAL.intersection(de_subentry) and _FINAL.intersection(en_subentry))):
                continue
            pair = _pair_of(de_subentry, en_subentry, phrases=phrases, words=words)
            if pair is None:
                continue
            if (pair.en, pair.de) in seen:
                stats.duplicates += 1
                continue
            seen.add((pair.en, pair.de))
            pairs.append(pair)
            stats.sentences += pair.kind == "sentence"
            stats.phrases += pair.kind == "phrase"
            stats.words += pair.kind == "word"
    return pairs, stats


def split_pairs(pairs: Iterable[DingPair]) -> dict[Split, list[DingPair]]:
    """Groups pairs by ``split_of``; phrases are kept in the training split only.

    Args:
      pairs: output of ``parse_ding``.

    Returns:
      ``{"train": [...], "validation": [...], "test": [...]}``, each in input order.

    Example:
      >>> pairs = [DingPair("Revenge is sweet.", "Rache ist süß.", "sentence")]
      >>> sum(len(split) for split in split_pairs(pairs).values())
      1
    """
    splits: dict[Split, list[DingPair]] = {name: [] for name in SPLITS}
    for pair in pairs:
        split = split_of(pair.en)
        if pair.kind == "sentence" or split == "train":
            splits[split].append(pair)
    return splits


def lexicon_splits(pairs: Iterable[DingPair], held_out: Iterable[DingPair]) -> dict[str, list[DingPair]]:
    """Dictionary entries by kind (``LEXICON_SPLITS``), without any that could reveal a held-out sentence.

    An entry goes when its English side or its German side, ``normalised``, is that of a ``held_out`` sentence:
    so neither direction of training (English to German, or reversed) sees a validation or test sentence.

    Args:
      pairs: output of ``parse_ding(..., phrases=True, words=True)``; sentences are ignored.
      held_out: the validation and test sentences (``split_pairs``'s).

    Returns:
      ``{"lexicon_words": [...], "lexicon_phrases": [...]}``, each in input order.

    Example:
      >>> test = [DingPair("Revenge is sweet.", "Rache ist süß.", "sentence")]
      >>> entries = [DingPair("revenge", "Rache", "word"), DingPair("revenge is sweet", "Rache ist süß", "phrase")]
      >>> lexicon_splits(entries, test)
      {'lexicon_words': [DingPair(en='revenge', de='Rache', kind='word')], 'lexicon_phrases': []}
    """
    held_out = list(held_out)
    held_en, held_de = {normalised(p.en) for p in held_out}, {normalised(p.de) for p in held_out}
    splits: dict[str, list[DingPair]] = {name: [] for name in LEXICON_SPLITS.values()}
    for pair in pairs:
        if pair.kind in LEXICON_SPLITS and normalised(pair.en) not in held_en and normalised(pair.de) not in held_de:
            splits[LEXICON_SPLITS[pair.kind]].append(pair)
    return splits
