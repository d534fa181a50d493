"""The model and the trainer on a CUDA device (marked `cuda`: skipped without one). On a GPU
machine: `pytest -m cuda tests/test_cuda.py`."""

import copy

import pytest
import torch

from conftest import tiny_config
from mot_transition.modeling import MoTLMHeadModel
from mot_transition.train import build_optimizer, recipe_from_dict

FFN_TYPES = ["dense", "mot", "token_choice", "expert_choice"]


@pytest.mark.cuda
def test_adamw_is_fused_on_cuda():
    optimizer = build_optimizer(MoTLMHeadModel(tiny_config("mot")).cuda(), recipe_from_dict({}))
    assert all(group["fused"] and not group["foreach"] for group in optimizer.param_groups)


@pytest.mark.cuda
@pytest.mark.parametrize("block", ["gpt2", "llama"])
@pytest.mark.parametrize("ffn_type", FFN_TYPES)
def test_float32_forward_and_gradients_on_cuda_equal_cpu(ffn_type, block):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu = MoTLMHeadModel(tiny_config(ffn_type, block=block, capacity_factor=None)).train()
    gpu = copy.deepcopy(cpu).cuda()
    ids = torch.randint(0, cpu.config.vocab_size, (8, 16))
    out_cpu, out_gpu = cpu(ids, labels=ids), gpu(ids.cuda(), labels=ids.cuda())
    out_cpu.loss.backward()
    out_gpu.loss.backward()
    torch.testing.assert_close(out_gpu.logits.cpu(), out_cpu.logits, rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.cuda
@pytest.mark.parametrize("ffn_type", ["dense", "mot", "token_choice"])
def test_a_bf16_autocast_training_step_on_cuda_lowers_the_loss(ffn_type):
    model = MoTLMHeadModel(tiny_config(ffn_type)).cuda().train()
    optimizer = build_optimizer(model, recipe_from_dict({"optim": {"lr": 3e-3}}))
    ids = torch.randint(0, model.config.vocab_size, (8, 16), device="cuda")
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
