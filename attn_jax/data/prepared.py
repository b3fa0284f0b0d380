"""Prepared ids: a split encoded once into ArrayRecord files of token ids, in worker processes, resumably.

Training then reads ids (no tokenizer in its loop), and the pair lengths written here are all the batching plan
needs: nothing downstream tokenizes or measures again.

Layout of one split, under a folder named by ``prepared_key`` (what the ids depend on: data set, features,
cleaning, tokenizer model, shard size; so another tokenizer or corpus never reuses them)::

    SPLIT/shard-00003-of-00090.array_record   one record per pair: source ids then target ids (uint16 when
                                              the vocabulary fits, else int32), no special ids
    SPLIT/shard-00003-of-00090.npz            lengths [n, 2] (source, target) and text-issue counts

A shard is one unit of work. Its ``.npz`` is written last, by atomic rename, so a shard is complete exactly when
its ``.npz`` exists: a preparation killed at any instant restarts with the shards it had not finished. Paths are
``etils.epath`` paths: a ``gs://`` folder is written through a local scratch file and read through a local copy
(ArrayRecord reads local files).

Reading (``PreparedSplit.reader``): a split whose ids fit under a size threshold (Ding's ~19k training pairs take
about 1 MB) is read whole into one array the first time a batch needs it, once per process, and batches then
gather their pairs' ids from memory with one NumPy index; a larger split (WMT) is read from its files per batch.
"""

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import pickle
import re
import tempfile
import threading
from collections.abc import Callable, Iterable

import grain
import numpy as np
from array_record.python import array_record_module
from etils import epath

from attn_jax.data.encoding import describe, read_examples
from attn_jax.data.text import TEXT_ISSUES, DataError

FORMAT_VERSION = 1
# One record per pair, each readable alone: random access reads one record, not a 64k-record chunk.
_WRITER_OPTIONS = "group_size:1"
_READ_CHUNK = 1024  # examples read from the source per call while encoding

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PreparedSplit:
    """The prepared ids of one split.

    Attributes:
      directory: the split's folder.
      paths: its ArrayRecord shards, in example order.
      lengths: ``int32 [N, 2]``: source and target ids per pair (special ids excluded).
      dtype: NumPy dtype of the stored ids.
      issues: what text cleaning fixed, summed over the split (``TEXT_ISSUES`` -> count).
    """

    directory: str
    paths: tuple[str, ...]
    lengths: np.ndarray
    dtype: str
    issues: dict[str, int]

    def __len__(self) -> int:
        return len(self.lengths)

    def source(self) -> grain.sources.ArrayRecordDataSource:
        """Random access to the records (bytes); picklable, so Grain worker processes open it themselves."""
        return grain.sources.ArrayRecordDataSource(list(_local_copies(self.paths)))

    @property
    def nbytes(self) -> int:
        """Bytes of all its ids."""
        return int(self.lengths.sum(dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def reader(self, max_bytes: int) -> "InMemoryIds | FileIds":
        """What batches read ids through: ``InMemoryIds`` when ``nbytes <= max_bytes``, else ``FileIds``."""
        return InMemoryIds(self) if self.nbytes <= max_bytes else FileIds(self)


class FileIds:
    """Reads pairs' ids from the split's ArrayRecord files, one record per pair (for splits too large to hold)."""

    def __init__(self, split: PreparedSplit):
        self._source, self._dtype = split.source(), np.dtype(split.dtype)

    def read(self, example: np.ndarray) -> np.ndarray:
        """``int32`` ids of the pairs ``example`` (``[M]``), concatenated: each pair's source ids, then its target
        ids."""
        records = self._source.__getitems__(example.tolist()) if len(example) else []
        return np.frombuffer(b"".join(records), self._dtype).astype(np.int32)


class InMemoryIds:
    """Every id of a split in one array, read from its files once per process, on first use (so a pickled reader,
    e.g. in a Grain worker process, carries no ids and reads them there)."""

    def __init__(self, split: PreparedSplit):
        self._split = split
        sizes = split.lengths.sum(axis=1, dtype=np.int64)
        self._starts, self._sizes = np.cumsum(sizes) - sizes, sizes
        self._ids: np.ndarray | None = None
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"_split": self._split, "_starts": self._starts, "_sizes": self._sizes}

    def __setstate__(self, state):
        self.__dict__.update(state, _ids=None, _lock=threading.Lock())

    def read(self, example: np.ndarray) -> np.ndarray:
        """As ``FileIds.read``, from memory."""
        ids = self._load()
        sizes = self._sizes[example]
        owner = np.repeat(np.arange(len(example)), sizes)
        within = np.arange(len(owner)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        return ids[self._starts[example][owner] + within].astype(np.int32)

    def _load(self) -> np.ndarray:
        with self._lock:
            if self._ids is None:
                source, records = self._split.source() if len(self._split) else None, []
                for start in range(0, len(self._split), _READ_CHUNK):
                    records += source.__getitems__(list(range(start, min(start + _READ_CHUNK, len(self._split)))))
                self._ids = np.frombuffer(b"".join(records), np.dtype(self._split.dtype))
                log.info("%s: %d ids held in memory", self._split.directory, len(self._ids))
            return self._ids


def concatenate(first: PreparedSplit, second: PreparedSplit) -> PreparedSplit:
    """One split holding ``first``'s pairs, then ``second``'s (indices ``len(first)...``); nothing is copied.

    Raises:
      DataError: the two store ids in different dtypes (prepared with different vocabularies).
    """
    if len(first) and len(second) and first.dtype != second.dtype:
        raise DataError(f"{first.directory} holds {first.dtype} ids, {second.directory} {second.dtype}")
    return PreparedSplit(
        directory=first.directory,
        paths=first.paths + second.paths,
        lengths=np.concatenate([first.lengths, second.lengths]),
        dtype=first.dtype if len(first) else second.dtype,
        issues={issue: first.issues.get(issue, 0) + second.issues.get(issue, 0) for issue in TEXT_ISSUES},
    )


def prepared_key(identity: dict, *, tokenizer_proto: bytes | None, examples_per_shard: int) -> str:
    """A short hash naming prepared ids: the data set's ``identity``, the tokenizer model and the shard size.

    Example:
      >>> a = prepared_key({"name": "copy"}, tokenizer_proto=None, examples_per_shard=10)
      >>> a == prepared_key({"name": "copy"}, tokenizer_proto=b"x", examples_per_shard=10), len(a)
      (False, 16)
    """
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, identity, examples_per_shard], sort_keys=True).encode())
    digest.update(hashlib.sha256(tokenizer_proto or b"").digest())
    return digest.hexdigest()[:16]


