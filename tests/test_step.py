"""One trainer step is the textbook step: clip_grad_norm_ then AdamW (fused, on CPU too), with
weight decay on matrices only."""

import copy

import pytest
import torch
from conftest import tiny_config

from mot_transition.modeling import MoTLMHeadModel
from mot_transition.train import build_optimizer, recipe_from_dict


def test_adamw_is_fused_on_cpu_and_steps_as_the_reference_adamw():
    torch.manual_seed(0)
    model = MoTLMHeadModel(tiny_config("mot"))
    reference = copy.deepcopy(model)
    recipe = recipe_from_dict({"optim": {"lr": 1e-2, "weight_decay": 1.0}})
    optimizer = build_optimizer(model, recipe)
    assert all(group["fused"] and not group["foreach"] for group in optimizer.param_groups)
    plain = torch.optim.AdamW(  # the textbook loop, one tensor at a time
        [{"params": [p for p in reference.parameters() if p.dim() >= 2], "weight_decay": 1.0},
         {"params": [p for p in reference.parameters() if p.dim() < 2], "weight_decay": 0.0}],
        lr=1e-2, betas=(recipe.optim.beta1, recipe.optim.beta2), eps=recipe.optim.eps, foreach=False, fused=False)
    ids = torch.randint(0, model.config.vocab_size, (8, 16))
    for step in range(3):
        for m, opt in ((model, optimizer), (reference, plain)):
            torch.manual_seed(step)  # the same dropout masks
            m(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        # not bit-equal: where a gradient is near eps, rounding moves an update by up to ~lr * 1e-3
        torch.testing.assert_close(a, b, rtol=1e-4, atol=3e-5, msg=name)


@pytest.mark.parametrize("grad_clip", [1e-3, 1e3, 0.0])  # clipped, not clipped, clipping off
def test_a_trainer_step_is_clip_grad_norm_then_adamw(grad_clip):
    from mot_transition.data import ShuffledOrder
    from mot_transition.train import Trainer

    torch.manual_seed(0)
    model = MoTLMHeadModel(tiny_config("mot", vocab_size=64))
    reference = copy.deepcopy(model)
    recipe = recipe_from_dict({
        "optim": {"lr": 1e-2, "warmup_steps": 0, "grad_clip": grad_clip},
        "train": {"steps": 10, "batch_size": 8, "log_every": 1000},
        "data": {"seq_len": 16, "eval_batches": 1, "eval_batch_size": 8},
    })
    sequences = torch.randint(0, 64, (8, 16))
    trainer = Trainer(model, recipe, sequences, sequences)
    batch = sequences[ShuffledOrder(8, recipe.seed, 0)[0:8]]  # the step's rows, in the sampler's order (MoT groups by it)
    record = trainer.step()
    optimizer = build_optimizer(reference, recipe)
    for group in optimizer.param_groups:
        group["lr"] = record["lr"]
    loss = reference(input_ids=batch, labels=batch, use_cache=False).loss
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), grad_clip or float("inf"))
    optimizer.step()
    assert record["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)
    assert (record["grad_norm"] > grad_clip) == (grad_clip == 1e-3) or grad_clip == 0.0
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_a_foreach_optimizer_gets_its_gradients_clipped_to_the_bound():
    # the fused AdamW folds the clip into its update; any other optimizer has its gradients scaled in place
    from mot_transition.train.optimizer import clip_gradients

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    for p in model.parameters():
        p.grad = torch.full_like(p, 5.0)
    optimizer = torch.optim.AdamW(model.parameters(), foreach=True)
    before = clip_gradients(model, optimizer, max_norm=0.1)
    after = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    assert before > 10 and after == pytest.approx(0.1, rel=1e-4)
