"""One writer per output (issue 24, item 2): for every command that writes a folder or a file, a
second process aimed at the same output while the first runs is refused at once, in one line that
names the first's pid, and the first finishes as if alone; a killed holder leaves no lock behind.

Both processes are real `mot-transition` processes: children forked from one process that imported
the CLI once (as in test_faults.py). The first is frozen with SIGSTOP the moment its lock file names
it, so that the second always meets it mid-run whatever the machine's speed, then let go with
SIGCONT (or killed with SIGKILL).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LM_EVAL
from mot_transition.data.shards import PreparedData
from mot_transition.locks import acquire, lock_file, release
from mot_transition.train import load_recipe, recipe_from_dict, recipe_to_toml, train
from test_faults import CHILD, REPO, digest, needs_fork
from test_pipeline import MICRO
from test_train import tiny_recipe

SPAWNER = r'''
import json, os, signal, sys, time

from mot_transition.cli import main

''' + CHILD + r'''
def holders(lock):
    """The pids the lock file names: a writer's record, or one line per reader."""
    try:
        with open(lock) as f:
            return [json.loads(line).get("pid") for line in f.read().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []

def finish(pid, timeout):
    start = time.monotonic()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() - start > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout"
        time.sleep(0.002)

print("ready", flush=True)
for line in sys.stdin:
    r = json.loads(line)
    if r["op"] == "start":
        pid = os.fork()
        if pid == 0:
            child(r["argv"], r["log"], r.get("env", {}))
        answer, start = {"pid": pid, "stopped": False}, time.monotonic()
        while r.get("stop_when_locked"):
            if pid in holders(r["stop_when_locked"]):
                os.kill(pid, signal.SIGSTOP)
                answer["stopped"] = True
                break
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                answer["returncode"] = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() - start > r["timeout"]:
                break
            time.sleep(0.0005)
    elif r["op"] == "wait":
        os.kill(r["pid"], signal.SIGCONT)
        answer = {"returncode": finish(r["pid"], r["timeout"])}
    elif r["op"] == "kill":
        os.kill(r["pid"], signal.SIGKILL)
        os.waitpid(r["pid"], 0)
        answer = {}
    print(json.dumps(answer), flush=True)
'''


class Spawner:
    def __init__(self, logs: Path):
        self.logs, self.count = logs, 0
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen([sys.executable, "-c", SPAWNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env=env, cwd=logs)
        assert self.process.stdout.readline().strip() == "ready", "the spawner did not start"

    def _ask(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        assert answer, "the spawner died"
        return json.loads(answer)

    def start_and_freeze(self, argv, output: Path, timeout: float = 120, env: dict | None = None) -> dict:
        """Start `mot-transition ARGV` and stop it (SIGSTOP) as soon as it holds the lock on `output`
        (a writer's, or a reader's: its line in the lock file)."""
        self.count += 1
        log = self.logs / f"{self.count:03d}-{argv[0]}.log"
        answer = self._ask({"op": "start", "argv": [str(a) for a in argv], "log": str(log), "env": env or {},
                            "stop_when_locked": str(lock_file(output)), "timeout": timeout})
        answer["log"] = log
        assert answer["stopped"], f"mot-transition {argv[0]} was not seen holding its lock: {log.read_text()[-2000:]}"
        return answer

    def run(self, argv, timeout: float = 300) -> tuple[int, str]:
        """`mot-transition ARGV` to its end: (exit code, what it printed)."""
        self.count += 1
        log = self.logs / f"{self.count:03d}-{argv[0]}.log"
        pid = self._ask({"op": "start", "argv": [str(a) for a in argv], "log": str(log)})["pid"]
        return self.finish(pid, timeout), log.read_text()

    def finish(self, pid: int, timeout: float = 300):
        """Let a frozen process go on (SIGCONT) and wait for its exit code."""
        code = self._ask({"op": "wait", "pid": pid, "timeout": timeout})["returncode"]
        assert code != "timeout", f"process {pid} ran past {timeout} s"
        return code

    def kill(self, pid: int) -> None:
        self._ask({"op": "kill", "pid": pid})

    def close(self):
        self.process.stdin.close()
        self.process.kill()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def spawner(tmp_path_factory):
    spawner = Spawner(tmp_path_factory.mktemp("one-writer-logs"))
    yield spawner
    spawner.close()


def assert_refused(spawner: Spawner, argv, holder: dict, inside: Path | None = None, why: str = "is in use by another process") -> str:
    """`mot-transition ARGV` exits 1 with one line naming the holder's pid (and the folder around
    its output that the holder writes, for `inside`; else `why`)."""
    code, printed = spawner.run(argv)
    lines = [line for line in printed.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), f"exit {code}: {printed[-2000:]}"
    assert f"pid {holder['pid']} on " in lines[0], lines[0]
    assert ("lies inside " + str(inside) if inside else why) in lines[0], lines[0]
    return lines[0]


def no_lock_held(output: Path) -> None:
    """The lock on `output` is free (a killed holder's lock went with it)."""
    acquire(output)
    release(output)


@pytest.fixture(scope="module")
def recipe_file(data_dir, tmp_path_factory):
    raw = tiny_recipe(data_dir, train={"steps": 6, "checkpoint_every": 3, "eval_every": 3})
    folder = tmp_path_factory.mktemp("one-writer-recipe")
    (folder / "recipe.toml").write_text(recipe_to_toml(recipe_from_dict(raw)))
    train(recipe_from_dict(raw), folder / "warm", progress=False)  # the data cache, prepared once
    return folder / "recipe.toml"


@needs_fork
def test_train_a_second_run_into_the_same_out_is_refused_and_the_first_logs_every_step(spawner, recipe_file, tmp_path):
    out = tmp_path / "run"
    first = spawner.start_and_freeze(["train", recipe_file, "--out", out, "--quiet"], out)
    line = assert_refused(spawner, ["train", recipe_file, "--out", out, "--quiet"], first)
    assert "train" in line, "the refusal names the holder's command"
    assert_refused(spawner, ["train", recipe_file, "--out", out, "--quiet", "--resume"], first)
    assert spawner.finish(first["pid"]) == 0, first["log"].read_text()[-2000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert not lock_file(out).exists(), "the lock file is removed when its holder ends"

    killed = spawner.start_and_freeze(["train", recipe_file, "--out", tmp_path / "killed", "--quiet"], tmp_path / "killed")
    spawner.kill(killed["pid"])
    code, printed = spawner.run(["train", recipe_file, "--out", tmp_path / "killed", "--quiet", "--resume"])
    assert code == 0, f"a SIGKILLed holder must not block its resume: {printed[-2000:]}"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A micro MoT run and its Token Choice conversion."""
    from mot_transition.convert import convert_checkpoint

    folder = tmp_path_factory.mktemp("one-writer-converted")
    mp = pytest.MonkeyPatch()
    mp.setenv("MOT_TRANSITION_CACHE", str(folder / "cache"))
    run = train(load_recipe("tiny", MICRO), folder / "mot", progress=False)
    convert_checkpoint(run.checkpoint, folder / "tc")
    yield folder, run.checkpoint
    mp.undo()


@needs_fork
def test_transition_a_second_run_into_the_same_out_is_refused(spawner, converted, tmp_path):
    folder, _ = converted
    out = tmp_path / "transition"
    argv = ["transition", folder / "tc", "--steps", "2", "--out", out]
    first = spawner.start_and_freeze(argv, out)
    assert_refused(spawner, [*argv, "--resume"], first)
    assert spawner.finish(first["pid"]) == 0, first["log"].read_text()[-2000:]
    assert json.loads((out / "transition.json").read_text())["steps"] == 2


@needs_fork
def test_convert_a_second_conversion_to_the_same_destination_is_refused_and_the_first_completes(spawner, converted, tmp_path):
    from mot_transition.convert import convert_checkpoint
    from mot_transition.locks import OutputInUse

    folder, mot = converted
    dst = tmp_path / "tc"
    first = spawner.start_and_freeze(["convert", mot, dst], dst)
    assert_refused(spawner, ["convert", mot, dst, "--force"], first)
    with pytest.raises(OutputInUse, match=f"pid {first['pid']} "):  # a Python caller is refused too
        convert_checkpoint(mot, dst, force=True)
    assert spawner.finish(first["pid"]) == 0, first["log"].read_text()[-2000:]
    assert digest(dst) == digest(folder / "tc")


@needs_fork
def test_export_a_second_export_to_the_same_destination_is_refused(spawner, tmp_path):
    from test_export import llama_model

    llama_model().save_pretrained(tmp_path / "ours")
    dst = tmp_path / "native"
    first = spawner.start_and_freeze(["export", tmp_path / "ours", dst, "--no-verify"], dst)
    assert_refused(spawner, ["export", tmp_path / "ours", dst, "--force", "--no-verify"], first)
    assert spawner.finish(first["pid"]) == 0, first["log"].read_text()[-2000:]
    assert (dst / "export_report.json").is_file()


@needs_fork
def test_prepare_force_is_refused_while_another_prepare_replaces_the_dataset_which_stays_whole(spawner, tmp_path):
    from test_prepare import DOCS, write_jsonl

    old = write_jsonl(tmp_path / "old.jsonl", DOCS[:30])
    new = write_jsonl(tmp_path / "new.jsonl", DOCS)
    out = tmp_path / "data"
    options = ["--vocab-size", "290", "--sample-bytes", "2000"]
    assert spawner.run(["prepare", old, "--out", out, *options])[0] == 0
    before = digest(out)
    first = spawner.start_and_freeze(["prepare", new, "--out", out, *options, "--force"], out)
    assert digest(out) == before, "the old dataset is untouched while the new one is written"
    assert_refused(spawner, ["prepare", old, "--out", out, *options, "--force"], first)
    assert spawner.finish(first["pid"]) == 0, first["log"].read_text()[-2000:]
    assert PreparedData(out).manifest["sources"] == [str(new)]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@needs_fork
def test_run_a_second_run_into_the_same_out_and_a_stage_inside_it_are_refused(spawner, recipe_file, tmp_path):
    out = tmp_path / "pipeline"
    cache = f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}"
    first = spawner.start_and_freeze(["run", "tiny", *MICRO, cache, "--out", out, "--transition-steps", "1"], out)
    assert_refused(spawner, ["run", "tiny", *MICRO, cache, "--out", out, "--transition-steps", "1", "--resume"], first)
    assert_refused(spawner, ["train", recipe_file, "--out", out / "mot", "--quiet"], first, inside=out)
    spawner.kill(first["pid"])
    no_lock_held(out)


@needs_fork
def test_study_a_second_study_into_the_same_out_is_refused(spawner, tmp_path):
    out = tmp_path / "study"
    argv = ["study", "tiny", *MICRO, "--seeds", "1", "--transitions", "25", "--temperatures", "none", "--calibrate", "0",
            "--out", out, "--quiet"]
    first = spawner.start_and_freeze(argv, out)
    assert_refused(spawner, argv, first)
    spawner.kill(first["pid"])
    no_lock_held(out)


@needs_fork
@LM_EVAL
def test_eval_a_second_eval_writing_the_same_scores_file_is_refused(spawner, converted, tmp_path):
    from test_pipeline import _local_task

    folder, _ = converted
    scores = tmp_path / "scores.json"
    argv = ["eval", folder / "tc", "--tasks", "tiny_choice", "--include-path", _local_task(tmp_path), "--out", scores]
    first = spawner.start_and_freeze(argv, scores, env={"HF_DATASETS_CACHE": str(tmp_path / "datasets")})
    assert_refused(spawner, argv, first)
    assert spawner.finish(first["pid"]) == 0, first["log"].read_text()[-2000:]
    assert set(json.loads(scores.read_text())) == {"tiny_choice"}


def test_a_lock_is_taken_again_by_its_own_process_and_leaves_nothing_when_released(tmp_path):
    output = tmp_path / "a" / "b" / "out"
    acquire(output)
    acquire(output)  # the stages of a command that already holds it
    acquire(output / "inside")  # an output inside one this process holds
    assert json.loads(lock_file(output).read_text())["pid"] == os.getpid()
    release(output / "inside")
    release(output)
    assert lock_file(output).exists()
    release(output)
    assert not (tmp_path / "a").exists(), "the lock file and the folders made for it are removed"


def test_train_under_torchrun_the_ranks_share_one_lock_and_a_second_process_is_refused(spawner, recipe_file, tmp_path):
    """Rank 0 takes the job's lock and tells the others (were every rank to lock, rank 1 would be
    refused by rank 0); a second process is refused naming the job. Rank 0 is frozen (SIGSTOP) while
    it holds the lock, so that the second process meets the job mid-run."""
    import signal
    import time

    from test_train import CLI_SCRIPT

    out = tmp_path / "ddp"
    (tmp_path / "cli.py").write_text(CLI_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(tmp_path / "cli.py"),
               "train", str(recipe_file), "--out", str(out), "--quiet"]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    holder, deadline = None, time.monotonic() + 240
    while holder is None and job.poll() is None and time.monotonic() < deadline:
        try:
            holder = json.loads(lock_file(out).read_text())
        except (OSError, ValueError):
            time.sleep(0.001)
    assert holder is not None and holder["job"], f"the job was not seen holding the lock: {holder}"
    os.kill(holder["pid"], signal.SIGSTOP)
    try:
        refusal = assert_refused(spawner, ["train", recipe_file, "--out", out, "--quiet", "--resume"], holder)
        assert f"torchrun job {holder['job']}" in refusal, refusal
    finally:
        os.kill(holder["pid"], signal.SIGCONT)
    printed = job.communicate(timeout=300)[0]
    assert job.returncode == 0, printed[-3000:]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert not lock_file(out).exists()


def test_a_relative_output_is_released_even_after_the_working_directory_changed(tmp_path, monkeypatch):
    from mot_transition.locks import hold, holds

    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    with hold("out"):
        os.chdir(tmp_path / "elsewhere")
    assert not (tmp_path / ".out.lock").exists() and not holds(tmp_path / "out")
