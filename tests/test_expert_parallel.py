"""The trainer's expert parallelism (train.expert_parallel = N): experts shared out over N processes,
tokens dispatched to them, under torchrun with gloo on CPU. It must train the model one process trains
on the same global batch, and its checkpoints must resume on any layout."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from test_train import CLI_SCRIPT, metric_lines, parameters, tiny_recipe

from mot_transition.train import recipe_from_dict, train
from mot_transition.train.recipe import recipe_to_toml
from mot_transition.train.sharded_checkpoint import consolidate

# Token Choice with both router losses and the selection bias: its routers see the whole global batch
TOKEN_CHOICE = {"ffn_type": "token_choice", "router_aux_loss_coef": 0.5, "router_z_loss_coef": 0.01, "router_bias_update_rate": 0.01}
MODELS = {
    "token_choice": TOKEN_CHOICE,
    "mot": {"ffn_type": "mot", "group_size": 2},
    "expert_choice": {"ffn_type": "expert_choice", "group_size": 2},
}


def _torchrun(tmp_path, processes: int, *args) -> None:
    cli = tmp_path / "cli.py"
    cli.write_text(CLI_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", str(cli), *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _recipe_file(tmp_path, raw) -> str:
    path = tmp_path / "recipe.toml"
    path.write_text(recipe_to_toml(recipe_from_dict(raw)))
    return path


def _same_training(one, many, rel=1e-5):
    a, b = metric_lines(one), metric_lines(many)
    assert [m["step"] for m in b] == [m["step"] for m in a]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=rel, abs=1e-6)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
        if "eval_loss" in x:
            assert y["eval_loss"] == pytest.approx(x["eval_loss"], rel=rel)


@pytest.mark.torchrun
@pytest.mark.parametrize("kind", list(MODELS))
def test_two_processes_sharing_the_experts_train_the_model_of_one_process(data_dir, tmp_path, kind):
    # 2 processes x 2 micro-batches of 2 rows, each holding 2 of the 4 experts of every expert layer,
    # against 1 process x 2 micro-batches of 4 rows holding all of them
    raw = tiny_recipe(data_dir, model=MODELS[kind], train={"steps": 4, "checkpoint_every": 4, "eval_every": 2, "grad_accum": 2})
    single = train(recipe_from_dict(raw), tmp_path / "single", progress=False)
    _torchrun(tmp_path, 2, "train", _recipe_file(tmp_path, raw), "--out", tmp_path / "ep", "--quiet", "train.expert_parallel=2")
    _same_training(tmp_path / "single", tmp_path / "ep")
    whole, shared = parameters(single.checkpoint), parameters(tmp_path / "ep" / "checkpoints" / "step-000004")
    assert shared.keys() == whole.keys()  # the checkpoint holds every expert, gathered
    assert shared["transformer.h.1.mlp.lin1"].shape == whole["transformer.h.1.mlp.lin1"].shape
    for name in whole:
        torch.testing.assert_close(shared[name], whole[name], rtol=1e-4, atol=1e-5)


@pytest.mark.torchrun
def test_expert_parallelism_inside_data_parallel_replicas_trains_the_model_of_one_process(data_dir, tmp_path):
    # 4 processes: 2 replicas of 2 processes that share out the experts; the expert gradients are summed
    # over the replicas, the rest by DDP
    raw = tiny_recipe(data_dir, model=TOKEN_CHOICE, train={"steps": 4, "checkpoint_every": 4, "eval_every": 2, "batch_size": 16})
    train(recipe_from_dict(raw), tmp_path / "single", progress=False)
    _torchrun(tmp_path, 4, "train", _recipe_file(tmp_path, raw), "--out", tmp_path / "ep", "--quiet", "train.expert_parallel=2")
    _same_training(tmp_path / "single", tmp_path / "ep")


@pytest.mark.torchrun
@pytest.mark.parametrize("checkpoint_format", ["whole", "sharded"])
def test_an_expert_parallel_run_resumes_on_one_process_where_it_would_have_ended(data_dir, tmp_path, checkpoint_format):
    # expert-parallel 2 -> none: the checkpoint of step 2 holds every expert and its AdamW moments whole
    # (or through DCP), and one process goes on from it to the weights of the uninterrupted run
    train_keys = {"steps": 4, "checkpoint_every": 2, "keep_checkpoints": 3, "checkpoint_format": checkpoint_format}
    raw = tiny_recipe(data_dir, model=MODELS["mot"], train=train_keys)  # no dropout: 1 process draws other masks than 2
    _torchrun(tmp_path, 2, "train", _recipe_file(tmp_path, raw), "--out", tmp_path / "ep", "--quiet", "train.expert_parallel=2")
    shutil.copytree(tmp_path / "ep", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-000004")
    train(recipe_from_dict(raw), tmp_path / "resumed", progress=False, resume=True)
    if checkpoint_format == "sharded":
        for run in ("ep", "resumed"):
            consolidate(tmp_path / run / "checkpoints" / "step-000004", tmp_path / f"{run}-whole")
        ep, resumed = parameters(tmp_path / "ep-whole"), parameters(tmp_path / "resumed-whole")
    else:
        ep, resumed = (parameters(tmp_path / run / "checkpoints" / "step-000004") for run in ("ep", "resumed"))
    assert resumed.keys() == ep.keys()
    for name in ep:
        torch.testing.assert_close(resumed[name], ep[name], rtol=1e-5, atol=1e-6)


@pytest.mark.torchrun
def test_an_expert_parallel_mot_run_converts_and_transition_tunes_on_one_process(data_dir, tmp_path, capsys):
    # the source recipe says train.expert_parallel=2; transition is one process, all experts its own
    raw = tiny_recipe(data_dir, model=MODELS["mot"], train={"steps": 2, "checkpoint_every": 2, "eval_every": 2})
    _torchrun(tmp_path, 2, "train", _recipe_file(tmp_path, raw), "--out", tmp_path / "ep", "--quiet", "train.expert_parallel=2")
    source = tmp_path / "ep" / "checkpoints" / "step-000002"
    code, _, err = run_cli(["convert", str(source), str(tmp_path / "tc")], capsys)
    assert code == 0, err
    code, _, err = run_cli(["transition", str(tmp_path / "tc"), "--steps", "2", "--out", str(tmp_path / "tt")], capsys)
    assert code == 0, err
    assert (tmp_path / "tt" / "checkpoints" / "step-000002" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.expert_parallel=0", "train.expert_parallel"),
        ("train.expert_parallel=3", "train.expert_parallel"),  # does not divide model.n_expert=4
        ("train.expert_parallel=2;train.parallel=fsdp", "train.expert_parallel"),
        ("train.expert_parallel=2;train.compile=true", "train.compile"),
        ("train.expert_parallel=2;model.ffn_type='dense'", "train.expert_parallel"),
    ],
)
def test_an_impossible_expert_parallel_recipe_is_refused_in_one_line_naming_the_key(data_dir, tmp_path, capsys, override, key):
    recipe = _recipe_file(tmp_path, tiny_recipe(data_dir, model={"ffn_type": "mot", "group_size": 2}))
    code, _, err = run_cli(["train", str(recipe), "--out", str(tmp_path / "run"), *override.split(";")], capsys)
    assert code != 0 and key in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_expert_parallelism_on_fewer_processes_than_it_names_is_refused_before_a_step(data_dir, tmp_path, capsys):
    recipe = _recipe_file(tmp_path, tiny_recipe(data_dir, model={"ffn_type": "mot", "group_size": 2}))
    code, _, err = run_cli(["train", str(recipe), "--out", str(tmp_path / "run"), "train.expert_parallel=2"], capsys)
    assert code != 0 and "train.expert_parallel=2" in err and "1" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.torchrun
def test_each_process_holds_its_share_of_the_experts_and_the_layers_give_the_whole_layers_outputs(tmp_path):
    # the layers alone, shared out over 2 processes, against each layer whole: outputs, input gradients and
    # expert gradients, with a process whose tokens are all masked and one with a single token
    worker = Path(__file__).with_name("expert_parallel_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]  # every check is an assert in the worker


def test_expert_gradients_come_back_from_their_buckets_each_to_its_own_tensor(monkeypatch):
    # the replicas' sum runs on flat buckets; here a group of one (the sum is the identity) and buckets of
    # about one tensor, so that a slip in flattening or copying back moves values between tensors
    import torch.distributed as dist

    from mot_transition import MoTConfig, MoTLMHeadModel
    from mot_transition.train import expert_parallel

    config = MoTConfig(ffn_type="token_choice", n_embd=8, n_head=2, n_layer=3, n_expert=4, expert_size=6, vocab_size=32,
                       moe_layers=[0, 1, 2])
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = expert_parallel.apply_expert_parallel(MoTLMHeadModel(config), 1, torch.device("cpu"))
        held = [p for p in model.parameters() if isinstance(p, torch.distributed.tensor.DTensor)]
        assert len(held) == 6  # lin1, lin2 of 3 layers
        for p in held:
            p.grad = torch.distributed.tensor.DTensor.from_local(torch.randn(p.to_local().shape), p.device_mesh, p.placements)
        before = [p.grad.to_local().clone() for p in held]
        monkeypatch.setattr(expert_parallel, "BUCKET_BYTES", 4 * 4 * 8 * 6 + 1)  # just over one tensor: 3 buckets of 2
        calls = []
        monkeypatch.setattr(dist, "all_reduce", lambda tensor, group=None: calls.append(tensor.numel()))
        model.expert_parallel_groups = (dist.group.WORLD, 1)
        expert_parallel.sync_expert_gradients(model)
    finally:
        dist.destroy_process_group()
    assert calls == [2 * 4 * 8 * 6] * 3
    for p, grad in zip(held, before):
        assert torch.equal(p.grad.to_local(), grad)
