"""What transformers' distributed test mixins (test_tensor_parallel_mixin.py, test_expert_parallel_mixin.py,
test_fsdp_mixin.py from its sdist) import from a `distributed_testing_utils` module that the sdist does not
ship. Written for this repository from how the mixins call it; tests/upstream.py places it in the package
`upstream_tests` beside them.

    run_distributed(world_size)(func)(*args)     func(rank, *args) in `world_size` fresh processes, each
                                                 with the default process group initialised; raises if
                                                 any of them fails
    _start_rank_processes(fn, args, nprocs)      fn(rank, *args) in `nprocs` fresh processes, which set up
                                                 their process group themselves; raises if any fails
    _get_distributed_device_type()               "cuda" / "xpu" / ... where an accelerator is present, else "cpu"
    _get_distributed_backend()                   the collective backend for that device (gloo on CPU)
    _get_rank_device(rank), _set_rank_device(rank)   the device a rank works on / bind it to that rank

The processes are started by a fork server (a fresh interpreter that imported torch, transformers, this
package and the module of the function to run, once per test session, then forks a process per rank): no
state inherited from pytest, as with "spawn", without paying those imports for every process (about 8 s
of CPU each on our 2-core machines, most of a distributed test's time). The rendezvous store is opened by
the caller on a free port before they start, so that two test sessions running side by side cannot take
the same port.
"""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "xpu": "xccl", "hpu": "hccl"}


def _get_distributed_device_type() -> str:
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    return "cpu" if accelerator is None or accelerator.type == "mps" else accelerator.type


def _get_distributed_backend() -> str:
    return _BACKENDS.get(_get_distributed_device_type(), "gloo")


def _get_rank_device(rank: int) -> torch.device:
    device_type = _get_distributed_device_type()
    return torch.device("cpu") if device_type == "cpu" else torch.device(device_type, rank)


def _set_rank_device(rank: int) -> None:
    device_type = _get_distributed_device_type()
    if device_type != "cpu":
        getattr(torch, device_type).set_device(rank)


_PRELOAD = ["torch", "torch.distributed", "torch.distributed.fsdp", "torch.distributed.tensor", "transformers", "mot_transition"]


def _start_rank_processes(fn, args=(), nprocs: int = 2) -> None:
    """fn(rank, *args) for rank 0 .. nprocs-1, each in its own new process; waits for all of them and
    raises (naming the rank and its traceback) when one fails."""
    # the server starts at the first call: what it imports then is what every later process starts with
    # (a module it lacks is imported by the process that needs it, as under spawn)
    modules = [m for m in (fn.__module__, *(getattr(a, "__module__", None) for a in args)) if m and m != "__main__"]
    mp.set_forkserver_preload(_PRELOAD + [m for m in modules if m not in _PRELOAD])
    mp.start_processes(fn, args=tuple(args), nprocs=nprocs, join=True, start_method="forkserver")


def _rank_main(rank: int, func, args: tuple, world_size: int, host: str, port: int) -> None:
    """One rank of `run_distributed`: the environment torchrun would give it, the default process group,
    then func(rank, *args)."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR=host, MASTER_PORT=str(port),
    )
    _set_rank_device(rank)
    store = dist.TCPStore(host, port, world_size=None, is_master=False)
    dist.init_process_group(backend=_get_distributed_backend(), store=store, rank=rank, world_size=world_size)
    try:
        func(rank, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(world_size: int = 2):
    """A decorator factory: `run_distributed(world_size=2)(func)(*args)` runs func(rank, *args) on every rank."""

    def decorate(func):
        def run(*args):
            store = dist.TCPStore("127.0.0.1", 0, world_size=None, is_master=True, wait_for_workers=False)
            try:
                _start_rank_processes(_rank_main, args=(func, args, world_size, store.host, store.port), nprocs=world_size)
            finally:
                del store

        return run

    return decorate
