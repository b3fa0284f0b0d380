"""Training metrics on disk and on the terminal: a JSON-lines log, TensorBoard events and a progress bar.

Every record goes to ``workdir/metrics.jsonl``, one JSON object a line::

    {"step": 100, "split": "train", "time": 1717000000.0, "loss": 4.2, "learning_rate": 0.0007}

and the same scalars go to TensorBoard (``workdir/tensorboard/``) under ``<split>/<name>``. The JSONL file is
the source of truth (``attn_jax.plots`` reads it); TensorBoard is for watching a run live.

Only process 0 writes in a multi-host run, so N hosts don't interleave N copies of the same numbers.
This module imports no model, data or training code.
"""

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, SupportsFloat

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_RESERVED_KEYS = ("step", "split", "time")


def _is_lead_process(enabled: bool | None) -> bool:
    return jax.process_index() == 0 if enabled is None else enabled


def _scalar(value: Any) -> float:
    # .item() accepts any size-1 array (a [1] loss from pmap included) and rejects bigger ones.
    return float(np.asarray(value).item())


def _to_float(name: str, value: Any) -> float | None:
    """Converts a Python, NumPy or JAX scalar to a float; NaN and infinities become ``None`` (JSON null)."""
    try:
        number = _scalar(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"metric {name!r} must be a number or a size-1 array, got {value!r}") from error
    return number if math.isfinite(number) else None


