"""The in-run switch (recipe key train.switch_at_step): MoT becomes Token Choice inside a run."""

import json

import torch

from conftest import run_cli
from mot_transition.train import Trainer, load_recipe
from mot_transition.transition import in_run_switch
from test_pipeline import MICRO


def test_in_run_switch_carries_adamw_state_of_shared_tensors_with_router_moments_rescaled():
    recipe = load_recipe("tiny", MICRO + ["model.mot_temperature=0.5", "train.threads=0"])
    config = recipe.model_config(vocab_size=64)
    from mot_transition import MoTLMHeadModel

    torch.manual_seed(0)
    model = MoTLMHeadModel(config)
    sequences = torch.randint(0, 64, (64, 32))
    trainer = Trainer(model, recipe, sequences, sequences[:16], device=torch.device("cpu"))
    trainer.step()
    trainer.step()
    old = {name: {k: v.clone() for k, v in trainer.optimizer.state[p].items()} for name, p in trainer.model.named_parameters()}
    old_params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    in_run_switch(trainer)
    assert trainer.model.config.ffn_type == "token_choice" and trainer.model.config.num_experts_per_tok == 2
    for name, p in trainer.model.named_parameters():
        state = trainer.optimizer.state[p]
        if name.endswith("mlp.controller"):
            assert torch.allclose(p, old_params[name] / 0.5)
            assert torch.allclose(state["exp_avg"], old[name]["exp_avg"] * 0.5)
            assert torch.allclose(state["exp_avg_sq"], old[name]["exp_avg_sq"] * 0.25)
        else:
            assert torch.equal(p, old_params[name]), name
            assert torch.equal(state["exp_avg"], old[name]["exp_avg"]) and torch.equal(state["exp_avg_sq"], old[name]["exp_avg_sq"])
        assert state["step"] == old[name]["step"]
    record = trainer.step()
    assert record["aux_loss"] is not None and torch.isfinite(torch.tensor(record["loss"]))


def test_train_command_with_switch_at_step_ends_as_a_token_choice_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOT_TRANSITION_CACHE", str(tmp_path / "cache"))
    code, _, err = run_cli(["train", "tiny", "--out", tmp_path / "run", *MICRO, "train.switch_at_step=4"], capsys)
    assert code == 0, err
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["aux_loss"] is not None for m in metrics] == [False] * 4 + [True] * 4
    latest = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    assert json.loads((latest / "config.json").read_text())["ffn_type"] == "token_choice"
