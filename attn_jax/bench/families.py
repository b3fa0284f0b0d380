"""Quality for compute: the three model families on ding_en_de at equal wall-clock budgets, read from finished runs.

    attn-jax train --config experiments/ding_en_de.py:minutes=20 --workdir runs/families/transformer \\
        --config.train.checkpoint_every=100 --config.train.keep_checkpoints=1000
    # (the committed families.md ran the 2026-12-02 recipe: add --config.model.dropout_rate=0.1
    #  --config.model.attention_dropout_rate=0 --config.train.learning_rate_scale=1 --config.eval.beam_size=4
    #  --config.eval.alpha=0.6)
    attn-jax train --config experiments/rnnsearch_ding_en_de.py --workdir runs/families/rnnsearch
    attn-jax train --config experiments/rnn_encdec_ding_en_de.py --workdir runs/families/rnn_encdec
    attn-jax bench families --runs runs/families/transformer runs/families/rnnsearch runs/families/rnn_encdec \\
        --budgets 5 10 20 --out experiments/results
    # test BLEU against minutes of one run, scored as its final evaluation is: the average of the last 5 saves
    attn-jax bench families --runs runs/ding_en_de_60 --budgets 5 10 20 40 60 --average 5 --out DIR

One 20-minute run per family serves every budget: the learning-rate schedule does not depend on the budget, so
the model of a 5-minute run is the 20-minute run's model at 5 minutes. For each run and budget this section
takes the newest checkpoint saved within that many minutes of training (minutes counted from the first step:
the time per step of the logged training records, extrapolated back over the first, compiling, interval; the
run's own ``train.time_budget_minutes`` picks its last checkpoint) and scores it: validation perplexity, test
sacreBLEU (beam search as the run's ``config.eval`` says), and test BLEU of sentences bucketed by source length in
words (Bahdanau et al.'s Figure 2: the fixed-vector model degrades
with length). With ``--average K`` each budget scores the average of the last K checkpoints within it, skipping
a save made less than half a checkpoint interval before a newer one, as the training loop's final evaluation does
(``eval.average_last``). Training tokens/s is the median of the run's logged rates. The runs must be uninterrupted (a
resumed run's clock restarts) and keep their early checkpoints (``train.keep_checkpoints``).

Writes ``families.{json,md,png}`` (BLEU and perplexity against minutes) and ``families_length.png`` (BLEU by
source length at the largest budget). Scoring takes a few minutes per checkpoint on the 2-core CPU (the test
split's beam search), about 30 minutes for three families at three budgets.
"""

import functools

import jax
import numpy as np
from etils import epath

from attn_jax import runs as runs_lib
from attn_jax.bench import results
from attn_jax.bleu import bleu
from attn_jax.checkpoint import Checkpointer
from attn_jax.data.datasets import build_eval_datasets
from attn_jax.evaluate import evaluate_loss, translation_quality
from attn_jax.metrics import read_metrics
from attn_jax.train import eval_step

BUDGETS = (5.0, 10.0, 20.0)
LENGTH_EDGES = (1, 6, 11, 16, 21)  # source words: 1-5, 6-10, 11-15, 16-20, 21+


def training_minutes(records: list[dict]) -> dict[int, float]:
    """Minutes of training at each logged step: ``{step: minutes}`` from the ``train`` records' times.

    The first record's interval includes compiling the step, so the clock starts at the first record's time less
    its steps at the median seconds per step of the later intervals.

    Example:
      >>> records = [{"split": "train", "step": s, "time": 100.0 + 30 * s / 50} for s in (50, 100, 150)]
      >>> training_minutes(records)
      {50: 0.5, 100: 1.0, 150: 1.5}
    """
    by_step = {r["step"]: r["time"] for r in records if r.get("split") == "train"}
    steps = sorted(by_step)
    if not steps:
        return {}
    rates = [(by_step[b] - by_step[a]) / (b - a) for a, b in zip(steps, steps[1:], strict=False)]
    seconds_per_step = float(np.median(rates)) if rates else 0.0
    start = by_step[steps[0]] - steps[0] * seconds_per_step
    return {step: round((by_step[step] - start) / 60.0, 6) for step in steps}


