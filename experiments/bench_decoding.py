"""Decoding speed: greedy on the key/value cache against re-running the prefix, and beam search (beam 4).

Command (CPU, float32; ~11 minutes on 2 cores at load average 7, less when idle; most of it is the uncached
baseline at 256 tokens):

    .venv/bin/python experiments/bench_decoding.py

The suite's ``decode`` section (``python -m attn_jax.bench decode``, ``attn_jax.bench.decoding``) with this
script's original output lengths 32, 64, 128 and 256; see that module for what is measured and expected.
Writes ``experiments/results/decoding.{json,md,png}``.
"""

import argparse
import sys
from pathlib import Path

from attn_jax.bench import decoding

RESULTS = Path(__file__).parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--beam-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--uncached-repeats-max-length", type=int, default=64, help="longer: one uncached run")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    command = " ".join([".venv/bin/python", "experiments/bench_decoding.py", *(sys.argv[1:] if argv is None else argv)])
    return decoding.run(
        tuple(args.lengths), out=args.out_dir, batch=args.batch, beam_size=args.beam_size, repeats=args.repeats,
        uncached_repeats_max_length=args.uncached_repeats_max_length, command=command,
    )  # fmt: skip


if __name__ == "__main__":
    main()
