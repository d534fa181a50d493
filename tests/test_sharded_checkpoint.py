"""Sharded checkpoints (train.checkpoint_format = "sharded", torch.distributed.checkpoint), their
consolidation into the whole layout, and resuming on another number of processes."""

import os
import pickle
import shutil
import socket
import subprocess
import sys
import weakref

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from mot_transition.train import load_training_state, recipe_from_dict, train
from mot_transition.train import sharded_checkpoint
from mot_transition.train.recipe import recipe_to_toml
from mot_transition.train.sharded_checkpoint import consolidate, write_safetensors_streamed
from test_train import CLI_SCRIPT, _torchrun, metric_lines, parameters, tiny_recipe

MOT = {"ffn_type": "mot", "group_size": 2, "resid_pdrop": 0.1}  # dropout: the RNG states must come back too


def _same_files(a, b, names=("model.safetensors", "training_state.safetensors")):
    for name in names:
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys(), name
        for key in x:
            assert torch.equal(x[key], y[key]), (name, key)


def test_a_sharded_run_resumes_exactly_and_consolidates_to_the_whole_run_bit_for_bit(data_dir, tmp_path, capsys):
    sharded = tiny_recipe(data_dir, model=MOT, train={"checkpoint_format": "sharded", "grad_accum": 2})
    run = train(recipe_from_dict(sharded), tmp_path / "sharded", progress=False)
    assert (run.checkpoint / "dcp" / ".metadata").is_file() and not (run.checkpoint / "model.safetensors").exists()
    shutil.copytree(tmp_path / "sharded", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-000006")
    train(recipe_from_dict(sharded), tmp_path / "resumed", progress=False, resume=True)  # from sharded step 3
    whole = train(recipe_from_dict(tiny_recipe(data_dir, model=MOT, train={"grad_accum": 2})), tmp_path / "whole", progress=False)

    consolidate(tmp_path / "sharded", tmp_path / "a")
    consolidate(tmp_path / "resumed", tmp_path / "b")
    _same_files(tmp_path / "a", tmp_path / "b")
    _same_files(tmp_path / "a", whole.checkpoint)  # the weights and the AdamW state (and RNG) of the whole format
    state, _ = load_training_state(tmp_path / "a")
    assert "checkpoint_format" not in state and state["step"] == 6
    # the consolidated checkpoint is an ordinary one: convert reads it
    code, _, err = run_cli(["convert", str(tmp_path / "a"), str(tmp_path / "tc")], capsys)
    assert code == 0, err


def test_a_sharded_checkpoint_is_refused_by_readers_of_whole_ones_in_one_line_naming_consolidate(data_dir, tmp_path, capsys):
    raw = tiny_recipe(data_dir, model=MOT, train={"steps": 3, "checkpoint_format": "sharded"})
    train(recipe_from_dict(raw), tmp_path / "run", progress=False)
    for command in (["info", str(tmp_path / "run")], ["convert", str(tmp_path / "run"), str(tmp_path / "tc")],
                    ["generate", str(tmp_path / "run"), "--prompt", "def"]):
        code, _, err = run_cli(command, capsys)
        assert code == 1 and "mot-transition consolidate" in err and len(err.strip().splitlines()) == 1, (command, err)
    assert not (tmp_path / "tc").exists()
    code, _, err = run_cli(["consolidate", str(tmp_path / "run"), str(tmp_path / "whole")], capsys)
    assert code == 0, err
    code, _, err = run_cli(["consolidate", str(tmp_path / "whole"), str(tmp_path / "again")], capsys)
    assert code == 1 and "not a sharded checkpoint" in err
    code, _, err = run_cli(["consolidate", str(tmp_path / "nothing"), str(tmp_path / "again")], capsys)
    assert code == 1 and f"no checkpoint at {tmp_path / 'nothing'}" in err  # not "already whole"
    code, _, err = run_cli(["consolidate", str(tmp_path / "run"), str(tmp_path / "whole")], capsys)
    assert code == 1 and "--force" in err
    code, _, err = run_cli(["consolidate", str(tmp_path / "run"), str(tmp_path / "whole"), "--force"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["consolidate", str(tmp_path / "run"), str(tmp_path / "run" / "checkpoints"), "--force"], capsys)
    assert code == 1 and (tmp_path / "run" / "checkpoints" / "step-000003" / "dcp").is_dir()  # never replaces what it did not write


    # DCP's metadata is a pickle: one that would run code is refused, and runs nothing
    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    (tmp_path / "run" / "checkpoints" / "step-000003" / "dcp" / ".metadata").write_bytes(pickle.dumps(Hostile()))
    code, _, err = run_cli(["consolidate", str(tmp_path / "run"), str(tmp_path / "hostile")], capsys)
    assert code == 1 and "not part of a checkpoint's metadata" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "ran").exists() and not (tmp_path / "hostile").exists()
    # a dotted name would reach the allowed module's own imports (its os.system)
    module, name, command = b"torch.distributed.checkpoint.metadata", b"os.system", f"touch {tmp_path / 'ran'}".encode()
    dotted = (b"\x80\x04" + pickle.SHORT_BINUNICODE + bytes([len(module)]) + module + pickle.SHORT_BINUNICODE + bytes([len(name)]) + name
              + pickle.STACK_GLOBAL + pickle.SHORT_BINUNICODE + bytes([len(command)]) + command + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)
    (tmp_path / "run" / "checkpoints" / "step-000003" / "dcp" / ".metadata").write_bytes(dotted)
    code, _, err = run_cli(["consolidate", str(tmp_path / "run"), str(tmp_path / "hostile")], capsys)
    assert code == 1 and "os.system is not part of a checkpoint's metadata" in err and not (tmp_path / "ran").exists(), err
    # an entry DCP would read as bytes (and unpickle with weights_only=False), or a data file outside dcp/
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorProperties, TensorStorageMetadata

    entry = TensorStorageMetadata(properties=TensorProperties(dtype=torch.float32), size=torch.Size([2]), chunks=[])
    outside = Metadata(state_dict_metadata={"model.w": entry},
                       storage_data={MetadataIndex("model.w"): _StorageInfo(relative_path="../../secret", offset=0, length=8)})
    (tmp_path / "run" / "checkpoints" / "step-000003" / "dcp" / ".metadata").write_bytes(pickle.dumps(outside))
    code, _, err = run_cli(["consolidate", str(tmp_path / "run"), str(tmp_path / "hostile")], capsys)
    assert code == 1 and "outside its folder" in err, err


def test_a_save_that_dies_leaves_the_last_good_sharded_checkpoint_and_a_damaged_one_is_skipped(data_dir, tmp_path, monkeypatch):
    raw = tiny_recipe(data_dir, model=MOT, train={"checkpoint_format": "sharded"})
    real = sharded_checkpoint.save_sharded

    def dies_at_step_6(tmp, model, optimizer):
        real(tmp, model, optimizer)
        if "step-000006" in tmp.name:
            raise OSError("disk full")

    monkeypatch.setattr(sharded_checkpoint, "save_sharded", dies_at_step_6)
    with pytest.raises(OSError, match="disk full"):
        train(recipe_from_dict(raw), tmp_path / "run", progress=False)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000003"]

    # a checkpoint whose DCP metadata is damaged is set aside, and the run resumes from the one before
    train(recipe_from_dict(raw), tmp_path / "run", progress=False, resume=True)
    shutil.copytree(tmp_path / "run", tmp_path / "damaged")
    metadata = tmp_path / "damaged" / "checkpoints" / "step-000006" / "dcp" / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:40])
    with pytest.warns(UserWarning, match="skipping the damaged checkpoint step-000006"):
        train(recipe_from_dict(raw), tmp_path / "damaged", progress=False, resume=True)
    for name, tensor in parameters_of(tmp_path / "run").items():
        assert torch.equal(parameters_of(tmp_path / "damaged")[name], tensor), name


