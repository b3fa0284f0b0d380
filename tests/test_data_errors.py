"""Bad records never crash a run and are never silent: empty sides, over-long pairs, invalid UTF-8 and control
characters are handled by config and counted in the data report; a missing data set names its fix.

The corrupt corpus is generated here and fed through ``build_datasets``'s WMT path (the real tokenizer
training, preparation and Grain pipeline) in place of the TFDS download.
"""

import inspect
import random
import unicodedata

import pytest

from attn_jax import defaults
from attn_jax.config import ConfigError, check_values
from attn_jax.data import datasets as datasets_lib
from attn_jax.data import encoding, wmt14
from attn_jax.data.text import DataError, clean_text
from attn_jax.main import main

WORDS = ["the", "house", "is", "small", "and", "old", "we", "see", "a", "dog", "cat", "tree"]
WÖRTER = ["das", "Haus", "ist", "klein", "und", "alt", "wir", "sehen", "einen", "Hund", "Katze", "Baum"]
BAD_UTF8, EMPTY, CONTROL, OVERLONG = 3, 5, 7, 9  # record indices of the training split


def _pair(rng: random.Random) -> dict:
    n = rng.randint(3, 8)
    return {"en": " ".join(rng.choices(WORDS, k=n)).encode(), "de": " ".join(rng.choices(WÖRTER, k=n)).encode()}


def _corpus() -> dict[str, list[dict]]:
    rng = random.Random(0)
    splits = {split: [_pair(rng) for _ in range(size)] for split, size in (("train", 64), ("validation", 8),
                                                                           ("test", 8))}  # fmt: skip
    train = splits["train"]
    train[BAD_UTF8]["en"] = b"the house \xff\xfe is old"
    train[EMPTY]["de"] = b""
    train[CONTROL]["de"] = "das Haus\x00 ist\x0c alt\u0085".encode()  # NUL, form feed, C1 NEL
    train[OVERLONG]["en"] = " ".join(["house"] * 200).encode()
    return splits


def _config(arg=None, **data):
    c = defaults.base_config()
    c.data = defaults.data_config(
        name="wmt14_translate/de-en", vocab_size=48, tokenizer_type="unigram", max_length=24,
        tokens_per_batch=96, eval_tokens_per_batch=96, num_threads=0, **data,
    )  # fmt: skip
    c.model = defaults.model_config(d_model=16, num_heads=2, d_ff=32, num_encoder_layers=1, num_decoder_layers=1)
    return c


@pytest.fixture
def corrupt_wmt(monkeypatch):
    corpus = _corpus()
    monkeypatch.setattr(wmt14, "wmt14_sources", lambda data_dir: corpus)
    return corpus


@pytest.mark.parametrize("overlong", ["drop", "truncate"])
def test_bad_records_are_handled_and_counted(corrupt_wmt, tmp_path, overlong):
    built = datasets_lib.build_datasets(_config(overlong=overlong), tmp_path)
    report = built.report["train"]
    assert report["invalid_utf8"] == 1
    assert report["control_characters"] == 1
    assert report["dropped_empty"] == 1
    assert (report["dropped_too_long"], report["truncated"]) == ((1, 0) if overlong == "drop" else (0, 1))
    # Every batch is well formed: ids inside the vocabulary, no over-long rows, the dropped records absent.
    batch = next(built.train)
    assert batch["inputs"].min() >= 0 and batch["inputs"].max() < 48
    assert batch["inputs"].shape[1] <= 24


def test_invalid_utf8_error_policy_names_the_record(corrupt_wmt, tmp_path):
    with pytest.raises(DataError, match=rf"record {BAD_UTF8} of .*feature 'en': invalid UTF-8 at byte 10"):
        datasets_lib.build_datasets(_config(invalid_utf8="error"), tmp_path)


def test_invalid_utf8_in_a_validation_reference_names_split_record_and_feature(corrupt_wmt, tmp_path):
    corrupt_wmt["train"][BAD_UTF8]["en"] = b"the house is old"
    corrupt_wmt["validation"][2]["de"] = b"das \xc3 Haus"
    with pytest.raises(DataError, match=r"record 2\b.*feature 'de': invalid UTF-8 at byte 4"):
        datasets_lib.build_datasets(_config(invalid_utf8="error"), tmp_path)
    # Under "replace" the reference keeps its words, with U+FFFD for the broken byte.
    built = datasets_lib.build_datasets(_config(), tmp_path / "replace")
    assert built.validation_pairs[2][1] == "das \ufffd Haus"


def test_unknown_invalid_utf8_policy_is_a_config_error():
    c = _config(invalid_utf8="ignore")
    with pytest.raises(ConfigError, match="config.data.invalid_utf8"):
        check_values(c)


def test_clean_text_against_unicode_categories():
    """Random text over letters, spaces and every C0/C1 control: the output has no character of category Cc,
    keeps every other character in order, and is flagged exactly when a control was present."""
    rng = random.Random(1)
    alphabet = [*"aäß €", *map(chr, range(0x20)), "\x7f", *map(chr, range(0x80, 0xA0))]
    for _ in range(500):
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 12)))
        cleaned, issues = clean_text(text)
        has_control = any(unicodedata.category(ch) == "Cc" for ch in text)
        assert not any(unicodedata.category(ch) == "Cc" for ch in cleaned)
        assert cleaned.replace(" ", "") == "".join(ch for ch in text if unicodedata.category(ch) != "Cc").replace(
            " ", ""
        )
        assert issues == (("control_characters",) if has_control else ())


def test_clean_text_replaces_invalid_utf8_as_python_does():
    raw = b"G\xc3\xbcte \xe2\x82 und \xff"
    cleaned, issues = clean_text(raw)
    assert cleaned == raw.decode("utf-8", errors="replace")
    assert issues == ("invalid_utf8",)
    assert clean_text("schön".encode()) == ("schön", ())


def test_cli_reports_a_data_error_in_one_line(corrupt_wmt, tmp_path, capsys):
    spec = tmp_path / "corrupt.py"  # an experiment file holding this module's config
    spec.write_text(f"from attn_jax import defaults\n\n{inspect.getsource(_config)}\nget_config = _config\n")
    argv = ["train", "--config", str(spec), "--workdir", str(tmp_path / "run"), "--config.data.invalid_utf8=error"]
    status = main(argv)
    err = capsys.readouterr().err.strip()
    assert status == 1
    assert err.startswith(f"attn-jax: data error: record {BAD_UTF8} of ") and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_prepared_ids_keep_the_issue_counts_and_are_not_encoded_again(corrupt_wmt, tmp_path, monkeypatch):
    first = datasets_lib.build_datasets(_config(), tmp_path).report["train"]
    assert sorted(path.name.split("-")[0] for path in (tmp_path / "prepared").iterdir()) == ["train", "validation"]

    def no_encoding(self, example):
        raise AssertionError("prepared ids must be read back, not encoded again")

    monkeypatch.setattr(encoding.TextPairEncoder, "__call__", no_encoding)
    again = datasets_lib.build_datasets(_config(), tmp_path).report["train"]
    assert {k: again[k] for k in ("invalid_utf8", "control_characters")} == {"invalid_utf8": 1, "control_characters": 1}
    assert first == again
