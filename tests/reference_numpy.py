"""A float64 NumPy Transformer written from the paper's equations, for the tests to compare against.

Vaswani et al. 2017, "Attention Is All You Need":

* §3.1: every sub-layer is wrapped as LayerNorm(x + Sublayer(x)); ``norm_first=True`` is the common
  pre-norm variant x + Sublayer(LayerNorm(x)) with one more LayerNorm at the end of each stack.
* §3.2.1 (equation 1): Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V, illegal connections set to -inf.
* §3.2.2: MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).
  Grouped-query attention (Ainslie et al. 2023) lets query head i read key/value head i // (h / K).
* §3.3 (equation 2): FFN(x) = max(0, x W_1 + b_1) W_2 + b_2.
* §3.4: embeddings multiplied by sqrt(d_model); the pre-softmax projection is the embedding matrix, transposed.
* §3.5: PE(pos, 2i) = sin(pos / 10000^(2i / d_model)), PE(pos, 2i + 1) = cos(pos / 10000^(2i / d_model)).

Everything is written with explicit loops over heads, layers and positions, independently of ``attn_jax``'s
einsum layout. The only things taken from ``attn_jax`` are the parameter tree's key names and the shapes of
its weight matrices (``w_q [D, N, H]``, ``w_o [N, H, D]``, layers stacked on a leading ``L`` axis), which the
reference must read. Padding only masks *keys*: a real position never looks at a padded one, so logits at real
positions are well defined; what a padded position itself outputs is a convention the paper leaves open, and
tests compare real positions only wherever there is padding.
"""

import math

import numpy as np


def to_float64(tree):
    """Converts a (nested dict) parameter tree to float64 NumPy arrays."""
    if isinstance(tree, dict):
        return {name: to_float64(sub) for name, sub in tree.items()}
    return np.asarray(tree, np.float64)


def layer(stack: dict, index: int) -> dict:
    """The ``index``-th layer's parameters from a tree whose leaves carry a leading ``L`` axis."""
    if isinstance(stack, dict):
        return {name: layer(sub, index) for name, sub in stack.items()}
    return stack[index]


# ----------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------


def layer_norm(x, scale, bias, epsilon):
    """(x - mean) / sqrt(variance + epsilon) * scale + bias over the last axis (biased variance)."""
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + epsilon) * scale + bias


def feed_forward(x, w_1, b_1, w_2, b_2):
    """Equation 2: max(0, x W_1 + b_1) W_2 + b_2."""
    return np.maximum(0.0, x @ w_1 + b_1) @ w_2 + b_2


def sinusoid(length: int, d_model: int, offset: int = 0):
    """§3.5, one entry at a time: column 2i is sin(pos / 10000^(2i/d_model)), column 2i+1 the cosine."""
    table = np.zeros((length, d_model), np.float64)
    for row in range(length):
        pos = row + offset
        for column in range(d_model):
            two_i = column - column % 2
            angle = pos / 10000.0 ** (two_i / d_model)
            table[row, column] = math.sin(angle) if column % 2 == 0 else math.cos(angle)
    return table


def softmax(logits, allowed):
    """Softmax over the last axis with disallowed entries at -inf; a row with nothing allowed is all zeros."""
    logits = np.where(allowed, logits, -np.inf)
    top = logits.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    unnormalised = np.where(allowed, np.exp(logits - top), 0.0)
    total = unnormalised.sum(axis=-1, keepdims=True)
    return np.divide(unnormalised, total, out=np.zeros_like(unnormalised), where=total > 0)


