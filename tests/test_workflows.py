"""The workflows people run, as they run them: ``attn-jax`` in subprocesses on real workdirs, chained.

Train a text model on a small generated file in the Ding dictionary's format (the real one is GPL and fetched at
run time only), then evaluate it, translate with it (as arguments and as a stream on stdin), average its
checkpoints and read the average back; readers run next to a trainer that is saving; a copy-task run (no
tokenizer) asked to translate; every parallel strategy and gradient accumulation through the command line; a
broken torch install; a workdir on a URL (``gs://``), served by a filesystem that is not the local one.

Readers (eval, translate, average) must never write, create or delete anything in a run's workdir (average: only
under ``checkpoints/averaged``) and must not rebuild or download a data set to load a model.
"""

import itertools
import json
import os
import pathlib
import select
import shutil
import subprocess
import sys
import time

import pytest

from attn_jax.checkpoint import Checkpointer
from attn_jax.metrics import read_metrics
from tests.helpers import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "experiments" / "tiny.py")
DING = str(ROOT / "experiments" / "ding_en_de.py")

_SUBJECTS = [("The dog", "Der Hund"), ("The cat", "Die Katze"), ("My father", "Mein Vater"),
             ("The teacher", "Der Lehrer"), ("Our neighbour", "Unser Nachbar"), ("The child", "Das Kind")]  # fmt: skip
_VERBS = [("sees", "sieht"), ("likes", "mag"), ("finds", "findet"), ("needs", "braucht"), ("buys", "kauft")]
_OBJECTS = [("the house", "das Haus"), ("a book", "ein Buch"), ("the car", "das Auto"),
            ("the garden", "den Garten"), ("a letter", "einen Brief")]  # fmt: skip
_TIMES = [("today", "heute"), ("every day", "jeden Tag"), ("again", "wieder"), ("now", "jetzt")]

# A small model on the generated data; every override a training run needs. Readers repeat none of them.
DING_OVERRIDES = [
    "data.vocab_size=128", "data.tokens_per_batch=512", "data.eval_tokens_per_batch=512", "data.num_threads=0",
    "model.d_model=32", "model.num_heads=2", "model.d_ff=64", "model.num_encoder_layers=1",
    "model.num_decoder_layers=1", "model.max_len=64", "train.steps=10", "train.warmup_steps=5",
    "train.time_budget_minutes=0", "train.log_every=5", "train.checkpoint_every=5", "train.eval_every=1000",
    "eval.beam_size=2", "eval.extra_length=5", "eval.batch_size=4", "eval.attention_plots=0",
    "eval.average_last=0",  # the tests below write and read checkpoints/averaged themselves
]  # fmt: skip


def ding_lines() -> list[bytes]:
    """600 distinct sentence pairs, one Ding entry a line: ``German :: English``, behind a header."""
    lines = [b"# Version :: test", b"# License :: written for this test"]
    for (s_en, s_de), (v_en, v_de), (o_en, o_de), (t_en, t_de) in itertools.product(
        _SUBJECTS, _VERBS, _OBJECTS, _TIMES
    ):
        lines.append(f"{s_de} {v_de} {t_de} {o_de}. :: {s_en} {v_en} {o_en} {t_en}.".encode())
    return lines


def attn_jax(*args: str, cwd, stdin: str | None = None, timeout: int = 600, devices: int = 1, **env):
    """``python -m attn_jax ARGS`` in ``cwd``; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "attn_jax", *args], input=stdin, capture_output=True, text=True, cwd=cwd,
        env=subprocess_env(devices, **env), timeout=timeout, check=False,
    )  # fmt: skip


def ok(result) -> str:
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stderr[-4000:]}"
    return result.stdout


def one_line_error(result, status: int, *fragments: str) -> str:
    assert result.returncode == status, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def tree(directory: pathlib.Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``directory``: relative path -> (size, mtime in ns); what readers must not
    change."""
    return {
        str(path.relative_to(directory)): (path.stat().st_size if path.is_file() else -1, path.stat().st_mtime_ns)
        for path in sorted(directory.rglob("*"))
    }


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def ding_run(tmp_path_factory):
    """A trained text model: ``attn-jax train`` on the generated Ding file, 10 steps, checkpoints at 5 and 10.

    Returns ``(home, workdir)``: the working directory the run was started in (its data cache is there) and the
    run's workdir.
    """
    home = tmp_path_factory.mktemp("ding")
    (home / "de-en").write_bytes(b"\n".join(ding_lines()) + b"\n")
    workdir = home / "run"
    overrides = [f"--config.{o}" for o in [*DING_OVERRIDES, f"data.ding_file={home / 'de-en'}"]]
    out = ok(attn_jax("train", "--config", DING, "--workdir", str(workdir), *overrides, cwd=home, devices=8))
    assert "test bleu" in out
    return home, workdir


