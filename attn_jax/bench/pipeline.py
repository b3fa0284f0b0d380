"""Input pipeline: preparation, real tokens per CPU core from prepared ids, worker scaling, padding, cores to feed
8 GPUs. Issue 14's targets.

    attn-jax bench pipeline --out experiments/results           # ~5 min on 2 idle cores (1M generated pairs)
    attn-jax bench pipeline --quick --out /tmp/bench            # toy sizes, seconds (tests)

1. **Preparation** of a generated corpus with WMT14's length distribution (``GeneratedText``: word counts
   log-normal, median 19 words, the German side ~8% longer; Zipf-distributed made-up words, so BPE splits rare ones
   as on real text): ``attn_jax.data.prepare``'s stages (tokenizer on a sample of ``tokenizer_pairs``, ids encoded
   by one process per core) in a subprocess, for wall time, peak RSS (the parent and its largest worker) and the
   size written. The tokenizer alone is also trained on a sample of the same size from corpora of ``pairs / 10``
   and ``pairs`` pairs, each in a fresh subprocess: its peak RSS must not grow with the corpus.
2. **Reading prepared ids** (generated corpus and the shipped Ding data, if present or fetchable): real tokens
   (source + target, special ids included, padding not) per CPU-second of this process, one thread assembling
   batches, packed and length-bucketed, with each side's padding fraction; then wall-clock batches per second with
   1 and 2 Grain worker processes.
3. **Projection**: real tokens/s the paper's base model consumes on one H100 at 40% bf16 MFU (model FLOPs of
   ``attn_jax.bench.flops`` on the generated pairs' lengths), and the CPU cores 8 GPUs need at the measured rate.

Targets: >= 2M real tokens/s per core from prepared ids; >= 1.7x from 1 to 2 workers; padding <= 5% with
packing; tokenizer RSS not growing from ``pairs / 10`` to ``pairs`` pairs (<= 10% more). Writes
``pipeline.{json,md,png}``.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from attn_jax.bench import results

TARGET_TOKENS_PER_CORE = 2e6
TARGET_WORKER_SCALING = 1.7
TARGET_PADDING = 0.05
TARGET_RSS_GROWTH = 1.1
H100_BF16_PEAK = 989.4e12  # dense, SXM (attn_jax.bench.accelerator)
MFU = 0.4
GPUS = 8
_SYLLABLES = [c + v for c in "bdfghklmnprstvwz" for v in "aeiou"] + ["ch", "st", "sch", "ei", "au", "ng"]


@dataclasses.dataclass(frozen=True)
class GeneratedText:
    """Random-access English-German pairs with WMT14-like lengths; pair ``i`` depends on ``(seed, i)`` alone.

    Example:
      >>> pair = GeneratedText(10)[3]
      >>> sorted(pair), pair == GeneratedText(10)[3], pair["en"].endswith(".")
      (['de', 'en'], True, True)
    """

    num_examples: int
    median_words: float = 19.0
    sigma: float = 0.6
    zipf: float = 1.2
    seed: int = 0

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, str]:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} pairs")
        rng = np.random.default_rng([self.seed, index])
        count = int(np.clip(round(rng.lognormal(math.log(self.median_words), self.sigma)), 1, 200))
        ranks = rng.zipf(self.zipf, size=count) % 200_000
        extra = rng.zipf(self.zipf, size=rng.binomial(count, 0.08)) % 200_000  # German runs ~8% longer
        english = " ".join(_word(int(r), 0) for r in ranks)
        german = " ".join(_word(int(r), 1) for r in np.concatenate([ranks, extra]))
        return {"en": english.capitalize() + ".", "de": german.capitalize() + "."}


def _word(rank: int, language: int) -> str:
    """A made-up word per rank: frequent ranks give short words, as in natural language."""
    digits = []
    rank = rank * 2 + language + 1
    while rank:
        rank, digit = divmod(rank, len(_SYLLABLES))
        digits.append(_SYLLABLES[digit])
    return "".join(digits)


def _generated_config(pairs: int, *, vocab_size: int, tokenizer_pairs: int, workers: int):
    from attn_jax import defaults

    c = defaults.base_config()
    c.data = defaults.data_config(
        name="wmt14_translate/de-en", vocab_size=vocab_size, max_length=256, tokens_per_batch=25_000,
        tokenizer_examples=tokenizer_pairs, prepare_workers=workers, examples_per_shard=max(1000, pairs // 20),
        num_threads=0,
    )  # fmt: skip
    return c


# A subprocess that runs one preparation stage on the generated corpus and prints its numbers as JSON.
_STAGE = """
import json, resource, sys, time
from attn_jax.bench import pipeline
from attn_jax.data import datasets, tokenizer, wmt14
stage, pairs, vocab_size, tokenizer_pairs, workers, workdir = sys.argv[1:7]
pairs, vocab_size, tokenizer_pairs, workers = int(pairs), int(vocab_size), int(tokenizer_pairs), int(workers)
corpus = {"train": pipeline.GeneratedText(pairs), "validation": pipeline.GeneratedText(100, seed=1),
          "test": pipeline.GeneratedText(100, seed=2)}
