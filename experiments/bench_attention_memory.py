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

The measuring lives in ``attn_jax.bench.attention``; this script keeps the sizes and the file format of its
committed results. The suite's wider section (all lengths 128..16384, forward and forward+backward, the
``jax.nn`` peer, plots) is ``python -m attn_jax.bench attention``.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from attn_jax.bench import attention, results
from attn_jax.chunked import KEY_CHUNK_SIZE, QUERY_CHUNK_SIZE

RESULTS = Path(__file__).parent / "results"
_FIELDS = ("implementation", "T", "S", "temp_bytes", "argument_bytes", "output_bytes", "compile_s")


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


def measure(args: argparse.Namespace) -> list[dict]:
    """Forward+backward rows in this script's format: ``{implementation, T, S, temp_bytes, ..., fwd_bwd_s}``."""
    cases = [(n, ("xla", "chunked")) for n in args.lengths] + [(n, ("chunked",)) for n in args.chunked_only_lengths]
    rows = []
    for length, implementations in cases:
        for row in attention.measure_length(
            length, batch=args.batch, heads=args.heads, head_dim=args.head_dim, implementations=implementations,
            passes=("fwd_bwd",), timed=not args.no_timing and length <= args.time_max_length,
        ):  # fmt: skip
            timing = {"fwd_bwd_s": round(row["time_s"], 4)} if "time_s" in row else {}
            row = {k: row[k] for k in _FIELDS} | timing
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def to_markdown(result: dict) -> str:
    by_length: dict[int, dict[str, dict]] = {}
    for row in result["rows"]:
        by_length.setdefault(row["T"], {})[row["implementation"]] = row
    mib = results.MIB
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
    machine = results.machine()
    given = sys.argv[1:] if argv is None else argv
    result = {
        "command": " ".join([os.path.relpath(sys.executable), "-m", "experiments.bench_attention_memory", *given]),
        "jax_version": machine["versions"]["jax"],
        "backend": machine["backend"],
        "device": machine["device_kind"],
        "machine": machine,
        "B": args.batch,
        "N": args.heads,
        "H": args.head_dim,
        "dtype": "float32",
        "query_chunk_size": QUERY_CHUNK_SIZE,
        "key_chunk_size": KEY_CHUNK_SIZE,
        "rows": measure(args),
        "sweep_length": args.sweep_length,
        "chunk_sweep": attention.chunk_sweep(
            args.sweep_length, batch=args.batch, heads=args.heads, head_dim=args.head_dim
        ),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "attention_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "attention_memory.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
