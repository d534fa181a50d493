"""Readers are excluded from a replacement (issue 24): a command that reads a prepared dataset or a
checkpoint for its whole life holds a reader's (shared) lock on it; a writer that would replace it
is refused at once in one line naming the reader, a reader arriving while a writer holds it is
refused likewise, readers do not refuse each other, nor do the ranks of one torchrun job; a
training run does not delete a checkpoint another command reads; `compare` holds its lock on the
transition run for its whole life.

Real concurrent processes, as in test_one_writer.py: the first is frozen (SIGSTOP) the moment its
lock file names it (a reader appends its line), so that the second meets it mid-run.
"""

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from mot_transition.locks import holds, lock_file
from mot_transition.train import recipe_from_dict, recipe_to_toml, train
from test_faults import digest, needs_fork
from test_one_writer import assert_refused, converted, spawner  # noqa: F401  (fixtures)
from test_prepare import DOCS, write_jsonl
from test_train import tiny_recipe

READ = "is being read by another process"
WRITTEN = "is being written by another process"
OPTIONS = ["--vocab-size", "290", "--sample-bytes", "2000"]
TEXTS = [(text + " ") * 20 for text in DOCS]  # enough held-out rows for 2 batches of 4 x 32 tokens


def prepared_recipe(folder: Path, data: Path, **train_keys) -> Path:
    """A recipe file whose data.source is the prepared corpus `data`."""
    raw = tiny_recipe(folder, train={"steps": 6, "checkpoint_every": 3, "eval_every": 3, **train_keys})
    raw["data"] = {"source": str(data), "seq_len": 32, "eval_batches": 2, "eval_batch_size": 4}
    path = folder / "recipe.toml"
    path.write_text(recipe_to_toml(recipe_from_dict(raw)))
    return path


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@needs_fork
def test_prepare_force_is_refused_while_train_reads_the_dataset_and_train_while_prepare_force_replaces_it(spawner, tmp_path):
    source, again = write_jsonl(tmp_path / "docs.jsonl", TEXTS), write_jsonl(tmp_path / "again.jsonl", TEXTS[::-1])
    data = tmp_path / "data"
    assert spawner.run(["prepare", source, "--out", data, *OPTIONS])[0] == 0
    recipe = prepared_recipe(tmp_path, data)
    before = digest(data)

    reader = spawner.start_and_freeze(["train", recipe, "--out", tmp_path / "run", "--quiet"], data)
    line = assert_refused(spawner, ["prepare", again, "--out", data, *OPTIONS, "--force"], reader, why=READ)
    assert "train" in line, "the refusal names the reader's command"
    assert digest(data) == before, "the dataset a run reads is not replaced"
    assert spawner.finish(reader["pid"]) == 0, reader["log"].read_text()[-2000:]
    assert steps_logged(tmp_path / "run") == [1, 2, 3, 4, 5, 6]
    assert not lock_file(data).exists(), "the last reader removes the lock file"

    writer = spawner.start_and_freeze(["prepare", again, "--out", data, *OPTIONS, "--force"], data)
    assert_refused(spawner, ["train", recipe, "--out", tmp_path / "second", "--quiet"], writer, why=WRITTEN)
    assert spawner.finish(writer["pid"]) == 0, writer["log"].read_text()[-2000:]
    assert digest(data) != before
    code, printed = spawner.run(["train", recipe, "--out", tmp_path / "second", "--quiet"])
    assert code == 0, printed[-2000:]
    assert not lock_file(data).exists()


@needs_fork
def test_convert_force_is_refused_while_a_transition_reads_the_conversion_and_readers_share_it(spawner, converted, tmp_path):
    from mot_transition.convert import convert_checkpoint

    _, mot = converted
    tc = tmp_path / "tc"
    convert_checkpoint(mot, tc)
    before = digest(tc)
    reader = spawner.start_and_freeze(["transition", tc, "--steps", "2", "--out", tmp_path / "transition"], tc)
    assert_refused(spawner, ["convert", mot, tc, "--force"], reader, why=READ)
    assert_refused(spawner, ["export", mot, tc, "--force", "--no-verify"], reader, why=READ)
    code, printed = spawner.run(["generate", tc, "--prompt", "def", "--max-new-tokens", "2"])
    assert code == 0, f"a second reader is not refused: {printed[-2000:]}"
    assert digest(tc) == before
    assert spawner.finish(reader["pid"]) == 0, reader["log"].read_text()[-2000:]
    assert not lock_file(tc).exists()
    assert spawner.run(["convert", mot, tc, "--force"])[0] == 0, "once the reader is gone, the replacement goes on"


