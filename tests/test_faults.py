"""Fault injection: `mot-transition train` and `mot-transition convert` killed with SIGKILL at
seeded pseudo-random moments, and what each kill leaves behind.

A kill is a real SIGKILL of a process running the CLI's `main()` on real files: no exception
handler, no `finally`, no cleanup. Importing torch and transformers takes the CLI ~9 s on a
2-core machine, so the processes are forked from one "launcher" process that imported
`mot_transition.cli` once; each forked child then runs `main()` with the command's argv exactly
as `python -m mot_transition.cli` would, and the launcher kills it at the requested moment.

Two kinds of moments, both drawn from `random.Random(SEED)`:
  - uniform over the measured duration of an uninterrupted run of the same command, so that
    kills land wherever the run spends its time (steps, evaluation, checkpoint or conversion
    writes, pruning of old checkpoints);
  - "just after a new directory entry appears" (a checkpoint's or conversion's staging
    directory) plus a small random delay, so that some kills land inside a write whatever
    the timing of the machine.

Every assertion message names the seed, the kill moments and what the kill hit, so that a
failure can be reproduced (`SEED`) and read.
"""

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from test_train import tiny_recipe
from mot_transition import MoTLMHeadModel
from mot_transition.train import latest_checkpoint, load_model, load_training_state, recipe_from_dict, recipe_to_toml
from mot_transition.train import prepare_run_data

REPO = Path(__file__).resolve().parents[1]
SEED = 13
STEP_DIR = re.compile(r"^step-(\d+)$")
needs_fork = pytest.mark.skipif(sys.platform != "linux", reason="forks a process that imported torch: Linux only")
TRAIN_KILLS, TRAIN_DOUBLE_KILLS = 6, 2  # train runs killed at a uniform moment; how many of them again while resuming

# a forked child: runs `mot-transition ARGV` (and the environment `env` adds) with its output in `log`
CHILD = r'''
def child(argv, log, env=None):
    os.environ.update(env or {})
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    sys.argv = ["mot-transition", *argv]
    code = 0
    try:
        main()
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
'''

LAUNCHER = r'''
import json, os, signal, sys, time

from mot_transition.cli import main  # the slow imports, once
try:  # and the one a finished run makes for its loss plot
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot
except ImportError:
    pass

''' + CHILD + r'''
def entries(folder):
    try:
        return set(os.listdir(folder))
    except FileNotFoundError:
        return set()

def warm_up():
    """Run each command once on a missing input (an error, nothing written): the lazy imports of
    argument parsing happen here, once, instead of in every child."""
    saved = os.dup(1), os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    try:
        for argv in (["convert", "/nonexistent/src", "/nonexistent/dst"], ["train", "/nonexistent/recipe.toml"]):
            sys.argv = ["mot-transition", *argv]
            try:
                main()
            except SystemExit:
                pass
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)

warm_up()
print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    watch, kill_at = request.get("watch"), request.get("kill_at")
    before = entries(watch) if watch else set()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        child(request["argv"], request["log"], request.get("env"))
    killed, appeared, status = False, {}, None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        now = time.monotonic() - start
        for name in (entries(watch) - before - set(appeared)) if watch else ():
            appeared[name] = now  # when each new entry (a staging directory, a checkpoint) was first seen
            if kill_at is None and request.get("kill_after_new_entry") is not None:
                kill_at = now + request["kill_after_new_entry"]
        if (kill_at is not None and now >= kill_at) or now > request["timeout"]:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            killed = True
            break
        time.sleep(0.0005)
    print(json.dumps({
        "returncode": os.waitstatus_to_exitcode(status), "killed": killed, "elapsed": time.monotonic() - start,
        "appeared": appeared, "timed_out": killed and kill_at is None,
    }), flush=True)
'''


