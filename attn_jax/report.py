"""What a person sees at the end of a run: test BLEU, sample translations, learning curves, attention maps."""

import json
import logging

import jax
import numpy as np
from etils import epath

from attn_jax import parallel, plots
from attn_jax.data.tokenizer import encode
from attn_jax.evaluate import translate_ids, translation_quality
from attn_jax.families import family

log = logging.getLogger(__name__)

BOS_ID, EOS_ID = 2, 1


def final_report(
    config, model_config, params, datasets, workdir: epath.Path, results: dict, *, step: int, writer=None, mesh=None
) -> dict:
    """Scores the test split, prints samples, writes ``results.json`` and the PNGs under ``workdir/plots``.

    Every process calls it (test decoding is split over ``mesh``); only process 0 prints and writes. The test
    scores also go to ``writer`` (split ``"test"`` at ``step``), so the learning curves show them.
    """
    report = {"validation": results}
    chief = jax.process_index() == 0
    if config.task == "translation" and datasets.test_pairs:
        test, hypotheses = translation_quality(
            params, datasets.test_pairs, datasets.tokenizer, model_config=model_config,
            eval_config=config.eval, batch_multiple=datasets.batch_multiple, mesh=mesh,
        )  # fmt: skip
        report["test"] = test
        if chief:
            _print_samples(datasets.test_pairs, hypotheses, config.eval.num_samples)
            how = {
                "bleu": "; sacreBLEU on detokenized text",
                "bleu_compound_split": "; the paper's tokenized BLEU with compounds split",
            }
            for name, value in test.items():
                print(f"test {name}: {value:.4g} ({len(hypotheses)} sentences{how.get(name, '')})")
    report["data"] = datasets.report
    plotted = config.eval.attention_plots if config.task == "translation" else 0
    # Attention maps decode one sentence at a time: on process 0's device, from a host copy of the parameters.
    host_params = jax.tree.map(parallel.fetch_global, params) if plotted else None
    if not chief:
        return report
    (workdir / "results.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    if writer is not None and "test" in report:
        writer.write(step, report["test"], split="test")
    plot_dir = workdir / "plots"
    plots.plot_learning_curves(workdir / "metrics.jsonl", plot_dir / "learning_curves.png")
    for i, (source, _) in enumerate(datasets.validation_pairs[:plotted]):
        _plot_attention(host_params, model_config, config.eval, datasets.tokenizer, source, plot_dir / f"attention_{i}")
    log.info("plots written to %s", plot_dir)
    return report


def _print_samples(pairs, hypotheses, count: int) -> None:
    for (source, reference), hypothesis in list(zip(pairs, hypotheses, strict=True))[:count]:
        print(f"  source:    {source}\n  reference: {reference}\n  output:    {hypothesis}\n", flush=True)


def _plot_attention(params, model_config, eval_config, tokenizer, source: str, out_dir: epath.Path) -> None:
    """Translates one sentence, then plots every layer's attention on (source, translation).

    RNNsearch's alignments come out as one layer of one head of encoder-decoder attention (Bahdanau et al.'s
    Figure 3); the RNN encoder-decoder has no attention, so nothing is plotted for it.
    """
    attention = family(model_config).attention
    if attention is None:
        log.info("model family %s has no attention to plot", family(model_config).name)
        return
    ids = np.asarray(source) if tokenizer is None else encode(tokenizer, source)
    src = np.append(ids[: model_config.max_len - 1], EOS_ID).astype(np.int32)
    (output,) = translate_ids(
        params, [src], model_config=model_config, beam_size=eval_config.beam_size, alpha=eval_config.alpha,
        extra_length=eval_config.extra_length, batch_size=1,
    )  # fmt: skip
    tgt_in = np.concatenate([[BOS_ID], output]).astype(np.int32)
    weights = jax.jit(attention, static_argnames="config")(params, src[None], tgt_in[None], config=model_config)
    weights = {kind: np.asarray(w)[:, 0] for kind, w in weights.items()}  # [L, B, N, T, S] -> [L, N, T, S]
    pieces = str if tokenizer is None else tokenizer.id_to_piece
    source_tokens = [pieces(int(i)) for i in src]
    target_tokens = [pieces(int(i)) for i in tgt_in]
    plots.plot_attention_layers(weights, source_tokens, target_tokens, out_dir)