def checkpoint_within(steps: list[int], minutes: dict[int, float], budget: float) -> int | None:
    """The newest of ``steps`` saved within ``budget`` minutes (interpolating the logged steps), or None.

    Example:
      >>> checkpoint_within([100, 200, 300], {100: 4.0, 200: 8.0, 300: 12.0}, 10.0)
      200
    """
    logged = sorted(minutes)
    if not logged:
        return None
    at = np.interp(steps, logged, [minutes[s] for s in logged])
    within = [step for step, m in zip(steps, at, strict=True) if m <= budget + 1e-9]
    return max(within) if within else None


def length_buckets(pairs, hypotheses, edges=LENGTH_EDGES) -> list[dict]:
    """Corpus BLEU of the sentences whose source has ``edges[i] <= words < edges[i + 1]`` (the last: and more).

    Example:
      >>> pairs = [("a b", "x y"), ("a b c d e f g", "x y z w v u t")]
      >>> [(b["bucket"], b["sentences"]) for b in length_buckets(pairs, ["x y", "x y z w v u t"], (1, 6))]
      [('1-5', 1), ('6+', 1)]
    """
    buckets = []
    for i, low in enumerate(edges):
        high = edges[i + 1] if i + 1 < len(edges) else None
        chosen = [
            (hypothesis, reference)
            for (source, reference), hypothesis in zip(pairs, hypotheses, strict=True)
            if len(source.split()) >= low and (high is None or len(source.split()) < high)
        ]
        name = f"{low}-{high - 1}" if high is not None else f"{low}+"
        score = bleu(*zip(*chosen, strict=True)) if chosen else None
        buckets.append({"bucket": name, "sentences": len(chosen), "bleu": score})
    return buckets


def score_checkpoint(workdir, config, step: int, *, average: int = 1, max_sentences: int | None = None) -> dict:
    """Validation perplexity, test sacreBLEU and test BLEU by source length of one checkpoint of a run, or of the
    average of its last ``average`` checkpoints up to that one."""
    model = runs_lib.load_model(workdir, config, checkpoint=step, average=average)
    data = build_eval_datasets(config, workdir, tokenizer=model.tokenizer)
    evaluate = jax.jit(functools.partial(eval_step, model_config=model.model_config))
    validation = evaluate_loss(evaluate, model.params, data.eval_batches())
    pairs = data.test_pairs[:max_sentences]
    test, hypotheses = translation_quality(
        model.params, pairs, model.tokenizer, model_config=model.model_config, eval_config=config.eval
    )
    return {
        "step": step,
        "averaged_steps": list(model.averaged_steps or [step]),
        "validation_perplexity": validation.get("perplexity"),
        "validation_loss": validation.get("loss"),
        "test_bleu": test.get("bleu"),
        "test_sentences": len(pairs),
        "by_length": length_buckets(pairs, hypotheses),
    }


def score_run(workdir, budgets=BUDGETS, *, average: int = 1, max_sentences: int | None = None) -> dict:
    """A run's family, tokens/s and its scores at each budget (None where no checkpoint is that early)."""
    config = runs_lib.read_config(workdir)
    records = read_metrics(epath.Path(workdir) / "metrics.jsonl")
    minutes = training_minutes(records)
    with Checkpointer(epath.Path(workdir) / "checkpoints", read_only=True) as checkpointer:
        steps = checkpointer.all_steps()
    rates = [r["tokens_per_second"] for r in records if r.get("split") == "train" and "tokens_per_second" in r]
    run = {
        "workdir": str(workdir),
        "family": config.model.get("family", "transformer"),
        "tokens_per_second": float(np.median(rates[1:] or rates)) if rates else None,
        "minutes_trained": max(minutes.values(), default=None),
        "steps_trained": max(minutes, default=None),
        "budgets": [],
    }
    own_budget = config.train.get("time_budget_minutes", 0.0)
    for budget in budgets:
        # The run's own budget (its clock includes compiling) ended it: its last checkpoint is that budget's.
        step = max(steps) if steps and 0 < own_budget <= budget else checkpoint_within(steps, minutes, budget)
        entry = {"budget_minutes": budget, "step": step}
        if step is not None:
            entry |= score_checkpoint(workdir, config, step, average=average, max_sentences=max_sentences)
            entry["minutes"] = float(np.interp(step, sorted(minutes), [minutes[s] for s in sorted(minutes)]))
        run["budgets"].append(entry)
        print(f"families: {run['family']} at {budget:g} min: step {step}, test BLEU {entry.get('test_bleu')}")
    return run


