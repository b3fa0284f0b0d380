"""Pictures of a run: learning curves from the metrics log, and attention heatmaps (paper §3.2, Figures 3-5).

Figures are ``matplotlib.figure.Figure`` objects drawn on an Agg canvas, never made through ``pyplot``:
nothing needs a display, and no global figure registry holds on to them, so a figure is freed as soon as
it is saved and dropped (a long run that plots every eval doesn't grow). The ``*_figure`` functions return
the figure for tests and notebooks; the ``plot_*`` functions save a PNG and return its path.

Shape letters as in ``attn_jax.types``: L layers, N heads, T queries (target), S keys (source).
"""

import math
import numbers
import os
from collections.abc import Mapping, Sequence

import numpy as np
from etils import epath
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from attn_jax.metrics import read_metrics

DPI = 100
# Metric names read from the log (see attn_jax.metrics): split "train" and "eval".
LOSS, NLL, LEARNING_RATE, BLEU, ACCURACY = "loss", "nll", "learning_rate", "bleu", "accuracy"
# Which tokens label the query (rows) and key (columns) axes of each attention kind that
# ``attn_jax.model.transformer(..., return_weights=True)`` returns, and how to title it.
ATTENTION_KINDS = {
    "encoder": ("source", "source", "encoder self-attention"),
    "decoder": ("target", "target", "decoder self-attention"),
    "cross": ("target", "source", "encoder-decoder attention"),
}
_MAX_PANEL_INCHES = 8.0  # a 200-token sentence still fits on a screen; its labels just get smaller


def _save(fig: Figure, out_png: str | os.PathLike) -> epath.Path:
    out_png = epath.Path(out_png)  # a local path or a URL (gs://...)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with out_png.open("wb") as file:
        fig.savefig(file, dpi=DPI, format="png")
    return out_png


# --------------------------------------------------------------------------------------------------
# Learning curves
# --------------------------------------------------------------------------------------------------