def multi_head_attention(p: dict, x_q, x_kv, allowed):
    """§3.2.2 with one explicit loop over heads.

    Args:
      p: ``w_q [D, N, H], w_k [D, K, H], w_v [D, K, H], w_o [N, H, D]`` and optionally ``b_q, b_k, b_v, b_o``.
      x_q: ``[B, T, D]`` queries' inputs.
      x_kv: ``[B, S, D]`` keys' and values' inputs.
      allowed: ``[B, T, S]`` boolean, True where query t may attend to key s.

    Returns:
      ``([B, T, D], weights [B, N, T, S])``.
    """
    num_heads, head_dim = p["w_q"].shape[1], p["w_q"].shape[2]
    num_kv_heads = p["w_k"].shape[1]
    group = num_heads // num_kv_heads
    batch, queries = x_q.shape[:2]
    keys = x_kv.shape[1]
    concat = np.zeros((batch, queries, num_heads * head_dim))
    weights = np.zeros((batch, num_heads, queries, keys))
    for i in range(num_heads):
        j = i // group  # the key/value head this query head reads
        q = x_q @ p["w_q"][:, i, :] + (p["b_q"][i] if "b_q" in p else 0.0)  # [B, T, H]
        k = x_kv @ p["w_k"][:, j, :] + (p["b_k"][j] if "b_k" in p else 0.0)  # [B, S, H]
        v = x_kv @ p["w_v"][:, j, :] + (p["b_v"][j] if "b_v" in p else 0.0)  # [B, S, H]
        head_weights = softmax(q @ k.transpose(0, 2, 1) / math.sqrt(head_dim), allowed)  # [B, T, S]
        weights[:, i] = head_weights
        concat[:, :, i * head_dim : (i + 1) * head_dim] = head_weights @ v
    w_o = p["w_o"].reshape(num_heads * head_dim, -1)  # rows ordered head by head, as Concat orders columns
    return concat @ w_o + p.get("b_o", 0.0), weights


# ----------------------------------------------------------------------------------------------------------
# Sub-layer wrapper, layers and stacks
# ----------------------------------------------------------------------------------------------------------


def sublayer(x, norm: dict, function, config):
    """Post-norm LayerNorm(x + f(x)) (§3.1), or pre-norm x + f(LayerNorm(x)). Returns (x, f's extra output)."""
    eps = config.layer_norm_epsilon
    if config.norm_first:
        y, extra = function(layer_norm(x, norm["scale"], norm["bias"], eps))
        return x + y, extra
    y, extra = function(x)
    return layer_norm(x + y, norm["scale"], norm["bias"], eps), extra


def _ffn(p):
    return lambda h: (feed_forward(h, p["w_1"], p["b_1"], p["w_2"], p["b_2"]), None)


def self_attention_layer(p: dict, x, allowed, config):
    """An encoder layer (and a decoder-only LM's layer): self-attention then FFN. Returns (x, weights)."""
    x, weights = sublayer(
        x, p["self_attention_norm"], lambda h: multi_head_attention(p["self_attention"], h, h, allowed), config
    )
    x, _ = sublayer(x, p["ffn_norm"], _ffn(p["ffn"]), config)
    return x, weights


def decoder_layer(p: dict, y, memory, self_allowed, cross_allowed, config):
    """A decoder layer: masked self-attention, encoder-decoder attention, FFN. Returns (y, self_w, cross_w)."""
    y, self_w = sublayer(
        y, p["self_attention_norm"], lambda h: multi_head_attention(p["self_attention"], h, h, self_allowed), config
    )
    y, cross_w = sublayer(
        y,
        p["cross_attention_norm"],
        lambda h: multi_head_attention(p["cross_attention"], h, memory, cross_allowed),
        config,
    )
    y, _ = sublayer(y, p["ffn_norm"], _ffn(p["ffn"]), config)
    return y, self_w, cross_w


def embed_with_positions(table, stack: dict, tokens, config, offset: int = 0):
    """§3.4 + §3.5: E[token] * sqrt(d_model) + PE(pos)."""
    tokens = np.asarray(tokens)
    x = table[tokens] * (math.sqrt(config.d_model) if config.scale_embeddings else 1.0)
    length = tokens.shape[1]
    if config.positions == "learned":
        positions = stack["positions"][offset : offset + length]
    else:
        positions = sinusoid(length, config.d_model, offset)
    return x + positions[None]


def _stack(weights: list):
    """Per-layer weights stacked on a leading L axis (an empty stack has none)."""
    return np.stack(weights) if weights else np.zeros((0,))


