"""Attention implementations side by side: time and compiled temporary memory, forward and forward+backward.

    .venv/bin/python -m attn_jax.bench attention --out experiments/results      # attn-jax bench attention ...

For T = S in 128..16384 (B=1, N=8, H=64, no mask, float32), each implementation:

* ``xla``: attn_jax's reference einsum path (materialises the ``[B, N, T, S]`` logits);
* ``chunked``: attn_jax's Rabe-Staats blocks with the FlashAttention-2-style backward (``attn_jax.chunked``);
* ``jax_nn``: ``jax.nn.dot_product_attention`` with its default implementation, the upstream peer;
* ``cudnn``: attn_jax's ``jax.nn`` cuDNN path, on a GPU only and in bfloat16 (cuDNN has no float32 kernel).

Every case is lowered on abstract inputs and compiled ahead: ``compiled.memory_analysis().temp_size_in_bytes``
is XLA's buffer assignment (nothing runs, so even the cases too big to run are measured), and the compile
time is recorded. Cases up to ``--time-max-length`` whose buffers fit in memory are then timed (median of
interleaved repeats of all implementations at one length). A chunk-size sweep at T = S = 8192 shows how the
chunked defaults were picked.

Targets (issue 5): chunked fwd+bwd at 16384 within 24 GiB, chunked temp <= 1/30 of xla's at 8192, chunked
fwd+bwd time <= 1.2x xla's at >= 2048. Expected: xla's temp grows as T*S (~6 GiB fwd+bwd at 8192), chunked's
as T (~0.1 GiB); on the 2-core CPU the whole section takes about 10 minutes (timed up to 4096).
Writes ``attention.{json,md,png}``.
"""

import os

import jax
import jax.numpy as jnp

from attn_jax.attention import scaled_dot_product_attention
from attn_jax.bench import results
from attn_jax.bench.timing import blocking, compile_ahead, interleave, memory_bytes
from attn_jax.chunked import KEY_CHUNK_SIZE, QUERY_CHUNK_SIZE, chunked_attention

LENGTHS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
IMPLEMENTATIONS = ("xla", "chunked", "jax_nn", "cudnn")
PASSES = ("fwd", "fwd_bwd")
CHUNK_SWEEP = ((256, 512), (512, 512), (512, 1024), (1024, 1024), (1024, 4096))
TARGET_MEMORY_GIB, TARGET_MEMORY_RATIO, TARGET_TIME_RATIO = 24.0, 30.0, 1.2


def attention_fn(implementation: str, query_chunk_size: int | None = None, key_chunk_size: int | None = None):
    """``(q, k, v) -> out`` for an implementation name, or ``chunked_attention`` with the given chunks."""
    if implementation == "jax_nn":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v)
    if query_chunk_size is None:
        return lambda q, k, v: scaled_dot_product_attention(q, k, v, implementation=implementation)

    def chunked(q, k, v):
        return chunked_attention(
            q,
            k,
            v,
            mask=None,
            bias=None,
            causal=False,
            scale=q.shape[-1] ** -0.5,
            dropout_rate=0.0,
            dropout_rng=None,
            query_chunk_size=query_chunk_size,
            key_chunk_size=key_chunk_size,
        )

    return chunked


def pass_fn(attention, pass_: str):
    """``fwd``: ``(q, k, v, ct) -> out``; ``fwd_bwd``: the gradient of ``sum(out * ct)`` w.r.t. ``q, k, v``."""
    if pass_ == "fwd":
        return lambda q, k, v, cotangent: attention(q, k, v)

    def loss(q, k, v, cotangent):
        return jnp.sum((attention(q, k, v) * cotangent).astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))


def available(implementation: str) -> str | None:
    """None when the implementation can run here, else why not."""
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        return f"needs a GPU, backend is {jax.default_backend()}"
    return None


def _dtype(implementation: str):
    return jnp.bfloat16 if implementation == "cudnn" else jnp.float32


def memory_limit_bytes() -> int:
    """Half the host's memory on a CPU, the device's allocator limit otherwise: bigger cases are not run."""
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def compile_case(attention, shape: tuple, pass_: str, dtype=jnp.float32, compiler_options=None):
    """Compiles one case on abstract inputs: ``(compiled, {"temp_bytes", ..., "compile_s"})``."""
    spec = jax.ShapeDtypeStruct(shape, dtype)
    compiled, compile_s = compile_ahead(
        pass_fn(attention, pass_), spec, spec, spec, spec, compiler_options=compiler_options
    )
    return compiled, (memory_bytes(compiled) or {}) | {"compile_s": round(compile_s, 3)}


