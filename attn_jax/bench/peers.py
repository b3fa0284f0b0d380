"""Peers for the training benchmark: the same encoder-decoder built from other libraries' standard layers.

* ``LinenTransformer``: ``flax.linen`` with ``nn.MultiHeadDotProductAttention``, ``nn.Dense``,
  ``nn.LayerNorm`` and ``nn.Embed`` (the layers of Flax's WMT example).
* ``torch_transformer``: ``torch.nn.Transformer`` (PyTorch, an optional ``bench`` extra), with token
  embeddings, sinusoidal positions and the tied output projection around it.

Both follow ``TransformerConfig`` as attn_jax does: post-norm (paper §3.1) or pre-norm (``norm_first``, with
a final LayerNorm after each stack as ``final_norm`` says), one embedding table shared by source, target and the
pre-softmax projection, scaled by sqrt(d_model) (§3.4), sinusoidal positions (§3.5), dropout on sub-layer
outputs and on embeddings + positions (§5.4), biases in every projection, layer norm epsilon
``config.layer_norm_epsilon``, so the parameter counts equal ``count_params(init_transformer(..))``
(``tests/test_bench.py``). ``torch.nn.Transformer`` always puts a final LayerNorm after each stack, which the
paper's post-norm model does not have, so its stacks are built with ``norm=None`` there, and its extra dropouts (on
the attention weights and inside the FFN) are switched off to match ``attention_dropout_rate = 0``. Peers
train with the same loss (label-smoothed cross-entropy over non-pad tokens) and Adam constants.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from attn_jax.layers import sinusoidal_positions
from attn_jax.losses import cross_entropy_sums
from attn_jax.model_config import TransformerConfig
from attn_jax.train import TrainState

# ----------------------------------------------------------------------------------------------------------
# flax.linen
# ----------------------------------------------------------------------------------------------------------


def _attention(config: TransformerConfig, name: str) -> nn.MultiHeadDotProductAttention:
    return nn.MultiHeadDotProductAttention(
        num_heads=config.num_heads,
        qkv_features=config.num_heads * config.resolved_head_dim,
        out_features=config.d_model,
        dropout_rate=config.attention_dropout_rate,
        use_bias=config.attention_bias,
        name=name,
    )


class _SubLayer(nn.Module):
    """Residual around ``sublayer``: post-norm ``LayerNorm(x + Dropout(sublayer(x)))``, or pre-norm
    ``x + Dropout(sublayer(LayerNorm(x)))`` with ``norm_first``."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, sublayer, deterministic: bool):
        c = self.config
        norm = nn.LayerNorm(epsilon=c.layer_norm_epsilon)
        dropout = nn.Dropout(c.dropout_rate)
        if c.norm_first:
            return x + dropout(sublayer(norm(x)), deterministic=deterministic)
        return norm(x + dropout(sublayer(x), deterministic=deterministic))


class _FeedForward(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.config.d_model)(nn.relu(nn.Dense(self.config.d_ff)(x)))


