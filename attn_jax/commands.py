"""The bodies of the ``attn-jax`` subcommands (``main.py`` only parses arguments)."""

import json
import pathlib
import sys

import ml_collections
import numpy as np

from attn_jax import checkpoint as ckpt_lib
from attn_jax import config as config_lib
from attn_jax import loop, parallel
from attn_jax.data.tokenizer import decode, encode
from attn_jax.evaluate import translate_ids


def run(args, overrides: list[str]) -> int:
    if args.command == "train":
        config = config_lib.load_experiment(args.config, overrides)
        parallel.initialize_distributed(config.parallel)
        loop.train_and_evaluate(config, args.workdir)
    elif args.command == "eval":
        config = config_lib.load_experiment(args.config, overrides)
        print(json.dumps(loop.evaluate_checkpoint(config, args.workdir), indent=2, default=float))
    elif args.command == "translate":
        lines = args.text or [line.rstrip("\n") for line in sys.stdin]
        for line in translate(args.workdir, lines):
            print(line, flush=True)
    elif args.command == "average":
        steps = ckpt_lib.save_averaged(*_average_target(args.workdir), last=args.last)
        print(f"averaged the parameters of steps {steps}")
    return 0


def saved_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a ``train`` run wrote into its workdir."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        raise config_lib.ConfigError(f"{path} not found: is {workdir!r} the workdir of a training run?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def translate(workdir: str, sentences: list[str]) -> list[str]:
    """Translates raw sentences with the newest checkpoint in ``workdir`` (beam search as configured)."""
    config = saved_config(workdir)
    model_config, params, datasets = loop.restore_params(config, workdir)
    tokenizer = datasets.tokenizer
    sources = [np.append(encode(tokenizer, s)[: model_config.max_len - 1], 1).astype(np.int32) for s in sentences]
    outputs = translate_ids(
        params, sources, model_config=model_config,
        beam_size=config.eval.beam_size, alpha=config.eval.alpha, extra_length=config.eval.extra_length,
        batch_size=min(config.eval.batch_size, max(len(sources), 1)),
    )  # fmt: skip
    return [decode(tokenizer, ids) for ids in outputs]


def _average_target(workdir: str):
    config = saved_config(workdir)
    _, target, _ = loop.abstract_checkpoint(config, workdir)
    return pathlib.Path(workdir) / "checkpoints", target
