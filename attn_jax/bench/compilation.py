"""Compile time against depth, scanned against unrolled layers, and the persistent compilation cache.

    .venv/bin/python -m attn_jax.bench compile --out experiments/results       # attn-jax bench compile ...

The training step (``attn_jax.train.train_step``, the ``small`` widths of ``attn_jax.bench.training``: d_model
256, 4 heads, d_ff 1024, vocabulary 8192, batch 32 x (64 + 64), float32) with 6, 12 and 24 encoder and as many
decoder layers, built with ``scan_layers=True`` (one ``lax.scan`` per stack) and ``False`` (a Python loop):
the trace + lowering time and the XLA compile time of each, then the step times of the two (median of
interleaved repeats). Then the persistent compilation cache: two fresh processes compile the 6-layer scanned
step with the same, initially empty, cache directory; the first compiles cold, the second reads the cache.

Targets (issue 5): with scan, compile time at 24 layers <= 1.5x that at 6, and step time within 5% of the
unrolled step. Expected: scanned compile time nearly flat in depth, unrolled roughly linear; a warm cache
turns a compile of tens of seconds into well under one. On the 2-core CPU the section takes about 10
minutes, most of it compiling the unrolled 24-layer step. Writes ``compile.{json,md,png}``.
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

import jax

from attn_jax.bench import results
from attn_jax.bench.timing import interleave
from attn_jax.bench.training import SIZES, optimizer, synthetic_batch
from attn_jax.train import init_train_state, train_step

LAYERS = (6, 12, 24)
TARGET_COMPILE_RATIO, TARGET_STEP_RATIO = 1.5, 1.05


def _config(size: str, layers: int, scan: bool):
    base, B, S, T = SIZES[size]
    return dataclasses.replace(base, num_encoder_layers=layers, num_decoder_layers=layers, scan_layers=scan), B, S, T


def compile_step(config, batch: dict, compiler_options=None) -> tuple:
    """``(compiled train step, {"lower_s", "compile_s", "total_s"})`` on abstract state, so nothing runs."""
    tx = optimizer(config)
    state = jax.eval_shape(lambda: init_train_state(jax.random.key(0), config, tx))
    start = time.perf_counter()
    lowered = jax.jit(functools.partial(train_step, model_config=config, tx=tx), donate_argnums=0).lower(
        state, batch, jax.random.key(0)
    )
    lowered_at = time.perf_counter()
    compiled = lowered.compile(compiler_options=compiler_options)
    done = time.perf_counter()
    return compiled, {"lower_s": lowered_at - start, "compile_s": done - lowered_at, "total_s": done - start}


def _runner(compiled, config, batch):
    tx = optimizer(config)
    holder = [jax.jit(init_train_state, static_argnums=(1, 2))(jax.random.key(0), config, tx)]
    rng = jax.random.key(1)

    def run():
        holder[0], metrics = compiled(holder[0], batch, rng)
        jax.block_until_ready((holder[0], metrics))

    return run


def measure_depth(layers: int, *, size="small", repeats=3, compiler_options=None) -> list[dict]:
    """Compile and step times of the scanned and the unrolled step at one depth."""
    rows, runs = [], {}
    for scan in (True, False):
        config, B, S, T = _config(size, layers, scan)
        batch = synthetic_batch(config, B, S, T)
        compiled, info = compile_step(config, batch, compiler_options)
        runs["scan" if scan else "unrolled"] = _runner(compiled, config, batch)
        rows.append({"layers": layers, "scan_layers": scan} | info)
        print(f"compile L={layers} scan={scan}: {info['total_s']:.1f}s", flush=True)
    timings = interleave(runs, repeats=repeats)
    for row in rows:
        timing = timings["scan" if row["scan_layers"] else "unrolled"]
        row |= {"step_s": timing["median_s"], "runs_s": timing["runs_s"]}
    return rows


def cache_probe(cache_dir: str, size: str, layers: int, quick: bool) -> dict:
    """Run in a fresh process: compiles the scanned step with ``cache_dir`` as the persistent cache."""
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    config, B, S, T = _config(size, layers, True)
    options = {"xla_backend_optimization_level": 0} if quick else None
    return compile_step(config, synthetic_batch(config, B, S, T), options)[1]


def measure_cache(*, size="small", layers=6, quick=False) -> dict:
    """Compile times in two fresh processes sharing one new cache directory: cold, then warm."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="attn_jax_cache_") as cache_dir:
        for name in ("cold", "warm"):
            command = [sys.executable, "-m", "attn_jax.bench.compilation", cache_dir, size, str(layers)]
            command += ["--quick"] if quick else []
            start = time.perf_counter()
            done = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ.copy())
            out[name] = json.loads(done.stdout.strip().splitlines()[-1]) | {"process_s": time.perf_counter() - start}
        out["entries"] = len(os.listdir(cache_dir))
    print(f"compile cache: cold {out['cold']['total_s']:.1f}s, warm {out['warm']['total_s']:.1f}s", flush=True)
    return out


