"""MoT -> Token Choice conversion: the weight mapping, calibration, and the checkpoint converter."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, tiny_config
from mot_transition import MoTLMHeadModel
from mot_transition.convert import convert_checkpoint, convert_model, default_top_k, mot_to_token_choice


def trained_like_mot(**overrides):
    """A MoT model whose controller is far from its init, so that the softmax matters."""
    model = MoTLMHeadModel(tiny_config("mot", **{"n_layer": 4, "n_expert": 8, "group_size": 4, "mot_temperature": 0.5, **overrides})).eval()
    with torch.no_grad():
        for i in model.config.moe_layers:
            model.transformer.h[i].mlp.controller.normal_(0, 1.0)
    return model


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_state_dict_mapping_folds_temperature_and_keeps_every_other_tensor_bit_identical():
    model = trained_like_mot()
    state = model.state_dict()
    converted, config, report = mot_to_token_choice(state, model.config)
    assert config.ffn_type == "token_choice" and config.num_experts_per_tok == default_top_k(model.config) == 2
    for name, tensor in state.items():
        if name.endswith("mlp.controller"):
            assert torch.allclose(converted[name], tensor / 0.5)
        else:
            assert torch.equal(converted[name], tensor), name
    transformed = {row["name"] for row in report.tensors if row["action"] == "transformed"}
    assert transformed == {f"transformer.h.{i}.mlp.controller" for i in model.config.moe_layers}


def test_router_logits_of_converted_model_equal_mot_controller_logits_on_the_same_hidden_states():
    mot = trained_like_mot()
    tc, _ = convert_model(mot)
    ids = torch.randint(0, 61, (8, 6))
    with torch.no_grad():
        mot_logits = mot(ids, output_router_logits=True).router_logits
        tc_logits = tc(ids, output_router_logits=True).router_logits
        # the first MoE layer sees identical hidden states in both models
        assert torch.allclose(tc_logits[0], mot_logits[0], atol=1e-5, rtol=1e-5)
        # and on any hidden states, layer by layer
        h = torch.randn(8, 6, 32)
        for i in mot.config.moe_layers:
            mot_layer, tc_layer = mot.transformer.h[i].mlp, tc.transformer.h[i].mlp
            assert torch.allclose(tc_layer(h)[1], mot_layer(h)[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block", ["gpt2", "llama"])
def test_mot_of_single_token_groups_emitting_over_experts_is_the_converted_dropless_token_choice_with_every_expert(block):
    """Issue 14, item 5: the identity behind the comparison. With g=1 every expert's mixture is the
    token itself, and emitting with the softmax over experts weighs expert e by softmax(x W / T)_e:
    exactly Token Choice with top-k = E and the router W / T (what conversion writes)."""
    mot = trained_like_mot(group_size=1, emit_softmax_over_experts=True, block=block)
    tc, _ = convert_model(mot, num_experts_per_tok=mot.config.n_expert)
    assert tc.config.capacity_factor is None and not tc.config.norm_topk_prob  # dropless, gates not renormalised
    ids = torch.randint(0, 61, (5, 7))
    h = torch.randn(5, 7, 32)
    with torch.no_grad():
        for i in mot.config.moe_layers:
            torch.testing.assert_close(tc.transformer.h[i].mlp(h)[0], mot.transformer.h[i].mlp(h)[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tc(ids).logits, mot(ids).logits, rtol=1e-5, atol=1e-5)
    for i in mot.config.moe_layers:  # the default MoT emits with the merge weights instead: 1 for every expert at g=1
        mot.transformer.h[i].mlp.emit_softmax_over_experts = False
    with torch.no_grad():
        assert not torch.allclose(tc(ids).logits, mot(ids).logits, rtol=1e-3, atol=1e-3)


def test_calibration_lowers_the_gap_between_mot_and_token_choice_layer_outputs():
    mot = trained_like_mot()
    batches = [torch.randint(0, 61, (8, 8)) for _ in range(2)]
    converted, config, report = mot_to_token_choice(mot.state_dict(), mot.config, calibration=batches)
    calibration = report.calibration
    for i in mot.config.moe_layers:
        assert calibration["mse_after"][i] < calibration["mse_before"][i]
        name = f"transformer.h.{i}.mlp.lin2"
        assert torch.allclose(converted[name], mot.state_dict()[name] * calibration["scales"][i])


def test_convert_checkpoint_writes_token_choice_checkpoint_with_identical_tensors(tmp_path):
    mot = trained_like_mot()
    mot.save_pretrained(tmp_path / "mot")
    (tmp_path / "mot" / "tokenizer.json").write_text("{}")
    before = digest(tmp_path / "mot")
    report = convert_checkpoint(tmp_path / "mot", tmp_path / "tc", num_experts_per_tok=1)
    assert digest(tmp_path / "mot") == before, "the source is never touched"
    src, dst = load_file(tmp_path / "mot" / "model.safetensors"), load_file(tmp_path / "tc" / "model.safetensors")
    assert src.keys() == dst.keys()
    for name in src:
        if name.endswith("mlp.controller"):
            assert torch.allclose(dst[name], src[name] / 0.5)
        else:
            assert torch.equal(dst[name], src[name]), name
    config = json.loads((tmp_path / "tc" / "config.json").read_text())
    assert config["ffn_type"] == "token_choice" and config["num_experts_per_tok"] == 1
    assert (tmp_path / "tc" / "tokenizer.json").is_file()
    saved = json.loads((tmp_path / "tc" / "conversion_report.json").read_text())
    assert saved["config_changes"]["ffn_type"] == ["mot", "token_choice"] and len(saved["tensors"]) == len(src)
    assert report.parameters_after["total"] == report.parameters_before["total"]
    assert report.parameters_after["active_per_token"] < report.parameters_before["active_per_token"]
    loaded = MoTLMHeadModel.from_pretrained(tmp_path / "tc")
    expected, _ = convert_model(mot, num_experts_per_tok=1)
    ids = torch.randint(0, 61, (2, 5))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, expected(ids).logits, atol=1e-6)


def test_sharded_checkpoint_converts_shard_by_shard(tmp_path):
    mot = trained_like_mot()
    mot.save_pretrained(tmp_path / "mot", max_shard_size="40KB")
    assert (tmp_path / "mot" / "model.safetensors.index.json").is_file()
    convert_checkpoint(tmp_path / "mot", tmp_path / "tc")
    loaded = MoTLMHeadModel.from_pretrained(tmp_path / "tc")
    expected, _ = convert_model(mot)
    ids = torch.randint(0, 61, (2, 5))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, expected(ids).logits, atol=1e-6)


@pytest.fixture
def mot_checkpoint(tmp_path):
    path = tmp_path / "mot"
    trained_like_mot().save_pretrained(path)
    return path


def corrupt_truncate(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def corrupt_header_byte(path):
    data = bytearray((path / "model.safetensors").read_bytes())
    header = data[8:8 + int.from_bytes(data[:8], "little")]
    position = 8 + header.index(b"data_offsets") + len('data_offsets":[') + 1
    data[position] ^= 0x11  # one byte of one tensor's offsets
    (path / "model.safetensors").write_bytes(bytes(data))


def make_dense(path):
    MoTLMHeadModel(tiny_config("dense")).save_pretrained(path, safe_serialization=True)


def make_mot_without_mot_layers(path):
    MoTLMHeadModel(tiny_config("mot", moe_layers=[])).save_pretrained(path, safe_serialization=True)


@pytest.mark.parametrize(
    "damage, words",
    [
        (make_dense, "only a MoT checkpoint"),
        (make_mot_without_mot_layers, "with no MoT layer (moe_layers is empty)"),
        (corrupt_truncate, "truncated or corrupted"),
        (corrupt_header_byte, "truncated or corrupted"),
        ("self", "overwrite or nest"),
        ("top-k", "--top-k must be between 1"),
        ("capacity", "--capacity-factor must be a finite number > 0, got inf"),  # issue 13: inf passed
        ("missing", "no checkpoint"),
    ],
)
def test_convert_refuses_bad_input_with_one_line_and_writes_nothing(mot_checkpoint, tmp_path, capsys, damage, words):
    src, dst, extra = mot_checkpoint, tmp_path / "out", []
    if damage == "self":
        dst = mot_checkpoint
    elif damage == "top-k":
        extra = ["--top-k", "9"]
    elif damage == "capacity":
        extra = ["--capacity-factor", "inf"]
    elif damage == "missing":
        src = tmp_path / "nowhere"
    elif damage in (make_dense, make_mot_without_mot_layers):
        src = tmp_path / "dense"
        damage(src)
    else:
        damage(mot_checkpoint)
    before = digest(src) if src.exists() else None
    code, out, err = run_cli(["convert", src, dst, *extra], capsys)
    assert code != 0
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err + out
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    if before is not None:
        assert digest(src) == before


def test_convert_refuses_an_existing_destination_unless_forced(mot_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich's width: no name folded over two lines
    code, out, _ = run_cli(["convert", mot_checkpoint, tmp_path / "out"], capsys)
    report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    moved = [row["name"] for row in report["tensors"] if row["action"] == "transformed"]
    # the table: every transformed tensor in full, the carried ones counted (the report lists all)
    assert code == 0 and moved and f"the other {len(report['tensors']) - len(moved)}" in out
    assert all(f" {name} " in out for name in moved)
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, _, err = run_cli(["convert", mot_checkpoint, tmp_path / "out"], capsys)
    assert code == 1 and "--force" in err and (tmp_path / "out" / "keep.txt").read_text() == "mine"
    code, _, err = run_cli(["convert", mot_checkpoint, tmp_path / "out", "--force"], capsys)  # issue 24: never a file
    assert code == 1 and "keep.txt" in err and (tmp_path / "out" / "keep.txt").read_text() == "mine"  # it did not write
    (tmp_path / "out" / "keep.txt").unlink()
    code, out, _ = run_cli(["convert", mot_checkpoint, tmp_path / "out", "--force", "--top-k", "3"], capsys)
    assert code == 0 and "transformed" in out  # a conversion of ours is replaced whole
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_experts_per_tok"] == 3


def test_force_replaces_a_conversion_whose_report_lists_no_files_but_never_a_training_checkpoint(mot_checkpoint, tmp_path, capsys):
    """A conversion written before reports listed their files is still replaced; a checkpoint of a
    training run (config.json of model_type "mot" too, but no conversion report) never is."""
    assert run_cli(["convert", mot_checkpoint, tmp_path / "old"], capsys)[0] == 0
    report = json.loads((tmp_path / "old" / "conversion_report.json").read_text())
    del report["files"]
    (tmp_path / "old" / "conversion_report.json").write_text(json.dumps(report))
    assert run_cli(["convert", mot_checkpoint, tmp_path / "old", "--force"], capsys)[0] == 0
    step = tmp_path / "run" / "checkpoints" / "step-000008"
    shutil.copytree(mot_checkpoint, step)
    (step / "training_state.json").write_text(json.dumps({"step": 8}))
    before = digest(step)
    code, _, err = run_cli(["convert", mot_checkpoint, step, "--force"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "conversion_report.json" in err, err
    assert digest(step) == before


def test_force_never_replaces_a_directory_this_toolkit_did_not_write(mot_checkpoint, tmp_path, capsys):
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    (notes / "notes.txt").write_text("mine")
    (notes / "sub" / "data.csv").write_text("a,b\n1,2\n")
    before = digest(notes)
    code, out, err = run_cli(["convert", mot_checkpoint, notes, "--force"], capsys)
    assert code == 1 and "not a conversion or export this toolkit wrote" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err + out
    assert digest(notes) == before and (notes / "sub" / "data.csv").read_text() == "a,b\n1,2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mot", "notes"]  # no staging left either


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_convert_removes_the_staging_of_killed_runs_and_keeps_a_running_ones(mot_checkpoint, tmp_path, capsys):
    dead, alive = tmp_path / f".out.converting-{_dead_pid()}", tmp_path / f".out.converting-{os.getppid()}"
    for staging in (dead, alive):
        staging.mkdir()
        (staging / "model.safetensors").write_bytes(b"half")
    code, _, _ = run_cli(["convert", mot_checkpoint, tmp_path / "out"], capsys)
    assert code == 0 and not dead.exists() and alive.exists()


def test_convert_puts_back_an_old_output_that_a_killed_run_had_moved_aside(mot_checkpoint, tmp_path, capsys):
    run_cli(["convert", mot_checkpoint, tmp_path / "out"], capsys)
    before = digest(tmp_path / "out")
    os.replace(tmp_path / "out", tmp_path / f".out.old-{_dead_pid()}")  # killed between the two renames
    code, _, err = run_cli(["convert", mot_checkpoint, tmp_path / "out"], capsys)
    assert code == 1 and "--force" in err  # the old output is back, and not replaced without --force
    assert digest(tmp_path / "out") == before and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("damage, words", [
    (corrupt_truncate, "truncated or corrupted"),
    (corrupt_header_byte, "truncated or corrupted"),
    (lambda path: (path / "model.safetensors").write_bytes(os.urandom(4096)), "truncated or corrupted"),
    (lambda path: (path / "model.safetensors").unlink(), "has no model.safetensors"),
])
def test_info_reports_a_damaged_checkpoint_in_one_line_instead_of_describing_it(mot_checkpoint, damage, words, capsys):
    """Issue 13, item 11: info read only config.json and said rc 0 of a truncated or random file."""
    damage(mot_checkpoint)
    code, _, err = run_cli(["info", mot_checkpoint], capsys)
    assert code == 1 and words in err and len(err.strip().splitlines()) == 1


def test_cli_convert_and_info_as_a_user_types_them(mot_checkpoint, tmp_path):
    done = subprocess.run([sys.executable, "-m", "mot_transition.cli", "convert", str(mot_checkpoint), str(tmp_path / "tc")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "router = controller / T" in done.stdout
    done = subprocess.run([sys.executable, "-m", "mot_transition.cli", "info", str(tmp_path / "tc")], capture_output=True, text=True)
    assert done.returncode == 0 and "token_choice ffn" in done.stdout


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda sd: sd.pop("transformer.h.3.mlp.lin1"), "lacks the tensor transformer.h.3.mlp.lin1"),
        (lambda sd: sd.__setitem__("transformer.h.0.mlp.extra", torch.zeros(1)), "has a tensor transformer.h.0.mlp.extra"),
        (lambda sd: sd.__setitem__("transformer.h.2.mlp.lin2", torch.zeros(8, 16, 31)), "transformer.h.2.mlp.lin2 of shape"),
    ],
)
def test_mapping_names_a_missing_extra_or_misshapen_tensor(edit, words):
    model = trained_like_mot()
    state = dict(model.state_dict())
    edit(state)
    with pytest.raises(ValueError, match=words):
        mot_to_token_choice(state, model.config)


def test_checkpoint_with_a_misshapen_tensor_is_refused_before_writing(tmp_path, capsys):
    from safetensors.torch import save_file

    model = trained_like_mot()
    model.save_pretrained(tmp_path / "mot")
    state = load_file(tmp_path / "mot" / "model.safetensors")
    state["transformer.h.2.mlp.controller"] = torch.zeros(32, 5)
    save_file(state, tmp_path / "mot" / "model.safetensors")
    code, _, err = run_cli(["convert", tmp_path / "mot", tmp_path / "out"], capsys)
    assert code == 1 and "controller of shape (32, 5)" in err and not (tmp_path / "out").exists()
