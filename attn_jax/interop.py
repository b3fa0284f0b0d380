"""Weight converters: ``flax.linen.MultiHeadDotProductAttention`` and ``torch.nn.Transformer`` to and from ours.

Our attention weights keep the heads axis (``w_q [D, N, H]``, ``w_o [N, H, D]``); Linen's ``DenseGeneral``
kernels already have that layout, while PyTorch stores ``in_proj_weight [3 N H, D]`` (query, key and value rows
stacked) and ``out_proj.weight [D, N H]``, both applied as ``x W^T``. ``torch.nn.Transformer`` holds only the
two stacks: ``TorchTransformer`` (built by ``to_torch``) adds the paper's embeddings (x sqrt(d_model)),
interleaved sinusoidal positions and the tied pre-softmax projection around one, so the whole model runs in
PyTorch and gives our logits. torch is imported only inside these functions.

Two differences are handled, not hidden: ``torch.nn.Transformer`` always ends each stack in a LayerNorm, which
the paper's post-norm model does not have (``to_torch`` removes it; ``from_torch`` maps it onto
``TransformerConfig.final_norm=True``), and its LayerNorm epsilon defaults to 1e-5 (the converters carry
``layer_norm_epsilon`` over).
"""

import math

import jax.numpy as jnp
import numpy as np

from attn_jax.model_config import ConfigError, TransformerConfig
from attn_jax.types import AttentionParams

# ----------------------------------------------------------------------------------------------------------
# flax.linen
# ----------------------------------------------------------------------------------------------------------

_LINEN_NAMES = {"q": "query", "k": "key", "v": "value", "o": "out"}


def from_flax_linen_attention(variables) -> AttentionParams:
    """Maps ``flax.linen.MultiHeadDotProductAttention`` variables onto this module's parameter dict.

    Linen's ``DenseGeneral`` kernels already have our layout (query/key/value ``[D, N, H]``, out ``[N, H, D]``),
    so this only renames keys. Submodules we have no counterpart for (``normalize_qk=True`` adds ``query_ln`` and
    ``key_ln``) are refused by name rather than dropped, which would change the output.

    Args:
      variables: the module's variables, with or without the top-level ``"params"`` collection.

    Returns:
      ``AttentionParams``, with biases when the Linen module had them.

    Example:
      >>> import jax, flax.linen as nn
      >>> m = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
      >>> v = m.init(jax.random.key(0), jnp.ones((1, 3, 8)))
      >>> sorted(from_flax_linen_attention(v))
      ['b_k', 'b_o', 'b_q', 'b_v', 'w_k', 'w_o', 'w_q', 'w_v']
    """
    linen = variables.get("params", variables)
    missing = [n for n in _LINEN_NAMES.values() if n not in linen]
    if missing:
        raise KeyError(f"not MultiHeadDotProductAttention variables: missing {missing}, found {sorted(linen)}")
    unknown = sorted(set(linen) - set(_LINEN_NAMES.values()))
    if unknown:
        raise ValueError(
            f"MultiHeadDotProductAttention has submodules attn_jax's attention does not have: {unknown} "
            "(normalize_qk=True adds query_ln and key_ln); converting without them would change the output"
        )
    for theirs in _LINEN_NAMES.values():
        extra = sorted(set(linen[theirs]) - {"kernel", "bias"})
        if extra:
            raise ValueError(f"MultiHeadDotProductAttention's {theirs!r} has parameters we cannot map: {extra}")
    params = {f"w_{ours}": jnp.asarray(linen[theirs]["kernel"]) for ours, theirs in _LINEN_NAMES.items()}
    params |= {
        f"b_{ours}": jnp.asarray(linen[theirs]["bias"])
        for ours, theirs in _LINEN_NAMES.items()
        if "bias" in linen[theirs]
    }
    return params


# ----------------------------------------------------------------------------------------------------------
# torch.nn.Transformer
# ----------------------------------------------------------------------------------------------------------


def _check_torch_compatible(config: TransformerConfig) -> None:
    """Refuses, by field, what ``torch.nn.Transformer`` cannot hold."""
    problems = {
        "num_kv_heads": config.resolved_num_kv_heads != config.num_heads,  # nn.MultiheadAttention: K = N
        "head_dim": config.resolved_head_dim * config.num_heads != config.d_model,  # H = D / N
        "attention_bias": not config.attention_bias,  # torch's bias=False also drops the FFN and norm biases
    }
    for field, bad in problems.items():
        if bad:
            raise ConfigError(f"TransformerConfig.{field}={getattr(config, field)!r} has no torch.nn.Transformer form")


