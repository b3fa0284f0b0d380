"""BLEU two ways: sacreBLEU on detokenized text, and the paper's tokenized BLEU with compound splitting.

The paper (§6.1, Table 2: 27.3 base, 28.4 big on newstest2014 English-German) reports BLEU as tensor2tensor
computed it: ``get_ende_bleu.sh`` (the same recipe as fairseq's ``compound_split_bleu.sh``) Moses-tokenizes the
German output and reference, rewrites every hyphen inside a compound as its own token (``"rich-text"`` ->
``"rich ##AT##-##AT## text"``, a convention from GNMT and ConvS2S) and scores the tokens with Moses'
``multi-bleu.perl``: case-sensitive, no smoothing. Splitting compounds adds matching n-grams, so this number runs
higher than sacreBLEU's (about +1 on WMT14 en-de; Post 2018, "A Call for Clarity in Reporting BLEU Scores").
sacreBLEU (``13a`` tokenization of detokenized text, the WMT standard) is the number to compare across papers.

Here the Moses steps come from ``sacremoses`` (a Python port of ``tokenizer.perl`` and
``replace-unicode-punctuation.perl``). tensor2tensor replaced unicode punctuation in the output only; here both
sides get it, so that an output equal to its reference scores 100.

newstest2014 comes in two versions: the full 3,003 sentences (what TFDS's ``wmt14_translate/de-en`` test split
holds, and sacreBLEU's ``wmt14/full``) and the "filtered" 2,737 that WMT released first (sacreBLEU's ``wmt14``, and
Stanford's preprocessed copy). Which one the paper scored is not stated. The filtered list cannot be derived
offline from the full set; ``newstest2014_filtered`` finds it in sacreBLEU's download cache when
``sacrebleu -t wmt14 -l en-de --echo src`` has been run once.
"""

import os
import pathlib
import re
from collections.abc import Sequence

import sacrebleu
from sacremoses import MosesPunctNormalizer, MosesTokenizer

# A hyphen between two non-spaces is a compound's; get_ende_bleu.sh: perl -ple 's{(\S)-(\S)}{$1 ##AT##-##AT## $2}g'.
_COMPOUND_HYPHEN = re.compile(r"(\S)-(\S)")
NEWSTEST2014_FULL = 3003
NEWSTEST2014_FILTERED = 2737


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus sacreBLEU (13a tokenization, the WMT standard) of detokenized text.

    Example:
      >>> round(bleu(["the cat sat on the mat"], ["the cat sat on the mat"]), 1)
      100.0
    """
    _check(hypotheses, references)
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def compound_split(text: str) -> str:
    """Splits hyphenated compounds of Moses-tokenized text, as tensor2tensor and fairseq do before scoring.

    Perl's ``s///g`` resumes after each match, so in ``a-b-c`` the second hyphen stays (Python's ``re.sub`` too).

    Example:
      >>> compound_split("die Nord-Süd-Verbindung , a-b-c und - allein")
      'die Nord ##AT##-##AT## Süd ##AT##-##AT## Verbindung , a ##AT##-##AT## b-c und - allein'
    """
    return _COMPOUND_HYPHEN.sub(r"\1 ##AT##-##AT## \2", text)


def moses_tokenize(text: str, lang: str = "de") -> str:
    """``replace-unicode-punctuation.perl`` then ``tokenizer.perl -l LANG`` (with its default escaping).

    Example:
      >>> moses_tokenize("„Das Nord-Süd-Gefälle“, sagte er.")
      '„ Das Nord-Süd-Gefälle &quot; , sagte er .'
    """
    normalized = _normalizer(lang).replace_unicode_punct(text)
    return _tokenizer(lang).tokenize(normalized, return_str=True, escape=True)


def tokenized_bleu(
    hypotheses: Sequence[str], references: Sequence[str], *, lang: str = "de", split_compounds: bool = True
) -> float:
    """The paper's BLEU: Moses-tokenized, compounds split (``split_compounds``), ``multi-bleu.perl``'s formula.

    Args:
      hypotheses: detokenized outputs, one per sentence.
      references: their detokenized references.
      lang: the language's Moses rules (the target language).
      split_compounds: rewrite compound hyphens as tokens (``compound_split``), as the paper's scores do.

    Returns:
      Corpus BLEU in ``[0, 100]``: case-sensitive, whitespace tokens, no smoothing.

    Example:
      >>> hypothesis, reference = ["Die Nord-Süd-Verbindung ist schlecht."], ["Die Nord-Süd-Verbindung ist gut."]
      >>> round(tokenized_bleu(hypothesis, reference), 2), tokenized_bleu(hypothesis, reference, split_compounds=False)
      (75.06, 0.0)
    """
    _check(hypotheses, references)

    def prepare(text: str) -> str:
        tokens = moses_tokenize(text, lang)
        return compound_split(tokens) if split_compounds else tokens

    metric = sacrebleu.metrics.BLEU(tokenize="none", smooth_method="none", force=True)
    return float(metric.corpus_score([prepare(h) for h in hypotheses], [[prepare(r) for r in references]]).score)


def newstest2014_filtered(
    sources: Sequence[str], cache: str | os.PathLike | None = None, *, langpair: str = "en-de"
) -> list[int] | None:
    """Indices into the full newstest2014 (``sources``, 3,003 source sentences) of the filtered 2,737.

    Reads sacreBLEU's processed ``wmt14`` source file from its cache (``$SACREBLEU``, else ``~/.sacrebleu``); never
    downloads. Each filtered sentence is matched to the next full-set sentence with the same text, in order.

    Args:
      sources: the source sentences of the full test set, in order.
      cache: sacreBLEU's cache folder; None reads ``$SACREBLEU`` or ``~/.sacrebleu``.
      langpair: the language pair (its source file is ``wmt14/<langpair>.<source language>``).

    Returns:
      The indices, or None when the cache does not hold the filtered set.

    Raises:
      ValueError: a filtered sentence is not in ``sources`` (``sources`` is not newstest2014).
    """
    root = pathlib.Path(cache or os.environ.get("SACREBLEU", pathlib.Path.home() / ".sacrebleu"))
    path = root / "wmt14" / f"{langpair}.{langpair.split('-')[0]}"
    if not path.is_file():
        return None
    indices, start = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        for index in range(start, len(sources)):
            if sources[index].strip() == line.strip():
                indices.append(index)
                start = index + 1
                break
        else:
            raise ValueError(f"{path}: sentence {len(indices)} ({line[:60]!r}) is not in the given test set in order")
    return indices


def _check(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not hypotheses:
        raise ValueError("BLEU of no sentences is undefined")


_TOKENIZERS: dict[str, MosesTokenizer] = {}
_NORMALIZERS: dict[str, MosesPunctNormalizer] = {}


def _tokenizer(lang: str) -> MosesTokenizer:
    return _TOKENIZERS.setdefault(lang, MosesTokenizer(lang=lang))


def _normalizer(lang: str) -> MosesPunctNormalizer:
    return _NORMALIZERS.setdefault(lang, MosesPunctNormalizer(lang=lang))
