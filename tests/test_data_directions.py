"""Training both directions with target-language tags, and the Ding lexicon mixed in, through the whole data path:
tags are single pieces of the shared vocabulary, reversed pairs carry the other tag, evaluation and ``translate``
encode sources with the run's own tag, and the options are checked before anything runs."""

import ml_collections
import numpy as np
import pytest

from attn_jax import commands, defaults, evaluate, runs
from attn_jax.config import ConfigError, model_config, validated
from attn_jax.data import datasets, sources, tokenizer
from attn_jax.data.encoding import BothDirections, TextPairEncoder
from tests.test_data_lexicon import _lexicon_lines

_TEXTS = ["the cat sat on the mat", "die Katze sass auf der Matte", "a dog", "ein Hund"] * 10
_TAGS = tokenizer.language_tags("en", "de")


@pytest.fixture(scope="module")
def tagged():
    return tokenizer.train_tokenizer(_TEXTS, None, vocab_size=48, user_defined_symbols=_TAGS)


def test_tags_are_single_pieces_after_the_special_ids(tagged):
    assert _TAGS == ("<2de>", "<2en>")
    assert [tagged.piece_to_id(tag) for tag in _TAGS] == [4, 5]
    assert tokenizer.user_defined_pieces(tagged) == _TAGS
    # One piece wherever it stands, never split into "<", "2", "de", ">".
    assert tagged.encode_as_pieces("the<2de>cat <2en>").count("<2de>") == 1
    assert "<2en>" in tagged.encode_as_pieces("the<2de>cat <2en>")


def test_sources_start_with_the_target_language_tag_and_reversed_pairs_swap_sides(tagged):
    plain = tokenizer.train_tokenizer(_TEXTS, None, vocab_size=48)
    np.testing.assert_array_equal(tokenizer.SourceEncoder(plain)("a dog"), plain.encode("a dog"))
    with pytest.raises(ValueError, match="two language tags"):
        tokenizer.SourceEncoder(plain, reverse=True)
    examples = [{"en": b"the cat", "de": b"die Katze"}, {"en": b"a dog", "de": b"ein Hund"}]
    both = BothDirections(examples)
    encoder = TextPairEncoder(tagged, "en", "de")
    encoded = [encoder(both[i]) for i in range(len(both))]
    for (en, de), (source, target, _), (reversed_source, reversed_target, _) in zip(
        [("the cat", "die Katze"), ("a dog", "ein Hund")], encoded[:2], encoded[2:], strict=True
    ):
        assert source.tolist() == [4, *tagged.encode(en)] and target.tolist() == tagged.encode(de)
        assert reversed_source.tolist() == [5, *tagged.encode(de)] and reversed_target.tolist() == tagged.encode(en)
    with pytest.raises(IndexError):
        both.__getitems__([4])


def test_a_saved_tokenizer_without_the_tags_is_refused_for_a_bidirectional_run(tmp_path):
    texts = lambda: _TEXTS  # noqa: E731
    tokenizer.load_or_train_tokenizer(tmp_path, texts, vocab_size=48)
    with pytest.raises(ValueError, match=r"user-defined pieces \(\).*bidirectional"):
        tokenizer.load_or_train_tokenizer(tmp_path, texts, vocab_size=48, user_defined_symbols=_TAGS)


def _config(tmp_path, **data) -> ml_collections.ConfigDict:
    path = tmp_path / "de-en"
    path.write_bytes(b"\n".join(_lexicon_lines(300)) + b"\n")
    c = defaults.base_config()
    c.data = defaults.data_config(
        name="ding_en_de", ding_file=str(path), data_dir=str(tmp_path / "tfds"), vocab_size=64, max_length=24,
        tokens_per_batch=192, eval_tokens_per_batch=192, num_threads=0, prepare_workers=1, **data,
    )  # fmt: skip
    c.model = defaults.model_config(d_model=16, num_heads=2, d_ff=32, num_encoder_layers=1, num_decoder_layers=1,
                                    max_len=32)  # fmt: skip
    return validated(c)


@pytest.fixture(scope="module")
def both_ways(tmp_path_factory):
    """Datasets of ding_en_de with the lexicon mixed in at 0.3 and both directions, on a generated file."""
    tmp_path = tmp_path_factory.mktemp("both_ways")
    config = _config(tmp_path, lexicon_ratio=0.3, bidirectional=True)
    raw = sources.split_sources(config.data)
    return config, datasets.build_datasets(config, tmp_path / "run"), raw


