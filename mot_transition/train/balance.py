"""The trainer's side of load balancing over the global batch (mot_transition/layers/balance.py).

`batch_routing(model, batches, ...)` says how a step's router losses see its global batch: nothing to
do with one process and one micro-batch; an all-reduce inside the forward with several processes and
one micro-batch each; and with gradient accumulation a routing pass before the step: every micro-batch
of the step through the model without gradients (its head on the last position only), with the dropout
the step will then draw (the random state is put back), its counts summed over micro-batches and
processes. The pass is one forward per micro-batch, up to a third more compute a step by the usual count
(a forward against forward + backward); it runs only when a Token Choice layer has a router loss to weigh.

`update_expert_bias` moves the selection bias of balancing without an auxiliary loss after each step.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from ..layers.balance import BatchRouting, routing_counts


def routed_trunk(model: torch.nn.Module):
    """The MoTModel trunk of `model` if it has Token Choice layers with a router loss on, else None."""
    from ..modeling import MoTModel

    trunk = getattr(model, "transformer", None)
    if not isinstance(trunk, MoTModel):
        return None
    config = trunk.config
    if not (config.router_aux_loss_coef or config.router_z_loss_coef):
        return None
    if config.ffn_type != "token_choice" or not config.moe_layers:  # every expert layer is of ffn_type
        return None
    return trunk


def batch_routing(model: torch.nn.Module, batches: list[torch.Tensor], world_size: int, bf16: bool) -> BatchRouting | None:
    """How the step over `batches` (this process's micro-batches) balances its routers; None: as usual."""
    trunk = routed_trunk(model)
    if trunk is None or world_size * len(batches) == 1:
        return None
    share = world_size * len(batches)
    if len(batches) == 1:
        return BatchRouting(share=share, group=dist.group.WORLD)
    counts = routing_pass(model, batches, bf16)
    if world_size > 1:
        dist.all_reduce(counts)
    return BatchRouting(share=share, counts=counts)


@torch.no_grad()
def routing_pass(model: torch.nn.Module, batches: list[torch.Tensor], bf16: bool) -> torch.Tensor:
    """The summed `routing_counts` (L, E + 1) of `batches` through `model` (a causal LM: the whole model
    runs, so that a sharded one gathers its weights as in training, but its head only on the last
    position), with the dropout the step will draw: the random state is restored afterwards."""
    config = model.config
    device = batches[0].device
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    total = None
    try:
        for batch in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(input_ids=batch, use_cache=False, output_router_logits=True, logits_to_keep=1, return_dict=True)
            counts = routing_counts(list(out.router_logits), config.num_experts_per_tok, None)  # one per expert layer
            total = counts if total is None else total + counts
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)
    return total


@contextlib.contextmanager
def routing_for_step(model: torch.nn.Module, routing: BatchRouting | None):
    """`routing` (from `batch_routing`: the model has a routed trunk) on the trunk for the duration of a step."""
    if routing is None:
        yield
        return
    model.transformer.batch_routing = routing
    try:
        yield
    finally:
        model.transformer.batch_routing = None


@torch.no_grad()
def update_expert_bias(model: torch.nn.Module, world_size: int) -> None:
    """After an optimizer step: move each Token Choice layer's selection bias by
    `router_bias_update_rate` towards its under-loaded experts, bias_e += rate * sign(mean load - load_e),
    the load counted over the step's whole global batch (DeepSeek-V3's balancing without an auxiliary
    loss); then start counting again. Nothing to do for a model without the bias."""
    config = getattr(model, "config", None)
    if config is not None and not getattr(config, "router_bias_update_rate", 0):  # no walk of the modules every step
        return
    layers = [m for m in model.modules() if getattr(m, "expert_bias", None) is not None]
    if not layers:
        return
    loads = torch.stack([
        m.routed_tokens.float() if m.routed_tokens is not None else torch.zeros_like(m.expert_bias) for m in layers
    ])
    if world_size > 1:
        dist.all_reduce(loads)
    for layer, load in zip(layers, loads):
        layer.expert_bias += layer.config.router_bias_update_rate * torch.sign(load.mean() - load)
        layer.routed_tokens = None
