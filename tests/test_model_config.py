"""Tests for attn_jax.model_config: validation (every error names its field), immutability, the paper's presets.

Wrong *types* are tested with the jaxtyping hook off (``without_runtime_typechecks``): under pytest the hook's
beartype check of ``__init__`` answers first with its own ``TypeCheckError``, while a user (no hook) gets the
``ConfigError`` tested here.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import pytest

from attn_jax import ConfigError, TransformerConfig

TINY = {"vocab_size": 19, "d_model": 13, "num_heads": 3, "head_dim": 11, "d_ff": 17}


def _make(**overrides):
    return TransformerConfig(**(TINY | overrides))


def _raises_naming(field: str):
    return pytest.raises(ConfigError, match=rf"TransformerConfig\.{field}\b")


# ---------------------------------------------------------------------------------------------------------
# The paper's presets (Table 3) and defaults
# ---------------------------------------------------------------------------------------------------------


def test_base_matches_table_3():
    cfg = TransformerConfig.base(37000)
    assert (cfg.d_model, cfg.num_heads, cfg.d_ff, cfg.dropout_rate) == (512, 8, 2048, 0.1)
    assert (cfg.num_encoder_layers, cfg.num_decoder_layers) == (6, 6)
    assert (cfg.resolved_head_dim, cfg.resolved_num_kv_heads) == (64, 8)  # d_k = d_v = d_model / h
    assert cfg.vocab_size == 37000


def test_big_matches_table_3():
    cfg = TransformerConfig.big(37000)
    assert (cfg.d_model, cfg.num_heads, cfg.d_ff, cfg.dropout_rate) == (1024, 16, 4096, 0.3)
    assert (cfg.num_encoder_layers, cfg.num_decoder_layers) == (6, 6)
    assert (cfg.resolved_head_dim, cfg.resolved_num_kv_heads) == (64, 16)


def test_defaults_are_the_papers_choices():
    cfg = TransformerConfig(vocab_size=19)
    assert cfg.positions == "sinusoidal"
    assert cfg.share_embeddings and cfg.tie_output_embedding and cfg.scale_embeddings
    assert not cfg.norm_first  # post-norm LN(x + Sublayer(x))
    assert cfg.attention_dropout_rate == 0.0
    assert cfg.num_kv_heads is None and cfg.head_dim is None
    # The low-resource recipe's regularisers are off.
    assert cfg.activation_dropout_rate == cfg.word_dropout_rate == 0.0
    assert cfg.encoder_layerdrop == cfg.decoder_layerdrop == 0.0


def test_presets_accept_overrides():
    cfg = TransformerConfig.big(37000, dropout_rate=0.1, num_decoder_layers=2)
    assert (cfg.d_model, cfg.dropout_rate, cfg.num_decoder_layers) == (1024, 0.1, 2)
    assert TransformerConfig.base(100, d_model=256).d_model == 256


def test_resolved_head_dim_and_kv_heads():
    cfg = _make(num_heads=6, num_kv_heads=2)
    assert (cfg.resolved_head_dim, cfg.resolved_num_kv_heads) == (11, 2)
    assert TransformerConfig(vocab_size=19, d_model=24, num_heads=3).resolved_head_dim == 8


# ---------------------------------------------------------------------------------------------------------
# Hashable and frozen (it is a static argument of jitted functions)
# ---------------------------------------------------------------------------------------------------------


def test_hashable_and_equal_by_value():
    a, b = _make(), _make()
    assert a == b and hash(a) == hash(b)
    assert a != _make(d_ff=23)
    assert {a: 1}[b] == 1


def test_frozen():
    cfg = _make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 26  # type: ignore[misc]


def test_keyword_only():
    with pytest.raises(TypeError):
        TransformerConfig(19)  # type: ignore[misc]


def test_usable_as_a_jit_static_argument():
    f = jax.jit(lambda x, config: x * config.d_model, static_argnames="config")
    assert float(f(jnp.float32(2.0), config=_make())) == 26.0
    assert float(f(jnp.float32(2.0), config=_make(d_model=22, head_dim=None, num_heads=2))) == 44.0


def test_replace_revalidates():
    with _raises_naming("d_model"):
        dataclasses.replace(_make(), d_model=0)


# ---------------------------------------------------------------------------------------------------------
# Value validation
# ---------------------------------------------------------------------------------------------------------

POSITIVE = ["vocab_size", "d_model", "num_heads", "d_ff", "max_len"]


@pytest.mark.parametrize("field", POSITIVE)
@pytest.mark.parametrize("value", [0, -3])
def test_sizes_must_be_positive(field, value):
    with _raises_naming(field):
        _make(**{field: value})


@pytest.mark.parametrize("field", ["num_encoder_layers", "num_decoder_layers"])
def test_layer_counts_must_be_non_negative(field):
    with _raises_naming(field):
        _make(**{field: -1})
    assert getattr(_make(**{field: 0}), field) == 0  # an empty stack is allowed


@pytest.mark.parametrize("field", ["num_kv_heads", "head_dim"])
@pytest.mark.parametrize("value", [0, -1])
def test_optional_sizes_must_be_positive(field, value):
    with _raises_naming(field):
        _make(**{field: value})


def test_d_model_must_divide_by_num_heads_without_head_dim():
    with pytest.raises(ConfigError, match=r"TransformerConfig\.num_heads\b.*d_model"):
        TransformerConfig(vocab_size=19, d_model=13, num_heads=3)
    assert _make(head_dim=11).resolved_head_dim == 11  # an explicit head_dim lifts the requirement


@pytest.mark.parametrize("num_heads, num_kv_heads", [(3, 2), (6, 4), (6, 12)])
def test_num_heads_must_be_a_multiple_of_num_kv_heads(num_heads, num_kv_heads):
    with _raises_naming("num_kv_heads"):
        _make(num_heads=num_heads, num_kv_heads=num_kv_heads)


RATE_FIELDS = ["dropout_rate", "attention_dropout_rate", "activation_dropout_rate", "word_dropout_rate",
               "encoder_layerdrop", "decoder_layerdrop"]  # fmt: skip


@pytest.mark.parametrize("field", RATE_FIELDS)
@pytest.mark.parametrize("value", [1.0, 1.5, -0.1, math.nan, math.inf])
def test_rates_must_be_in_unit_interval(field, value):
    with _raises_naming(field):
        _make(**{field: value})


@pytest.mark.parametrize("value", [0.0, -1e-6, math.nan])
def test_layer_norm_epsilon_must_be_positive(value):
    with _raises_naming("layer_norm_epsilon"):
        _make(layer_norm_epsilon=value)


@pytest.mark.parametrize("value", [-1, 19, 100])
def test_pad_id_must_be_in_the_vocabulary(value):
    with _raises_naming("pad_id"):
        _make(pad_id=value)
    assert _make(pad_id=18).pad_id == 18


@pytest.mark.parametrize(
    "field, value",
    [
        ("positions", "rotary"),
        ("dtype", "float8"),
        ("dtype", "bf16"),
        ("attention_implementation", "flash"),
        ("word_dropout_mode", "drop"),
    ],  # fmt: skip
)
def test_unknown_choices(field, value):
    with _raises_naming(field):
        _make(**{field: value})


@pytest.mark.parametrize("implementation", [None, "xla", "chunked", "cudnn"])
def test_known_attention_implementations(implementation):
    assert _make(attention_implementation=implementation).attention_implementation == implementation


# ---------------------------------------------------------------------------------------------------------
# Type validation (as a user sees it, without the test-only jaxtyping hook)
# ---------------------------------------------------------------------------------------------------------

INT_FIELDS = ["vocab_size", "d_model", "num_heads", "num_kv_heads", "head_dim", "d_ff", "num_encoder_layers",
              "num_decoder_layers", "max_len", "pad_id", "unk_id"]  # fmt: skip
FLOAT_FIELDS = [*RATE_FIELDS, "layer_norm_epsilon"]
BOOL_FIELDS = ["share_embeddings", "tie_output_embedding", "scale_embeddings", "norm_first", "attention_bias",
               "scan_layers", "remat"]  # fmt: skip


@pytest.mark.usefixtures("without_runtime_typechecks")
@pytest.mark.parametrize("field", INT_FIELDS)
def test_bool_is_not_an_int(field):
    with _raises_naming(field):
        _make(**{field: True})


@pytest.mark.usefixtures("without_runtime_typechecks")
@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("value", [11.0, "11"])
def test_int_fields_reject_floats_and_strings(field, value):
    with _raises_naming(field):
        _make(**{field: value})


@pytest.mark.usefixtures("without_runtime_typechecks")
@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", ["0.1", True, None])
def test_float_fields_reject_strings_bools_and_none(field, value):
    with _raises_naming(field):
        _make(**{field: value})


@pytest.mark.usefixtures("without_runtime_typechecks")
def test_float_fields_accept_ints():
    cfg = _make(dropout_rate=0, attention_dropout_rate=0, layer_norm_epsilon=1)
    assert (cfg.dropout_rate, cfg.attention_dropout_rate, cfg.layer_norm_epsilon) == (0, 0, 1)


@pytest.mark.usefixtures("without_runtime_typechecks")
@pytest.mark.parametrize("field", BOOL_FIELDS)
@pytest.mark.parametrize("value", [1, "yes", None])
def test_bool_fields_reject_other_types(field, value):
    with _raises_naming(field):
        _make(**{field: value})


@pytest.mark.usefixtures("without_runtime_typechecks")
@pytest.mark.parametrize("field", ["positions", "dtype", "word_dropout_mode"])
def test_string_fields_reject_other_types(field):
    with _raises_naming(field):
        _make(**{field: 3})


@pytest.mark.usefixtures("without_runtime_typechecks")
@pytest.mark.parametrize("field", ["vocab_size", "d_model", "num_heads", "d_ff"])
def test_required_ints_reject_none(field):
    with _raises_naming(field):
        _make(**{field: None})


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_float64_needs_x64_and_is_accepted_with_it():
    with _raises_naming("dtype"):
        _make(dtype="float64")
    jax.config.update("jax_enable_x64", True)
    try:
        assert _make(dtype="float64").dtype == "float64"
    finally:
        jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize(
    ("norm_first", "final_norm", "expected"),
    [(False, None, False), (True, None, True), (False, True, True), (True, False, False)],
)
def test_final_norm_defaults_to_norm_first(norm_first, final_norm, expected):
    assert _make(norm_first=norm_first, final_norm=final_norm).has_final_norm is expected


def test_static_pytree_without_leaves():
    config = _make()
    assert jax.tree.leaves(config) == []
    assert jax.tree.unflatten(jax.tree.structure(config), []) == config
    # jit takes it as an ordinary argument: a changed config is a new static value.
    f = jax.jit(lambda c, x: x * c.d_model)
    assert int(f(config, jnp.ones((), jnp.int32))) == config.d_model
    assert int(f(dataclasses.replace(config, d_model=6, num_heads=2), jnp.ones((), jnp.int32))) == 6