def _drop_torn_tail(path: Path) -> None:
    """Cuts a half-written last line left by a killed run, so appended records start on a fresh line."""
    if not path.exists():
        return
    with path.open("rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


class MetricsWriter:
    """Appends metrics to ``workdir/metrics.jsonl`` and TensorBoard; a no-op when not enabled.

    Args:
      workdir: the run's directory; created if missing. An existing log is appended to, so a resumed run
        continues the same file (steps redone after the last checkpoint appear twice; readers keep the last).
      enabled: write at all. ``None`` means "only on process 0" (``jax.process_index() == 0``).

    Example:
      >>> import tempfile
      >>> workdir = tempfile.mkdtemp()
      >>> with MetricsWriter(workdir) as writer:
      ...     writer.write(10, {"loss": 2.5, "learning_rate": 1e-3})
      >>> [(r["step"], r["split"], r["loss"]) for r in read_metrics(f"{workdir}/metrics.jsonl")]
      [(10, 'train', 2.5)]
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool | None = None):
        self.enabled = _is_lead_process(enabled)
        self.path = Path(workdir) / METRICS_FILE
        self._file = None
        self._tensorboard = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(self.path)
        # Line buffering: a killed run loses at most the line being written.
        self._file = self.path.open("a", encoding="utf-8", buffering=1)
        self._tensorboard = SummaryWriter(str(Path(workdir) / TENSORBOARD_DIR), flush_secs=30)

    def write(self, step: int, scalars: Mapping[str, SupportsFloat], split: str = "train") -> None:
        """Records scalars for one step.

        Args:
          step: the training step the values belong to.
          scalars: name -> number (Python, NumPy or JAX scalar, or a size-1 array). NaN and infinities are
            written as JSON null and left out of TensorBoard.
          split: ``"train"``, ``"eval"``, ...; also the TensorBoard tag prefix.
        """
        if not self.enabled:
            return
        values = {}
        for name, value in scalars.items():
            if name in _RESERVED_KEYS:
                raise ValueError(f"metric name {name!r} is reserved for the record header {_RESERVED_KEYS}")
            values[name] = _to_float(name, value)
        self._append({"step": int(step), "split": split, "time": time.time(), **values})
        for name, value in values.items():
            # tensorboardX prints a warning per non-finite value; the JSONL null already records it.
            if value is not None:
                self._tensorboard.add_scalar(f"{split}/{name}", value, int(step))

    def write_text(self, step: int, tag: str, text: str, *, split: str = "eval") -> None:
        """Records a piece of text, e.g. sample translations.

        The JSONL line is ``{"step", "split", "time", "tag": tag, "text": text}``; TensorBoard gets it under
        ``<split>/<tag>`` in its Text tab (rendered as Markdown).

        Args:
          step: the training step the text belongs to.
          tag: a name for the text, e.g. ``"samples"``.
          text: the text itself.
          split: the TensorBoard tag prefix and the record's ``split``.
        """
        if not self.enabled:
            return
        self._append({"step": int(step), "split": split, "time": time.time(), "tag": tag, "text": text})
        self._tensorboard.add_text(f"{split}/{tag}", text, int(step))

    def flush(self) -> None:
        """Pushes buffered records to disk."""
        if self._file is not None:
            self._file.flush()
            self._tensorboard.flush()

    def close(self) -> None:
        """Flushes and closes both outputs; later writes are errors, a second close is not."""
        if self._file is not None:
            self._file.close()
            self._tensorboard.close()
        self._file = self._tensorboard = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _append(self, record: dict) -> None:
        if self._file is None:
            raise ValueError(f"MetricsWriter for {self.path} is closed")
        # allow_nan=False guarantees standard JSON; _to_float has already turned NaN into None.
        self._file.write(json.dumps(record, allow_nan=False) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Reads a ``metrics.jsonl`` log back, skipping a half-written last line (a run killed mid-write).

    Args:
      path: the log file, or the workdir that holds it.

    Returns:
      The records in file order; NaN and infinities come back as ``None``.

    Raises:
      ValueError: a line other than the last is not valid JSON (the file is damaged, not just torn).

    Example:
      >>> import pathlib, tempfile
      >>> log = pathlib.Path(tempfile.mkdtemp()) / "metrics.jsonl"
      >>> _ = log.write_text('{"step": 1, "loss": 3.0}\\n{"step": 2, "lo')
      >>> read_metrics(log)
      [{'step': 1, 'loss': 3.0}]
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number} is not valid JSON: {error}") from error
    return records


class ProgressBar:
    """A tqdm bar for the training loop showing loss, learning rate, tokens/s and the ETA.

    Disabled (every method a no-op) when ``enabled`` is false or on any process but 0. Without a terminal
    (CI logs) it redraws at most every 5 s, so a long run doesn't flood the log.

    Args:
      total_steps: the step the run ends at.
      initial_step: the step it starts from (non-zero when resuming), so the ETA covers only what is left.
      enabled: show the bar at all.
      deadline: ``time.monotonic()`` at which a time budget ends the run; the bar then shows the time left
        instead of a step ETA (which would assume the run goes on to ``total_steps``).

    Example:
      >>> bar = ProgressBar(100, initial_step=0, enabled=False)
      >>> bar.update(10, loss=2.0, learning_rate=1e-3, tokens_per_second=5e4)
      >>> bar.close()
    """

    def __init__(self, total_steps: int, initial_step: int = 0, enabled: bool = True, deadline: float | None = None):
        self._deadline = deadline
        eta = "{postfix}" if deadline is not None else ", eta {remaining}{postfix}"
        stream = sys.stderr
        interactive = getattr(stream, "isatty", lambda: False)()
        self._bar = tqdm(
            total=total_steps,
            initial=initial_step,
            disable=not (enabled and jax.process_index() == 0),
            file=stream,
            unit="step",
            mininterval=0.5 if interactive else 5.0,
            dynamic_ncols=interactive,
            # tqdm's own estimate (smoothed steps/s) is the ETA; "eta" spells out what the bracket shows.
            bar_format="{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}" + eta + "]",
        )

    def update(
        self, step: int, *, loss: SupportsFloat, learning_rate: SupportsFloat, tokens_per_second: SupportsFloat
    ) -> None:
        """Moves the bar to ``step`` and refreshes its numbers (redrawn at most every ``mininterval``).

        Args:
          step: the step just finished.
          loss: the training loss to show.
          learning_rate: the current learning rate.
          tokens_per_second: throughput, shown with a k/M suffix.
        """
        if self._bar.disable:
            return
        tokens = tqdm.format_sizeof(_scalar(tokens_per_second))
        postfix = f"loss={_scalar(loss):.4f}, lr={_scalar(learning_rate):.2e}, tok/s={tokens}"
        if self._deadline is not None:
            left = max(self._deadline - time.monotonic(), 0.0)
            postfix = f"budget left {tqdm.format_interval(left)}, {postfix}"
        self._bar.set_postfix_str(postfix, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        """Draws the final state and releases the bar."""
        self._bar.close()