def measure_length(
    length: int,
    *,
    batch=1,
    heads=8,
    head_dim=64,
    implementations=IMPLEMENTATIONS,
    passes=PASSES,
    timed=True,
    repeats=3,
    compiler_options=None,
) -> list[dict]:
    """Rows for one ``T = S``: every implementation and pass compiled; timed when ``timed`` and it fits."""
    shape = (batch, length, heads, head_dim)
    rows, runs = [], {}
    limit = memory_limit_bytes()
    for implementation in implementations:
        for pass_ in passes:
            row = {"implementation": implementation, "pass": pass_, "T": length, "S": length}
            why_not = available(implementation)
            if why_not:
                rows.append(row | {"skipped": why_not})
                continue
            dtype = _dtype(implementation)
            compiled, info = compile_case(attention_fn(implementation), shape, pass_, dtype, compiler_options)
            row |= info | {"dtype": jnp.dtype(dtype).name}
            total = sum(info.get(k, 0) for k in ("temp_bytes", "argument_bytes", "output_bytes"))
            if timed and total < limit:
                args = [jax.random.normal(r, shape, dtype) for r in jax.random.split(jax.random.key(0), 4)]
                runs[(implementation, pass_)] = blocking(compiled, *args)
            rows.append(row)
    timings = interleave({f"{i}/{p}": run for (i, p), run in runs.items()}, repeats=repeats) if runs else {}
    for row in rows:
        timing = timings.get(f"{row['implementation']}/{row['pass']}")
        if timing:
            row |= {"time_s": timing["median_s"], "runs_s": timing["runs_s"]}
    return rows


def chunk_sweep(length: int = 8192, *, batch=1, heads=8, head_dim=64, compiler_options=None) -> list[dict]:
    """Temporary memory of the chunked forward+backward at ``length`` for several chunk sizes."""
    shape = (batch, length, heads, head_dim)
    return [
        {"query_chunk_size": cq, "key_chunk_size": ck}
        | compile_case(attention_fn("chunked", cq, ck), shape, "fwd_bwd", compiler_options=compiler_options)[1]
        for cq, ck in CHUNK_SWEEP
    ]


def _find(rows, implementation, pass_, length):
    return next((r for r in rows if (r["implementation"], r["pass"], r["T"]) == (implementation, pass_, length)), {})


def checks(rows: list[dict]) -> list[dict]:
    """The issue's targets (``passed`` None when the case was not measured)."""
    longest = max(r["T"] for r in rows)
    chunked_temp = _find(rows, "chunked", "fwd_bwd", longest).get("temp_bytes")
    gib = None if chunked_temp is None else chunked_temp / 2**30
    out = [
        results.check(
            f"chunked fwd+bwd temp at {longest} (GiB)",
            gib,
            f"<= {TARGET_MEMORY_GIB}",
            None if gib is None or longest < 16384 else gib <= TARGET_MEMORY_GIB,
        )
    ]
    at = 8192 if any(r["T"] == 8192 for r in rows) else longest
    xla, chunked = (_find(rows, i, "fwd_bwd", at).get("temp_bytes") for i in ("xla", "chunked"))
    ratio = xla / chunked if xla and chunked else None
    out.append(
        results.check(
            f"xla / chunked fwd+bwd temp at {at}",
            ratio,
            f">= {TARGET_MEMORY_RATIO}",
            None if ratio is None or at != 8192 else ratio >= TARGET_MEMORY_RATIO,
        )
    )
    for length in sorted({r["T"] for r in rows if r["T"] >= 2048}):
        xla, chunked = (_find(rows, i, "fwd_bwd", length).get("time_s") for i in ("xla", "chunked"))
        if xla and chunked:
            out.append(
                results.check(
                    f"chunked / xla fwd+bwd time at {length}",
                    chunked / xla,
                    f"<= {TARGET_TIME_RATIO}",
                    chunked / xla <= TARGET_TIME_RATIO,
                )
            )
    return out


