"""Contextualized embeddings, the explainers' "Time flies like an arrow." / "Fruit flies like a banana.".

    .venv/bin/python -m attn_jax.bench.contextual --workdir runs/ding_en_de --out experiments/results

An input embedding is a table lookup: "flies" gets the same vector in both sentences. The encoder's output for
"flies" has read the whole sentence, so the two sentences' "flies" differ (a verb after "Time", a noun after
"Fruit"). For a trained model this computes, with the library's public functions only (``runs.load_model``,
the run's tokenizer, the family's ``encode``), the cosine similarity of every subword of one sentence to every
subword of the other, for the encoder's representations and for the input embeddings, and draws the two
matrices side by side (``contextual_<family>.png``, numbers in ``contextual_<family>.{json,md}``). Seconds on a
CPU.

The core of it, as a README would show it::

    from attn_jax import families, runs
    from attn_jax.data.tokenizer import encode

    model = runs.load_model("runs/ding_en_de", runs.read_config("runs/ding_en_de"))
    ids = [encode(model.tokenizer, s) for s in ("Time flies like an arrow.", "Fruit flies like a banana.")]
    contextual = [encoder_states(model, i) for i in ids]   # [S, D] each: the encoder's output
    table = input_embeddings(model)                         # [V, M]: the same row wherever a word stands
"""

import argparse
import sys
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from attn_jax import families, rnn_encdec, rnnsearch, runs
from attn_jax.bench import results
from attn_jax.data.tokenizer import encode
from attn_jax.model import encode as transformer_encode

SENTENCES = ("Time flies like an arrow.", "Fruit flies like a banana.")


def input_embeddings(model: runs.Model) -> np.ndarray:
    """The source embedding table ``[V, M]`` of a loaded model of any family."""
    params = model.params
    if families.family(model.model_config).name == "transformer":
        return np.asarray((params.get("embedding") or params["source_embedding"])["embedding"])
    return np.asarray(params["source_embedding"])


def encoder_states(model: runs.Model, ids: np.ndarray) -> np.ndarray:
    """The encoder's representation of each source token, ``[S, D]``: the Transformer's memory, RNNsearch's
    annotations ``[h→; h←]``, or the RNN encoder-decoder's encoder GRU states."""
    config, params, src = model.model_config, model.params, jnp.asarray(ids, jnp.int32)[None]
    name = families.family(config).name
    if name == "transformer":
        return np.asarray(transformer_encode(params, src, config=config))[0]
    if name == "rnnsearch":
        return np.asarray(rnnsearch.encode(params, src, config=config)[0])[0]
    return np.asarray(rnn_encdec.encoder_states(params, src, config=config))[0]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[Sa, Sb]`` cosine similarities of the rows of ``a [Sa, X]`` and ``b [Sb, X]``.

    Example:
      >>> cosine(np.array([[1.0, 0.0]]), np.array([[1.0, 0.0], [0.0, 2.0]])).tolist()
      [[1.0, 0.0]]
    """
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return a @ b.T


def similarities(workdir, sentences: Sequence[str] = SENTENCES) -> dict:
    """Pieces of the two sentences and their encoder and input-embedding similarity matrices."""
    model = runs.load_model(workdir, runs.read_config(workdir))
    ids = [np.asarray(encode(model.tokenizer, sentence)) for sentence in sentences]
    table = input_embeddings(model)
    return {
        "family": families.family(model.model_config).name,
        "step": model.step,
        "sentences": list(sentences),
        "pieces": [[model.tokenizer.id_to_piece(int(i)) for i in row] for row in ids],
        "encoder": cosine(*(encoder_states(model, row) for row in ids)).tolist(),
        "embedding": cosine(table[ids[0]], table[ids[1]]).tolist(),
    }


def figure(found: dict):
    fig, axes = results.new_figure(2, width=5.0, height=4.6)
    rows, columns = found["pieces"]
    for ax, key, title in zip(axes, ("embedding", "encoder"), ("input embeddings (context-free)",
                                                                 f"encoder output ({found['family']})"),
                              strict=True):  # fmt: skip
        image = ax.imshow(np.asarray(found[key]), vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_title(f"cosine similarity: {title}", fontsize=9)
        for (i, j), value in np.ndenumerate(np.asarray(found[key])):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(image, ax=axes, shrink=0.8)
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attn_jax.bench.contextual", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a finished training run on text")
    parser.add_argument("--out", default="experiments/results")
    parser.add_argument("--sentences", nargs=2, default=list(SENTENCES))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    found = similarities(args.workdir, args.sentences)
    report = results.header("contextual", argv) | found
    lines = [f"# Contextualized embeddings ({found['family']}, step {found['step']})", ""]
    for key in ("embedding", "encoder"):
        lines += [
            "",
            f"Cosine similarity, {key}: rows {found['sentences'][0]!r}, columns {found['sentences'][1]!r}",
            "",
        ]
        cells = [[piece, *[f"{v:.2f}" for v in row]] for piece, row in zip(found["pieces"][0], found[key], strict=True)]
        lines += results.table(["", *found["pieces"][1]], cells, align="l" + "r" * len(found["pieces"][1]))
    name = f"contextual_{found['family']}"
    results.write(args.out, name, report, "\n".join(lines + ["", results.machine_line(report)]), figure(found))
    print(f"contextual: results in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
