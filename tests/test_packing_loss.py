"""The pipeline's packed batches through the model: the loss and gradients of a packed batch equal those of the same
pairs one per row, so the segment ids and positions the data side writes are the ones the model honours."""

import jax
import jax.numpy as jnp
import numpy as np

import attn_jax as aj
from attn_jax import train
from attn_jax.data import pipeline
from attn_jax.data.tokenizer import BOS_ID, EOS_ID
from tests.helpers import assert_trees_allclose
from tests.test_packing import _read_back
from tests.test_pipeline import prepare_examples

CONFIG = aj.TransformerConfig(
    vocab_size=40, d_model=16, num_heads=2, d_ff=32, num_encoder_layers=1, num_decoder_layers=1, max_len=32,
    dropout_rate=0.0,
)  # fmt: skip


def _examples(count: int) -> list[dict]:
    """Targets half as long again as their sources, so packed source and target rows differ in length."""
    rng = np.random.default_rng(7)
    examples = []
    for _ in range(count):
        source = rng.integers(4, 40, size=rng.integers(1, 9)).astype(np.int32)
        examples.append({"source": source, "target": np.concatenate([source, source[: (len(source) + 1) // 2]])})
    return examples


def _one_per_row(pairs, length: int) -> dict:
    """The pairs unpacked, written from their definition: source + EOS, BOS + target, target + EOS."""
    rows = {key: np.zeros((len(pairs), length), np.int32) for key in ("inputs", "targets_in", "targets_out")}
    for row, (source, target) in enumerate(pairs):
        for key, ids in (("inputs", [*source, EOS_ID]), ("targets_in", [BOS_ID, *target]),
                         ("targets_out", [*target, EOS_ID])):  # fmt: skip
            rows[key][row, : len(ids)] = ids
    return rows


def test_packed_batch_gives_the_loss_and_gradients_of_its_pairs_alone(tmp_path):
    split = prepare_examples(_examples(200), tmp_path / "train", vocab_size=40)
    config = pipeline.PipelineConfig(max_length=24, tokens_per_batch=96, packing=True, num_threads=0)
    batches = pipeline.train_batches(split, config)
    source_length, target_length = batches.stats.batch_shapes[0][1:]
    assert source_length < target_length  # per-side row lengths
    packed = next(iter(batches))
    pairs = _read_back(packed)
    assert len(pairs) > packed["inputs"].shape[0]  # several pairs share rows
    params = aj.init_transformer(jax.random.key(0), CONFIG)

    def loss(p, batch):
        logits = train.forward(p, batch, model_config=CONFIG)
        return aj.cross_entropy_sums(logits, batch["targets_out"], label_smoothing=0.1)["loss"]

    loss_and_grads = jax.jit(jax.value_and_grad(loss))
    packed_loss, packed_grads = loss_and_grads(params, {k: jnp.asarray(v) for k, v in packed.items()})
    alone = {k: jnp.asarray(v) for k, v in _one_per_row(pairs, 24).items()}
    alone_loss, alone_grads = loss_and_grads(params, alone)
    np.testing.assert_allclose(float(packed_loss), float(alone_loss), rtol=1e-5)
    assert_trees_allclose(packed_grads, alone_grads, rtol=1e-4, atol=1e-5)
