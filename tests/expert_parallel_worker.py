"""One process of tests/test_expert_parallel.py's layer test (run by torchrun): every expert layer kind,
shared out over the processes, against the same layer whole on this process's own tokens."""

import copy
import sys

import torch
import torch.distributed as dist

from mot_transition import MoTConfig
from mot_transition.layers import ExpertChoice, MixtureOfTokens, TokenChoice
from mot_transition.train.expert_parallel import apply_expert_parallel

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)


class Holder(torch.nn.Module):  # apply_expert_parallel takes a model with a config
    def __init__(self, layer, config):
        super().__init__()
        self.layer, self.config = layer, config


# per process: (batch rows, sequence length, mask): rank 1 has every token masked in one case, one token in another
CASES = [((4, 3), None), ((2, 1), "none valid"), ((1, 1), None), ((4, 5), "some")]
for kind, layer_class in (("token_choice", TokenChoice), ("mot", MixtureOfTokens), ("expert_choice", ExpertChoice)):
    config = MoTConfig(ffn_type=kind, n_embd=8, n_head=2, n_layer=2, n_expert=4, group_size=2, expert_size=6,
                       num_experts_per_tok=2, vocab_size=32)
    whole = layer_class(config).train()
    shared = Holder(copy.deepcopy(whole), config)
    apply_expert_parallel(shared, world, torch.device("cpu"))
    local = shared.layer.lin1.to_local()
    assert local.shape[0] == 4 // world, local.shape  # each process holds its share of the experts
    assert torch.equal(local, whole.lin1.detach()[rank * (4 // world) : (rank + 1) * (4 // world)])
    for (B, S), masking in CASES:
        if kind != "token_choice" and B % 2:
            continue  # MoT and Expert Choice group 2 rows
        generator = torch.Generator().manual_seed(100 * rank + B * S)
        x = torch.randn(B, S, 8, generator=generator)
        mask = None
        if masking == "some":
            mask = torch.rand(B, S, generator=generator) > 0.4
        elif masking == "none valid":
            mask = torch.zeros(B, S, dtype=torch.bool) if rank == 1 else torch.ones(B, S, dtype=torch.bool)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        whole.zero_grad()
        shared.layer.zero_grad()
        outs = [layer(xi, mask)[0] for layer, xi in zip((whole, shared.layer), xs)]
        weight = torch.linspace(-1, 1, outs[0].numel()).view_as(outs[0])
        for out in outs:
            (out * weight).sum().backward()
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-5, atol=1e-6)
        # an expert's gradient, brought home from every process, is the sum of the whole layer's over them
        grad = whole.lin1.grad  # None on a process whose tokens are all masked: none reach an expert
        summed = torch.zeros_like(whole.lin1) if grad is None else grad.clone()
        dist.all_reduce(summed)
        held = shared.layer.lin1.grad.to_local()
        torch.testing.assert_close(held, summed[rank * (4 // world) : (rank + 1) * (4 // world)], rtol=1e-5, atol=1e-6)
    # under bf16 autocast the rows travel in bf16 (the experts compute in it anyway), and the output is the whole layer's
    import torch.distributed._functional_collectives as collectives

    sent, exchange = [], collectives.all_to_all_single_autograd
    collectives.all_to_all_single_autograd = lambda rows, *args: sent.append(rows.dtype) or exchange(rows, *args)
    x = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(rank))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [layer(x)[0] for layer in (whole, shared.layer)]
    collectives.all_to_all_single_autograd = exchange
    assert sent == [torch.bfloat16, torch.bfloat16], sent  # the rows out, the results back
    torch.testing.assert_close(outs[1], outs[0])
dist.barrier()

dist.destroy_process_group()
sys.exit(0)
