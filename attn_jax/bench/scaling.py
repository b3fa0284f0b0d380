"""Training throughput against device count, sequence length and model size, with a plot of each.

    .venv/bin/python -m attn_jax.bench scaling --out experiments/results       # attn-jax bench scaling ...

All three sweeps time attn_jax's training step (float32, compiled ahead, median of repeats after warm-up):

* devices: the ``small`` model and batch (``attn_jax.bench.training``) as a sharded ``jit`` over a
  ``data = N`` mesh (``attn_jax.parallel``), the same global batch of 32 x (64 + 64) for every N. Each N runs in
  a fresh process; on a CPU it sees N devices through ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
  (N = 1, 2, 4, 8), so all N share the same cores and the sweep measures the cost of partitioning and of
  the gradient all-reduce, not a speed-up; on GPUs N runs up to the devices present.
* sequence length: T = S = 32..512 at a constant 2048 target tokens per batch (B = 2048 / T);
* model size: d_model 128..512 with 3+3 layers, d_ff = 4 d_model, heads of size 64, vocabulary 8192.

Each reports target tokens/s and MFU against the matmul ceiling measured in the same run. Expected on the
2-core CPU: throughput flat or falling slightly with N (the cores are shared), falling with T as attention
grows quadratically, MFU rising with d_model as matmuls grow. About 10 minutes. Writes
``scaling.{json,md}`` and ``scaling_devices.png``, ``scaling_length.png``, ``scaling_model.png``.
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax

from attn_jax import parallel
from attn_jax.bench import flops as flops_lib
from attn_jax.bench import results
from attn_jax.bench.ceiling import default_sizes, matmul_ceiling
from attn_jax.bench.timing import interleave
from attn_jax.bench.training import SIZES, jax_contender, optimizer, synthetic_batch, time_attn_jax_step
from attn_jax.model_config import TransformerConfig
from attn_jax.train import init_train_state, train_step

DEVICES = (1, 2, 4, 8)
LENGTHS = (32, 64, 128, 256, 512)
TOKENS_PER_BATCH = 2048
D_MODELS = (128, 256, 384, 512)


# ----------------------------------------------------------------------------------------------------------
# Device count: one process per N
# ----------------------------------------------------------------------------------------------------------


def device_probe(devices: int, size: str, repeats: int, quick: bool) -> dict:
    """Run in a fresh process: the sharded step over ``devices`` devices, timed."""
    config, B, S, T = SIZES[size]
    batch = synthetic_batch(config, B, S, T)
    mesh = parallel.make_mesh({"data": devices, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:devices])
    tx = optimizer(config)
    init = functools.partial(init_train_state, model_config=config, tx=tx)
    shardings = parallel.state_shardings(jax.eval_shape(init, jax.random.key(0)), mesh, tx)
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    placed = jax.device_put(batch, parallel.batch_sharding(mesh))
    step = functools.partial(train_step, model_config=config, tx=tx)
    options = {"xla_backend_optimization_level": 0} if quick else None
    run, info = jax_contender(step, state, placed, jax.random.key(1), compiler_options=options)
    timing = interleave({"step": run}, repeats=repeats, warmup=2)["step"]
    return {
        "devices": devices,
        "compile_s": info["compile_s"],
        "runs_s": timing["runs_s"],
        "median_s": timing["median_s"],
    }


def _device_counts(requested) -> list[int]:
    if jax.default_backend() == "cpu":
        return list(requested)
    return [n for n in requested if n <= jax.device_count()]


def measure_devices(counts=DEVICES, *, size="small", repeats=5, quick=False, ceiling) -> list[dict]:
    """``device_probe`` for each N in a child process (on a CPU with N simulated devices)."""
    config, B, S, T = SIZES[size]
    batch = synthetic_batch(config, B, S, T)
    rows = []
    for n in _device_counts(counts):
        env = os.environ.copy()
        if jax.default_backend() == "cpu":
            flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
            env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])
            env["JAX_PLATFORMS"] = "cpu"
        command = [sys.executable, "-m", "attn_jax.bench.scaling", str(n), size, str(repeats)]
        command += ["--quick"] if quick else []
        done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
        probe = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(probe | flops_lib.step_rates(config, batch, probe["median_s"], ceiling["flops_per_s"]))
        print(f"scaling devices={n}: {rows[-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------
# Sequence length and model size, in this process
# ----------------------------------------------------------------------------------------------------------


def measure_lengths(
    lengths=LENGTHS, *, size="small", tokens_per_batch=TOKENS_PER_BATCH, repeats=5, ceiling, compiler_options=None
) -> list[dict]:
    """Throughput at ``T = S = length`` with ``tokens_per_batch // length`` sequences per batch."""
    config = dataclasses.replace(SIZES[size][0], max_len=max(SIZES[size][0].max_len, max(lengths)))
    rows = []
    for length in lengths:
        B = max(tokens_per_batch // length, 1)
        batch = synthetic_batch(config, B, length, length)
        timed = time_attn_jax_step(
            config, batch, ceiling["flops_per_s"], repeats=repeats, compiler_options=compiler_options
        )
        rows.append({"length": length, "batch": B} | timed)
        print(f"scaling T=S={length}: {rows[-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    return rows


def model_config(d_model: int, *, quick: bool = False) -> TransformerConfig:
    """3+3 layers (1+1 with ``quick``), d_ff = 4 d_model, heads of 64 (of 16 with ``quick``), vocabulary 8192."""
    head = 16 if quick else 64
    return TransformerConfig(
        vocab_size=64 if quick else 8192,
        d_model=d_model,
        num_heads=max(d_model // head, 1),
        d_ff=4 * d_model,
        num_encoder_layers=1 if quick else 3,
        num_decoder_layers=1 if quick else 3,
    )


def measure_models(d_models=D_MODELS, *, size="small", repeats=5, ceiling, compiler_options=None) -> list[dict]:
    """Throughput and MFU of ``model_config(d)`` for each width, on the batch of ``size``."""
    _, B, S, T = SIZES[size]
    rows = []
    for d_model in d_models:
        config = model_config(d_model, quick=size == "quick")
        batch = synthetic_batch(config, B, S, T)
        timed = time_attn_jax_step(
            config, batch, ceiling["flops_per_s"], repeats=repeats, compiler_options=compiler_options
        )
        rows.append({"d_model": d_model} | timed)
        print(f"scaling d_model={d_model}: {rows[-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------
# The section
# ----------------------------------------------------------------------------------------------------------


def run(
    *,
    out=None,
    size="small",
    devices=DEVICES,
    lengths=LENGTHS,
    d_models=D_MODELS,
    repeats=5,
    ceiling=None,
    compiler_options=None,
    argv=None,
) -> dict:
    """The whole section; writes ``scaling.{json,md}`` and three PNGs under ``out`` when given."""
    quick = size == "quick"
    report = results.header("scaling", argv) | {"size": size, "compiler_options": compiler_options or {}}
    report["ceiling"] = ceiling or matmul_ceiling(default_sizes(quick))
    common = dict(size=size, repeats=repeats, ceiling=report["ceiling"])
    report["devices"] = measure_devices(devices, quick=quick, **common)
    tokens = 64 if quick else TOKENS_PER_BATCH
    report["lengths"] = measure_lengths(lengths, tokens_per_batch=tokens, compiler_options=compiler_options, **common)
    report["tokens_per_batch"] = tokens
    report["models"] = measure_models(d_models, compiler_options=compiler_options, **common)
    if out is not None:
        results.write(out, "scaling", report, markdown(report))
        for name, fig in figures(report).items():
            fig.savefig(os.path.join(out, f"scaling_{name}.png"), dpi=100)
    return report


def markdown(report: dict) -> str:
    def rate(r):
        return [f"{r['step_s'] * 1e3:.1f}", f"{r['tokens_per_s']:,.0f}", f"{100 * r['mfu']:.1f}%"]

    head = ["step (ms)", "tokens/s", "MFU"]
    lines = [
        "# Scaling: throughput against devices, sequence length and model size",
        "",
        f"attn_jax training step, float32; matmul ceiling {report['ceiling']['gflops']:.1f} GFLOP/s measured in "
        "the same run; tokens/s = non-pad target tokens per second.",
        "",
        "Devices (sharded `jit`, mesh data = N, same global batch; on a CPU N simulated devices share the cores):",
        "",
        *results.table(["devices", *head], [[r["devices"], *rate(r)] for r in report["devices"]]),
        "",
        f"Sequence length (T = S, {report['tokens_per_batch']} target tokens per batch):",
        "",
        *results.table(["T = S", "batch", *head], [[r["length"], r["batch"], *rate(r)] for r in report["lengths"]]),
        "",
        "Model size (3+3 layers, d_ff = 4 d_model, heads of 64):",
        "",
        *results.table(
            ["d_model", "params", *head],
            [[r["d_model"], f"{r['parameters'] / 1e6:.1f}M", *rate(r)] for r in report["models"]],
        ),
    ]
    return "\n".join(lines + ["", results.machine_line(report)])


def figures(report: dict) -> dict:
    out = {}
    for name, key, rows, xlabel in (
        ("devices", "devices", report["devices"], "devices (data parallel)"),
        ("length", "length", report["lengths"], "T = S (tokens)"),
        ("model", "parameters", report["models"], "parameters"),
    ):
        fig, (ax,) = results.new_figure(1)
        x = [r[key] for r in rows]
        ax.plot(x, [r["tokens_per_s"] for r in rows], marker="o", color="C0")
        ax.set_xscale("log", base=2 if name != "model" else 10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("target tokens / s", color="C0")
        mfu_ax = ax.twinx()
        mfu_ax.plot(x, [100 * r["mfu"] for r in rows], marker="s", linestyle=":", color="C1")
        mfu_ax.set_ylabel("MFU (%)", color="C1")
        ax.set_title(f"training throughput against {xlabel.split(' (')[0]}")
        out[name] = fig
    return out


if __name__ == "__main__":  # the child process of ``measure_devices``
    print(json.dumps(device_probe(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), "--quick" in sys.argv[4:])))
