"""Mixing a second prepared split into the training pairs (the Ding lexicon), and ids held in memory: the ratio in
pairs, determinism per seed, bit-exact resumption mid-stream (bucketed and packed), and the same batches from
memory as from the files."""

import shutil

import numpy as np
import pytest

from attn_jax.data import epochs, pipeline, prepared
from attn_jax.data.encoding import TokenPairEncoder

# Primary pairs use ids 4..39; every mixed-in pair's source starts with _MARK, so a batch tells them apart.
_MARK = 49
_RNG = np.random.default_rng(0)
_PRIMARY = [
    {"source": _RNG.integers(4, 40, n), "target": _RNG.integers(4, 40, m)}
    for n, m in _RNG.integers(3, 20, size=(400, 2))
]
_EXTRA = [
    {"source": np.concatenate([[_MARK], _RNG.integers(4, 40, n)]), "target": _RNG.integers(4, 40, m)}
    for n, m in _RNG.integers(1, 6, size=(1500, 2))
]
_RATIO = 0.3


def _prepare(examples, directory) -> prepared.PreparedSplit:
    prepared.encode_split(examples, TokenPairEncoder(), directory, vocab_size=50, examples_per_shard=512)
    return prepared.load_split(directory, num_examples=len(examples), examples_per_shard=512)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixing")
    return _prepare(_PRIMARY, root / "primary"), _prepare(_EXTRA, root / "extra")


def _config(packing: bool, **given) -> pipeline.PipelineConfig:
    fields = {"max_length": 24, "tokens_per_batch": 192, "batch_multiple": 2, "num_threads": 0, "mix_ratio": _RATIO}
    return pipeline.PipelineConfig(packing=packing, **fields | given)


def _take(batches: pipeline.Batches, count: int, start: dict | None = None) -> list[dict]:
    iterator = batches.iterator()
    if start is not None:
        iterator.set_state(start)
    taken = [next(iterator) for _ in range(count)]
    iterator.close()
    return taken


def _pair_sources(batch: dict) -> np.ndarray:
    """The first source id of every pair in the batch (packed rows hold several: each starts at position 0)."""
    if "inputs_positions" in batch:
        starts = (batch["inputs_positions"] == 0) & (batch["inputs_segment_ids"] > 0)
        return batch["inputs"][starts]
    return batch["inputs"][batch["example_index"] >= 0, 0]


def _same(first: list[dict], second: list[dict]) -> bool:
    return all(a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a) for a, b in zip(
        first, second, strict=True))  # fmt: skip


def test_an_epoch_holds_every_primary_pair_once_and_runs_through_the_extra_pairs_before_repeating():
    primary, extra = np.arange(10), np.arange(100, 107)
    assert epochs.extra_per_epoch(10, 7, 0.3) == round(10 * 0.3 / 0.7) == 4
    drawn = [epochs.epoch_pairs(primary, extra, 0.3, seed=5, epoch=e) for e in range(7)]
    for pairs in drawn:
        assert sorted(pairs[:10]) == list(range(10)) and len(pairs) == 14
    stream = np.concatenate([pairs[10:] for pairs in drawn])  # 28 draws = 4 cycles of the 7 extra pairs
    for cycle in range(4):
        assert sorted(stream[7 * cycle : 7 * cycle + 7]) == list(extra)
    # More extra pairs per epoch than there are: they repeat, still cycle by cycle.
    many = epochs.epoch_pairs(primary, extra[:3], 0.9, seed=5, epoch=1)[10:]
    assert len(many) == 90 and np.bincount(many - 100).tolist() == [30, 30, 30]
    again = epochs.epoch_pairs(primary, extra, 0.3, seed=5, epoch=3)
    other = epochs.epoch_pairs(primary, extra, 0.3, seed=6, epoch=3)
    assert again.tolist() == drawn[3].tolist() and other[10:].tolist() != again[10:].tolist()
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        epochs.extra_per_epoch(10, 7, 1.0)


