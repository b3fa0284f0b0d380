"""Tests of the ``attn-jax`` command line (attn_jax/main.py, attn_jax/commands.py).

Configuration errors must be one line on stderr and exit status 2, before anything compiles. The end-to-end
test runs ``train``, ``eval``, ``translate`` and ``average`` on ``experiments/ding_en_de.py`` with a small
generated file in the Ding dictionary's format (the real one is GPL and fetched at run time only).

``train_step`` calls ``optax.global_norm``, deprecated in Optax 0.2.8; the end-to-end test ignores that one
warning (tests/test_train.py has the test that fails on it).
"""

import io
import itertools
import json
import pathlib
import subprocess
import sys

import pytest

from attn_jax.main import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "experiments" / "tiny.py")
DING = str(ROOT / "experiments" / "ding_en_de.py")
GLOBAL_NORM_DEPRECATION = "ignore:optax.global_norm is deprecated:DeprecationWarning"


def _config_error(capsys, argv: list[str], *fragments: str) -> str:
    """Runs ``main(argv)``, expects status 2 and one ``attn-jax: config error:`` line naming ``fragments``."""
    status = main(argv)
    captured = capsys.readouterr()
    assert status == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("attn-jax: config error: ")
    assert "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def _train_argv(tmp_path, config=TINY, *overrides):
    return ["train", "--config", config, "--workdir", str(tmp_path / "run"), *overrides]


# ---------------------------------------------------------------------------------------------------------
# Configuration errors: one line, status 2, nothing trained
# ---------------------------------------------------------------------------------------------------------


def test_mistyped_override_key_is_one_line_naming_it(capsys, tmp_path):
    line = _config_error(capsys, _train_argv(tmp_path, TINY, "--config.train.stepz=3"), "config.train.stepz")
    assert "did you mean 'config.train.steps'" in line
    assert not (tmp_path / "run").exists()  # failed before the workdir was made


def test_override_value_of_the_wrong_type_is_one_line_naming_the_field(capsys, tmp_path):
    _config_error(capsys, _train_argv(tmp_path, TINY, "--config.train.steps=many"), "config.train.steps", "many")


def test_inconsistent_model_override_is_one_line_naming_the_field(capsys, tmp_path):
    _config_error(capsys, _train_argv(tmp_path, TINY, "--config.model.num_heads=7"), "config.model.num_heads")


def test_wrong_type_for_a_placeholder_field_is_one_line_naming_it(capsys, tmp_path):
    # model.head_dim is an int placeholder (None in the file); "abc" must be a config error, not a traceback.
    _config_error(capsys, _train_argv(tmp_path, TINY, "--config.model.head_dim=abc"), "config.model.head_dim")


def test_eval_reports_config_errors_the_same_way(capsys, tmp_path):
    argv = ["eval", "--config", TINY, "--workdir", str(tmp_path), "--config.eval.beem_size=2"]
    _config_error(capsys, argv, "config.eval.beem_size", "config.eval.beam_size")


def test_unknown_experiment_argument_is_a_config_error(capsys, tmp_path):
    _config_error(capsys, _train_argv(tmp_path, f"{ROOT / 'experiments' / 'copy_task.py'}:reverze"), "reverze")


def test_bad_experiment_argument_value_is_a_config_error(capsys, tmp_path):
    # A size the experiment does not know is as much a configuration error as an unknown argument.
    _config_error(capsys, _train_argv(tmp_path, f"{ROOT / 'experiments' / 'wmt14_en_de.py'}:size=huge"), "huge")


def test_missing_experiment_file_is_a_config_error(capsys, tmp_path):
    _config_error(capsys, _train_argv(tmp_path, str(tmp_path / "nowhere.py")), "nowhere.py", "not found")


def test_translate_in_a_directory_that_is_not_a_run_is_a_config_error(capsys, tmp_path):
    _config_error(capsys, ["translate", "--workdir", str(tmp_path), "Hello."], "config.json")


def test_arguments_that_are_not_config_overrides_are_usage_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(_train_argv(tmp_path, TINY, "--steps=3"))
    assert info.value.code == 2
    assert "unrecognized arguments: --steps=3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["average", "--workdir", str(tmp_path), "--last", "2", "--config.train.steps=3"])
    assert info.value.code == 2
    assert "takes no --config" in capsys.readouterr().err


