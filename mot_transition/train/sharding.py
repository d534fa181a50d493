"""Fully sharded data parallel training (`train.parallel = "fsdp"` or `"hsdp"`, docs/training.md "Sharded training").

FSDP2 (`torch.distributed.fsdp.fully_shard`): each block is one unit, then the root (embeddings,
final norm, tied head). Between forward and backward a unit's parameters are gathered whole and freed
again, so each process holds 1/N of the parameters, gradients and AdamW moments. Parameters become
DTensors sharded on dim 0 over the data-parallel mesh; the trainer's loop is unchanged except where it
reads a whole tensor:

- checkpoints are today's layout (model.safetensors, optimizer moments by parameter name): every
  process gathers one tensor at a time (`full`) and the main process writes, so a checkpoint of a
  sharded run loads, converts, exports and resumes like any other (on any number of processes);
- resuming gives each process its slice of the saved moments (`load_full_optimizer_state`);
- evaluation runs as many forward passes on every process (a sharded forward is collective);
- a non-finite weight is looked for in every process's shard and the finding shared.

On GPU with bf16, parameters are gathered in bf16 and gradients reduced in float32
(`MixedPrecisionPolicy`); on CPU everything stays float32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

def shard_model(model: torch.nn.Module, device: torch.device, bf16: bool, hybrid: bool = False) -> torch.nn.Module:
    """Apply FSDP2 to `model` in place: every transformer block, then the root. Returns the model.
    `hybrid` (HSDP): shard over the processes of one node and replicate across the nodes, so that
    the per-layer all-gathers stay inside a node and only the gradient all-reduce crosses nodes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    world = dist.get_world_size()
    if hybrid:
        sizes = [None] * world  # every process checks every node's count, so that all stop together
        dist.all_gather_object(sizes, local_world_size())
        per_node = sizes[0]
        if len(set(sizes)) > 1 or world % per_node:
            raise ValueError(f"train.parallel='hsdp' needs the same number of processes on every node, but the nodes have "
                             f"{', '.join(str(n) for n in sorted(set(sizes)))} of {world}")
        mesh = init_device_mesh(device.type, (world // per_node, per_node), mesh_dim_names=("dp_replicate", "dp_shard"))
    else:
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp_shard",))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in blocks_of(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model.sharding_mesh = tuple(mesh.shape)  # (processes) or (nodes, processes a node): saved in checkpoints
    return model


def local_world_size() -> int:
    """Processes on this node: torchrun's LOCAL_WORLD_SIZE (all of them when it is not set)."""
    import os

    return int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))


def blocks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks: the units that are gathered one at a time."""
    from ..modeling import MoTBlock

    return [m for m in model.modules() if isinstance(m, MoTBlock)]


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU (a collective for a DTensor: every process must call it)."""
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().contiguous()


def gather_for_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, keep: bool):
    """The whole state dict and `checkpoint.optimizer_state` of a sharded model, gathered one tensor at
    a time; every process calls this, and only where `keep` (the main process) are the tensors kept:
    (state dict, (optimizer tensors, optimizer JSON)), else None."""
    from .checkpoint import optimizer_state

    def whole(tensor):
        tensor = full(tensor)
        return tensor if keep else None

    # a tied weight (the head's, the embedding's) is saved once, under its first name, as save_pretrained does
    once = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    weights = {name: whole(t) for name, t in model.state_dict().items() if name in once}
    optimizer_payload = optimizer_state(model, optimizer, whole=whole)
    return (weights, optimizer_payload) if keep else None


def load_full_optimizer_state(model, optimizer, state_json: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Load a checkpoint's whole optimizer tensors into a sharded model's optimizer: each process
    keeps its slice of every moment, placed as its parameter is."""
    from .checkpoint import load_optimizer_state

    load_optimizer_state(model, optimizer, state_json, tensors)
    for param, entry in optimizer.state.items():
        if not isinstance(param, DTensor):
            continue
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.shape == param.shape:
                entry[key] = distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh, param.placements, src_data_rank=None)


def first_nonfinite_anywhere(model: torch.nn.Module) -> str | None:
    """The first parameter holding a NaN or an infinity in any process's shard (every process calls
    this and gets the same answer)."""
    from ..checkpoint_io import first_nonfinite

    mine = first_nonfinite((name, p.to_local() if isinstance(p, DTensor) else p) for name, p in model.named_parameters())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return next((name for name in everyone if name is not None), None)
