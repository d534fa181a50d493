"""Where training runs: the process group torchrun describes, the device, and bf16 autocast.

Under `torchrun` (WORLD_SIZE > 1) the trainer runs with DistributedDataParallel, gloo on CPU and
nccl on GPU; rank 0 writes metrics and checkpoints.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    started_here: bool = False  # we called init_process_group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_kind: str) -> Distributed:
    """Join the process group torchrun describes (WORLD_SIZE > 1), or the one already started."""
    if dist.is_available() and dist.is_initialized():
        return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return Distributed()
    dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), started_here=True)


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """The device `train.device` names for the process of this local rank ("cuda" means its own GPU),
    or one line saying this machine lacks it."""
    from ..checks import check_device

    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    option = "recipe key 'train.device' is"
    device = check_device(name, option)
    if device.type == "cuda" and device.index is None:  # under torchrun: one GPU per local process
        device = check_device(f"cuda:{local_rank}", f"{option} {name!r}, so local rank {local_rank} takes")
    return device


def use_bf16(precision: str, device: torch.device) -> bool:
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and not supported:
        raise ValueError(f"recipe key 'train.precision' is 'bf16' but {device} has no bf16 autocast here; use auto or fp32")
    return precision == "bf16" or (precision == "auto" and supported)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel:
    large blocks come from the heap rather than one `mmap` each, and the heap is not trimmed.

    PyTorch has no caching allocator on CPU. Without this, every tensor above 32 MB (a MoT layer's
    expert gradients: E times a dense layer's) is mapped fresh and its pages are faulted in and
    zeroed on first touch, then unmapped when freed: every step, forward and backward. The freed
    memory stays with the process, as the CUDA caching allocator keeps GPU memory, so its resident
    set stays at its peak. Process-wide; returns whether it took effect (glibc on Linux only).
    What it saves is in docs/performance.md (`train.keep_freed_memory`).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


__all__ = ["Distributed", "setup_distributed", "pick_device", "use_bf16", "keep_freed_memory"]
