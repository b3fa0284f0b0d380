"""Tests for attn_jax.checkpoint: round trip, retention, corrupt and interrupted checkpoints, averaging."""

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from attn_jax.checkpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointMismatchError,
    average_checkpoints,
    environment_metadata,
    read_params,
    save_averaged,
)

LOGGER = "attn_jax.checkpoint"

# When Orbax's restore fails on one unreadable array, TensorStore still finishes the reads that were in flight;
# their callbacks then hit the event loop Orbax has already closed, and Python reports "Event loop is closed" as
# an unraisable exception. It is noise (the restore has already failed and been handled), so the tests that
# corrupt checkpoints ignore exactly that.
ignore_closed_event_loop = pytest.mark.filterwarnings(
    "ignore:(?s).*Event loop is closed:pytest.PytestUnraisableExceptionWarning"
)


def _init_state(rng, *, rows: int = 2 * 8):
    """A tiny training state with the loop's layout; ``w_q`` is sharded over the data axis."""
    params = {
        "encoder": {"w_q": jax.random.normal(rng, (rows, 3), jnp.float32), "scale": jnp.ones((5,), jnp.float32)},
        "embedding": jnp.arange(7, dtype=jnp.float32).astype(jnp.bfloat16),
    }
    return {
        "params": params,
        "opt_state": optax.adam(1e-3).init(params),
        "step": jnp.array(0, jnp.int32),
        "rng": jax.random.key_data(jax.random.key(1)),
    }


def _trained_state(seed: int):
    """A state after one Adam update, so ``mu``, ``nu`` and ``count`` hold non-trivial values."""
    state = _init_state(jax.random.key(seed))
    grads = jax.tree.map(lambda p: (p * 0.5 + 1).astype(p.dtype), state["params"])
    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes float and int32 scalars
        updates, opt_state = optax.adam(1e-3).update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
    return {**state, "params": params, "opt_state": opt_state, "step": jnp.array(seed, jnp.int32)}


def _shardings(abstract):
    mesh = jax.make_mesh((jax.device_count(),), ("data",))

    def sharding(leaf):
        # Only the [rows, 3] matrices (w_q and its Adam moments) are split, so both kinds of sharding occur.
        return NamedSharding(mesh, P("data") if leaf.ndim == 2 else P())

    return jax.tree.map(sharding, abstract)


def _target():
    """The restore target as the training loop builds it: ``eval_shape`` plus shardings."""
    abstract = jax.eval_shape(_init_state, jax.random.key(0))
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract,
        _shardings(abstract),
    )


def _assert_states_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e), err_msg=jax.tree_util.keystr(path))


def _save_steps(directory, steps, **kwargs):
    with Checkpointer(directory, **kwargs) as checkpointer:
        for step in steps:
            assert checkpointer.save(step, _trained_state(step), data_state={"position": step})


