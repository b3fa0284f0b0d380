"""A training run's workdir as its readers see it: the resolved config, the tokenizer and the parameters.

``attn-jax eval``, ``translate`` and ``average`` start here. They read what ``train`` wrote (``DIR/config.json``,
``DIR/tokenizer/``, ``DIR/checkpoints/``) and never write, create or delete anything in the workdir, so they can
run next to a trainer that is saving: checkpoints are opened read-only (an in-progress save's temporary folder
is left alone) and only the parameters are restored, not the optimiser state. Loading a model needs no data
set: nothing is downloaded, prepared or tokenized.
"""

import dataclasses
import json

import jax
import ml_collections
from etils import epath

from attn_jax import checkpoint as ckpt_lib
from attn_jax import config as config_lib
from attn_jax.data.tokenizer import load_run_tokenizer
from attn_jax.model_config import ConfigError
from attn_jax.optim import make_optimizer
from attn_jax.train import init_train_state

CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class Model:
    """What a reader needs to run a trained model.

    Attributes:
      config: the run's experiment config (with the reader's overrides applied).
      model_config: the model's static configuration.
      params: the parameters of the chosen checkpoint.
      step: that checkpoint's step (of an average: the newest step averaged).
      tokenizer: the run's SentencePiece model, or None for token-id tasks (the copy task).
      averaged_steps: the steps whose parameters were averaged into ``params`` (``load_model(average=K)``);
        empty for one checkpoint.
    """

    config: ml_collections.ConfigDict
    model_config: object
    params: dict
    step: int
    tokenizer: object | None
    averaged_steps: tuple[int, ...] = ()


def read_config(workdir, overrides=(), *, experiment: str | None = None) -> ml_collections.ConfigDict:
    """The run's resolved config (``DIR/config.json``), or ``experiment``'s, with ``overrides`` applied.

    Args:
      workdir: the run's directory (local or a URL such as ``gs://bucket/run``).
      overrides: ``"a.b=VALUE"`` strings, e.g. ``eval.beam_size=8``.
      experiment: ``experiments/NAME.py[:ARG]`` to use instead of the saved config.

    Raises:
      ConfigError: no ``config.json`` in ``workdir`` (not a training run), or an override is invalid.
    """
    if experiment is not None:
        return config_lib.load_experiment(experiment, overrides)
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{path} not found: is {workdir!r} the workdir of an `attn-jax train` run?")
    return config_lib.validated(ml_collections.ConfigDict(json.loads(path.read_text())), overrides)


def abstract_params(config: ml_collections.ConfigDict):
    """``(model_config, abstract parameters)`` of the model ``config`` describes; nothing is computed."""
    model_config = config_lib.model_config(config)
    tx = make_optimizer(1.0)  # any optimiser: only the parameters' shapes are kept
    state = jax.eval_shape(lambda rng: init_train_state(rng, model_config, tx, task=config.task), jax.random.key(0))
    return model_config, state.params


def load_model(
    workdir, config: ml_collections.ConfigDict, *, checkpoint: str | int = "latest", average: int = 1
) -> Model:
    """The parameters of ``checkpoint`` (``"latest"``, ``"averaged"`` or a step) and the tokenizer, read-only.

    With ``average`` > 1, the average of the run's last ``average`` checkpoints at or before ``checkpoint``
    (``"latest"`` or a step), taken as the training loop's final evaluation takes it (``averaging_gap``): the
    run as its final evaluation would have scored it had it stopped there. Nothing is written.

    Raises:
      CheckpointError: no such checkpoint (the message says what to run first).
      CheckpointMismatchError: the config's model does not match the checkpoint's shapes.
      ConfigError: ``average`` > 1 with ``checkpoint="averaged"``.
    """
    workdir = epath.Path(workdir)
    model_config, target = abstract_params(config)
    directory = workdir / "checkpoints"
    if average > 1:
        if checkpoint == ckpt_lib.AVERAGED:
            raise ConfigError("average: the averaged checkpoint is already an average; pass 'latest' or a step")
        until = None if checkpoint == "latest" else int(checkpoint)
        gap = averaging_gap(config.train)
        params, steps = ckpt_lib.average_checkpoints(directory, target, last=average, min_gap=gap, until=until)
        return Model(config, model_config, params, steps[-1], run_tokenizer(workdir, config), tuple(steps))
    restored = ckpt_lib.read_params(directory, target, checkpoint=checkpoint)
    return Model(config, model_config, restored.state["params"], restored.step, run_tokenizer(workdir, config))


def averaging_gap(train_config) -> int:
    """The fewest steps between two checkpoints averaged together: half a checkpoint interval, so the time budget's
    final save just after a periodic one does not weigh the run's end twice."""
    return train_config.checkpoint_every // 2


def run_tokenizer(workdir, config: ml_collections.ConfigDict):
    """The SentencePiece model the run trained (``DIR/tokenizer``); None for the copy task, which has none."""
    if config.data.name == "copy":
        return None
    try:
        return load_run_tokenizer(workdir)
    except FileNotFoundError as error:  # the run's own files are incomplete: one line, like a missing checkpoint
        raise ckpt_lib.CheckpointError(str(error)) from None
