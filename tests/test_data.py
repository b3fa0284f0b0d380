"""The Ding parser and TFDS builder, and WMT14 through TFDS, all without TensorFlow."""

import ast
import importlib.util
import pathlib
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from attn_jax.data import ding, ding_parser, encoding, pipeline, tokenizer, wmt14
from attn_jax.data.ding_parser import DingPair

# Lines in the Ding format, with what each should give. Written by hand: the real file is GPL and is
# read at run time only.
_HANDWRITTEN = [
    b"# Version :: devel 2023-01-30",
    b"# License :: GPL Version 2 or later; GNU General Public License",
    # Headword, plural, then a usage sentence with labels; one sentence pair.
    b"Sonnenbrand {m} [med.] | Sonnenbrand\xc3\xa4nde {pl} | Haben Sie etwas gegen Sonnenbrand? :: "
    b"sunburn | sunburns | Have you anything for sunburn?",
    # Synonyms: the first full sentence on each side wins; "[Sprw.]", "<rasten>" and "[prov.]" go.
    b"Wer rastet, der rostet. [Sprw.] <rasten> :: A rolling stone gathers no moss. [prov.]; Use it or lose it. [prov.]",
    # Optional words in parentheses go; a tag holding ";" is removed before splitting synonyms.
    b"Glaubst du, er kommt (noch)? {prp; +Dat.} :: Do you suppose (that) he will come?",
    # An abbreviation and an annotation go; an inline alternative "ist/wird" stays.
    b"Das ist/wird teuer! /DIT/ (Chat-Jargon) :: That is expensive! /TIE/ (chat jargon)",
    # A duplicate of the first sentence pair, and a second target for the same source.
    b"Sonnenbrand {m} | Haben Sie etwas gegen Sonnenbrand? :: sunburn | Have you anything for sunburn?",
    b"Haben Sie was gegen Sonnenbrand? :: Have you anything for sunburn?",
    # Not sentences: templates with placeholders, an ellipsis, a lone word, lowercase start.
    b"jdm. etw. verwehren {vt} | Revival von etw. :: to refuse sb. sth. | Revival of sth.",
    b"Wie es sich geziemt \xe2\x80\xa6 :: As befits \xe2\x80\xa6",
    b"Aha! {interj} :: I see!",
    # Phrases (usage examples without a grammar tag), kept only with phrases=True.
    b"Sonnenbrand bekommen | einen Sonnenbrand haben :: to get sunburn | to have a sunburn",
    # A tagged multi-word headword is a term, not a phrase.
    b"A- und B-Boden {m} :: A and B horizons",
    # Broken lines: bad UTF-8, no separator, unaligned sub-entries.
    b"Kaputt \xff\xfe ist das. :: Broken it is.",
    b"no separator here.",
    b"Eins. | Zwei. :: One.",
    b"",
]
_SENTENCES = [
    DingPair("Have you anything for sunburn?", "Haben Sie etwas gegen Sonnenbrand?", "sentence"),
    DingPair("A rolling stone gathers no moss.", "Wer rastet, der rostet.", "sentence"),
    DingPair("Do you suppose he will come?", "Glaubst du, er kommt?", "sentence"),
    DingPair("That is expensive!", "Das ist/wird teuer!", "sentence"),
    DingPair("Have you anything for sunburn?", "Haben Sie was gegen Sonnenbrand?", "sentence"),
]
_PHRASES = [
    DingPair("to get sunburn", "Sonnenbrand bekommen", "phrase"),
    DingPair("to have a sunburn", "einen Sonnenbrand haben", "phrase"),
]


def _generated_lines(count: int) -> list[bytes]:
    """Many sentence entries, enough for every split to get some."""
    return [
        f"Satz {{m}} | Das ist Satz Nummer {i}. [ugs.] :: sentence | This is sentence number {i}.".encode()
        for i in range(count)
    ]