def test_a_training_run_keeps_a_checkpoint_that_another_process_reads_until_it_is_free(data_dir, tmp_path):
    raw = tiny_recipe(data_dir, train={"steps": 6, "checkpoint_every": 3, "eval_every": 3, "keep_checkpoints": 1})
    train(recipe_from_dict(raw), tmp_path / "run", progress=False)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith(".")) == ["step-000006"]

    raw["train"]["steps"] = 9
    step6 = checkpoints / "step-000006"
    fd = os.open(lock_file(step6), os.O_RDWR | os.O_CREAT)  # a reader's lock, as another process's would be
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:  # a flock on a file of its own: it excludes this process's probe as another process's would
        train(recipe_from_dict(raw), tmp_path / "run", resume=True, progress=False)
        kept = sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith("."))
        assert kept == ["step-000006", "step-000009"], "a checkpoint being read is not deleted"
    finally:
        os.close(fd)
    raw["train"]["steps"] = 12
    train(recipe_from_dict(raw), tmp_path / "run", resume=True, progress=False)
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith(".")) == ["step-000012"]


@pytest.fixture(scope="module")
def transition_run(converted):
    from mot_transition.transition import transition

    folder, _ = converted
    transition(folder / "tc", 2, folder / "transition", progress=False)
    return folder / "transition"


def test_compare_holds_the_transition_runs_lock_while_it_measures_not_only_while_it_writes(transition_run, capsys, monkeypatch):
    import mot_transition.cli.compare as cli

    seen = []
    measure = cli.compare_runs

    plot = transition_run.parent / "curves.png"

    def watched(runs):
        seen.append((holds(transition_run), holds(plot)))
        return measure(runs)

    monkeypatch.setattr(cli, "compare_runs", watched)
    code, out, err = run_cli(["compare", transition_run, "--plot", plot], capsys)
    assert code == 0, err
    assert seen == [(True, True)], "compare_runs ran without the locks on the run and on --plot"
    assert (transition_run / "comparison.json").is_file() and not lock_file(transition_run).exists()
    assert not lock_file(plot).exists()


@needs_fork
def test_compare_refuses_a_transition_into_its_run_for_its_whole_life(spawner, converted, transition_run):
    folder, _ = converted
    first = spawner.start_and_freeze(["compare", transition_run], transition_run)
    assert_refused(spawner, ["transition", folder / "tc", "--steps", "2", "--out", transition_run, "--resume"], first)
    assert spawner.finish(first["pid"]) == 0, first["log"].read_text()[-2000:]


