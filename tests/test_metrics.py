"""Tests for attn_jax.metrics: the JSONL log, TensorBoard events and the progress bar."""

import io
import json
import math
import re
import time

import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.metrics import METRICS_FILE, TENSORBOARD_DIR, MetricsWriter, ProgressBar, read_metrics


def _lines(workdir):
    return [json.loads(line) for line in (workdir / METRICS_FILE).read_text().splitlines()]


def test_writes_one_json_object_per_line_with_header_fields(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write(1, {"loss": 2.5, "learning_rate": np.float32(1e-3)})
        writer.write(2, {"loss": jnp.float32(2.0), "bleu": np.array([12.5])}, split="eval")

    first, second = _lines(tmp_path)
    assert first["step"] == 1 and first["split"] == "train" and first["loss"] == 2.5
    assert isinstance(first["time"], float) and math.isfinite(first["time"])
    np.testing.assert_allclose(first["learning_rate"], 1e-3, rtol=1e-6)
    assert second == {"step": 2, "split": "eval", "time": second["time"], "loss": 2.0, "bleu": 12.5}


def test_non_finite_values_become_null(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write(3, {"loss": float("nan"), "grad_norm": np.inf, "accuracy": jnp.float32(-jnp.inf), "ok": 1})

    (record,) = _lines(tmp_path)  # json.loads would accept NaN; the raw text must not contain it
    assert (record["loss"], record["grad_norm"], record["accuracy"], record["ok"]) == (None, None, None, 1.0)
    assert "NaN" not in (tmp_path / METRICS_FILE).read_text()


def test_rejects_non_numbers_and_reserved_names_without_writing(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        with pytest.raises(TypeError, match="'loss'"):
            writer.write(1, {"loss": np.zeros(3)})
        with pytest.raises(ValueError, match="reserved"):
            writer.write(1, {"step": 1.0})
    assert (tmp_path / METRICS_FILE).read_text() == ""


def test_write_text_goes_to_jsonl(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write_text(5, "samples", "Hallo Welt -> hello world")

    (record,) = _lines(tmp_path)
    assert record["step"] == 5 and record["split"] == "eval"
    assert (record["tag"], record["text"]) == ("samples", "Hallo Welt -> hello world")


def test_resumed_writer_appends_and_drops_torn_tail(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write(1, {"loss": 3.0})
    with (tmp_path / METRICS_FILE).open("a") as f:
        f.write('{"step": 2, "split": "tr')  # the run was killed mid-line
    with MetricsWriter(tmp_path) as writer:
        writer.write(2, {"loss": 2.0})

    assert [(r["step"], r["loss"]) for r in _lines(tmp_path)] == [(1, 3.0), (2, 2.0)]


def test_disabled_writer_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    writer = MetricsWriter(workdir, enabled=False)
    writer.write(1, {"loss": 1.0})
    writer.write_text(1, "samples", "x")
    writer.flush()
    writer.close()
    assert not workdir.exists()


def test_default_enabled_on_process_zero(tmp_path):
    with MetricsWriter(tmp_path) as writer:  # a single-process test run is process 0
        assert writer.enabled


def test_tensorboard_event_file_is_created(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write(1, {"loss": 1.0})
        writer.flush()
        events = list((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
        assert len(events) == 1 and events[0].stat().st_size > 0


def test_write_after_close_raises_and_close_is_idempotent(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.close()
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.write(1, {"loss": 1.0})


def test_read_metrics_ignores_truncated_last_line(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}]
    assert read_metrics(tmp_path) == read_metrics(path)  # a workdir works too


def test_read_metrics_rejects_damage_before_the_last_line(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1\n{"step": 2}\n')
    with pytest.raises(ValueError, match=":1 "):
        read_metrics(path)


def test_progress_without_a_terminal_is_one_plain_line_per_update(capsys):
    bar = ProgressBar(100, initial_step=10, enabled=True)
    for step in (20, 30):
        bar.update(step, loss=jnp.float32(2.3456), learning_rate=np.float32(7e-4), tokens_per_second=12345.0)
    bar.update(40, loss=2.0, learning_rate=1e-3)  # no tokens/s measured yet: not shown
    bar.close()

    err = capsys.readouterr().err
    assert "\r" not in err  # a log file gets lines, not a bar redrawn with carriage returns
    lines = err.splitlines()
    assert lines == [
        "step 20/100 (20%) | loss 2.3456 | lr 7.00e-04 | 12.3k tok/s",
        "step 30/100 (30%) | loss 2.3456 | lr 7.00e-04 | 12.3k tok/s",
        "step 40/100 (40%) | loss 2.0000 | lr 1.00e-03",
    ]


def test_progress_under_a_time_budget_shows_time_used_of_the_budget_not_steps_of_the_total(capsys):
    bar = ProgressBar(100_000, initial_step=0, enabled=True, budget=600.0, started=time.monotonic() - 150.0)
    bar.update(400, loss=2.0, learning_rate=1e-3, tokens_per_second=100.0)
    bar.close()

    err = capsys.readouterr().err
    used = re.findall(r"^step 400 \| 02:(\d\d) / 10:00 of the time budget \((\d+)%\) \| loss 2\.0000", err, re.M)
    assert used, err
    assert 30 <= int(used[0][0]) <= 40 and used[0][1] in ("25", "26")
    assert "400/100" not in err and "100,000" not in err


def test_progress_on_a_terminal_draws_a_bar_over_the_budget():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    bar = ProgressBar(100_000, budget=100.0, started=time.monotonic() - 50.0, stream=out)
    bar.update(7, loss=2.0, learning_rate=1e-3, tokens_per_second=100.0)
    bar.close()
    assert re.search(r" 5\d%\|", out.getvalue()), out.getvalue()  # half the budget, not 7 of 100,000 steps
    assert "step 7 | 00:5" in out.getvalue()


def test_progress_bar_disabled_prints_nothing(capsys):
    bar = ProgressBar(100, initial_step=0, enabled=False)
    bar.update(50, loss=1.0, learning_rate=1e-3, tokens_per_second=1.0)
    bar.close()
    assert capsys.readouterr().err == ""
