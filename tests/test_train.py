"""The training stage: recipes, exact resume, crash-safe checkpoints, DDP parity, start-up errors.

Every run here is a model of a few thousand parameters on a 40 KB slice of `argparse.py`, with
the tokenizer and packed data cached once per module.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import interrupted_after, run_cli
from mot_transition.train import (
    Trainer,
    TrainingDiverged,
    latest_checkpoint,
    load_model,
    load_recipe,
    load_training_state,
    recipe_from_dict,
    recipe_to_toml,
    train,
)
from mot_transition.study.grid import is_grid_file, load_grid, plan_size
from mot_transition.train.recipe import RECIPES_DIR

REPO = Path(__file__).resolve().parents[1]


def tiny_recipe(data_dir: Path, **sections) -> dict:
    """A recipe dict: a 2-block model, 32-token sequences, 6 steps, checkpoints at 3 and 6."""
    raw = {
        "name": "test",
        "seed": 1,
        "model": {"ffn_type": "dense", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_expert": 4, "group_size": 4},
        "data": {
            "source": str(data_dir / "corpus.txt"), "heldout_fraction": 0.1, "vocab_size": 300, "seq_len": 32,
            "eval_batches": 2, "eval_batch_size": 4, "cache_dir": str(data_dir / "cache"),
        },
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"steps": 6, "batch_size": 8, "eval_every": 3, "checkpoint_every": 3, "keep_checkpoints": 2},
    }
    for section, values in sections.items():
        raw[section].update(values)
    return raw


def parameters(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def metric_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# exact resume


def test_run_killed_at_step_4_and_resumed_reaches_bit_identical_parameters(data_dir, tmp_path):
    # MoT with dropout and gradient accumulation: the RNG state, data position and optimizer
    # moments must all come back for the parameters to match bit for bit.
    raw = tiny_recipe(
        data_dir,
        model={"ffn_type": "mot", "group_size": 4, "resid_pdrop": 0.1, "embd_pdrop": 0.1},
        train={"micro_batch_size": 4},
    )
    full = train(recipe_from_dict(raw), tmp_path / "full", progress=False)

    with interrupted_after(4), pytest.raises(KeyboardInterrupt):  # one step past the checkpoint at 3, which the resume must redo
        train(recipe_from_dict(raw), tmp_path / "resumed", progress=False)
    assert latest_checkpoint(tmp_path / "resumed").name == "step-000003"

    resumed = train(recipe_from_dict(raw), tmp_path / "resumed", resume=True, progress=False)

    assert resumed.step == full.step == 6
    a, b = parameters(full.checkpoint), parameters(resumed.checkpoint)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed.eval_loss == full.eval_loss
    # the metrics file holds each step once, with the uninterrupted run's losses
    assert [m["step"] for m in metric_lines(tmp_path / "resumed")] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in metric_lines(tmp_path / "resumed")] == [m["loss"] for m in metric_lines(tmp_path / "full")]


def test_a_run_with_checkpoints_refuses_to_start_over_without_resume(data_dir, tmp_path):
    raw = tiny_recipe(data_dir, train={"steps": 3})
    train(recipe_from_dict(raw), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="--resume"):
        train(recipe_from_dict(raw), tmp_path / "run", progress=False)


def test_resume_with_another_model_shape_names_the_key(data_dir, tmp_path):
    train(recipe_from_dict(tiny_recipe(data_dir, train={"steps": 3})), tmp_path / "run", progress=False)
    changed = tiny_recipe(data_dir, model={"n_embd": 64}, train={"steps": 6})
    with pytest.raises(ValueError, match="'model.n_embd'"):
        train(recipe_from_dict(changed), tmp_path / "run", resume=True, progress=False)


def test_a_run_started_before_the_block_style_keys_existed_resumes(data_dir, tmp_path):
    """Runs saved `activation_function: "relu"` (the default then) and no block, rope_theta, qk_norm."""
    train(recipe_from_dict(tiny_recipe(data_dir, train={"steps": 3})), tmp_path / "run", progress=False)
    state_file = latest_checkpoint(tmp_path / "run") / "training_state.json"
    state = json.loads(state_file.read_text())
    for key in ("block", "rope_theta", "qk_norm"):
        del state["recipe"]["model"][key]
    state["recipe"]["model"]["activation_function"] = "relu"
    state_file.write_text(json.dumps(state))
    assert train(recipe_from_dict(tiny_recipe(data_dir)), tmp_path / "run", resume=True, progress=False).step == 6
    with pytest.raises(ValueError, match="'model.block'"):  # but a llama-style recipe is another model
        train(recipe_from_dict(tiny_recipe(data_dir, model={"block": "llama"})), tmp_path / "run", resume=True, progress=False)


# ---------------------------------------------------------------------------------------------
# checkpoints that survive a crash

KILL_DURING_SECOND_SAVE = """
import os, sys
import mot_transition.train.checkpoint as checkpoint
from mot_transition.train import recipe_from_dict, train

