"""Tests for attn_jax.plots: learning curves and attention heatmaps are valid PNGs that show the data."""

import matplotlib.image
import numpy as np
import pytest

from attn_jax.metrics import MetricsWriter
from attn_jax.plots import (
    attention_figure,
    learning_curves_figure,
    plot_attention,
    plot_attention_layers,
    plot_learning_curves,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SOURCE = ["▁Das", "▁Haus", "▁ist", "▁$5", "</s>"]  # SentencePiece-style, with a "$" that must not be TeX
TARGET = ["▁The", "▁house", "▁is", "</s>"]


def _assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4) and min(image.shape[:2]) > 100
    return image


def _records():
    train = [{"step": s, "split": "train", "loss": 10.0 / s, "learning_rate": 1e-4 * s} for s in range(1, 21)]
    evals = [{"step": s, "split": "eval", "loss": 12.0 / s, "bleu": 2.0 * s, "accuracy": 0.04 * s} for s in (10, 20)]
    return train + evals


def test_learning_curves_png_from_records(tmp_path):
    path = plot_learning_curves(_records(), tmp_path / "plots" / "curves.png")
    _assert_png(path)


def test_learning_curves_from_log_file_with_nulls_and_duplicates(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        for step in (1, 2, 3):
            writer.write(step, {"loss": 5.0 - step, "learning_rate": 1e-3})
        writer.write(2, {"loss": float("nan"), "learning_rate": 1e-3})  # resumed run redid step 2 and diverged
        writer.write_text(3, "samples", "not a number")

    fig = learning_curves_figure(tmp_path / "metrics.jsonl")
    (line,) = fig.axes[0].get_lines()
    np.testing.assert_array_equal(line.get_xdata(), [1, 2, 3])
    np.testing.assert_array_equal(line.get_ydata(), [4.0, np.nan, 2.0])
    _assert_png(plot_learning_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png"))


def test_learning_curves_missing_series_say_no_data(tmp_path):
    fig = learning_curves_figure([{"step": 1, "split": "train", "loss": 3.0}])
    lr_ax, bleu_ax = fig.axes[1], fig.axes[2]
    assert not lr_ax.get_lines() and "no data" in [t.get_text() for t in lr_ax.texts]
    assert "no data" in [t.get_text() for t in bleu_ax.texts]
    _assert_png(plot_learning_curves([], tmp_path / "empty.png"))


def test_learning_curves_plot_bleu_and_accuracy():
    records = _records()
    records[-1]["bleu"] = np.float32(40.0)  # in-memory records may hold NumPy scalars
    fig = learning_curves_figure(records)
    (bleu,) = fig.axes[2].get_lines()
    (accuracy,) = fig.axes[3].get_lines()  # a panel of its own: one evaluation's markers never overlap
    np.testing.assert_array_equal(bleu.get_ydata(), [20.0, 40.0])
    np.testing.assert_allclose(accuracy.get_ydata(), [0.4, 0.8])


def test_learning_curves_compare_training_and_validation_nll_and_star_the_test_bleu():
    records = _records() + [{"step": 20, "split": "test", "bleu": 35.0}]
    for record in records:
        if record["split"] == "train":
            record["nll"] = record["loss"] - 0.5  # the training NLL, not the label-smoothed loss
    fig = learning_curves_figure(records)
    train, validation = fig.axes[0].get_lines()
    np.testing.assert_allclose(train.get_ydata(), [10.0 / s - 0.5 for s in range(1, 21)])
    np.testing.assert_allclose(validation.get_ydata(), [1.2, 0.6])
    _, test = fig.axes[2].get_lines()
    assert (list(test.get_xdata()), list(test.get_ydata()), test.get_marker()) == ([20], [35.0], "*")


def test_attention_figure_shows_weights_unchanged():
    weights = np.full((4, 5), 0.05)
    weights[2, 3] = 0.8  # target "▁is" looks at source "▁$5"
    fig = attention_figure(weights, SOURCE, TARGET, title="one map")
    ax = fig.axes[0]
    shown = np.asarray(ax.images[0].get_array())
    np.testing.assert_array_equal(shown, weights)
    assert np.unravel_index(shown.argmax(), shown.shape) == (2, 3)
    assert [t.get_text() for t in ax.get_xticklabels()] == [s.replace("$", r"\$") for s in SOURCE]
    assert [t.get_text() for t in ax.get_yticklabels()] == TARGET
    assert ax.get_xticklabels()[0].get_rotation() == 90
    assert len(fig.axes) == 2  # the map and its colorbar


@pytest.mark.parametrize("num_heads", [1, 3, 4])
def test_attention_figure_one_panel_per_head(num_heads):
    weights = np.random.default_rng(0).dirichlet(np.ones(5), size=(num_heads, 4))  # [N, T, S]
    fig = attention_figure(weights, SOURCE, TARGET)
    heads = fig.axes[:-1]
    assert len(heads) == num_heads
    for head, ax in enumerate(heads):
        np.testing.assert_array_equal(ax.images[0].get_array(), weights[head])
        assert ax.get_title() == f"head {head + 1}"
    # With 3 heads on a 2x2 grid the slot under head 2 is empty, so head 2 carries the source labels.
    labelled = [ax.xaxis.get_tick_params()["labelbottom"] for ax in heads]
    assert labelled == {1: [True], 3: [False, True, True], 4: [False, False, True, True]}[num_heads]


def test_attention_figure_rejects_mismatched_tokens():
    with pytest.raises(ValueError, match="T=4, S=5"):
        attention_figure(np.zeros((4, 5)), SOURCE[:4], TARGET)
    with pytest.raises(ValueError, match="shape"):
        attention_figure(np.zeros((1, 1, 4, 5)), SOURCE, TARGET)


def test_plot_attention_writes_png_for_2d_and_3d(tmp_path):
    weights = np.random.default_rng(1).dirichlet(np.ones(5), size=(2, 4))
    _assert_png(plot_attention(weights[0], SOURCE, TARGET, tmp_path / "map.png", title="head 1"))
    _assert_png(plot_attention(weights, SOURCE, TARGET, tmp_path / "heads.png", title="two heads"))


def test_plot_attention_layers_writes_mean_and_heads_per_layer(tmp_path):
    rng = np.random.default_rng(2)
    L, N, T, S = 2, 2, len(TARGET), len(SOURCE)
    weights = {
        "encoder": rng.dirichlet(np.ones(S), size=(1, N, S)),
        "cross": rng.dirichlet(np.ones(S), size=(L, N, T)),
    }
    paths = plot_attention_layers(weights, SOURCE, TARGET, tmp_path / "attention")
    assert [p.name for p in paths] == [
        "encoder_layer1_mean.png",
        "encoder_layer1_heads.png",
        "cross_layer1_mean.png",
        "cross_layer1_heads.png",
        "cross_layer2_mean.png",
        "cross_layer2_heads.png",
    ]
    for path in paths:
        _assert_png(path)


def test_plot_attention_layers_rejects_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="unknown attention kind"):
        plot_attention_layers({"sideways": np.zeros((1, 1, 4, 5))}, SOURCE, TARGET, tmp_path)
