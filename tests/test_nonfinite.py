"""NaN and infinity never pass silently (issue 13, items 4-6): no checkpoint with non-finite
weights is written, called good, converted, loaded or served, and no JSON file holds NaN."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli, tiny_config, tree_digest
from mot_transition.checkpoint_io import check_finite, load_checked
from mot_transition.jsonfiles import dumps, write_json
from mot_transition.modeling import MoTLMHeadModel
from mot_transition.train import Trainer, TrainingDiverged, latest_checkpoint, recipe_from_dict, train
from mot_transition.train.checkpoint import save_checkpoint


def recipe(data_dir: Path, **train_keys):
    return recipe_from_dict({
        "name": "nonfinite", "seed": 1,
        "model": {"ffn_type": "dense", "n_embd": 32, "n_layer": 2, "n_head": 2},
        "data": {"source": str(data_dir / "corpus.txt"), "heldout_fraction": 0.1, "vocab_size": 300, "seq_len": 32,
                 "eval_batches": 2, "eval_batch_size": 4, "cache_dir": str(data_dir / "cache")},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"steps": 6, "batch_size": 8, "eval_every": 5, "checkpoint_every": 3, **train_keys},
    })


def poison_after(monkeypatch, step: int, value: float = float("nan")):
    """Make the update of optimizer step `step` leave one weight matrix non-finite (a finite loss
    and gradient norm in that step: only the parameter check and the held-out loss can see it)."""
    original = Trainer.step

    def step_then_poison(self):
        record = original(self)
        if self.step_count == step:
            with torch.no_grad():
                self.model.transformer.h[0].attn.c_attn.weight[0, 0] = value
        return record

    monkeypatch.setattr(Trainer, "step", step_then_poison)


def test_non_finite_weights_at_a_checkpoint_step_are_never_saved(data_dir, tmp_path, monkeypatch):
    poison_after(monkeypatch, 3, float("inf"))
    with pytest.raises(TrainingDiverged, match=r"c_attn\.weight became NaN or infinite after step 3.*no checkpoint had been written"):
        train(recipe(data_dir), tmp_path / "run", progress=False)
    assert latest_checkpoint(tmp_path / "run") is None
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_a_nan_held_out_loss_stops_the_run_and_the_last_good_checkpoint_is_finite(data_dir, tmp_path, monkeypatch):
    poison_after(monkeypatch, 5)  # step 5 is an evaluation step, not a checkpoint step
    with pytest.raises(TrainingDiverged, match=r"held-out loss became nan after step 5.*step-000003"):
        train(recipe(data_dir), tmp_path / "run", progress=False)
    last = latest_checkpoint(tmp_path / "run")
    assert last.name == "step-000003"
    assert all(torch.isfinite(t).all() for t in load_file(last / "model.safetensors").values())
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # step 5's record (with its NaN eval) is not written


def test_save_checkpoint_refuses_a_model_with_nan_and_writes_nothing(tmp_path):
    model = MoTLMHeadModel(tiny_config("dense"))
    with torch.no_grad():
        model.transformer.ln_f.weight[3] = float("nan")
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match=r"ln_f\.weight holds NaN"):
        save_checkpoint(tmp_path / "run", 1, model, None, optimizer, {}, {})
    assert not (tmp_path / "run").exists()


@pytest.fixture
def nan_checkpoint(tmp_path, data_dir):
    """A MoT checkpoint (with its tokenizer) whose one expert tensor holds an infinity and a NaN."""
    from mot_transition.data import load_corpus, train_tokenizer

    path = tmp_path / "bad"
    tokenizer = train_tokenizer(load_corpus(data_dir / "corpus.txt"), 300, cache_dir=data_dir / "cache")
    MoTLMHeadModel(tiny_config("mot", vocab_size=len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    tensors["transformer.h.1.mlp.lin2"][0, 0, 0] = float("inf")
    tensors["transformer.h.1.mlp.lin2"][1, 0, 0] = float("nan")
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_loading_a_checkpoint_with_non_finite_weights_names_the_tensor(nan_checkpoint):
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.mlp\.lin2 holds NaN or infinite values"):
        load_checked(nan_checkpoint)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor transformer\.h\.1\.mlp\.lin2"):
        check_finite(nan_checkpoint)


@pytest.mark.parametrize("command", [
    ["convert", "{src}", "{dst}"],
    ["generate", "{src}", "--prompt", "hello", "--max-new-tokens", "2"],
])
def test_cli_refuses_a_checkpoint_with_non_finite_weights_in_one_line(nan_checkpoint, tmp_path, capsys, command):
    before = tree_digest(nan_checkpoint)
    args = [part.format(src=nan_checkpoint, dst=tmp_path / "out") for part in command]
    code, out, err = run_cli(args, capsys)
    assert code == 1
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "lin2" in err, err
    assert not (tmp_path / "out").exists()
    assert tree_digest(nan_checkpoint) == before


def test_json_writers_refuse_nan_and_name_where_it_is(tmp_path):
    with pytest.raises(ValueError, match=r"at curve\.1\.loss"):
        dumps({"curve": [{"loss": 1.0}, {"loss": float("nan")}]})
    path = write_json(tmp_path / "a.json", {"x": 1.5})
    with pytest.raises(ValueError, match=r"at x"):
        write_json(path, {"x": float("inf")})
    assert json.loads(path.read_text()) == {"x": 1.5}  # the old file stays whole
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # and no temporary is left
