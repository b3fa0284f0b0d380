"""The paper's Table 1, measured: per-layer cost, sequential operations and maximum path length.

    .venv/bin/python -m attn_jax.bench table1 --out experiments/results      # attn-jax bench table1 ...
    .venv/bin/python -m attn_jax.bench table1 --quick --out /tmp/bench       # toy sizes, seconds (tests)

Vaswani et al. (§4, Table 1) compare layer types by complexity per layer, sequential operations and maximum path
length: self-attention O(n^2 d), O(1), O(1); recurrent O(n d^2), O(n), O(n). Four layers map ``x [B, n, d]``
to ``[B, n, d]`` here:

* ``self_attention``: attn_jax's multi-head self-attention (``implementation="xla"``, N = d / 64 heads);
* ``recurrent``: a GRU over the sequence (``attn_jax.rnn.gru``, one ``lax.scan`` step per position);
* ``additive``: Bahdanau's additive attention with every position as a query (``A = d``): the same O(n^2 d)
  as dot-product attention, but through a ``[B, n, n, A]`` tanh instead of a matrix product, which is the
  paper's §3.2.1 remark that dot-product attention is "much faster and more space-efficient in practice";
* ``additive_step``: the same attention as RNNsearch's decoder runs it, one query per ``lax.scan`` step.

For n in 16..4096 at d = 256 and for d in 32..1024 at n = 256 (B = 1, float32), each layer's forward and
forward+backward is compiled ahead on abstract inputs: ``memory_analysis().temp_size_in_bytes`` is measured for
every case (nothing runs), time (median of interleaved repeats) for those up to ``--time-max-length`` that fit
in half the host's memory. Sequential operations are counted two ways: the summed length of the ``scan``s in
the traced program, and the trip counts of XLA's while loops in the compiled one. A log-log least-squares fit
over the upper half of each sweep gives the measured exponent of n and of d, next to the paper's.

Maximum path length: the norm of the gradient of output position t = n - 1 with respect to input position s,
``||d <y_t, u> / d x_s||`` (u a random unit vector, averaged over seeds), against the distance t - s. One
attention layer connects every pair in one step, so its curve is flat; the GRU's signal passes through t - s
state updates and decays.

Writes ``table1.{json,md,png}`` and ``path_length.png``. Expected on the 2-core CPU: about 20-30 minutes (the
additive layer's [n, n, A] tensor dominates: at n = 4096, d = 256 it needs 17 GB and is compiled, not run).
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from attn_jax.additive import additive_attention, additive_attention_projected, init_additive_attention, project_keys
from attn_jax.attention import init_multi_head_attention, multi_head_attention
from attn_jax.bench import results
from attn_jax.bench.attention import memory_limit_bytes
from attn_jax.bench.timing import blocking, compile_ahead, interleave, memory_bytes
from attn_jax.rnn import gru, init_gru

LAYERS = ("self_attention", "recurrent", "additive", "additive_step")
PASSES = ("fwd", "fwd_bwd")
LENGTHS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
WIDTHS = (32, 64, 128, 256, 512, 1024)
FIXED_WIDTH, FIXED_LENGTH = 256, 256
# The paper's Table 1 rows (additive: our reading of the same analysis) and the exponents they predict.
PAPER = {
    "self_attention": {"complexity": "O(n^2 d)", "sequential": "O(1)", "path": "O(1)", "n": 2, "d": 1},
    "recurrent": {"complexity": "O(n d^2)", "sequential": "O(n)", "path": "O(n)", "n": 1, "d": 2},
    "additive": {"complexity": "O(n^2 d)", "sequential": "O(1)", "path": "O(1)", "n": 2, "d": 1},
    "additive_step": {"complexity": "O(n^2 d)", "sequential": "O(n)", "path": "O(1)", "n": 2, "d": 1},
}

# ----------------------------------------------------------------------------------------------------------
# The layers
# ----------------------------------------------------------------------------------------------------------


def init_layer(layer: str, rng, d: int) -> dict:
    """Parameters of one ``layer`` of width ``d``."""
    if layer == "self_attention":
        return init_multi_head_attention(rng, d, max(1, d // 64))
    if layer == "recurrent":
        return init_gru(rng, d, d)
    return init_additive_attention(rng, d, d, d)


def apply_layer(layer: str, params, x):
    """``[B, n, d] -> [B, n, d]``.

    Example:
      >>> x = jnp.ones((1, 4, 8))
      >>> [apply_layer(name, init_layer(name, jax.random.key(0), 8), x).shape for name in LAYERS]
      [(1, 4, 8), (1, 4, 8), (1, 4, 8), (1, 4, 8)]
    """
    if layer == "self_attention":
        return multi_head_attention(params, x, implementation="xla")
    if layer == "recurrent":
        return gru(params, x, jnp.ones(x.shape[:2], jnp.bool_))
    if layer == "additive":
        return additive_attention(params, x, x, x)
    keys = project_keys(params, x)

    def step(_, query):  # one decoder query per step, as RNNsearch attends
        return None, additive_attention_projected(params, query[:, None], keys, x)[:, 0]

    _, context = jax.lax.scan(step, None, jnp.swapaxes(x, 0, 1))  # [B, n, d] -> [n, B, d]
    return jnp.swapaxes(context, 0, 1)


def pass_fn(layer: str, pass_: str):
    """``fwd``: ``(params, x, ct) -> y``; ``fwd_bwd``: the gradient of ``sum(y * ct)`` w.r.t. params and x."""
    if pass_ == "fwd":
        return lambda params, x, cotangent: apply_layer(layer, params, x)
    return jax.grad(lambda params, x, cotangent: jnp.sum(apply_layer(layer, params, x) * cotangent), argnums=(0, 1))


# ----------------------------------------------------------------------------------------------------------
# Sequential operations
# ----------------------------------------------------------------------------------------------------------


def scan_steps(jaxpr) -> int:
    """Summed length of the ``scan``s of a (closed) jaxpr, a scan inside a scan counted once per outer step.

    Example:
      >>> scan_steps(jax.make_jaxpr(lambda x: jax.lax.scan(lambda c, _: (c, None), x, None, length=7)[0])(1.0))
      7
    """
    total = 0
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        inner = sum(scan_steps(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
        if eqn.primitive.name == "scan":
            total += eqn.params["length"] * max(inner, 1)
        else:
            total += inner
    return total


def while_trip_counts(hlo_text: str) -> list[int]:
    """The known trip counts of the while loops XLA kept in a compiled program (unrolled loops leave none)."""
    counts = []
    for line in hlo_text.splitlines():
        if " while(" in line and '"known_trip_count":{"n":"' in line:
            counts.append(int(line.split('"known_trip_count":{"n":"')[1].split('"')[0]))
    return counts


# ----------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------


def measure(
    sizes, *, sweep: str, batch=1, layers=LAYERS, passes=PASSES, time_max_length=4096, repeats=3, compiler_options=None
) -> list[dict]:
    """One row per (layer, pass, n, d) of ``sizes``: temp memory, compile time, sequential steps, time."""
    rows, runs = [], {}
    limit = memory_limit_bytes()
    for n, d in sizes:
        x_spec = jax.ShapeDtypeStruct((batch, n, d), jnp.float32)
        for layer in layers:
            params = init_layer(layer, jax.random.key(0), d)
            p_spec = jax.tree.map(lambda w: jax.ShapeDtypeStruct(w.shape, w.dtype), params)
            for pass_ in passes:
                fn = pass_fn(layer, pass_)
                compiled, compile_s = compile_ahead(fn, p_spec, x_spec, x_spec, compiler_options=compiler_options)
                row = {"sweep": sweep, "layer": layer, "pass": pass_, "n": n, "d": d, "compile_s": round(compile_s, 3)}
                row |= memory_bytes(compiled) or {}
                row["scan_steps"] = scan_steps(jax.make_jaxpr(fn)(params, x_spec, x_spec))
                row["while_trip_counts"] = while_trip_counts(compiled.as_text())
                total = sum(row.get(k, 0) for k in ("temp_bytes", "argument_bytes", "output_bytes"))
                if n <= time_max_length and total < limit:
                    x = jax.random.normal(jax.random.key(1), (batch, n, d))
                    runs[(layer, pass_, n, d)] = blocking(compiled, params, x, x)
                rows.append(row)
        print(f"table1 {sweep}: n={n} d={d} compiled", flush=True)
    # One interleaved timing per size, so a busy minute falls on every layer alike.
    for n, d in sizes:
        group = {f"{k[0]}/{k[1]}": run for k, run in runs.items() if k[2:] == (n, d)}
        for name, timing in (interleave(group, repeats=repeats) if group else {}).items():
            layer, pass_ = name.split("/")
            row = next(r for r in rows if (r["layer"], r["pass"], r["n"], r["d"]) == (layer, pass_, n, d))
            row |= {"time_s": timing["median_s"], "runs_s": timing["runs_s"]}
    return rows


def fit_exponent(xs, ys) -> float | None:
    """Slope of ``log y`` against ``log x`` by least squares over the upper half of the points (the asymptote).

    Example:
      >>> round(fit_exponent([16, 32, 64, 128], [2.0, 8.0, 32.0, 128.0]), 3)
      2.0
    """
    points = sorted((x, y) for x, y in zip(xs, ys, strict=True) if y and y > 0)
    points = points[len(points) // 2 :] if len(points) >= 4 else points
    if len(points) < 2:
        return None
    logs = np.log(np.asarray(points, np.float64))
    return float(np.polyfit(logs[:, 0], logs[:, 1], 1)[0])


def slopes(rows: list[dict]) -> list[dict]:
    """Measured exponents of time and memory in n (length sweep) and d (width sweep), beside the paper's."""
    out = []
    for layer in LAYERS:
        for pass_ in PASSES:
            entry = {"layer": layer, "pass": pass_} | PAPER[layer]
            for sweep, axis in (("length", "n"), ("width", "d")):
                picked = [r for r in rows if (r["layer"], r["pass"], r["sweep"]) == (layer, pass_, sweep)]
                if not picked:
                    continue
                entry[f"time_vs_{axis}"] = fit_exponent([r[axis] for r in picked], [r.get("time_s") for r in picked])
                entry[f"memory_vs_{axis}"] = fit_exponent(
                    [r[axis] for r in picked], [r.get("temp_bytes") for r in picked]
                )
                entry[f"scan_steps_at_max_{axis}"] = max(r["scan_steps"] for r in picked)
            out.append(entry)
    return out


