"""bf16 training on one accelerator: MFU against the chip's dense bf16 peak, and the time of 100k steps.

    .venv/bin/python -m attn_jax.bench accelerator --out experiments/results   # attn-jax bench accelerator

For the paper's base and big models (shared 37k vocabulary, bfloat16 compute with float32 parameters, the
project's defaults otherwise) on the paper's batch, about 25,000 source and 25,000 target tokens
(400 x (64 + 64), no padding): one training step end to end on one device, compiled ahead and timed as the
median of repeats. Reported: step time, target tokens/s, MFU = analytic FLOPs (``attn_jax.bench.flops``) /
time / the chip's dense bf16 peak (vendor figures in ``PEAK_BF16_TFLOPS``, matched on the device kind, or
``--peak-tflops``), and the hours 100,000 steps take at that step time (the paper: 12 hours for base on
8 P100s).

Targets (issue 5): MFU >= 35% (base) and >= 45% (big); 100k base steps in under 1 hour on one H100. A CPU
has no bf16 peak here, so there it reports times without MFU or targets; ``--quick`` shrinks the models and
batch to test the section. Writes ``accelerator.{json,md}``.
"""

import jax

from attn_jax.bench import results
from attn_jax.bench.training import QUICK, synthetic_batch, time_attn_jax_step
from attn_jax.model_config import TransformerConfig

# Dense (no sparsity) bf16 peak per chip, TFLOP/s, from the vendors' data sheets; first substring match wins.
PEAK_BF16_TFLOPS = (
    ("h100 pcie", 756.0),
    ("h100", 989.4),  # SXM
    ("h200", 989.4),
    ("a100", 312.0),
    ("tpu v4", 275.0),
    ("tpu v5 lite", 197.0),
    ("tpu v5e", 197.0),
    ("tpu v5p", 459.0),
    ("tpu v5", 459.0),
    ("tpu v6", 918.0),
)
TARGET_MFU = {"base": 0.35, "big": 0.45}
TARGET_HOURS_100K_BASE = 1.0
STEPS = 100_000
# name -> (model, batch size, source length, target length)
SIZES = {
    "base": (lambda: TransformerConfig.base(dtype="bfloat16"), 400, 64, 64),
    "big": (lambda: TransformerConfig.big(dtype="bfloat16"), 400, 64, 64),
    "quick": (lambda: TransformerConfig(**QUICK, max_len=64, dtype="bfloat16", scan_layers=False), 4, 8, 8),
}


def peak_flops(device_kind: str, override_tflops: float | None = None) -> float | None:
    """The dense bf16 peak of ``device_kind`` in FLOP/s, ``override_tflops`` if given, else None if unknown.

    Example:
      >>> peak_flops("NVIDIA H100 80GB HBM3") / 1e12
      989.4
      >>> peak_flops("cpu") is None
      True
    """
    if override_tflops:
        return override_tflops * 1e12
    kind = device_kind.lower()
    return next((tflops * 1e12 for name, tflops in PEAK_BF16_TFLOPS if name in kind), None)


def measure_size(name: str, peak: float | None, *, repeats: int = 5, compiler_options=None) -> dict:
    """One device's bf16 training step on ``SIZES[name]``: time, tokens/s, MFU and hours per 100k steps."""
    make_config, B, S, T = SIZES[name]
    config = make_config()
    batch = synthetic_batch(config, B, S, T)
    row = time_attn_jax_step(config, batch, peak, repeats=repeats, compiler_options=compiler_options)
    return {
        "size": name,
        "dtype": config.dtype,
        "batch": {"size": B, "source_length": S, "target_length": T},
        "hours_per_100k_steps": row["step_s"] * STEPS / 3600,
    } | row


def checks(rows: list[dict], device_kind: str) -> list[dict]:
    """The issue's targets (``passed`` None where not measured: no known peak, or not an H100 for the hours)."""
    out = []
    for row in rows:
        target = TARGET_MFU.get(row["size"])
        if target is not None:
            passed = None if row["mfu"] is None else row["mfu"] >= target
            out.append(results.check(f"bf16 MFU, {row['size']}", row["mfu"], f">= {target}", passed))
        if row["size"] == "base":
            hours = row["hours_per_100k_steps"]
            passed = hours < TARGET_HOURS_100K_BASE if "h100" in device_kind.lower() else None
            out.append(results.check("hours for 100k base steps, one H100", hours, "< 1", passed))
    return out


def run(sizes=("base", "big"), *, out=None, peak_tflops=None, repeats=5, compiler_options=None, argv=None) -> dict:
    """The whole section; writes ``accelerator.{json,md}`` under ``out`` when given and returns the report."""
    device = jax.devices()[0]
    peak = peak_flops(device.device_kind, peak_tflops)
    report = results.header("accelerator", argv) | {
        "device_kind": device.device_kind,
        "peak_bf16_flops_per_s": peak,
        "rows": [measure_size(name, peak, repeats=repeats, compiler_options=compiler_options) for name in sizes],
    }
    report["checks"] = checks(report["rows"], device.device_kind)
    if out is not None:
        results.write(out, "accelerator", report, markdown(report))
    return report


def markdown(report: dict) -> str:
    peak = report["peak_bf16_flops_per_s"]
    peak_text = f"{peak / 1e12:.4g} TFLOP/s dense bf16" if peak else "no known bf16 peak (MFU not reported)"
    lines = [
        f"# bf16 training step on one {report['device_kind']}",
        "",
        f"Peak: {peak_text}. Median step time after warm-up, compilation excluded; random ids, no padding.",
        "100k steps extrapolated from the step time.",
        "",
    ]
    header = ["model", "batch", "step (ms)", "target tokens/s", "MFU", "hours / 100k steps", "compile (s)"]
    cells = []
    for row in report["rows"]:
        b = row["batch"]
        mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        cells.append([
            row["size"], f"{b['size']} x ({b['source_length']} + {b['target_length']})",
            f"{1000 * row['step_s']:.1f}", f"{row['tokens_per_s']:,.0f}", mfu,
            f"{row['hours_per_100k_steps']:.2f}", f"{row['compile_s']:.1f}",
        ])  # fmt: skip
    lines += results.table(header, cells, align="llrrrrr")
    lines += ["", *results.checks_table(report["checks"])] if report["checks"] else []
    return "\n".join(lines + ["", results.machine_line(report)])
