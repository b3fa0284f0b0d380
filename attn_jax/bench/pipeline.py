"""Input pipeline stall: how long the training step waits for the next batch.

    .venv/bin/python -m attn_jax.bench pipeline --out experiments/results      # attn-jax bench pipeline ...

Synthetic parallel text (random words from a fixed lexicon; the target side is a word-by-word cipher of the
source, 3-24 words per sentence) goes through the real input pipeline (``attn_jax.data``): a SentencePiece
BPE tokenizer trained on it, then Grain's tokenize ▸ filter ▸ bucket (32 and 64 tokens) ▸ batch
(2048 tokens) with its prefetch threads. The ``small`` model (``attn_jax.bench.training``) trains on the
batches with attn_jax's jitted ``train_step``, one batch shape compiled per bucket before timing. The timed
loop is synchronous: per step, the time in ``next(iterator)`` (the device idles while the host waits, so it
is exactly the stall) and the time of the whole step. Also reported: the pipeline alone, batches per second
with no training.

Target (issue 5): blocked time <= 5% of step time. Expected: well under 1% (the prefetch threads prepare a
batch in milliseconds, a step takes hundreds of them on the 2-core CPU, where Grain's threads compete with
XLA's for the same cores). About 3 minutes, mostly compiling the two bucket shapes.
Writes ``pipeline.{json,md,png}``.
"""

import dataclasses
import functools
import tempfile
import time

import jax
import numpy as np

from attn_jax.bench import results
from attn_jax.bench.training import SIZES, optimizer
from attn_jax.train import init_train_state, train_step

TARGET_BLOCKED = 0.05
_MODEL_KEYS = ("inputs", "targets_in", "targets_out")


def synthetic_text(num_examples: int, *, lexicon_size: int = 3000, seed: int = 0) -> list[dict]:
    """``[{"en": sentence, "de": its word-by-word cipher}]``, 3-24 words of 2-10 lowercase letters.

    Example:
      >>> examples = synthetic_text(2, lexicon_size=10)
      >>> sorted(examples[0]), len(examples[0]["en"].split()) == len(examples[0]["de"].split())
      (['de', 'en'], True)
    """
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))

    def lexicon():
        return ["".join(rng.choice(letters, size=rng.integers(2, 11))) for _ in range(lexicon_size)]

    source_words, target_words = lexicon(), lexicon()
    examples = []
    for _ in range(num_examples):
        ids = rng.integers(0, lexicon_size, size=rng.integers(3, 25))
        examples.append({"en": " ".join(source_words[i] for i in ids), "de": " ".join(target_words[i] for i in ids)})
    return examples


def build_batches(num_examples: int, *, vocab_size: int, tokens_per_batch: int, workdir: str):
    """A tokenizer trained on synthetic text and the pipeline's training batches: ``(batches, tokenizer)``."""
    from attn_jax.data import PipelineConfig, text_pair_encoder, train_batches, train_tokenizer

    examples = synthetic_text(num_examples)
    texts = [e[k] for e in examples for k in ("en", "de")]
    tokenizer = train_tokenizer(texts, workdir, vocab_size=vocab_size, num_threads=2)
    config = PipelineConfig(
        max_length=64, overlong="truncate", tokens_per_batch=tokens_per_batch, bucket_boundaries=(32, 64)
    )
    return train_batches(examples, text_pair_encoder(tokenizer, "en", "de"), config), tokenizer


def _model_batch(batch: dict) -> dict:
    return {k: batch[k] for k in _MODEL_KEYS}