def parameters_of(run):
    consolidated = run.parent / f"{run.name}-whole"
    shutil.rmtree(consolidated, ignore_errors=True)
    return load_file(consolidate(run, consolidated) / "model.safetensors")


def test_streamed_safetensors_hold_one_tensor_at_a_time_and_read_back_as_safetensors_writes_them(tmp_path):
    tensors = {
        "a": torch.randn(3, 5), "b": torch.randn(4, dtype=torch.float64), "c": torch.randn(2, 3).bfloat16(),
        "d": torch.arange(7), "e": torch.tensor(2.5), "f": torch.empty(0, 4), "g": torch.tensor([True, False]),
    }
    alive = []

    def read(name):
        assert all(ref() is None for ref in alive), "the previous tensor is still held"
        tensor = tensors[name].clone()
        alive.append(weakref.ref(tensor))
        return tensor

    write_safetensors_streamed(tmp_path / "x.safetensors", [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], read)
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    with pytest.raises(ValueError, match="tensor a read back as"):
        write_safetensors_streamed(tmp_path / "y.safetensors", [("a", torch.float16, (3, 5))], lambda n: tensors[n])


@pytest.mark.torchrun
@pytest.mark.parametrize("checkpoint_format", ["whole", "sharded"])
def test_a_run_resumes_on_another_number_of_processes_with_the_same_global_batches(data_dir, tmp_path, checkpoint_format):
    # 2 sharded processes -> 1 process -> 2 sharded processes, one leg of 2 steps each (micro-batches
    # of 2 rows: 2 a step on each of 2 processes, then 4 on one process): the same
    # global batches in the same order, the AdamW moments resharded, and the model of one process
    # that ran all 6 steps; Token Choice with its router losses, which see the whole global batch
    model = {"ffn_type": "token_choice", "router_aux_loss_coef": 0.5, "router_z_loss_coef": 0.01}
    train_keys = {"steps": 6, "checkpoint_every": 2, "keep_checkpoints": 3, "micro_batch_size": 2, "parallel": "fsdp"}
    raw = tiny_recipe(data_dir, model=model, train={**train_keys, "checkpoint_format": checkpoint_format})
    recipe_file = tmp_path / "recipe.toml"
    recipe_file.write_text(recipe_to_toml(recipe_from_dict(raw)))
    single = train(recipe_from_dict(tiny_recipe(data_dir, model=model, train=train_keys)), tmp_path / "single", progress=False)

    run = tmp_path / "run"
    _torchrun(tmp_path, "train", recipe_file, "--out", run, "--quiet")
    for step in ("step-000004", "step-000006"):
        shutil.rmtree(run / "checkpoints" / step)
    train(recipe_from_dict(raw), run, progress=False, resume=True)  # steps 3-4 on one process
    assert load_training_state(run / "checkpoints" / "step-000004")[0]["world_size"] == 1
    shutil.rmtree(run / "checkpoints" / "step-000006")
    _torchrun(tmp_path, "train", recipe_file, "--out", run, "--resume", "--quiet")  # steps 5-6 on two

    one, legs = metric_lines(tmp_path / "single"), metric_lines(run)
    assert [m["step"] for m in legs] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(one, legs):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), (a["step"], a["loss"], b["loss"])
    last = run / "checkpoints" / "step-000006"
    if checkpoint_format == "sharded":
        last = consolidate(last, tmp_path / "consolidated")
    p1, p2 = parameters(single.checkpoint), parameters(last)
    for name in p1:
        torch.testing.assert_close(p2[name], p1[name], rtol=1e-4, atol=1e-5)


