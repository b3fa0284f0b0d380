"""``train_and_evaluate``: the loop that turns an experiment config into a trained, checkpointed model.

Set-up (mesh, data, model, optimiser), then either a fresh sharded initialisation or a restore of the newest
good checkpoint with the data iterator's position, then optimiser updates (``train.steps`` counts updates, each
of ``train.accumulation_steps`` micro-batches). The host fetches metrics every ``log_every`` updates only,
evaluates every ``eval_every`` and checkpoints every ``checkpoint_every`` updates, on SIGTERM, at the time budget
and at the end. Only process 0 writes logs and plots. The workdir may be a URL (``gs://bucket/run``): every
path is an ``etils.epath.Path``.
"""

import dataclasses
import functools
import itertools
import json
import logging
import signal
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from attn_jax import checkpoint as ckpt_lib
from attn_jax import config as config_lib
from attn_jax import hosts, parallel, runs
from attn_jax.data.datasets import build_datasets
from attn_jax.evaluate import evaluate_loss, translation_quality
from attn_jax.metrics import MetricsWriter, ProgressBar
from attn_jax.optim import make_optimizer, rsqrt_warmup_schedule
from attn_jax.report import final_report
from attn_jax.train import (
    TrainState,
    accumulate_gradients,
    apply_gradients,
    eval_step,
    init_train_state,
    start_accumulation,
    train_step,
)

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """The loss or a gradient was NaN or Inf (the update was not applied)."""


@dataclasses.dataclass
class Steps:
    """The compiled steps for one parallel strategy and how to move state and batches onto the devices.

    ``train(state, batch, rng)`` makes one optimiser update from one batch, or from a list of micro-batches
    (gradient accumulation); put the batch (or the list) with ``put_batch`` first.
    """

    train: Callable
    evaluate: Callable
    put_batch: Callable
    put_state: Callable
    get_state: Callable  # device state -> state with global arrays (for checkpoints and decoding)
    mesh: Mesh | None = None  # what decoding shards its batch over (None: pmap's state is per device)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict:
    """Trains ``config`` in ``workdir`` (a local path or a URL), resuming from its newest good checkpoint;
    returns the final metrics.

    On SIGTERM (on any process) it checkpoints at the next step boundary and returns ``{}`` without the final
    evaluation.
    """
    workdir = epath.Path(workdir)
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
    stopping = _StopDecision(config.train, checkpointer)
    try:  # a run that dies still closes its metrics and lets pending checkpoint saves commit
        init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
        state, dropout_rng = _restore_or_init(
            config, model_config, tx, mesh, checkpointer, datasets, init_rng, dropout_rng
        )
        device_state, step = _train(
            config, model_config, steps, steps.put_state(state), dropout_rng, datasets, schedule, writer,
            checkpointer, stopping, workdir,
        )  # fmt: skip
        if stopping.preempted:  # the checkpoint is saved; evaluating now could outlast the grace period
            log.warning("SIGTERM: checkpointed step %d and stopped; rerun the same command to resume", step)
            return {}
        if step < config.train.steps:
            log.warning("stopped early at step %d (time budget)", step)
        return _finish(config, model_config, steps, device_state, datasets, writer, checkpointer, step, workdir)
    finally:
        writer.close()
        checkpointer.close()
        stopping.close()


def _finish(config, model_config, steps, device_state, datasets, writer, checkpointer, step, workdir) -> dict:
    """The final evaluation: the average of the last checkpoints (``eval.average_last``), the beam size and length
    penalty that score best on validation (``eval.beam_sizes`` x ``eval.alphas``), validation metrics, then the
    report on the test split. The test split is scored in full; validation BLEU on its usual subset."""
    extra = {}
    if config.eval.average_last > 1:
        device_state, extra["averaged_steps"] = _average_last(
            config.eval.average_last, runs.averaging_gap(config.train), steps, device_state, checkpointer
        )
        log.info("evaluating the average of the checkpoints of steps %s", extra["averaged_steps"])
    config, extra["decoding"] = _choose_decoding(config, model_config, steps.get_state(device_state).params, datasets,
                                                 mesh=steps.mesh)  # fmt: skip
    results = _evaluate(config, model_config, steps, device_state, datasets, writer, step, bleu_limit=True) | extra
    params = steps.get_state(device_state).params
    final_report(config, model_config, params, datasets, workdir, results, step=step, writer=writer, mesh=steps.mesh)
    return results