def checks(rows: list[dict], cache: dict | None, *, official: bool = True) -> list[dict]:
    """The issue's targets; ``passed`` is None unless ``official`` (the real widths) and at 6 and 24 layers."""
    scanned = {r["layers"]: r for r in rows if r["scan_layers"]}
    unrolled = {r["layers"]: r for r in rows if not r["scan_layers"]}
    out = []
    if len(scanned) > 1:
        low, high = min(scanned), max(scanned)
        ratio = scanned[high]["total_s"] / scanned[low]["total_s"]
        decided = official and (low, high) == (6, 24)
        out.append(
            results.check(
                f"scan: compile time {high} / {low} layers",
                ratio,
                f"<= {TARGET_COMPILE_RATIO}",
                ratio <= TARGET_COMPILE_RATIO if decided else None,
            )
        )
    for layers in sorted(scanned):
        ratio = scanned[layers]["step_s"] / unrolled[layers]["step_s"]
        out.append(
            results.check(
                f"step time scan / unrolled, {layers} layers",
                ratio,
                f"<= {TARGET_STEP_RATIO}",
                ratio <= TARGET_STEP_RATIO if official else None,
            )
        )
    if cache:
        out.append(
            results.check(
                "compile time warm / cold cache",
                cache["warm"]["total_s"] / cache["cold"]["total_s"],
                "< 1 (informational)",
                None,
            )
        )
    return out


def run(layers=LAYERS, *, out=None, size="small", repeats=3, cache=True, compiler_options=None, argv=None) -> dict:
    """The whole section; writes ``compile.{json,md,png}`` under ``out`` when given and returns the report."""
    report = results.header("compile", argv) | {"size": size, "compiler_options": compiler_options or {}}
    report["rows"] = [
        row for n in layers for row in measure_depth(n, size=size, repeats=repeats, compiler_options=compiler_options)
    ]
    report["cache"] = measure_cache(size=size, layers=min(layers), quick=bool(compiler_options)) if cache else None
    report["checks"] = checks(report["rows"], report["cache"], official=size != "quick")
    if out is not None:
        results.write(out, "compile", report, markdown(report), figure(report))
    return report


def markdown(report: dict) -> str:
    model, B, S, T = SIZES[report["size"]]
    lines = [
        "# Compile time: depth, scan against unrolled, persistent cache",
        "",
        f"Training step of the `{report['size']}` widths (d_model {model.d_model}, {model.num_heads} heads, d_ff "
        f"{model.d_ff}, vocabulary {model.vocab_size}), batch {B} x ({S} + {T}), L encoder + L decoder layers. "
        "lower = trace + lowering to StableHLO; compile = XLA; step = median of interleaved repeats.",
        "",
    ]
    cells = [
        [
            r["layers"],
            "scan" if r["scan_layers"] else "unrolled",
            f"{r['lower_s']:.1f}",
            f"{r['compile_s']:.1f}",
            f"{r['total_s']:.1f}",
            f"{r['step_s'] * 1e3:.1f}",
        ]
        for r in report["rows"]
    ]
    lines += results.table(["L", "layers", "lower (s)", "compile (s)", "total (s)", "step (ms)"], cells, align="rlrrrr")
    if report["cache"]:
        c = report["cache"]
        lines += [
            "",
            f"Persistent compilation cache ({min(r['layers'] for r in report['rows'])} layers, scanned, "
            f"fresh processes): cold {c['cold']['total_s']:.2f} s, warm {c['warm']['total_s']:.2f} s "
            f"(whole process {c['cold']['process_s']:.1f} s and {c['warm']['process_s']:.1f} s).",
        ]
    lines += [""] + results.checks_table(report["checks"])
    return "\n".join(lines + ["", results.machine_line(report)])


def figure(report: dict):
    fig, (compile_ax, step_ax) = results.new_figure(2)
    for i, scan in enumerate((True, False)):
        rows = [r for r in report["rows"] if r["scan_layers"] == scan]
        label = "scan" if scan else "unrolled"
        compile_ax.plot(
            [r["layers"] for r in rows], [r["total_s"] for r in rows], marker="o", color=f"C{i}", label=label
        )
        step_ax.plot([r["layers"] for r in rows], [r["step_s"] for r in rows], marker="o", color=f"C{i}", label=label)
    for ax, ylabel in ((compile_ax, "lower + compile (s)"), (step_ax, "step time (s)")):
        ax.set_xlabel("layers per stack")
        ax.set_ylabel(ylabel)
        ax.legend()
    return fig


if __name__ == "__main__":  # the child process of ``measure_cache``
    print(json.dumps(cache_probe(sys.argv[1], sys.argv[2], int(sys.argv[3]), "--quick" in sys.argv[4:])))
