"""``TransformerConfig``: the model's hyperparameters, frozen, hashable and validated on construction.

The paper's symbols map onto the fields (and onto the shape alphabet of ``attn_jax.types``) as:

    d_model = D = d_model      num_heads = N = h        head_dim = H = d_k = d_v (default d_model / h)
    d_ff = F = d_ff            num_*_layers = the paper's N (6)    dropout_rate = P_drop
    vocab_size = V

``TransformerConfig.base`` and ``TransformerConfig.big`` are the two columns of the paper's Table 3. Every
switch whose default is the paper's choice says so; the others are deviations you opt into.

The low-resource regularisers (Sennrich & Zhang 2019; Araabi & Monz 2020; Nguyen & Salazar 2019) are off by
default and act only in training, when a ``dropout_rng`` is given: word dropout (whole source and target-input
tokens), LayerDrop (Fan et al. 2019, whole layers of a stack) and activation dropout (inside the FFN).
"""

import dataclasses
import math
from typing import Any

import jax

POSITIONS = ("sinusoidal", "learned")
WORD_DROPOUT_MODES = ("zero", "unk")
DTYPES = ("float32", "bfloat16", "float16", "float64")
ATTENTION_IMPLEMENTATIONS = (None, "xla", "chunked", "cudnn")
# Probabilities, each checked to lie in [0, 1).
RATES = (
    "dropout_rate", "attention_dropout_rate", "activation_dropout_rate", "word_dropout_rate", "encoder_layerdrop",
    "decoder_layerdrop",
)  # fmt: skip


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or inconsistent; the message names the field."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """Hyperparameters of the encoder-decoder Transformer (and of the decoder-only language model).

    A static pytree (hashable, no array leaves): ``jax.jit(aj.transformer)(params, src, tgt, config=cfg)``,
    ``jax.vmap``, ``jax.grad`` and ``eqx.filter_jit``-style code take it as an ordinary argument, and a changed
    config recompiles. Use ``dataclasses.replace`` to derive variants.

    Example:
      >>> cfg = TransformerConfig.base(vocab_size=37000)
      >>> cfg.d_model, cfg.num_heads, cfg.resolved_head_dim
      (512, 8, 64)
    """

    vocab_size: int  # V: shared source/target vocabulary (paper: 37000 BPE tokens for EN-DE)
    d_model: int = 512  # D = d_model
    num_heads: int = 8  # N = h, query heads
    num_kv_heads: int | None = None  # K: key/value heads; None = num_heads (paper); fewer = grouped-query
    head_dim: int | None = None  # H = d_k = d_v; None = d_model // num_heads (paper)
    d_ff: int = 2048  # F = d_ff, inner width of the position-wise FFN
    num_encoder_layers: int = 6  # the paper's N for the encoder stack
    num_decoder_layers: int = 6  # the paper's N for the decoder stack (also the LM's depth)
    max_len: int = 1024  # longest sequence accepted; size of the learned position table
    positions: str = "sinusoidal"  # "sinusoidal" (paper §3.5) or "learned" (Table 3 row E)
    dropout_rate: float = 0.1  # P_drop on sub-layer outputs and on embeddings + positions (§5.4)
    attention_dropout_rate: float = 0.0  # dropout on attention weights; 0 in the paper
    activation_dropout_rate: float = 0.0  # dropout on the FFN's inner ReLU activation (fairseq's); 0 in the paper
    word_dropout_rate: float = 0.0  # drop whole source/target-input tokens in training (Sennrich & Zhang 2019); 0 = off
    word_dropout_mode: str = "zero"  # a dropped token's embedding is zeroed ("zero") or it becomes unk_id ("unk")
    unk_id: int = 3  # the unknown token's id, what "unk" word dropout substitutes (attn_jax.data's UNK_ID)
    encoder_layerdrop: float = 0.0  # LayerDrop (Fan et al. 2019): skip each encoder layer in training; 0 = off
    decoder_layerdrop: float = 0.0  # the same for each decoder (and language-model) layer; 0 = off
    share_embeddings: bool = True  # one table for source and target tokens (paper §3.4)
    tie_output_embedding: bool = True  # pre-softmax projection = target embedding transposed (paper §3.4)
    scale_embeddings: bool = True  # multiply embeddings by sqrt(d_model) (paper §3.4)
    norm_first: bool = False  # pre-norm x + Sublayer(LN(x)); False = the paper's LN(x + Sublayer(x))
    final_norm: bool | None = None  # a LayerNorm after each stack; None = norm_first (paper: none, post-norm)
    attention_bias: bool = True  # biases in the Q/K/V/O projections (paper: unspecified; counts match 63.1M)
    layer_norm_epsilon: float = 1e-6  # added to the variance in layer norm
    pad_id: int = 0  # token id treated as padding in masks
    scan_layers: bool = True  # stack layers with lax.scan (compile time flat in depth); False = unrolled
    remat: bool = False  # recompute each layer's activations in the backward pass (saves memory)
    attention_implementation: str | None = None  # None (best available), "xla", "chunked" or "cudnn"
    dtype: str = "float32"  # compute dtype; parameters stay float32 ("float64" needs jax_enable_x64)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            _check_type(field.name, getattr(self, field.name), field.type)
        for name in ("vocab_size", "d_model", "num_heads", "d_ff", "max_len"):
            _check(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        for name in ("num_encoder_layers", "num_decoder_layers"):
            _check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("num_kv_heads", "head_dim"):
            value = getattr(self, name)
            _check(value is None or value > 0, name, f"must be positive or None, got {value}")
        if self.head_dim is None:
            _check(
                self.d_model % self.num_heads == 0,
                "num_heads",
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads} (or set head_dim)",
            )
        _check(
            self.num_heads % self.resolved_num_kv_heads == 0,
            "num_kv_heads",
            f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}",
        )
        for name in RATES:
            _check(0.0 <= getattr(self, name) < 1.0, name, f"must be in [0, 1), got {getattr(self, name)}")
        _check(
            self.word_dropout_mode in WORD_DROPOUT_MODES, "word_dropout_mode",
            f"must be one of {WORD_DROPOUT_MODES}, got {self.word_dropout_mode!r}",
        )  # fmt: skip
        if self.word_dropout_rate > 0.0 and self.word_dropout_mode == "unk":
            _check(
                0 <= self.unk_id < self.vocab_size and self.unk_id != self.pad_id, "unk_id",
                f"must be in [0, vocab_size) and differ from pad_id={self.pad_id}, got {self.unk_id}",
            )  # fmt: skip
        _check(self.layer_norm_epsilon > 0, "layer_norm_epsilon", "must be positive")
        _check(0 <= self.pad_id < self.vocab_size, "pad_id", f"must be in [0, vocab_size), got {self.pad_id}")
        _check(self.positions in POSITIONS, "positions", f"must be one of {POSITIONS}, got {self.positions!r}")
        _check(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        _check(
            self.dtype != "float64" or jax.config.jax_enable_x64,
            "dtype",
            "'float64' needs 64-bit JAX: jax.config.update('jax_enable_x64', True) before building the config",
        )
        _check(
            self.attention_implementation in ATTENTION_IMPLEMENTATIONS,
            "attention_implementation",
            f"must be one of {ATTENTION_IMPLEMENTATIONS}, got {self.attention_implementation!r}",
        )

    @property
    def has_final_norm(self) -> bool:
        """Whether each stack ends in a LayerNorm: ``final_norm``, or ``norm_first`` when that is None."""
        return self.norm_first if self.final_norm is None else self.final_norm

    @property
    def resolved_head_dim(self) -> int:
        """``H``: ``head_dim``, or ``d_model // num_heads`` as in the paper."""
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def resolved_num_kv_heads(self) -> int:
        """``K``: ``num_kv_heads``, or ``num_heads`` as in the paper."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @classmethod
    def base(cls, vocab_size: int = 37000, **overrides: Any) -> "TransformerConfig":
        """The paper's "base" model (Table 3): d_model 512, 8 heads, d_ff 2048, 6+6 layers, P_drop 0.1."""
        return cls(vocab_size=vocab_size, **overrides)

    @classmethod
    def big(cls, vocab_size: int = 37000, **overrides: Any) -> "TransformerConfig":
        """The paper's "big" model (Table 3): d_model 1024, 16 heads, d_ff 4096, 6+6 layers, P_drop 0.3."""
        defaults = {"d_model": 1024, "num_heads": 16, "d_ff": 4096, "dropout_rate": 0.3}
        return cls(vocab_size=vocab_size, **(defaults | overrides))


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"TransformerConfig.{field}: {message}")


def _check_type(name: str, value: Any, annotation: Any) -> None:
    """Accepts exactly the annotated type (ints for floats, None where allowed); bools are not ints."""
    allowed = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    text = str(annotation) if "|" in str(annotation) else text
    kinds = [k.strip() for k in text.replace("typing.", "").split("|")]
    if value is None and "None" in kinds:
        return
    for kind in kinds:
        types = allowed.get(kind)
        if types and isinstance(value, types) and (kind == "bool" or not isinstance(value, bool)):
            if kind == "float" and not math.isfinite(value):
                break
            return
    raise ConfigError(f"TransformerConfig.{name}: expected {' or '.join(kinds)}, got {value!r}")


# No leaves, the whole config as auxiliary data: jit, vmap, grad and tree utilities treat it as static.
jax.tree_util.register_static(TransformerConfig)