def run(
    lengths=LENGTHS,
    *,
    out=None,
    time_max_length=None,
    repeats=3,
    batch=1,
    heads=8,
    head_dim=64,
    implementations=IMPLEMENTATIONS,
    sweep_length: int | None = 8192,
    compiler_options=None,
    argv=None,
) -> dict:
    """The whole section; writes ``attention.{json,md,png}`` under ``out`` when given and returns the report."""
    if time_max_length is None:
        time_max_length = 4096 if jax.default_backend() == "cpu" else max(lengths)
    report = results.header("attention", argv) | {
        "B": batch,
        "N": heads,
        "H": head_dim,
        "query_chunk_size": QUERY_CHUNK_SIZE,
        "key_chunk_size": KEY_CHUNK_SIZE,
        "time_max_length": time_max_length,
        "rows": [],
    }
    for length in lengths:
        report["rows"] += measure_length(
            length,
            batch=batch,
            heads=heads,
            head_dim=head_dim,
            implementations=implementations,
            timed=length <= time_max_length,
            repeats=repeats,
            compiler_options=compiler_options,
        )
        print(f"attention T=S={length}: done", flush=True)
    report["sweep_length"] = sweep_length
    report["chunk_sweep"] = (
        chunk_sweep(sweep_length, batch=batch, heads=heads, head_dim=head_dim, compiler_options=compiler_options)
        if sweep_length
        else []
    )
    report["checks"] = checks(report["rows"])
    if out is not None:
        results.write(out, "attention", report, markdown(report), figure(report))
    return report


def markdown(report: dict) -> str:
    lines = [
        "# Attention: time and compiled temporary memory",
        "",
        f"B={report['B']}, N={report['N']}, H={report['H']}, T = S, no mask; float32 (cudnn: bfloat16). temp = "
        "`compiled.memory_analysis().temp_size_in_bytes`; time = median of interleaved repeats (timed up to "
        f"T = {report['time_max_length']}). chunked: query_chunk_size={report['query_chunk_size']}, "
        f"key_chunk_size={report['key_chunk_size']}.",
        "",
    ]
    cells = []
    for r in report["rows"]:
        if "skipped" in r:
            cells.append([r["T"], r["implementation"], r["pass"], r["skipped"], "", ""])
            continue
        temp = r.get("temp_bytes")
        cells.append(
            [
                r["T"],
                r["implementation"],
                r["pass"],
                results.fmt(temp and temp / results.MIB, ",.1f"),
                results.fmt(r.get("time_s") and r["time_s"] * 1e3, ",.1f"),
                f"{r['compile_s']:.1f}",
            ]
        )
    lines += results.table(
        ["T = S", "implementation", "pass", "temp (MiB)", "time (ms)", "compile (s)"], cells, align="rllrrr"
    )
    if report["chunk_sweep"]:
        lines += ["", f"Chunk sizes, chunked fwd+bwd at T = S = {report['sweep_length']}:", ""]
        lines += results.table(
            ["query_chunk_size", "key_chunk_size", "temp (MiB)"],
            [
                [r["query_chunk_size"], r["key_chunk_size"], f"{r['temp_bytes'] / results.MIB:,.1f}"]
                for r in report["chunk_sweep"]
            ],
        )
    lines += [""] + results.checks_table(report["checks"])
    return "\n".join(lines + ["", results.machine_line(report)])


def figure(report: dict):
    fig, (memory_ax, time_ax) = results.new_figure(2)
    for i, implementation in enumerate(IMPLEMENTATIONS):
        for pass_, style in (("fwd_bwd", "-"), ("fwd", ":")):
            rows = [r for r in report["rows"] if (r["implementation"], r["pass"]) == (implementation, pass_)]
            label = f"{implementation} {pass_.replace('_', '+')}"
            mem = [(r["T"], r["temp_bytes"] / results.MIB) for r in rows if r.get("temp_bytes")]
            times = [(r["T"], r["time_s"]) for r in rows if r.get("time_s")]
            if mem:
                memory_ax.plot(*zip(*mem, strict=True), style, marker="o", color=f"C{i}", label=label)
            if times:
                time_ax.plot(*zip(*times, strict=True), style, marker="o", color=f"C{i}", label=label)
    for ax, ylabel in ((memory_ax, "compiled temp memory (MiB)"), (time_ax, "time (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T = S")
        ax.set_ylabel(ylabel)
        if ax.has_data():
            ax.legend(fontsize=7)
    return fig
