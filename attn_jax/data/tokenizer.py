"""One SentencePiece vocabulary shared by source and target (paper §5.1: "a shared source-target
vocabulary of about 37000 tokens", byte-pair encoding).

The model is trained once per run on a bounded random sample of the training split (``sample_texts``), kept
as ``WORKDIR/tokenizer/sentencepiece.model`` and reused from there, so a resumed run keeps its token ids.
Memory stays bounded whatever the corpus: SentencePiece sees only the sample (SentencePiece issue 644: BPE on a
whole WMT corpus takes tens of GB). Every path is an ``etils.epath`` path (local or ``gs://``): the model is
trained in memory, written as bytes and loaded from bytes (``model_proto``), never from a local file name.

The special ids are fixed, whatever the corpus: ``PAD_ID = 0`` (so padding is zero and masks are
``ids != 0``), ``EOS_ID = 1``, ``BOS_ID = 2``, ``UNK_ID = 3``. ``encode`` adds no special ids; the pipeline
adds them.

A run trained in both directions (``config.data.bidirectional``; Johnson et al. 2017, "Google's Multilingual
Neural Machine Translation System") has two more pieces, user-defined symbols that are always one piece each: the
target-language tags ``language_tags(source_key, target_key)``, e.g. ``("<2de>", "<2en>")``, ids 4 and 5, the
run's own direction first. ``SourceEncoder`` is the one place that turns a source sentence into the ids a model
reads: the tag first when the tokenizer has tags, then the sentence's pieces; preparation, evaluation and
``attn-jax translate`` all call it, so a reader of the run needs nothing but its tokenizer to encode alike.
"""

import io
import itertools
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Literal

import grain
import numpy as np
import sentencepiece as spm
from etils import epath
from sentencepiece import sentencepiece_model_pb2

from attn_jax.data.text import clean_text

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
UNK_ID = 3
MODEL_FILE_NAME = "sentencepiece.model"
RUN_TOKENIZER_DIR = "tokenizer"  # the tokenizer's folder inside a run's workdir
_LANGUAGE_TAG = re.compile(r"<2[A-Za-z_-]+>")

ModelType = Literal["unigram", "bpe"]


def train_tokenizer(
    texts: Iterable[str | bytes],
    model_dir: str | os.PathLike | None,
    *,
    vocab_size: int,
    model_type: ModelType = "bpe",
    max_sentences: int = 10_000_000,
    character_coverage: float = 1.0,
    num_threads: int = 4,
    user_defined_symbols: Sequence[str] = (),
) -> spm.SentencePieceProcessor:
    """Trains a SentencePiece model on ``texts`` and saves it as ``model_dir/sentencepiece.model``.

    Args:
      texts: training sentences, source and target sides mixed (see ``sample_texts``).
      model_dir: folder to save the model in (local or ``gs://``), created when missing; None keeps it in memory.
      vocab_size: number of pieces, special ids included. Fails when the text is too small for it.
      model_type: ``"bpe"`` (the paper's byte-pair encoding) or ``"unigram"``.
      max_sentences: SentencePiece keeps a uniform sample of at most this many sentences (its memory bound);
        0 keeps them all (for texts already sampled, see ``sample_texts``).
      character_coverage: share of characters covered by the alphabet; the rest map to ``UNK_ID``.
      num_threads: training threads.
      user_defined_symbols: pieces that are always one piece (e.g. ``language_tags``), ids 4, 5, ... in order.

    Returns:
      The trained tokenizer.

    Example:
      >>> import tempfile
      >>> texts = ["the cat sat on the mat", "die Katze sass auf der Matte"] * 20
      >>> tokenizer = train_tokenizer(texts, tempfile.mkdtemp(), vocab_size=40)
      >>> tokenizer.vocab_size(), decode(tokenizer, encode(tokenizer, "the cat"))
      (40, 'the cat')
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_as_str(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        character_coverage=character_coverage,
        num_threads=num_threads,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        bos_id=BOS_ID,
        unk_id=UNK_ID,
        user_defined_symbols=list(user_defined_symbols),
        minloglevel=2,  # training logs a line per EM step; keep warnings and errors only
    )
    if model_dir is not None:
        write_atomically(epath.Path(model_dir) / MODEL_FILE_NAME, model.getvalue())
    return tokenizer_from_bytes(model.getvalue(), where="the trained model")


def write_atomically(path: epath.Path, data: bytes) -> None:
    """Writes ``data`` to a scratch name beside ``path``, then renames it: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f"{path.name}.tmp{os.getpid()}")
    scratch.write_bytes(data)
    scratch.rename(path)


def tokenizer_from_bytes(model_proto: bytes, *, where: str = "model") -> spm.SentencePieceProcessor:
    """A tokenizer from a serialized model, its special ids checked.

    Raises:
      ValueError: the model's special ids are not ``PAD_ID, EOS_ID, BOS_ID, UNK_ID``.
    """
    tokenizer = spm.SentencePieceProcessor(model_proto=model_proto)
    found = (tokenizer.pad_id(), tokenizer.eos_id(), tokenizer.bos_id(), tokenizer.unk_id())
    if found != (PAD_ID, EOS_ID, BOS_ID, UNK_ID):
        raise ValueError(f"{where}: special ids (pad, eos, bos, unk) are {found}, expected (0, 1, 2, 3)")
    return tokenizer


