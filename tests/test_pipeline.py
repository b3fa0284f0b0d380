"""The Grain pipeline on prepared ids: static bucket shapes, token budget, exact drop counts, determinism,
resumption (threads and worker processes), sharding, and the single evaluation pass."""

import numpy as np
import pytest

from attn_jax.data import batching, pipeline, prepared
from attn_jax.data.copy_task import FIRST_TOKEN_ID, CopySource
from attn_jax.data.encoding import TokenPairEncoder
from attn_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

_COPY = CopySource(num_examples=300, vocab_size=50, min_length=1, max_length=30, seed=3)
_CONFIG = pipeline.PipelineConfig(max_length=32, tokens_per_batch=256, batch_multiple=2, num_threads=0)
_MODEL_KEYS = ("inputs", "targets_in", "targets_out")


def prepare_examples(examples, directory, *, vocab_size=50, examples_per_shard=128) -> prepared.PreparedSplit:
    """Token-id examples encoded into prepared ids under ``directory``."""
    prepared.encode_split(
        examples, TokenPairEncoder(), directory, vocab_size=vocab_size, examples_per_shard=examples_per_shard
    )
    return prepared.load_split(directory, num_examples=len(examples), examples_per_shard=examples_per_shard)


@pytest.fixture(scope="module")
def copy_split(tmp_path_factory):
    return prepare_examples(_COPY, tmp_path_factory.mktemp("prepared") / "train")


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


def test_prepared_ids_round_trip(copy_split):
    assert copy_split.dtype == "uint16" and len(copy_split.paths) == 3  # 300 pairs, 128 per shard
    records = copy_split.source()
    for index in (0, 127, 128, 299):
        ids = np.frombuffer(records[index], np.uint16)
        np.testing.assert_array_equal(ids, np.concatenate([_COPY[index]["source"], _COPY[index]["target"]]))
        assert copy_split.lengths[index].tolist() == [len(_COPY[index]["source"])] * 2


def test_shapes_budget_and_padding_only_at_the_end(copy_split):
    batches = pipeline.train_batches(copy_split, _CONFIG)
    shapes = set(batches.stats.batch_shapes)
    assert all(source == target and source in _CONFIG.boundaries for _, source, target in shapes)
    for batch in _take(batches, 3 * batches.stats.batches_per_epoch):
        rows, length = batch["inputs"].shape
        assert (rows, length, length) in shapes
        assert rows * length <= _CONFIG.tokens_per_batch and rows % _CONFIG.batch_multiple == 0
        for name in _MODEL_KEYS:
            assert batch[name].dtype == np.int32 and batch[name].shape == (rows, length)
            real = batch[name] != PAD_ID
            # Each row: real tokens, then only padding.
            assert (real[:, :-1] >= real[:, 1:]).all(), name
        # A row fits the next smaller bucket only if it were shorter: buckets are tight.
        smaller = max((b for b in _CONFIG.boundaries if b < length), default=0)
        assert (batch["targets_out"] != PAD_ID).sum(axis=1).max() > smaller


def test_teacher_forcing_rows(copy_split):
    batch = next(iter(pipeline.train_batches(copy_split, _CONFIG)))
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


@pytest.fixture(scope="module")
def constructed_split(tmp_path_factory):
    return prepare_examples(_CONSTRUCTED, tmp_path_factory.mktemp("constructed") / "train")


@pytest.mark.parametrize("overlong", ["drop", "truncate"])
def test_dropped_and_truncated_counts(constructed_split, overlong):
    config = pipeline.PipelineConfig(
        max_length=8, overlong=overlong, tokens_per_batch=8, bucket_boundaries=(8,), shuffle=False, num_threads=0
    )
    batches = pipeline.train_batches(constructed_split, config)
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


def test_truncated_target_keeps_no_eos(tmp_path):
    split = prepare_examples(_CONSTRUCTED[5:6], tmp_path / "one")
    config = pipeline.PipelineConfig(max_length=8, overlong="truncate", tokens_per_batch=8, bucket_boundaries=(8,))
    batches = pipeline.eval_batches(split, config)
    (batch,) = list(batches)
    np.testing.assert_array_equal(batch["inputs"][0], [4, 5, 6, 7, 8, 9, 10, EOS_ID])
    np.testing.assert_array_equal(batch["targets_in"][0], [BOS_ID, 20, 21, 22, 23, 24, 25, 26])
    np.testing.assert_array_equal(batch["targets_out"][0], [20, 21, 22, 23, 24, 25, 26, 27])
    assert batches.stats.truncated == 1


def test_padding_fraction_counts_every_slot(constructed_split):
    config = pipeline.PipelineConfig(max_length=8, tokens_per_batch=8, bucket_boundaries=(8,), shuffle=False)
    batches = pipeline.train_batches(constructed_split, config)
    # Kept pairs (3, 4), (7, 2), (5, 7), (1, 1) in rows of 8: real tokens are the ids plus EOS (or BOS).
    source, target = 4 + 8 + 6 + 2, 5 + 3 + 8 + 2
    assert batches.stats.padding_fraction_inputs == pytest.approx(1 - source / 32)
    assert batches.stats.padding_fraction_targets == pytest.approx(1 - target / 32)
    assert batches.stats.padding_fraction == pytest.approx(1 - (source + target) / 64)
    observed = sum(int((b["targets_out"] != PAD_ID).sum()) for b in _take(batches, 4))
    assert observed == target