class _EncoderLayer(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        c = self.config
        attention = _attention(c, "self_attention")
        x = _SubLayer(c)(x, lambda h: attention(h, h, mask=mask, deterministic=deterministic), deterministic)
        return _SubLayer(c)(x, _FeedForward(c), deterministic)


class _DecoderLayer(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, y, memory, self_mask, cross_mask, deterministic: bool):
        c = self.config
        self_attention, cross_attention = _attention(c, "self_attention"), _attention(c, "cross_attention")
        y = _SubLayer(c)(y, lambda h: self_attention(h, h, mask=self_mask, deterministic=deterministic), deterministic)
        y = _SubLayer(c)(
            y, lambda h: cross_attention(h, memory, mask=cross_mask, deterministic=deterministic), deterministic
        )
        return _SubLayer(c)(y, _FeedForward(c), deterministic)


class LinenTransformer(nn.Module):
    """The encoder-decoder of ``config`` in ``flax.linen``: ``apply(variables, src [B, S], tgt [B, T]) -> [B, T, V]``.

    Example:
      >>> cfg = TransformerConfig(vocab_size=11, d_model=8, num_heads=2, d_ff=16, num_encoder_layers=1,
      ...                         num_decoder_layers=1)
      >>> model = LinenTransformer(cfg)
      >>> src, tgt = jnp.ones((2, 5), jnp.int32), jnp.ones((2, 3), jnp.int32)
      >>> variables = jax.eval_shape(model.init, jax.random.key(0), src, tgt)  # shapes only: instant
      >>> jax.eval_shape(model.apply, variables, src, tgt).shape
      (2, 3, 11)
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, src_tokens, tgt_tokens, deterministic: bool = True):
        c = self.config
        if not (c.share_embeddings and c.tie_output_embedding and c.positions == "sinusoidal"):
            raise ValueError("the linen peer models shared, tied embeddings and sinusoidal positions only")
        embedding = nn.Embed(c.vocab_size, c.d_model, embedding_init=nn.initializers.normal(c.d_model**-0.5))

        def embed(tokens):
            scale = math.sqrt(c.d_model) if c.scale_embeddings else 1.0
            x = embedding(tokens) * scale + sinusoidal_positions(tokens.shape[1], c.d_model)[None]
            return nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)

        src_real, tgt_real = src_tokens != c.pad_id, tgt_tokens != c.pad_id
        x = embed(src_tokens)
        for i in range(c.num_encoder_layers):
            x = _EncoderLayer(c, name=f"encoder_{i}")(x, nn.make_attention_mask(src_real, src_real), deterministic)
        if c.has_final_norm:
            x = nn.LayerNorm(epsilon=c.layer_norm_epsilon, name="encoder_norm")(x)
        self_mask = nn.combine_masks(nn.make_attention_mask(tgt_real, tgt_real), nn.make_causal_mask(tgt_tokens))
        cross_mask = nn.make_attention_mask(tgt_real, src_real)
        y = embed(tgt_tokens)
        for i in range(c.num_decoder_layers):
            y = _DecoderLayer(c, name=f"decoder_{i}")(y, x, self_mask, cross_mask, deterministic)
        if c.has_final_norm:
            y = nn.LayerNorm(epsilon=c.layer_norm_epsilon, name="decoder_norm")(y)
        return embedding.attend(y).astype(jnp.float32)


def init_linen_state(rng, config: TransformerConfig, batch: dict, tx) -> TrainState:
    """Parameters of ``LinenTransformer(config)`` and ``tx``'s state, in attn_jax's ``TrainState``."""
    params = LinenTransformer(config).init(rng, batch["inputs"], batch["targets_in"])["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def linen_train_step(state: TrainState, batch: dict, rng, *, config: TransformerConfig, tx, label_smoothing=0.1):
    """One Adam step of the linen peer on the token-averaged smoothed loss, as ``attn_jax.train.train_step``.

    Without attn_jax's guard that skips a non-finite update (a few elementwise ops per parameter): a peer
    written the usual way, so the comparison charges attn_jax for its guard.
    """
    model = LinenTransformer(config)
    dropout_rng = jax.random.fold_in(rng, state.step)

    def objective(params):
        logits = model.apply(
            {"params": params},
            batch["inputs"],
            batch["targets_in"],
            deterministic=False,
            rngs={"dropout": dropout_rng},
        )
        sums = cross_entropy_sums(logits, batch["targets_out"], label_smoothing=label_smoothing, pad_id=config.pad_id)
        return sums["loss"], sums

    grads, sums = jax.grad(objective, has_aux=True)(state.params)
    grads = jax.tree.map(lambda g: g / jnp.maximum(sums["weight"], 1.0), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state), sums


# ----------------------------------------------------------------------------------------------------------
# torch.nn.Transformer
# ----------------------------------------------------------------------------------------------------------


def torch_available() -> bool:
    """Whether PyTorch (the optional ``bench`` extra: ``pip install -e .[bench]``) can be imported."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def torch_transformer(config: TransformerConfig, *, seed: int = 0):
    """The encoder-decoder of ``config`` around ``torch.nn.Transformer``: ``model(src, tgt) -> logits [B, T, V]``.

    Raises ImportError when PyTorch is not installed.
    """
    import torch

    class TorchTransformer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            c = config
            torch.manual_seed(seed)
            layer_args = dict(
                d_model=c.d_model,
                nhead=c.num_heads,
                dim_feedforward=c.d_ff,
                dropout=c.dropout_rate,
                activation="relu",
                layer_norm_eps=c.layer_norm_epsilon,
                batch_first=True,
                norm_first=c.norm_first,
                bias=c.attention_bias,
            )

            def final_norm():
                return torch.nn.LayerNorm(c.d_model, eps=c.layer_norm_epsilon) if c.has_final_norm else None

            encoder = torch.nn.TransformerEncoder(
                torch.nn.TransformerEncoderLayer(**layer_args),
                c.num_encoder_layers,
                norm=final_norm(),
                enable_nested_tensor=False,
            )
            decoder = torch.nn.TransformerDecoder(
                torch.nn.TransformerDecoderLayer(**layer_args), c.num_decoder_layers, norm=final_norm()
            )
            self.transformer = torch.nn.Transformer(custom_encoder=encoder, custom_decoder=decoder, **layer_args)
            for module in self.transformer.modules():
                if isinstance(module, torch.nn.MultiheadAttention):
                    module.dropout = c.attention_dropout_rate
                if isinstance(module, torch.nn.TransformerEncoderLayer | torch.nn.TransformerDecoderLayer):
                    module.dropout = torch.nn.Identity()  # the dropout between the FFN's two linears
            self.embedding = torch.nn.Embedding(c.vocab_size, c.d_model)
            torch.nn.init.normal_(self.embedding.weight, std=c.d_model**-0.5)
            self.dropout = torch.nn.Dropout(c.dropout_rate)
            positions = np.asarray(sinusoidal_positions(c.max_len, c.d_model))
            self.register_buffer("positions", torch.tensor(positions), persistent=False)

        def embed(self, tokens):
            scale = math.sqrt(config.d_model) if config.scale_embeddings else 1.0
            return self.dropout(self.embedding(tokens) * scale + self.positions[: tokens.shape[1]])

        def forward(self, src, tgt):
            src_pad, tgt_pad = src == config.pad_id, tgt == config.pad_id  # True = padding, torch's convention
            T = tgt.shape[1]
            causal = torch.triu(torch.ones(T, T, dtype=torch.bool, device=tgt.device), diagonal=1)  # True = hidden
            y = self.transformer(
                self.embed(src),
                self.embed(tgt),
                tgt_mask=causal,
                src_key_padding_mask=src_pad,
                tgt_key_padding_mask=tgt_pad,
                memory_key_padding_mask=src_pad,
                tgt_is_causal=True,
            )
            return y @ self.embedding.weight.T  # tied pre-softmax projection

    return TorchTransformer()


def torch_train_step(model, *, config: TransformerConfig, learning_rate: float = 1e-4, label_smoothing: float = 0.1):
    """``step(batch of NumPy arrays) -> loss``: one Adam step of ``model`` (betas 0.9/0.98, eps 1e-9).

    The batch is converted to tensors once per call, as the JAX steps receive NumPy arrays. PyTorch spreads
    ``label_smoothing`` over all ``V`` classes where attn_jax spreads it over the ``V - 1`` others: the same
    work.
    """
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, betas=(0.9, 0.98), eps=1e-9)
    model.train()

    def step(batch: dict):
        src, tgt_in, tgt_out = (torch.tensor(np.asarray(batch[k])) for k in ("inputs", "targets_in", "targets_out"))
        logits = model(src.long(), tgt_in.long())
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, config.vocab_size),
            tgt_out.long().reshape(-1),
            ignore_index=config.pad_id,
            label_smoothing=label_smoothing,
            reduction="sum",
        )
        optimizer.zero_grad(set_to_none=True)
        (loss / (tgt_out != config.pad_id).sum().clamp(min=1)).backward()
        optimizer.step()
        return float(loss.detach())

    return step


def torch_param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
