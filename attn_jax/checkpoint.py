"""Checkpoints for the training loop: a thin, defensive layer over Orbax's ``CheckpointManager``.

The paper trains for 100k (base) / 300k (big) steps and, for the reported models, *averages the last 5 (base)
or 20 (big) checkpoints* written at 10-minute intervals (§6.1). This module saves and restores the training
state, keeps the last few plus the best few checkpoints, and averages checkpoints.

On-disk layout, one directory per step, written by Orbax into a temporary directory and renamed on commit::

    <directory>/<step>/state/        StandardSave of {"params", "opt_state", "step", "rng"} (OCDBT + zarr)
    <directory>/<step>/data_state/   JsonSave: input-pipeline position
    <directory>/<step>/config/       JsonSave: experiment config
    <directory>/<step>/metadata/     JsonSave: whatever the caller records (see ``environment_metadata``)
    <directory>/<step>/metrics/      Orbax's own JSON, only when ``keep_best > 0``
    <directory>/averaged/<step>/     ``save_averaged``: {"params", "step"} averaged over the checkpoints up to <step>

Every process of a multi-host job must call ``save``/``restore``/``close`` together; Orbax does all writes
and the cross-host synchronisation, this module writes no file itself.
"""

import dataclasses
import importlib.metadata
import json
import logging
import math
import os
import platform
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import flags
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocp_managers

logger = logging.getLogger(__name__)

PyTree = Any
_JSON_ITEMS = ("data_state", "config", "metadata")
AVERAGED = "averaged"  # the subdirectory (and ``checkpoint=`` name) of averaged parameters
_MAX_LISTED_MISMATCHES = 10


class CheckpointError(RuntimeError):
    """No checkpoint could be restored; the message names the directory and what went wrong with each step."""


class CheckpointMismatchError(ValueError):
    """The restore target does not match the checkpoint; the message names each parameter path and shape.

    Deliberately not a ``CheckpointError``: a loop that starts afresh on ``CheckpointError`` must not
    silently discard a run because its model config changed.
    """


@dataclasses.dataclass(frozen=True)
class Restored:
    """What ``Checkpointer.restore`` returns.

    Attributes:
      step: the checkpoint's step (the directory name).
      state: the state pytree, with the target's structure, dtypes and shardings.
      data_state: the input pipeline's JSON state (``{}`` when none was saved).
      config: the experiment config (``{}`` when none was saved).
      metadata: the caller's metadata (``{}`` when none was saved).
    """

    step: int
    state: PyTree
    data_state: dict
    config: dict
    metadata: dict


def environment_metadata() -> dict:
    """Versions of Python and the libraries that decide what a checkpoint contains, for ``save(metadata=...)``.

    Returns:
      ``{"python": "3.11.7", "jax": ..., "jaxlib": ..., "flax": ..., "optax": ..., "orbax-checkpoint": ...,
      "numpy": ...}``; a library that is not installed maps to ``None``.

    Example:
      >>> sorted(environment_metadata())
      ['flax', 'jax', 'jaxlib', 'numpy', 'optax', 'orbax-checkpoint', 'python']
    """
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


class _TolerantManager(ocp.CheckpointManager):
    """A ``CheckpointManager`` whose start-up survives one step's unreadable metrics file.

    Orbax reads every step's metrics when it is constructed and only tolerates a *missing* file; a truncated
    one would make the whole directory unusable, including its good checkpoints.
    """

    def metrics(self, step: int) -> PyTree | None:
        try:
            return super().metrics(step)
        except (ValueError, OSError) as error:  # json.JSONDecodeError is a ValueError
            logger.warning("ignoring unreadable metrics of checkpoint step %d: %s", step, _describe(error))
            return None


class _QuietUnrankedSaves(logging.Filter):
    """Drops Orbax's warnings for what this module does by design: a save without metrics (steps between
    evaluations have none) and a read-only directory (every reader opens one)."""

    _EXPECTED = ("did not provide metrics", "is read only", "read_only=True, setting")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self._EXPECTED)


logging.getLogger("absl").addFilter(_QuietUnrankedSaves())


def _use_coordination_barriers() -> None:
    """Makes Orbax synchronise processes through the coordination service rather than a device collective.

    A collective barrier fails when one process arrives more than 30 s after another (see
    ``hosts.barrier``): creating the checkpoint directory while another process still compiles is enough.
    Orbax reads this as an absl flag; attn-jax parses no absl flags, so it is set directly.
    """
    flag = flags.FLAGS["experimental_orbax_use_distributed_barrier"]
    flag.value, flag.present = True, 1


