"""Tests for attn_jax.config and the shipped experiment files: loading, overrides, validation.

Expected values of the WMT experiments come from the paper (§5 and Table 3), not from the files.
"""

import pathlib

import ml_collections
import pytest

from attn_jax import TransformerConfig
from attn_jax.config import ConfigError, apply_overrides, flatten, load_experiment, model_config, parse_arg
from attn_jax.defaults import base_config
from attn_jax.families import family

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"


def _load(spec: str, *overrides: str) -> ml_collections.ConfigDict:
    return load_experiment(str(EXPERIMENTS / spec), list(overrides))


# ---------------------------------------------------------------------------------------------------------
# The shipped experiment files
# ---------------------------------------------------------------------------------------------------------

SHIPPED = [
    "copy_task.py",
    "copy_task.py:reverse",
    "copy_task.py:reverse=false,steps=50",
    "tiny.py",
    "ding_en_de.py",
    "ding_en_de.py:phrases,minutes=1.5",
    "ding_en_de.py:hour",
    "ding_en_de.py:hour,lexicon=0,minutes=30",
    "wmt14_en_de.py",
    "wmt14_en_de.py:size=big",
    "wmt14_en_de.py:size=base,runlocal",
    "wmt14_en_de.py:size=big,runlocal",
    "lm_ding_de.py",
    "lm_ding_de.py:minutes=2",
    "rnnsearch_ding_en_de.py",
    "rnnsearch_ding_en_de.py:score=dot",
    "rnn_encdec_ding_en_de.py:forward,minutes=5",
]


@pytest.mark.parametrize("spec", SHIPPED)
def test_every_shipped_experiment_loads_and_builds_its_model_config(spec):
    config = _load(spec)
    cfg = model_config(config)
    if config.model.family == "transformer":
        assert isinstance(cfg, TransformerConfig)
        assert cfg.d_model == config.model.d_model and cfg.num_heads == config.model.num_heads
    else:  # a recurrent family (attn_jax.families): d_model is its decoder state
        assert family(cfg).name == config.model.family and cfg.d_model == config.model.d_model
    expected_vocab = config.data.copy.vocab_size if config.data.name == "copy" else config.data.vocab_size
    assert cfg.vocab_size == expected_vocab
    assert config.task in ("translation", "lm")
    if config.task == "lm":
        assert cfg.num_decoder_layers > 0
    # Every section the loop reads is there, and the config is locked against new keys.
    for section in ("train", "eval", "parallel", "data", "model"):
        assert isinstance(config[section], ml_collections.ConfigDict), section
    assert config.is_locked
    with pytest.raises(AttributeError):
        config.train.stepz = 3


def test_every_experiment_file_is_covered():
    covered = {spec.split(":")[0] for spec in SHIPPED}
    files = {p.name for p in EXPERIMENTS.glob("*.py")}  # experiment files only: benchmarks live in attn_jax/bench
    assert files == covered


def test_wmt14_base_is_the_papers_setup():
    config = _load("wmt14_en_de.py:size=base")
    cfg = model_config(config)
    # Table 3, "base".
    assert (cfg.d_model, cfg.num_heads, cfg.d_ff, cfg.num_encoder_layers, cfg.num_decoder_layers) == (
        512,
        8,
        2048,
        6,
        6,
    )
    assert cfg.dropout_rate == 0.1 and cfg.resolved_head_dim == 64
    assert cfg.vocab_size == 37000  # §5.1: shared source-target vocabulary of about 37000 tokens
    assert config.train.steps == 100_000  # §5.2
    # §5.3: Adam(0.9, 0.98, 1e-9), warmup_steps = 4000; §5.4: label smoothing 0.1.
    assert (config.train.b1, config.train.b2, config.train.eps) == (0.9, 0.98, 1e-9)
    assert config.train.warmup_steps == 4000 and config.train.learning_rate_scale == 1.0
    assert config.train.label_smoothing == 0.1
    # §6.1: beam 4, length penalty 0.6, maximum output length input + 50; average the last 5 checkpoints.
    assert (config.eval.beam_size, config.eval.alpha, config.eval.extra_length) == (4, 0.6, 50)
    assert config.train.keep_checkpoints >= 5
    assert config.data.tokens_per_batch == 25_000  # §5.1: ~25000 source and ~25000 target tokens


def test_wmt14_big_is_the_papers_big_model():
    config = _load("wmt14_en_de.py:size=big")
    cfg = model_config(config)
    assert (cfg.d_model, cfg.num_heads, cfg.d_ff, cfg.dropout_rate) == (1024, 16, 4096, 0.3)  # Table 3
    assert config.train.steps == 300_000  # §5.2
    assert config.train.keep_checkpoints >= 20  # §6.1: the big models average the last 20


def test_runlocal_shrinks_the_run_but_not_the_model():
    base = _load("wmt14_en_de.py:size=base")
    local = _load("wmt14_en_de.py:size=base,runlocal")
    assert local.train.steps < base.train.steps
    assert local.data.tokens_per_batch < base.data.tokens_per_batch
    assert model_config(local) == model_config(base)