def id_dtype(vocab_size: int) -> str:
    """Smallest dtype that holds every id: ``uint16`` up to 65536 pieces (WMT's 37k), else ``int32``."""
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def shard_names(num_examples: int, examples_per_shard: int) -> list[str]:
    """File stems of a split's shards (at least one, so an empty split is prepared too).

    Example:
      >>> shard_names(25, 10)
      ['shard-00000-of-00003', 'shard-00001-of-00003', 'shard-00002-of-00003']
    """
    count = max(1, math.ceil(num_examples / examples_per_shard))
    return [f"shard-{index:05d}-of-{count:05d}" for index in range(count)]


def encode_split(
    source: grain.sources.RandomAccessDataSource,
    encoder: Callable,
    directory: str | os.PathLike,
    *,
    vocab_size: int,
    examples_per_shard: int,
    workers: int = 1,
    process_index: int = 0,
    process_count: int = 1,
) -> list[int]:
    """Encodes the shards of ``source`` that this process owns and that are not complete yet.

    Process ``p`` of ``process_count`` owns shards ``p, p + process_count, ...`` (every host of a multi-host run
    encodes its share into the shared folder; wait at a barrier before ``load_split``).

    Args:
      source: random-access examples.
      encoder: ``example -> (source ids, target ids, issues)`` (``attn_jax.data.encoding``); picklable.
      directory: the split's folder (local or ``gs://``).
      vocab_size: the vocabulary size (picks the id dtype).
      examples_per_shard: examples per shard.
      workers: processes encoding shards side by side; 1 (or a single shard to do) encodes in this process.
      process_index / process_count: this host and the number of hosts.

    Returns:
      The shard indices encoded by this call.

    Raises:
      DataError: an example cannot be encoded; the message names its record index and the source.
    """
    directory = epath.Path(directory)
    names = shard_names(len(source), examples_per_shard)
    todo = [
        index
        for index in range(process_index, len(names), process_count)
        if not (directory / f"{names[index]}.npz").exists()
    ]
    if not todo:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    job = _ShardJob(str(directory), names, examples_per_shard, id_dtype(vocab_size))
    workers = min(workers, len(todo))
    log.info("encoding %d of %d shards of %s with %d process(es)", len(todo), len(names), directory, max(workers, 1))
    if workers <= 1:
        for index in todo:
            job(source, encoder, index)
        return todo
    context = multiprocessing.get_context("spawn")  # JAX's threads make fork unsafe
    payload = pickle.dumps((source, encoder, job))
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(payload,)
    ) as pool:
        list(pool.map(_encode_in_worker, todo))
    return todo


