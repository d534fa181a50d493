"""Interrupted work resumes (issue 13, item 3): a killed transition run continues from its newest
checkpoint to the same curve and the same weights as a run never interrupted, and a `run` whose
later stage failed continues with its finished stages kept. Every option of `run` is checked
before its first stage."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import interrupted_after, run_cli
from mot_transition.train import Trainer, latest_checkpoint, list_checkpoints, load_recipe, train
from mot_transition.transition import transition
from test_pipeline import MICRO

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 6, 2  # checkpoints (and evaluations) at steps 2, 4, 6


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A micro MoT run with dropout (so the RNG state matters on resume), converted to Token Choice."""
    from mot_transition.convert import convert_checkpoint

    folder = tmp_path_factory.mktemp("resume")
    mp = pytest.MonkeyPatch()
    mp.setenv("MOT_TRANSITION_CACHE", str(folder / "cache"))
    recipe = load_recipe("tiny", MICRO + ["model.resid_pdrop=0.1", "model.embd_pdrop=0.1"])
    run = train(recipe, folder / "mot", progress=False)
    convert_checkpoint(run.checkpoint, folder / "tc")
    transition(folder / "tc", STEPS, folder / "full", eval_every=EVERY, progress=False)
    yield folder
    mp.undo()


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(run_dir) / "model.safetensors")


def steps_and_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def assert_same_run(run_dir: Path, full_dir: Path) -> None:
    """The same final weights (every tensor bit for bit), transition.json and metrics, each step once."""
    a, b = weights(run_dir), weights(full_dir)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ours, theirs = (json.loads((d / "transition.json").read_text()) for d in (run_dir, full_dir))
    assert ours.pop("checkpoint").startswith(str(run_dir)) and theirs.pop("checkpoint").startswith(str(full_dir))
    assert ours == theirs and [p["step"] for p in ours["curve"]] == [0, 2, 4, 6]
    assert steps_and_losses(run_dir) == steps_and_losses(full_dir) and [s for s, _ in steps_and_losses(run_dir)] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------
# transition


def test_transition_killed_after_a_checkpoint_resumes_to_the_uninterrupted_runs_curve_and_weights(converted):
    out = converted / "killed"
    with interrupted_after(3), pytest.raises(KeyboardInterrupt):  # one step past the checkpoint at 2: the resume redoes it
        transition(converted / "tc", STEPS, out, eval_every=EVERY, progress=False)
    assert [c.name for c in list_checkpoints(out)] == ["step-000002"] and not (out / "transition.json").exists()
    assert [s for s, _ in steps_and_losses(out)] == [1, 2, 3]

    result = transition(converted / "tc", STEPS, out, progress=False, resume=True)  # lr, eval_every: the run's own

    assert_same_run(out, converted / "full")
    assert result.curve == json.loads((converted / "full" / "transition.json").read_text())["curve"]
    # a finished run resumed has nothing left to do and writes the same again
    again = transition(converted / "tc", STEPS, out, eval_every=EVERY, progress=False, resume=True)
    assert again.curve == result.curve
    assert_same_run(out, converted / "full")


def test_transition_resume_refuses_other_steps_lr_or_eval_every_naming_the_option(converted):
    out = converted / "refused"
    with interrupted_after(2), pytest.raises(KeyboardInterrupt):
        transition(converted / "tc", STEPS, out, eval_every=EVERY, checkpoint_every=1, progress=False)
    for kwargs, option in (({"steps": 8}, "--steps"), ({"lr": 1e-2}, "--lr"), ({"eval_every": 3}, "--eval-every")):
        call = {"steps": STEPS, **kwargs}
        with pytest.raises(ValueError, match=f"^--resume: the run in .* was started with {option} .*, not with {option} .*; resume with {option} ") as error:
            transition(converted / "tc", call.pop("steps"), out, progress=False, resume=True, **call)
        assert "\n" not in str(error.value)
    assert latest_checkpoint(out).name == "step-000002"  # nothing was run or written
    with pytest.raises(ValueError, match="not of a transition run"):
        transition(converted / "tc", STEPS, converted / "mot", progress=False, resume=True)


