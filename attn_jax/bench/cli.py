"""``attn-jax bench SECTION`` / ``python -m attn_jax.bench SECTION``: run one benchmark section, or ``all``.

    .venv/bin/python -m attn_jax.bench all --out experiments/results        # every section, ~60 min on 2 cores
    .venv/bin/python -m attn_jax.bench attention --lengths 1024 2048 --time-max-length 2048
    .venv/bin/python -m attn_jax.bench train --configs small --implementations attn_jax torch
    .venv/bin/python -m attn_jax.bench decode --uncached-max-length 256
    .venv/bin/python -m attn_jax.bench compile --layers 6 12 24
    .venv/bin/python -m attn_jax.bench scaling --devices 1 2 4 8
    .venv/bin/python -m attn_jax.bench pipeline --pairs 1000000
    .venv/bin/python -m attn_jax.bench accelerator --configs base big    # bf16 on a GPU/TPU: MFU, 100k steps
    .venv/bin/python -m attn_jax.bench table1 --lengths 16 256 4096 --widths 64 256   # the paper's Table 1, measured
    .venv/bin/python -m attn_jax.bench families --runs runs/families/*  # quality for compute from finished runs
    .venv/bin/python -m attn_jax.bench train --quick --out /tmp/bench      # tiny sizes, seconds (tests)

Each section writes ``<name>.json`` (machine, versions, command, timestamp, raw numbers, the issue's targets
with pass/fail), ``<name>.md`` and PNG plots under ``--out``, and prints its targets. Estimated times on the
2-core CPU (idle): attention ~10 min, train ~10, decode ~15, compile ~10, scaling ~10, pipeline ~5, table1 ~20.
``all`` adds ``accelerator`` when JAX's backend is a GPU or TPU; ``families`` reads training runs, so it is not
in ``all`` (attn_jax/bench/families.py names the runs it needs). ``--quick`` shrinks every size to a toy one and
compiles without LLVM optimisation: for tests of the suite, not results.
"""

import argparse
import sys
from collections.abc import Sequence

from attn_jax.arguments import count
from attn_jax.bench import results

SECTIONS = ("attention", "train", "decode", "compile", "scaling", "pipeline", "table1")
ACCELERATOR_SECTIONS = ("accelerator",)  # in ``all`` only on a GPU/TPU backend


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attn-jax bench", description=__doc__.split("\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default="experiments/results", help="folder for the JSON, Markdown and PNGs")
    common.add_argument("--quick", action="store_true", help="toy sizes (seconds): to test the suite")
    common.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    sub = parser.add_subparsers(dest="section", required=True)
    attention = sub.add_parser("attention", parents=[common], help="attention implementations: time and memory")
    attention.add_argument("--lengths", type=int, nargs="+", help="T = S values (default 128..16384)")
    attention.add_argument("--time-max-length", type=int, help="time up to this length (CPU default 4096)")
    attention.add_argument("--implementations", nargs="+", choices=("xla", "chunked", "jax_nn", "cudnn"))
    attention.add_argument("--sweep-length", type=int, help="length of the chunk-size sweep; 0 skips it")
    train = sub.add_parser("train", parents=[common], help="training step: attn_jax against peers, MFU")
    train.add_argument(
        "--configs", nargs="+", choices=("default", "small", "base"), default=["default", "small", "base"]
    )
    train.add_argument("--implementations", nargs="+", choices=("attn_jax", "flax_linen", "torch"))
    decode = sub.add_parser("decode", parents=[common], help="greedy/beam on the cache against re-running")
    decode.add_argument("--lengths", type=int, nargs="+", help="output lengths (default 32..512)")
    decode.add_argument("--uncached-max-length", type=int, help="skip the uncached baseline above this length")
    compile_ = sub.add_parser("compile", parents=[common], help="compile time: depth, scan, persistent cache")
    compile_.add_argument("--layers", type=int, nargs="+", help="layers per stack (default 6 12 24)")
    compile_.add_argument("--no-cache", action="store_true", help="skip the persistent-cache measurement")
    scaling = sub.add_parser("scaling", parents=[common], help="throughput against devices, length, model size")
    scaling.add_argument("--devices", type=int, nargs="+", help="device counts (default 1 2 4 8)")
    pipeline = sub.add_parser("pipeline", parents=[common], help="preparation, tokens/s per core, workers, padding")
    pipeline.add_argument("--pairs", type=int, help="pairs of the generated WMT-like corpus (default 1000000)")
    pipeline.add_argument("--batches", type=int, help="batches timed per reading measurement (default 50)")
    pipeline.add_argument("--no-ding", action="store_true", help="skip the Ding data (no fetch)")
    accelerator = sub.add_parser("accelerator", parents=[common], help="bf16 MFU and 100k-step time on a GPU/TPU")
    accelerator.add_argument("--configs", nargs="+", choices=("base", "big"), default=["base", "big"])
    accelerator.add_argument("--peak-tflops", type=float, help="the chip's dense bf16 peak (default: known chips)")
    table1 = sub.add_parser("table1", parents=[common], help="Table 1: per-layer cost, sequential steps, path length")
    table1.add_argument("--lengths", type=int, nargs="+", help="n at fixed d (default 16..4096)")
    table1.add_argument("--widths", type=int, nargs="+", help="d at fixed n (default 32..1024)")
    table1.add_argument("--time-max-length", type=int, help="time up to this n (default 4096; memory permitting)")
    families = sub.add_parser("families", parents=[common], help="quality for compute of finished family runs")
    families.add_argument("--runs", nargs="+", required=True, help="workdirs of finished training runs")
    families.add_argument("--budgets", type=float, nargs="+", help="minutes of training (default 5 10 20)")
    families.add_argument("--average", type=count, default=1, help="score the average of the last K saves (default 1)")
    sub.add_parser("all", parents=[common], help="every section in turn, one matmul ceiling for all")
    return parser


