"""The Ding parser and TFDS builder, and WMT14 through TFDS, all without TensorFlow."""

import ast
import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from attn_jax import defaults
from attn_jax.data import datasets, ding, ding_parser, pipeline, prepared, sources, tokenizer, wmt14
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
    return *(np.frombuffer(example[key], np.uint8).astype(np.int32) + 4 for key in ("en", "de")), ()


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
    # The real ArrayRecord source feeds preparation (reading several records per call), then the pipeline.
    prepared.encode_split(sources["test"], _utf8_bytes, tmp_path / "ids", vocab_size=260, examples_per_shard=40)
    split = prepared.load_split(tmp_path / "ids", num_examples=len(sources["test"]), examples_per_shard=40)
    config = pipeline.PipelineConfig(max_length=256, tokens_per_batch=2048, num_threads=0)
    batches = pipeline.eval_batches(split, config)
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


_original_sources = wmt14.wmt14_sources


@pytest.fixture
def mock_wmt(monkeypatch):
    """TFDS's mock WMT14 (24 pairs per split), read one record per call."""

    def mock_sources(data_dir):
        return {split: _OneByOne(source) for split, source in _original_sources(data_dir).items()}

    monkeypatch.setattr(wmt14, "wmt14_sources", mock_sources)
    with tfds.testing.mock_data(num_examples=24):
        yield


def _wmt_config(**data):
    c = defaults.base_config()
    c.data = defaults.data_config(
        name="wmt14_translate/de-en", vocab_size=32, tokenizer_type="unigram", max_length=32, tokens_per_batch=128,
        eval_tokens_per_batch=128, num_threads=0, prepare_workers=1, examples_per_shard=10, **data,
    )  # fmt: skip
    return c


@pytest.mark.parametrize("worker_count", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_wmt14_through_tfds_mock_data_with_preparation_and_packing(mock_wmt, tmp_path, worker_count):
    config = _wmt_config(packing=True, worker_count=worker_count)
    raw = wmt14.wmt14_sources(tmp_path / "tfds")
    built = datasets.build_datasets(config, tmp_path / "run", batch_multiple=2)
    expected_pairs = sources.text_pairs(raw["validation"], config.data)
    assert "tensorflow" not in sys.modules
    # The mock's strings feed the whole path: tokenizer, prepared ids (3 shards of 10), packed batches.
    assert (tmp_path / "run/tokenizer" / tokenizer.MODEL_FILE_NAME).is_file()
    (train_dir,) = (tmp_path / "run/prepared").glob("train-*")
    assert sorted(p.name for p in train_dir.glob("*.npz")) == [f"shard-0000{i}-of-00003.npz" for i in range(3)]
    report = built.report["train"]
    assert report["packing"] and report["num_examples"] == 24 and 0 <= report["padding_fraction"] < 1
    batch = next(built.train)
    assert set(batch) == {"inputs", "inputs_segment_ids", "inputs_positions", "targets_in", "targets_out",
                          "targets_segment_ids", "targets_positions"}  # fmt: skip
    rows, source_length = batch["inputs"].shape
    assert (rows, source_length, batch["targets_out"].shape[1]) in report["batch_shapes"]
    assert all(v.dtype == np.int32 for v in batch.values())
    np.testing.assert_array_equal(batch["inputs_segment_ids"] > 0, batch["inputs"] != 0)
    state = built.train.get_state()
    following = next(built.train)
    built.train.set_state(state)
    again = next(built.train)
    assert all(following[k].tobytes() == again[k].tobytes() for k in following)
    if hasattr(built.train, "close"):
        built.train.close()
    assert built.validation_pairs == expected_pairs and len(built.test_pairs) == 24
    # The first pair of a row reads back as one of the training references.
    decoded = tokenizer.decode(built.tokenizer, batch["targets_out"][0][batch["targets_segment_ids"][0] == 1])
    assert decoded in {de for _, de in sources.text_pairs(raw["train"], config.data)}


def test_readers_get_evaluation_data_without_the_training_split_or_writing_to_the_run(mock_wmt, tmp_path, monkeypatch):
    config = _wmt_config()
    trained = datasets.build_datasets(config, tmp_path / "run")
    before = sorted(str(p) for p in (tmp_path / "run").rglob("*"))

    class Unreadable:
        def __len__(self, *args):
            raise AssertionError("readers must not open the training split")

        __getitem__ = __getitems__ = __len__

    def no_training(*args, **kwargs):
        raise AssertionError("readers must not train a tokenizer")

    mock_sources = wmt14.wmt14_sources
    monkeypatch.setattr(wmt14, "wmt14_sources", lambda data_dir: mock_sources(data_dir) | {"train": Unreadable()})
    monkeypatch.setattr(tokenizer, "train_tokenizer", no_training)
    built = datasets.build_eval_datasets(config, tmp_path / "run")
    assert built.train is None and "train" not in built.report
    assert built.validation_pairs == trained.validation_pairs and built.test_pairs == trained.test_pairs
    expected = [b["targets_out"].tobytes() for b in trained.eval_batches()]
    assert [b["targets_out"].tobytes() for b in built.eval_batches()] == expected
    assert sorted(str(p) for p in (tmp_path / "run").rglob("*")) == before
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        datasets.build_eval_datasets(config, tmp_path / "empty")


def test_data_dir_defaults_to_tfds_data_dir(monkeypatch):
    data = defaults.data_config()
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    assert sources.data_dir(data) == sources.DEFAULT_DATA_DIR
    monkeypatch.setenv("TFDS_DATA_DIR", "/shared/tfds")
    assert sources.data_dir(data) == "/shared/tfds"
    data.data_dir = "/mine"
    assert sources.data_dir(data) == "/mine"


def test_wmt14_experiment_computes_in_bfloat16_on_accelerators_only_and_starts_no_backend(monkeypatch):
    from attn_jax.config import load_experiment

    spec = str(pathlib.Path(__file__).resolve().parents[1] / "experiments" / "wmt14_en_de.py")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    config = load_experiment(spec)
    assert config.model.dtype == "float32" and config.data.packing and config.data.worker_count == 0
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    config = load_experiment(spec)
    assert config.model.dtype == "bfloat16" and config.data.worker_count == 8
    assert load_experiment(spec + ":runlocal").data.worker_count == 0
    # Deciding must not start JAX's backends: a multi-host run calls jax.distributed.initialize afterwards.
    probe = (
        "import sys; sys.path.insert(0, 'experiments'); import wmt14_en_de; wmt14_en_de.get_config(); "
        "from jax._src import xla_bridge; assert not xla_bridge.backends_are_initialized()"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    done = subprocess.run([sys.executable, "-c", probe], cwd=spec.rsplit("/experiments/", 1)[0], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