def _average_last(count: int, min_gap: int, steps, device_state, checkpointer) -> tuple:
    """``(device state with the average of the newest ``count`` checkpoints' parameters, the steps averaged)``,
    skipping any saved fewer than ``min_gap`` steps before a newer one (the budget's final save just after a
    periodic one); the average is also written to ``checkpoints/averaged``, where ``attn-jax eval --checkpoint
    averaged`` reads it."""
    state = steps.get_state(device_state)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state.params)
    averaged = ckpt_lib.save_averaged(checkpointer.directory, target, last=count, min_gap=min_gap)
    params = ckpt_lib.read_params(checkpointer.directory, target, checkpoint=ckpt_lib.AVERAGED).state["params"]
    return steps.put_state(state.replace(params=params)), averaged


def _choose_decoding(config, model_config, params, datasets, *, mesh) -> tuple[ml_collections.ConfigDict, dict]:
    """``(config with the chosen eval.beam_size and eval.alpha, what was tried)``: the pair of ``eval.beam_sizes``
    x ``eval.alphas`` with the best BLEU on the validation subset (the configured pair when both are empty)."""
    beams, alphas = config.eval.beam_sizes or (config.eval.beam_size,), config.eval.alphas or (config.eval.alpha,)
    tried = []
    if len(beams) * len(alphas) > 1 and config.task == "translation":
        pairs = datasets.validation_pairs[: config.eval.bleu_examples]
        for beam, alpha in itertools.product(beams, alphas):
            candidate = _with_decoding(config, beam, alpha)
            quality, _ = translation_quality(
                params, pairs, datasets.tokenizer, model_config=model_config, eval_config=candidate.eval,
                batch_multiple=datasets.batch_multiple, mesh=mesh,
            )  # fmt: skip
            tried.append({"beam_size": beam, "alpha": alpha, **quality})
            log.info("validation with beam %d, alpha %.2f: %s", beam, alpha, quality)
        best = max(tried, key=lambda row: row[_quality_key(tried[0])])
        config = _with_decoding(config, best["beam_size"], best["alpha"])
    chosen = {"beam_size": config.eval.beam_size, "alpha": config.eval.alpha}
    return config, chosen | ({"tried": tried} if tried else {})


def _with_decoding(config, beam_size: int, alpha: float) -> ml_collections.ConfigDict:
    config = config.copy_and_resolve_references()
    config.eval.beam_size, config.eval.alpha = beam_size, alpha
    return config


def _quality_key(row: dict) -> str:
    return "bleu" if "bleu" in row else "exact_match"


