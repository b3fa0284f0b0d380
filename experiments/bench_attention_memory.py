"""Compiled temporary memory of attention forward+backward: the "xla" path against the "chunked" one.

Command, from the repository root (2 shared CPU cores: about 3 minutes, most of it timing the small sizes;
``--no-timing`` makes it about 1 minute):

    .venv/bin/python -m experiments.bench_attention_memory

For T = S in 1024..8192 (and 16384 for "chunked" only), B=1, N=8, H=64, float32, it lowers and compiles
``grad(sum(attention(q, k, v) * cotangent))`` w.r.t. ``q, k, v`` and reads
``compiled.memory_analysis().temp_size_in_bytes`` (XLA's buffer assignment, nothing is executed). Expected:
"xla" grows as T*S (several [B, N, T, S] float32 buffers: ~6 GiB at 8192), "chunked" grows as T (~0.1 GiB at
8192), a ratio above 30 at T = S = 8192 (the issue asked for at most 1/10, later 1/30). It also sweeps the
chunk sizes at 8192, which is how ``attn_jax.chunked``'s defaults were picked, and times the sizes up to
``--time-max-length``. Writes ``experiments/results/attention_memory.{json,md}``.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from attn_jax.attention import scaled_dot_product_attention
from attn_jax.chunked import KEY_CHUNK_SIZE, QUERY_CHUNK_SIZE, chunked_attention

RESULTS = Path(__file__).parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--chunked-only-lengths", type=int, nargs="*", default=[16384])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--sweep-length", type=int, default=8192, help="length for the chunk-size sweep")
    parser.add_argument("--time-max-length", type=int, default=2048, help="time sizes up to this length")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def attention_fn(implementation: str, query_chunk_size: int | None = None, key_chunk_size: int | None = None):
    """``(q, k, v) -> out`` through the public entry point, or ``chunked_attention`` with given chunks."""
    if query_chunk_size is None:
        return lambda q, k, v: scaled_dot_product_attention(q, k, v, implementation=implementation)

    def chunked(q, k, v):
        return chunked_attention(
            q, k, v, mask=None, bias=None, causal=False, scale=q.shape[-1] ** -0.5, dropout_rate=0.0,
            dropout_rng=None, query_chunk_size=query_chunk_size, key_chunk_size=key_chunk_size,
        )  # fmt: skip

    return chunked


def forward_backward(attention):
    """The gradient of ``sum(attention(q, k, v) * cotangent)`` w.r.t. ``q, k, v``, jitted."""

    def loss(q, k, v, cotangent):
        return jnp.sum(attention(q, k, v) * cotangent)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def compiled_memory(attention, shape) -> dict:
    """Lowers and compiles forward+backward on abstract inputs; returns XLA's memory analysis in bytes."""
    spec = jax.ShapeDtypeStruct(shape, jnp.float32)
    start = time.perf_counter()
    compiled = forward_backward(attention).lower(spec, spec, spec, spec).compile()
    analysis = compiled.memory_analysis()
    return {
        "temp_bytes": int(analysis.temp_size_in_bytes),
        "argument_bytes": int(analysis.argument_size_in_bytes),
        "output_bytes": int(analysis.output_size_in_bytes),
        "compile_s": round(time.perf_counter() - start, 2),
    }


def time_forward_backward(attention, shape, repeats: int = 3) -> float:
    """Median wall time in seconds of one jitted forward+backward (after a warm-up call)."""
    step = forward_backward(attention)
    args = [jax.random.normal(r, shape, jnp.float32) for r in jax.random.split(jax.random.key(0), 4)]
    jax.block_until_ready(step(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(args: argparse.Namespace) -> list[dict]:
    rows = []
    cases = [(n, impl) for n in args.lengths for impl in ("xla", "chunked")]
    cases += [(n, "chunked") for n in args.chunked_only_lengths]
    for length, implementation in cases:
        shape = (args.batch, length, args.heads, args.head_dim)
        row = {
            "implementation": implementation,
            "T": length,
            "S": length,
            **compiled_memory(attention_fn(implementation), shape),
        }
        if not args.no_timing and length <= args.time_max_length:
            row["fwd_bwd_s"] = round(time_forward_backward(attention_fn(implementation), shape), 4)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def chunk_sweep(args: argparse.Namespace) -> list[dict]:
    """Temporary memory of the chunked forward+backward at ``--sweep-length`` for several chunk sizes."""
    shape = (args.batch, args.sweep_length, args.heads, args.head_dim)
    rows = []
    for cq, ck in [(256, 512), (512, 512), (512, 1024), (1024, 1024), (1024, 4096)]:
        row = {"query_chunk_size": cq, "key_chunk_size": ck, **compiled_memory(attention_fn("chunked", cq, ck), shape)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def to_markdown(result: dict) -> str:
    by_length: dict[int, dict[str, dict]] = {}
    for row in result["rows"]:
        by_length.setdefault(row["T"], {})[row["implementation"]] = row
    mib = 2.0**20
    lines = [
        "# Attention forward+backward: compiled temporary memory",
        "",
        f"B={result['B']}, N={result['N']}, H={result['H']}, float32, T = S; "
        f"chunked defaults query_chunk_size={result['query_chunk_size']}, "
        f"key_chunk_size={result['key_chunk_size']}. `temp_size_in_bytes` of "
        "`jit(grad(sum(attention(q, k, v) * ct))).lower(...).compile().memory_analysis()`.",
        "",
        f"jax {result['jax_version']}, {result['backend']} ({result['device']}), {result['machine']['platform']}. "
        f"Command: `{result['command']}`",
        "",
        "| T = S | xla temp (MiB) | chunked temp (MiB) | xla / chunked | xla fwd+bwd (s) | chunked fwd+bwd (s) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for length, rows in sorted(by_length.items()):
        xla, chunked = rows.get("xla"), rows.get("chunked")
        xla_mib = f"{xla['temp_bytes'] / mib:,.1f}" if xla else "not compiled"
        ratio = f"{xla['temp_bytes'] / chunked['temp_bytes']:.1f}" if xla and chunked else "-"
        times = [f"{r['fwd_bwd_s']:.3f}" if r and "fwd_bwd_s" in r else "-" for r in (xla, chunked)]
        lines.append(
            f"| {length} | {xla_mib} | {chunked['temp_bytes'] / mib:,.1f} | {ratio} | {times[0]} | {times[1]} |"
        )
    lines += [
        "",
        "Timings are the median of 3 jitted forward+backward calls on the machine above (a shared CPU when run"
        " for this table): indicative only. The issue's target is xla / chunked >= 10 at T = S = 8192 (later 30).",
    ]
    lines += ["", f"Chunk-size sweep at T = S = {result['sweep_length']} (chunked temp, MiB):", ""]
    lines += ["| query_chunk_size | key_chunk_size | temp (MiB) |", "|---:|---:|---:|"]
    for row in result["chunk_sweep"]:
        lines.append(f"| {row['query_chunk_size']} | {row['key_chunk_size']} | {row['temp_bytes'] / mib:,.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    result = {
        "command": " ".join([os.path.relpath(sys.executable), "-m", __spec__.name, *sys.argv[1:]])
        if __spec__ is not None
        else " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
        },
        "B": args.batch,
        "N": args.heads,
        "H": args.head_dim,
        "dtype": "float32",
        "query_chunk_size": QUERY_CHUNK_SIZE,
        "key_chunk_size": KEY_CHUNK_SIZE,
        "rows": measure(args),
        "sweep_length": args.sweep_length,
        "chunk_sweep": chunk_sweep(args),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "attention_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "attention_memory.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
