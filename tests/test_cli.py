"""Tests of the ``attn-jax`` command line (attn_jax/main.py, attn_jax/commands.py).

Configuration errors must be one line on stderr and exit status 2, before anything compiles. The workflows
(train, eval, translate, average, several processes) are in tests/test_workflows.py.
"""

import pathlib
import subprocess
import sys

import pytest

from attn_jax.main import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "experiments" / "tiny.py")


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


def test_unknown_data_set_name_is_a_config_error(capsys, tmp_path):
    _config_error(capsys, _train_argv(tmp_path, TINY, "--config.data.name=wmt14"), "config.data.name", "wmt14")
    assert not (tmp_path / "run").exists()


def test_an_argument_the_experiment_does_not_define_is_a_config_error(capsys, tmp_path):
    _config_error(capsys, _train_argv(tmp_path, f"{TINY}:nonsense"), "tiny.py", "takes no argument", "nonsense")


def test_space_separated_override_is_the_same_as_the_equals_form(capsys, tmp_path):
    # Both forms reach the same field; a wrong value in the spaced form is the same one-line error.
    _config_error(capsys, _train_argv(tmp_path, TINY, "--config.train.steps", "many"), "config.train.steps", "many")
    _config_error(capsys, _train_argv(tmp_path, TINY, "--config.train.steps", "0"), "config.train.steps", "got 0")


def test_train_help_lists_experiments_and_every_config_field_with_its_default():
    result = subprocess.run([sys.executable, "-m", "attn_jax", "train", "--help"], capture_output=True, text=True,
                            timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for experiment in ("experiments/ding_en_de.py", "experiments/copy_task.py", "experiments/wmt14_en_de.py"):
        assert experiment in out
    assert "--config.SECTION.FIELD=VALUE" in out
    # A field from each section, with its default and its one-line comment from attn_jax/defaults.py.
    assert "train.steps = 100000  optimiser updates" in out
    assert "model.d_model = 512  D = d_model" in out
    assert "data.max_length = 64  tokens per side" in out
    assert "eval.beam_size = 4" in out and "parallel.strategy = 'jit'" in out
    for markup in ("``", ":func:", ":class:", ".. "):
        assert markup not in out, markup