def _train(
    config, model_config, steps, device_state, dropout_rng, datasets, schedule, writer, checkpointer, stopping, workdir
):
    """Updates until ``config.train.steps``, a signal or the time budget; returns ``(device_state, step)``."""
    train_config = config.train
    step = int(jax.device_get(steps.get_state(device_state).step))
    metadata = _run_metadata(datasets)

    def save(step, metrics=None, force=False):
        tree = _to_checkpoint(steps.get_state(device_state), dropout_rng, steps.mesh)
        checkpointer.save(
            step, tree, data_state=datasets.train.get_state(), config=json.loads(config.to_json_best_effort()),
            metadata=metadata, metrics=metrics, force=force,
        )  # fmt: skip

    total = train_config.steps
    bar = ProgressBar(total, initial_step=step, budget=stopping.budget_seconds, started=stopping.started)
    pending: list[tuple[int, dict, list]] = []  # (step, device metrics, host micro-batches) since the last fetch
    throughput = _Throughput()
    clock = _EvalClock()
    profile = _Profile(train_config.profile_steps, workdir)
    skips = 0
    while step < total:
        profile.maybe_start(step)
        batches = [next(datasets.train) for _ in range(train_config.accumulation_steps)]
        scale = stopping.learning_rate_scale() * _cooldown(step + 1, total, train_config.cooldown_steps)
        device_state, metrics = steps.train(device_state, steps.put_batch(_one_or_list(batches)), dropout_rng, scale)
        step += 1
        throughput.count(batches, metrics)
        profile.maybe_stop(step, metrics)
        pending.append((step, metrics, batches))
        last = step == total or stopping(step)
        saving = step % train_config.checkpoint_every == 0 or last
        # Before every save too: under "raise" no checkpoint is written past a non-finite step.
        if step % train_config.log_every == 0 or saving:
            skips = _check_finite(pending, train_config, skips, workdir)
            train_metrics = _summarise(pending, schedule, scale) | throughput.rate()
            writer.write(step, train_metrics, split="train")
            bar.update(step, loss=train_metrics["loss"], learning_rate=train_metrics["learning_rate"],
                       tokens_per_second=train_metrics.get("tokens_per_second"))  # fmt: skip
            pending = []
        eval_metrics = None
        if step % train_config.eval_every == 0 and not last:
            bleu_every = train_config.bleu_every or train_config.eval_every
            with clock:
                eval_metrics = _evaluate(config, model_config, steps, device_state, datasets, writer, step,
                                         bleu_limit=True, with_bleu=step % bleu_every == 0)  # fmt: skip
            writer.write(step, clock.fractions(), split="eval_time")
            throughput.restart()  # the evaluation's time is not training time
        if saving:
            save(step, metrics=eval_metrics, force=last)
        if last:
            break
    profile.maybe_stop(step, None, final=True)
    bar.close()
    checkpointer.wait()
    return device_state, step


def _cooldown(update: int, total: int, cooldown_steps: int) -> float:
    """The learning-rate multiplier of ``update`` (counted from 1) with ``train.cooldown_steps``: 1, then linear
    towards 0 over the last ``cooldown_steps`` updates before ``train.steps`` (a cool-down, as in
    warmup-stable-decay schedules; it anneals a short run into a sharp minimum)."""
    if not cooldown_steps:
        return 1.0
    return min(max((total - update + 1) / (cooldown_steps + 1), 0.0), 1.0)


def _one_or_list(batches: list[dict]):
    # One batch, or the micro-batches of one accumulated update.
    return batches[0] if len(batches) == 1 else batches


class _Throughput:
    """Real (non-pad) target tokens per second of training, excluding the first update (which compiles) and
    evaluations."""

    def __init__(self):
        self._tokens, self._start, self._compiled = 0, None, False

    def count(self, batches: list[dict], metrics) -> None:
        if not self._compiled:  # the first update's time is mostly compilation: start the clock after it
            jax.block_until_ready(metrics)
            self._compiled = True
            self.restart()
            return
        self._tokens += sum(int(np.count_nonzero(b["targets_out"])) for b in batches)

    def restart(self) -> None:
        self._tokens, self._start = 0, time.perf_counter()

    def rate(self) -> dict:
        if not self._tokens:
            return {}
        rate = {"tokens_per_second": self._tokens / max(time.perf_counter() - self._start, 1e-9)}
        self.restart()
        return rate


class _EvalClock:
    """Wall time spent in evaluations during training, and its fraction of the run's time so far."""

    def __init__(self):
        self._start = time.perf_counter()
        self._evaluating = self._entered = self._last = 0.0

    def __enter__(self):
        self._entered = time.perf_counter()

    def __exit__(self, *exc_info):
        self._last = time.perf_counter() - self._entered
        self._evaluating += self._last

    def fractions(self) -> dict:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        fraction = self._evaluating / elapsed
        return {"seconds": self._last, "total_seconds": self._evaluating, "fraction_of_wall_time": fraction}