def _torch_class():
    """``TorchTransformer``, defined on first use so that importing attn_jax never imports torch."""
    import torch

    class TorchTransformer(torch.nn.Module):
        """The paper's model in PyTorch: ``torch.nn.Transformer`` plus embeddings, positions and logits.

        ``forward(src, tgt)`` takes ``[B, S]`` and ``[B, T]`` ids (``config.pad_id`` for padding) and returns
        logits ``[B, T, V]`` equal to ``attn_jax.transformer`` in evaluation mode (``.eval()``).
        """

        def __init__(self, config: TransformerConfig):
            super().__init__()
            _check_torch_compatible(config)
            self.config = config
            D, V = config.d_model, config.vocab_size
            nn = torch.nn
            layer = {
                "d_model": D, "nhead": config.num_heads, "dim_feedforward": config.d_ff,
                "dropout": config.dropout_rate, "layer_norm_eps": config.layer_norm_epsilon, "batch_first": True,
                "norm_first": config.norm_first,
            }  # fmt: skip
            # torch.nn.Transformer always ends each stack in a LayerNorm; the paper's post-norm stacks do not.
            final = config.has_final_norm
            norm = (lambda: nn.LayerNorm(D, eps=config.layer_norm_epsilon)) if final else (lambda: None)
            encoder = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(**layer), config.num_encoder_layers, norm=norm(), enable_nested_tensor=False
            )
            decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer), config.num_decoder_layers, norm=norm())
            self.transformer = nn.Transformer(D, config.num_heads, custom_encoder=encoder, custom_decoder=decoder,
                                              batch_first=True)  # fmt: skip
            for name in _table_names(config):
                setattr(self, name, torch.nn.Parameter(torch.empty(V, D)))
            if config.positions == "learned":
                self.encoder_positions = torch.nn.Parameter(torch.empty(config.max_len, D))
                self.decoder_positions = torch.nn.Parameter(torch.empty(config.max_len, D))
            else:
                table = _sinusoids(config.max_len, D)
                self.register_buffer("sinusoids", torch.from_numpy(table).to(torch.get_default_dtype()))

        def _embed(self, tokens, table, positions):
            x = torch.nn.functional.embedding(tokens, table)
            x = x * math.sqrt(self.config.d_model) if self.config.scale_embeddings else x
            pe = self.sinusoids if positions is None else positions
            return x + pe[: tokens.shape[1]].to(x.dtype)[None]

        def forward(self, src, tgt):
            config = self.config
            source, target = ("embedding", "embedding") if config.share_embeddings else _SEPARATE
            learned = config.positions == "learned"
            x = self._embed(src, getattr(self, source), self.encoder_positions if learned else None)
            y = self._embed(tgt, getattr(self, target), self.decoder_positions if learned else None)
            T = tgt.shape[1]
            causal = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)  # True = may not attend
            out = self.transformer(
                x, y, tgt_mask=causal, src_key_padding_mask=src == config.pad_id,
                tgt_key_padding_mask=tgt == config.pad_id, memory_key_padding_mask=src == config.pad_id,
                tgt_is_causal=True,
            )  # fmt: skip
            output = target if config.tie_output_embedding else "output_embedding"
            return out @ getattr(self, output).T

    return TorchTransformer


_SEPARATE = ("source_embedding", "target_embedding")


def _table_names(config: TransformerConfig) -> list[str]:
    names = ["embedding"] if config.share_embeddings else list(_SEPARATE)
    return names + ([] if config.tie_output_embedding else ["output_embedding"])


def _sinusoids(length: int, d_model: int) -> np.ndarray:
    """The paper's §3.5 table in float64 NumPy (sine on even, cosine on odd columns)."""
    position = np.arange(length, dtype=np.float64)[:, None]
    two_i = np.arange(d_model, dtype=np.float64) // 2 * 2
    angle = position / 10000.0 ** (two_i / d_model)
    return np.where(np.arange(d_model) % 2 == 0, np.sin(angle), np.cos(angle))


def _layer_pairs(config: TransformerConfig):
    """(our block key, torch sub-module name) for every weight-bearing part of an encoder and a decoder layer."""
    encoder = {"self_attention": "self_attn", "self_attention_norm": "norm1", "ffn": "", "ffn_norm": "norm2"}
    decoder = {
        "self_attention": "self_attn", "self_attention_norm": "norm1", "cross_attention": "multihead_attn",
        "cross_attention_norm": "norm2", "ffn": "", "ffn_norm": "norm3",
    }  # fmt: skip
    return {"encoder": encoder, "decoder": decoder}


