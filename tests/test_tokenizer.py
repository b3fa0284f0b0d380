"""The shared SentencePiece vocabulary: fixed special ids, round trips, reuse from the workdir."""

import io

import numpy as np
import pytest
import sentencepiece as spm

from attn_jax.data import tokenizer

_TEXTS = [
    "The cat sat on the mat.",
    "Die Katze saß auf der Matte.",
    "Have you anything for sunburn?",
    "Haben Sie etwas gegen Sonnenbrand?",
    "Revenge is sweet.",
    "Rache ist süß.",
    "Grüße aus Köln, sagte er.",
    "Regards from Cologne, he said.",
] * 10


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("workdir")
    tokenizer.train_tokenizer(_TEXTS, path, vocab_size=100, model_type="bpe")
    return path


def test_special_ids_are_fixed(workdir):
    assert (tokenizer.PAD_ID, tokenizer.EOS_ID, tokenizer.BOS_ID, tokenizer.UNK_ID) == (0, 1, 2, 3)
    spm = tokenizer.load_tokenizer(workdir)
    assert [spm.id_to_piece(i) for i in range(4)] == ["<pad>", "</s>", "<s>", "<unk>"]
    assert spm.vocab_size() == 100


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_round_trip(tmp_path, model_type):
    spm = tokenizer.train_tokenizer(_TEXTS, tmp_path, vocab_size=60, model_type=model_type)
    for text in set(_TEXTS):
        ids = tokenizer.encode(spm, text)
        assert ids.dtype == np.int32 and ids.ndim == 1
        assert ids.min() > tokenizer.UNK_ID  # no special ids, and every character is known
        assert tokenizer.decode(spm, ids) == text
        assert tokenizer.decode(spm, tokenizer.encode(spm, text.encode())) == text  # bytes as from TFDS


def test_decode_reads_up_to_eos_and_skips_pad_and_bos(workdir):
    spm = tokenizer.load_tokenizer(workdir)
    ids = tokenizer.encode(spm, "Revenge is sweet.")
    other = tokenizer.encode(spm, "Rache ist süß.")
    row = np.concatenate([[tokenizer.BOS_ID], ids, [tokenizer.EOS_ID], other, [0, 0]])
    assert tokenizer.decode(spm, row) == "Revenge is sweet."
    assert tokenizer.decode(spm, np.concatenate([ids, [0, 0, 0]])) == "Revenge is sweet."


def test_reused_from_the_workdir(workdir):
    def no_text():
        raise AssertionError("a saved model must be reused, not retrained")

    first = tokenizer.load_tokenizer(workdir)
    again = tokenizer.load_or_train_tokenizer(workdir, no_text, vocab_size=100)
    assert again.serialized_model_proto() == first.serialized_model_proto()
    with pytest.raises(ValueError, match="has 100 pieces, the config asks for 200"):
        tokenizer.load_or_train_tokenizer(workdir, no_text, vocab_size=200)


def test_trains_when_absent(tmp_path):
    spm = tokenizer.load_or_train_tokenizer(tmp_path, lambda: iter(_TEXTS), vocab_size=80)
    assert (tmp_path / tokenizer.MODEL_FILE_NAME).is_file()
    assert spm.vocab_size() == 80


def test_sample_texts_reads_both_sides_of_a_bounded_random_sample():
    source = [{"en": b"One.", "de": "Eins."}, {"en": "Two.", "de": b"Zwei."}]
    assert list(tokenizer.sample_texts(source)) == ["One.", "Eins.", "Two.", "Zwei."]
    assert list(tokenizer.sample_texts(source, ("de",), max_examples=5)) == ["Eins.", "Zwei."]
    many = [{"en": str(i)} for i in range(1000)]
    sample = [int(text) for text in tokenizer.sample_texts(many, ("en",), max_examples=50, seed=1)]
    assert len(set(sample)) == 50 and sample == sorted(sample)
    assert sample == [int(t) for t in tokenizer.sample_texts(many, ("en",), max_examples=50, seed=1)]
    assert max(sample) > 500  # drawn from the whole split, not its first examples


def test_run_tokenizer_is_read_from_the_workdir_without_data(workdir, tmp_path):
    (tmp_path / "run" / "tokenizer").mkdir(parents=True)
    (tmp_path / "run" / "tokenizer" / tokenizer.MODEL_FILE_NAME).write_bytes(
        (workdir / tokenizer.MODEL_FILE_NAME).read_bytes()
    )
    assert tokenizer.load_run_tokenizer(tmp_path / "run").vocab_size() == 100
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in .*elsewhere/tokenizer: run `attn-jax prepare`"):
        tokenizer.load_run_tokenizer(tmp_path / "elsewhere")


def test_special_ids_are_checked_when_loading(tmp_path):
    proto = io.BytesIO()  # SentencePiece's own special ids: unk 0, bos 1, eos 2, no pad
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_TEXTS), model_writer=proto, vocab_size=40, minloglevel=2)
    (tmp_path / tokenizer.MODEL_FILE_NAME).write_bytes(proto.getvalue())
    with pytest.raises(ValueError, match=r"special ids \(pad, eos, bos, unk\) are \(-1, 2, 1, 0\)"):
        tokenizer.load_tokenizer(tmp_path)