def load_split(directory: str | os.PathLike, *, num_examples: int, examples_per_shard: int) -> PreparedSplit:
    """Opens a fully prepared split: its shard paths, and lengths and issue counts read from the ``.npz`` files.

    Raises:
      DataError: a shard is missing (preparation unfinished, e.g. a host that has not encoded its share).
    """
    directory = epath.Path(directory)
    lengths, issues, dtype = [], collections.Counter(), None
    for name in shard_names(num_examples, examples_per_shard):
        marker = directory / f"{name}.npz"
        if not marker.exists():
            raise DataError(f"prepared ids incomplete: {marker} is missing; rerun `attn-jax prepare`")
        with np.load(io.BytesIO(marker.read_bytes())) as saved:
            lengths.append(saved["lengths"])
            issues.update(json.loads(str(saved["issues"])))
            dtype = str(saved["dtype"])
    lengths = np.concatenate(lengths) if lengths else np.zeros((0, 2), np.int32)
    if len(lengths) != num_examples:
        raise DataError(f"{directory}: prepared {len(lengths)} pairs, the source has {num_examples}")
    paths = tuple(str(directory / f"{name}.array_record") for name in shard_names(num_examples, examples_per_shard))
    return PreparedSplit(
        directory=str(directory),
        paths=paths if num_examples else (),
        lengths=lengths,
        dtype=dtype,
        issues={issue: issues[issue] for issue in TEXT_ISSUES},
    )


@dataclasses.dataclass(frozen=True)
class _ShardJob:
    """Encodes one shard: writes its ArrayRecord file, then commits it by writing its ``.npz``."""

    directory: str
    names: list[str]
    examples_per_shard: int
    dtype: str

    def __call__(self, source, encoder, index: int) -> None:
        directory = epath.Path(self.directory)
        start = index * self.examples_per_shard
        stop = min(start + self.examples_per_shard, len(source))
        lengths = np.zeros((stop - start, 2), np.int32)
        issues: collections.Counter = collections.Counter()
        with tempfile.TemporaryDirectory(prefix="attn_jax_shard_") as scratch:
            local = os.path.join(scratch, "shard.array_record")
            writer = array_record_module.ArrayRecordWriter(local, _WRITER_OPTIONS)
            try:
                for row, (source_ids, target_ids, found) in enumerate(_encoded(source, encoder, start, stop)):
                    writer.write(np.concatenate([source_ids, target_ids]).astype(self.dtype).tobytes())
                    lengths[row] = len(source_ids), len(target_ids)
                    issues.update(found)
            finally:
                writer.close()
            _publish(local, directory / f"{self.names[index]}.array_record")
        marker = io.BytesIO()
        np.savez(marker, lengths=lengths, issues=np.asarray(json.dumps(issues)), dtype=np.asarray(self.dtype))
        _write_atomically(directory / f"{self.names[index]}.npz", marker.getvalue())


def _encoded(source, encoder, start: int, stop: int) -> Iterable[tuple]:
    for chunk in range(start, stop, _READ_CHUNK):
        indices = list(range(chunk, min(chunk + _READ_CHUNK, stop)))
        for index, example in zip(indices, read_examples(source, indices), strict=True):
            try:
                yield encoder(example)
            except DataError as error:
                raise DataError(f"record {index} of {describe(source)}: {error}") from None


def _publish(local: str, destination: epath.Path) -> None:
    """Moves a finished local file to ``destination`` (a scratch name there first, then a rename)."""
    scratch = destination.with_name(f"{destination.name}.tmp{os.getpid()}")
    if _is_local(destination):
        os.replace(local, scratch)
    else:
        epath.Path(local).copy(scratch, overwrite=True)
    scratch.rename(destination)


def _write_atomically(path: epath.Path, data: bytes) -> None:
    scratch = path.with_name(f"{path.name}.tmp{os.getpid()}")
    scratch.write_bytes(data)
    scratch.rename(path)


def _is_local(path) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", str(path)) is None


def _local_copies(paths: Iterable[str]) -> Iterable[str]:
    """The paths themselves when local; else copies in this machine's temp folder (made once, by rename)."""
    for path in paths:
        if _is_local(path):
            yield path
            continue
        local = epath.Path(tempfile.gettempdir(), "attn_jax_prepared", hashlib.sha256(path.encode()).hexdigest()[:16])
        if not local.exists():
            local.parent.mkdir(parents=True, exist_ok=True)
            scratch = local.with_name(f"{local.name}.tmp{os.getpid()}")
            epath.Path(path).copy(scratch, overwrite=True)
            scratch.rename(local)
        yield str(local)


# Worker processes: the source, encoder and job arrive once per process (the initializer), shard indices per task.
_worker_state: tuple | None = None


def _init_worker(payload: bytes) -> None:
    global _worker_state
    _worker_state = pickle.loads(payload)


def _encode_in_worker(index: int) -> None:
    source, encoder, job = _worker_state
    job(source, encoder, index)