real_save_file, saves = checkpoint.save_file, []

def save_file_then_die(tensors, path, *args, **kwargs):
    saves.append(path)
    if len(saves) == 2:  # second checkpoint: model and tokenizer written, training state not
        os._exit(17)  # a hard kill: no exception handler, no cleanup
    return real_save_file(tensors, path, *args, **kwargs)

checkpoint.save_file = save_file_then_die
train(recipe_from_dict({raw}), sys.argv[1], progress=False)
"""


def test_checkpoint_write_killed_half_way_leaves_last_good_checkpoint_loadable(data_dir, tmp_path):
    raw = tiny_recipe(data_dir)
    run_dir = tmp_path / "run"
    script = tmp_path / "kill.py"
    script.write_text(KILL_DURING_SECOND_SAVE.format(raw=repr(raw)))
    done = subprocess.run([sys.executable, str(script), str(run_dir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 17, done.stderr

    folder = run_dir / "checkpoints"
    assert (folder / "step-000003").is_dir()
    assert not (folder / "step-000006").exists()  # no partial directory under the real name
    partial = [p for p in folder.iterdir() if p.name.startswith(".tmp-step-000006")]
    assert partial and (partial[0] / "model.safetensors").exists()  # it did die half-way
    last = latest_checkpoint(run_dir)
    assert last == folder / "step-000003"
    model = load_model(last)
    state, tensors = load_training_state(last)
    assert state["step"] == 3 and any(k.startswith("optimizer.") for k in tensors)
    assert torch.isfinite(model(torch.zeros(1, 8, dtype=torch.long)).logits).all()

    # and the run goes on from there; the leftover is cleaned up
    result = train(recipe_from_dict(raw), run_dir, resume=True, progress=False)
    assert result.step == 6 and result.checkpoint == folder / "step-000006"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_a_save_that_raises_leaves_no_directory_behind(data_dir, tmp_path, monkeypatch):
    import mot_transition.train.checkpoint as checkpoint

    raw = tiny_recipe(data_dir)
    real_save_file = checkpoint.save_file
    calls = []

    def fail_second(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", fail_second)
    with pytest.raises(OSError, match="disk full"):
        train(recipe_from_dict(raw), tmp_path / "run", progress=False)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000003"]


def test_only_the_last_k_checkpoints_are_kept(data_dir, tmp_path):
    raw = tiny_recipe(data_dir, train={"steps": 4, "checkpoint_every": 1, "keep_checkpoints": 2})
    result = train(recipe_from_dict(raw), tmp_path / "run", progress=False)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000003", "step-000004"]
    assert result.checkpoint.name == "step-000004"


def test_nan_loss_stops_the_run_and_names_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    original_step = Trainer.step

    def poison_after_3(self):
        if self.step_count == 4:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        return original_step(self)

    monkeypatch.setattr(Trainer, "step", poison_after_3)
    with pytest.raises(TrainingDiverged, match=r"nan at step 5.*step-000003"):
        train(recipe_from_dict(tiny_recipe(data_dir)), tmp_path / "run", progress=False)
    assert latest_checkpoint(tmp_path / "run").name == "step-000003"
    lines = metric_lines(tmp_path / "run")
    assert [m["step"] for m in lines] == [1, 2, 3, 4]


def test_checkpoint_loads_as_transformers_model_and_tokenizer(data_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = train(recipe_from_dict(tiny_recipe(data_dir, train={"steps": 3})), tmp_path / "run", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(result.checkpoint)
    model = AutoModelForCausalLM.from_pretrained(result.checkpoint)
    ids = tokenizer("def main():", return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == "def main():"
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


# ---------------------------------------------------------------------------------------------
# distributed

# a rank that hangs prints every thread's stack and exits, so that a hang fails with where it was (after 280 s:
# under a loaded CI, with other torchrun tests beside it, a 6-step job whose rank 0 is frozen a while took over 200 s)
CLI_SCRIPT = (
    "import faulthandler, sys\nfaulthandler.dump_traceback_later(280, exit=True)\n"
    "from mot_transition.cli import main\nsys.exit(main())\n"
)


@pytest.mark.torchrun
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_with_two_cpu_processes_gives_the_losses_of_one_process_on_the_same_global_batch(data_dir, tmp_path, parallel):
    # Token Choice with its router losses on, which see the whole global batch (tests/test_balance.py):
    # 2 processes x 2 micro-batches of 2 rows train the model of 1 process x 2 micro-batches of 4 rows,
    # replicated (DDP) or sharded (FSDP2), whose checkpoint is the same whole one; the selection bias is
    # moved by the load of the whole global batch, the same in every process
    model = {"ffn_type": "token_choice", "router_aux_loss_coef": 0.5, "router_z_loss_coef": 0.01, "router_bias_update_rate": 0.01}
    train_keys = {"steps": 4, "checkpoint_every": 4, "eval_every": 2, "grad_accum": 2, "parallel": parallel}
    raw = tiny_recipe(data_dir, model=model, train=train_keys)
    recipe_file = tmp_path / "recipe.toml"
    recipe_file.write_text(recipe_to_toml(recipe_from_dict(raw)))
    single = train(recipe_from_dict(raw), tmp_path / "single", progress=False)

    cli = tmp_path / "cli.py"
    cli.write_text(CLI_SCRIPT)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(cli),
        "train", str(recipe_file), "--out", str(tmp_path / "ddp"), "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    one, two = metric_lines(tmp_path / "single"), metric_lines(tmp_path / "ddp")
    assert [m["step"] for m in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["aux_loss"] == pytest.approx(a["aux_loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        if "eval_loss" in a:
            assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
    state, _ = load_training_state(tmp_path / "ddp" / "checkpoints" / "step-000004")
    assert state["world_size"] == 2
    p1, p2 = parameters(single.checkpoint), parameters(tmp_path / "ddp" / "checkpoints" / "step-000004")
    assert p2.keys() == p1.keys()
    _, moments1 = load_training_state(single.checkpoint)
    _, moments2 = load_training_state(tmp_path / "ddp" / "checkpoints" / "step-000004")
    assert {k for k in moments2 if k.startswith("optimizer.")} == {k for k in moments1 if k.startswith("optimizer.")}
    for name in (k for k in moments1 if k.startswith("optimizer.") and moments1[k].dim()):
        torch.testing.assert_close(moments2[name], moments1[name], rtol=1e-3, atol=1e-6)
    for name in p1:
        torch.testing.assert_close(p2[name], p1[name], rtol=1e-4, atol=1e-5)


def _torchrun(tmp_path, *args) -> None:
    cli = tmp_path / "cli.py"
    cli.write_text(CLI_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(cli), *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.torchrun
def test_a_sharded_run_resumed_from_its_checkpoint_ends_where_the_uninterrupted_one_does(data_dir, tmp_path):
    # FSDP2: the saved whole moments go back to each process as its slice; MoT with dropout and accumulation
    model = {"ffn_type": "mot", "group_size": 2, "resid_pdrop": 0.1}
    raw = tiny_recipe(data_dir, model=model, train={"steps": 4, "checkpoint_every": 2, "grad_accum": 2, "parallel": "fsdp"})
    recipe_file = tmp_path / "recipe.toml"
    recipe_file.write_text(recipe_to_toml(recipe_from_dict(raw)))
    _torchrun(tmp_path, "train", recipe_file, "--out", tmp_path / "whole", "--quiet")
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-000004")
    _torchrun(tmp_path, "train", recipe_file, "--out", tmp_path / "resumed", "--resume", "--quiet")
    whole, resumed = (parameters(tmp_path / run / "checkpoints" / "step-000004") for run in ("whole", "resumed"))
    for name in whole:
        assert torch.equal(resumed[name], whole[name]), name


# ---------------------------------------------------------------------------------------------
# recipes and start-up errors


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.stepz=10", "train.stepz"),  # unknown key
        ("optim.lr=fast", "optim.lr"),  # wrong type
        ("train.steps=1.5", "train.steps"),  # wrong type
        ("model.moe_layers=[1, 'x']", "model.moe_layers"),  # wrong type inside a list
        ("optim.warmup_steps=-1", "optim.warmup_steps"),  # impossible value
        ("train.micro_batch_size=3", "train.micro_batch_size"),  # does not divide batch_size
        ("train.grad_accum=3", "train.grad_accum"),  # does not divide batch_size (32)
        ("train.grad_accum=64", "train.grad_accum"),  # more micro-batches than rows
        ("model.n_head=5", "n_head"),  # impossible for the model: checked by building MoTConfig
        ("train.report_to=['jsonl', 'mlflow']", "train.report_to"),  # no such reporter
        ("train.report_to=[1]", "train.report_to"),  # not a reporter's name
        # issue 13: non-finite numbers, out-of-range values and a seed the trainer would overflow
        ("optim.lr=inf", "optim.lr"),
        ("model.mot_temperature=nan", "model.mot_temperature"),
        ("model.layer_norm_epsilon=-5.0", "layer_norm_epsilon"),
        ("seed=140737488355328", "seed"),
        ("train.device=xyz", "train.device"),  # was a RuntimeError traceback from torch.device
        ("train.parallel=zero3", "train.parallel"),
        ("train.parallel=fsdp;train.compile=true", "train.compile"),  # not together yet (; separates overrides)
        ("train.parallel=fsdp;train.switch_at_step=10", "train.switch_at_step"),
        ("train.parallel=hsdp;train.compile=true", "train.compile"),
        ("train.checkpoint_format=dcp", "train.checkpoint_format"),
        ("train.checkpoint_format=sharded;train.switch_at_step=10", "train.switch_at_step"),
    ],
)
def test_bad_recipe_gives_one_line_error_naming_the_key(override, key):
    with pytest.raises(ValueError) as error:
        load_recipe("tiny", override.split(";"))
    message = str(error.value)
    assert "\n" not in message and key in message


def test_bad_recipe_file_gives_one_line_error_naming_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nn_embd = "wide"\n')
    with pytest.raises(ValueError, match=r"^recipe key 'model.n_embd' must be an integer >= 1, got 'wide'$"):
        load_recipe(bad)
    bad.write_text("[optim]\nlearning_rate = 1e-3\n")
    with pytest.raises(ValueError, match=r"'optim.learning_rate'.*known: optim.lr"):
        load_recipe(bad)
    bad.write_text("[train]\nstep = 10\n")
    with pytest.raises(ValueError, match=r"'train.step'.*did you mean 'train.steps'"):
        load_recipe(bad)


@pytest.mark.parametrize("override, key", [("train.stepz=10", "train.stepz"), ("train.steps=0", "train.steps")])
def test_cli_bad_recipe_exits_non_zero_with_one_line_error_naming_the_key(override, key, monkeypatch, capsys):
    from mot_transition.cli import main

    monkeypatch.setattr(sys, "argv", ["mot-transition", "train", "tiny", override])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and key in err


@pytest.mark.parametrize("module, name", [
    ("mot_transition.train", "train"),  # inside the command: typer returns 130 itself
    ("mot_transition.cli", "app"),  # outside any command: main catches the KeyboardInterrupt
])
def test_cli_ctrl_c_exits_130_and_says_so(module, name, monkeypatch, capsys):
    import importlib

    from mot_transition.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(module), name, interrupted)
    monkeypatch.setattr(sys, "argv", ["mot-transition", "train", "tiny", "--quiet"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"


def test_grad_accum_is_another_way_to_give_the_micro_batch_and_trains_the_same(data_dir, tmp_path):
    by_rows = tiny_recipe(data_dir, model={"ffn_type": "mot", "group_size": 2}, train={"steps": 2, "micro_batch_size": 2})
    by_count = tiny_recipe(data_dir, model={"ffn_type": "mot", "group_size": 2}, train={"steps": 2, "grad_accum": 4})
    a = train(recipe_from_dict(by_rows), tmp_path / "rows", progress=False)
    b = train(recipe_from_dict(by_count), tmp_path / "count", progress=False)
    assert [m["loss"] for m in metric_lines(a.run_dir)] == [m["loss"] for m in metric_lines(b.run_dir)]
    one_pass = train(recipe_from_dict(tiny_recipe(data_dir, model={"ffn_type": "mot", "group_size": 2}, train={"steps": 2})), tmp_path / "one", progress=False)
    # 4 micro-batches of 2 rows: the same rows and the mean of the same per-token losses as one pass of 8
    assert [m["loss"] for m in metric_lines(a.run_dir)] == pytest.approx([m["loss"] for m in metric_lines(one_pass.run_dir)], rel=1e-5)


def test_grad_accum_and_micro_batch_size_that_disagree_are_refused_naming_both(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"'train.grad_accum' times train.micro_batch_size=16 must be at most"):
        load_recipe("tiny", ["train.micro_batch_size=16", "train.grad_accum=4"])
    raw = tiny_recipe(data_dir, train={"micro_batch_size": 2, "grad_accum": 2})  # 2 x 2 rows of 8: fits 2 processes, not 1
    with pytest.raises(ValueError, match=r"^recipe keys 'train.micro_batch_size' \(2\) x 'train.grad_accum' \(2\) must equal"):
        train(recipe_from_dict(raw), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_mot_micro_batch_not_a_multiple_of_group_size_fails_at_start_up_with_the_fix(data_dir, tmp_path):
    raw = tiny_recipe(data_dir, model={"ffn_type": "mot", "group_size": 4}, train={"batch_size": 6})
    with pytest.raises(ValueError, match=r"group_size=4.*train\.micro_batch_size") as error:
        train(recipe_from_dict(raw), tmp_path / "run", progress=False)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("ffn_type", ["mot", "expert_choice"])
def test_an_eval_batch_that_splits_a_group_fails_at_start_up_with_the_fix(data_dir, tmp_path, ffn_type):
    raw = tiny_recipe(data_dir, model={"ffn_type": ffn_type, "group_size": 4})
    raw["data"]["eval_batch_size"] = 6
    with pytest.raises(ValueError, match=r"group_size=4.*data\.eval_batch_size is 6.*multiple of 4 \(e\.g\. 4\)") as error:
        train(recipe_from_dict(raw), tmp_path / "run", progress=False)
    assert "\n" not in str(error.value) and not (tmp_path / "run" / "checkpoints").exists()


def test_overrides_are_toml_literals_with_dotted_section_keys():
    recipe = load_recipe("tiny", ["seed=3", "optim.lr=3e-4", "model.moe_layers=[1, 3]", "data.source=/tmp/my corpus.txt", "model.expert_size=none"])
    assert recipe.seed == 3 and recipe.optim.lr == 3e-4 and recipe.model.moe_layers == [1, 3]
    assert recipe.data.source == "/tmp/my corpus.txt" and recipe.model.expert_size is None


def test_block_style_is_an_override_on_any_recipe_and_the_flop_matched_widths_follow_it():
    gpt2, llama = load_recipe("tiny").model_config(), load_recipe("tiny", ["model.block=llama"]).model_config()
    assert (llama.block, llama.gated, llama.qk_norm, llama.activation_function) == ("llama", True, True, "silu")
    assert (gpt2.expert_size, llama.expert_size) == (256, 168)  # 2 x 256 ReLU matrices ~ 3 x 168 SwiGLU ones
    assert llama.to_dict() == load_recipe("tiny-llama").model_config().to_dict()


def test_recipe_written_as_toml_reads_back_equal():
    recipe = load_recipe("tiny", ["train.steps=7"])
    assert recipe_from_dict(tomllib.loads(recipe_to_toml(recipe))) == recipe


@pytest.mark.parametrize("path", sorted(p for p in RECIPES_DIR.glob("*.toml") if not is_grid_file(p)), ids=lambda p: p.stem)
def test_every_shipped_recipe_is_valid_and_starts_with_the_command_that_runs_it(path):
    recipe = load_recipe(path)
    assert path.read_text().splitlines()[0] == f"# mot-transition train {path.stem}"
    assert recipe.name == path.stem
    if recipe.model.ffn_type == "mot":
        assert recipe.train.batch_size % recipe.model.group_size == 0


def test_a_study_grid_given_to_train_points_to_study_and_is_not_listed_as_a_recipe(capsys):
    grids = sorted(p.stem for p in RECIPES_DIR.glob("*.toml") if is_grid_file(p))
    assert grids and all(is_grid_file(name) for name in grids)  # a built-in grid by its bare name too
    code, _, err = run_cli(["train", grids[0], "--out", "unused"], capsys)
    assert code == 1 and f"run it with mot-transition study {grids[0]}" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(["train", "no-such-recipe"], capsys)
    recipes = re.search(r"built-in recipes: ([^;)]*)", err).group(1).split(", ")
    listed_grids = re.search(r"built-in study grids \(mot-transition study NAME\): ([^;)]*)", err).group(1).split(", ")
    assert code == 1 and "tiny" in recipes and not set(grids) & set(recipes) and listed_grids == grids, err


@pytest.mark.parametrize("path", sorted(p for p in RECIPES_DIR.glob("*.toml") if is_grid_file(p)), ids=lambda p: p.stem)
def test_every_shipped_study_grid_is_valid_and_starts_with_the_command_that_runs_it(path):
    assert path.read_text().splitlines()[0].startswith(f"# mot-transition study recipes/{path.name} ")
    grid = load_grid(path)
    for size in grid.sizes:
        plan = plan_size(grid, size, [])
        assert plan.recipe.train.batch_size % plan.recipe.model.group_size == 0


@pytest.mark.parametrize("size", ["tiny", "medium", "base", "tiny-llama", "medium-llama"])
def test_baselines_have_the_shape_of_their_mot_recipe(size):
    mot = load_recipe(size if size.startswith("tiny") else f"{size}-mot")
    dense, token_choice = load_recipe(f"{size}-dense"), load_recipe(f"{size}-token-choice")
    assert dense.model.block == token_choice.model.block == mot.model.block
    shape = lambda r: (r.model.n_embd, r.model.n_layer, r.model.n_head, r.data.seq_len, r.train.batch_size, r.train.steps)
    assert shape(dense) == shape(token_choice) == shape(mot)
    assert (dense.model.ffn_type, token_choice.model.ffn_type, mot.model.ffn_type) == ("dense", "token_choice", "mot")
    mot_config, tc_config = mot.model_config(), token_choice.model_config()
    assert (tc_config.n_expert, tc_config.expert_size, tc_config.moe_layers) == (mot_config.n_expert, mot_config.expert_size, mot_config.moe_layers)


def test_switch_hook_is_called_once_after_switch_at_step_steps_and_training_goes_on(data_dir, tmp_path):
    calls = []

    def switch(trainer):
        calls.append(trainer.step_count)
        trainer.switch_model(trainer.model)  # a real switch passes the converted model here

    raw = tiny_recipe(data_dir, train={"switch_at_step": 2})
    result = train(recipe_from_dict(raw), tmp_path / "run", progress=False, switch=switch)
    assert calls == [2] and result.step == 6
    with pytest.raises(ValueError, match="'train.switch_at_step'"):
        train(recipe_from_dict(raw), tmp_path / "other", progress=False)