class _Profile:
    """A ``jax.profiler`` trace of updates ``start + 1 .. stop`` into ``workdir/profile`` (TensorBoard's profile
    plugin or Perfetto read it); ``train.profile_steps = ()`` traces nothing."""

    def __init__(self, profile_steps, workdir: epath.Path):
        self._steps = tuple(profile_steps)
        self._directory = workdir / "profile"
        self._active = False

    def maybe_start(self, step: int) -> None:
        if self._steps and step == self._steps[0] and not self._active:
            jax.profiler.start_trace(str(self._directory))
            self._active = True

    def maybe_stop(self, step: int, metrics, *, final: bool = False) -> None:
        if self._active and (final or step == self._steps[1]):
            jax.block_until_ready(metrics)  # the trace must hold the device work of its last step
            jax.profiler.stop_trace()
            self._active = False
            log.info("profile of steps %d-%d written to %s", self._steps[0] + 1, step, self._directory)


def _checkpointer(config, workdir: epath.Path, datasets) -> ckpt_lib.Checkpointer:
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
    )


def compile_steps(config, model_config, tx, mesh) -> Steps:
    """Jitted (sharded over ``mesh``) or pmapped (``config.parallel.strategy``) ``train_step``/``eval_step``.

    Both wrap the one pure step; they differ only in how state and batches are placed on the devices. With
    ``train.accumulation_steps > 1`` an update runs ``accumulate_gradients`` per micro-batch, then
    ``apply_gradients``.
    """
    common = {"model_config": model_config, "label_smoothing": config.train.label_smoothing}

    # The learning-rate scale is positional: pmap maps keyword arguments over devices.
    def train_fn(state, batch, rng, scale, axis_name=None):
        return train_step(state, batch, rng, tx=tx, axis_name=axis_name, learning_rate_scale=scale, **common)

    def apply_fn(state, grads, sums, scale, axis_name=None):
        return apply_gradients(state, grads, sums, tx=tx, axis_name=axis_name, learning_rate_scale=scale)

    accumulate_fn = functools.partial(accumulate_gradients, **common)
    eval_fn = functools.partial(eval_step, model_config=model_config)
    if config.parallel.strategy == "pmap":
        return _pmap_steps(train_fn, accumulate_fn, apply_fn, eval_fn)
    if config.parallel.strategy != "jit":
        raise config_lib.ConfigError(
            f"config.parallel.strategy: expected 'jit' or 'pmap', got {config.parallel.strategy!r}"
        )

    def put_state(state):
        shardings = parallel.state_shardings(jax.eval_shape(lambda: state), mesh, tx)
        return jax.device_put(state, shardings)

    train = _accumulating(
        parallel.lockstep(jax.jit(train_fn, donate_argnums=0), "train_step"),
        parallel.lockstep(jax.jit(start_accumulation), "start_accumulation"),
        parallel.lockstep(jax.jit(accumulate_fn, donate_argnums=0), "accumulate_gradients"),
        parallel.lockstep(jax.jit(apply_fn, donate_argnums=0), "apply_gradients"),
    )
    return Steps(
        train=train,
        evaluate=parallel.lockstep(jax.jit(eval_fn), "eval_step"),
        put_batch=functools.partial(parallel.put_global_batch, mesh=mesh),
        put_state=put_state,
        get_state=lambda state: state,
        mesh=mesh,
    )


def _accumulating(train, start, accumulate, apply) -> Callable:
    """``train(state, batch, rng, scale=1)`` for one batch; a list of micro-batches accumulates, then updates
    once; ``scale`` multiplies the learning rate."""

    def step(state, batch, rng, scale=1.0):
        scale = np.float32(scale)
        if not isinstance(batch, list):
            return train(state, batch, rng, scale)
        sums = start(state.params)
        for index, micro_batch in enumerate(batch):
            sums = accumulate(sums, state.params, micro_batch, rng, state.step, np.int32(index))
        return apply(state, *sums, scale)

    return step