def load_tokenizer(model_dir: str | os.PathLike) -> spm.SentencePieceProcessor:
    """Loads ``model_dir/sentencepiece.model`` (local or ``gs://``) and checks its special ids.

    Raises:
      FileNotFoundError: no model there.
      ValueError: the model's special ids are not ``PAD_ID, EOS_ID, BOS_ID, UNK_ID``.
    """
    path = epath.Path(model_dir) / MODEL_FILE_NAME
    return tokenizer_from_bytes(path.read_bytes(), where=str(path))


def load_run_tokenizer(workdir: str | os.PathLike) -> spm.SentencePieceProcessor:
    """The tokenizer a training run saved in its workdir, without touching any data set.

    For readers of a finished (or running) run: ``eval``, ``translate``, ``average``.

    Args:
      workdir: the run's directory (local or ``gs://``).

    Returns:
      The tokenizer.

    Raises:
      FileNotFoundError: the workdir holds no tokenizer; the message says how one gets there.
    """
    model_dir = epath.Path(workdir) / RUN_TOKENIZER_DIR
    if not (model_dir / MODEL_FILE_NAME).exists():
        raise FileNotFoundError(
            f"no tokenizer in {model_dir}: run `attn-jax prepare` or `attn-jax train` with this workdir first "
            "(runs on token-id tasks such as the copy task have none)"
        )
    return load_tokenizer(model_dir)


def load_or_train_tokenizer(
    model_dir: str | os.PathLike,
    texts: Callable[[], Iterable[str | bytes]],
    *,
    vocab_size: int,
    **train_kwargs: object,
) -> spm.SentencePieceProcessor:
    """Reuses ``model_dir/sentencepiece.model`` when present, else trains it with ``train_tokenizer``.

    In a multi-host run let one process train (e.g. ``jax.process_index() == 0``) and the others wait
    for the file (``attn_jax.data.prepare`` does).

    Args:
      model_dir: the folder of the model (``WORKDIR/tokenizer``).
      texts: called only when training, returns the training sentences.
      vocab_size: wanted vocabulary size; a saved model of another size is an error.
      **train_kwargs: more arguments for ``train_tokenizer``; a saved model must have the same
        ``user_defined_symbols``.

    Returns:
      The tokenizer.

    Raises:
      ValueError: the saved model has another vocabulary size or other user-defined symbols.

    Example:
      >>> import tempfile
      >>> workdir = tempfile.mkdtemp()
      >>> texts = lambda: ["the cat sat on the mat", "die Katze sass auf der Matte"] * 20
      >>> first = load_or_train_tokenizer(workdir, texts, vocab_size=40)
      >>> again = load_or_train_tokenizer(workdir, lambda: [], vocab_size=40)  # reused: no text needed
      >>> again.serialized_model_proto() == first.serialized_model_proto()
      True
    """
    if (epath.Path(model_dir) / MODEL_FILE_NAME).exists():
        tokenizer = load_tokenizer(model_dir)
        if tokenizer.vocab_size() != vocab_size:
            raise ValueError(
                f"{model_dir}/{MODEL_FILE_NAME} has {tokenizer.vocab_size()} pieces, the config asks for "
                f"{vocab_size}: remove the file or use another workdir"
            )
        wanted = tuple(train_kwargs.get("user_defined_symbols", ()))  # type: ignore[arg-type]
        if user_defined_pieces(tokenizer) != wanted:
            raise ValueError(
                f"{model_dir}/{MODEL_FILE_NAME} has the user-defined pieces {user_defined_pieces(tokenizer)}, the "
                f"config asks for {wanted} (language tags: config.data.bidirectional): remove the file or use another "
                "workdir"
            )
        return tokenizer
    return train_tokenizer(texts(), model_dir, vocab_size=vocab_size, **train_kwargs)  # type: ignore[arg-type]


def sample_indices(num_examples: int, max_examples: int | None, *, seed: int = 0) -> np.ndarray:
    """A uniform random sample of at most ``max_examples`` example indices, in increasing order.

    A sample, not the first examples: WMT's training split is ordered by sub-corpus (Europarl first). A split
    no larger than ``max_examples`` is read whole, in order.

    Example:
      >>> sample_indices(5, None).tolist(), sample_indices(5, 10).tolist(), len(sample_indices(1000, 10))
      ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4], 10)
    """
    if max_examples is None or max_examples >= num_examples:
        return np.arange(num_examples)
    return np.sort(np.random.default_rng(seed).choice(num_examples, size=max_examples, replace=False))


