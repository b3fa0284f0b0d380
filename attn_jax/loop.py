"""``train_and_evaluate``: the loop that turns an experiment config into a trained, checkpointed model.

Set-up (mesh, data, model, optimiser), then either a fresh sharded initialisation or a restore of the newest
good checkpoint with the data iterator's position, then steps. The host fetches metrics every ``log_every``
steps only, evaluates every ``eval_every`` and checkpoints every ``checkpoint_every`` steps, on SIGTERM and at
the end. Only process 0 writes logs and plots.
"""

import dataclasses
import functools
import json
import logging
import pathlib
import signal
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from attn_jax import checkpoint as ckpt_lib
from attn_jax import config as config_lib
from attn_jax import parallel
from attn_jax.data.datasets import build_datasets
from attn_jax.evaluate import evaluate_loss, translation_quality
from attn_jax.metrics import MetricsWriter, ProgressBar
from attn_jax.optim import make_optimizer, rsqrt_warmup_schedule
from attn_jax.report import final_report
from attn_jax.train import TrainState, eval_step, init_train_state, train_step

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """The loss or a gradient was NaN or Inf (the update was not applied)."""


@dataclasses.dataclass
class Steps:
    """The compiled steps for one parallel strategy and how to move state and batches onto the devices."""

    train: Callable
    evaluate: Callable
    put_batch: Callable
    put_state: Callable
    get_state: Callable  # device state -> state with global arrays (for checkpoints and decoding)
    mesh: Mesh | None = None  # what decoding shards its batch over (None: pmap's state is per device)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains ``config`` in ``workdir``, resuming from its newest good checkpoint; returns the final metrics.

    On SIGTERM it checkpoints at the next step boundary and returns ``{}`` without the final evaluation.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    chief = jax.process_index() == 0

    # ---------------------------------------------------------------- set-up
    mesh = parallel.make_mesh({a: config.parallel[a] for a in parallel.MESH_AXES})
    datasets = build_datasets(config, workdir, batch_multiple=parallel.batch_divisor(mesh))
    model_config = config_lib.model_config(config, vocab_size=datasets.vocab_size)
    if chief:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
        log.info("model: %s", model_config)
        log.info("data: %s", _data_summary(datasets.report))
    schedule = rsqrt_warmup_schedule(
        model_config.d_model, config.train.warmup_steps, scale=config.train.learning_rate_scale
    )
    tx = _optimizer(config.train, schedule)
    steps = compile_steps(config, model_config, tx, mesh)
    writer = MetricsWriter(workdir)
    checkpointer = _checkpointer(config, workdir, datasets)
    stop = _StopSignal()
    try:  # a run that dies still closes its metrics and lets pending checkpoint saves commit
        init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
        state, dropout_rng = _restore_or_init(
            config, model_config, tx, mesh, checkpointer, datasets, init_rng, dropout_rng
        )
        device_state, step = _train(
            config, model_config, steps, steps.put_state(state), dropout_rng, datasets, schedule, writer,
            checkpointer, stop, workdir,
        )  # fmt: skip
        if stop.requested:  # preempted: the checkpoint is saved; evaluating now could outlast the grace period
            log.warning("SIGTERM: checkpointed step %d and stopped; rerun the same command to resume", step)
            return {}
        if step < config.train.steps:
            log.warning("stopped early at step %d (time budget)", step)
        # The test split is scored in full by the final report; validation BLEU stays on its usual subset.
        results = _evaluate(config, model_config, steps, device_state, datasets, writer, step, bleu_limit=True)
        final_report(
            config, model_config, steps.get_state(device_state).params, datasets, workdir, results, mesh=steps.mesh
        )
        return results
    finally:
        writer.close()
        checkpointer.close()
        stop.restore()


