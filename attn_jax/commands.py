"""The bodies of the ``attn-jax`` subcommands (``main.py`` only parses arguments).

``train`` and ``prepare`` take an experiment file; ``eval``, ``translate`` and ``average`` read a run's workdir
(``attn_jax.runs``): its own resolved config, tokenizer and checkpoints, read-only.
"""

import contextlib
import functools
import json
import queue
import sys
import threading
from collections.abc import Iterable, Iterator

import jax
import numpy as np

from attn_jax import checkpoint as ckpt_lib
from attn_jax import config as config_lib
from attn_jax import loop, parallel, runs
from attn_jax.data.tokenizer import EOS_ID, SourceEncoder, decode
from attn_jax.evaluate import evaluate_loss, translate_ids, translation_quality
from attn_jax.model_config import ConfigError
from attn_jax.train import eval_step


def run(args, overrides: list[str]) -> int:
    if args.command in ("train", "prepare"):
        config = config_lib.with_absolute_paths(config_lib.load_experiment(args.config, overrides))
        parallel.initialize_distributed(config.parallel)
        if args.command == "train":
            loop.train_and_evaluate(config, args.workdir)
        else:
            from attn_jax.data import prepare

            prepare(config, args.workdir)
    elif args.command == "eval":
        model = runs.load_model(args.workdir, _reader_config(args, overrides), checkpoint=args.checkpoint)
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON alone, whatever a library prints
            results = evaluate(model, args.workdir)
        print(json.dumps(results, indent=2, default=float))
    elif args.command == "translate":
        model = runs.load_model(args.workdir, _reader_config(args, overrides), checkpoint=args.checkpoint)
        if model.tokenizer is None:
            raise ConfigError(f"{args.workdir} is a {model.config.data.name!r} run on token ids: translate needs "
                              "a text model with a tokenizer")  # fmt: skip
        lines = args.text or _stdin_lines()
        for output in translate_stream(model, lines, batch_size=model.config.eval.batch_size):
            print(output, flush=True)
    elif args.command == "average":
        config = runs.read_config(args.workdir)
        _, target = runs.abstract_params(config)
        gap = runs.averaging_gap(config.train)  # the steps the final evaluation would average
        steps = ckpt_lib.save_averaged(f"{args.workdir}/checkpoints", target, last=args.last, min_gap=gap,
                                       until=args.until)  # fmt: skip
        print(f"averaged the parameters of steps {steps}")
    return 0


def _reader_config(args, overrides):
    return runs.read_config(args.workdir, overrides, experiment=args.config)


def evaluate(model: runs.Model, workdir) -> dict:
    """Validation loss, accuracy and perplexity, and validation and test BLEU (exact match for the copy task)."""
    from attn_jax.data.datasets import build_eval_datasets

    config = model.config
    data = build_eval_datasets(config, workdir, tokenizer=model.tokenizer)
    evaluate_batch = jax.jit(functools.partial(eval_step, model_config=model.model_config))
    decoding = {name: config.eval[name] for name in ("beam_size", "alpha", "extra_length")}
    results = {"step": model.step, "decoding": decoding}
    results["validation"] = evaluate_loss(evaluate_batch, model.params, data.eval_batches())
    if config.task == "translation":
        for split, pairs in (("validation", data.validation_pairs), ("test", data.test_pairs)):
            quality, _ = translation_quality(
                model.params, pairs, model.tokenizer, model_config=model.model_config, eval_config=config.eval
            )
            results.setdefault(split, {}).update(quality)
    return results


def translate_stream(model: runs.Model, lines: Iterable[str], *, batch_size: int) -> Iterator[str]:
    """Translates ``lines`` as they arrive, in order: each batch takes the lines already waiting (at most
    ``batch_size``), as fairseq-interactive does, so a line typed at a terminal is translated at once.

    ``lines`` may block between items (``_stdin_lines``); a ``None`` item means "nothing more is waiting".
    """
    pending: list[str] = []
    for line in lines:
        if line is not None:
            pending.append(line)
        if pending and (line is None or len(pending) == batch_size):
            yield from translate_sentences(model, pending)
            pending = []
    if pending:
        yield from translate_sentences(model, pending)


def translate_sentences(model: runs.Model, sentences: list[str]) -> list[str]:
    """Beam-searches raw sentences with ``model`` (beam, length penalty and output budget from its config)."""
    limit = model.model_config.max_len - 1
    encode_source = SourceEncoder(model.tokenizer)  # the run's language tag first, as in training
    sources = [np.append(encode_source(s)[:limit], EOS_ID).astype(np.int32) for s in sentences]
    eval_config = model.config.eval
    # Batches padded to a power of two: a handful of compiled shapes whatever the stream's rhythm.
    batch_size = min(eval_config.batch_size, 1 << (len(sources) - 1).bit_length())
    outputs = translate_ids(
        model.params, sources, model_config=model.model_config, beam_size=eval_config.beam_size,
        alpha=eval_config.alpha, extra_length=eval_config.extra_length, batch_size=batch_size,
    )  # fmt: skip
    return [decode(model.tokenizer, ids) for ids in outputs]


def _stdin_lines() -> Iterator[str | None]:
    """Lines of stdin without their newline; ``None`` whenever no further line is waiting."""
    lines: queue.Queue = queue.Queue()

    def read():
        for line in sys.stdin:
            lines.put(line.rstrip("\n"))
        lines.put(EOFError)

    threading.Thread(target=read, daemon=True).start()
    while True:
        try:
            line = lines.get_nowait()
        except queue.Empty:
            yield None  # translate what is waiting, then block for the next line
            line = lines.get()
        if line is EOFError:
            return
        yield line
