"""The Grain pipeline: static bucket shapes, token budget, exact drop counts, determinism, resumption,
sharding, and the single evaluation pass."""

import numpy as np
import pytest

from attn_jax.data import batching, encoding, pipeline
from attn_jax.data.copy_task import FIRST_TOKEN_ID, CopySource
from attn_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

_COPY = CopySource(num_examples=300, vocab_size=50, min_length=1, max_length=30, seed=3)
_CONFIG = pipeline.PipelineConfig(max_length=32, tokens_per_batch=256, batch_multiple=2, num_threads=0)


def _take(batches: pipeline.Batches, count: int) -> list[dict[str, np.ndarray]]:
    iterator = batches.iterator()
    return [next(iterator) for _ in range(count)]


def _assert_same(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name


def test_copy_source_is_deterministic_and_reversible():
    again = CopySource(num_examples=300, vocab_size=50, min_length=1, max_length=30, seed=3)
    np.testing.assert_array_equal(_COPY[7]["source"], again[7]["source"])
    np.testing.assert_array_equal(_COPY[7]["source"], _COPY[7]["target"])
    reversed_source = CopySource(num_examples=300, vocab_size=50, max_length=30, seed=3, reverse=True)
    np.testing.assert_array_equal(reversed_source[5]["target"], reversed_source[5]["source"][::-1])
    lengths = [len(_COPY[i]["source"]) for i in range(len(_COPY))]
    assert min(lengths) >= 1 and max(lengths) <= 30
    assert min(int(_COPY[i]["source"].min()) for i in range(len(_COPY))) >= FIRST_TOKEN_ID
    with pytest.raises(IndexError):
        _COPY[300]


def test_bucket_boundaries_and_batch_sizes():
    boundaries = batching.bucket_boundaries(100)
    assert all(b % 8 == 0 for b in boundaries) and boundaries[-1] == 104
    assert list(boundaries) == sorted(set(boundaries))
    sizes = batching.batch_sizes(boundaries, tokens_per_batch=1000, batch_multiple=4)
    assert all(s % 4 == 0 and s * b <= 1000 for s, b in zip(sizes, boundaries, strict=True))
    with pytest.raises(ValueError, match="cannot hold 4 rows of length 104"):
        batching.batch_sizes(boundaries, tokens_per_batch=400, batch_multiple=4)


def test_shapes_budget_and_padding_only_at_the_end():
    batches = pipeline.train_batches(_COPY, encoding.token_pair_encoder(), _CONFIG)
    shapes = set(batches.stats.batch_shapes)
    assert all(length in _CONFIG.boundaries for _, length in shapes)
    for batch in _take(batches, 3 * batches.stats.batches_per_epoch):
        rows, length = batch["inputs"].shape
        assert (rows, length) in shapes
        assert rows * length <= _CONFIG.tokens_per_batch and rows % _CONFIG.batch_multiple == 0
        for name in ("inputs", "targets_in", "targets_out"):
            assert batch[name].dtype == np.int32 and batch[name].shape == (rows, length)
            real = batch[name] != PAD_ID
            # Each row: real tokens, then only padding.
            assert (real[:, :-1] >= real[:, 1:]).all(), name
        # A row fits the next smaller bucket only if it were shorter: buckets are tight.
        smaller = max((b for b in _CONFIG.boundaries if b < length), default=0)
        assert (batch["targets_out"] != PAD_ID).sum(axis=1).max() > smaller or (
            (batch["inputs"] != PAD_ID).sum(axis=1).max() > smaller
        )


def test_teacher_forcing_rows():
    batches = pipeline.train_batches(_COPY, encoding.token_pair_encoder(), _CONFIG)
    batch = next(iter(batches))
    for row, index in enumerate(batch["example_index"]):
        ids = _COPY[int(index)]["source"]
        n = len(ids)
        np.testing.assert_array_equal(batch["inputs"][row, : n + 1], np.append(ids, EOS_ID))
        np.testing.assert_array_equal(batch["targets_in"][row, : n + 1], np.insert(ids, 0, BOS_ID))
        np.testing.assert_array_equal(batch["targets_out"][row, : n + 1], np.append(ids, EOS_ID))
        assert not batch["inputs"][row, n + 1 :].any()


# Token-id pairs with known lengths for max_length=8 (a row holds 7 tokens plus EOS or BOS).
_LENGTHS = [(3, 4), (7, 2), (8, 1), (0, 3), (2, 0), (10, 10), (5, 7), (1, 1)]
_CONSTRUCTED = [
    {"source": np.arange(4, 4 + s, dtype=np.int32), "target": np.arange(20, 20 + t, dtype=np.int32)}
    for s, t in _LENGTHS
]


@pytest.mark.parametrize("overlong", ["drop", "truncate"])
def test_dropped_and_truncated_counts(overlong):
    config = pipeline.PipelineConfig(
        max_length=8, overlong=overlong, tokens_per_batch=8, bucket_boundaries=(8,), shuffle=False, num_threads=0
    )
    batches = pipeline.train_batches(_CONSTRUCTED, encoding.token_pair_encoder(), config)
    stats = batches.stats
    assert stats.num_examples == 8 and stats.dropped_empty == 2
    if overlong == "drop":
        assert (stats.dropped_too_long, stats.truncated, stats.batched_per_epoch) == (2, 0, 4)
        expected_rows = [0, 1, 6, 7]
    else:
        assert (stats.dropped_too_long, stats.truncated, stats.batched_per_epoch) == (0, 2, 6)
        expected_rows = [0, 1, 2, 5, 6, 7]
    seen = [int(b["example_index"][0]) for b in _take(batches, stats.batches_per_epoch)]
    assert seen == expected_rows


def test_truncated_target_keeps_no_eos():
    config = pipeline.PipelineConfig(max_length=8, overlong="truncate", tokens_per_batch=8, bucket_boundaries=(8,))
    batches = pipeline.eval_batches(_CONSTRUCTED[5:6], encoding.token_pair_encoder(), config)
    (batch,) = list(batches)
    np.testing.assert_array_equal(batch["inputs"][0], [4, 5, 6, 7, 8, 9, 10, EOS_ID])
    np.testing.assert_array_equal(batch["targets_in"][0], [BOS_ID, 20, 21, 22, 23, 24, 25, 26])
    np.testing.assert_array_equal(batch["targets_out"][0], [20, 21, 22, 23, 24, 25, 26, 27])
    assert batches.stats.truncated == 1


def test_same_seed_same_batches_and_new_order_each_epoch():
    first = pipeline.train_batches(_COPY, encoding.token_pair_encoder(), _CONFIG)
    second = pipeline.train_batches(_COPY, encoding.token_pair_encoder(), _CONFIG)
    per_epoch = first.stats.batches_per_epoch
    _assert_same(_take(first, 2 * per_epoch), _take(second, 2 * per_epoch))
    other = pipeline.train_batches(
        _COPY, encoding.token_pair_encoder(), pipeline.PipelineConfig(**{**_CONFIG.__dict__, "seed": 1})
    )
    assert _take(other, 1)[0]["inputs"].tobytes() != _take(first, 1)[0]["inputs"].tobytes()
    epochs = np.split(np.concatenate([b["example_index"] for b in _take(first, 2 * per_epoch)]), 2)
    for epoch in epochs:
        assert len(set(epoch.tolist())) == len(epoch) == first.stats.batched_per_epoch  # no repeats
    assert epochs[0].tolist() != epochs[1].tolist()


@pytest.mark.parametrize("num_threads", [0, 2])
def test_restored_iterator_gives_identical_batches(num_threads):
    config = pipeline.PipelineConfig(**{**_CONFIG.__dict__, "num_threads": num_threads, "prefetch_buffer_size": 4})
    batches = pipeline.train_batches(_COPY, encoding.token_pair_encoder(), config)
    skip = batches.stats.batches_per_epoch - 2  # resume across an epoch boundary
    iterator = batches.iterator()
    for _ in range(skip):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(5)]
    resumed = pipeline.train_batches(_COPY, encoding.token_pair_encoder(), config).iterator()
    resumed.set_state(state)
    _assert_same([next(resumed) for _ in range(5)], expected)


