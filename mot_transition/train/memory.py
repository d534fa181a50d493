"""How much memory a training run needs, estimated from the config before anything is built, and
how much the device has: a run that cannot fit is refused with the estimate, instead of being
killed by the kernel's OOM killer half-way through building or in its first step.

The estimate (bytes): 16 per parameter (float32 weights, gradients and AdamW's two moments), plus
the activations autograd keeps for one micro-batch, counted per token: per block about
12 x n_embd (norms, q/k/v, attention output, residuals), the attention probabilities (n_head x
seq_len, the math kernel), twice the FFN's hidden width per token (before and after the
activation; a MoT or Token Choice layer's per-token share of its experts) and its routing weights,
and 3 x vocab_size for the logits and their gradient; 4 bytes each. See docs/training.md for the
measured peaks it was checked against. Under torchrun it is one process's: FSDP's and expert
parallelism's shares of the weights, and a share of the host's memory where processes share a CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..counts import expert_share

GiB = 1 << 30


@dataclass
class MemoryEstimate:
    parameters: int
    weights_and_optimizer: int  # bytes
    activations: int  # bytes, one micro-batch
    runtime: int  # bytes: the framework itself

    @property
    def total(self) -> int:
        return self.weights_and_optimizer + self.activations + self.runtime

    def describe(self) -> str:
        return (f"{self.total / GiB:.1f} GiB ({self.parameters / 1e6:.0f}M parameters x 16 bytes = "
                f"{self.weights_and_optimizer / GiB:.1f} GiB for weights, gradients and AdamW, "
                f"{self.activations / GiB:.1f} GiB of activations per micro-batch)")


def ffn_hidden_per_token(config) -> list[float]:
    """Each block's FFN hidden width per token (gated: gate and up), the experts' per-token share."""
    widths = []
    for i in range(config.n_layer):
        kind = config.ffn_type_of_layer(i)
        width = config.n_inner if kind == "dense" else config.expert_size
        width *= 2 if config.gated else 1
        if kind != "dense":  # the expert FFNs a token pays for: E/g (MoT), k (Token Choice), E c/g (Expert Choice)
            width *= config.n_expert * expert_share(config, kind)
        widths.append(width)
    return widths


def estimate_training_memory(config, micro_batch_size: int, seq_len: int, *, shards: int = 1, expert_parallel: int = 1) -> MemoryEstimate:
    """One process's estimate. `shards`: the processes FSDP shards every parameter over (fsdp: all of them,
    hsdp: a node's), which then also gathers one block whole at a time (its weights, and its gradient before
    the reduce-scatter); `expert_parallel`: the processes that share out every expert layer's experts."""
    parameters, experts, largest_block = _parameters(config)
    held = round((parameters - experts) / shards + experts / (shards * expert_parallel))
    gathered = 8 * largest_block if shards > 1 else 0
    d, heads = config.n_embd, config.n_head
    per_token = sum(12 * d + heads * seq_len + 2 * width + 4 * config.n_expert for width in ffn_hidden_per_token(config))
    per_token += 3 * config.vocab_size + 4 * d
    activations = 4 * micro_batch_size * seq_len * per_token
    return MemoryEstimate(held, 16 * held + gathered, int(activations), runtime=GiB // 2)


def _parameters(config) -> tuple[int, int, int]:
    """(all parameters, those of the experts' matrices, the largest block's), counted on a model without storage."""
    from ..modeling import MoTLMHeadModel
    from .expert_parallel import expert_layers

    with torch.device("meta"):
        model = MoTLMHeadModel(config)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(m.lin1.numel() + m.lin2.numel() for m in expert_layers(model))
    largest = max(sum(p.numel() for p in block.parameters()) for block in model.transformer.h)
    return total, experts, largest


def available_memory(device: torch.device) -> int | None:
    """Bytes free on `device`: a CUDA device's free memory, or for the CPU the smaller of the
    system's available memory and this cgroup's limit; None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    if device.type != "cpu":
        return None
    available = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    limit = _cgroup_room()
    if limit is not None:
        available = limit if available is None else min(available, limit)
    return available


def _cgroup_room() -> int | None:
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as a, open(usage_file) as b:
                limit, usage = a.read().strip(), int(b.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            return max(0, int(limit) - usage + _reclaimable(Path(usage_file).with_name("memory.stat")))
    return None


def _reclaimable(stat_file: Path) -> int:
    """Page cache the kernel drops before it kills (inactive file pages), counted in a cgroup's usage."""
    try:
        for line in stat_file.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name in ("inactive_file", "total_inactive_file"):
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def check_fits(config, micro_batch_size: int, seq_len: int, device: torch.device, *, shards: int = 1, expert_parallel: int = 1,
               processes_here: int = 1) -> MemoryEstimate:
    """One process's estimate, or a one-line ValueError when it exceeds its part of what `device` has free:
    all of a GPU's, or 1/`processes_here` of the host's memory for processes that share the CPU
    (MOT_TRANSITION_SKIP_MEMORY_CHECK=1 skips the refusal)."""
    estimate = estimate_training_memory(config, micro_batch_size, seq_len, shards=shards, expert_parallel=expert_parallel)
    free = available_memory(device)
    shared_host = device.type == "cpu" and processes_here > 1
    if free is not None and shared_host:
        free //= processes_here
    if free is not None and estimate.total > free and not os.environ.get("MOT_TRANSITION_SKIP_MEMORY_CHECK"):
        raise ValueError(
            f"this run needs about {estimate.describe()}, but {device} has {free / GiB:.1f} GiB free{' a process' if shared_host else ''}; use a smaller "
            f"model or train.micro_batch_size (set MOT_TRANSITION_SKIP_MEMORY_CHECK=1 to try anyway)"
        )
    return estimate


__all__ = ["MemoryEstimate", "estimate_training_memory", "available_memory", "check_fits"]
