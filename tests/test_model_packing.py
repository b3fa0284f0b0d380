"""Packing in the core: several sequences in one row, told apart by segment ids and restarting positions.

A packed row must give each of its sequences exactly the logits, loss and parameter gradients that sequence gets
alone (to float32 rounding): segment masks keep self-attention inside a sequence (causal in the decoder) and
cross-attention on the sequence's own source, and positions restart at 0. The references are the unpacked calls
of the same model, and ``attn_jax.train.forward`` with the data pipeline's batch keys. Decoding one sequence of a
packed source with the key/value cache (cross-attention restricted to that sequence) equals decoding it alone.
Sizes: D=13, N=3 heads of H=11 (GQA with 1 key/value head in one variant), F=17, V=19.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax as aj
from attn_jax import train
from attn_jax.masks import segment_mask, segment_positions
from tests.helpers import assert_trees_allclose

D, N, H, F, V = 13, 3, 11, 17, 19
SAME = 2e-5
CONFIG = aj.TransformerConfig(
    vocab_size=V, d_model=D, num_heads=N, head_dim=H, d_ff=F, num_encoder_layers=2, num_decoder_layers=2,
    max_len=16, dropout_rate=0.1,
)  # fmt: skip

# Two examples (source, decoder input, target output), packed into one row each side, then padding.
EXAMPLES = [
    ([3, 4, 5, 1], [2, 7, 8, 9], [7, 8, 9, 1]),
    ([6, 11, 1], [2, 12, 13], [12, 13, 1]),
]


def _pack(pieces, length):
    tokens, segments, positions = [], [], []
    for k, piece in enumerate(pieces, start=1):
        tokens += piece
        segments += [k] * len(piece)
        positions += list(range(len(piece)))
    pad = length - len(tokens)
    return [jnp.asarray([row + [0] * pad], jnp.int32) for row in (tokens, segments, positions)]


SRC, SRC_SEG, SRC_POS = _pack([e[0] for e in EXAMPLES], 9)
TGT_IN, TGT_SEG, TGT_POS = _pack([e[1] for e in EXAMPLES], 8)
TGT_OUT, _, _ = _pack([e[2] for e in EXAMPLES], 8)
PACKED_BATCH = {
    "inputs": SRC, "targets_in": TGT_IN, "targets_out": TGT_OUT,
    "inputs_segment_ids": SRC_SEG, "inputs_positions": SRC_POS,
    "targets_segment_ids": TGT_SEG, "targets_positions": TGT_POS,
}  # fmt: skip


# One compilation per config and shape: the config is a static pytree, so plain jax.jit takes it as an argument.
_transformer = jax.jit(aj.transformer)
_language_model = jax.jit(aj.language_model)
_encode = jax.jit(aj.encode)
_init_decode_cache = jax.jit(aj.init_decode_cache, static_argnames="max_len")
_decode_step = jax.jit(aj.decode_step)


def _random_params(init, config, seed):
    shapes = jax.eval_shape(lambda key: init(key, config), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        values = rng.normal(size=shape.shape)
        values = 1.0 + 0.2 * values if jax.tree_util.keystr(path).endswith("['scale']") else 0.3 * values
        return jnp.asarray(values, shape.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


VARIANTS = {
    "post_norm": {},
    "learned_pre_norm_gqa": {"positions": "learned", "norm_first": True, "num_kv_heads": 1},
}


@functools.cache
def _params(name):
    config = dataclasses.replace(CONFIG, **VARIANTS[name])
    return config, _random_params(aj.init_transformer, config, seed=list(VARIANTS).index(name))


def _spans(segments):
    segments = np.asarray(segments)[0]
    return [np.flatnonzero(segments == k) for k in range(1, segments.max() + 1)]


def test_segment_mask_and_positions_by_hand():
    mask = segment_mask(jnp.array([[1, 1, 2, 0]]), jnp.array([[1, 2, 2]]))
    assert mask.shape == (1, 1, 4, 3)
    assert mask[0, 0].astype(int).tolist() == [[1, 0, 0], [1, 0, 0], [0, 1, 1], [0, 0, 0]]
    np.testing.assert_array_equal(np.asarray(segment_positions(SRC_SEG))[0, :7], np.asarray(SRC_POS)[0, :7])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_packed_row_gives_each_example_its_own_logits(name):
    config, params = _params(name)
    packed = _transformer(
        params, SRC, TGT_IN, config=config, src_segment_ids=SRC_SEG, tgt_segment_ids=TGT_SEG,
        src_positions=SRC_POS, tgt_positions=TGT_POS,
    )  # fmt: skip
    for (src, tgt_in, _), span in zip(EXAMPLES, _spans(TGT_SEG), strict=True):
        alone = _transformer(params, jnp.asarray([src]), jnp.asarray([tgt_in]), config=config)
        np.testing.assert_allclose(np.asarray(packed)[0, span], np.asarray(alone)[0], rtol=SAME, atol=SAME)


def test_positions_default_to_restarting_at_each_segment():
    config, params = _params("post_norm")
    explicit = _transformer(
        params, SRC, TGT_IN, config=config, src_segment_ids=SRC_SEG, tgt_segment_ids=TGT_SEG,
        src_positions=SRC_POS, tgt_positions=TGT_POS,
    )  # fmt: skip
    derived = _transformer(params, SRC, TGT_IN, config=config, src_segment_ids=SRC_SEG, tgt_segment_ids=TGT_SEG)
    real = np.asarray(TGT_SEG) != 0
    np.testing.assert_allclose(np.asarray(derived)[real], np.asarray(explicit)[real], rtol=SAME, atol=SAME)


def test_train_forward_loss_and_gradients_of_a_packed_batch_equal_the_examples_alone():
    config, params = _params("post_norm")

    def loss(p, batch):
        logits = train.forward(p, batch, model_config=config)
        return aj.cross_entropy_sums(logits, batch["targets_out"], label_smoothing=0.1)["loss"]

    loss_and_grads = jax.jit(jax.value_and_grad(loss))
    packed_loss, packed_grads = loss_and_grads(params, PACKED_BATCH)
    # The same examples unpacked, one per row (padding at the end): the summed loss and gradients are the same.
    rows = {key: [] for key in ("inputs", "targets_in", "targets_out")}
    for example in EXAMPLES:
        for key, piece in zip(rows, example, strict=True):
            rows[key].append(piece + [0] * (4 - len(piece)))
    unpacked_loss, unpacked_grads = loss_and_grads(params, {k: jnp.asarray(v, jnp.int32) for k, v in rows.items()})
    np.testing.assert_allclose(float(packed_loss), float(unpacked_loss), rtol=SAME)
    assert_trees_allclose(packed_grads, unpacked_grads, rtol=1e-4, atol=1e-5)


def test_packed_language_model_equals_each_sequence_alone():
    config = dataclasses.replace(CONFIG, positions="learned")
    params = _random_params(aj.init_language_model, config, seed=7)
    packed = _language_model(params, TGT_IN, config=config, segment_ids=TGT_SEG, positions=TGT_POS)
    via_forward = jax.jit(train.forward)(params, {"targets_in": TGT_IN, "targets_segment_ids": TGT_SEG,
                                         "targets_positions": TGT_POS}, model_config=config)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(via_forward), np.asarray(packed))
    for (_, tokens, _), span in zip(EXAMPLES, _spans(TGT_SEG), strict=True):
        alone = _language_model(params, jnp.asarray([tokens]), config=config)
        np.testing.assert_allclose(np.asarray(packed)[0, span], np.asarray(alone)[0], rtol=SAME, atol=SAME)


def test_decoding_one_sequence_of_a_packed_source_equals_decoding_it_alone():
    config, params = _params("post_norm")
    memory = _encode(params, SRC, config=config, segment_ids=SRC_SEG, positions=SRC_POS)
    for k, (src, tgt_in, _) in enumerate(EXAMPLES, start=1):
        cache = _init_decode_cache(params, memory, SRC, config=config, max_len=6, src_mask=k == SRC_SEG)
        alone_memory = _encode(params, jnp.asarray([src]), config=config)
        alone_cache = _init_decode_cache(params, alone_memory, jnp.asarray([src]), config=config, max_len=6)
        tokens = jnp.asarray([tgt_in])
        for t in range(tokens.shape[1]):
            logits, cache = _decode_step(params, cache, tokens[:, t : t + 1], config=config)
            expected, alone_cache = _decode_step(params, alone_cache, tokens[:, t : t + 1], config=config)
            np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=SAME, atol=SAME)


def test_segment_ids_on_one_side_only_are_refused():
    config, params = _params("post_norm")
    with pytest.raises(ValueError, match="segment ids for both sides"):
        aj.transformer(params, SRC, TGT_IN, config=config, tgt_segment_ids=TGT_SEG)


def test_segment_ids_of_the_wrong_shape_are_refused(without_runtime_typechecks):
    config, params = _params("post_norm")
    with pytest.raises(ValueError, match="segment_ids must be"):
        aj.transformer(params, SRC, TGT_IN, config=config, src_segment_ids=SRC_SEG[:, :5], tgt_segment_ids=TGT_SEG)