class Launcher:
    """Runs `mot-transition ARGV` in a child forked from a process that imported the CLI once."""

    def __init__(self, logs: Path):
        self.logs, self.count = logs, 0
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=logs,
        )
        assert self.process.stdout.readline().strip() == "ready", "the launcher did not start"

    def run(self, argv, kill_at=None, watch=None, kill_after_new_entry=None, timeout=120, env=None) -> dict:
        """Run to the end, or SIGKILL it `kill_at` s after the fork, or `kill_after_new_entry` s after
        a new entry first appears in the folder `watch`. Returns returncode, killed, elapsed (s),
        appeared ({new entry of `watch`: s after the fork when first seen}) and the log's end."""
        self.count += 1
        log = self.logs / f"{self.count:03d}-{argv[0]}.log"
        request = {"argv": [str(a) for a in argv], "log": str(log), "kill_at": kill_at, "timeout": timeout,
                   "watch": str(watch) if watch else None, "kill_after_new_entry": kill_after_new_entry, "env": env or {}}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        assert answer, f"the launcher died (last log {log})"
        result = json.loads(answer)
        assert not result["timed_out"], f"mot-transition {' '.join(request['argv'])} ran past {timeout} s: {log}"
        result["log"] = log.read_text()[-3000:] if log.exists() else ""
        return result

    def close(self):
        self.process.stdin.close()  # it has nothing to save: do not wait for its interpreter's slow exit
        self.process.kill()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    launcher = Launcher(tmp_path_factory.mktemp("fault-logs"))
    yield launcher
    launcher.close()


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def show(kill) -> str:
    """A kill moment: seconds after the start, or (event, seconds after it)."""
    return f"{kill:.3f} s" if isinstance(kill, float) else f"{kill[1]:.3f} s {kill[0]}"


def moments_note(kind: str, moments: list, duration: float) -> str:
    return (f"seed {SEED}; {kind} kill moments [{', '.join(map(show, moments))}]; an uninterrupted run took "
            f"{duration:.3f} s to its last write")


# ---------------------------------------------------------------------------------------------
# train


def fault_recipe(data_dir: Path) -> dict:
    """MoT with dropout and gradient accumulation (RNG, data position and optimizer moments must
    all come back), wide enough that checkpoint writes are a good share of the run, a checkpoint
    every 2 of 8 steps and 2 kept, so that old checkpoints are pruned."""
    return tiny_recipe(
        data_dir,
        model={"ffn_type": "mot", "n_embd": 64, "group_size": 4, "resid_pdrop": 0.1, "embd_pdrop": 0.1},
        train={"steps": 8, "micro_batch_size": 4, "eval_every": 4, "checkpoint_every": 2, "keep_checkpoints": 2},
    )


@contextlib.contextmanager
def one_thread():
    """Torch work of this process on one thread: no OpenMP workers left spinning after it, taking
    a core from the next child and shifting its timeline against the measured one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def check_killed_run(run_dir: Path, reference_losses: dict[int, float], where: str) -> str:
    """What a killed run left must be usable: every `step-N` loads, metrics.jsonl parses (but for
    a half-written last line) with the uninterrupted run's losses. Returns what the kill hit."""
    with one_thread():
        return _check_killed_run(run_dir, reference_losses, where)


def _check_killed_run(run_dir: Path, reference_losses: dict[int, float], where: str) -> str:
    folder = run_dir / "checkpoints"
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    steps = []
    for name in names:
        match = STEP_DIR.match(name)
        if not match:
            assert name.startswith((".tmp-step-", ".trash-step-")), f"unexpected {folder / name}; {where}"
            continue
        checkpoint = folder / name
        try:
            model = load_model(checkpoint)
            state, tensors = load_training_state(checkpoint)
        except Exception as error:
            pytest.fail(f"{checkpoint} does not load: {type(error).__name__}: {error}; left: {names}; {where}")
        assert state["step"] == int(match.group(1)), f"{checkpoint} holds step {state['step']}; {where}"
        assert any(k.startswith("optimizer.") for k in tensors) and any(k.startswith("rng.") for k in tensors), where
        assert all(torch.isfinite(p).all() for p in model.parameters()), f"{checkpoint}: non-finite weights; {where}"
        steps.append(state["step"])
    latest = latest_checkpoint(run_dir)
    assert (latest.name if latest else None) == (f"step-{max(steps):06d}" if steps else None), f"{names}; {where}"

    metrics = run_dir / "metrics.jsonl"
    text = metrics.read_text() if metrics.exists() else ""
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]  # tail: "" after a final newline, else half a line
    records = []
    for line in complete:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"metrics.jsonl line {line!r} does not parse (not the last line); {where}")
    logged = [r["step"] for r in records]
    assert logged == list(range(1, len(logged) + 1)), f"metrics.jsonl steps {logged}; {where}"
    for r in records:
        assert r["loss"] == reference_losses[r["step"]], f"step {r['step']}: loss {r['loss']} != uninterrupted run's; {where}"

    if not names and not records:
        return "before step 1"
    if any(n.startswith(".tmp-") for n in names):
        return f"checkpoint write (kept {steps})"
    if any(n.startswith(".trash-") for n in names):
        return f"pruning (kept {steps})"
    return f"after step {logged[-1] if logged else 0} (kept {steps}{', half a metrics line' if tail else ''})"


