"""Preparation: ids encoded once into ArrayRecord shards, resumable after a kill, the same from worker processes
and from two hosts, through local copies for remote folders, and cached by data set and tokenizer."""

import json
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from attn_jax import defaults
from attn_jax.data import datasets, prepared
from attn_jax.data.copy_task import CopySource
from attn_jax.data.encoding import TokenPairEncoder
from tests.helpers import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
_SOURCE = CopySource(num_examples=300, vocab_size=50, min_length=1, max_length=30, seed=3)


class _FailingEncoder(TokenPairEncoder):
    """Dies at one example, as a preparation killed mid-shard would; counts what it encodes."""

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.fail_at, self.calls = fail_at, 0

    def __call__(self, example):
        self.calls += 1
        if self.calls - 1 == self.fail_at:
            raise KeyboardInterrupt("killed")
        return super().__call__(example)


def _files(directory: pathlib.Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_a_killed_preparation_resumes_with_the_shards_it_had_not_finished(tmp_path):
    reference = tmp_path / "reference"
    prepared.encode_split(_SOURCE, TokenPairEncoder(), reference, vocab_size=50, examples_per_shard=128)
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        prepared.encode_split(_SOURCE, _FailingEncoder(fail_at=270), killed, vocab_size=50, examples_per_shard=128)
    # Shards 0 and 1 are committed; shard 2 left nothing behind. A stale scratch file of a SIGKILL is ignored.
    assert sorted(p.name for p in killed.iterdir()) == [
        f"shard-0000{i}-of-00003.{ext}" for i in (0, 1) for ext in ("array_record", "npz")
    ]
    (killed / "shard-00002-of-00003.npz.tmp999").write_bytes(b"half a file")
    with pytest.raises(Exception, match="shard-00002-of-00003.npz is missing"):
        prepared.load_split(killed, num_examples=300, examples_per_shard=128)
    resumed = _FailingEncoder()
    done = prepared.encode_split(_SOURCE, resumed, killed, vocab_size=50, examples_per_shard=128)
    assert done == [2] and resumed.calls == 300 - 256
    (killed / "shard-00002-of-00003.npz.tmp999").unlink()
    assert _files(killed) == _files(reference)
    assert prepared.encode_split(_SOURCE, resumed, killed, vocab_size=50, examples_per_shard=128) == []


def test_worker_processes_write_the_same_shards(tmp_path):
    prepared.encode_split(_SOURCE, TokenPairEncoder(), tmp_path / "one", vocab_size=50, examples_per_shard=100)
    done = prepared.encode_split(
        _SOURCE, TokenPairEncoder(), tmp_path / "two", vocab_size=50, examples_per_shard=100, workers=2
    )
    assert done == [0, 1, 2]
    assert _files(tmp_path / "two") == _files(tmp_path / "one")


def test_a_remote_folder_is_written_and_read_through_local_copies(tmp_path, monkeypatch):
    remote = tmp_path / "bucket"
    monkeypatch.setattr(prepared, "_is_local", lambda path: not str(path).startswith(str(remote)))
    (tmp_path / "local").mkdir()
    monkeypatch.setattr(prepared.tempfile, "gettempdir", lambda: str(tmp_path / "local"))
    prepared.encode_split(_SOURCE, TokenPairEncoder(), remote / "ids", vocab_size=50, examples_per_shard=128)
    split = prepared.load_split(remote / "ids", num_examples=300, examples_per_shard=128)
    records = split.source()
    np.testing.assert_array_equal(np.frombuffer(records[299], np.uint16), np.tile(_SOURCE[299]["source"], 2))
    assert not list(remote.rglob("*.tmp*"))
    copies = sorted((tmp_path / "local" / "attn_jax_prepared").iterdir())
    assert len(copies) == 3 and all(p.stat().st_size > 0 for p in copies)


def _copy_config(**data):
    c = defaults.base_config()
    c.data = defaults.data_config(name="copy", examples_per_shard=100, prepare_workers=1, **data)
    c.data.copy = defaults.copy_task_config(train_examples=300, eval_examples=20)
    return c


def test_prepared_ids_are_cached_by_data_set_and_reused(tmp_path):
    first = datasets.prepare(_copy_config(), tmp_path)
    names = sorted(p.name for p in (tmp_path / "prepared").iterdir())
    assert [name.split("-")[0] for name in names] == ["train", "validation"]
    again = datasets.prepare(_copy_config(max_length=20, packing=True), tmp_path)  # batching: same ids
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == names
    np.testing.assert_array_equal(again.splits["train"].lengths, first.splits["train"].lengths)
    other = _copy_config()
    other.data.copy.seed = 1  # other data: other ids, beside the first
    datasets.prepare(other, tmp_path)
    assert len(list((tmp_path / "prepared").iterdir())) == 4
    shared = _copy_config(prepared_dir=str(tmp_path / "shared"))
    datasets.prepare(shared, tmp_path / "second_run")
    assert not (tmp_path / "second_run" / "prepared").exists() and len(list((tmp_path / "shared").iterdir())) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# One host of a two-process run: prepare the copy task's ids into the shared workdir, report the shards it encoded
# and a digest of the prepared lengths it then reads.
_HOST = """
import json, sys, jax
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from attn_jax.data import datasets, prepared
from tests.test_prepared import _copy_config
encoded = []
original = prepared._ShardJob.__call__
prepared._ShardJob.__call__ = lambda self, source, encoder, index: (encoded.append(index),
                                                                     original(self, source, encoder, index))
result = datasets.prepare(_copy_config(), sys.argv[3])
print(json.dumps({"encoded": encoded, "lengths": result.splits["train"].lengths.tolist()}))
"""


def test_two_hosts_each_encode_their_share_and_read_all(tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    env = subprocess_env(1, JAX_PLATFORMS="cpu")
    env.pop("PYTEST_CURRENT_TEST", None)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _HOST, address, str(index), str(tmp_path / "run")],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for index in range(2)
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
    hosts = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    # train has 3 shards (0, 2 on host 0; 1 on host 1), validation 1 (host 0).
    assert hosts[0]["encoded"] == [0, 2, 0] and hosts[1]["encoded"] == [1]
    expected = datasets.prepare(_copy_config(), tmp_path / "alone").splits["train"].lengths.tolist()
    assert hosts[0]["lengths"] == hosts[1]["lengths"] == expected