def run(runs, budgets=BUDGETS, *, average: int = 1, out=None, max_sentences: int | None = None, argv=None) -> dict:
    """The whole section over finished ``runs`` (workdirs); writes ``families.*`` under ``out`` when given."""
    report = results.header("families", argv) | {"budgets": list(budgets), "length_edges": list(LENGTH_EDGES)}
    report["average"] = average
    report["runs"] = [score_run(workdir, budgets, average=average, max_sentences=max_sentences) for workdir in runs]
    if out is not None:
        results.write(out, "families", report, markdown(report), figure(report))
        length_figure(report).savefig(f"{out}/families_length.png", dpi=100)
    return report


def markdown(report: dict) -> str:
    average = report.get("average", 1)
    scored = f"the average of the last {average} checkpoints" if average > 1 else "the newest checkpoint"
    lines = [
        "# Quality for compute: the model families on ding_en_de",
        "",
        f"Each family's own config, trained once for the largest budget and scored at {scored} within "
        "each budget (minutes of training from the first step). Test sacreBLEU on detokenized text; validation "
        "perplexity per target token; training target tokens/s (median of the logged rates).",
        "",
    ]
    rows = []
    for run in report["runs"]:
        for entry in run["budgets"]:
            rows.append(
                [run["family"], f"{entry['budget_minutes']:g}", entry["step"] or "-",
                 results.fmt(entry.get("minutes"), ".1f"), results.fmt(entry.get("test_bleu"), ".2f"),
                 results.fmt(entry.get("validation_perplexity"), ".1f"), results.fmt(run["tokens_per_second"], ",.0f")]
            )  # fmt: skip
    lines += results.table(
        ["family", "budget (min)", "step", "minutes", "test BLEU", "val. perplexity", "tokens/s"], rows, align="lrrrrrr"
    )
    largest = max(report["budgets"])
    lines += ["", f"Test BLEU by source length in words at {largest:g} minutes (sentences in brackets):", ""]
    header = [b["bucket"] for b in _final(report["runs"][0], largest).get("by_length", [])] if report["runs"] else []
    cells = []
    for run in report["runs"]:
        final = _final(run, largest).get("by_length", [])
        cells.append([run["family"], *[f"{results.fmt(b['bleu'], '.2f')} ({b['sentences']})" for b in final]])
    lines += results.table(["family", *header], cells, align="l" + "r" * len(header))
    return "\n".join(lines + ["", results.machine_line(report)])


def _final(run: dict, budget: float) -> dict:
    return next((e for e in run["budgets"] if e["budget_minutes"] == budget), {})


def figure(report: dict):
    fig, (bleu_ax, perplexity_ax) = results.new_figure(2)
    for i, run in enumerate(report["runs"]):
        scored = [e for e in run["budgets"] if e.get("test_bleu") is not None]
        if scored:
            minutes = [e["minutes"] for e in scored]
            bleu_ax.plot(minutes, [e["test_bleu"] for e in scored], marker="o", color=f"C{i}", label=run["family"])
            perplexity_ax.plot(minutes, [e["validation_perplexity"] for e in scored], marker="o", color=f"C{i}",
                               label=run["family"])  # fmt: skip
    for ax, ylabel in ((bleu_ax, "test sacreBLEU"), (perplexity_ax, "validation perplexity")):
        ax.set_xlabel("minutes of training (2-core CPU)")
        ax.set_ylabel(ylabel)
        if ax.has_data():
            ax.legend(fontsize=8)
    perplexity_ax.set_yscale("log")
    return fig


def length_figure(report: dict):
    fig, (ax,) = results.new_figure(1, width=6.0)
    largest = max(report["budgets"])
    for i, run in enumerate(report["runs"]):
        buckets = [b for b in _final(run, largest).get("by_length", []) if b["bleu"] is not None]
        if buckets:
            ax.plot([b["bucket"] for b in buckets], [b["bleu"] for b in buckets], marker="o", color=f"C{i}",
                    label=run["family"])  # fmt: skip
    ax.set_xlabel("source sentence length (words)")
    ax.set_ylabel("test sacreBLEU")
    ax.set_title(f"BLEU by source length at {largest:g} minutes (Bahdanau et al., Figure 2)", fontsize=9)
    if ax.has_data():
        ax.legend(fontsize=8)
    return fig