# ---------------------------------------------------------------------------------------------------------
# Readers of a finished run: eval, translate, average
# ---------------------------------------------------------------------------------------------------------


def test_train_writes_the_run_that_readers_need(ding_run):
    _, workdir = ding_run
    assert checkpoint_steps(workdir) == [5, 10]
    assert (workdir / "tokenizer").is_dir() and (workdir / "config.json").is_file()
    assert [r["step"] for r in read_metrics(workdir) if r["split"] == "train"] == [5, 10]
    assert "bleu" in json.loads((workdir / "results.json").read_text())["test"]


def test_eval_reads_the_runs_own_config_and_takes_an_override(ding_run, tmp_path):
    _, workdir = ding_run
    # No --config and none of the training overrides: the run's config.json says what the model is.
    results = json.loads(ok(attn_jax("eval", "--workdir", str(workdir), cwd=tmp_path)))
    assert results["step"] == 10 and results["decoding"]["beam_size"] == 2
    assert {"loss", "accuracy", "perplexity", "bleu"} <= set(results["validation"])
    assert 0.0 <= results["test"]["bleu"] <= 100.0
    # An override still applies (the space-separated form too), and --checkpoint picks an older step.
    spaced = ["--config.eval.beam_size", "1", "--checkpoint", "5"]
    results = json.loads(ok(attn_jax("eval", "--workdir", str(workdir), *spaced, cwd=tmp_path)))
    assert results["step"] == 5 and results["decoding"]["beam_size"] == 1


def test_translate_streams_each_stdin_line_as_it_arrives(ding_run, tmp_path):
    _, workdir = ding_run
    command = [sys.executable, "-m", "attn_jax", "translate", "--workdir", str(workdir)]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=tmp_path, env=subprocess_env(1)) as process:  # fmt: skip
        try:
            for sentence in ("The dog sees the house today.", "My father finds the car."):
                process.stdin.write(sentence + "\n")
                process.stdin.flush()
                # The translation comes back while stdin is still open: the line was not held back for a batch.
                ready, _, _ = select.select([process.stdout], [], [], 300)
                assert ready, f"no translation of {sentence!r} while the stream stays open"
                assert process.stdout.readline().endswith("\n")
            process.stdin.write("\nOur neighbour likes the garden now.\n")
            process.stdin.close()
            rest = process.stdout.read()
            assert process.wait(timeout=300) == 0, process.stderr.read()[-3000:]
        finally:
            if process.poll() is None:
                process.kill()
    assert len(rest.splitlines()) == 2  # the empty line is translated too: one line out per line in


def test_readers_write_nothing_and_leave_an_in_progress_save_alone(ding_run, tmp_path):
    _, workdir = ding_run
    in_progress = workdir / "checkpoints" / "30.orbax-checkpoint-tmp-123"  # what a trainer's running save looks like
    (in_progress / "state").mkdir(parents=True)
    try:
        before = tree(workdir)
        # From an empty directory: nothing is downloaded, prepared or cached there to load the model.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        started = time.perf_counter()
        out = ok(attn_jax("translate", "--workdir", str(workdir), "The cat buys a letter now.", "Hello.",
                          cwd=elsewhere))  # fmt: skip
        print(f"translate of 2 sentences from a fresh process: {time.perf_counter() - started:.1f} s")
        assert len(out.splitlines()) == 2
        ok(attn_jax("eval", "--workdir", str(workdir), cwd=elsewhere))
        assert list(elsewhere.iterdir()) == []
        assert tree(workdir) == before
    finally:
        shutil.rmtree(in_progress, ignore_errors=True)


def test_average_writes_only_its_folder_and_eval_and_translate_read_the_average(ding_run, tmp_path):
    _, workdir = ding_run
    missing = attn_jax("eval", "--workdir", str(workdir), "--checkpoint", "averaged", cwd=tmp_path)
    one_line_error(missing, 1, "averaged", "attn-jax average")

    def outside_averaged():  # the checkpoints folder itself gains the "averaged" entry
        return {k: v for k, v in tree(workdir).items() if k != "checkpoints" and not k.startswith("checkpoints/av")}

    before = outside_averaged()
    assert "[5, 10]" in ok(attn_jax("average", "--workdir", str(workdir), "--last", "2", cwd=tmp_path))
    assert outside_averaged() == before
    assert (workdir / "checkpoints" / "averaged" / "10").is_dir()
    averaged = json.loads(ok(attn_jax("eval", "--workdir", str(workdir), "--checkpoint", "averaged", cwd=tmp_path)))
    latest = json.loads(ok(attn_jax("eval", "--workdir", str(workdir), cwd=tmp_path)))
    assert averaged["step"] == 10
    assert averaged["validation"]["loss"] != latest["validation"]["loss"]  # other weights were read
    out = ok(attn_jax("translate", "--workdir", str(workdir), "--checkpoint", "averaged", "Hello.", cwd=tmp_path))
    assert len(out.splitlines()) == 1