def _pmap_steps(train_fn, accumulate_fn, apply_fn, eval_fn) -> Steps:
    axis = "batch"
    count = jax.local_device_count()

    def split(batch):
        # [B, ...] -> [devices, B / devices, ...]
        return jax.tree.map(lambda x: x.reshape(count, x.shape[0] // count, *x.shape[1:]), batch)

    def put_state(state):
        # pmap keeps one copy per local device, made from host arrays (the global state may be sharded).
        host = jax.tree.map(parallel.fetch_global, state)
        return _replicate(jax.tree.map(lambda x: np.stack([x] * count), host))

    pmapped = functools.partial(jax.pmap, axis_name=axis)
    train = _accumulating(
        parallel.lockstep(
            pmapped(functools.partial(train_fn, axis_name=axis), donate_argnums=0, in_axes=(0, 0, None, None)),
            "train_step",
        ),  # fmt: skip
        parallel.lockstep(pmapped(start_accumulation), "start_accumulation"),
        parallel.lockstep(
            pmapped(
                functools.partial(accumulate_fn, axis_name=axis), donate_argnums=0, in_axes=(0, 0, 0, None, 0, None)
            ),
            "accumulate_gradients",
        ),  # fmt: skip
        parallel.lockstep(
            pmapped(functools.partial(apply_fn, axis_name=axis), donate_argnums=0, in_axes=(0, 0, 0, None)),
            "apply_gradients",
        ),
    )
    evaluate = parallel.lockstep(pmapped(functools.partial(eval_fn, axis_name=axis)), "eval_step")
    return Steps(
        train=lambda *args: _first_metrics(train(*args)),
        evaluate=lambda params, batch: jax.tree.map(lambda x: x[0], evaluate(params, batch)),
        put_batch=split,
        put_state=put_state,
        get_state=lambda state: jax.tree.map(lambda x: x[0], state),
    )


# [devices, ...] host arrays -> one slice per device, as pmap keeps its state.
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


def abstract_checkpoint(config: ml_collections.ConfigDict):
    """``(model_config, abstract checkpoint tree)`` of a training run of ``config``: what its checkpoints hold."""
    model_config = config_lib.model_config(config)
    tx = _optimizer(config.train, rsqrt_warmup_schedule(model_config.d_model, config.train.warmup_steps))
    init = functools.partial(init_train_state, model_config=model_config, tx=tx, task=config.task)
    abstract = jax.eval_shape(init, jax.random.key(0))
    return model_config, _to_checkpoint(abstract, jax.eval_shape(lambda: jax.random.key(0)))


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


def _check_finite(pending, train_config, skips: int, workdir: epath.Path) -> int:
    """Applies the non-finite policy to the steps since the last fetch; returns the consecutive-skip count."""
    for step, metrics, batches in pending:
        if float(metrics["finite"]) == 1.0:
            skips = 0
            continue
        if train_config.nonfinite == "raise":
            path = _save_batches(workdir, step, batches)
            raise NonFiniteError(
                f"non-finite loss or gradient at step {step} (loss sum {float(metrics['loss'])}); the batch is in "
                f"{path}. The update was not applied and the last checkpoint is intact. Rerun with "
                "--config.train.nonfinite=skip to skip such steps."
            )
        skips += 1
        log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", step, skips)
        if skips > train_config.max_consecutive_skips:
            path = _save_batches(workdir, step, batches)
            raise NonFiniteError(
                f"{skips} consecutive non-finite steps up to step {step} (limit "
                f"train.max_consecutive_skips={train_config.max_consecutive_skips}); the last batch is in {path}"
            )
    return skips


def _save_batches(workdir: epath.Path, step: int, batches: list[dict]) -> epath.Path:
    """Keeps the batch of a failed step for inspection: ``workdir/nonfinite/step_<N>.npz`` (per process); the
    micro-batches of an accumulated update as ``micro<M>_<key>``."""
    suffix = f"_process{jax.process_index()}" if jax.process_count() > 1 else ""
    path = workdir / "nonfinite" / f"step_{step}{suffix}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        (key if len(batches) == 1 else f"micro{m}_{key}"): np.asarray(value)
        for m, batch in enumerate(batches)
        for key, value in batch.items()
    }
    with path.open("wb") as file:
        np.savez(file, **arrays)
    return path


def _summarise(pending, schedule, learning_rate_scale: float) -> dict:
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
        # The rate the last update used (optax counts from 0), with the time budget's decay.
        "learning_rate": float(schedule(last_step - 1)) * learning_rate_scale,
        "skipped_steps": len(totals) - len(applied),
    }