def _final_norm(stack, x, config):
    if not config.norm_first:
        return x
    return layer_norm(x, stack["norm"]["scale"], stack["norm"]["bias"], config.layer_norm_epsilon)


def _tables(params, config):
    """(source table, target table, output table) following share_embeddings / tie_output_embedding."""
    if config.share_embeddings:
        source = target = params["embedding"]["embedding"]
    else:
        source = params["source_embedding"]["embedding"]
        target = params["target_embedding"]["embedding"]
    output = target if config.tie_output_embedding else params["output_embedding"]["embedding"]
    return source, target, output


def encoder(params: dict, src_tokens, config):
    """The encoder stack. Returns (memory [B, S, D], weights [L, B, N, S, S])."""
    params = to_float64(params)
    source, _, _ = _tables(params, config)
    stack = params["encoder"]
    src_real = np.asarray(src_tokens) != config.pad_id  # [B, S]
    allowed = np.broadcast_to(src_real[:, None, :], (src_real.shape[0], src_real.shape[1], src_real.shape[1]))
    x = embed_with_positions(source, stack, src_tokens, config)
    all_weights = []
    for index in range(config.num_encoder_layers):
        x, weights = self_attention_layer(layer(stack["layers"], index), x, allowed, config)
        all_weights.append(weights)
    return _final_norm(stack, x, config), _stack(all_weights)


def decoder(params: dict, tgt_tokens, memory, src_tokens, config):
    """The decoder stack with teacher forcing. Returns (logits [B, T, V], self_w [L,B,N,T,T], cross_w [L,B,N,T,S])."""
    params = to_float64(params)
    _, target, output = _tables(params, config)
    stack = params["decoder"]
    tgt_tokens, src_tokens = np.asarray(tgt_tokens), np.asarray(src_tokens)
    length = tgt_tokens.shape[1]
    causal = np.array([[s <= t for s in range(length)] for t in range(length)])  # [T, T]
    self_allowed = causal[None] & (tgt_tokens != config.pad_id)[:, None, :]  # [B, T, T]
    cross_allowed = np.broadcast_to(
        (src_tokens != config.pad_id)[:, None, :], (src_tokens.shape[0], length, src_tokens.shape[1])
    )
    y = embed_with_positions(target, stack, tgt_tokens, config)
    self_weights, cross_weights = [], []
    for index in range(config.num_decoder_layers):
        y, self_w, cross_w = decoder_layer(
            layer(stack["layers"], index), y, memory, self_allowed, cross_allowed, config
        )
        self_weights.append(self_w)
        cross_weights.append(cross_w)
    logits = _final_norm(stack, y, config) @ output.T
    return logits, _stack(self_weights), _stack(cross_weights)


def transformer(params: dict, src_tokens, tgt_tokens, config):
    """The encoder-decoder model. Returns (logits [B, T, V], {"encoder", "decoder", "cross"} weights)."""
    memory, encoder_weights = encoder(params, src_tokens, config)
    logits, self_w, cross_w = decoder(params, tgt_tokens, memory, src_tokens, config)
    return logits, {"encoder": encoder_weights, "decoder": self_w, "cross": cross_w}


def language_model(params: dict, tokens, config):
    """A decoder-only LM: causal self-attention + FFN layers. Returns (logits [B, T, V], weights [L,B,N,T,T])."""
    params = to_float64(params)
    table = params["embedding"]["embedding"]
    output = table if config.tie_output_embedding else params["output_embedding"]["embedding"]
    stack = params["decoder"]
    tokens = np.asarray(tokens)
    length = tokens.shape[1]
    causal = np.array([[s <= t for s in range(length)] for t in range(length)])
    allowed = causal[None] & (tokens != config.pad_id)[:, None, :]
    x = embed_with_positions(table, stack, tokens, config)
    all_weights = []
    for index in range(config.num_decoder_layers):
        x, weights = self_attention_layer(layer(stack["layers"], index), x, allowed, config)
        all_weights.append(weights)
    return _final_norm(stack, x, config) @ output.T, _stack(all_weights)