def test_average_until_a_step_and_bench_families_score_the_run_as_it_was_then(ding_run, tmp_path):
    """The BLEU-against-minutes curve of one run: ``average --until`` and ``bench families --average`` average
    the saves up to a point; the average just written is the one ``--checkpoint averaged`` reads."""
    _, workdir = ding_run
    assert "[5, 10]" in ok(attn_jax("average", "--workdir", str(workdir), "--last", "2", cwd=tmp_path))
    assert "[5]" in ok(attn_jax("average", "--workdir", str(workdir), "--last", "2", "--until", "7", cwd=tmp_path))
    averaged = json.loads(ok(attn_jax("eval", "--workdir", str(workdir), "--checkpoint", "averaged", cwd=tmp_path)))
    assert averaged["step"] == 5
    too_early = attn_jax("average", "--workdir", str(workdir), "--last", "2", "--until", "4", cwd=tmp_path)
    one_line_error(too_early, 1, "at or before step 4")
    before = tree(workdir)
    out = tmp_path / "curve"
    ok(attn_jax("bench", "families", "--runs", str(workdir), "--budgets", "1e6", "--average", "2", "--quick",
                "--out", str(out), cwd=tmp_path))  # fmt: skip
    assert tree(workdir) == before  # the bench averages in memory
    (entry,) = json.loads((out / "families.json").read_text())["runs"][0]["budgets"]
    assert entry["step"] == 10 and entry["averaged_steps"] == [5, 10]
    assert entry["validation_perplexity"] > 1 and entry["test_bleu"] is not None
    assert "the average of the last 2 checkpoints" in (out / "families.md").read_text()
    for flag, command in (("--average", ["bench", "families", "--runs"]), ("--last", ["average", "--workdir"])):
        for bad in ("0", "-1", "two"):
            refused = attn_jax(*command, str(workdir), flag, bad, cwd=tmp_path)
            assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
            assert f"{flag}: expected a whole number of at least 1, got '{bad}'" in refused.stderr.splitlines()[-1]
    assert tree(workdir) == before


def test_readers_of_a_workdir_that_is_no_run_fail_in_one_line_and_create_nothing(tmp_path):
    missing = tmp_path / "no_such_run"
    for command in (["eval"], ["translate", "Hello."], ["average", "--last", "2"]):
        result = attn_jax(*command[:1], "--workdir", str(missing), *command[1:], cwd=tmp_path)
        one_line_error(result, 2, "config.json", "attn-jax train")
    assert not missing.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_translate_of_a_copy_task_run_is_a_one_line_error(tmp_path):
    workdir = tmp_path / "copy"
    ok(attn_jax("train", "--config", TINY, "--workdir", str(workdir), "--config.train.steps=2",
                "--config.train.eval_every=1000", cwd=tmp_path))  # fmt: skip
    result = attn_jax("translate", "--workdir", str(workdir), "Hello.", cwd=tmp_path)
    one_line_error(result, 2, "copy", "token ids", "tokenizer")