def _attention_to_torch(p) -> dict:
    """``w_q, w_k, w_v [D, N, H]``, ``w_o [N, H, D]`` -> ``in_proj_weight [3 N H, D]``, ``out_proj.weight [D, N H]``."""
    D = p["w_q"].shape[0]
    rows = [np.asarray(p[f"w_{x}"]).reshape(D, -1).T for x in "qkv"]  # [D, N, H] -> [N H, D], applied as x W^T
    return {
        "in_proj_weight": np.concatenate(rows, axis=0),
        "in_proj_bias": np.concatenate([np.asarray(p[f"b_{x}"]).reshape(-1) for x in "qkv"]),
        "out_proj.weight": np.asarray(p["w_o"]).reshape(-1, D).T,  # [N, H, D] -> [D, N H]
        "out_proj.bias": np.asarray(p["b_o"]),
    }


def _attention_from_torch(state: dict, prefix: str, N: int) -> dict:
    w = state[f"{prefix}in_proj_weight"]
    b = state[f"{prefix}in_proj_bias"]
    D = w.shape[1]
    H = D // N
    out = {}
    for i, x in enumerate("qkv"):
        out[f"w_{x}"] = w[i * D : (i + 1) * D].T.reshape(D, N, H)
        out[f"b_{x}"] = b[i * D : (i + 1) * D].reshape(N, H)
    out["w_o"] = state[f"{prefix}out_proj.weight"].T.reshape(N, H, D)
    out["b_o"] = state[f"{prefix}out_proj.bias"]
    return out


def _block_to_torch(block: dict, names: dict) -> dict:
    """One layer's ``{torch name: array}`` from our block params (no leading L axis)."""
    state = {}
    for ours, theirs in names.items():
        p = block[ours]
        if ours == "ffn":
            state |= {"linear1.weight": p["w_1"].T, "linear1.bias": p["b_1"]}
            state |= {"linear2.weight": p["w_2"].T, "linear2.bias": p["b_2"]}
        elif ours.endswith("_norm"):
            state |= {f"{theirs}.weight": p["scale"], f"{theirs}.bias": p["bias"]}
        else:
            state |= {f"{theirs}.{k}": v for k, v in _attention_to_torch(p).items()}
    return {k: np.asarray(v) for k, v in state.items()}


def _block_from_torch(state: dict, prefix: str, names: dict, N: int) -> dict:
    block = {}
    for ours, theirs in names.items():
        if ours == "ffn":
            block[ours] = {
                "w_1": state[f"{prefix}linear1.weight"].T, "b_1": state[f"{prefix}linear1.bias"],
                "w_2": state[f"{prefix}linear2.weight"].T, "b_2": state[f"{prefix}linear2.bias"],
            }  # fmt: skip
        elif ours.endswith("_norm"):
            block[ours] = {"scale": state[f"{prefix}{theirs}.weight"], "bias": state[f"{prefix}{theirs}.bias"]}
        else:
            block[ours] = _attention_from_torch(state, f"{prefix}{theirs}.", N)
    return block


def to_torch(params: dict, config: TransformerConfig):
    """A ``TorchTransformer`` (``torch.nn.Module``) holding ``params``, in evaluation mode.

    Its ``.transformer`` is a ``torch.nn.Transformer`` (``batch_first=True``, post-norm as the paper unless
    ``norm_first``); the embeddings, positions and output projection sit beside it. Tensors get the parameters'
    precision (``.double()`` follows for float64 parameters).

    Args:
      params: from ``init_transformer`` (or a checkpoint) for ``config``.
      config: the model's ``TransformerConfig``; what torch cannot hold (grouped-query heads, a head size other
        than d_model / num_heads, no attention biases) raises a ``ConfigError`` naming the field.

    Returns:
      The torch module; ``module(src, tgt)`` gives ``attn_jax.transformer``'s logits.
    """
    import torch

    module = _torch_class()(config)
    state = {name: np.asarray(params[name]["embedding"]) for name in _table_names(config)}
    for stack, names in _layer_pairs(config).items():
        layers_tree = params[stack]["layers"]
        count = config.num_encoder_layers if stack == "encoder" else config.num_decoder_layers
        for i in range(count):
            block = _block_to_torch(_layer(layers_tree, i), names)
            state |= {f"transformer.{stack}.layers.{i}.{k}": v for k, v in block.items()}
        if config.has_final_norm:
            norm = params[stack]["norm"]
            state |= {f"transformer.{stack}.norm.weight": norm["scale"], f"transformer.{stack}.norm.bias": norm["bias"]}
        if config.positions == "learned":
            state[f"{stack}_positions"] = params[stack]["positions"]
    dtype = torch.float64 if np.asarray(params[_table_names(config)[0]]["embedding"]).dtype == np.float64 else None
    if dtype is not None:
        module = module.double()
    tensors = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()}
    if config.positions == "sinusoidal":  # recomputed in the module's precision (a float32 copy loses digits)
        tensors["sinusoids"] = torch.from_numpy(_sinusoids(config.max_len, config.d_model)).to(module.sinusoids.dtype)
    module.load_state_dict(tensors, strict=True)
    return module.eval()