def _truncate_array_files(step_dir):
    files = [path for path in (step_dir / "state").rglob("*") if path.is_file() and path.parent.name == "d"]
    assert files, f"no array data files under {step_dir}"
    for path in files:
        os.truncate(path, path.stat().st_size // 2)


def _delete_array_metadata(step_dir):
    (step_dir / "state" / "_METADATA").unlink()


def _truncate_json_item(step_dir):
    path = step_dir / "metadata" / "metadata"
    os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip_restores_values_structure_dtypes_and_shardings(tmp_path, async_save):
    target = _target()
    state = jax.device_put(_trained_state(3), jax.tree.map(lambda t: t.sharding, target))
    config = {"model": {"d_model": 13}, "lr": 0.5}
    metadata = {**environment_metadata(), "data_fingerprint": "abc123"}
    with Checkpointer(tmp_path, async_save=async_save) as checkpointer:
        assert checkpointer.save(3, state, data_state={"epoch": 1, "position": 42}, config=config, metadata=metadata)
        checkpointer.wait()
    with Checkpointer(tmp_path) as checkpointer:
        restored = checkpointer.restore(target)
    assert restored.step == 3
    _assert_states_equal(restored.state, state)
    assert isinstance(restored.state["opt_state"][0], optax.ScaleByAdamState)
    for leaf, expected in zip(jax.tree.leaves(restored.state), jax.tree.leaves(target), strict=True):
        assert leaf.sharding == expected.sharding
    assert restored.data_state == {"epoch": 1, "position": 42}
    assert restored.config == config
    assert restored.metadata == metadata


def test_async_saves_in_flight_are_all_committed_after_wait(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=5, async_save=True) as checkpointer:
        for step in (1, 2, 3):
            assert checkpointer.save(step, _trained_state(step))
        checkpointer.wait()
        assert checkpointer.all_steps() == [1, 2, 3]
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["1", "2", "3"]
        _assert_states_equal(checkpointer.restore(_target()).state, _trained_state(3))


@pytest.mark.parametrize(("best_mode", "scores"), [("max", [1, 5, 2, 3, 4]), ("min", [5, 1, 4, 3, 2])])
def test_retention_keeps_latest_and_best_across_restarts(tmp_path, best_mode, scores):
    options = {"max_to_keep": 2, "keep_best": 1, "best_metric": "score", "best_mode": best_mode, "async_save": False}
    with Checkpointer(tmp_path, **options) as checkpointer:
        for step, score in enumerate(scores, start=1):
            metrics = {"score": np.float32(score), "loss": jnp.array(0.0), "split": "newstest2013"}
            checkpointer.save(step, _trained_state(step), metrics=metrics)
        assert checkpointer.all_steps() == [2, 4, 5]
    worst = min(scores) if best_mode == "max" else max(scores)
    with Checkpointer(tmp_path, **options) as checkpointer:  # the best step's metric must survive a restart
        checkpointer.save(6, _trained_state(6), metrics={"score": worst})
        assert checkpointer.all_steps() == [2, 5, 6]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["2", "5", "6"]


def test_save_interval_skips_steps_unless_forced(tmp_path):
    with Checkpointer(tmp_path, save_interval_steps=2, async_save=False) as checkpointer:
        assert checkpointer.save(2, _trained_state(2))
        assert not checkpointer.save(3, _trained_state(3))
        assert checkpointer.save(5, _trained_state(5), force=True)
        assert checkpointer.all_steps() == [2, 5]


@ignore_closed_event_loop
@pytest.mark.parametrize("corrupt", [_truncate_array_files, _delete_array_metadata, _truncate_json_item])
def test_corrupt_newest_checkpoint_falls_back_with_warning(tmp_path, caplog, corrupt):
    _save_steps(tmp_path, [1, 2])
    corrupt(tmp_path / "2")
    with Checkpointer(tmp_path, async_save=False) as checkpointer, caplog.at_level(logging.WARNING, LOGGER):
        restored = checkpointer.restore(_target())
        assert restored.step == 1
        _assert_states_equal(restored.state, _trained_state(1))
        assert restored.data_state == {"position": 1}
        assert any("step 2" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
        # The run resumes from step 1 and re-creates step 2: the unreadable copy must not block the save.
        assert checkpointer.save(2, _trained_state(20))
        assert checkpointer.restore(_target()).step == 2
        assert (tmp_path / "1").exists()


@ignore_closed_event_loop
def test_all_checkpoints_corrupt_raises_checkpoint_error_naming_directory(tmp_path, caplog):
    _save_steps(tmp_path, [1, 2])
    _truncate_array_files(tmp_path / "2")
    _delete_array_metadata(tmp_path / "1")
    with Checkpointer(tmp_path) as checkpointer, caplog.at_level(logging.WARNING, LOGGER):
        with pytest.raises(CheckpointError, match=str(tmp_path)):
            checkpointer.restore(_target())
        assert checkpointer.all_steps() == [1, 2]  # restore never deletes anything
    with Checkpointer(tmp_path / "empty") as checkpointer, pytest.raises(CheckpointError, match="no checkpoints"):
        checkpointer.restore(_target())


@ignore_closed_event_loop
def test_explicit_step_does_not_fall_back(tmp_path, caplog):
    _save_steps(tmp_path, [1, 2])
    _truncate_array_files(tmp_path / "2")
    with Checkpointer(tmp_path) as checkpointer, caplog.at_level(logging.WARNING, LOGGER):
        assert checkpointer.restore(_target(), step=1).step == 1
        with pytest.raises(CheckpointError, match="step 2"):
            checkpointer.restore(_target(), step=2)
        with pytest.raises(CheckpointError, match=r"no checkpoint for step 7 .* steps \[1, 2\]"):
            checkpointer.restore(_target(), step=7)


@ignore_closed_event_loop
def test_unreadable_metrics_file_does_not_block_opening(tmp_path, caplog):
    options = {"max_to_keep": 1, "keep_best": 1, "async_save": False}
    with Checkpointer(tmp_path, **options) as checkpointer:
        checkpointer.save(1, _trained_state(1), metrics={"bleu": 9.0})
        checkpointer.save(2, _trained_state(2), metrics={"bleu": 1.0})
    metrics_file = tmp_path / "2" / "metrics" / "metrics"
    os.truncate(metrics_file, metrics_file.stat().st_size // 2)
    # Orbax alone fails to open the directory; here step 2 is merely unreadable and step 1 still restores.
    with Checkpointer(tmp_path, **options) as checkpointer, caplog.at_level(logging.WARNING, LOGGER):
        assert checkpointer.all_steps() == [1, 2]
        assert checkpointer.restore(_target()).step == 1
    assert any("metrics of checkpoint step 2" in r.getMessage() for r in caplog.records)


# Orbax 0.12 names the directory of an in-flight save "<step>.orbax-checkpoint-tmp" (a save killed with
# SIGKILL leaves exactly that); older versions appended "-<timestamp>".
@pytest.mark.parametrize("leftover_name", ["3.orbax-checkpoint-tmp", "3.orbax-checkpoint-tmp-1712345678"])
def test_leftover_tmp_dir_of_interrupted_save_is_ignored_and_cleaned(tmp_path, leftover_name):
    _save_steps(tmp_path, [1, 2])
    leftover = tmp_path / leftover_name
    (leftover / "state").mkdir(parents=True)
    (leftover / "state" / "_METADATA").write_text("{")
    with Checkpointer(tmp_path, async_save=False) as checkpointer:
        assert checkpointer.latest_step() == 2
        assert checkpointer.all_steps() == [1, 2]
        assert checkpointer.save(3, _trained_state(3))
        restored = checkpointer.restore(_target())
    assert restored.step == 3
    _assert_states_equal(restored.state, _trained_state(3))
    assert not leftover.exists()


def test_read_only_checkpointer_leaves_tmp_dirs_of_a_running_save_alone(tmp_path):
    _save_steps(tmp_path, [1])
    in_progress = tmp_path / "2.orbax-checkpoint-tmp-1712345678"
    in_progress.mkdir()
    with Checkpointer(tmp_path, read_only=True) as checkpointer:
        assert checkpointer.restore(_target()).step == 1
    assert in_progress.exists()


def test_shape_mismatch_names_parameter_path_and_both_shapes(tmp_path):
    _save_steps(tmp_path, [1])
    target = jax.eval_shape(functools.partial(_init_state, rows=4), jax.random.key(0))
    expected = r"\['params'\]\['encoder'\]\['w_q'\]: checkpoint \(16, 3\) vs target \(4, 3\)"
    with Checkpointer(tmp_path) as checkpointer, pytest.raises(CheckpointMismatchError, match=expected):
        checkpointer.restore(target)


def test_missing_parameter_is_reported_as_mismatch(tmp_path):
    _save_steps(tmp_path, [1])
    target = _target()
    target["params"]["decoder"] = jax.ShapeDtypeStruct((2,), jnp.float32)
    with Checkpointer(tmp_path) as checkpointer, pytest.raises(CheckpointMismatchError, match=r"\['decoder'\]"):
        checkpointer.restore(target)


def test_average_checkpoints_equals_numpy_mean_of_params(tmp_path):
    _save_steps(tmp_path, [1, 2, 3, 4], max_to_keep=4)
    averaged, steps = average_checkpoints(tmp_path, _target()["params"], last=3)
    assert steps == [2, 3, 4]
    newest = _trained_state(4)
    expected = jax.tree.map(
        lambda *leaves: np.mean(np.stack([np.asarray(x, np.float32) for x in leaves]), axis=0).astype(leaves[0].dtype),
        *[_trained_state(step)["params"] for step in steps],
    )
    assert jax.tree.structure(averaged) == jax.tree.structure(newest["params"])
    assert not np.array_equal(np.asarray(averaged["encoder"]["w_q"]), newest["params"]["encoder"]["w_q"])
    for (path, actual), want in zip(jax.tree_util.tree_leaves_with_path(averaged), jax.tree.leaves(expected),
                                    strict=True):  # fmt: skip
        assert actual.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(want, np.float32), rtol=1e-6,
                                   err_msg=str(path))  # fmt: skip


def test_averaging_skips_a_checkpoint_saved_just_before_a_newer_one(tmp_path):
    # A run stopped by its time budget at step 301, one step after the periodic save of 300.
    _save_steps(tmp_path, [100, 200, 300, 301], max_to_keep=4)
    assert average_checkpoints(tmp_path, _target()["params"], last=3)[1] == [200, 300, 301]
    averaged, steps = average_checkpoints(tmp_path, _target()["params"], last=3, min_gap=50)
    assert steps == [100, 200, 301]
    expected = jax.tree.map(
        lambda *leaves: np.mean([np.asarray(x, np.float64) for x in leaves], axis=0),
        *[_trained_state(step)["params"] for step in steps],
    )
    for actual, want in zip(jax.tree.leaves(averaged), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(actual, np.float32), want, rtol=1e-6)
    assert save_averaged(tmp_path, _target()["params"], last=3, min_gap=50) == [100, 200, 301]


def test_averaging_until_a_step_reads_the_run_as_it_was_then(tmp_path):
    _save_steps(tmp_path, [100, 200, 300, 301], max_to_keep=4)
    averaged, steps = average_checkpoints(tmp_path, _target()["params"], last=2, until=250)
    assert steps == [100, 200]
    expected = jax.tree.map(
        lambda *leaves: np.mean([np.asarray(x, np.float64) for x in leaves], axis=0),
        *[_trained_state(step)["params"] for step in steps],
    )
    for actual, want in zip(jax.tree.leaves(averaged), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(actual, np.float32), want, rtol=1e-6)
    assert average_checkpoints(tmp_path, _target()["params"], last=3, min_gap=50, until=301)[1] == [100, 200, 301]
    with pytest.raises(CheckpointError, match="at or before step 99"):
        average_checkpoints(tmp_path, _target()["params"], last=2, until=99)


def test_the_average_just_written_is_the_one_read_even_when_it_is_of_an_earlier_step(tmp_path):
    _save_steps(tmp_path, [1, 2, 3], max_to_keep=3)
    assert save_averaged(tmp_path, _target()["params"], last=2) == [2, 3]
    assert save_averaged(tmp_path, _target()["params"], last=2, until=2) == [1, 2]
    restored = read_params(tmp_path, _target()["params"], checkpoint="averaged")
    assert restored.step == 2 and restored.metadata["averaged_steps"] == [1, 2]
    _assert_states_equal(restored.state["params"], average_checkpoints(tmp_path, _target()["params"], last=2,
                                                                       until=2)[0])  # fmt: skip


def test_save_averaged_writes_a_separate_params_checkpoint_that_read_params_reads(tmp_path):
    _save_steps(tmp_path, [1, 2, 3])
    assert save_averaged(tmp_path, _target()["params"], last=2) == [2, 3]
    assert save_averaged(tmp_path, _target()["params"], last=3) == [1, 2, 3]  # rewriting the same step is allowed
    expected, steps = average_checkpoints(tmp_path, _target()["params"], last=3)
    restored = read_params(tmp_path, _target()["params"], checkpoint="averaged")
    assert restored.step == 3
    assert restored.metadata["averaged_steps"] == steps == [1, 2, 3]
    _assert_states_equal(restored.state["params"], expected)
    with Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.all_steps() == [1, 2, 3]
        assert checkpointer.restore(_target()).step == 3


def test_read_params_reads_a_chosen_step_and_only_the_parameters(tmp_path):
    _save_steps(tmp_path, [1, 2])
    # The optimiser state is not read: a target that only names the parameters needs no optimiser at all.
    restored = read_params(tmp_path, _target()["params"], checkpoint=1)
    assert restored.step == 1 and set(restored.state) == {"params"}
    _assert_states_equal(restored.state["params"], _trained_state(1)["params"])
    assert read_params(tmp_path, _target()["params"]).step == 2
    with pytest.raises(CheckpointError, match="attn-jax average"):
        read_params(tmp_path, _target()["params"], checkpoint="averaged")
    with pytest.raises(CheckpointError, match="step 7"):
        read_params(tmp_path, _target()["params"], checkpoint=7)
    # A params target that disagrees with the checkpoint is still a mismatch.
    target = _target()["params"]
    target["decoder"] = jax.ShapeDtypeStruct((2,), jnp.float32)
    with pytest.raises(CheckpointMismatchError, match=r"\['decoder'\]"):
        read_params(tmp_path, target)


def test_read_params_on_a_missing_directory_creates_nothing(tmp_path):
    with pytest.raises(CheckpointError, match="train first"):
        read_params(tmp_path / "nothing" / "checkpoints", _target()["params"])
    assert not (tmp_path / "nothing").exists()


def test_non_json_side_item_is_rejected_before_saving(tmp_path):
    with Checkpointer(tmp_path) as checkpointer:
        with pytest.raises(TypeError, match="'config'"):
            checkpointer.save(1, _trained_state(1), config={"dtype": jnp.float32})
        checkpointer.wait()
        assert checkpointer.all_steps() == []


def test_environment_metadata_records_library_versions():
    versions = environment_metadata()
    assert versions["jax"] == jax.__version__
    assert versions["optax"] == optax.__version__
    assert set(versions) >= {"python", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint"}


def test_invalid_retention_options_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(tmp_path, max_to_keep=0)
    with pytest.raises(ValueError, match="best_mode"):
        Checkpointer(tmp_path, best_mode="highest")
