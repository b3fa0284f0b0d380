"""Training metrics on disk and on the terminal: a JSON-lines log, TensorBoard events and a progress bar.

Every record goes to ``workdir/metrics.jsonl``, one JSON object a line::

    {"step": 100, "split": "train", "time": 1717000000.0, "loss": 4.2, "learning_rate": 0.0007}

and the same scalars go to TensorBoard (``workdir/tensorboard/``) under ``<split>/<name>``. The JSONL file is
the source of truth (``attn_jax.plots`` reads it); TensorBoard is for watching a run live.

The workdir may be a URL (``gs://bucket/run``, through ``etils.epath``). Object stores cannot append, so there the
log is rewritten whole at every write, and TensorBoard's event file is written locally and copied over at each
flush (tensorboardX reaches GCS only through extra client libraries).

Only process 0 writes in a multi-host run, so N hosts don't interleave N copies of the same numbers.
This module imports no model, data or training code.
"""

import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any, SupportsFloat

import jax
import numpy as np
from etils import epath
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


def _is_local(path: epath.Path) -> bool:
    return "://" not in os.fspath(path)


def _drop_torn_tail(path: epath.Path) -> None:
    """Cuts a half-written last line left by a killed run, so appended records start on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


class _Lines:
    """A text file that only grows by whole lines: appended to where the filesystem can, else rewritten whole."""

    def __init__(self, path: epath.Path):
        self._path = path
        _drop_torn_tail(path)
        if _is_local(path):
            # Line buffering: a killed run loses at most the line being written.
            self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (closed in close())
            self._text = None
        else:
            self._file = None
            self._text = path.read_text() if path.exists() else ""

    def append(self, line: str) -> None:
        if self._file is not None:
            self._file.write(line)
        else:
            self._text += line
            self._path.write_text(self._text)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class _TensorBoard:
    """tensorboardX's writer, imported only when a writer is made. tensorboardX imports torch when torch is
    installed: a torch that fails to import (a broken install) turns TensorBoard off with a warning instead of
    stopping the run; the JSON-lines log holds the same numbers. For a URL workdir, events are written locally
    and copied to ``directory`` at every flush."""

    def __init__(self, directory: epath.Path):
        self._writer = None
        try:
            from tensorboardX import SummaryWriter
        except Exception as error:  # whatever a broken torch raises, not only ImportError
            logging.getLogger(__name__).warning("TensorBoard logging is off: tensorboardX failed to import: %r", error)
            return
        self._remote = None if _is_local(directory) else directory
        local = tempfile.mkdtemp(prefix="attn_jax_tensorboard_") if self._remote else os.fspath(directory)
        self._local = local
        self._writer = SummaryWriter(local, flush_secs=30)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer is not None:
            self._writer.add_scalar(tag, value, step)

    def add_text(self, tag: str, text: str, step: int) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self._writer is None:
            return
        self._writer.flush()
        if self._remote is not None:
            self._remote.mkdir(parents=True, exist_ok=True)
            for name in os.listdir(self._local):
                (self._remote / name).write_bytes(epath.Path(self._local, name).read_bytes())

    def close(self) -> None:
        if self._writer is None:
            return
        self.flush()
        self._writer.close()
        if self._remote is not None:
            shutil.rmtree(self._local, ignore_errors=True)


class MetricsWriter:
    """Appends metrics to ``workdir/metrics.jsonl`` and TensorBoard; a no-op when not enabled.

    Args:
      workdir: the run's directory (a path or a URL); created if missing. An existing log is appended to, so a
        resumed run continues the same file (steps redone after the last checkpoint appear twice; readers keep
        the last).
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
        self.path = epath.Path(workdir) / METRICS_FILE
        self._file = None
        self._tensorboard = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = _Lines(self.path)
        self._tensorboard = _TensorBoard(epath.Path(workdir) / TENSORBOARD_DIR)

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
        """Pushes buffered records to disk (the JSON lines are written as they come)."""
        if self._tensorboard is not None:
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
        self._file.append(json.dumps(record, allow_nan=False) + "\n")


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
    path = epath.Path(path)
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
    """The training loop's progress: the step (or, under a time budget, the time used of the budget), the loss,
    the learning rate and tokens/s.

    On a terminal it is a tqdm bar redrawn in place; without one (a log file, CI) it writes one plain line per
    update, so the log holds no carriage returns. Disabled (every method a no-op) when ``enabled`` is false or on
    any process but 0.

    Args:
      total_steps: the step the run ends at.
      initial_step: the step it starts from (non-zero when resuming), so the ETA covers only what is left.
      enabled: show progress at all.
      budget: seconds of the time budget that ends the run first, or None. The bar then measures time
        (``elapsed / budget`` and its percentage) instead of steps, which would read "0% 400/100000".
      started: ``time.monotonic()`` when the budget started (default: now).
      stream: where to write (default ``sys.stderr``).

    Example:
      >>> import io
      >>> out = io.StringIO()
      >>> bar = ProgressBar(100, initial_step=0, stream=out)
      >>> bar.update(10, loss=2.0, learning_rate=1e-3, tokens_per_second=5e4)
      >>> bar.close()
      >>> print(out.getvalue(), end="")
      step 10/100 (10%) | loss 2.0000 | lr 1.00e-03 | 50.0k tok/s
    """

    def __init__(
        self,
        total_steps: int,
        initial_step: int = 0,
        enabled: bool = True,
        *,
        budget: float | None = None,
        started: float | None = None,
        stream=None,
    ):
        self._total, self._budget = total_steps, budget
        self._started = time.monotonic() if started is None else started
        self._stream = sys.stderr if stream is None else stream
        self._enabled = enabled and jax.process_index() == 0
        interactive = getattr(self._stream, "isatty", lambda: False)()
        self._bar = None
        if self._enabled and interactive:
            self._bar = tqdm(
                total=round(budget) if budget else total_steps,
                initial=0 if budget else initial_step,
                file=self._stream,
                mininterval=0.5,
                dynamic_ncols=True,
                bar_format="{percentage:3.0f}%|{bar}| {postfix}"
                if budget
                else "{percentage:3.0f}%|{bar}| {postfix}, eta {remaining}",
            )

    def update(
        self,
        step: int,
        *,
        loss: SupportsFloat,
        learning_rate: SupportsFloat,
        tokens_per_second: SupportsFloat | None = None,
    ) -> None:
        """Shows ``step`` and its numbers (a line per call without a terminal).

        Args:
          step: the step just finished.
          loss: the training loss to show.
          learning_rate: the current learning rate.
          tokens_per_second: throughput, shown with a k/M suffix; None before there is a measurement.
        """
        if not self._enabled:
            return
        elapsed = time.monotonic() - self._started
        if self._budget:
            progress = (
                f"step {step:,} | {tqdm.format_interval(elapsed)} / {tqdm.format_interval(self._budget)} of the time "
                f"budget ({100 * min(elapsed / self._budget, 1.0):.0f}%)"
            )
        else:
            progress = f"step {step:,}/{self._total:,} ({100 * step / self._total:.0f}%)"
        parts = [progress, f"loss {_scalar(loss):.4f}", f"lr {_scalar(learning_rate):.2e}"]
        if tokens_per_second is not None:
            parts.append(f"{tqdm.format_sizeof(_scalar(tokens_per_second))} tok/s")
        status = " | ".join(parts)
        if self._bar is None:
            self._stream.write(status + "\n")
            self._stream.flush()
            return
        self._bar.set_postfix_str(status, refresh=False)
        self._bar.update((min(round(elapsed), round(self._budget)) if self._budget else step) - self._bar.n)

    def close(self) -> None:
        """Draws the final state and releases the bar."""
        if self._bar is not None:
            self._bar.close()