def _layer(tree, i: int):
    """The ``i``-th slice along the leading ``L`` axis of a nested dict of arrays."""
    if isinstance(tree, dict):
        return {k: _layer(v, i) for k, v in tree.items()}
    return np.asarray(tree)[i]


def from_torch(module, config: TransformerConfig) -> dict:
    """``init_transformer``-shaped parameters from a ``TorchTransformer`` (``to_torch``'s module, or one you built).

    Args:
      module: a ``TorchTransformer``: a ``torch.nn.Module`` with ``.transformer`` (``torch.nn.Transformer``)
        and the embedding parameters ``to_torch`` names (``embedding`` or ``source_embedding`` and
        ``target_embedding``; ``output_embedding`` when untied; ``encoder_positions`` and ``decoder_positions``
        for learned positions).
      config: the ``TransformerConfig`` to load into; its sizes, ``norm_first``, ``layer_norm_epsilon`` and
        final norms must match the module (a post-norm ``torch.nn.Transformer`` keeps its final LayerNorms:
        use ``final_norm=True``, or set ``transformer.encoder.norm = transformer.decoder.norm = None``).

    Returns:
      The parameter tree, arrays in the module's precision.
    """
    _check_torch_compatible(config)
    torch_transformer = module.transformer
    _check_torch_matches(torch_transformer, config)
    state = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
    N = config.num_heads
    params = {name: {"embedding": jnp.asarray(state[name])} for name in _table_names(config)}
    for stack, names in _layer_pairs(config).items():
        count = config.num_encoder_layers if stack == "encoder" else config.num_decoder_layers
        blocks = [_block_from_torch(state, f"transformer.{stack}.layers.{i}.", names, N) for i in range(count)]
        stacked = {"layers": _stack(blocks)}
        if config.has_final_norm:
            prefix = f"transformer.{stack}.norm."
            stacked["norm"] = {
                "scale": jnp.asarray(state[prefix + "weight"]),
                "bias": jnp.asarray(state[prefix + "bias"]),
            }
        if config.positions == "learned":
            stacked["positions"] = jnp.asarray(state[f"{stack}_positions"])
        params[stack] = stacked
    return params


def _stack(blocks: list):
    if isinstance(blocks[0], dict):
        return {k: _stack([b[k] for b in blocks]) for k in blocks[0]}
    return jnp.asarray(np.stack(blocks))


def _check_torch_matches(torch_transformer, config: TransformerConfig) -> None:
    """Names the first ``TransformerConfig`` field the torch module disagrees with."""
    encoder, decoder = torch_transformer.encoder, torch_transformer.decoder
    first = (encoder.layers or decoder.layers)[0]
    found = {
        "d_model": first.self_attn.embed_dim,
        "num_heads": first.self_attn.num_heads,
        "d_ff": first.linear1.out_features,
        "num_encoder_layers": len(encoder.layers),
        "num_decoder_layers": len(decoder.layers),
        "norm_first": first.norm_first,
        "layer_norm_epsilon": first.norm1.eps,
        "final_norm": encoder.norm is not None,
    }
    expected = {name: getattr(config, name) for name in found} | {"final_norm": config.has_final_norm}
    for name, value in found.items():
        if value != expected[name]:
            raise ConfigError(f"TransformerConfig.{name}={expected[name]!r} but the torch module has {value!r}")
    if (decoder.norm is not None) != config.has_final_norm:
        raise ConfigError("TransformerConfig.final_norm: the torch encoder and decoder disagree on a final norm")