@needs_fork
def test_train_killed_at_random_moments_leaves_loadable_checkpoints_and_resumes_bit_identically(data_dir, launcher, tmp_path):
    raw = fault_recipe(data_dir)
    recipe = recipe_from_dict(raw)
    prepare_run_data(recipe)  # tokenizer and packed data cached: the runs below only read them
    recipe_file = tmp_path / "recipe.toml"
    recipe_file.write_text(recipe_to_toml(recipe))
    train_cli = lambda run_dir, *extra: ["train", recipe_file, "--out", run_dir, "--quiet", *extra]

    full = launcher.run(train_cli(tmp_path / "full"), watch=tmp_path / "full" / "checkpoints")
    assert full["returncode"] == 0, full["log"]
    # the kills are spread over the run up to its last checkpoint (the loss plot after it writes nothing a resume reads)
    duration = full["appeared"]["step-000008"]
    final = tmp_path / "full" / "checkpoints" / "step-000008"
    reference = load_file(final / "model.safetensors")
    reference_losses = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "full" / "metrics.jsonl").read_text().splitlines())}

    # runs killed once at a uniform moment, the latest-killed of them (the likeliest to have left a
    # checkpoint) killed again while resuming, and two killed just after their first checkpoint's
    # directory appears
    rng = random.Random(SEED)
    plans = [[rng.uniform(0, duration)] for _ in range(TRAIN_KILLS)]
    for plan in sorted(plans)[-TRAIN_DOUBLE_KILLS:]:
        plan.append(rng.uniform(0, duration))
    plans += [[("after the first checkpoint entry", rng.uniform(0, 0.05))] for _ in range(2)]
    note = moments_note("train", sum(plans, []), duration)
    hits = []
    for i, plan in enumerate(plans):
        run_dir = tmp_path / f"killed-{i}"
        for attempt, kill in enumerate(plan):
            resuming = attempt > 0  # as a user would after a crash; with no checkpoint yet it starts fresh
            argv = train_cli(run_dir, *(["--resume"] if resuming else []))
            if isinstance(kill, tuple):
                done = launcher.run(argv, watch=run_dir / "checkpoints", kill_after_new_entry=kill[1])
            else:
                done = launcher.run(argv, kill_at=kill)
            where = f"run {i}, kill at {show(kill)}{' of its resumed run' if resuming else ''}; {note}"
            if not done["killed"]:  # the run ended before its kill moment
                assert done["returncode"] == 0, f"{done['log']}; {where}"
                hits.append(f"run {i}: finished before the kill at {show(kill)}")
                continue
            hit = check_killed_run(run_dir, reference_losses, where)
            hits.append(f"run {i}: killed at {done['elapsed']:.3f} s{' of its resumed run' if resuming else ''}, {hit}")

        where = f"run {i}; " + "; ".join(hits) + f"; {note}"
        was_finished = latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step-000008"
        resumed = launcher.run(train_cli(run_dir, "--resume"))
        assert resumed["returncode"] == 0, f"train --resume failed after the kill: {resumed['log']}; {where}"
        check_killed_run(run_dir, reference_losses, where)
        parameters = load_file(run_dir / "checkpoints" / "step-000008" / "model.safetensors")
        assert parameters.keys() == reference.keys(), where
        for name in reference:
            assert torch.equal(parameters[name], reference[name]), f"{name} differs from the uninterrupted run's; {where}"
        logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert logged == list(range(1, 9)), f"metrics.jsonl steps {logged}; {where}"
        if not was_finished:  # a resume that saved a checkpoint removed what a killed save left
            assert not [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")], where
    print("\n".join(["", note, *hits]))


# ---------------------------------------------------------------------------------------------
# convert


@pytest.fixture(scope="module")
def mot_checkpoint(tmp_path_factory) -> Path:
    """A MoT checkpoint of ~17 MB of weights, so that the conversion's write is a good share of its run."""
    folder = tmp_path_factory.mktemp("convert-src") / "mot"
    torch.manual_seed(0)
    model = MoTLMHeadModel(tiny_config("mot", vocab_size=512, n_embd=128, n_layer=4, n_expert=16, group_size=4, expert_size=256))
    with torch.no_grad():
        for i in model.config.moe_layers:
            model.transformer.h[i].mlp.controller.normal_(0, 1.0)
    from transformers.utils import logging

    logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
    finally:
        logging.enable_progress_bar()
    (folder / "tokenizer.json").write_text("{}")
    return folder


def leftovers(dst: Path) -> list[str]:
    """What a conversion to `dst` works in beside it: `.DST.converting-PID`, `.DST.old-PID`."""
    return sorted(p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}."))


@needs_fork
def test_convert_killed_at_random_moments_leaves_no_destination_or_a_complete_one(mot_checkpoint, launcher, tmp_path):
    src = mot_checkpoint
    source = digest(src)
    full_dst = tmp_path / "full" / "tc"
    full_dst.parent.mkdir()
    full = launcher.run(["convert", src, full_dst], watch=full_dst.parent)
    assert full["returncode"] == 0, full["log"]
    duration = full["appeared"]["tc"]  # the kills are spread over the run up to the rename into place
    write = duration - min(full["appeared"].values())  # from its staging directory on
    reference = digest(full_dst)

    # six conversions killed at a uniform moment, two just after their staging directory appears;
    # odd-numbered ones replace an existing destination with --force
    rng = random.Random(SEED)
    plans = [rng.uniform(0, duration) for _ in range(6)] + [("after staging appears", rng.uniform(0, write)) for _ in range(2)]
    hits = []
    for i, kill in enumerate(plans):
        dst = tmp_path / f"killed-{i}" / "tc"
        dst.parent.mkdir()
        replacing = i % 2 == 1
        if replacing:
            shutil.copytree(full_dst, dst)
        argv = ["convert", src, dst, *(["--force"] if replacing else [])]
        if isinstance(kill, tuple):
            done = launcher.run(argv, watch=dst.parent, kill_after_new_entry=kill[1])
        else:
            done = launcher.run(argv, kill_at=kill)
        left = leftovers(dst)
        state = "missing" if not dst.exists() else "complete" if digest(dst) == reference else "DIFFERENT"
        hits.append(f"conversion {i}{' (--force over an existing one)' if replacing else ''}: "
                    + (f"killed at {done['elapsed']:.3f} s, destination {state}, beside it {left}" if done["killed"] else "finished before the kill"))
        where = f"conversion {i}, kill at {show(kill)}; " + "; ".join(hits) + "; " + moments_note("convert", plans, duration)
        assert done["killed"] or done["returncode"] == 0, f"{done['log']}; {where}"
        assert digest(src) == source, f"the source changed; {where}"
        assert state != "DIFFERENT", f"{dst} exists but is not the complete conversion: {sorted(digest(dst))}; {where}"

        force = dst.exists()
        again = launcher.run(["convert", src, dst, *(["--force"] if force else [])])
        assert again["returncode"] == 0, f"convert{' --force' if force else ''} after the kill failed: {again['log']}; {where}"
        assert digest(dst) == reference, f"the rerun's conversion differs from the uninterrupted one; {where}"
        assert leftovers(dst) == [], f"left beside {dst} after a later convert: {leftovers(dst)}; {where}"
        assert digest(src) == source, f"the source changed; {where}"
    print("\n".join(["", moments_note("convert", plans, duration) + f" (write: last {write:.3f} s)", *hits]))