def test_copy_reverse_argument_reaches_the_data_section():
    assert _load("copy_task.py").data.copy.reverse is False
    assert _load("copy_task.py:reverse").data.copy.reverse is True
    assert _load("copy_task.py:steps=50").train.steps == 50


def test_ding_arguments():
    config = _load("ding_en_de.py:phrases,minutes=1.5")
    assert config.data.phrases is True
    assert config.train.time_budget_minutes == 1.5
    assert _load("ding_en_de.py").data.phrases is False


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("ding_en_de.py", False),
        ("ding_en_de.py:bidirectional", True),
        ("ding_en_de.py:hour", False),  # the hour preset is the same recipe, trained longer
        ("ding_en_de.py:hour,bidirectional", True),
        ("ding_en_de.py:bidirectional=false", False),
        ("ding_en_de.py:bidirectional=True", True),
    ],
)
def test_ding_bidirectional_argument_turns_both_directions_on_and_off(spec, expected):
    assert _load(spec).data.bidirectional is expected


def test_ding_bidirectional_argument_rejects_other_words():
    with pytest.raises(ConfigError, match="argument bidirectional: expected bool, got 'maybe'"):
        _load("ding_en_de.py:bidirectional=maybe")


def test_lm_experiment_is_a_decoder_only_model():
    config = _load("lm_ding_de.py")
    assert config.task == "lm"
    assert config.model.num_encoder_layers == 0


# ---------------------------------------------------------------------------------------------------------
# Overrides: parsing by the type of the value replaced
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("train.steps=3", "train.steps", 3),
        ("--config.train.steps=7", "train.steps", 7),
        ("config.train.steps= 11 ", "train.steps", 11),
        ("train.learning_rate_scale=2", "train.learning_rate_scale", 2.0),
        ("train.label_smoothing=0.25", "train.label_smoothing", 0.25),
        ("train.eps=1e-8", "train.eps", 1e-8),
        ("model.scan_layers=false", "model.scan_layers", False),
        ("model.scan_layers=True", "model.scan_layers", True),
        ("model.remat=1", "model.remat", True),
        ("model.remat=no", "model.remat", False),
        ("model.positions=learned", "model.positions", "learned"),
        ("data.data_dir=", "data.data_dir", ""),
        ("model.head_dim=16", "model.head_dim", 16),
        ("model.num_kv_heads=None", "model.num_kv_heads", None),
        ("model.attention_implementation=xla", "model.attention_implementation", "xla"),
        ("data.copy.reverse=true", "data.copy.reverse", True),
    ],
)
def test_overrides_take_the_type_of_the_value_they_replace(override, key, expected):
    config = _load("tiny.py", override)
    value = flatten(config)[key]
    assert value == expected
    assert type(value) is type(expected)


def test_placeholder_set_from_the_command_line_reaches_the_model_config():
    assert model_config(_load("tiny.py")).resolved_head_dim == 16  # d_model 32 / 2 heads
    assert model_config(_load("tiny.py", "model.head_dim=5")).resolved_head_dim == 5


def test_later_overrides_win():
    assert _load("tiny.py", "train.steps=3", "train.steps=5").train.steps == 5


def test_overrides_change_the_model_config():
    cfg = model_config(_load("tiny.py", "model.d_model=24", "model.num_heads=3", "model.positions=learned"))
    assert (cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.positions) == (24, 3, 8, "learned")


def test_apply_overrides_in_place():
    config = base_config()
    config.lock()
    apply_overrides(config, ["train.steps=12", "--config.parallel.strategy=pmap"])
    assert config.train.steps == 12 and config.parallel.strategy == "pmap"


# ---------------------------------------------------------------------------------------------------------
# Errors, each naming the field
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "unknown", "suggestion"),
    [
        ("train.stepz=3", "config.train.stepz", "config.train.steps"),
        ("--config.train.stepz=3", "config.train.stepz", "config.train.steps"),
        ("model.num_head=4", "config.model.num_head", "config.model.num_heads"),
        ("trian.steps=3", "config.trian", "config.train"),
        ("data.copy.revers=true", "config.data.copy.revers", "config.data.copy.reverse"),
    ],
)
def test_mistyped_key_is_a_config_error_with_a_suggestion(override, unknown, suggestion):
    with pytest.raises(ConfigError) as info:
        _load("tiny.py", override)
    message = str(info.value)
    assert unknown in message
    assert "did you mean" in message and repr(suggestion) in message


def test_unknown_key_without_a_close_match_has_no_suggestion():
    # "xyzzy" resembles no key of config.train; a suggestion must not come from the shared "train." prefix.
    with pytest.raises(ConfigError, match=r"config\.train\.xyzzy") as info:
        _load("tiny.py", "train.xyzzy=1")
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.steps=abc", "config.train.steps"),
        ("train.steps=1e3", "config.train.steps"),
        ("train.steps=3.5", "config.train.steps"),
        ("train.learning_rate_scale=fast", "config.train.learning_rate_scale"),
        ("model.scan_layers=maybe", "config.model.scan_layers"),
        ("train=3", "config.train"),
    ],
)
def test_wrong_type_is_a_config_error_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=rf"{field.replace('.', '[.]')}\b"):
        _load("tiny.py", override)