def _series(records: Sequence[Mapping], split: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of one metric; NaN where the log has null, so the line shows a gap there."""
    by_step = {}
    for record in records:
        value = record.get(name, False)
        is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)  # np.float32 too
        if record.get("split") == split and (value is None or is_number):
            # A resumed run redoes the steps after its last checkpoint; the newer record wins.
            by_step[record["step"]] = np.nan if value is None else float(value)
    steps = sorted(by_step)
    return np.array(steps, dtype=np.int64), np.array([by_step[s] for s in steps], dtype=np.float64)


def _plot_series(ax: Axes, records: Sequence[Mapping], split: str, name: str, **style) -> bool:
    steps, values = _series(records, split, name)
    if steps.size:
        ax.plot(steps, values, label=f"{split} {name}", **style)
    return bool(steps.size)


def _finish_panel(ax: Axes, ylabel: str, has_data: bool) -> None:
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if not has_data:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")


def learning_curves_figure(metrics: Sequence[Mapping] | str | os.PathLike) -> Figure:
    """Four panels sharing the step axis: NLL, learning rate, BLEU, token accuracy.

    Training and validation are drawn on the same scale in each panel (the training NLL, not the label-smoothed
    loss the optimiser sees, against the validation NLL), so the gap between them shows under- and over-fitting.
    BLEU and accuracy get panels of their own, so a single evaluation's two markers never hide each other; the
    test split's score (written by the final report) is a star at the last step.

    Args:
      metrics: records as ``attn_jax.metrics.read_metrics`` returns them, or the path of the log.

    Returns:
      The figure; a panel whose series are all missing says "no data".

    Example:
      >>> fig = learning_curves_figure([{"step": 1, "split": "train", "loss": 3.0, "learning_rate": 1e-4}])
      >>> [ax.get_ylabel() for ax in fig.axes]
      ['NLL', 'learning rate', 'BLEU', 'token accuracy']
    """
    records = metrics if isinstance(metrics, Sequence) and not isinstance(metrics, str) else read_metrics(metrics)
    fig = Figure(figsize=(8, 11), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, lr_ax, bleu_ax, accuracy_ax = fig.subplots(4, 1, sharex=True)

    # Runs written before "nll" was logged have only the smoothed loss.
    train_nll = NLL if any(NLL in r for r in records if r.get("split") == "train") else LOSS
    has_loss = _plot_series(loss_ax, records, "train", train_nll, alpha=0.8)
    has_loss |= _plot_series(loss_ax, records, "eval", LOSS, marker="o")
    _finish_panel(loss_ax, "NLL", has_loss)

    _finish_panel(lr_ax, "learning rate", _plot_series(lr_ax, records, "train", LEARNING_RATE))
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))

    has_bleu = _plot_series(bleu_ax, records, "eval", BLEU, marker="o", color="C2")
    has_bleu |= _plot_series(bleu_ax, records, "test", BLEU, marker="*", markersize=12, linestyle="", color="C4")
    _finish_panel(bleu_ax, "BLEU", has_bleu)

    has_accuracy = _plot_series(accuracy_ax, records, "train", ACCURACY, alpha=0.8, color="C1")
    has_accuracy |= _plot_series(accuracy_ax, records, "eval", ACCURACY, marker="s", color="C3")
    _finish_panel(accuracy_ax, "token accuracy", has_accuracy)
    accuracy_ax.set_xlabel("step")

    for ax, has_data in ((loss_ax, has_loss), (bleu_ax, has_bleu), (accuracy_ax, has_accuracy)):
        if has_data:  # an empty legend() call would warn
            ax.legend(loc="best", fontsize=8)
    return fig


def plot_learning_curves(metrics: Sequence[Mapping] | str | os.PathLike, out_png: str | os.PathLike) -> epath.Path:
    """Saves ``learning_curves_figure(metrics)`` as a PNG.

    Args:
      metrics: records from ``read_metrics``, or the path of ``metrics.jsonl``.
      out_png: where to write the image; parent folders are created.

    Returns:
      The path written.
    """
    return _save(learning_curves_figure(metrics), out_png)


# --------------------------------------------------------------------------------------------------
# Attention heatmaps
# --------------------------------------------------------------------------------------------------


def _escape(token: str) -> str:
    # A "$" pair in a label would be typeset as TeX maths (and can fail to parse).
    return token.replace("$", r"\$")


def _grid(num_heads: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(num_heads))
    return math.ceil(num_heads / cols), cols


def _label_axes(axes: np.ndarray, num_heads: int, source: Sequence[str], target: Sequence[str]) -> None:
    """Token labels on the outer panels only; inner ones would repeat them.

    The panels are not shared axes: with sharing, every ``set_ticks`` call rebuilds the ticks of all N
    panels, which made an 8-head grid several times slower to draw.
    """
    cols = axes.shape[1]
    font = max(4.0, min(9.0, 9.0 * 40 / max(len(source), len(target))))
    for index, ax in enumerate(axes.flat):
        if index >= num_heads:
            ax.remove()
            continue
        # Text properties (rotation, size) belong to each axes' own labels, so every panel sets them.
        ax.set_xticks(np.arange(len(source)), [_escape(t) for t in source], rotation=90, fontsize=font)
        ax.set_yticks(np.arange(len(target)), [_escape(t) for t in target], fontsize=font)
        # The panel above an empty slot is the bottom of its column, so it carries the source labels.
        ax.tick_params(labelbottom=index + cols >= num_heads, labelleft=index % cols == 0)


def attention_figure(
    weights: ArrayLike, source_tokens: Sequence[str], target_tokens: Sequence[str], *, title: str | None = None
) -> Figure:
    """Heatmap of attention weights, queries (target tokens) down and keys (source tokens) across.

    Args:
      weights: ``[T, S]`` for one map, or ``[N, T, S]`` for one panel per head in a grid; all panels share
        one colour scale from 0 to the largest weight.
      source_tokens: ``S`` labels for the key axis (drawn rotated).
      target_tokens: ``T`` labels for the query axis.
      title: the figure's title.

    Returns:
      The figure; ``fig.axes[i].images[0].get_array()`` is head ``i``'s ``[T, S]`` map, the last axes is the
      colorbar.

    Example:
      >>> fig = attention_figure(np.eye(2), ["a", "b"], ["x", "y"])
      >>> fig.axes[0].images[0].get_array().tolist()
      [[1.0, 0.0], [0.0, 1.0]]
    """
    maps = np.asarray(weights, dtype=np.float64)
    if maps.ndim not in (2, 3):
        raise ValueError(f"weights must be [T, S] or [N, T, S], got shape {maps.shape}")
    per_head = maps.ndim == 3
    maps = maps if per_head else maps[None]
    N, T, S = maps.shape
    if (len(target_tokens), len(source_tokens)) != (T, S):
        raise ValueError(
            f"weights are [T={T}, S={S}] but got {len(target_tokens)} target and {len(source_tokens)} source tokens"
        )
    rows, cols = _grid(N)
    cell = min(0.3, _MAX_PANEL_INCHES / max(T, S))
    # 1.2 in of margin per panel for token labels, 1 in for the colorbar.
    figsize = (cols * (max(S * cell, 1.5) + 1.2) + 1.0, rows * (max(T * cell, 1.5) + 1.2) + 0.5)
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    vmax = max(float(maps.max()), 1e-9)
    for head, ax in zip(range(N), axes.flat, strict=False):
        image = ax.imshow(maps[head], cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        if per_head:
            ax.set_title(f"head {head + 1}", fontsize=9)
    _label_axes(axes, N, source_tokens, target_tokens)
    fig.colorbar(image, ax=list(axes.flat[:N]), shrink=0.8, label="attention weight")
    if title:
        fig.suptitle(title)
    return fig


def plot_attention(
    weights: ArrayLike,
    source_tokens: Sequence[str],
    target_tokens: Sequence[str],
    out_png: str | os.PathLike,
    *,
    title: str | None = None,
) -> epath.Path:
    """Saves ``attention_figure(weights, source_tokens, target_tokens, title=title)`` as a PNG.

    Args:
      weights: ``[T, S]`` or ``[N, T, S]`` attention weights (NumPy or JAX).
      source_tokens: ``S`` key-axis labels.
      target_tokens: ``T`` query-axis labels.
      out_png: where to write the image; parent folders are created.
      title: the figure's title.

    Returns:
      The path written.
    """
    return _save(attention_figure(weights, source_tokens, target_tokens, title=title), out_png)


def plot_attention_layers(
    weights_per_layer: Mapping[str, ArrayLike],
    source_tokens: Sequence[str],
    target_tokens: Sequence[str],
    out_dir: str | os.PathLike,
) -> list[epath.Path]:
    """Writes two PNGs per layer of every attention kind: the mean over heads, and a grid of all heads.

    Files are ``<kind>_layer<l>_mean.png`` and ``<kind>_layer<l>_heads.png``, layers counted from 1.

    Args:
      weights_per_layer: kind -> ``[L, N, T, S]`` weights of one example (pick it out of the batch
        first). Kinds are the keys of ``ATTENTION_KINDS``: ``"encoder"`` (queries and keys are source
        tokens), ``"decoder"`` (both target) and ``"cross"`` (target queries, source keys).
      source_tokens: the example's source tokens, padding removed (slice the weights to match).
      target_tokens: its target tokens, likewise.
      out_dir: the folder to write into; created if missing.

    Returns:
      The paths written, in kind, layer, mean-then-heads order.
    """
    tokens = {"source": source_tokens, "target": target_tokens}
    paths = []
    for kind, weights in weights_per_layer.items():
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"unknown attention kind {kind!r}; expected one of {sorted(ATTENTION_KINDS)}")
        query_side, key_side, description = ATTENTION_KINDS[kind]
        layers = np.asarray(weights, dtype=np.float64)
        if layers.ndim != 4:
            raise ValueError(f"{kind} weights must be [L, N, T, S], got shape {layers.shape}")
        L, N = layers.shape[:2]
        for layer in range(L):
            stem = epath.Path(out_dir) / f"{kind}_layer{layer + 1:0{len(str(L))}d}"
            where = f"{description}, layer {layer + 1} of {L}"
            labels = (tokens[key_side], tokens[query_side])
            mean = layers[layer].mean(axis=0)  # [N, T, S] -> [T, S]
            paths.append(plot_attention(mean, *labels, f"{stem}_mean.png", title=f"{where}, mean of {N} heads"))
            paths.append(plot_attention(layers[layer], *labels, f"{stem}_heads.png", title=where))
    return paths