def test_same_seed_same_batches_and_new_order_each_epoch(copy_split):
    first = pipeline.train_batches(copy_split, _CONFIG)
    second = pipeline.train_batches(copy_split, _CONFIG)
    per_epoch = first.stats.batches_per_epoch
    _assert_same(_take(first, 2 * per_epoch), _take(second, 2 * per_epoch))
    other = pipeline.train_batches(copy_split, pipeline.PipelineConfig(**{**_CONFIG.__dict__, "seed": 1}))
    assert _take(other, 1)[0]["inputs"].tobytes() != _take(first, 1)[0]["inputs"].tobytes()
    epochs = np.split(np.concatenate([b["example_index"] for b in _take(first, 2 * per_epoch)]), 2)
    for epoch in epochs:
        assert len(set(epoch.tolist())) == len(epoch) == first.stats.batched_per_epoch  # no repeats
    assert epochs[0].tolist() != epochs[1].tolist()


@pytest.mark.parametrize(("num_threads", "packing"), [(0, False), (2, False), (2, True)])
def test_restored_iterator_gives_identical_batches(copy_split, num_threads, packing):
    config = pipeline.PipelineConfig(
        **{**_CONFIG.__dict__, "num_threads": num_threads, "prefetch_buffer_size": 4, "packing": packing}
    )
    batches = pipeline.train_batches(copy_split, config)
    skip = batches.stats.batches_per_epoch - 2  # resume across an epoch boundary
    iterator = batches.iterator()
    for _ in range(skip):
        next(iterator)
    state = iterator.get_state()
    assert state == {"next_index": skip}
    expected = [next(iterator) for _ in range(5)]
    resumed = pipeline.train_batches(copy_split, config).iterator()
    resumed.set_state(state)
    _assert_same([next(resumed) for _ in range(5)], expected)


@pytest.mark.parametrize("packing", [False, True])
def test_two_shards_are_disjoint_and_make_up_the_global_batch(copy_split, packing):
    config = pipeline.PipelineConfig(**{**_CONFIG.__dict__, "packing": packing})
    whole = pipeline.train_batches(copy_split, config)
    shards = [pipeline.train_batches(copy_split, config, shard_index=i, shard_count=2) for i in range(2)]
    steps = whole.stats.batches_per_epoch
    assert all(shard.stats.batches_per_epoch == steps for shard in shards)
    for global_batch, *local in zip(_take(whole, steps), *(_take(shard, steps) for shard in shards), strict=True):
        assert local[0]["inputs"].shape == local[1]["inputs"].shape  # same shape on every host
        for name in global_batch:
            np.testing.assert_array_equal(np.concatenate([local[0][name], local[1][name]]), global_batch[name])


def test_eval_pass_covers_every_example_once_across_shards(copy_split):
    seen = []
    for shard_index in range(2):
        batches = pipeline.eval_batches(copy_split, _CONFIG, shard_index=shard_index, shard_count=2)
        for batch in batches:
            filler = batch["example_index"] == batching.NO_EXAMPLE
            for name in _MODEL_KEYS:
                assert not batch[name][filler].any()  # weights (targets_out != 0) are zero
            seen += batch["example_index"][~filler].tolist()
        assert batches.stats.dropped_empty == batches.stats.dropped_too_long == 0
    assert sorted(seen) == list(range(len(_COPY)))
    assert batches.stats.batched_per_epoch == len(_COPY)


def test_finite_epochs(copy_split):
    config = pipeline.PipelineConfig(**{**_CONFIG.__dict__, "num_epochs": 2})
    batches = pipeline.train_batches(copy_split, config)
    assert len(batches.dataset) == 2 * batches.stats.batches_per_epoch
    assert sum(1 for _ in batches) == 2 * batches.stats.batches_per_epoch


def test_language_model_batches_hold_the_target_side_only(constructed_split):
    config = pipeline.PipelineConfig(max_length=8, tokens_per_batch=8, bucket_boundaries=(8,), shuffle=False, task="lm")
    batches = pipeline.train_batches(constructed_split, config)
    assert batches.stats.dropped_empty == 1  # only the empty target counts; an empty source is fine
    batch = next(iter(batches))
    assert set(batch) == {"targets_in", "targets_out", "example_index"}


def test_config_errors(copy_split):
    # Under pytest the runtime type check (a TypeError) fires before __post_init__ (a ValueError).
    with pytest.raises((ValueError, TypeError), match="overlong"):
        pipeline.PipelineConfig(overlong="skip")
    with pytest.raises(ValueError, match="end at >= max_length"):
        pipeline.PipelineConfig(max_length=64, bucket_boundaries=(8, 16))
    with pytest.raises(ValueError, match="shard_index"):
        pipeline.train_batches(copy_split, _CONFIG, shard_index=2, shard_count=2)


def test_worker_processes_give_the_same_batches_and_their_state_resumes_bit_exact(copy_split):
    """Two Grain worker processes give the batches of the in-process pipeline, in order, and their state (the next
    batch's index) restores without them as well (a run may change its worker count)."""
    config = pipeline.PipelineConfig(**{**_CONFIG.__dict__, "packing": True})
    count = pipeline.train_batches(copy_split, config).stats.batches_per_epoch + 3
    expected = _take(pipeline.train_batches(copy_split, config), count)
    with_workers = pipeline.PipelineConfig(**{**config.__dict__, "worker_count": 2})
    iterator = pipeline.train_batches(copy_split, with_workers).iterator()
    try:
        got = [next(iterator) for _ in range(count - 3)]
        state = iterator.get_state()
        got += [next(iterator) for _ in range(3)]
    finally:
        iterator.close()
    _assert_same(got, expected)
    resumed = pipeline.train_batches(copy_split, config).iterator()
    resumed.set_state(state)
    _assert_same([next(resumed) for _ in range(3)], expected[-3:])