wmt14.wmt14_sources = lambda data_dir: corpus
start = time.perf_counter()
if stage == "tokenizer":
    texts = tokenizer.sample_texts(corpus["train"], max_examples=tokenizer_pairs)
    tokenizer.train_tokenizer(texts, None, vocab_size=vocab_size, max_sentences=0)
else:
    config = pipeline._generated_config(pairs, vocab_size=vocab_size, tokenizer_pairs=tokenizer_pairs, workers=workers)
    datasets.prepare(config, workdir, splits=("train",))
own, children = (resource.getrusage(who).ru_maxrss / 1024 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mib": own, "worker_rss_mib": children}))
"""


def _start_stage(stage: str, pairs: int, *, vocab_size: int, tokenizer_pairs: int, workers: int, workdir: str):
    """Starts ``_STAGE`` in a fresh Python, so that its peak RSS is its own."""
    arguments = [stage, pairs, vocab_size, tokenizer_pairs, workers, workdir]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-c", _STAGE, *map(str, arguments)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip


def _stage_result(process: subprocess.Popen) -> dict:
    out, err = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"preparation stage failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def tokenizer_rss(pairs: tuple[int, int], *, vocab_size: int, tokenizer_pairs: int) -> list[dict]:
    """Peak RSS of tokenizer training on a ``tokenizer_pairs`` sample of corpora of each size in ``pairs``, each in
    its own subprocess, side by side (only the sample is read, so the corpus size costs no time)."""
    with tempfile.TemporaryDirectory() as scratch:
        started = [
            _start_stage(
                "tokenizer", n, vocab_size=vocab_size, tokenizer_pairs=tokenizer_pairs, workers=1, workdir=scratch
            )  # fmt: skip
            for n in pairs
        ]
        return [_stage_result(process) | {"pairs": n} for process, n in zip(started, pairs, strict=True)]


def _directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def read_rate(split, config, *, batches: int) -> dict:
    """Real tokens per CPU-second of this process assembling ``batches`` batches in the calling thread."""
    from attn_jax.data.pipeline import train_batches

    built = train_batches(split, dataclasses.replace(config, num_threads=0, worker_count=0))
    iterator = built.iterator()
    next(iterator)  # plans the first epoch, opens the files
    tokens, cpu, wall = 0, time.process_time(), time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        tokens += sum(int(np.count_nonzero(batch[k])) for k in ("inputs", "targets_out") if k in batch)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    stats = built.stats
    return {
        "packing": config.packing,
        "batches": batches,
        "real_tokens": tokens,
        "cpu_s": cpu,
        "wall_s": wall,
        "tokens_per_cpu_s": tokens / max(cpu, 1e-9),
        "padding_fraction": stats.padding_fraction,
        "padding_fraction_inputs": stats.padding_fraction_inputs,
        "padding_fraction_targets": stats.padding_fraction_targets,
        "pairs_per_row": stats.pairs_per_row,
        "batch_shapes": [list(s) for s in stats.batch_shapes],
    }


def worker_scaling(split, config, *, batches: int, workers=(1, 2)) -> list[dict]:
    """Wall-clock batches/s with each number of Grain worker processes, after their start-up and first batch."""
    from attn_jax.data.pipeline import train_batches

    rows = []
    for count in workers:
        iterator = train_batches(split, dataclasses.replace(config, worker_count=count)).iterator()
        try:
            for _ in range(count * 2):  # every worker has started and delivered
                next(iterator)
            start = time.perf_counter()
            for _ in range(batches):
                next(iterator)
            rows.append({"workers": count, "batches_per_s": batches / (time.perf_counter() - start)})
        finally:
            iterator.close()
    return rows


def gpu_demand(split, *, rows: int = 10_000) -> dict:
    """Real tokens/s (source + target) the paper's base model trains on, per H100 at 40% bf16 MFU."""
    from attn_jax.bench.flops import transformer_flops
    from attn_jax.model_config import TransformerConfig

    lengths = split.lengths[:rows].astype(np.float64) + 1  # + EOS / BOS
    flops = transformer_flops(TransformerConfig.base(vocab_size=37000), lengths[:, 0], lengths[:, 1]).train
    tokens_per_s = MFU * H100_BF16_PEAK * lengths.sum() / flops
    return {"model": "base", "vocab_size": 37000, "mfu": MFU, "peak_flops": H100_BF16_PEAK,
            "tokens_per_s_per_gpu": tokens_per_s}  # fmt: skip


def _ding_split(workdir: str):
    """The default run's training split (``experiments/ding_en_de.py``) prepared in ``workdir``; None if the Ding
    file is neither cached nor fetchable."""
    from attn_jax.config import load_experiment
    from attn_jax.data import DataError, datasets

    config = load_experiment(os.path.join(os.path.dirname(__file__), "../../experiments/ding_en_de.py"))
    try:
        return datasets.prepare(config, workdir, splits=("train",)).splits["train"], config
    except DataError as error:
        return None, str(error).splitlines()[0]


def measure(*, pairs, tokenizer_pairs, vocab_size, batches, scaling_batches, ding=True) -> dict:
    """Every measurement of the section (module docstring)."""
    from attn_jax.data.pipeline import PipelineConfig
    from attn_jax.data.prepared import load_split

    report: dict = {"pairs": pairs, "tokenizer_pairs": tokenizer_pairs, "vocab_size": vocab_size}
    workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="attn_jax_bench_pipeline_") as workdir:
        stage = _start_stage("prepare", pairs, vocab_size=vocab_size, tokenizer_pairs=tokenizer_pairs,
                             workers=workers, workdir=workdir)  # fmt: skip
        preparation = _stage_result(stage)
        (directory,) = [d for d in os.listdir(os.path.join(workdir, "prepared")) if d.startswith("train-")]
        directory = os.path.join(workdir, "prepared", directory)
        report["preparation"] = preparation | {"workers": workers, "output_mib": _directory_bytes(directory) / 2**20}
        per_shard = _generated_config(pairs, vocab_size=1, tokenizer_pairs=1, workers=1).data.examples_per_shard
        split = load_split(directory, num_examples=pairs, examples_per_shard=per_shard)
        report["token_lengths"] = _length_summary(split.lengths)
        config = PipelineConfig(max_length=256, tokens_per_batch=25_000, num_threads=0)
        report["generated"] = [read_rate(split, dataclasses.replace(config, packing=p), batches=batches)
                               for p in (True, False)]  # fmt: skip
        report["scaling"] = worker_scaling(split, dataclasses.replace(config, packing=True), batches=scaling_batches)
        report["demand"] = gpu_demand(split)
    report["tokenizer_rss"] = tokenizer_rss((max(pairs // 10, tokenizer_pairs), pairs), vocab_size=vocab_size,
                                            tokenizer_pairs=tokenizer_pairs)  # fmt: skip
    report["ding"] = None
    if ding:
        with tempfile.TemporaryDirectory(prefix="attn_jax_bench_ding_") as workdir:
            split, config = _ding_split(workdir)
            if split is None:
                report["ding_skipped"] = config
            else:
                data = config.data
                base = PipelineConfig(max_length=data.max_length, tokens_per_batch=data.tokens_per_batch, num_threads=0)
                report["ding"] = [read_rate(split, dataclasses.replace(base, packing=p), batches=batches * 10)
                                  for p in (True, False)]  # fmt: skip
    return report


def _length_summary(lengths: np.ndarray) -> dict:
    summary = {}
    for i, side in enumerate(("source", "target")):
        values = lengths[:, i]
        summary[side] = {"median": float(np.median(values)), "mean": float(values.mean()),
                         "p99": float(np.percentile(values, 99))}  # fmt: skip
    return summary


def run(
    *,
    out=None,
    pairs=1_000_000,
    tokenizer_pairs=100_000,
    vocab_size=8000,
    batches=50,
    scaling_batches=100,
    ding=True,
    compiler_options=None,
    argv=None,
) -> dict:
    """The whole section; writes ``pipeline.{json,md,png}`` under ``out`` when given and returns the report."""
    del compiler_options  # nothing is compiled here
    report = results.header("pipeline", argv)
    report |= measure(pairs=pairs, tokenizer_pairs=tokenizer_pairs, vocab_size=vocab_size, batches=batches,
                      scaling_batches=scaling_batches, ding=ding)  # fmt: skip
    packed, _ = report["generated"]
    per_core = packed["tokens_per_cpu_s"]
    demand = report["demand"]["tokens_per_s_per_gpu"]
    report["cores_for_8_gpus"] = GPUS * demand / per_core
    scaling = report["scaling"][-1]["batches_per_s"] / report["scaling"][0]["batches_per_s"]
    small, large = report["tokenizer_rss"]
    growth = large["peak_rss_mib"] / small["peak_rss_mib"]
    rss_name = f"tokenizer peak RSS, {large['pairs']:,} / {small['pairs']:,} corpus pairs"
    padding = packed["padding_fraction"]
    report["checks"] = [
        results.check("real tokens/s per core, prepared ids", per_core, ">= 2e6", per_core >= TARGET_TOKENS_PER_CORE),
        results.check("1 -> 2 worker processes", scaling, ">= 1.7", scaling >= TARGET_WORKER_SCALING),
        results.check("padding with packing", padding, "<= 0.05", padding <= TARGET_PADDING),
        results.check(rss_name, growth, "<= 1.1", growth <= TARGET_RSS_GROWTH),
    ]
    if out is not None:
        results.write(out, "pipeline", report, markdown(report), figure(report))
    return report


def markdown(report: dict) -> str:
    prep = report["preparation"]
    rows = []
    for corpus in ("generated", "ding"):
        for r in report.get(corpus) or []:
            rows.append([corpus, "packed" if r["packing"] else "buckets", f"{r['tokens_per_cpu_s'] / 1e6:.2f}",
                         f"{100 * r['padding_fraction_inputs']:.1f}", f"{100 * r['padding_fraction_targets']:.1f}",
                         f"{r['pairs_per_row']:.2f}"])  # fmt: skip
    lines = [
        "# Input pipeline: prepared ids",
        "",
        f"Generated corpus: {report['pairs']:,} pairs with WMT14-like lengths (BPE tokens: source median "
        f"{report['token_lengths']['source']['median']:.0f}, target median "
        f"{report['token_lengths']['target']['median']:.0f}), vocabulary {report['vocab_size']}, tokenizer trained on "
        f"{report['tokenizer_pairs']:,} sampled pairs.",
        "",
        f"Preparation: {prep['seconds']:.0f} s with {prep['workers']} processes, peak RSS {prep['peak_rss_mib']:.0f} "
        f"MiB (largest worker {prep['worker_rss_mib']:.0f} MiB), {prep['output_mib']:.0f} MiB of ids.",
        "",
        *results.table(
            ["corpus", "batches", "M real tokens / CPU-s", "padding in (%)", "padding out (%)", "pairs / row"], rows
        ),  # fmt: skip
        "",
        *results.table(
            ["worker processes", "batches / s"],
            [[r["workers"], f"{r['batches_per_s']:.1f}"] for r in report["scaling"]],
        ),  # fmt: skip
        "",
        f"One H100 at {100 * MFU:.0f}% bf16 MFU trains base on {report['demand']['tokens_per_s_per_gpu'] / 1e6:.2f}M "
        f"real tokens/s: {GPUS} GPUs need **{report['cores_for_8_gpus']:.1f} cores** at the measured rate.",
        "",
        *results.table(
            ["corpus pairs", "tokenizer peak RSS (MiB)"],
            [[f"{r['pairs']:,}", f"{r['peak_rss_mib']:.0f}"] for r in report["tokenizer_rss"]],
        ),  # fmt: skip
        "",
        *results.checks_table(report["checks"]),
    ]
    if report.get("ding_skipped"):
        lines += ["", f"Ding data skipped: {report['ding_skipped']}"]
    return "\n".join(lines + ["", results.machine_line(report)])


def figure(report: dict):
    fig, (rates, padding) = results.new_figure(2, width=5.0)
    rows = [r for corpus in ("generated", "ding") for r in (report.get(corpus) or [])]
    labels = [f"{c}\n{'packed' if r['packing'] else 'buckets'}" for c in ("generated", "ding")
              for r in (report.get(c) or [])]  # fmt: skip
    rates.bar(labels, [r["tokens_per_cpu_s"] / 1e6 for r in rows], color="C0")
    rates.axhline(TARGET_TOKENS_PER_CORE / 1e6, color="C3", linestyle="--", label="target")
    rates.set_ylabel("M real tokens per CPU-second")
    rates.legend()
    padding.bar(labels, [100 * r["padding_fraction"] for r in rows], color="C1")
    padding.axhline(100 * TARGET_PADDING, color="C3", linestyle="--", label="target")
    padding.set_ylabel("padding (% of token slots)")
    padding.legend()
    return fig
