"""The ``attn-jax`` command line: ``train``, ``eval``, ``translate``, ``average`` and ``bench``. Intentionally thin.

    attn-jax train --config experiments/ding_en_de.py --workdir runs/ding_en_de [--config.train.steps=100]
    attn-jax eval --config experiments/ding_en_de.py --workdir runs/ding_en_de
    attn-jax translate --workdir runs/ding_en_de "Where is the station?"
    attn-jax average --workdir runs/ding_en_de --last 5
    attn-jax bench all --out experiments/results        (see attn_jax/bench/cli.py)

A configuration error prints one line naming the field and exits with status 2, before anything compiles.
"""

import argparse
import logging
import os
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attn-jax", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("train", "train, resuming from the newest checkpoint"),
        ("eval", "evaluate the newest checkpoint"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--config", required=True, help="experiments/NAME.py[:ARG]")
        sub.add_argument("--workdir", required=True, help="checkpoints, metrics and plots go here")
    translate = commands.add_parser("translate", help="translate arguments, or stdin lines, with beam search")
    translate.add_argument("--workdir", required=True)
    translate.add_argument("text", nargs="*")
    average = commands.add_parser("average", help="average the parameters of the last K checkpoints")
    average.add_argument("--workdir", required=True)
    average.add_argument("--last", type=int, required=True)
    # Parsed by attn_jax.bench.cli; listed here for --help.
    commands.add_parser("bench", help="benchmarks: attention, train, decode, compile, scaling, pipeline, all")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from attn_jax.bench.cli import main as bench

        return bench(argv[1:])
    args, overrides = _parser().parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        _parser().error(f"unrecognized arguments: {' '.join(bad)}")
    if args.command not in ("train", "eval") and overrides:
        _parser().error(f"{args.command} takes no --config.* overrides")
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