@pytest.mark.parametrize(
    ("override", "field"),
    [("model.head_dim=abc", "config.model.head_dim"), ("model.num_kv_heads=2.5", "config.model.num_kv_heads")],
)
def test_wrong_type_for_a_typed_placeholder_is_a_config_error(override, field):
    # head_dim and num_kv_heads are ``placeholder(int)``: None now, but only an int may replace it.
    with pytest.raises(ConfigError, match=rf"{field.replace('.', '[.]')}\b"):
        _load("tiny.py", override)


def test_override_without_a_value_is_a_config_error():
    with pytest.raises(ConfigError, match="--config.a.b=VALUE"):
        _load("tiny.py", "train.steps")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["model.num_heads=7"], "config.model.num_heads"),  # 32 is not divisible by 7
        (["model.d_model=512", "model.num_heads=7"], "config.model.num_heads"),
        (["model.dropout_rate=1.5"], "config.model.dropout_rate"),
        (["model.d_model=-4"], "config.model.d_model"),
        (["model.positions=rotary"], "config.model.positions"),
        (["model.pad_id=40"], "config.model.pad_id"),
        (["model.num_heads=4", "model.num_kv_heads=3"], "config.model.num_kv_heads"),
    ],
)
def test_inconsistent_model_values_are_config_errors_at_load_time(overrides, field):
    with pytest.raises(ConfigError, match=rf"{field.replace('.', '[.]')}\b") as info:
        _load("tiny.py", *overrides)
    assert "TransformerConfig." not in str(info.value)  # named as the user wrote it


def test_model_config_accepts_a_vocab_size_override_and_rejects_unknown_model_keys():
    config = _load("tiny.py")
    assert model_config(config, vocab_size=101).vocab_size == 101
    with pytest.raises(ConfigError, match=r"config\.model\.num_head\b.*did you mean 'config\.model\.num_heads'"):
        model_config(config, num_head=2)


def test_unknown_experiment_argument_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown experiment argument 'sise'"):
        _load("wmt14_en_de.py:sise=big")
    with pytest.raises(ConfigError, match="reverze"):
        _load("copy_task.py:reverze")


def test_experiment_argument_of_the_wrong_type_is_a_config_error():
    with pytest.raises(ConfigError, match="steps"):
        _load("copy_task.py:steps=many")


def test_missing_experiment_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_experiment(str(tmp_path / "nowhere.py"))
    with pytest.raises(ConfigError, match="not found"):
        load_experiment(str(tmp_path / "nowhere.py") + ":size=big")


def test_file_without_get_config_is_a_config_error(tmp_path):
    path = tmp_path / "empty.py"
    path.write_text("X = 1\n")
    with pytest.raises(ConfigError, match="get_config"):
        load_experiment(str(path))


def test_a_custom_experiment_file_is_loaded_with_its_argument(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(
        "from attn_jax import defaults\n"
        "from attn_jax.config import parse_arg\n"
        "def get_config(arg=None):\n"
        "    args = parse_arg(arg, layers=1)\n"
        "    c = defaults.base_config()\n"
        "    c.data = defaults.data_config(vocab_size=97)\n"
        "    c.model = defaults.model_config(d_model=16, num_heads=2, d_ff=8,\n"
        "                                    num_encoder_layers=args.layers, num_decoder_layers=args.layers)\n"
        "    return c\n"
    )
    cfg = model_config(load_experiment(f"{path}:layers=3", ["model.d_ff=12"]))
    assert (cfg.vocab_size, cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.d_ff) == (97, 3, 3, 12)


# ---------------------------------------------------------------------------------------------------------
# parse_arg and flatten
# ---------------------------------------------------------------------------------------------------------


def test_parse_arg_types_values_by_their_defaults():
    args = parse_arg("size=big,runlocal,steps=12,rate=0.5", size="base", runlocal=False, steps=10, rate=1.0)
    assert dict(args) == {"size": "big", "runlocal": True, "steps": 12, "rate": 0.5}
    assert type(args.steps) is int and type(args.rate) is float


def test_parse_arg_defaults_when_empty():
    for arg in (None, "", ","):
        assert dict(parse_arg(arg, size="base", runlocal=False)) == {"size": "base", "runlocal": False}


def test_parse_arg_errors():
    with pytest.raises(ConfigError, match="unknown experiment argument 'big'"):
        parse_arg("big", size="base")
    with pytest.raises(ConfigError, match="steps"):
        parse_arg("steps=ten", steps=10)
    with pytest.raises(ConfigError, match="runlocal"):
        parse_arg("runlocal=perhaps", runlocal=False)


def test_flatten_lists_every_leaf_with_dotted_keys():
    config = ml_collections.ConfigDict({"a": 1, "b": {"c": "x", "d": {"e": 2.0}}})
    assert flatten(config) == {"a": 1, "b.c": "x", "b.d.e": 2.0}
