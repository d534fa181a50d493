"""A run that cannot fit is refused with the estimate before the model is built (issue 13, item 9)."""

import argparse
from pathlib import Path

import pytest
import torch

from conftest import run_cli, tiny_config
from mot_transition.train import memory
from mot_transition.train.memory import GiB, available_memory, check_fits, estimate_training_memory


def test_estimate_counts_16_bytes_per_parameter_and_activations_that_grow_with_the_micro_batch():
    config = tiny_config("mot")
    one, four = estimate_training_memory(config, 1, 32), estimate_training_memory(config, 4, 32)
    assert one.weights_and_optimizer == 16 * sum(p.numel() for p in __import__("mot_transition").MoTLMHeadModel(config).parameters())
    assert four.activations == 4 * one.activations > 0
    assert four.total == four.weights_and_optimizer + four.activations + four.runtime


def test_available_memory_of_this_machine_is_known_and_plausible():
    free = available_memory(torch.device("cpu"))
    assert free is not None and 0 < free < 1 << 50


def test_check_fits_refuses_in_one_line_with_the_estimate(monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device: GiB)
    config = tiny_config("dense", n_embd=256, n_layer=4, n_head=4, vocab_size=32000, n_positions=512)
    with pytest.raises(ValueError, match=r"needs about \d+\.\d GiB .*parameters x 16 bytes.*cpu has 1\.0 GiB free") as error:
        check_fits(config, 64, 512, torch.device("cpu"))
    assert "\n" not in str(error.value)
    assert check_fits(config, 1, 16, torch.device("cpu")).total < GiB
    monkeypatch.setenv("MOT_TRANSITION_SKIP_MEMORY_CHECK", "1")
    check_fits(config, 64, 512, torch.device("cpu"))


def test_a_recipe_without_model_keys_warns_and_the_default_model_is_refused_before_it_is_built(tmp_path, capsys, monkeypatch):
    from mot_transition import modeling

    (tmp_path / "corpus.txt").write_text(Path(argparse.__file__).read_text()[:20_000])
    recipe = tmp_path / "empty.toml"
    recipe.write_text(f'[data]\nsource = "{tmp_path / "corpus.txt"}"\nvocab_size = 300\nseq_len = 32\ncache_dir = "{tmp_path / "cache"}"\n')
    monkeypatch.setattr(memory, "available_memory", lambda device: 8 * GiB)

    original = modeling.MoTLMHeadModel.__init__

    def only_on_meta(self, *args, **kwargs):  # counting parameters builds on the meta device: allowed
        original(self, *args, **kwargs)
        if next(self.parameters()).device.type != "meta":
            raise AssertionError("the model was built")

    monkeypatch.setattr(modeling.MoTLMHeadModel, "__init__", only_on_meta)
    with pytest.warns(UserWarning, match=r"sets nothing in \[model\]: the default model is trained"):
        code, out, err = run_cli(["train", recipe, "--out", tmp_path / "run", "--quiet"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: this run needs about") and "963M parameters" in err and "8.0 GiB free" in err
    assert not (tmp_path / "run").exists()


def test_expert_choice_activations_count_the_capacity_each_expert_takes():
    from mot_transition.counts import expert_share

    config = tiny_config("expert_choice", n_expert=8, group_size=32, num_experts_per_tok=2)
    assert memory.ffn_hidden_per_token(config)[1] == config.expert_size * 8 * expert_share(config, "expert_choice") == config.expert_size * 2


def test_a_sharded_or_expert_parallel_process_counts_its_share_of_the_weights_and_a_shared_host_its_share_of_memory(monkeypatch):
    from mot_transition import MoTLMHeadModel

    config = tiny_config("token_choice", n_layer=4)
    model = MoTLMHeadModel(config)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if name.endswith((".lin1", ".lin2")))
    block = max(sum(p.numel() for p in b.parameters()) for b in model.transformer.h)
    assert 0 < experts < total
    whole = estimate_training_memory(config, 2, 16)
    assert whole.parameters == total
    fsdp = estimate_training_memory(config, 2, 16, shards=4)  # one block gathered whole: weights and gradient
    assert fsdp.weights_and_optimizer == 16 * round(total / 4) + 8 * block
    ep = estimate_training_memory(config, 2, 16, expert_parallel=2)
    assert ep.parameters == round(total - experts / 2) and ep.weights_and_optimizer == 16 * ep.parameters
    assert ep.activations == fsdp.activations == whole.activations
    # two processes on one CPU host: each gets half of its free memory
    monkeypatch.setattr(memory, "available_memory", lambda device: int(1.5 * whole.total))
    check_fits(config, 2, 16, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"GiB free a process"):
        check_fits(config, 2, 16, torch.device("cpu"), processes_here=2)