def _utf8_bytes(example):
    """A tokenizer-free encoder: one id per UTF-8 byte."""
    return tuple(np.frombuffer(example[key], np.uint8).astype(np.int32) + 4 for key in ("en", "de"))


@pytest.fixture
def ding_file(tmp_path):
    path = tmp_path / "de-en"
    path.write_bytes(b"\n".join(_HANDWRITTEN + _generated_lines(300)) + b"\n")
    return path


def test_parse_handwritten_lines():
    pairs, stats = ding_parser.parse_ding(_HANDWRITTEN)
    assert pairs == _SENTENCES
    assert (stats.bad_utf8, stats.malformed, stats.duplicates) == (1, 2, 1)
    assert (stats.sentences, stats.phrases, stats.lines) == (5, 0, len(_HANDWRITTEN))


def test_parse_with_phrases():
    pairs, stats = ding_parser.parse_ding(_HANDWRITTEN, phrases=True)
    assert [p for p in pairs if p.kind == "phrase"] == _PHRASES
    assert [p for p in pairs if p.kind == "sentence"] == _SENTENCES
    assert stats.phrases == 2


def test_split_is_deterministic_disjoint_and_keyed_on_source():
    pairs, _ = ding_parser.parse_ding(_HANDWRITTEN + _generated_lines(2000), phrases=True)
    splits = ding_parser.split_pairs(pairs)
    assert splits == ding_parser.split_pairs(list(pairs))
    # The split of a pair depends on the pair alone, not on its neighbours or their order.
    backwards = ding_parser.split_pairs(pairs[::-1])
    assert {name: split[::-1] for name, split in backwards.items()} == splits
    keys = {name: {"".join(c for c in p.en.casefold() if c.isalnum()) for p in split} for name, split in splits.items()}
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    # Both targets of "Have you anything for sunburn?" land in the same split.
    assert len({ding_parser.split_of(p.en) for p in _SENTENCES if "sunburn" in p.en}) == 1
    # About 5% each; phrases only in train.
    assert 50 <= len(splits["validation"]) <= 150 and 50 <= len(splits["test"]) <= 150
    assert all(p.kind == "sentence" for p in splits["validation"] + splits["test"])
    assert sum(map(len, splits.values())) == len(pairs) - sum(
        p.kind == "phrase" and ding_parser.split_of(p.en) != "train" for p in pairs
    )