def _id_pairs(source, tokenizer_) -> set[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The (English ids, German ids) of every pair of a source (ids, not text: the tokenizer learnt the sentences'
    characters only, so some entries decode with unknown pieces)."""
    examples = source.__getitems__(list(range(len(source))))
    return {(tuple(tokenizer_.encode(e["en"].decode())), tuple(tokenizer_.encode(e["de"].decode()))) for e in examples}


def test_training_pairs_go_both_ways_with_their_tags_and_hold_the_lexicon_at_its_ratio(both_ways):
    config, built, raw = both_ways
    sentences, entries = _id_pairs(raw["train"], built.tokenizer), _id_pairs(raw["lexicon"], built.tokenizer)
    assert len(entries) > len(sentences)
    kinds = {(tag, kind): 0 for tag in (4, 5) for kind in ("sentence", "entry")}
    batches_per_epoch = built.report["train"]["batches_per_epoch"]
    for _ in range(2 * batches_per_epoch):
        batch = next(built.train)
        for source, target in zip(batch["inputs"], batch["targets_out"], strict=True):
            if not target[0]:
                continue  # padding row
            tag, text, output = int(source[0]), tuple(source[1 : list(source).index(1)]), tuple(target[: list(
                target).index(1)])  # fmt: skip
            pair = (text, output) if tag == 4 else (output, text)
            assert tag in (4, 5) and (pair in sentences or pair in entries), (tag, pair)
            kinds[tag, "sentence" if pair in sentences else "entry"] += 1
    assert [built.tokenizer.id_to_piece(tag) for tag in (4, 5)] == ["<2de>", "<2en>"]
    assert min(kinds.values()) > 0, kinds
    share = (kinds[4, "entry"] + kinds[5, "entry"]) / sum(kinds.values())
    assert abs(share - 0.3) < 0.06, kinds  # ~1,500 pairs: 5 standard deviations
    assert abs(kinds[4, "sentence"] - kinds[5, "sentence"]) < 0.25 * kinds[4, "sentence"]
    # Validation (the loss during training) reads en -> de only, behind its tag.
    validation = [b for b in built.eval_batches()]
    firsts = np.concatenate([b["inputs"][b["targets_out"][:, 0] > 0, 0] for b in validation])
    assert len(firsts) == len(built.validation_pairs) and set(firsts.tolist()) == {4}


def test_evaluation_and_translate_encode_sources_with_the_runs_tag(both_ways, monkeypatch):
    config, built, _ = both_ways
    seen = []

    def capture(params, ids, **kwargs):
        seen.extend(ids)
        return [np.zeros(0, np.int32) for _ in ids]

    monkeypatch.setattr(evaluate, "translate_ids", capture)
    monkeypatch.setattr(commands, "translate_ids", capture)
    pairs = built.test_pairs[:3]
    evaluate.translation_quality({}, pairs, built.tokenizer, model_config=model_config(config),
                                 eval_config=config.eval)  # fmt: skip
    model = runs.Model(config=config, model_config=model_config(config), params={}, step=0, tokenizer=built.tokenizer)
    commands.translate_sentences(model, [en for en, _ in pairs])
    expected = [[4, *built.tokenizer.encode(en), tokenizer.EOS_ID] for en, _ in pairs]
    assert [ids.tolist() for ids in seen] == expected + expected


def test_the_options_are_checked_before_anything_runs(tmp_path):
    c = defaults.base_config()
    for data, task, message in [
        ({"name": "wmt14_translate/de-en", "lexicon_ratio": 0.2}, "translation", "need data.name='ding_en_de'"),
        ({"phrases": True, "lexicon_ratio": 0.2}, "translation", "data.phrases=False"),
        ({"name": "copy", "bidirectional": True}, "translation", "needs a translation task on a text data set"),
        ({"bidirectional": True}, "lm", "task='lm'"),
        ({"lexicon_ratio": 1.0}, "translation", "lexicon_ratio: expected a number in [0.0, 1.0)"),
        ({"lexicon_entries": "verbs"}, "translation", "'words' or 'phrases' or 'all'"),
        ({"in_memory_mb": -1}, "translation", "in_memory_mb: expected an integer >= 0"),
    ]:
        c = defaults.base_config()
        c.task = task
        c.data = defaults.data_config(**data)
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            validated(c)


def test_a_run_keeps_its_fingerprint_while_the_new_options_stay_off(tmp_path):
    config = _config(tmp_path)
    before = ml_collections.ConfigDict(config.to_dict())  # a run saved before the options existed
    for name in ("lexicon_ratio", "lexicon_entries", "bidirectional", "in_memory_mb"):
        del before.data[name]
    assert datasets.fingerprint(before, None) == datasets.fingerprint(config, None)
    on = ml_collections.ConfigDict(config.to_dict())
    on.data.bidirectional = True
    assert datasets.fingerprint(on, None) != datasets.fingerprint(config, None)
    # The saved config reads back with the options off.
    assert [sources.field(before.data, n) for n in ("lexicon_ratio", "bidirectional")] == [0.0, False]
