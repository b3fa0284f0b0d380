"""Decoding speed: greedy on the key/value cache against re-running the prefix, and beam search (beam 4).

    .venv/bin/python -m attn_jax.bench decode --out experiments/results        # attn-jax bench decode ...

A small model (d_model 256, 3+3 layers, 4 heads, d_ff 1024, vocabulary 8192, random weights), batch 8,
sources of 20-32 tokens, outputs of 32, 64, 128, 256 and 512 tokens forced to full length with
``eos_id=None``. Each decoder is compiled ahead of time (compile time recorded apart), then timed as the
median of interleaved repeats (one run of the slow uncached baseline above 64 tokens). tokens/s = batch x
output length / time. The uncached baseline (``greedy_decode_uncached``) decodes a static ``[B, T]`` buffer
every step, about twice the work of a growing prefix, so the table also gives the speedup halved.

Targets (issue 5): cached greedy >= 10x faster than the uncached baseline at 256 tokens with identical
tokens; beam 4 <= 4.5x greedy's time per output token. Expected on the 2-core CPU: about 15 minutes idle,
most of it the uncached baseline at 512 tokens (``--uncached-max-length 256`` saves ~6 minutes).
Writes ``decoding.{json,md,png}``.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from attn_jax.bench import results
from attn_jax.bench.timing import compile_ahead, interleave
from attn_jax.decoding import beam_search, greedy_decode, greedy_decode_uncached
from attn_jax.model import count_params, init_transformer
from attn_jax.model_config import TransformerConfig

LENGTHS = (32, 64, 128, 256, 512)
SMALL = dict(vocab_size=8192, d_model=256, num_heads=4, d_ff=1024, num_encoder_layers=3, num_decoder_layers=3)
QUICK = dict(vocab_size=64, d_model=32, num_heads=2, d_ff=64, num_encoder_layers=1, num_decoder_layers=1)
TARGET_SPEEDUP, TARGET_BEAM_RATIO, TARGET_LENGTH = 10.0, 4.5, 256
SOURCE_LENGTH = 32  # padded width of the sources; 20-32 real tokens each


def model_config(max_len: int, *, quick: bool = False) -> TransformerConfig:
    return TransformerConfig(**(QUICK if quick else SMALL), max_len=max_len, dropout_rate=0.0)


def sources(batch: int, vocab_size: int, seed: int = 0) -> jax.Array:
    """``[B, 32]`` random sources of 20-32 real tokens (ids 3..V-1), padded with 0."""
    rng = np.random.default_rng(seed)
    src = np.zeros((batch, SOURCE_LENGTH), np.int32)
    for b, n in enumerate(rng.integers(20, 33, size=batch)):
        src[b, :n] = rng.integers(3, vocab_size, size=n)
    return jnp.asarray(src)


def measure(fns: dict, params, src, repeats: dict, compiler_options=None) -> dict:
    """Compiles each ``fns[name](params, src)`` ahead of time, then times them interleaved."""
    compiled, outputs, compile_s = {}, {}, {}
    for name, fn in fns.items():
        compiled[name], compile_s[name] = compile_ahead(fn, params, src, compiler_options=compiler_options)

    def runner(name):
        def run():
            outputs[name] = jax.block_until_ready(compiled[name](params, src))

        return run

    timings = interleave({name: runner(name) for name in fns}, repeats=repeats, warmup=0)
    return {
        name: {
            "compile_s": compile_s[name],
            "runs_s": t["runs_s"],
            "run_s": t["median_s"],
            "cpu_s": t["cpu_median_s"],
            "load": t["load"],
            "output": outputs[name],
        }
        for name, t in timings.items()
    }


def bench_length(
    params,
    src,
    config,
    length: int,
    *,
    beam_size=4,
    repeats=3,
    uncached_repeats_max_length=64,
    uncached_max_length=None,
    compiler_options=None,
) -> dict:
    """Greedy cached, greedy uncached and beam search, all forced to ``length`` output tokens."""
    common = dict(config=config, max_len=length, eos_id=None)
    fns = {
        "greedy_cached": functools.partial(greedy_decode, **common),
        "greedy_uncached": functools.partial(greedy_decode_uncached, **common),
        "beam": functools.partial(beam_search, beam_size=beam_size, **common),
    }
    if uncached_max_length is not None and length > uncached_max_length:
        del fns["greedy_uncached"]
    slow = length > uncached_repeats_max_length
    counts = {name: 1 if slow and name == "greedy_uncached" else repeats for name in fns}
    measured = measure(fns, params, src, counts, compiler_options)
    B = src.shape[0]
    row = {"output_length": length}
    for name, result in measured.items():
        row[name] = {k: v for k, v in result.items() if k != "output"} | {"tokens_per_s": B * length / result["run_s"]}
    cached, beam = row["greedy_cached"], row["beam"]
    row["beam_over_greedy_time_per_token"] = beam["run_s"] / cached["run_s"]
    row["beam_over_greedy_cpu_time_per_token"] = beam["cpu_s"] / cached["cpu_s"]
    if "greedy_uncached" in row:
        uncached = row["greedy_uncached"]
        same = measured["greedy_cached"]["output"] == measured["greedy_uncached"]["output"]
        row["identical_tokens"] = bool(same.all())
        row["speedup_cached_over_uncached"] = uncached["run_s"] / cached["run_s"]
        row["speedup_cached_over_uncached_cpu_time"] = uncached["cpu_s"] / cached["cpu_s"]
    print(f"decode T={length}: " + ", ".join(f"{n} {row[n]['run_s']:.3f}s" for n in fns), flush=True)
    return row


def run(
    lengths=LENGTHS,
    *,
    out=None,
    batch=8,
    beam_size=4,
    repeats=3,
    uncached_repeats_max_length=64,
    uncached_max_length=None,
    quick=False,
    compiler_options=None,
    argv=None,
    command=None,
) -> dict:
    """The whole section; writes ``decoding.{json,md,png}`` under ``out`` when given and returns the report."""
    config = model_config(max(*lengths, SOURCE_LENGTH), quick=quick)
    params = jax.jit(init_transformer, static_argnames="config")(jax.random.key(0), config=config)
    src = sources(batch, config.vocab_size)
    report = results.header("decode", argv)
    report["command"] = command or report["command"]
    m = report["machine"]
    # The fields of the first, standalone version of this benchmark, which its committed results use.
    report |= {
        "jax_version": jax.__version__,
        "platform": m["platform"],
        "device": m["device_kind"],
        "cpu_count": m["cpu_count"],
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "batch": batch,
        "beam_size": beam_size,
    }
    report["model"] = {
        "d_model": config.d_model,
        "layers": f"{config.num_encoder_layers}+{config.num_decoder_layers}",
        "num_heads": config.num_heads,
        "d_ff": config.d_ff,
        "vocab_size": config.vocab_size,
        "parameters": count_params(params),
        "dtype": config.dtype,
    }
    report["rows"] = [
        bench_length(
            params,
            src,
            config,
            length,
            beam_size=beam_size,
            repeats=repeats,
            uncached_repeats_max_length=uncached_repeats_max_length,
            uncached_max_length=uncached_max_length,
            compiler_options=compiler_options,
        )
        for length in lengths
    ]
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    report["checks"] = checks(report["rows"], beam_size)
    if out is not None:
        results.write(out, "decoding", report, markdown(report), figure(report))
    return report


def checks(rows: list[dict], beam_size: int = 4) -> list[dict]:
    """The issue's targets at 256 output tokens (or the longest length measured with the baseline)."""
    with_baseline = [r for r in rows if "speedup_cached_over_uncached" in r]
    at = next(
        (r for r in with_baseline if r["output_length"] == TARGET_LENGTH), with_baseline[-1] if with_baseline else None
    )
    if at is None:
        return []
    official = at["output_length"] == TARGET_LENGTH
    speedup, beam = at["speedup_cached_over_uncached"], at["beam_over_greedy_time_per_token"]
    return [
        results.check(
            f"cached / uncached greedy speed at {at['output_length']}",
            speedup,
            f">= {TARGET_SPEEDUP}",
            speedup >= TARGET_SPEEDUP if official else None,
        ),
        results.check(
            f"identical tokens at {at['output_length']}", at["identical_tokens"], "yes", at["identical_tokens"]
        ),
        results.check(
            f"beam {beam_size} / greedy time per token at {at['output_length']}",
            beam,
            f"<= {TARGET_BEAM_RATIO}",
            beam <= TARGET_BEAM_RATIO if official else None,
        ),
    ]