def _evaluate(
    config, model_config, steps, device_state, datasets, writer, step, *, bleu_limit: bool, with_bleu: bool = True
) -> dict:
    """Validation loss/accuracy/perplexity and, for translation, BLEU (a subset during training; none without
    ``with_bleu``)."""
    params = device_state.params
    metrics = evaluate_loss(steps.evaluate, params, map(steps.put_batch, datasets.eval_batches()))
    pairs = datasets.validation_pairs[: config.eval.bleu_examples] if bleu_limit else datasets.validation_pairs
    pairs = pairs if with_bleu else []
    if config.task == "translation" and pairs:  # bleu_examples = 0: loss only during training
        quality, _ = translation_quality(
            steps.get_state(device_state).params, pairs, datasets.tokenizer, model_config=model_config,
            eval_config=config.eval, batch_multiple=datasets.batch_multiple, mesh=steps.mesh,
        )  # fmt: skip
        metrics |= quality
    writer.write(step, {k: v for k, v in metrics.items() if isinstance(v, int | float)}, split="eval")
    log.info("step %d eval: %s", step, {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
    return metrics


class _StopDecision:
    """When to stop before ``train.steps`` (SIGTERM or the time budget) and how far the learning rate has decayed
    towards the budget's end, one decision for all processes.

    One process decides on its own. Several must stop at the same step, or one would enter a save while another
    enters the next step's all-reduce (a hang), and must use the same learning rate: SIGTERM on any host goes
    through JAX's preemption sync (``reached_preemption``: every process learns of it and all stop at the same
    step), and process 0's clock alone measures the time budget (the others' configs and clocks are not
    consulted), broadcast to the others every ``log_every`` steps.
    """

    def __init__(self, train_config, checkpointer: ckpt_lib.Checkpointer | None):
        self.preempted = False
        budget = train_config.time_budget_minutes
        self.budget_seconds = 60 * budget if budget else None
        self.started = time.monotonic()
        self._decay = bool(train_config.decay_to_budget and budget)
        self._used = 0.0  # fraction of the time budget used, as last agreed
        self._checkpointer = checkpointer
        self._every = train_config.log_every
        self._several = jax.process_count() > 1
        self._broadcast_started = False
        # JAX's preemption notifier handles SIGTERM in multi-process runs; a handler here would replace it.
        self._signal = None if self._several else _SigtermFlag()

    def learning_rate_scale(self) -> float:
        """1, or with ``train.decay_to_budget`` the budget left: linear to zero at its end (Li et al. 2020)."""
        return max(1.0 - self._used, 0.0) if self._decay else 1.0

    def __call__(self, step: int) -> bool:
        if self._signal.requested if self._signal else self._checkpointer.reached_preemption(step):
            self.preempted = True
            return True
        if not self._several:
            self._used = self._fraction_used()
        elif step % self._every == 0:
            if not self._broadcast_started:  # the first collective of a new program must not wait more than 30 s
                hosts.barrier("stop_decision")
                self._broadcast_started = True
            self._used = float(multihost_utils.broadcast_one_to_all(np.float32(self._fraction_used())))
        return self._used >= 1.0

    def _fraction_used(self) -> float:
        if self.budget_seconds is None or jax.process_index() != 0:
            return 0.0
        return (time.monotonic() - self.started) / self.budget_seconds

    def close(self) -> None:
        if self._signal:
            self._signal.restore()


class _SigtermFlag:
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