def _given(**options) -> dict:
    """The options the user set (None means: the section's default)."""
    return {k: v for k, v in options.items() if v is not None}


def run_section(section: str, args: argparse.Namespace, argv: Sequence[str], ceiling: dict | None = None) -> dict:
    """Runs one section with the parsed options; returns its report."""
    from attn_jax.bench import accelerator, attention, compilation, decoding, pipeline, scaling, timing, training

    quick = args.quick
    options = timing.QUICK_COMPILER_OPTIONS if quick else None
    repeats = _given(repeats=args.repeats)
    common = dict(out=args.out, argv=argv, compiler_options=options)
    if section == "attention":
        sizes = dict(lengths=(32, 64), heads=2, head_dim=8, sweep_length=64, time_max_length=64, repeats=1)
        given = _given(
            lengths=getattr(args, "lengths", None),
            time_max_length=getattr(args, "time_max_length", None),
            implementations=getattr(args, "implementations", None),
            sweep_length=getattr(args, "sweep_length", None),
        )
        return attention.run(**((sizes if quick else {}) | given | repeats | common))
    if section == "train":
        sizes = dict(sizes=("quick",), repeats=1, warmup=1) if quick else dict(sizes=tuple(args.configs))
        given = _given(implementations=getattr(args, "implementations", None), ceiling=ceiling)
        return training.run(**(sizes | given | repeats | common))
    if section == "decode":
        sizes = dict(lengths=(4, 8), batch=2, quick=True, repeats=1)
        given = _given(
            lengths=getattr(args, "lengths", None), uncached_max_length=getattr(args, "uncached_max_length", None)
        )
        return decoding.run(**((sizes if quick else {}) | given | repeats | common))
    if section == "compile":
        sizes = dict(layers=(1, 2), size="quick", repeats=1)
        given = _given(layers=getattr(args, "layers", None))
        cache = not getattr(args, "no_cache", False)
        return compilation.run(**((sizes if quick else {}) | given | repeats | common), cache=cache)
    if section == "scaling":
        sizes = dict(size="quick", devices=(1, 2), lengths=(8, 16), d_models=(32, 64), repeats=1)
        given = _given(devices=getattr(args, "devices", None), ceiling=ceiling)
        return scaling.run(**((sizes if quick else {}) | given | repeats | common))
    if section == "pipeline":
        sizes = dict(pairs=2000, tokenizer_pairs=500, vocab_size=300, batches=3, scaling_batches=3, ding=False)
        given = _given(pairs=getattr(args, "pairs", None), batches=getattr(args, "batches", None))
        given |= {"ding": False} if getattr(args, "no_ding", False) else {}
        return pipeline.run(**((sizes if quick else {}) | given | common))
    if section == "table1":
        from attn_jax.bench import table1

        sizes = dict(lengths=(8, 16), widths=(8, 16), fixed_width=8, fixed_length=8, path_length=8, repeats=1)
        given = _given(
            lengths=getattr(args, "lengths", None), widths=getattr(args, "widths", None),
            time_max_length=getattr(args, "time_max_length", None),
        )  # fmt: skip
        return table1.run(**((sizes if quick else {}) | given | repeats | common))
    if section == "families":
        from attn_jax.bench import families

        budgets = _given(budgets=args.budgets and tuple(args.budgets))
        limit = {"max_sentences": 8} if quick else {}
        return families.run(args.runs, average=args.average, out=args.out, argv=argv, **budgets, **limit)
    if section == "accelerator":
        configs = getattr(args, "configs", ("base", "big"))  # `all` has no --configs
        sizes = dict(sizes=("quick",), repeats=1) if quick else dict(sizes=tuple(configs))
        given = _given(peak_tflops=getattr(args, "peak_tflops", None))
        return accelerator.run(**(sizes | given | repeats | common))
    raise ValueError(f"unknown section {section!r}")


def _summary(report: dict, out: str) -> str:
    lines = [f"{report['section']}: results in {out}/"]
    for check in report.get("checks", []):
        lines.append(
            f"  {check['name']}: {results.fmt(check['value'])} (target {check['target']}) "
            f"passed: {results.fmt(check['passed'])}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Parses ``argv`` (default ``sys.argv[1:]``), runs the section(s), prints each report's targets; returns 0.

    Example:
      >>> _parser().parse_args(["train", "--quick", "--out", "/tmp/x"]).configs
      ['default', 'small', 'base']
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    import jax

    # Compile times are results here: a persistent compilation cache (which `attn-jax train` turns on) would
    # make them cache reads. The compile section's cache measurement uses its own fresh cache directory.
    jax.config.update("jax_enable_compilation_cache", False)
    if args.section != "all":
        print(_summary(run_section(args.section, args, argv), args.out), flush=True)
        return 0
    from attn_jax.bench.ceiling import default_sizes, matmul_ceiling

    ceiling = matmul_ceiling(default_sizes(args.quick))
    print(f"matmul ceiling: {ceiling['gflops']:.1f} GFLOP/s", flush=True)
    on_accelerator = jax.default_backend() != "cpu"
    for section in SECTIONS + (ACCELERATOR_SECTIONS if on_accelerator else ()):
        print(_summary(run_section(section, args, argv, ceiling), args.out), flush=True)
    return 0