def test_train_under_torchrun_reads_the_dataset_under_one_lock_and_a_replacement_is_refused(spawner, tmp_path):
    """Rank 0 takes the job's reader's lock and tells the other rank (the ranks never refuse each
    other); `prepare --force` of the dataset meanwhile is refused naming the job."""
    import signal
    import time

    from test_train import CLI_SCRIPT

    source = write_jsonl(tmp_path / "docs.jsonl", TEXTS)
    data = tmp_path / "data"
    assert spawner.run(["prepare", source, "--out", data, *OPTIONS])[0] == 0
    recipe = prepared_recipe(tmp_path, data)
    (tmp_path / "cli.py").write_text(CLI_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(tmp_path / "cli.py"),
               "train", str(recipe), "--out", str(tmp_path / "ddp"), "--quiet"]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    holder, deadline = None, time.monotonic() + 240
    while holder is None and job.poll() is None and time.monotonic() < deadline:
        try:
            holder = json.loads(lock_file(data).read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            time.sleep(0.001)
    assert holder is not None and holder["job"] and holder.get("reads"), f"the job was not seen reading the dataset: {holder}"
    os.kill(holder["pid"], signal.SIGSTOP)
    try:
        refusal = assert_refused(spawner, ["prepare", source, "--out", data, *OPTIONS, "--force"], holder, why=READ)
        assert f"torchrun job {holder['job']}" in refusal, refusal
    finally:
        os.kill(holder["pid"], signal.SIGCONT)
    printed = job.communicate(timeout=300)[0]
    assert job.returncode == 0, printed[-3000:]
    assert steps_logged(tmp_path / "ddp") == [1, 2, 3, 4, 5, 6]
    assert not lock_file(data).exists()


@needs_fork
def test_a_gguf_export_holds_its_file_and_reads_its_checkpoint_for_its_whole_life(spawner, tmp_path):
    pytest.importorskip("gguf", reason="the gguf extra is not installed")
    from test_gguf import checkpoint

    ckpt = tmp_path / "ckpt"
    checkpoint(ckpt)
    before, dst = digest(ckpt), tmp_path / "model.gguf"
    first = spawner.start_and_freeze(["export", ckpt, dst, "--to", "gguf"], ckpt)
    assert_refused(spawner, ["export", ckpt, dst, "--to", "gguf", "--force"], first)  # one writer per file
    assert_refused(spawner, ["prepare", "stdlib", "--out", ckpt, "--force"], first, why=READ)  # nothing replaces what it reads
    assert spawner.finish(first["pid"]) == 0, first["log"].read_text()[-2000:]
    assert dst.is_file() and digest(ckpt) == before
    assert not lock_file(dst).exists() and not lock_file(ckpt).exists()


def test_the_data_cache_waits_for_an_entry_being_prepared_not_for_its_readers(data_dir, tmp_path):
    """A second process that needs a cache entry another is preparing waits until it is there, then
    reads it, while the first goes on reading it under its reader's lock for as long as it runs."""
    import signal
    import time

    import mot_transition.data.cached as cached
    from mot_transition.locks import acquire_shared

    keys = dict(vocab_size=300, cache_dir=tmp_path / "cache")
    first = os.fork()
    if first == 0:  # the first run: prepares the entry (slowly), then reads it for a minute
        try:
            prepare = cached.prepare
            cached.prepare = lambda *a, **k: (time.sleep(3), prepare(*a, **k))[1]
            entry = cached.cached_corpus(str(data_dir / "corpus.txt"), **keys)
            acquire_shared(entry)
            (tmp_path / "reading").write_text(str(entry))
            time.sleep(60)
        finally:
            os._exit(0)
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "cache" / "prepared").glob(".*.lock")) and time.monotonic() < deadline:
            time.sleep(0.01)
        start = time.monotonic()
        entry = cached.cached_corpus(str(data_dir / "corpus.txt"), **keys)
        waited = time.monotonic() - start
        assert (tmp_path / "reading").read_text() == str(entry), "the first process prepared it and reads it"
        assert os.waitpid(first, os.WNOHANG) == (0, 0), "the first process still reads it"
        assert waited < 30, f"waited {waited:.0f} s: for the reader, not for the entry"
        assert (entry / "manifest.json").is_file()
    finally:
        os.kill(first, signal.SIGKILL)
        os.waitpid(first, 0)


def test_a_command_may_read_what_it_writes_but_not_write_what_it_reads(tmp_path):
    from mot_transition.locks import OutputInUse, acquire, acquire_shared, release

    (tmp_path / "out").mkdir()
    acquire(tmp_path / "out")
    assert acquire_shared(tmp_path / "out") is not None  # a stage reading its command's own output
    release(tmp_path / "out")
    release(tmp_path / "out")
    assert not lock_file(tmp_path / "out").exists()
    assert acquire_shared(tmp_path / "missing") is None and not lock_file(tmp_path / "missing").exists()
    acquire_shared(tmp_path / "out")
    with pytest.raises(OutputInUse, match="input of this same command"):
        acquire(tmp_path / "out")
    release(tmp_path / "out")
    assert not lock_file(tmp_path / "out").exists()
