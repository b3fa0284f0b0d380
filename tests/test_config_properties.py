"""Property-based: any command-line override either loads or is rejected with a one-line ``ConfigError`` naming
the field, never another exception; and an accepted config satisfies the documented ranges."""

import math
import pathlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attn_jax.config import ConfigError, flatten, load_experiment

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = [str(ROOT / "experiments" / name) for name in ("tiny.py", "ding_en_de.py", "lm_ding_de.py")]
KEYS = sorted(flatten(load_experiment(EXPERIMENTS[0])))

values = st.one_of(
    st.integers(-(2**40), 2**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "None", "", "jit", "pmap", "raise", "skip", "drop", "lm", "(1, 2)", "[", "nan"]),
    st.text(alphabet="abcxyz019.-_ ", max_size=12),
)
keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(lambda k: k + "x"), st.text("abtrain.", max_size=12))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.sampled_from(EXPERIMENTS), overrides=st.lists(st.tuples(keys, values), min_size=1, max_size=3))
def test_any_override_loads_or_is_a_config_error_naming_a_field(spec, overrides):
    items = [f"{key}={value}" for key, value in overrides]
    try:
        config = load_experiment(spec, items)
    except ConfigError as error:
        message = str(error)
        assert "\n" not in message and ("config." in message or "override" in message), message
        return
    flat = flatten(config)
    # Spot checks of ranges the loop relies on, written independently of the rules table.
    assert flat["train.steps"] >= 1 and flat["train.warmup_steps"] >= 1
    assert 0.0 <= flat["train.label_smoothing"] < 1.0
    assert flat["eval.beam_size"] >= 1 and flat["eval.batch_size"] >= 1
    assert flat["parallel.strategy"] in ("jit", "pmap")
    assert flat["data.tokens_per_batch"] >= flat["data.max_length"] >= 2
    assert not math.isnan(flat["train.learning_rate_scale"]) and flat["train.learning_rate_scale"] > 0
    assert flat["model.d_model"] % flat["model.num_heads"] == 0 or flat["model.head_dim"] is not None


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.steps=0", "config.train.steps"),
        ("train.label_smoothing=1.5", "config.train.label_smoothing"),
        ("train.nonfinite=ignore", "config.train.nonfinite"),
        ("eval.beam_size=0", "config.eval.beam_size"),
        ("parallel.strategy=vmap", "config.parallel.strategy"),
        ("parallel.tensor=0", "config.parallel.tensor"),
        ("data.tokens_per_batch=8", "config.data.tokens_per_batch"),
        ("train.learning_rate_scale=nan", "config.train.learning_rate_scale"),
    ],
)
def test_out_of_range_values_name_their_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_experiment(EXPERIMENTS[0], [override])