@pytest.mark.parametrize("packing", [False, True])
def test_mixed_pairs_make_up_the_ratio_and_batches_depend_on_the_seed_alone(splits, packing):
    primary, extra = splits
    batches = pipeline.train_batches(primary, _config(packing), mixed_in=extra)
    per_epoch = batches.stats.batches_per_epoch
    firsts = np.concatenate([_pair_sources(b) for b in _take(batches, 3 * per_epoch)])
    # About 540 pairs an epoch: the share within 4 standard deviations of a binomial draw of that many.
    share = float((firsts == _MARK).mean())
    assert abs(share - _RATIO) < 4 * np.sqrt(_RATIO * (1 - _RATIO) / len(firsts)), share
    assert abs(batches.stats.mixed_in_per_epoch / batches.stats.batched_per_epoch - _RATIO) < 0.05
    # Both kinds share batches, not batches of one kind each: most packed batches, bucketed ones of a length both
    # kinds have.
    mixed = sum(0 < (_pair_sources(b) == _MARK).mean() < 1 for b in _take(batches, per_epoch))
    assert mixed > (per_epoch // 2 if packing else 0)
    # Deterministic per seed, and another seed draws other batches.
    assert _same(_take(pipeline.train_batches(primary, _config(packing), mixed_in=extra), 5), _take(batches, 5))
    other = pipeline.train_batches(primary, _config(packing, seed=1), mixed_in=extra)
    assert not _same(_take(other, 5), _take(batches, 5))
    # A ratio of 0 reads the primary split alone, as without a second split.
    alone = pipeline.train_batches(primary, _config(packing, mix_ratio=0.0), mixed_in=extra)
    assert _same(_take(alone, 5), _take(pipeline.train_batches(primary, _config(packing, mix_ratio=0.0)), 5))
    assert not any((_pair_sources(b) == _MARK).any() for b in _take(alone, 10))


@pytest.mark.parametrize("packing", [False, True])
def test_a_mixed_stream_resumes_bit_for_bit_mid_epoch_from_a_fresh_pipeline(splits, packing):
    primary, extra = splits
    batches = pipeline.train_batches(primary, _config(packing), mixed_in=extra)
    # Past the first epoch's end, then stopped mid-epoch, as a preempted run would be.
    stop = batches.stats.batches_per_epoch + 3
    iterator = batches.iterator()
    for _ in range(stop):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(batches.stats.batches_per_epoch)]
    # A new process: the pipeline built again (with prefetch threads this time), the state restored.
    rebuilt = pipeline.train_batches(primary, _config(packing, num_threads=2), mixed_in=extra)
    assert _same(_take(rebuilt, len(expected), start=state), expected)
    assert state == {"next_index": stop}


def test_small_splits_are_read_into_memory_once_and_give_the_files_batches(splits, tmp_path):
    primary, extra = splits
    assert isinstance(primary.reader(pipeline.PipelineConfig().in_memory_bytes), prepared.InMemoryIds)
    assert isinstance(primary.reader(primary.nbytes - 1), prepared.FileIds)
    assert primary.nbytes == sum(len(e["source"]) + len(e["target"]) for e in _PRIMARY) * 2  # uint16 ids
    from_files = pipeline.train_batches(primary, _config(True, in_memory_bytes=0), mixed_in=extra)
    from_memory = pipeline.train_batches(primary, _config(True), mixed_in=extra)
    assert _same(_take(from_memory, 12), _take(from_files, 12))
    # Once read, memory serves every pair: with the files gone, ids still come back right.
    copy = tmp_path / "copy"
    shutil.copytree(primary.directory, copy)
    moved = prepared.load_split(copy, num_examples=len(_PRIMARY), examples_per_shard=512)
    reader = moved.reader(1 << 20)
    reader.read(np.array([0]))
    shutil.rmtree(copy)
    example = np.array([399, 0, 7, 7])
    expected = np.concatenate([np.concatenate([_PRIMARY[i]["source"], _PRIMARY[i]["target"]]) for i in example])
    np.testing.assert_array_equal(reader.read(example), expected)
    assert reader.read(example).dtype == np.int32


def test_mixing_checks_its_ratio_and_the_splits_dtypes(splits):
    primary, extra = splits
    with pytest.raises(ValueError, match="mix_ratio must be in"):
        pipeline.PipelineConfig(mix_ratio=1.0)
    wide = prepared.PreparedSplit("wide", extra.paths, extra.lengths, "int32", extra.issues)
    with pytest.raises(prepared.DataError, match="uint16 ids"):
        prepared.concatenate(primary, wide)