def sample_texts(
    source: grain.sources.RandomAccessDataSource,
    keys: Sequence[str] = ("en", "de"),
    *,
    max_examples: int | None = None,
    seed: int = 0,
) -> Iterator[str]:
    """Yields the texts of both sides of a random sample of a split, for ``train_tokenizer``.

    Args:
      source: a random-access data source (e.g. a TFDS ``train`` split).
      keys: the features holding text.
      max_examples: read at most this many examples, drawn uniformly (see ``sample_indices``).
      seed: seed of the sample.

    Returns:
      An iterator over strings, ``len(keys)`` per example.

    Example:
      >>> list(sample_texts([{"en": b"Hi.", "de": b"Hallo."}]))
      ['Hi.', 'Hallo.']
    """
    indices = sample_indices(len(source), max_examples, seed=seed)
    read_many = getattr(source, "__getitems__", None)
    for start in range(0, len(indices), 1024):
        chunk = indices[start : start + 1024].tolist()
        for example in read_many(chunk) if read_many else (source[i] for i in chunk):
            for key in keys:
                yield _to_str(example[key])


def encode(tokenizer: spm.SentencePieceProcessor, text: str | bytes) -> np.ndarray:
    """Token ids of one text, without BOS or EOS.

    Args:
      tokenizer: a SentencePiece model.
      text: the text (``bytes`` are read as UTF-8, as TFDS returns them; see ``clean_text``).

    Returns:
      ``int32`` ids, shape ``[L]``.
    """
    return np.asarray(tokenizer.encode(_to_str(text)), dtype=np.int32)


def decode(tokenizer: spm.SentencePieceProcessor, ids: Iterable[int] | np.ndarray) -> str:
    """Text of ids, read up to the first ``EOS_ID``, with ``PAD_ID`` and ``BOS_ID`` skipped.

    Args:
      tokenizer: a SentencePiece model.
      ids: token ids, e.g. one row of a model output ``[T]``.

    Returns:
      The detokenized text.
    """
    ids = itertools.takewhile(lambda i: i != EOS_ID, (int(i) for i in np.asarray(ids).reshape(-1)))
    return tokenizer.decode([i for i in ids if i not in (PAD_ID, BOS_ID)])


def language_tags(source_language: str, target_language: str) -> tuple[str, str]:
    """The user-defined pieces of a run trained in both directions: the tag of its own direction's target first.

    Example:
      >>> language_tags("en", "de")
      ('<2de>', '<2en>')
    """
    return f"<2{target_language}>", f"<2{source_language}>"


def user_defined_pieces(tokenizer: spm.SentencePieceProcessor) -> tuple[str, ...]:
    """The tokenizer's user-defined pieces (``train_tokenizer``'s ``user_defined_symbols``), in id order."""
    model = sentencepiece_model_pb2.ModelProto.FromString(tokenizer.serialized_model_proto())
    user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return tuple(piece.piece for piece in model.pieces if piece.type == user_defined)


class SourceEncoder:
    """Source sentences as the model reads them: the target-language tag (when the tokenizer has language tags),
    then the sentence's pieces; no EOS (the caller cuts to the model's length and appends it).

    The one place that encodes a source sentence: preparation (``encoding.TextPairEncoder``), evaluation
    (``evaluate.translation_quality``) and ``attn-jax translate`` call it, so every reader of a run encodes as
    its training did, from the run's tokenizer alone.

    Args:
      tokenizer: the run's SentencePiece model.
      reverse: encode for the reversed direction (German to English on ``ding_en_de``): its tag instead. Only
        a tokenizer with language tags has one.

    Example:
      >>> texts = ["the cat sat on the mat", "die Katze sass auf der Matte"] * 20
      >>> tagged = train_tokenizer(texts, None, vocab_size=40, user_defined_symbols=language_tags("en", "de"))
      >>> ids = SourceEncoder(tagged)("the cat")
      >>> tagged.id_to_piece(int(ids[0])), decode(tagged, ids[1:]), SourceEncoder(tagged, reverse=True)("")
      ('<2de>', 'the cat', array([5], dtype=int32))
    """

    def __init__(self, tokenizer: spm.SentencePieceProcessor, *, reverse: bool = False):
        pieces = user_defined_pieces(tokenizer)
        tags = [tokenizer.piece_to_id(piece) for piece in pieces if _LANGUAGE_TAG.fullmatch(piece)]
        if reverse and len(tags) != 2:
            raise ValueError(f"the reversed direction needs a tokenizer with two language tags, this one has {pieces}")
        self.tokenizer = tokenizer
        self.prefix = np.asarray(tags[int(reverse) : int(reverse) + 1], np.int32)  # [] or [tag]

    def __call__(self, text: str | bytes) -> np.ndarray:
        """``int32`` ids ``[S]``: the tag (if any), then the text's pieces."""
        return np.concatenate([self.prefix, encode(self.tokenizer, text)])


def _to_str(text: str | bytes) -> str:
    return clean_text(text)[0]  # invalid UTF-8 replaced, control characters as spaces


def _as_str(texts: Iterable[str | bytes]) -> Iterator[str]:
    return (_to_str(text) for text in texts)
