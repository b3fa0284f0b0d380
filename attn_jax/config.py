"""Experiment files: loading, command-line overrides and validation, all before anything is traced.

An experiment is a Python file ``experiments/NAME.py`` with ``get_config(arg: str | None) -> ConfigDict``.
It is named on the command line as ``experiments/NAME.py[:ARG]`` (``ARG`` like ``size=big,runlocal``, parsed
by ``parse_arg``) and overridden with ``--config.a.b=VALUE``. The returned config is locked: a key that is not
in the file is a ``ConfigError`` with a did-you-mean suggestion, and a value of the wrong type is one too.
"""

import ast
import dataclasses
import difflib
import importlib.util
import math
import pathlib
from typing import Any

import ml_collections

from attn_jax.families import FAMILIES, ModelConfig
from attn_jax.model_config import ConfigError, TransformerConfig
from attn_jax.rnn_encdec import RNNEncDecConfig
from attn_jax.rnnsearch import RNNSearchConfig

__all__ = ["ConfigError", "load_experiment", "validated", "apply_overrides", "parse_arg", "model_config", "flatten"]

# Set by ``parse_arg``: an experiment that never parses its argument must not silently ignore one.
_parsed_arg = False


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses ``"size=big,runlocal"`` into ``{"size": "big", "runlocal": True}`` over typed defaults.

    Each value takes the type of its default; a bare name means True. Unknown names are errors.

    Example:
      >>> dict(parse_arg("size=big,runlocal", size="base", runlocal=False, steps=10))
      {'runlocal': True, 'size': 'big', 'steps': 10}
    """
    global _parsed_arg
    _parsed_arg = True
    result = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        name, has_value, text = item.partition("=")
        name = name.strip()
        if name not in defaults:
            raise ConfigError(f"unknown experiment argument {name!r}{_suggest(name, defaults)}")
        result[name] = _parse_value(text if has_value else "true", defaults[name], f"argument {name}")
    return result


def load_experiment(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """Loads ``experiments/NAME.py[:ARG]``, applies ``a.b=VALUE`` overrides and validates the model section.

    Args:
      spec: path of the experiment file, optionally followed by ``:ARG`` for its ``get_config``.
      overrides: strings ``"a.b=VALUE"`` (``--config.`` prefix allowed).

    Returns:
      The locked ``ConfigDict``.

    Raises:
      ConfigError: missing file, no ``get_config``, unknown key, wrong type or inconsistent model values.
    """
    path_text, _, arg = spec.partition(":")
    path = pathlib.Path(path_text)
    if not path.is_file():
        raise ConfigError(f"experiment file {path_text!r} not found")
    module_spec = importlib.util.spec_from_file_location(f"attn_jax_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"experiment file {path_text!r} defines no get_config(arg)")
    global _parsed_arg
    _parsed_arg = False
    config = module.get_config(arg or None)
    if arg and not _parsed_arg:
        raise ConfigError(f"experiment {path_text!r} takes no argument, got {arg!r}")
    return validated(config, overrides)


def validated(config: ml_collections.ConfigDict, overrides=()) -> ml_collections.ConfigDict:
    """Locks ``config``, applies ``overrides`` and checks every field (the model's included); returns it.

    Raises:
      ConfigError: naming the first unknown key, wrongly typed or out-of-range value.
    """
    config.lock()
    apply_overrides(config, overrides)
    check_values(config)
    if "model" in config:
        model_config(config)  # validates now, before any compile
    return config


def _integer(low: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low, f"an integer >= {low}"


def _number(low: float, high: float = math.inf, *, open_low: bool = False, open_high: bool = False):
    def check(v):
        if not isinstance(v, int | float) or isinstance(v, bool) or math.isnan(v):
            return False
        return (v > low if open_low else v >= low) and (v < high if open_high else v <= high)

    interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    return check, f"a number in {interval}"


def _one_of(*choices: str):
    return lambda v: v in choices, " or ".join(map(repr, choices))


# What each non-model field accepts (config.model is checked by TransformerConfig itself).
_VALUE_RULES = {
    "seed": _integer(0),
    "task": _one_of("translation", "lm"),
    "data.name": _one_of("ding_en_de", "wmt14_translate/de-en", "copy"),
    "train.steps": _integer(1),
    "train.warmup_steps": _integer(1),
    "train.learning_rate_scale": _number(0.0, open_low=True, open_high=True),
    "train.b1": _number(0.0, 1.0, open_high=True),
    "train.b2": _number(0.0, 1.0, open_high=True),
    "train.eps": _number(0.0, open_high=True),
    "train.label_smoothing": _number(0.0, 1.0, open_high=True),
    "train.grad_clip_norm": _number(0.0, open_high=True),
    "train.weight_decay": _number(0.0, open_high=True),
    "train.accumulation_steps": _integer(1),
    "train.log_every": _integer(1),
    "train.eval_every": _integer(1),
    "train.bleu_every": _integer(0),
    "train.cooldown_steps": _integer(0),
    "train.checkpoint_every": _integer(1),
    "train.keep_checkpoints": _integer(1),
    "train.keep_best": _integer(0),
    "train.nonfinite": _one_of("raise", "skip"),
    "train.max_consecutive_skips": _integer(0),
    "train.time_budget_minutes": _number(0.0, open_high=True),
    "eval.beam_size": _integer(1),
    "eval.alpha": _number(0.0, open_high=True),
    "eval.extra_length": _integer(0),
    "eval.bleu_examples": _integer(0),
    "eval.batch_size": _integer(1),
    "eval.num_samples": _integer(0),
    "eval.attention_plots": _integer(0),
    "eval.average_last": _integer(0),
    "parallel.strategy": _one_of("jit", "pmap"),
    "parallel.num_processes": _integer(0),
    "parallel.process_id": _integer(-1),
    "data.vocab_size": _integer(8),
    "data.tokenizer_type": _one_of("bpe", "unigram"),
    "data.tokenizer_examples": _integer(1),
    "data.max_length": _integer(2),
    "data.overlong": _one_of("drop", "truncate"),
    "data.invalid_utf8": _one_of("replace", "error"),
    "data.tokens_per_batch": _integer(1),
    "data.eval_tokens_per_batch": _integer(1),
    "data.num_threads": _integer(0),
    "data.worker_count": _integer(0),
    "data.prepare_workers": _integer(0),
    "data.examples_per_shard": _integer(1),
    "data.lexicon_ratio": _number(0.0, 1.0, open_high=True),
    "data.lexicon_entries": _one_of("words", "phrases", "all"),
    "data.bidirectional": (lambda v: isinstance(v, bool), "True or False"),
    "data.in_memory_mb": _integer(0),
}


def check_values(config: ml_collections.ConfigDict) -> None:
    """Range and choice checks of the training, data, evaluation and parallel fields present in ``config``.

    Raises:
      ConfigError: naming the first field whose value is out of range, with what it accepts.
    """
    values = flatten(config)
    for key, (accepts, description) in _VALUE_RULES.items():
        if key in values and not accepts(values[key]):
            raise ConfigError(f"config.{key}: expected {description}, got {values[key]!r}")
    for axis in ("data", "fsdp", "tensor"):
        size = values.get(f"parallel.{axis}")
        if size is not None and (not isinstance(size, int) or size == 0 or size < -1):
            raise ConfigError(f"config.parallel.{axis}: expected a positive mesh size or -1, got {size!r}")
    profile = values.get("train.profile_steps", ())
    if profile and not (
        len(profile) == 2 and all(isinstance(s, int) and not isinstance(s, bool) for s in profile)
        and 0 <= profile[0] < profile[1]
    ):  # fmt: skip
        raise ConfigError(
            f"config.train.profile_steps: expected () or (start, stop) with 0 <= start < stop, got {profile!r}"
        )
    average_last, kept = values.get("eval.average_last", 0), values.get("train.keep_checkpoints", 0)
    if average_last > kept:
        raise ConfigError(
            f"config.eval.average_last ({average_last}) averages more checkpoints than config.train.keep_checkpoints "
            f"({kept}) keeps"
        )
    for key, (accepts, description) in (("eval.beam_sizes", _integer(1)), ("eval.alphas", _number(0.0))):
        if not all(accepts(v) for v in values.get(key, ())):
            raise ConfigError(f"config.{key}: expected a tuple of values each {description}, got {values[key]!r}")
    data = config.get("data")
    if data is not None:
        _check_data_options(data, config.get("task", "translation"))
    if data is not None and data.get("tokens_per_batch", 0) < data.get("max_length", 0):
        raise ConfigError(
            f"config.data.tokens_per_batch ({data.tokens_per_batch}) must hold at least one sequence of "
            f"config.data.max_length ({data.max_length}) tokens"
        )


def _check_data_options(data: ml_collections.ConfigDict, task: str) -> None:
    """The data set must offer what ``data.lexicon_ratio`` and ``data.bidirectional`` ask of it."""
    if data.get("lexicon_ratio", 0.0) > 0 and (data.get("name") != "ding_en_de" or data.get("phrases")):
        raise ConfigError(
            f"config.data.lexicon_ratio={data.lexicon_ratio}: dictionary entries need data.name='ding_en_de' "
            f"and data.phrases=False (got {data.get('name')!r}, phrases={data.get('phrases')}; phrases are among "
            "the entries: data.lexicon_entries)"
        )
    if data.get("bidirectional") and (data.get("name") == "copy" or task != "translation"):
        raise ConfigError(
            f"config.data.bidirectional: needs a translation task on a text data set (got task={task!r}, "
            f"data.name={data.get('name')!r})"
        )


_PATH_FIELDS = ("data.data_dir", "data.ding_file")


def with_absolute_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with its data folder resolved (``data.data_dir``: the default is ``$TFDS_DATA_DIR``, else a
    folder under the working directory) and relative local data paths made absolute (URLs kept), so the run's
    saved config finds the same data from any working directory (``attn-jax eval`` started elsewhere)."""
    if config.get("data") is not None and config.data.name != "copy":
        from attn_jax.data.sources import data_dir

        config.data.data_dir = data_dir(config.data)
    for key in _PATH_FIELDS:
        section, name = key.split(".")
        value = config.get(section, {}).get(name)
        if isinstance(value, str) and value and "://" not in value:
            config[section][name] = str(pathlib.Path(value).absolute())
    return config


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> None:
    """Sets each ``a.b=VALUE`` in place, parsing VALUE as the type of the value it replaces."""
    for item in overrides:
        key, sep, text = item.removeprefix("--").removeprefix("config.").partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like --config.a.b=VALUE")
        parent, name = _resolve(config, key)
        try:
            parent[name] = _parse_value(text, parent[name], f"config.{key}")
        except TypeError as error:  # a typed placeholder (None in the file) given a value of another type
            raise ConfigError(f"config.{key}: {error}") from None


def _resolve(config: ml_collections.ConfigDict, dotted: str):
    """The ConfigDict holding ``dotted`` and its last name, or a ConfigError naming the unknown key."""
    walked: list[str] = []
    parent, node = config, config
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            key = ".".join(walked + [part])
            if isinstance(node, ml_collections.ConfigDict):  # compare leaf names, so a shared prefix is no match
                hint = _suggest(part, list(node), "config." + "".join(f"{w}." for w in walked))
            else:
                hint = _suggest(key, flatten(config), "config.")
            raise ConfigError(f"unknown config key config.{key}{hint}")
        walked.append(part)
        parent, node = node, node[part]
    return parent, walked[-1]


def _suggest(name: str, candidates, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def _parse_value(text: str, current: Any, where: str) -> Any:
    """Converts a command-line string to the type of ``current`` (None accepts any Python literal)."""
    text = text.strip()
    try:
        if isinstance(current, bool):
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return lowered in ("true", "1", "yes")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
        if isinstance(current, tuple | list):
            value = ast.literal_eval(text)
            return type(current)(value if isinstance(value, tuple | list) else [value])
        if current is None:
            return None if text.lower() == "none" else _literal_or_text(text)
    except (ValueError, SyntaxError) as error:
        raise ConfigError(f"{where}: expected {type(current).__name__}, got {text!r}") from error
    raise ConfigError(f"{where}: cannot override a value of type {type(current).__name__}")


def _literal_or_text(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def flatten(config: ml_collections.ConfigDict | dict, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for every leaf of a ConfigDict (or of nested dicts, as a saved config is)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict | dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _vocab_size(config: ml_collections.ConfigDict) -> int | None:
    """The vocabulary the data section implies: the tokenizer's size, or the copy task's id range."""
    data = config.get("data")
    if data is None:
        return None
    return data.copy.vocab_size if data.get("name") == "copy" else data.get("vocab_size")


def model_config(config: ml_collections.ConfigDict, **overrides: Any) -> ModelConfig:
    """The model config of ``config.model.family`` (``TransformerConfig``, ``RNNSearchConfig`` or
    ``RNNEncDecConfig``), its vocabulary size from ``config.data`` (or ``overrides``).

    Raises:
      ConfigError: an unknown model key (with a suggestion), an invalid value, naming ``config.model.<field>``,
        or a setting the family cannot honour (e.g. packing or a language model with a recurrent family).
    """
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    values = {"vocab_size": _vocab_size(config)} | dict(config.model) | overrides
    family, rnn = values.pop("family", "transformer"), values.pop("rnn", None)
    for name in values:
        if name not in fields:
            raise ConfigError(f"unknown config key config.model.{name}{_suggest(name, fields, 'config.model.')}")
    if family not in FAMILIES:
        raise ConfigError(f"config.model.family: expected one of {', '.join(map(repr, FAMILIES))}, got {family!r}")
    if family != "transformer":
        return _recurrent_config(config, family, values, rnn or {})
    try:
        return TransformerConfig(**values)
    except ConfigError as error:
        raise ConfigError(str(error).replace("TransformerConfig.", "config.model.")) from None


def _or(value, default):
    return default if value is None else value


# Where each field of the recurrent configs comes from in ``config.model`` (the rest: the same name there).
_RECURRENT_KEYS = {
    "source_vocab": "data.vocab_size", "target_vocab": "data.vocab_size", "hidden_dim": "model.d_model",
    "embed_dim": "model.rnn.embed_dim", "encoder_dim": "model.rnn.encoder_dim",
    "resolved_encoder_dim": "model.rnn.encoder_dim", "alignment_dim": "model.rnn.alignment_dim",
    "maxout_dim": "model.rnn.maxout_dim", "score": "model.rnn.score", "reset_after": "model.rnn.reset_after",
    "reverse_source": "model.rnn.reverse_source",
}  # fmt: skip


# Transformer options whose non-default value asks for behaviour (not a size) the recurrent families lack.
_TRANSFORMER_ONLY_BEHAVIOUR = ("remat", "attention_dropout_rate", "activation_dropout_rate", "word_dropout_rate",
                               "encoder_layerdrop", "decoder_layerdrop")  # fmt: skip


def _recurrent_config(config, family: str, values: dict, rnn) -> ModelConfig:
    """``RNNSearchConfig`` / ``RNNEncDecConfig`` from the shared model fields and ``config.model.rnn``.

    ``d_model`` is the decoder's state; ``None`` sizes in ``rnn`` derive from it. The Transformer's own sizes
    (heads, d_ff, layers, ...) are ignored; settings the recurrent models cannot honour are errors.
    """
    if config.get("task", "translation") != "translation":
        raise ConfigError(f"config.task={config.task!r}: model.family={family!r} is an encoder-decoder; "
                          "language models are Transformers (model.family='transformer')")  # fmt: skip
    if config.get("data") is not None and config.data.get("packing"):
        raise ConfigError(f"config.data.packing: model.family={family!r} reads each sentence with a recurrent "
                          "state, which would run across packed neighbours; set data.packing=False")  # fmt: skip
    for name in _TRANSFORMER_ONLY_BEHAVIOUR:
        if values.get(name):  # a request the recurrent models cannot honour, not a size they ignore
            raise ConfigError(f"config.model.{name}={values[name]!r}: model.family={family!r} has no such option "
                              "(Transformer only); leave it at its default")  # fmt: skip
    d_model, score = values["d_model"], rnn.get("score", "additive")
    valid = isinstance(d_model, int) and not isinstance(d_model, bool)
    sizes = {
        "source_vocab": values["vocab_size"], "target_vocab": values["vocab_size"], "hidden_dim": d_model,
        "embed_dim": _or(rnn.get("embed_dim"), d_model),
        "encoder_dim": _or(rnn.get("encoder_dim"), d_model // 2 if score == "dot" and valid else d_model),
        "maxout_dim": _or(rnn.get("maxout_dim"), max(d_model // 2, 1) if valid else d_model),
        "reset_after": rnn.get("reset_after", False),
    }  # fmt: skip
    if family == "rnn_encdec":
        sizes["reverse_source"] = rnn.get("reverse_source", False)
    shared = {name: values[name] for name in ("pad_id", "dropout_rate", "max_len", "dtype")}
    cls = RNNEncDecConfig
    if family == "rnnsearch":
        cls, sizes = RNNSearchConfig, sizes | {"score": score, "alignment_dim": _or(rnn.get("alignment_dim"), d_model)}
    try:
        return cls(**sizes, **shared)
    except ConfigError as error:
        message = str(error)
        for field, key in _RECURRENT_KEYS.items():
            message = message.replace(f"{cls.__name__}.{field}:", f"config.{key}:")
        raise ConfigError(message.replace(f"{cls.__name__}.", "config.model.")) from None


# ---------------------------------------------------------------------------------------------------------
# What `attn-jax train --help` lists
# ---------------------------------------------------------------------------------------------------------

EXPERIMENTS_DIR = pathlib.Path(__file__).resolve().parents[1] / "experiments"
# The ConfigDict variables of attn_jax/defaults.py and the config section each fills.
_DEFAULTS_SECTIONS = {"c": "", "model": "model.", "data": "data.", "copy": "data.copy."}


def experiments(directory: pathlib.Path = EXPERIMENTS_DIR) -> list[tuple[str, str]]:
    """``(path, first line of its docstring)`` of every experiment file in ``directory``."""
    found = []
    for path in sorted(directory.glob("*.py")):
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        found.append((f"experiments/{path.name}", docstring.split("\n")[0]))
    return found


def documented_fields() -> list[tuple[str, Any, str]]:
    """``(dotted key, default, comment)`` for every field of ``attn_jax/defaults.py``, comments read from its
    source (each field there carries a one-line comment)."""
    from attn_jax import defaults

    config = defaults.base_config()
    config.model = defaults.model_config()
    config.data = defaults.data_config()
    config.data.copy = defaults.copy_task_config()
    values = flatten(config)
    comments = {}
    for line in pathlib.Path(defaults.__file__).read_text().splitlines():
        assignment, _, comment = line.strip().partition("  # ")
        target = assignment.split(" = ")[0]
        variable, _, name = target.partition(".")
        if comment and variable in _DEFAULTS_SECTIONS and " = " in assignment:
            comments[_DEFAULTS_SECTIONS[variable] + name] = comment
    return [(key, value, comments.get(key, "")) for key, value in values.items()]
