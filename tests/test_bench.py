"""The benchmark suite: FLOP accounting against XLA's own count, the peers' parameter counts, quick runs.

No timing is asserted: these tests check that the suite measures the right thing, not how fast it is.
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.bench import accelerator, flops, peers
from attn_jax.bench.cli import main
from attn_jax.bench.training import QUICK, optimizer, synthetic_batch
from attn_jax.model import count_params, init_transformer
from attn_jax.model_config import TransformerConfig
from attn_jax.train import forward, init_train_state, train_step

# Matmuls dominate (H = 64, F = 4 D, V = 4 D), as in real models; unrolled, because XLA's cost analysis counts a
# while loop's body once, not once per iteration; no dropout, whose random bits XLA would count as FLOPs.
XLA_CHECK = TransformerConfig(
    vocab_size=512, d_model=128, num_heads=2, d_ff=512, num_encoder_layers=2, num_decoder_layers=2, max_len=64,
    scan_layers=False, dropout_rate=0.0,
)  # fmt: skip
# Prime sizes where they can be, so that a swapped axis shows: B=2, S=7, T=5, N=3, H=11, D=33, F=17, V=19.
PRIMES = TransformerConfig(
    vocab_size=19, d_model=33, num_heads=3, d_ff=17, num_encoder_layers=2, num_decoder_layers=3, max_len=16
)


def _xla_flops(lowered_or_compiled) -> float:
    return float(lowered_or_compiled.cost_analysis()["flops"])


def test_linear_flops_by_hand_and_by_xla():
    # One multiply-add per weight per token: [4, 5, 3] @ [3, 7] is 20 tokens x 21 weights x 2 = 840 FLOPs.
    assert flops.linear_flops(3, 7, 20) == 840.0
    x, w = jax.ShapeDtypeStruct((4, 5, 3), jnp.float32), jax.ShapeDtypeStruct((3, 7), jnp.float32)
    compiled = jax.jit(lambda x, w: jnp.einsum("BTD,DF->BTF", x, w)).lower(x, w).compile()
    assert _xla_flops(compiled) == 840.0


def test_padding_is_not_credited():
    batch = synthetic_batch(PRIMES, 2, 7, 5)
    batch["inputs"][1, 4:] = 0  # the second source has 4 real tokens
    batch["targets_out"][0, 3:] = 0  # the first target has 3
    counted = flops.batch_flops(PRIMES, batch)
    assert counted == flops.transformer_flops(PRIMES, [7, 4], [3, 5])
    assert counted.forward < flops.transformer_flops(PRIMES, [7, 7], [5, 5]).forward
    assert counted.train == pytest.approx(3 * counted.forward)


# The analytic count leaves out the elementwise work (softmax, layer norm, biases, the loss and, in the training
# step, Adam's update), which XLA counts: so XLA must be above it, and by a few per cent at these sizes
# (measured: forward +1.3%, train step +4.3%); 10% leaves room for XLA versions to count those ops differently.
TOLERANCE = 0.10


def test_encoder_decoder_forward_flops_match_xla():
    batch = synthetic_batch(XLA_CHECK, 4, 32, 24)
    params = jax.eval_shape(lambda: init_transformer(jax.random.key(0), XLA_CHECK))
    compiled = jax.jit(functools.partial(forward, model_config=XLA_CHECK)).lower(params, batch).compile()
    ratio = _xla_flops(compiled) / flops.batch_flops(XLA_CHECK, batch).forward
    assert 1.0 <= ratio <= 1 + TOLERANCE


def test_train_step_flops_match_xla():
    batch = synthetic_batch(XLA_CHECK, 4, 32, 24)
    tx = optimizer(XLA_CHECK)
    state = jax.eval_shape(lambda: init_train_state(jax.random.key(0), XLA_CHECK, tx))
    step = jax.jit(functools.partial(train_step, model_config=XLA_CHECK, tx=tx))
    # The cost analysis of the lowered (not yet optimised) program: the same HloCostAnalysis without a ~15 s compile.
    lowered = step.lower(state, batch, jax.random.key(1))
    ratio = _xla_flops(lowered) / flops.batch_flops(XLA_CHECK, batch).train
    assert 1.0 <= ratio <= 1 + TOLERANCE


def test_language_model_forward_flops_match_xla():
    config = dataclasses.replace(XLA_CHECK, num_encoder_layers=0)
    batch = {k: v for k, v in synthetic_batch(config, 4, 1, 32).items() if k != "inputs"}
    params = jax.eval_shape(lambda: init_train_state(jax.random.key(0), config, optimizer(config), task="lm").params)
    lowered = jax.jit(functools.partial(forward, model_config=config)).lower(params, batch)
    ratio = _xla_flops(lowered) / flops.batch_flops(config, batch).forward
    assert 1.0 <= ratio <= 1 + TOLERANCE


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_linen_peer_has_attn_jax_parameters_and_outputs(norm_first):
    config = dataclasses.replace(PRIMES, norm_first=norm_first)
    src = jnp.asarray(np.random.default_rng(0).integers(1, PRIMES.vocab_size, (2, 7)), jnp.int32)
    tgt = jnp.asarray(np.random.default_rng(1).integers(1, PRIMES.vocab_size, (2, 5)), jnp.int32)
    model = peers.LinenTransformer(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), src, tgt)
    assert count_params(shapes["params"]) == count_params(
        jax.eval_shape(lambda: init_transformer(jax.random.key(0), config))
    )
    # Random parameters from NumPy: compiling Flax's initialisers would cost several times the forward pass.
    rng = np.random.default_rng(2)
    variables = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
    logits = jax.jit(model.apply)(variables, src, tgt)
    assert logits.shape == (2, 5, PRIMES.vocab_size)
    assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_torch_peer_has_attn_jax_parameters_and_outputs(norm_first):
    torch = pytest.importorskip("torch")
    config = dataclasses.replace(PRIMES, norm_first=norm_first)
    model = peers.torch_transformer(config)
    assert peers.torch_param_count(model) == count_params(
        jax.eval_shape(lambda: init_transformer(jax.random.key(0), config))
    )
    src = torch.randint(1, config.vocab_size, (2, 7))
    logits = model(src, torch.randint(1, config.vocab_size, (2, 5)))
    assert tuple(logits.shape) == (2, 5, config.vocab_size)
    assert bool(torch.isfinite(logits).all())


# What the default size must share with the shipped experiment for its timings to be the default run's.
DEFAULT_RUN_FIELDS = (
    "vocab_size", "d_model", "num_heads", "num_kv_heads", "head_dim", "d_ff", "num_encoder_layers",
    "num_decoder_layers", "positions", "dropout_rate", "attention_dropout_rate", "share_embeddings",
    "tie_output_embedding", "scale_embeddings", "norm_first", "final_norm", "attention_bias", "scan_layers", "remat",
    "dtype",
)  # fmt: skip


def test_default_size_is_the_default_runs_model_and_batch():
    from attn_jax import config as config_lib
    from attn_jax.bench.training import SIZES

    experiment = config_lib.load_experiment("experiments/ding_en_de.py")
    shipped = config_lib.model_config(experiment)
    model, batch_size, source_length, target_length = SIZES["default"]
    assert {f: getattr(model, f) for f in DEFAULT_RUN_FIELDS} == {f: getattr(shipped, f) for f in DEFAULT_RUN_FIELDS}
    assert batch_size * source_length == batch_size * target_length == experiment.data.tokens_per_batch


@pytest.mark.slow  # ~20 s on 2 cores: it compiles three training steps
def test_quick_train_run_reports_tokens_per_second_and_mfu(tmp_path):
    assert main(["train", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "train.json").read_text())
    assert {"platform", "cpu_count", "device_kind", "versions"} <= set(report["machine"])
    assert report["command"].endswith(f"train --quick --out {tmp_path}")
    assert report["ceiling"]["flops_per_s"] > 0
    (row,) = report["rows"]
    expected = ["attn_jax", "flax_linen"] + (["torch"] if peers.torch_available() else [])
    for name in expected:
        result = row["implementations"][name]
        assert result["tokens_per_s"] > 0 and result["mfu"] > 0, name
        assert result["parameters"] == row["implementations"]["attn_jax"]["parameters"], name
    if not peers.torch_available():
        assert row["implementations"]["torch"] == {"skipped": "torch not installed"}
    assert (tmp_path / "train.md").exists() and (tmp_path / "train.png").exists()


@pytest.mark.slow  # ~10 s on 2 cores: one bf16 training step compiles
def test_quick_accelerator_run_reports_bf16_mfu_against_the_given_peak(tmp_path):
    assert main(["accelerator", "--quick", "--peak-tflops", "0.5", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "accelerator.json").read_text())
    assert report["peak_bf16_flops_per_s"] == 0.5e12
    (row,) = report["rows"]
    assert row["dtype"] == "bfloat16"
    config = TransformerConfig(**QUICK, max_len=64, dtype="bfloat16")
    batch = synthetic_batch(config, row["batch"]["size"], row["batch"]["source_length"], row["batch"]["target_length"])
    assert row["flops_per_step"] == flops.batch_flops(config, batch).train
    assert row["mfu"] == pytest.approx(row["flops_per_step"] / row["step_s"] / 0.5e12, rel=1e-12)
    assert row["hours_per_100k_steps"] == pytest.approx(row["step_s"] * 100_000 / 3600, rel=1e-12)
    assert "0.5 TFLOP/s dense bf16" in (tmp_path / "accelerator.md").read_text()


def test_accelerator_peaks_and_targets_by_device_kind():
    assert accelerator.peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert accelerator.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert accelerator.peak_flops("NVIDIA H200") == 989.4e12
    assert accelerator.peak_flops("TPU v5 lite") == 197e12
    assert accelerator.peak_flops("TPU v5p") == 459e12
    assert accelerator.peak_flops("cpu") is None and accelerator.peak_flops("cpu", 2.0) == 2e12
    base = {"size": "base", "mfu": 0.40, "hours_per_100k_steps": 0.9}
    big = {"size": "big", "mfu": 0.40, "hours_per_100k_steps": 2.5}
    on_h100 = {c["name"]: c["passed"] for c in accelerator.checks([base, big], "NVIDIA H100 80GB HBM3")}
    assert on_h100 == {
        "bf16 MFU, base": True,
        "hours for 100k base steps, one H100": True,
        "bf16 MFU, big": False,
    }
    elsewhere = accelerator.checks([{**base, "mfu": None}], "NVIDIA A100-SXM4-80GB")
    assert [c["passed"] for c in elsewhere] == [None, None]


@pytest.mark.slow  # ~40 s on 2 cores: two child processes and four compiles
def test_quick_scaling_run_covers_each_sweep_with_consistent_rates(tmp_path):
    assert main(["scaling", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "scaling.json").read_text())
    peak = report["ceiling"]["flops_per_s"]
    assert [row["devices"] for row in report["devices"]] == [1, 2]
    assert len(report["lengths"]) == 2 and len(report["models"]) == 2
    for row in report["devices"] + report["lengths"] + report["models"]:
        assert row["tokens_per_s"] > 0 and row["mfu"] > 0
    # Every device count runs the same global batch, so MFU per token/s (FLOPs per token / peak) is the same.
    one, two = report["devices"]
    assert one["mfu"] / one["tokens_per_s"] == pytest.approx(two["mfu"] / two["tokens_per_s"], rel=1e-9)
    assert one["mfu"] * peak * one["step_s"] == pytest.approx(two["mfu"] * peak * two["step_s"], rel=1e-9)
    assert sorted(p.name for p in tmp_path.glob("scaling*.png")) == [
        "scaling_devices.png",
        "scaling_length.png",
        "scaling_model.png",
    ]
