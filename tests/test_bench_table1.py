"""Tests of the Table 1 and model-family benchmark sections (attn_jax/bench/table1.py, attn_jax/bench/families.py).

The Table 1 section runs at toy sizes (``--quick``); what it must get right does not depend on the size: the
recurrent layer executes one scan step per position (twice with the backward pass), attention none; the GRU's
gradient decays with distance while attention's reaches every position in one step. The families section's
clock and checkpoint choice are checked on synthetic logs (its scoring of a real text run: tests/test_families.py).
"""

import json

import numpy as np
import pytest

from attn_jax.bench import families, table1
from attn_jax.bench.cli import main


@pytest.mark.slow
def test_table1_quick_writes_its_files_and_counts_sequential_steps(tmp_path):
    assert main(["table1", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "table1.json").read_text())
    for name in ("table1.md", "table1.png", "path_length.png"):
        assert (tmp_path / name).stat().st_size > 0
    for row in report["rows"]:
        expected = {"self_attention": 0, "additive": 0}.get(
            row["layer"], row["n"] * (2 if row["pass"] == "fwd_bwd" else 1)
        )
        assert row["scan_steps"] == expected, row
        assert row["temp_bytes"] >= 0 and row["compile_s"] > 0
    assert {s["layer"] for s in report["slopes"]} == set(table1.LAYERS)
    # The additive layer's [n, n, A] tensor: its memory grows about as n^2 (exponent well above 1).
    additive = next(s for s in report["slopes"] if (s["layer"], s["pass"]) == ("additive", "fwd"))
    assert additive["memory_vs_n"] > 1.5


def test_recurrent_gradient_decays_with_distance_and_attentions_does_not():
    grads = {layer: np.asarray(table1.path_gradients(layer, n=32, d=16, seeds=2)) for layer in table1.LAYERS}
    assert grads["recurrent"][31] < 1e-3 * grads["recurrent"][0]  # 31 GRU steps away
    for layer in ("self_attention", "additive", "additive_step"):
        far, near = grads[layer][16:].mean(), grads[layer][1:16].mean()
        assert 0.2 < far / near < 5.0, (layer, far, near)  # no trend with distance


def test_fit_exponent_and_while_trip_counts():
    n = np.array([16, 32, 64, 128, 256, 512])
    assert table1.fit_exponent(n, 3.0 * n**2.0 + 1e-3) == pytest.approx(2.0, abs=0.01)
    assert table1.fit_exponent(n, [None] * 6) is None
    hlo = 'x = (s32[], f32[2]) while(y), condition=c, body=b, backend_config={"known_trip_count":{"n":"64"}}'
    assert table1.while_trip_counts(hlo) == [64]


def test_training_minutes_start_before_the_first_compiling_interval():
    # 2 s per step, and the first 10 steps took 60 s more (compiling): the clock starts at the first step.
    records = [{"split": "train", "step": 10, "time": 1000.0 + 60 + 20}]
    records += [{"split": "train", "step": s, "time": 1000.0 + 60 + 2 * s} for s in (20, 30, 40)]
    records += [{"split": "eval", "step": 40, "time": 5000.0}]
    minutes = families.training_minutes(records)
    assert minutes == {10: pytest.approx(20 / 60), 20: pytest.approx(40 / 60), 30: 1.0, 40: pytest.approx(80 / 60)}
    assert families.checkpoint_within([10, 20, 30, 40], minutes, 1.0) == 30
    assert families.checkpoint_within([10, 20, 30, 40], minutes, 0.1) is None


def test_bleu_by_source_length_buckets():
    pairs = [("one two", "eins zwei drei vier fünf"), ("a b c d e f", "x y z w v"), ("a " * 30, "lang")]
    buckets = families.length_buckets(pairs, ["eins zwei drei vier fünf", "x y", "lang"], edges=(1, 6, 21))
    assert [(b["bucket"], b["sentences"]) for b in buckets] == [("1-5", 1), ("6-20", 1), ("21+", 1)]
    assert buckets[0]["bleu"] == pytest.approx(100.0) and buckets[1]["bleu"] < 100.0