def test_transition_cli_refuses_an_existing_run_without_resume_in_one_line(converted, capsys):
    code, _, err = run_cli(["transition", converted / "tc", "--steps", STEPS, "--out", converted / "full"], capsys)
    assert code == 1 and "already holds a transition run" in err and "--resume" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, _, err = run_cli(["transition", converted / "tc", "--steps", STEPS, "--checkpoint-every", "0",
                            "--out", converted / "zero"], capsys)
    assert code == 1 and "--checkpoint-every must be an integer >= 1" in err and len(err.strip().splitlines()) == 1


def test_transition_cli_killed_with_sigkill_resumes_with_resume(converted, capsys):
    """A real kill -9 of `mot-transition transition` once step 5 is done (checkpoints at 2 and 4
    are complete, the metrics line of step 5 is written), then `--resume` as a user types it."""
    out = converted / "sigkill"
    args = ["transition", str(converted / "tc"), "--steps", str(STEPS), "--eval-every", str(EVERY), "--out", str(out)]
    script = (
        "import os, signal, sys\n"
        "from mot_transition.cli import main\n"
        "from mot_transition.train import Trainer\n"
        "step = Trainer.step\n"
        "def killed(self):\n"
        "    if self.step_count == 5:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return step(self)\n"
        "Trainer.step = killed\n"
        f"sys.argv = ['mot-transition', *{args!r}]\n"
        "main()\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert latest_checkpoint(out).name == "step-000004" and not (out / "transition.json").exists()
    assert [s for s, _ in steps_and_losses(out)] == [1, 2, 3, 4, 5]  # step 5 is redone, its line replaced

    code, stdout, err = run_cli([*args, "--resume"], capsys)
    assert code == 0, err
    assert "post-switch held-out loss" in stdout
    assert_same_run(out, converted / "full")


# ---------------------------------------------------------------------------------------------
# run


def test_run_resumed_after_its_transition_stage_was_killed_keeps_the_finished_stages(converted, tmp_path, monkeypatch):
    from mot_transition.pipeline import run_pipeline

    monkeypatch.setenv("MOT_TRANSITION_CACHE", str(converted / "cache"))
    out, quiet = tmp_path / "run", (lambda *a: None)
    original, ran = Trainer.step, []

    def counted(self):  # the transition stage dies once its step 2 is done (checkpoints at 1 and 2)
        if self.run_dir.name == "transition" and self.step_count == 2 and not ran.count("resumed"):
            raise KeyboardInterrupt("killed")
        ran.append(self.run_dir.name)
        return original(self)

    monkeypatch.setattr(Trainer, "step", counted)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline("tiny", out, MICRO, transition_steps=4, progress=False, log=quiet)
    assert ran == ["mot"] * 8 + ["transition"] * 2 and latest_checkpoint(out / "transition").name == "step-000002"
    kept = {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in
            [latest_checkpoint(out / "mot") / "model.safetensors", out / "token_choice" / "model.safetensors",
             out / "token_choice" / "conversion_report.json"]}
    mot_metrics = (out / "mot" / "metrics.jsonl").read_text()

    ran[:] = ["resumed"]
    lines = []
    comparison = run_pipeline("tiny", out, MICRO, transition_steps=4, progress=False, log=lines.append, resume=True)

    assert ran == ["resumed"] + ["transition"] * 2 + ["baseline"] * 12  # MoT finished: not one step again
    assert {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in kept} == kept  # nor converted again
    assert (out / "mot" / "metrics.jsonl").read_text() == mot_metrics
    assert any("already" in line and "kept" in line for line in lines)
    monkeypatch.setattr(Trainer, "step", original)
    reference = transition(out / "token_choice", 4, tmp_path / "reference", progress=False)  # never interrupted
    ours = json.loads((out / "transition" / "transition.json").read_text())
    assert ours["curve"] == reference.curve and [p["step"] for p in ours["curve"]] == [0, 1, 2, 3, 4]
    a, b = weights(out / "transition"), weights(tmp_path / "reference")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert [row["measure"] for row in comparison["rows"]][3:5] == ["post-switch loss at step 4", "Token Choice from scratch, step 12"]

    # a conversion that is not complete (its report lost) is done again; what was there is kept aside
    (out / "token_choice" / "conversion_report.json").unlink()
    lines.clear()
    run_pipeline("tiny", out, MICRO, transition_steps=4, progress=False, log=lines.append, resume=True)
    assert any(line.startswith("[2/5] converting") for line in lines)
    assert [p.name.split("-")[0] for p in out.iterdir() if p.name.startswith(".token_choice.")] == [".token_choice.incomplete"]
    assert json.loads((out / "token_choice" / "conversion_report.json").read_text())["source"] == str(latest_checkpoint(out / "mot").resolve())
    assert json.loads((out / "transition" / "transition.json").read_text())["curve"] == reference.curve


def _started(out: Path, monkeypatch, *args) -> None:
    """A `run` into OUT that stops as its first stage begins: OUT holds pipeline.json and nothing more."""
    from mot_transition import pipeline

    def stopped(*_, **__):
        raise KeyboardInterrupt("killed")

    with monkeypatch.context() as m:
        m.setattr(pipeline, "train", stopped)
        with pytest.raises(KeyboardInterrupt):
            pipeline.run_pipeline("tiny", out, MICRO, *args, progress=False, log=lambda *a: None)
    assert [p.name for p in out.iterdir()] == ["pipeline.json"]


@pytest.mark.parametrize("change, named", [
    (["--top-k", "1"], "was started with --top-k 2, not with --top-k 1; resume with the options"),
    (["--transition-steps", "3"], "was started with --transition-steps 2, not with --transition-steps 3;"),
    (["--calibrate", "1"], "was started with --calibrate 0, not with --calibrate 1;"),
    (["--no-baseline"], "was started with --baseline, not with --no-baseline;"),  # the flag as typed, not Python's False
    (["train.steps=9"], "recipe key 'train.steps' is 9 but the run in"),
    (["model.mot_temperature=0.5"], "recipe key 'model.mot_temperature' is 0.5 but"),
])
def test_run_resume_refuses_another_option_or_recipe_key_in_one_line(tmp_path, monkeypatch, capsys, change, named):
    out = tmp_path / "run"
    _started(out, monkeypatch, 2)
    code, _, err = run_cli(["run", "tiny", *MICRO, "--out", out, "--transition-steps", "2", "--resume", *change], capsys)
    assert code == 1 and named in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["pipeline.json"]  # refused before any stage


def test_run_refuses_a_non_empty_out_without_resume_and_resume_of_a_folder_it_did_not_start(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _started(out, monkeypatch, 2)
    code, _, err = run_cli(["run", "tiny", *MICRO, "--out", out, "--transition-steps", "2"], capsys)
    assert code == 1 and "not empty" in err and "--resume" in err and len(err.strip().splitlines()) == 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = run_cli(["run", "tiny", *MICRO, "--out", other, "--resume"], capsys)
    assert code == 1 and "pipeline.json" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("option, named", [
    (["--calibrate", "100000"], "--calibrate 100000: the MoT run's training split has only"),
    (["data.eval_batch_size=6", "data.eval_batches=1"], "cannot form groups of 4; set data.eval_batch_size"),
])
def test_run_refuses_an_option_that_cannot_work_before_training_starts(converted, tmp_path, monkeypatch, capsys, option, named):
    monkeypatch.setenv("MOT_TRANSITION_CACHE", str(converted / "cache"))
    code, _, err = run_cli(["run", "tiny", *MICRO, "--out", tmp_path / "run", *option], capsys)
    assert code == 1 and named in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()