def test_python_dash_m_help_lists_the_subcommands():
    result = subprocess.run(
        [sys.executable, "-m", "attn_jax", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "usage: attn-jax" in result.stdout
    for command in ("train", "eval", "translate", "average"):
        assert command in result.stdout
    sub = subprocess.run(
        [sys.executable, "-m", "attn_jax", "train", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert sub.returncode == 0 and "--workdir" in sub.stdout and "--config" in sub.stdout


# ---------------------------------------------------------------------------------------------------------
# End to end on a generated Ding file: train, eval, translate, average
# ---------------------------------------------------------------------------------------------------------

_SUBJECTS = [("The dog", "Der Hund"), ("The cat", "Die Katze"), ("My father", "Mein Vater"),
             ("The teacher", "Der Lehrer"), ("Our neighbour", "Unser Nachbar"), ("The child", "Das Kind")]  # fmt: skip
_VERBS = [("sees", "sieht"), ("likes", "mag"), ("finds", "findet"), ("needs", "braucht"), ("buys", "kauft")]
_OBJECTS = [("the house", "das Haus"), ("a book", "ein Buch"), ("the car", "das Auto"),
            ("the garden", "den Garten"), ("a letter", "einen Brief")]  # fmt: skip
_TIMES = [("today", "heute"), ("every day", "jeden Tag"), ("again", "wieder"), ("now", "jetzt")]


def _ding_lines() -> list[bytes]:
    """600 distinct sentence pairs, one Ding entry a line: ``German :: English``, behind a header."""
    lines = [b"# Version :: test", b"# License :: written for this test"]
    for (s_en, s_de), (v_en, v_de), (o_en, o_de), (t_en, t_de) in itertools.product(
        _SUBJECTS, _VERBS, _OBJECTS, _TIMES
    ):
        lines.append(f"{s_de} {v_de} {t_de} {o_de}. :: {s_en} {v_en} {o_en} {t_en}.".encode())
    return lines


DING_OVERRIDES = [
    "--config.data.vocab_size=128",
    "--config.data.tokens_per_batch=512",
    "--config.data.eval_tokens_per_batch=512",
    "--config.data.num_threads=0",
    "--config.model.d_model=32",
    "--config.model.num_heads=2",
    "--config.model.d_ff=64",
    "--config.model.num_encoder_layers=1",
    "--config.model.num_decoder_layers=1",
    "--config.model.max_len=64",
    "--config.train.steps=10",
    "--config.train.warmup_steps=5",
    "--config.train.time_budget_minutes=0",
    "--config.train.log_every=5",
    "--config.train.checkpoint_every=5",
    "--config.train.eval_every=1000",
    "--config.eval.beam_size=2",
    "--config.eval.extra_length=5",
    "--config.eval.batch_size=4",  # = the sentences translated below, so decoding compiles once per process
    "--config.eval.attention_plots=0",
]


@pytest.mark.slow
@pytest.mark.filterwarnings(GLOBAL_NORM_DEPRECATION)
def test_train_eval_translate_and_average_on_a_generated_ding_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the Ding cache directory is relative to the working directory
    ding_file = tmp_path / "de-en"
    ding_file.write_bytes(b"\n".join(_ding_lines()) + b"\n")
    workdir = tmp_path / "run"
    data = [f"--config.data.ding_file={ding_file}", f"--config.data.data_dir={tmp_path / 'tfds'}"]
    common = ["--config", DING, "--workdir", str(workdir), *data, *DING_OVERRIDES]

    assert main(["train", *common]) == 0
    capsys.readouterr()
    assert (workdir / "tokenizer").is_dir()
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [5, 10]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [5, 10]
    assert "bleu" in json.loads((workdir / "results.json").read_text())["test"]

    assert main(["eval", *common]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert {"loss", "accuracy", "perplexity", "bleu"} <= set(evaluated["validation"])
    assert 0.0 <= evaluated["test"]["bleu"] <= 100.0

    sentences = ["The dog sees the house today.", "Where is the station?", "The cat buys a letter now.", "Hello."]
    assert main(["translate", "--workdir", str(workdir), *sentences]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and len(out.splitlines()) == len(sentences), out
    # Without arguments it translates stdin, one line out per line in.
    stdin = "The child needs a book again.\nMy father finds the car.\n\nOur neighbour likes the garden now.\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert main(["translate", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and len(out.splitlines()) == 4, out  # the empty line too

    assert main(["average", "--workdir", str(workdir), "--last", "2"]) == 0
    assert "[5, 10]" in capsys.readouterr().out
    assert (workdir / "checkpoints" / "averaged" / "10").is_dir()
    # The training run's own checkpoints are untouched.
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [5, 10]

    # Resuming with a model whose shapes differ from the checkpoint's: a config error, the checkpoints kept.
    capsys.readouterr()
    assert main(["train", *common, "--config.model.d_ff=40"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attn-jax: config error: restore target does not match checkpoint") and "w_1" in err
    assert "Traceback" not in err
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [5, 10]