def path_gradients(layer: str, *, n: int = 64, d: int = 64, seeds: int = 4) -> list[float]:
    """``g[k] = mean over seeds of ||d <y_t, u> / d x_{t-k}||`` for t = n - 1, k = 0 .. n - 1 (random init)."""
    norms = np.zeros(n)
    for seed in range(seeds):
        r_params, r_x, r_u = jax.random.split(jax.random.key(seed), 3)
        params = init_layer(layer, r_params, d)
        u = jax.random.normal(r_u, (d,))
        u = u / jnp.linalg.norm(u)

        def readout(x, params=params, u=u):
            return apply_layer(layer, params, x)[0, -1] @ u

        grads = jax.jit(jax.grad(readout))(jax.random.normal(r_x, (1, n, d)))  # [1, n, d]
        norms += np.linalg.norm(np.asarray(grads[0]), axis=-1)[::-1] / seeds  # index = distance t - s
    return norms.tolist()


def run(
    lengths=LENGTHS,
    widths=WIDTHS,
    *,
    out=None,
    fixed_width=FIXED_WIDTH,
    fixed_length=FIXED_LENGTH,
    batch=1,
    time_max_length=4096,
    path_length=64,
    repeats=3,
    compiler_options=None,
    argv=None,
) -> dict:
    """The whole section; writes ``table1.{json,md,png}`` and ``path_length.png`` under ``out`` when given."""
    report = results.header("table1", argv) | {
        "B": batch,
        "fixed_width": fixed_width,
        "fixed_length": fixed_length,
        "time_max_length": time_max_length,
        "paper": PAPER,
    }
    common = dict(batch=batch, time_max_length=time_max_length, repeats=repeats, compiler_options=compiler_options)
    rows = measure([(n, fixed_width) for n in lengths], sweep="length", **common)
    rows += measure([(fixed_length, d) for d in widths], sweep="width", **common)
    report["rows"] = rows
    report["slopes"] = slopes(rows)
    report["path_length"] = {"n": path_length, "d": min(64, fixed_width)}
    report["path_gradients"] = {
        layer: path_gradients(layer, n=path_length, d=report["path_length"]["d"]) for layer in LAYERS
    }
    if out is not None:
        results.write(out, "table1", report, markdown(report), figure(report))
        path_figure(report).savefig(f"{out}/path_length.png", dpi=100)
    return report


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    lines = [
        "# Table 1, measured: per-layer cost, sequential operations, path length",
        "",
        f"B={report['B']}, float32. Length sweep at d = {report['fixed_width']}, width sweep at n = "
        f"{report['fixed_length']}; time = median of interleaved repeats (timed up to n = "
        f"{report['time_max_length']}), memory = compiled temp bytes. Exponents: least-squares slope of log time "
        "(or memory) against log n or log d over the upper half of each sweep.",
        "",
    ]
    cells = []
    for s in report["slopes"]:
        cells.append(
            [s["layer"], s["pass"].replace("_", "+"), s["complexity"], s["n"], results.fmt(s.get("time_vs_n"), ".2f"),
             results.fmt(s.get("memory_vs_n"), ".2f"), s["d"], results.fmt(s.get("time_vs_d"), ".2f"),
             s["sequential"], s.get("scan_steps_at_max_n", "-"), s["path"]]
        )  # fmt: skip
    lines += results.table(
        ["layer", "pass", "paper complexity", "paper n-exp.", "time n-exp.", "memory n-exp.", "paper d-exp.",
         "time d-exp.", "paper sequential", f"scan steps at n={max(r['n'] for r in report['rows'])}",
         "paper path"],
        cells, align="lllrrrrrlrl",
    )  # fmt: skip
    lines += ["", "Every case:", ""]
    rows = [
        [r["sweep"], r["layer"], r["pass"], r["n"], r["d"],
         results.fmt(r.get("temp_bytes") and r["temp_bytes"] / results.MIB, ",.2f"),
         results.fmt(r.get("time_s") and r["time_s"] * 1e3, ",.3f"), r["scan_steps"],
         ",".join(map(str, r["while_trip_counts"])) or "-"]
        for r in report["rows"]
    ]  # fmt: skip
    lines += results.table(
        ["sweep", "layer", "pass", "n", "d", "temp (MiB)", "time (ms)", "scan steps", "XLA while trips"],
        rows, align="lllrrrrrl",
    )  # fmt: skip
    grads = report["path_gradients"]
    distances = [k for k in (0, 1, 2, 4, 8, 16, 32, 63) if k < report["path_length"]["n"]]
    lines += ["", f"Path length: ||d y_t / d x_(t-k)|| (n = {report['path_length']['n']}, d = "
              f"{report['path_length']['d']}, t = n - 1, mean of 4 random inits):", ""]  # fmt: skip
    lines += results.table(
        ["layer", *[f"k={k}" for k in distances]],
        [[layer, *[f"{grads[layer][k]:.2e}" for k in distances]] for layer in grads],
        align="l" + "r" * len(distances),
    )
    return "\n".join(lines + ["", results.machine_line(report)])


