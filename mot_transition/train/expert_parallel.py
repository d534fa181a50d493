"""The trainer's expert parallelism (`train.expert_parallel = N`, docs/training.md "Expert parallelism").

The W processes of a run form W / N data-parallel replicas of N processes each; the N processes of a
replica share out every expert layer's experts (layers/expert_parallel.py dispatches the tokens), and
process r = i * N + j is process j of replica i. Everything else (attention, embeddings, dense layers,
routers) is replicated on all W processes and averaged by DDP, as without expert parallelism.

An expert matrix becomes a DTensor on the (replica, expert) mesh, placed (Replicate, Shard(0)): each
process holds its E / N experts as a local tensor, and the checkpoint code gathers and places it as it
does FSDP's parameters, so checkpoints keep the whole layout and resume on any layout (expert parallel
or not). Its gradient, which the dispatch brought home from the N processes of the replica, is summed
over the replicas and divided by W (`sync_expert_gradients`): the average over all processes that DDP
gives every other parameter.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from ..layers.expert_parallel import ExpertParallel


def expert_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from ..layers.experts import ExpertLayer

    return [m for m in model.modules() if isinstance(m, ExpertLayer)]


def apply_expert_parallel(model: torch.nn.Module, size: int, device: torch.device) -> torch.nn.Module:
    """Share out `model`'s experts over groups of `size` processes, in place (a model given to the trainer
    stays shared out: its forward is collective afterwards, as an FSDP-sharded one). Every process calls
    this; rank 0's weights are the ones kept. Returns the model, with `model.expert_parallel_groups` set."""
    from torch.distributed.device_mesh import init_device_mesh

    world, rank = dist.get_world_size(), dist.get_rank()
    layers = expert_layers(model)
    config = model.config
    if world % size:
        raise ValueError(f"train.expert_parallel={size} must divide the number of processes ({world})")
    if not layers:
        raise ValueError(f"train.expert_parallel={size} needs a model with expert layers (model.ffn_type is {config.ffn_type!r})")
    if config.n_expert % size:
        raise ValueError(f"train.expert_parallel={size} must divide model.n_expert={config.n_expert} (each process holds E / N experts)")
    implementation = getattr(config, "_experts_implementation", None)
    if implementation not in (None, "eager"):
        raise ValueError(f"train.expert_parallel runs our own experts; the model asks for experts_implementation={implementation!r}")
    replicas = world // size
    # the exchanges get groups of their own, apart from the default group that DDP reduces over in backward
    expert_group = replica_group = None
    for i in range(replicas):
        group = dist.new_group([i * size + j for j in range(size)])
        if rank // size == i:
            expert_group = group
    for j in range(size):
        group = dist.new_group([i * size + j for i in range(replicas)])
        if rank % size == j:
            replica_group = group
    mesh = init_device_mesh(device.type, (replicas, size), mesh_dim_names=("replica", "expert"))
    for layer in layers:
        layer.expert_parallel = ExpertParallel(expert_group, size, rank % size, config.n_expert)
        for name in ("lin1", "lin2"):
            whole = getattr(layer, name)
            # rank 0's experts, scattered (DDP's first broadcast, which would have made them equal, skips them)
            local = distribute_tensor(whole.detach(), mesh, [Replicate(), Shard(0)], src_data_rank=0)
            setattr(layer, name, torch.nn.Parameter(local, requires_grad=whole.requires_grad))
    model.expert_parallel_groups = (replica_group if replicas > 1 else None, world)
    return model


def expert_parameter_names(model: torch.nn.Module) -> list[str]:
    """The names of the parameters held as this process's share of the experts (left out of DDP)."""
    return [name for name, p in model.named_parameters() if isinstance(p, DTensor)]


BUCKET_BYTES = 32 * 2**20  # expert gradients summed over the replicas in flat buckets of about this size (DDP's are 25 MB)


@torch.no_grad()
def sync_expert_gradients(model: torch.nn.Module) -> None:
    """Average the expert gradients over all processes: summed over the replicas, one all-reduce per bucket
    of them flattened (not one per tensor), then divided by W."""
    replica_group, world = model.expert_parallel_groups
    grads = [p.grad.to_local() for p in model.parameters() if isinstance(p, DTensor) and p.grad is not None]
    if replica_group is not None:
        bucket, size = [], 0
        for i, grad in enumerate(grads):
            bucket.append(grad)
            size += grad.numel() * grad.element_size()
            if size >= BUCKET_BYTES or i == len(grads) - 1:
                flat = torch.cat([g.reshape(-1) for g in bucket])
                dist.all_reduce(flat, group=replica_group)
                torch._foreach_copy_(bucket, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in bucket]), bucket)])
                bucket, size = [], 0
    if grads:
        torch._foreach_div_(grads, world)