def _two_nodes(tmp_path, per_node: int, *args) -> None:
    """Two torchrun agents on this machine as two nodes of `per_node` processes each, meeting through a
    c10d rendezvous on 127.0.0.1, as `torchrun --nnodes=2` is started on each node of a cluster."""
    cli = tmp_path / "cli.py"
    cli.write_text(CLI_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--nproc_per_node={per_node}", "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=two-nodes-{port}", str(cli), *map(str, args),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]


@pytest.mark.torchrun
@pytest.mark.parametrize("parallel, per_node", [("fsdp", 1), ("hsdp", 2)])
def test_two_nodes_train_checkpoint_and_resume_as_one_process_trains(data_dir, tmp_path, parallel, per_node):
    # hsdp with 2 processes a node: sharded within each node, replicated across the two
    model = {"ffn_type": "token_choice", "router_aux_loss_coef": 0.5, "router_z_loss_coef": 0.01}
    train_keys = {"steps": 6, "checkpoint_every": 3, "parallel": parallel}
    raw = tiny_recipe(data_dir, model=model, train={**train_keys, "checkpoint_format": "sharded"})
    recipe_file = tmp_path / "recipe.toml"
    recipe_file.write_text(recipe_to_toml(recipe_from_dict(raw)))
    single = train(recipe_from_dict(tiny_recipe(data_dir, model=model, train=train_keys)), tmp_path / "single", progress=False)

    _two_nodes(tmp_path, per_node, "train", recipe_file, "--out", tmp_path / "run", "--quiet")
    state = load_training_state(tmp_path / "run" / "checkpoints" / "step-000006")[0]
    assert state["world_size"] == 2 * per_node and state["mesh"] == ([2, 2] if parallel == "hsdp" else [2])
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000006")
    _two_nodes(tmp_path, per_node, "train", recipe_file, "--out", tmp_path / "run", "--resume", "--quiet")

    one, two = metric_lines(tmp_path / "single"), metric_lines(tmp_path / "run")
    assert [m["step"] for m in two] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
    whole = consolidate(tmp_path / "run", tmp_path / "whole")
    p1, p2 = parameters(single.checkpoint), parameters(whole)
    for name in p1:
        torch.testing.assert_close(p2[name], p1[name], rtol=1e-4, atol=1e-5)


def test_one_process_in_a_process_group_of_one_trains_sharded_as_it_trains_whole(data_dir, tmp_path):
    # how scripts/gpu-check.sh runs FSDP2 (with bf16 gathers) on one GPU: a group of one process
    import torch.distributed as dist

    model = {"ffn_type": "token_choice", "router_aux_loss_coef": 0.5}
    whole = train(recipe_from_dict(tiny_recipe(data_dir, model=model, train={"steps": 3})), tmp_path / "whole", progress=False)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        raw = tiny_recipe(data_dir, model=model, train={"steps": 3, "parallel": "fsdp"})
        sharded = train(recipe_from_dict(raw), tmp_path / "sharded", progress=False)
    finally:
        dist.destroy_process_group()
    assert load_training_state(sharded.checkpoint)[0]["mesh"] == [1]
    for a, b in zip(metric_lines(tmp_path / "whole"), metric_lines(tmp_path / "sharded")):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    p1, p2 = parameters(whole.checkpoint), parameters(sharded.checkpoint)
    for name in p1:
        torch.testing.assert_close(p2[name], p1[name], rtol=1e-4, atol=1e-5)


def test_a_sharded_mot_run_goes_on_to_transition_through_consolidate_and_the_pipeline_refuses_the_key(data_dir, tmp_path, capsys):
    raw = tiny_recipe(data_dir, model=MOT, train={"steps": 3, "checkpoint_format": "sharded"})
    train(recipe_from_dict(raw), tmp_path / "mot", progress=False)
    for command in (["consolidate", str(tmp_path / "mot"), str(tmp_path / "whole")], ["convert", str(tmp_path / "whole"), str(tmp_path / "tc")],
                    ["transition", str(tmp_path / "tc"), "--steps", "2", "--checkpoint-every", "1", "--out", str(tmp_path / "tr")]):
        code, _, err = run_cli(command, capsys)
        assert code == 0, (command, err)
    # the transition's recipe came from the sharded run, but one process writes whole checkpoints
    assert all((c / "model.safetensors").is_file() for c in (tmp_path / "tr" / "checkpoints").iterdir())

    recipe_file = tmp_path / "recipe.toml"
    recipe_file.write_text(recipe_to_toml(recipe_from_dict(raw)))
    code, _, err = run_cli(["run", str(recipe_file), "--out", str(tmp_path / "pipeline")], capsys)
    assert code == 1 and "train.checkpoint_format" in err and not (tmp_path / "pipeline").exists(), err