def figure(report: dict):
    fig, axes = results.new_figure(3, width=5.2)
    for i, layer in enumerate(LAYERS):
        for pass_, style in (("fwd_bwd", "-"), ("fwd", ":")):
            label = f"{layer} {pass_.replace('_', '+')}"
            for ax, sweep, axis, key, scale in (
                (axes[0], "length", "n", "time_s", 1e3),
                (axes[1], "length", "n", "temp_bytes", 1 / results.MIB),
                (axes[2], "width", "d", "time_s", 1e3),
            ):
                picked = [r for r in report["rows"] if (r["layer"], r["pass"], r["sweep"]) == (layer, pass_, sweep)]
                points = [(r[axis], r[key] * scale) for r in picked if r.get(key)]
                if points:
                    ax.plot(*zip(*points, strict=True), style, marker="o", color=f"C{i}", label=label)
    titles = (f"time against n (d = {report['fixed_width']})", f"memory against n (d = {report['fixed_width']})",
              f"time against d (n = {report['fixed_length']})")  # fmt: skip
    ylabels = ("time (ms)", "compiled temp memory (MiB)", "time (ms)")
    for ax, title, ylabel, xlabel in zip(axes, titles, ylabels, ("n", "n", "d"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if ax.has_data():
            ax.legend(fontsize=6)
    return fig


def path_figure(report: dict):
    fig, (ax,) = results.new_figure(1, width=6.0)
    for i, (layer, grads) in enumerate(report["path_gradients"].items()):
        ax.plot(range(len(grads)), grads, marker=".", color=f"C{i}", label=f"{layer} (paper: {PAPER[layer]['path']})")
    ax.set_yscale("log")
    ax.set_xlabel("distance t - s")
    ax.set_ylabel("||d y_t / d x_s||")
    ax.set_title("maximum path length: gradient of the last output w.r.t. earlier inputs", fontsize=9)
    ax.legend(fontsize=7)
    return fig