@pytest.mark.slow
def test_eval_and_translate_run_repeatedly_next_to_a_saving_trainer(ding_run, tmp_path):
    """A trainer saving every 2 steps in one process; eval and translate again and again in others. Every save
    of the trainer commits, and every reader succeeds."""
    home, first = ding_run
    workdir = tmp_path / "run"
    overrides = [f"--config.{o}" for o in [*DING_OVERRIDES, f"data.ding_file={home / 'de-en'}"]]
    overrides += ["--config.train.steps=100000", "--config.train.time_budget_minutes=0.75",
                  "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=100000"]  # fmt: skip
    command = [sys.executable, "-m", "attn_jax", "train", "--config", DING, "--workdir", str(workdir), *overrides]
    readers, log = [], tmp_path / "trainer.log"
    with log.open("w") as output, subprocess.Popen(command, stdout=output, stderr=output, cwd=home,
                                                   env=subprocess_env(2)) as trainer:  # fmt: skip
        try:
            while not (workdir / "checkpoints").is_dir() or not checkpoint_steps(workdir):
                assert trainer.poll() is None, log.read_text()[-3000:]
                time.sleep(1)
            while trainer.poll() is None:
                readers.append(attn_jax("eval", "--workdir", str(workdir), cwd=tmp_path))
                readers.append(attn_jax("translate", "--workdir", str(workdir), "The dog sees the house today.",
                                        cwd=tmp_path))  # fmt: skip
            trainer.wait(timeout=600)
        finally:
            if trainer.poll() is None:
                trainer.kill()
    assert trainer.returncode == 0, log.read_text()[-4000:]
    assert len(readers) >= 2
    for reader in readers:
        ok(reader)
    train_steps = [r["step"] for r in read_metrics(workdir) if r["split"] == "train"]
    last = train_steps[-1]
    # Every save committed: each even step, and the last one, is a readable checkpoint; no save was left behind.
    assert checkpoint_steps(workdir) == sorted({*range(2, last + 1, 2), last})
    assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
    with Checkpointer(workdir / "checkpoints", read_only=True) as checkpointer:
        assert checkpointer.latest_step() == last
    assert first != workdir


# ---------------------------------------------------------------------------------------------------------
# Every parallel strategy and gradient accumulation, through the command line
# ---------------------------------------------------------------------------------------------------------