def test_data_package_imports_no_model_code():
    # attn_jax.hosts is the multi-host barrier: process 0 trains the tokenizer while the others wait.
    for path in pathlib.Path(ding.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "attn_jax":
                modules = [f"attn_jax.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            for module in modules:
                if module.startswith("attn_jax"):
                    assert module.startswith("attn_jax.data") or module == "attn_jax.hosts", f"{path.name}: {module}"


def test_tensorflow_is_absent():
    assert importlib.util.find_spec("tensorflow") is None
    assert "tensorflow" not in sys.modules


def test_build_tfds_dataset_and_read_with_data_source(ding_file, tmp_path):
    sources = ding.ding_sources(tmp_path / "tfds", ding_file=ding_file, cache_dir=None)
    pairs, _ = ding_parser.parse_ding(ding_file.read_bytes().split(b"\n"))
    expected = ding_parser.split_pairs(pairs)
    for name in ding_parser.SPLITS:
        read = {(example["en"].decode(), example["de"].decode()) for example in sources[name]}
        assert read == {(p.en, p.de) for p in expected[name]}, name
        assert len(sources[name]) == len(expected[name])
    # The real ArrayRecord source feeds the pipeline (reading several records per call).
    config = pipeline.PipelineConfig(max_length=256, tokens_per_batch=2048, num_threads=0)
    batches = pipeline.eval_batches(sources["test"], _utf8_bytes, config)
    seen = np.concatenate([batch["example_index"] for batch in batches])
    assert sorted(seen[seen >= 0].tolist()) == list(range(len(sources["test"])))
    assert (tmp_path / "tfds/ding_en_de/sentences/1.0.0").is_dir()
    assert list((tmp_path / "tfds/ding_en_de/sentences/1.0.0").glob("*.array_record-*"))
    assert "tensorflow" not in sys.modules
    # A second call reads what is there, even without the file.
    again = ding.ding_sources(tmp_path / "tfds", cache_dir=None, download=False)
    assert len(again["train"]) == len(sources["train"])


def test_builder_reads_manual_dir(ding_file, tmp_path):
    manual = tmp_path / "tfds/downloads/manual"
    manual.mkdir(parents=True)
    (manual / "de-en").write_bytes(ding_file.read_bytes())
    sources = ding.ding_sources(tmp_path / "tfds", phrases=True, cache_dir=None)
    phrases = {(e["en"].decode(), e["de"].decode()) for e in sources["train"]} & {(p.en, p.de) for p in _PHRASES}
    assert phrases == {(p.en, p.de) for p in _PHRASES if ding_parser.split_of(p.en) == "train"}


def test_missing_file_error_names_the_command(tmp_path, monkeypatch):
    with pytest.raises(ding.DingFileNotFoundError, match="apt-get download trans-de-en"):
        ding.find_ding_file(manual_dir=tmp_path, cache_dir=None)
    with pytest.raises(ding.DingFileNotFoundError, match="does not exist"):
        ding.find_ding_file(tmp_path / "nowhere")
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get, no dpkg
    with pytest.raises(ding.DingFileNotFoundError, match="apt-get and dpkg not found"):
        ding.fetch_ding_file(tmp_path / "cache")


@pytest.mark.slow
def test_real_ding_file_counts():
    """Parses the Debian file if a previous run fetched it into the cache; fetches nothing."""
    path = ding.DEFAULT_CACHE_DIR / ding.DING_FILE_NAME
    if not path.is_file():
        pytest.skip(f"{path} absent; fetch it with attn_jax.data.fetch_ding_file()")
    with open(path, "rb") as lines:
        pairs, stats = ding_parser.parse_ding(lines)
    assert 19_000 <= stats.sentences <= 22_000, stats
    assert stats.bad_utf8 == 0 and stats.malformed == 0
    splits = ding_parser.split_pairs(pairs)
    assert 800 <= len(splits["validation"]) <= 1_200 and 800 <= len(splits["test"]) <= 1_200


class _OneByOne:
    """Hides ``__getitems__``, which TFDS 4.9.10's mock sets as a plain attribute of a MagicMock, so it is
    called without ``self`` and fails; real ArrayRecord sources have a working one."""

    def __init__(self, source):
        self._source = source

    def __len__(self):
        return len(self._source)

    def __getitem__(self, index):
        return self._source[index]


def test_wmt14_through_tfds_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=24):
        sources = wmt14.wmt14_sources(tmp_path)
    assert set(sources) == {"train", "validation", "test"}
    assert len(sources["train"]) == 24
    example = sources["train"][3]
    assert set(example) == {"en", "de"}
    # The mock's strings feed the whole path: tokenizer, then batches.
    spm = tokenizer.train_tokenizer(
        tokenizer.training_texts(sources["train"]), tmp_path / "work", vocab_size=32, model_type="unigram"
    )
    config = pipeline.PipelineConfig(max_length=64, tokens_per_batch=256, num_threads=0)
    validation = _OneByOne(sources["validation"])
    batches = pipeline.eval_batches(validation, encoding.text_pair_encoder(spm), config)
    seen = np.concatenate([batch["example_index"] for batch in batches])
    assert sorted(seen[seen >= 0].tolist()) == list(range(24))
    batch = next(iter(batches))
    assert batch["inputs"].dtype == np.int32
    assert batch["inputs"].shape in batches.stats.batch_shapes
    assert "tensorflow" not in sys.modules