def _train(
    config, model_config, steps, device_state, dropout_rng, datasets, schedule, writer, checkpointer, stop, workdir
):
    """Steps until ``config.train.steps``, a signal or the time budget; returns ``(device_state, step)``."""
    step = int(jax.device_get(steps.get_state(device_state).step))
    metadata = _run_metadata(datasets)

    def save(step, metrics=None, force=False):
        tree = _to_checkpoint(steps.get_state(device_state), dropout_rng, steps.mesh)
        checkpointer.save(
            step, tree, data_state=datasets.train.get_state(), config=json.loads(config.to_json_best_effort()),
            metadata=metadata, metrics=metrics, force=force,
        )  # fmt: skip

    total = config.train.steps
    budget = config.train.time_budget_minutes
    deadline = time.monotonic() + 60 * budget if budget else None
    bar = ProgressBar(total, initial_step=step, enabled=jax.process_index() == 0, deadline=deadline)
    pending: list[tuple[int, dict, dict]] = []  # (step, device metrics, host batch) since the last fetch
    tokens_since, time_since = 0, time.perf_counter()
    skips = 0
    while step < total:
        batch = next(datasets.train)
        device_state, metrics = steps.train(device_state, steps.put_batch(batch), dropout_rng)
        step += 1
        tokens_since += int(np.count_nonzero(batch["targets_out"]))
        pending.append((step, metrics, batch))
        last = step == total or stop.requested or (deadline is not None and time.monotonic() > deadline)
        saving = step % config.train.checkpoint_every == 0 or last
        # Before every save too: under "raise" no checkpoint is written past a non-finite step.
        if step % config.train.log_every == 0 or saving:
            skips = _check_finite(pending, config.train, skips, workdir)
            train_metrics = _summarise(pending, schedule)
            train_metrics["tokens_per_second"] = tokens_since / max(time.perf_counter() - time_since, 1e-9)
            writer.write(step, train_metrics, split="train")
            bar.update(step, loss=train_metrics["loss"], learning_rate=train_metrics["learning_rate"],
                       tokens_per_second=train_metrics["tokens_per_second"])  # fmt: skip
            pending, tokens_since, time_since = [], 0, time.perf_counter()
        eval_metrics = None
        if step % config.train.eval_every == 0 and not last:
            eval_metrics = _evaluate(config, model_config, steps, device_state, datasets, writer, step, bleu_limit=True)
        if saving:
            save(step, metrics=eval_metrics, force=last)
        if last:
            break
    bar.close()
    checkpointer.wait()
    return device_state, step


def _checkpointer(config, workdir: pathlib.Path, datasets) -> ckpt_lib.Checkpointer:
    return ckpt_lib.Checkpointer(
        workdir / "checkpoints",
        max_to_keep=config.train.keep_checkpoints,
        keep_best=config.train.keep_best,
        best_metric="exact_match" if datasets.tokenizer is None else "bleu",
    )


def _optimizer(train_config, schedule):
    return make_optimizer(
        schedule,
        b1=train_config.b1,
        b2=train_config.b2,
        eps=train_config.eps,
        grad_clip_norm=train_config.grad_clip_norm or None,
        weight_decay=train_config.weight_decay,
        accumulation_steps=train_config.accumulation_steps,
    )


def compile_steps(config, model_config, tx, mesh) -> Steps:
    """Jitted (sharded over ``mesh``) or pmapped (``config.parallel.strategy``) ``train_step``/``eval_step``.

    Both wrap the one pure step; they differ only in how state and batches are placed on the devices.
    """
    train_fn = functools.partial(
        train_step, model_config=model_config, tx=tx, label_smoothing=config.train.label_smoothing
    )
    eval_fn = functools.partial(eval_step, model_config=model_config)
    if config.parallel.strategy == "pmap":
        return _pmap_steps(train_fn, eval_fn)
    if config.parallel.strategy != "jit":
        raise config_lib.ConfigError(
            f"config.parallel.strategy: expected 'jit' or 'pmap', got {config.parallel.strategy!r}"
        )

    def put_state(state):
        shardings = parallel.state_shardings(jax.eval_shape(lambda: state), mesh, tx)
        return jax.device_put(state, shardings)

    return Steps(
        train=parallel.lockstep(jax.jit(train_fn, donate_argnums=0), "train_step"),
        evaluate=parallel.lockstep(jax.jit(eval_fn), "eval_step"),
        put_batch=functools.partial(parallel.put_global_batch, mesh=mesh),
        put_state=put_state,
        get_state=lambda state: state,
        mesh=mesh,
    )