def test_pmap_trains_with_accumulation_through_the_cli_and_counts_updates(tmp_path):
    """pmap through `attn-jax train` (sharded jit, the default, runs in every other test here, with accumulation in
    the gs:// workdir test)."""
    workdir = tmp_path / "run"
    overrides = ["--config.parallel.strategy=pmap", "--config.train.accumulation_steps=3",
                 "--config.train.steps=4", "--config.train.log_every=1", "--config.train.checkpoint_every=2",
                 "--config.train.eval_every=1000"]  # fmt: skip
    # 2 simulated devices: each all-reduce waits for every device's thread, and on a loaded 2-core machine 8 of them,
    # and once 4 (2026-12-03, beside other jobs), missed XLA:CPU's rendezvous deadline and aborted the process
    # (tests/test_parallel.py checks pmap over 8 in one process).
    ok(attn_jax("train", "--config", TINY, "--workdir", str(workdir), *overrides, cwd=tmp_path, devices=2))
    # train.steps, the logged steps, the schedule and the checkpoints all count optimiser updates (not the 12
    # micro-batches): equation 3 of the paper at update 1..4 with d_model 32 and 10 warm-up steps (tiny.py).
    records = [r for r in read_metrics(workdir) if r["split"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        step = record["step"]
        assert record["learning_rate"] == pytest.approx(32**-0.5 * min(step**-0.5, step * 10**-1.5), rel=1e-6)
    assert checkpoint_steps(workdir) == [2, 4]


def test_a_broken_torch_install_does_not_break_training(tmp_path):
    # tensorboardX imports torch when it can find it; this one fails as a half-installed torch does.
    fake = tmp_path / "site"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise OSError('libtorch_cpu.so: cannot open shared object file')\n")
    workdir = tmp_path / "run"
    result = attn_jax("train", "--config", TINY, "--workdir", str(workdir), "--config.train.steps=2",
                      "--config.train.eval_every=1000", cwd=tmp_path, PYTHONPATH=os.pathsep.join(
                          [str(fake), os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    ok(result)
    assert "TensorBoard logging is off" in result.stderr
    assert [r["step"] for r in read_metrics(workdir) if r["split"] == "train"]


# ---------------------------------------------------------------------------------------------------------
# A workdir on a URL stays a URL
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """``gs://`` served from ``tmp_path/bucket-root`` by a filesystem that is not the local one's API.

    ``etils.epath`` reaches ``gs://`` through fsspec's "gcs" protocol; this registers an fsspec filesystem there
    that keeps paths as GCS does (``bucket/key``, no leading slash) over a local folder. Orbax writes arrays through
    TensorStore's own GCS driver, so its kvstore spec is pointed at the same folder (and Orbax's question about the
    bucket's layout, which needs Google's client library, is answered "flat"). A path mangled anywhere
    (``pathlib.Path("gs://b/r")`` is the local folder ``gs:/b/r``) lands in the working directory instead, which
    the test checks is left empty.
    """
    from etils.epath import backend
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem
    from orbax.checkpoint._src.serialization import tensorstore_utils

    root = tmp_path / "bucket-root"
    root.mkdir()

    class FakeGCS(DirFileSystem):
        protocol = ("gs", "gcs")

        def __init__(self, *args, finalize_on_close=None, **kwargs):
            super().__init__(path=str(root), fs=LocalFileSystem(), **kwargs)

    registry = sys.modules["fsspec.registry"]._registry  # protocol -> class; monkeypatch restores it
    for protocol in FakeGCS.protocol:
        monkeypatch.setitem(registry, protocol, FakeGCS)
    backend.fsspec_backend._get_filesystem.cache_clear()

    def kvstore_for_gcs(path: str) -> dict:
        assert path.startswith("gs://"), path
        return {"driver": "file", "path": str(root / path.removeprefix("gs://"))}

    monkeypatch.setattr(tensorstore_utils.gcs_utils, "get_kvstore_for_gcs", kvstore_for_gcs)
    # Orbax asks the bucket's layout of Google's client library (google-cloud-storage, installed on real pods).
    monkeypatch.setattr(tensorstore_utils.gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield root
    backend.fsspec_backend._get_filesystem.cache_clear()
    assert list(cwd.iterdir()) == [], "a gs:// path became a local path"


def test_a_gs_workdir_stays_a_url_for_training_and_every_reader(fake_gcs, capsys):
    from attn_jax.main import main

    url = "gs://bucket/run"
    # Two micro-batches per update: train.steps, the logged steps, the schedule and checkpoints count updates.
    overrides = ["--config.train.steps=4", "--config.train.checkpoint_every=2", "--config.train.eval_every=2",
                 "--config.train.log_every=1", "--config.train.accumulation_steps=2"]  # fmt: skip
    assert main(["train", "--config", TINY, "--workdir", url, *overrides]) == 0
    run = fake_gcs / "bucket" / "run"
    assert (run / "config.json").is_file() and (run / "results.json").is_file()
    records = [r for r in read_metrics(run) if r["split"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:  # equation 3 at update 1..4 (d_model 32, 10 warm-up steps), not at micro-batch 2..8
        step = record["step"]
        assert record["learning_rate"] == pytest.approx(32**-0.5 * min(step**-0.5, step * 10**-1.5), rel=1e-6)
    assert (run / "plots" / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    assert checkpoint_steps(run) == [2, 4]
    capsys.readouterr()

    assert main(["eval", "--workdir", url, "--checkpoint", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 2
    assert main(["average", "--workdir", url, "--last", "2"]) == 0
    assert (run / "checkpoints" / "averaged" / "4").is_dir()
    assert main(["eval", "--workdir", url, "--checkpoint", "averaged"]) == 0
    # Resuming from the URL: the run continues from its checkpoint there.
    assert main(["train", "--config", TINY, "--workdir", url, *overrides[1:], "--config.train.steps=6"]) == 0
    assert checkpoint_steps(run)[-1] == 6


@pytest.mark.slow
def test_a_text_run_on_gs_keeps_its_tokenizer_and_prepared_ids_there(fake_gcs, capsys, tmp_path):
    from attn_jax.main import main

    ding_file = tmp_path / "de-en"
    ding_file.write_bytes(b"\n".join(ding_lines()) + b"\n")
    url = "gs://bucket/ding"
    # TFDS builds the data set with its own C++ writers, which only a real bucket serves: it stays local here.
    data = [f"data.ding_file={ding_file}", f"data.data_dir={tmp_path / 'tfds'}", "train.steps=5"]
    assert main(["train", "--config", DING, "--workdir", url, *[f"--config.{o}" for o in DING_OVERRIDES + data]]) == 0
    run = fake_gcs / "bucket" / "ding"
    assert (run / "tokenizer").is_dir() and (run / "prepared").is_dir() and checkpoint_steps(run) == [5]
    capsys.readouterr()
    assert main(["translate", "--workdir", url, "The dog sees the house today."]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_a_gs_data_dir_reaches_tfds_as_a_url(monkeypatch, tmp_path):
    from attn_jax import config as config_lib
    from attn_jax.data import ding, sources

    config = config_lib.load_experiment(DING, ["data.data_dir=gs://bucket/tfds", "data.ding_file=gs://bucket/de-en"])
    config = config_lib.with_absolute_paths(config)
    assert (config.data.data_dir, config.data.ding_file) == ("gs://bucket/tfds", "gs://bucket/de-en")
    seen = {}

    def data_source(name, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(ding.tfds, "data_source", data_source)
    with pytest.raises(RuntimeError, match="stop here"):
        sources.split_sources(config.data)
    assert seen["data_dir"] == "gs://bucket/tfds" and seen["builder_kwargs"]["ding_file"] == "gs://bucket/de-en"