def markdown(report: dict) -> str:
    m = report["model"]
    lines = [
        "# Decoding speed: KV cache vs re-running the prefix, and beam search",
        "",
        f"Model: d_model {m['d_model']}, {m['layers']} layers, {m['num_heads']} heads, d_ff {m['d_ff']}, vocabulary "
        f"{m['vocab_size']} ({m['parameters'] / 1e6:.1f}M parameters, random weights), batch {report['batch']}, "
        f"float32, {report['platform']} ({report['device']}), jax {report['jax_version']}. Outputs forced to full "
        "length (`eos_id=None`); times are medians, compilation excluded. tokens/s = batch x output length / time.",
        "",
        f"Command: `{report['command']}`. Load average during the run: {report['load_average_before']} (before), "
        f"{report['load_average_after']} (after) on {report['cpu_count']} CPUs.",
        "",
    ]
    cells = []
    for r in report["rows"]:
        base = r.get("greedy_uncached")
        speedup = r.get("speedup_cached_over_uncached")
        cells.append(
            [
                r["output_length"],
                f"{r['greedy_cached']['tokens_per_s']:.0f}",
                results.fmt(base and base["tokens_per_s"], ".0f"),
                f"{r['beam']['tokens_per_s']:.0f}",
                results.fmt(speedup, ".1f"),
                results.fmt(r.get("speedup_cached_over_uncached_cpu_time"), ".1f"),
                results.fmt(speedup and speedup / 2, ".1f"),
                f"{r['beam_over_greedy_time_per_token']:.2f}x",
                {True: "yes", False: "NO", None: "-"}[r.get("identical_tokens")],
            ]
        )
    lines += results.table(
        [
            "output length",
            "greedy cached tok/s",
            "greedy uncached tok/s",
            f"beam {report['beam_size']} tok/s",
            "cached speedup",
            "cached speedup (CPU time)",
            "speedup / 2 (growing-prefix estimate)",
            f"beam {report['beam_size']} / greedy time per token",
            "identical tokens",
        ],
        cells,
        align="rrrrrrrrl",
    )
    lines += [""] + results.checks_table(report["checks"])
    return "\n".join(lines + ["", results.machine_line(report)])


def figure(report: dict):
    fig, (rate_ax,) = results.new_figure(1, width=6.0)
    for i, name in enumerate(("greedy_cached", "greedy_uncached", "beam")):
        points = [(r["output_length"], r[name]["tokens_per_s"]) for r in report["rows"] if name in r]
        if points:
            rate_ax.plot(*zip(*points, strict=True), marker="o", color=f"C{i}", label=name.replace("_", " "))
    rate_ax.set_xscale("log", base=2)
    rate_ax.set_yscale("log")
    rate_ax.set_xlabel("output length (tokens)")
    rate_ax.set_ylabel("tokens / s")
    rate_ax.set_title(f"decoding, batch {report['batch']}")
    rate_ax.legend(fontsize=8)
    return fig
