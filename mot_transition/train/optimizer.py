"""The optimizer side of a training step: AdamW's parameter groups, the learning-rate schedule, and the
gradient clip that rides on the fused AdamW's update."""

import math

import torch
from torch.distributed.tensor import DTensor

from .recipe import Recipe


def lr_at(step: int, lr: float, warmup_steps: int, total_steps: int, final_lr_fraction: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to a fraction."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    final = lr * final_lr_fraction
    return final + (lr - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (and expert tensors) only, not on biases and gains.

    The fused kernel (one pass over every parameter) whenever the parameters allow it: all floating
    point and on one kind of device, CUDA or CPU. On CPU it took 0.24 s per step for 136M float32
    parameters against 1.11 s for the multi-tensor (foreach) one (1 thread), which is most of what
    a MoT model's E-fold feed-forward parameters cost a training step. Otherwise foreach."""
    o = recipe.optim
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    held_here = [p for p in decay if isinstance(p, DTensor)]  # expert parallelism's experts (FSDP: every parameter)
    if held_here and len(held_here) < len(decay):  # a group of their own: a fused or foreach kernel takes one kind at a time
        groups[0]["params"] = [p for p in decay if not isinstance(p, DTensor)]
        groups.append({"params": held_here, "weight_decay": o.weight_decay})
    kinds = {p.device.type for p in params}
    fused = len(kinds) == 1 and kinds <= {"cuda", "cpu"} and all(p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=not fused, fused=fused)


def clip_gradients(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> float:
    """The global gradient norm; the gradients scaled by max_norm / (norm + 1e-6) when that is
    below 1, as `clip_grad_norm_` does, and with no pass of its own over them: the fused AdamW
    divides each gradient by its `grad_scale` as it reads it (the attribute `GradScaler` sets,
    which multiplies into one set before it), so the clip rides on the update. `clip_grad_norm_`
    instead multiplies every gradient by the clamped factor, 1.0 included: one more read and
    write of a MoT model's E-fold expert gradients. A foreach AdamW gets the gradients scaled."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    # sharded gradients (DTensors: FSDP's, or the experts under expert parallelism) and whole ones apart:
    # torch's foreach kernels take one kind at a time (clip_grads_with_norm_ takes the parameters, not their grads)
    kinds = [[p for p in params if isinstance(p.grad, DTensor) == sharded] for sharded in (False, True)]
    norms = []
    for kind in filter(None, kinds):
        total = torch.nn.utils.get_total_norm([p.grad for p in kind])
        norms.append(total.full_tensor() if isinstance(total, DTensor) else total)  # the norm over every process's shard
    total = torch.linalg.vector_norm(torch.stack(norms)) if len(norms) > 1 else norms[0]
    norm = total.item()
    if math.isfinite(norm) and max_norm / (norm + 1e-6) < 1.0:
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer.grad_scale = (total.float() + 1e-6) / max_norm
        else:
            for kind in filter(None, kinds):
                torch.nn.utils.clip_grads_with_norm_(kind, max_norm, total)
    return norm