def measure(
    *, size="small", steps=40, num_examples=20000, vocab_size=8192, tokens_per_batch=2048, compiler_options=None
) -> dict:
    """Stall of the training loop on the real pipeline, and the pipeline's own rate."""
    with tempfile.TemporaryDirectory(prefix="attn_jax_bench_tokenizer_") as workdir:
        batches, tokenizer = build_batches(
            num_examples, vocab_size=vocab_size, tokens_per_batch=tokens_per_batch, workdir=workdir
        )
    # As in a training run, the model's vocabulary is the tokenizer's.
    config = dataclasses.replace(SIZES[size][0], vocab_size=tokenizer.vocab_size())
    tx = optimizer(config)
    state = jax.jit(init_train_state, static_argnums=(1, 2))(jax.random.key(0), config, tx)
    step = jax.jit(
        functools.partial(train_step, model_config=config, tx=tx), donate_argnums=0, compiler_options=compiler_options
    )
    rng = jax.random.key(1)
    compile_start = time.perf_counter()
    for B, L in batches.stats.batch_shapes:  # one compile per bucket shape, before anything is timed
        state, metrics = step(state, {k: np.ones((B, L), np.int32) for k in _MODEL_KEYS}, rng)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - compile_start

    iterator = batches.iterator()
    state, metrics = step(state, _model_batch(next(iterator)), rng)  # starts the prefetch threads
    jax.block_until_ready((state, metrics))
    blocked, totals, shapes = [], [], []
    for _ in range(steps):
        start = time.perf_counter()
        batch = _model_batch(next(iterator))
        fetched = time.perf_counter()
        state, metrics = step(state, batch, rng)
        jax.block_until_ready((state, metrics))
        blocked.append(fetched - start)
        totals.append(time.perf_counter() - start)
        shapes.append(list(batch["inputs"].shape))

    alone = batches.iterator()
    next(alone)
    start = time.perf_counter()
    for _ in range(steps):
        next(alone)
    pipeline_rate = steps / (time.perf_counter() - start)
    return {
        "steps": steps,
        "compile_s": compile_s,
        "blocked_s": blocked,
        "step_s": totals,
        "shapes": shapes,
        "blocked_fraction": sum(blocked) / sum(totals),
        "median_step_s": float(np.median(totals)),
        "max_blocked_s": max(blocked),
        "pipeline_batches_per_s": pipeline_rate,
        "tokenizer_vocab_size": tokenizer.vocab_size(),
        "batch_shapes": [list(s) for s in batches.stats.batch_shapes],
    }


def run(
    *,
    out=None,
    size="small",
    steps=40,
    num_examples=20000,
    vocab_size=8192,
    tokens_per_batch=2048,
    compiler_options=None,
    argv=None,
) -> dict:
    """The whole section; writes ``pipeline.{json,md,png}`` under ``out`` when given and returns the report."""
    report = results.header("pipeline", argv) | {"size": size, "compiler_options": compiler_options or {}}
    report |= measure(
        size=size,
        steps=steps,
        num_examples=num_examples,
        vocab_size=vocab_size,
        tokens_per_batch=tokens_per_batch,
        compiler_options=compiler_options,
    )
    fraction = report["blocked_fraction"]
    report["checks"] = [
        results.check("blocked time / step time", fraction, f"<= {TARGET_BLOCKED}", fraction <= TARGET_BLOCKED)
    ]
    if out is not None:
        results.write(out, "pipeline", report, markdown(report), figure(report))
    return report


def markdown(report: dict) -> str:
    lines = [
        "# Input pipeline stall",
        "",
        f"Synthetic text through the real pipeline (SentencePiece vocabulary {report['tokenizer_vocab_size']}, "
        f"bucket shapes {report['batch_shapes']}), `{report['size']}` model, {report['steps']} synchronous "
        "training steps after one compile per bucket shape.",
        "",
        *results.table(
            ["median step (ms)", "blocked, total (%)", "worst wait (ms)", "pipeline alone (batches/s)"],
            [
                [
                    f"{report['median_step_s'] * 1e3:.1f}",
                    f"{100 * report['blocked_fraction']:.2f}",
                    f"{report['max_blocked_s'] * 1e3:.1f}",
                    f"{report['pipeline_batches_per_s']:.1f}",
                ]
            ],
        ),
        "",
        *results.checks_table(report["checks"]),
    ]
    return "\n".join(lines + ["", results.machine_line(report)])


def figure(report: dict):
    fig, (ax,) = results.new_figure(1, width=6.0)
    steps = np.arange(1, report["steps"] + 1)
    ax.bar(steps, np.array(report["step_s"]) * 1e3, color="C0", label="step")
    ax.bar(steps, np.array(report["blocked_s"]) * 1e3, color="C3", label="waiting for the batch")
    ax.set_xlabel("step")
    ax.set_ylabel("ms")
    ax.set_title(f"input pipeline: {100 * report['blocked_fraction']:.2f}% of the time blocked")
    ax.legend()
    return fig
