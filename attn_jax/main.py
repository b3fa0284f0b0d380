"""The attn-jax command line: prepare, train, eval, translate, average and bench. Intentionally thin.

    attn-jax train --config experiments/ding_en_de.py --workdir runs/ding_en_de [--config.train.steps=100]
    attn-jax eval --workdir runs/ding_en_de [--checkpoint latest|averaged|STEP]
    attn-jax translate --workdir runs/ding_en_de "Where is the station?"     (or one sentence a line on stdin)
    attn-jax average --workdir runs/ding_en_de --last 5 [--until STEP]
    attn-jax bench all --out experiments/results        (see attn_jax/bench/cli.py)

A configuration error prints one line naming the field and exits with status 2, before anything compiles.
"""

import argparse
import logging
import os
import sys

from attn_jax import malloc
from attn_jax.arguments import count

_COMMANDS = {
    "prepare": "train the tokenizer and encode the data set into token ids (train does it when needed)",
    "train": "train, resuming from the newest checkpoint in the workdir",
    "eval": "evaluate a checkpoint of a run (loss, accuracy, perplexity, BLEU); read-only",
    "translate": "translate sentences given as arguments, or stdin lines as they arrive; read-only",
    "average": "average the parameters of the last K checkpoints into DIR/checkpoints/averaged",
    "bench": "benchmarks: attention, train, decode, compile, scaling, pipeline, accelerator, table1, families, all",
}


def _checkpoint(text: str) -> str | int:
    if text in ("latest", "averaged"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected latest, averaged or a step number, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attn-jax", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sub = {}
    for name, help_text in _COMMANDS.items():
        sub[name] = commands.add_parser(
            name, help=help_text, description=help_text, formatter_class=argparse.RawDescriptionHelpFormatter
        )
    for name in ("prepare", "train"):
        sub[name].add_argument("--config", required=True, help="experiments/NAME.py[:ARG] (listed below)")
        sub[name].add_argument("--workdir", required=True, help="checkpoints, metrics and plots go here (or gs://...)")
        sub[name].epilog = _config_help()
    for name in ("eval", "translate"):
        sub[name].add_argument("--workdir", required=True, help="the workdir of a train run")
        sub[name].add_argument(
            "--config", help="experiments/NAME.py[:ARG] instead of the run's own DIR/config.json (rarely needed)"
        )
        sub[name].add_argument("--checkpoint", type=_checkpoint, default="latest", help="latest, averaged or STEP")
        sub[name].epilog = "--config.a.b=VALUE overrides apply to the run's config, e.g. --config.eval.beam_size=8."
    sub["translate"].add_argument("text", nargs="*", help="sentences; none: read stdin, one sentence a line")
    sub["average"].add_argument("--workdir", required=True)
    last = "how many of the newest checkpoints (as the run's own average: not two under half an interval apart)"
    sub["average"].add_argument("--last", type=count, required=True, help=last)
    sub["average"].add_argument("--until", type=int, help="only checkpoints at or before this step")
    return parser


def _config_help() -> str:
    """The experiments and every config field with its default and meaning, for ``train --help``."""
    from attn_jax import config as config_lib

    lines = ["experiments (--config experiments/NAME.py[:ARG]):"]
    lines += [f"  {path:<34} {summary}" for path, summary in config_lib.experiments()]
    lines += [
        "",
        "config fields, with the defaults each experiment starts from (override any of them with",
        "--config.SECTION.FIELD=VALUE or --config.SECTION.FIELD VALUE; a mistyped name is an error):",
    ]
    section = None
    for key, default, comment in config_lib.documented_fields():
        if key.split(".")[0] != section:
            section = key.split(".")[0] if "." in key else ""
            lines.append(f"  {section or 'top level'}:")
        lines.append(f"    {key} = {default!r}  {comment}")
    return "\n".join(lines)


def _join_spaced_overrides(argv: list[str]) -> list[str]:
    """``--config.a.b VALUE`` -> ``--config.a.b=VALUE``, as absl's config_flags accepts both."""
    joined, i = [], 0
    while i < len(argv):
        item = argv[i]
        if item.startswith("--config.") and "=" not in item and i + 1 < len(argv):
            joined.append(f"{item}={argv[i + 1]}")
            i += 2
        else:
            joined.append(item)
            i += 1
    return joined


def main(argv: list[str] | None = None) -> int:
    malloc.reuse_freed_memory()  # before JAX runs anything: no page faults in CPU steps (attn_jax/malloc.py)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from attn_jax.bench.cli import main as bench

        return bench(argv[1:])
    args, overrides = _parser().parse_known_args(_join_spaced_overrides(argv))
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        _parser().error(f"unrecognized arguments: {' '.join(bad)}")
    if args.command == "average" and overrides:
        _parser().error("average takes no --config.* overrides")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src.xla_bridge", "orbax"):  # per-file save chatter and backend probing
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import jax

    # Compiling a training step takes minutes on a small CPU: keep compiled programs across runs and resumes.
    cache = os.environ.get("ATTN_JAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/attn_jax/xla"))
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    from attn_jax import commands
    from attn_jax.checkpoint import CheckpointError, CheckpointMismatchError
    from attn_jax.config import ConfigError
    from attn_jax.data.text import DataError
    from attn_jax.loop import NonFiniteError

    try:
        return commands.run(args, overrides)
    except (ConfigError, CheckpointMismatchError) as error:  # the config contradicts itself or the checkpoint
        return _fail("config error", error, status=2)
    # Each message names the record, step or checkpoint at fault: a traceback would only bury it.
    except DataError as error:
        return _fail("data error", error)
    except NonFiniteError as error:
        return _fail("non-finite step", error)
    except CheckpointError as error:
        return _fail("checkpoint error", error)


def _fail(kind: str, error: Exception, *, status: int = 1) -> int:
    print(f"attn-jax: {kind}: {error}", file=sys.stderr)
    return status


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