def test_two_shards_are_disjoint_and_make_up_the_global_batch():
    encoder = encoding.token_pair_encoder()
    whole = pipeline.train_batches(_COPY, encoder, _CONFIG)
    shards = [pipeline.train_batches(_COPY, encoder, _CONFIG, shard_index=i, shard_count=2) for i in range(2)]
    steps = whole.stats.batches_per_epoch
    assert all(shard.stats.batches_per_epoch == steps for shard in shards)
    for global_batch, *local in zip(_take(whole, steps), *(_take(shard, steps) for shard in shards), strict=True):
        assert local[0]["inputs"].shape == local[1]["inputs"].shape  # same bucket on every host
        assert not set(local[0]["example_index"].tolist()) & set(local[1]["example_index"].tolist())
        for name in global_batch:
            np.testing.assert_array_equal(np.concatenate([local[0][name], local[1][name]]), global_batch[name])


def test_eval_pass_covers_every_example_once_across_shards():
    encoder = encoding.token_pair_encoder()
    seen = []
    for shard_index in range(2):
        batches = pipeline.eval_batches(_COPY, encoder, _CONFIG, shard_index=shard_index, shard_count=2)
        for batch in batches:
            filler = batch["example_index"] == batching.NO_EXAMPLE
            for name in ("inputs", "targets_in", "targets_out"):
                assert not batch[name][filler].any()  # weights (targets_out != 0) are zero
            seen += batch["example_index"][~filler].tolist()
        assert batches.stats.dropped_empty == batches.stats.dropped_too_long == 0
    assert sorted(seen) == list(range(len(_COPY)))
    assert batches.stats.batched_per_epoch == len(_COPY)


def test_finite_epochs():
    config = pipeline.PipelineConfig(**{**_CONFIG.__dict__, "num_epochs": 2})
    batches = pipeline.train_batches(_COPY, encoding.token_pair_encoder(), config)
    assert len(batches.dataset) == 2 * batches.stats.batches_per_epoch
    assert sum(1 for _ in batches) == 2 * batches.stats.batches_per_epoch


def test_config_errors():
    # Under pytest the runtime type check (a TypeError) fires before __post_init__ (a ValueError).
    with pytest.raises((ValueError, TypeError), match="overlong"):
        pipeline.PipelineConfig(overlong="skip")
    with pytest.raises(ValueError, match="end at >= max_length"):
        pipeline.PipelineConfig(max_length=64, bucket_boundaries=(8, 16))
    with pytest.raises(ValueError, match="shard_index"):
        pipeline.train_batches(_COPY, encoding.token_pair_encoder(), _CONFIG, shard_index=2, shard_count=2)