def _pmap_steps(train_fn, eval_fn) -> Steps:
    axis = "batch"
    count = jax.local_device_count()

    def split(batch):
        # [B, ...] -> [devices, B / devices, ...]
        return jax.tree.map(lambda x: x.reshape(count, x.shape[0] // count, *x.shape[1:]), batch)

    train = jax.pmap(functools.partial(train_fn, axis_name=axis), axis_name=axis, donate_argnums=0,
                     in_axes=(0, 0, None))  # fmt: skip
    train = parallel.lockstep(train, "train_step")
    evaluate = parallel.lockstep(jax.pmap(functools.partial(eval_fn, axis_name=axis), axis_name=axis), "eval_step")
    return Steps(
        train=lambda state, batch, rng: _first_metrics(train(state, batch, rng)),
        evaluate=lambda params, batch: jax.tree.map(lambda x: x[0], evaluate(params, batch)),
        put_batch=split,
        put_state=lambda state: _replicate(jax.tree.map(lambda x: jnp.stack([x] * count), state)),
        get_state=lambda state: jax.tree.map(lambda x: x[0], state),
    )


# [devices, ...] host or single-device arrays -> one slice per device, as pmap keeps its state.
_replicate = jax.pmap(lambda tree: tree)


def _first_metrics(result):
    state, metrics = result
    return state, jax.tree.map(lambda x: x[0], metrics)  # psum-ed already: every replica holds the total


def _restore_or_init(config, model_config, tx, mesh, checkpointer, datasets, init_rng, dropout_rng):
    """``(state, dropout_rng)``: restored from the newest good checkpoint, else freshly initialised, sharded."""
    init = functools.partial(init_train_state, model_config=model_config, tx=tx, task=config.task)
    abstract = jax.eval_shape(init, init_rng)
    shardings = parallel.state_shardings(abstract, mesh, tx)
    if checkpointer.latest_step() is None:
        return jax.jit(init, out_shardings=shardings)(init_rng), dropout_rng
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    restored = checkpointer.restore(_to_checkpoint(target, jax.eval_shape(lambda: dropout_rng)))
    if restored.data_state:
        datasets.train.set_state(restored.data_state)
    log.info("resumed from step %d", restored.step)
    _warn_if_changed(restored, config, _run_metadata(datasets))
    tree = restored.state
    state = TrainState(step=jnp.asarray(tree["step"]), params=tree["params"], opt_state=tree["opt_state"])
    # Through the host: a key committed to one device would clash with the state's devices under jit.
    return state, jax.random.wrap_key_data(np.asarray(tree["rng"]))


def _warn_if_changed(restored: ckpt_lib.Restored, config, metadata: dict) -> None:
    """Warns, key by key, where the resumed run's config, library versions or data differ from the checkpoint's."""
    saved_config = config_lib.flatten(restored.config)
    current_config = config_lib.flatten(json.loads(config.to_json_best_effort()))
    for label, saved, current in (
        ("config", saved_config, current_config),
        ("metadata", restored.metadata, metadata),
    ):
        if not saved:
            continue  # written by a caller that recorded none
        for key in sorted(set(saved) | set(current)):
            if saved.get(key) != current.get(key):
                log.warning(
                    "resuming step %d with %s %s = %r; the checkpoint was written with %r",
                    restored.step, label, key, current.get(key), saved.get(key),
                )  # fmt: skip


def _to_checkpoint(state: TrainState, rng, mesh: Mesh | None = None) -> dict:
    """The saved tree: the state plus the dropout key's raw data (typed keys do not serialise).

    With a ``mesh`` the key data is replicated over it: Orbax saves only global arrays from several processes.
    """
    if isinstance(rng, jax.ShapeDtypeStruct):
        rng_data = jax.ShapeDtypeStruct((2,), jnp.uint32)
    else:
        rng_data = jax.random.key_data(rng)
        if mesh is not None:
            rng_data = jax.device_put(np.asarray(rng_data), NamedSharding(mesh, PartitionSpec()))
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": rng_data}


def _data_summary(report: dict) -> str:
    train = report["train"]
    return (
        f"{train['num_examples']} training pairs: {train['dropped_too_long']} dropped as too long, "
        f"{train['truncated']} truncated, {train['dropped_empty']} empty, "
        f"{train.get('invalid_utf8', 0)} with invalid UTF-8 replaced, {train.get('control_characters', 0)} with "
        f"control characters replaced; {train['batches_per_epoch']} batches per epoch in shapes "
        f"{sorted(set(map(tuple, train['batch_shapes'])))}"
    )


def _run_metadata(datasets) -> dict:
    """What a checkpoint records besides the config: library versions and the data fingerprint."""
    return ckpt_lib.environment_metadata() | {"data_fingerprint": datasets.fingerprint}


def _check_finite(pending, train_config, skips: int, workdir: pathlib.Path) -> int:
    """Applies the non-finite policy to the steps since the last fetch; returns the consecutive-skip count."""
    for step, metrics, batch in pending:
        if float(metrics["finite"]) == 1.0:
            skips = 0
            continue
        if train_config.nonfinite == "raise":
            path = _save_batch(workdir, step, batch)
            raise NonFiniteError(
                f"non-finite loss or gradient at step {step} (loss sum {float(metrics['loss'])}); the batch is in "
                f"{path}. The update was not applied and the last checkpoint is intact. Rerun with "
                "--config.train.nonfinite=skip to skip such steps."
            )
        skips += 1
        log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", step, skips)
        if skips > train_config.max_consecutive_skips:
            path = _save_batch(workdir, step, batch)
            raise NonFiniteError(
                f"{skips} consecutive non-finite steps up to step {step} (limit "
                f"train.max_consecutive_skips={train_config.max_consecutive_skips}); the last batch is in {path}"
            )
    return skips


def _save_batch(workdir: pathlib.Path, step: int, batch: dict) -> pathlib.Path:
    """Keeps the batch of a failed step for inspection: ``workdir/nonfinite/step_<N>.npz`` (per process)."""
    suffix = f"_process{jax.process_index()}" if jax.process_count() > 1 else ""
    path = workdir / "nonfinite" / f"step_{step}{suffix}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{key: np.asarray(value) for key, value in batch.items()})
    return path


def _summarise(pending, schedule) -> dict:
    """Token-averaged loss and accuracy of the applied (finite) steps since the last fetch, and the skip count."""
    totals = jax.device_get([m for _, m, _ in pending])
    applied = [m for m in totals if float(m["finite"]) == 1.0]
    sums = {k: sum(float(m[k]) for m in applied) for k in ("loss", "nll", "correct", "weight")}
    weight = max(sums["weight"], 1.0)
    last_step = pending[-1][0]
    return {
        "loss": sums["loss"] / weight if applied else float("nan"),
        "nll": sums["nll"] / weight if applied else float("nan"),
        "accuracy": sums["correct"] / weight if applied else float("nan"),
        "grad_norm": float(np.mean([float(m["grad_norm"]) for m in applied])) if applied else float("nan"),
        "learning_rate": float(schedule(last_step - 1)),
        "skipped_steps": len(totals) - len(applied),
    }


def _evaluate(config, model_config, steps, device_state, datasets, writer, step, *, bleu_limit: bool) -> dict:
    """Validation loss/accuracy/perplexity and, for translation, BLEU (a subset during training)."""
    params = device_state.params
    metrics = evaluate_loss(steps.evaluate, params, map(steps.put_batch, datasets.eval_batches()))
    pairs = datasets.validation_pairs[: config.eval.bleu_examples] if bleu_limit else datasets.validation_pairs
    if config.task == "translation" and pairs:  # bleu_examples = 0: loss only during training
        quality, _ = translation_quality(
            steps.get_state(device_state).params, pairs, datasets.tokenizer, model_config=model_config,
            eval_config=config.eval, batch_multiple=datasets.batch_multiple, mesh=steps.mesh,
        )  # fmt: skip
        metrics |= quality
    writer.write(step, {k: v for k, v in metrics.items() if isinstance(v, int | float)}, split="eval")
    log.info("step %d eval: %s", step, {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
    return metrics


# ---------------------------------------------------------------------------------------------------------
# Reading a finished (or running) workdir: eval, translate, average
# ---------------------------------------------------------------------------------------------------------


def abstract_checkpoint(config, workdir, *, datasets=None):
    """``(model_config, abstract checkpoint tree, datasets)`` for restoring from ``workdir``."""
    datasets = datasets or build_datasets(config, workdir)
    model_config = config_lib.model_config(config, vocab_size=datasets.vocab_size)
    tx = _optimizer(config.train, rsqrt_warmup_schedule(model_config.d_model, config.train.warmup_steps))
    init = functools.partial(init_train_state, model_config=model_config, tx=tx, task=config.task)
    abstract = jax.eval_shape(init, jax.random.key(0))
    return model_config, _to_checkpoint(abstract, jax.eval_shape(lambda: jax.random.key(0))), datasets


def restore_params(config, workdir):
    """``(model_config, params, datasets)`` of the newest good checkpoint in ``workdir``."""
    model_config, target, datasets = abstract_checkpoint(config, workdir)
    checkpointer = _checkpointer(config, pathlib.Path(workdir), datasets)
    if checkpointer.latest_step() is None:
        raise ckpt_lib.CheckpointError(f"no checkpoint in {pathlib.Path(workdir) / 'checkpoints'}: train first")
    restored = checkpointer.restore(target)
    checkpointer.close()
    return model_config, restored.state["params"], datasets


def evaluate_checkpoint(config, workdir) -> dict:
    """Validation loss, accuracy, perplexity and BLEU (or exact match), and test quality, of the newest checkpoint."""
    model_config, params, datasets = restore_params(config, workdir)
    evaluate = jax.jit(functools.partial(eval_step, model_config=model_config))
    results = {"validation": evaluate_loss(evaluate, params, datasets.eval_batches())}
    if config.task == "translation":
        for split, pairs in (("validation", datasets.validation_pairs), ("test", datasets.test_pairs)):
            quality, _ = translation_quality(
                params, pairs, datasets.tokenizer, model_config=model_config, eval_config=config.eval
            )
            results.setdefault(split, {}).update(quality)
    return results


class _StopSignal:
    """Turns SIGTERM into a request to checkpoint at the next step boundary and stop."""

    def __init__(self):
        self.requested = False
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None

    def _handle(self, signum, frame):
        log.warning("SIGTERM: checkpointing at the next step boundary")
        self.requested = True

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