class Checkpointer:
    """Saves and restores the training state with retention, async writes and fallback past corrupt steps.

    Retention keeps the newest ``max_to_keep`` steps *and* the ``keep_best`` steps with the best
    ``metrics[best_metric]`` (Orbax's ``AnyPreservationPolicy(LatestN, BestN)``); old steps are deleted only
    after a newer save has committed, so the newest good checkpoint is never removed. The
    ``<step>.orbax-checkpoint-tmp*`` directories that interrupted saves leave are never listed as steps and are
    removed when a writable ``Checkpointer`` opens the directory (so evaluators open it with ``read_only=True``,
    or read through ``read_params``, while a trainer is writing).

    Args:
      directory: root directory (local path or ``gs://...``); created if missing unless ``read_only``.
      max_to_keep: how many of the newest steps to keep, at least 1.
      keep_best: how many of the best steps to keep in addition; 0 disables it (and metrics are not stored).
      best_metric: key of ``save(metrics=...)`` that ranks steps; steps without it rank worst.
      best_mode: ``"max"`` (e.g. BLEU) or ``"min"`` (e.g. loss).
      save_interval_steps: ``save`` writes only every this many steps unless ``force=True``.
      async_save: write in a background thread after copying the arrays to host (Orbax's
        ``AsyncCheckpointer``); the arrays may be donated once ``save`` returns. Call ``wait`` before reading.
      read_only: never write, create or delete anything (evaluation, translation, averaging). A read-only
        ``restore`` may name any part of the saved state (e.g. only ``{"params": ...}``): the rest is not read.

    Example:
      >>> import tempfile
      >>> state = {"params": {"w": jnp.ones((2, 3))}, "step": jnp.array(7, jnp.int32)}
      >>> with Checkpointer(tempfile.mkdtemp()) as ckpt:
      ...     ckpt.save(7, state, config={"lr": 0.1})
      ...     ckpt.wait()
      ...     restored = ckpt.restore(jax.eval_shape(lambda: state))
      True
      >>> restored.step, restored.config, restored.state["params"]["w"].shape
      (7, {'lr': 0.1}, (2, 3))
    """

    def __init__(
        self,
        directory,
        *,
        max_to_keep: int = 3,
        keep_best: int = 0,
        best_metric: str = "bleu",
        best_mode: str = "max",
        save_interval_steps: int = 1,
        async_save: bool = True,
        read_only: bool = False,
    ):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be at least 1 so the newest checkpoint survives, got {max_to_keep}")
        if keep_best < 0:
            raise ValueError(f"keep_best must be non-negative, got {keep_best}")
        if best_mode not in ("max", "min"):
            raise ValueError(f'best_mode must be "max" or "min", got {best_mode!r}')
        self.directory = _absolute(directory)
        if jax.process_count() > 1:
            _use_coordination_barriers()
        self._corrupt_steps: set[int] = set()
        worst = -math.inf if best_mode == "max" else math.inf

        def metric(metrics: dict) -> float:
            return float(metrics.get(best_metric, worst))

        policies: list = [ocp_managers.LatestN(n=max_to_keep)]
        if keep_best:
            policies.append(
                ocp_managers.BestN(
                    get_metric_fn=metric,
                    reverse=best_mode == "min",
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            # Orbax writes metrics only when best_fn is set; the preservation policy does the ranking.
            best_fn=metric if keep_best else None,
            best_mode=best_mode,
            preservation_policy=ocp_managers.AnyPreservationPolicy(policies),
            # Orbax rewrites a read-only manager's options with a logged warning; ask for them directly.
            save_interval_steps=0 if read_only else save_interval_steps,
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=async_save,
            read_only=read_only,
            create=not read_only,
        )
        self._read_only = read_only
        # A reader restores a subset of the state (PyTreeRestore's partial restore); StandardSave's files are
        # PyTree checkpoints, so either handler reads them.
        handlers = {"state": ocp.PyTreeCheckpointHandler() if read_only else ocp.StandardCheckpointHandler()}
        handlers.update({name: ocp.JsonCheckpointHandler() for name in _JSON_ITEMS})
        self._manager = _TolerantManager(
            self.directory, options=options, item_names=tuple(handlers), item_handlers=handlers
        )

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def save(
        self,
        step: int,
        state: PyTree,
        *,
        data_state: dict | None = None,
        config: dict | None = None,
        metadata: dict | None = None,
        metrics: dict | None = None,
        force: bool = False,
    ) -> bool:
        """Starts saving ``state`` and the JSON side items as checkpoint ``step``.

        Args:
          step: the training step; must exceed the newest saved step.
          state: pytree of arrays, e.g. ``{"params", "opt_state", "step", "rng"}`` (``rng`` as
            ``jax.random.key_data``: Orbax stores plain arrays).
          data_state: JSON-serialisable input-pipeline state.
          config: JSON-serialisable experiment config (e.g. ``ConfigDict.to_dict()``).
          metadata: JSON-serialisable facts about the run, e.g. ``environment_metadata()`` and a data fingerprint.
          metrics: numbers used to rank the step when ``keep_best > 0``.
          force: save even if ``step`` is not a multiple of ``save_interval_steps``.

        Returns:
          Whether a save was started (False when the interval skips ``step``).

        Raises:
          TypeError: a side item or metric is not JSON-serialisable (checked now, not in the background).
        """
        self._discard_corrupt_steps(from_step=step)
        items = {"data_state": data_state, "config": config, "metadata": metadata}
        args = {name: ocp.args.JsonSave(_checked_json(name, value or {})) for name, value in items.items()}
        if metrics is not None:
            metrics = _checked_json("metrics", {key: _plain_scalar(value) for key, value in metrics.items()})
        return self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), **args),
            metrics=metrics,
            force=force,
        )

    def restore(self, target: PyTree, *, step: int | None = None) -> Restored:
        """Restores the newest readable checkpoint (or ``step``) into the structure of ``target``.

        A step whose files are missing, truncated or unparsable is reported with ``logging.warning`` and the
        next older step is tried. Nothing is deleted here; ``save`` later removes such a step once the run has
        come back to it, so that the new copy can be written.

        Args:
          target: abstract state from ``jax.eval_shape``, ideally ``jax.ShapeDtypeStruct`` leaves with
            ``sharding=`` so arrays come back sharded as training needs them (concrete arrays work too).
            Namedtuples of optax states are rebuilt from the target, not from the checkpoint.
          step: restore exactly this step, without falling back.

        Returns:
          A ``Restored`` with the state cast to the target's dtypes.

        Raises:
          CheckpointMismatchError: the target's parameter paths or shapes differ from the checkpoint's.
          CheckpointError: no checkpoint (or not ``step``) could be restored.
        """
        self.wait()
        available = self.all_steps()
        if step is not None and step not in available:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; it has steps {available}")
        failures = []
        for candidate in [step] if step is not None else reversed(available):
            try:
                return self._restore_step(candidate, target)
            except CheckpointMismatchError:
                raise
            except Exception as error:  # TensorStore raises bare Exception for unreadable chunks.
                logger.warning(
                    "checkpoint step %d in %s is unreadable: %s", candidate, self.directory, _describe(error)
                )
                self._corrupt_steps.add(candidate)
                failures.append(f"step {candidate}: {_describe(error)}")
        tried = "; ".join(failures) or "no checkpoints found"
        raise CheckpointError(f"no restorable checkpoint in {self.directory} ({tried})")

    def reached_preemption(self, step: int) -> bool:
        """Whether every process has reached the step at which to save after a SIGTERM on any of them (JAX's
        preemption sync through the coordination service; always False on one process). Call it every step."""
        return self._manager.reached_preemption(step)

    def latest_step(self) -> int | None:
        """Returns the newest committed (or in-flight async) step, or None for an empty directory."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Returns every kept step in increasing order."""
        return sorted(self._manager.all_steps())

    def wait(self) -> None:
        """Blocks until background saves have committed; re-raises their errors."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for background saves and releases Orbax's threads."""
        self._manager.close()

    def _restore_step(self, step: int, target: PyTree) -> Restored:
        saved = self._manager.item_metadata(step)["state"]
        if saved is None:
            raise FileNotFoundError(f"state metadata of step {step} is missing")
        where = f"step {step} in {self.directory}"
        _check_shapes(getattr(saved, "tree", saved), target, where=where, partial=self._read_only)
        json_args = {name: ocp.args.JsonRestore() for name in _JSON_ITEMS}
        target = _placed(target)
        if self._read_only:
            restore_args = jax.tree.map(
                lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype), target
            )
            state = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        else:
            state = ocp.args.StandardRestore(target)
        items = self._manager.restore(step, args=ocp.args.Composite(state=state, **json_args))
        return Restored(step=step, state=items["state"], **{name: items[name] for name in _JSON_ITEMS})

    def _discard_corrupt_steps(self, *, from_step: int) -> None:
        # After falling back past an unreadable step, the run re-creates it; Orbax would otherwise refuse to
        # save any step up to it. Only steps that failed to restore in this process are ever removed here.
        for step in sorted(self._corrupt_steps):
            if step >= from_step and step in self._manager.all_steps():
                logger.warning("deleting unreadable checkpoint step %d in %s before re-saving", step, self.directory)
                self._manager.delete(step)
                self._corrupt_steps.discard(step)


def _placed(target: PyTree) -> PyTree:
    """``target`` with every abstract leaf that names no sharding placed on the first local device.

    Without a sharding Orbax re-creates the saving run's device layout, which fails ("topology mismatch") when a
    checkpoint written on 8 devices is read on 1.
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def place(leaf):
        if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device)
        return leaf

    return jax.tree.map(place, target)


def average_checkpoints(
    directory, params_target: PyTree, *, last: int, min_gap: int = 0, until: int | None = None
) -> tuple[PyTree, list[int]]:
    """Averages the parameters of the newest ``last`` readable checkpoints (paper §6.1: 5 for base, 20 for big).

    Only the parameters are read, read-only; floating-point leaves are accumulated in float32 and cast back,
    others are the newest checkpoint's. Unreadable steps are skipped with a warning. One checkpoint is held in
    memory at a time besides the running sum. Retention must keep enough steps: ``max_to_keep >= last``.

    Args:
      directory: the ``Checkpointer`` directory.
      params_target: abstract parameters as for ``Checkpointer.restore``.
      last: how many of the newest checkpoints to average.
      min_gap: as for ``save_averaged``.
      until: only checkpoints at or before this step (the run as it was then); None: all.

    Returns:
      ``(params, steps)``: the averaged parameters, and the steps used in increasing order.

    Raises:
      CheckpointError: no checkpoint is readable.
      CheckpointMismatchError: as for ``Checkpointer.restore``.
    """
    _, params, steps = _average(directory, params_target, last=last, min_gap=min_gap, until=until)
    return params, steps


def save_averaged(
    directory, params_target: PyTree, *, last: int, min_gap: int = 0, until: int | None = None, max_to_keep: int = 3
) -> list[int]:
    """Averages the newest ``last`` checkpoints and writes ``{"params", "step"}`` to ``<directory>/averaged/<step>``.

    The averaged checkpoint lives in its own subdirectory, under the newest averaged step, so the training
    run's ``latest_step``, retention and resumption never see it; read it with ``read_params(directory,
    target, checkpoint="averaged")``. Its metadata gains ``"averaged_steps"``; ``config`` is the newest
    checkpoint's. Replaces existing averaged checkpoints at the same or a later step (``until``), so the average
    just written is the one ``read_params`` reads. Nothing else in ``directory`` is written, created or deleted.

    Args:
      directory: the training run's checkpoint directory.
      params_target: abstract parameters as for ``Checkpointer.restore``.
      last: how many of the newest checkpoints to average.
      min_gap: skip a checkpoint fewer than this many steps before the next newer one taken (a run stopped by
        its time budget just after a periodic save would otherwise weigh its end twice).
      until: only checkpoints at or before this step; None: all.
      max_to_keep: how many averaged checkpoints to keep.

    Returns:
      The steps averaged, in increasing order; the checkpoint is written under the last of them.
    """
    newest, params, steps = _average(directory, params_target, last=last, min_gap=min_gap, until=until)
    metadata = {**newest.metadata, "averaged_steps": steps}
    state = {"params": params, "step": jnp.asarray(newest.step, jnp.int32)}
    with Checkpointer(_join(directory, AVERAGED), max_to_keep=max_to_keep, async_save=False) as averaged:
        for step in averaged.all_steps():  # a newer average would shadow this one for read_params
            if step >= newest.step:
                averaged._manager.delete(step)
        averaged.save(newest.step, state, config=newest.config, metadata=metadata, force=True)
    return steps


def read_params(directory, params_target: PyTree, *, checkpoint: str | int = "latest") -> Restored:
    """Reads only the parameters of one checkpoint, read-only (evaluators next to a running trainer).

    Args:
      directory: the training run's checkpoint directory.
      params_target: abstract parameters (``jax.ShapeDtypeStruct`` leaves, with shardings where wanted).
      checkpoint: ``"latest"`` (the newest readable step, falling back past unreadable ones), ``"averaged"``
        (the newest checkpoint ``save_averaged`` wrote) or a step number.

    Returns:
      A ``Restored`` whose ``state`` is ``{"params": ...}``.

    Raises:
      CheckpointError: the directory or the step does not exist, or nothing is readable.
      CheckpointMismatchError: ``params_target`` does not match the checkpoint's parameters.
    """
    directory = _absolute(directory)
    if checkpoint == AVERAGED:
        directory = directory / AVERAGED
    if not directory.is_dir():
        hint = ": run `attn-jax average` first" if checkpoint == AVERAGED else ": train first"
        raise CheckpointError(f"no checkpoints in {directory}{hint}")
    step = None if checkpoint in ("latest", AVERAGED) else int(checkpoint)
    with Checkpointer(directory, read_only=True) as reader:
        return reader.restore({"params": params_target}, step=step)


def _average(
    directory, params_target: PyTree, *, last: int, min_gap: int, until: int | None = None
) -> tuple[Restored, PyTree, list[int]]:
    if last < 1:
        raise ValueError(f"last must be at least 1, got {last}")
    target = {"params": params_target}
    with Checkpointer(directory, read_only=True) as checkpointer:
        newest, total, steps = None, None, []
        for step in sorted(checkpointer.all_steps(), reverse=True):
            if (until is not None and step > until) or (steps and steps[-1] - step < min_gap):
                continue
            try:
                restored = checkpointer.restore(target, step=step)
            except CheckpointError:
                continue  # restore has logged why
            if newest is None:
                newest = restored
            params = jax.tree.map(_to_accumulator, restored.state["params"])
            total = params if total is None else jax.tree.map(jnp.add, total, params)
            steps.append(step)
            if len(steps) == last:
                break
    if newest is None:
        at = f" at or before step {until}" if until is not None else ""
        raise CheckpointError(f"no restorable checkpoint{at} to average in {directory}")
    if len(steps) < last:
        logger.warning("averaging %d checkpoints (steps %s) instead of %d in %s", len(steps), steps, last, directory)
    averaged = jax.tree.map(lambda s, p: _mean(s, p, len(steps)), total, newest.state["params"])
    return newest, averaged, sorted(steps)


def _is_float(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def _to_accumulator(x):
    # Summing 20 bfloat16 checkpoints in bfloat16 would lose the low bits the average is made of.
    return x.astype(jnp.float32) if _is_float(x) else x


def _mean(total, newest, count: int):
    # Non-float leaves (if any) are not averaged: the newest checkpoint's value is kept.
    return (total / count).astype(newest.dtype) if _is_float(newest) else newest


def _check_shapes(saved: PyTree, target: PyTree, *, where: str, partial: bool = False) -> None:
    """Raises ``CheckpointMismatchError`` listing every path whose shape differs or that only one side has
    (``partial``: only the target's paths are compared, the checkpoint may hold more)."""

    def shapes(tree) -> dict:
        leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
        return {
            _path_names(path): (jax.tree_util.keystr(path), tuple(getattr(leaf, "shape", ()))) for path, leaf in leaves
        }

    saved_shapes, target_shapes = shapes(saved), shapes(target)
    problems = []
    for key, (name, shape) in target_shapes.items():
        if key not in saved_shapes:
            problems.append(f"{name}: not in the checkpoint (target {shape})")
        elif saved_shapes[key][1] != shape:
            problems.append(f"{name}: checkpoint {saved_shapes[key][1]} vs target {shape}")
    # A partial target names whole top-level items (e.g. "params"); within those, both sides must agree.
    compared = {key[:1] for key in target_shapes} if partial else None
    for key, (name, shape) in saved_shapes.items():
        if key not in target_shapes and (compared is None or key[:1] in compared):
            problems.append(f"{name}: only in the checkpoint {shape}")
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED_MISMATCHES])
        more = len(problems) - _MAX_LISTED_MISMATCHES
        suffix = f"\n  ... and {more} more" if more > 0 else ""
        raise CheckpointMismatchError(f"restore target does not match checkpoint {where}:\n  {listed}{suffix}")


def _path_names(path) -> tuple[str, ...]:
    # Orbax's metadata turns namedtuples into dicts and tuples into lists; compare by names and indices only.
    return tuple(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)


def _checked_json(name: str, value: dict) -> dict:
    try:
        json.dumps(value)
    except TypeError as error:
        raise TypeError(f"checkpoint item {name!r} must be JSON-serialisable: {error}") from error
    return value


def _plain_scalar(value):
    # Metrics usually arrive as numpy or jax scalars, which JSON cannot encode.
    return float(value) if getattr(value, "ndim", None) == 0 else value


def _describe(error: BaseException, limit: int = 300) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= limit else text[:limit] + "..."


def _absolute(directory) -> epath.Path:
    """Orbax wants absolute paths; a URL (``gs://...``) stays a URL (``epath`` keeps its scheme)."""
    directory = epath.Path(directory)
    return directory if _is_url(directory) else epath.Path(os.path.abspath(directory))


def _is_url(path) -> bool:
    return "://" in os.fspath(path)


def _join(directory, name: str) -> epath.Path:
    return _absolute(directory) / name
