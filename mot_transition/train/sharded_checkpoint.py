"""Sharded training checkpoints (`train.checkpoint_format = "sharded"`, docs/training.md
"Sharded checkpoints"), written by every process at once through torch.distributed.checkpoint (DCP).

Layout of a sharded `step-N` (beside it, the run directory is as for whole checkpoints):

    step-000200/
      config.json, tokenizer files   as a whole checkpoint
      training_state.json            step, data position, optimizer hyper-parameters, recipe,
                                     "checkpoint_format": "sharded"
      training_state.safetensors     every rank's RNG states (small; the main process writes them)
      dcp/                           DCP: "model.<name>" weights and "optimizer.<param>.<key>"
                                     AdamW state, each process writing the slices it holds

Crash safety is that of a whole checkpoint: every process writes into the same
`checkpoints/.tmp-step-N-PID` (the main process's pid), and the main process renames it into
place once DCP's metadata (written last, after every process finished) and its own files are on
disk. DCP reshards on load, so a run resumes on any number of processes. `consolidate` turns a
sharded checkpoint into today's whole layout (model.safetensors, training_state.safetensors),
reading one tensor at a time: memory is bounded by the largest tensor, not the model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

from ..checkpoint_io import DCP_DIR, checkpoint_to_read, dcp_reader, is_sharded, metadata, model_shapes  # noqa: F401  (this module's API too)
from ..locks import reads, writes

FORMAT_KEY = "checkpoint_format"


@contextlib.contextmanager
def _single_process_quietly():
    """DCP warns that it assumes one process when no process group is up: that is meant here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _unique_state_names(model: torch.nn.Module) -> set[str]:
    """State dict names that are not a second name for a tied tensor (the head's, the embedding's)."""
    return {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}


def training_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """What DCP saves: the model's tensors as they are held (DTensor shards under FSDP) and the
    optimizer's tensors keyed by parameter name."""
    once = _unique_state_names(model)
    state = {f"model.{name}": t for name, t in model.state_dict().items() if name in once}
    names = {param: name for name, param in model.named_parameters()}
    for param, entry in optimizer.state.items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                state[f"optimizer.{names[param]}.{key}"] = value
    return state


def optimizer_json(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's hyper-parameters and non-tensor state, as `checkpoint.optimizer_state` saves them."""
    from .checkpoint import optimizer_state

    _, payload = optimizer_state(model, optimizer, whole=lambda t: None)
    return payload


def save_sharded(tmp: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its slices of the model and optimizer into `tmp/dcp` (a collective)."""
    import torch.distributed.checkpoint as dcp

    state = training_state_dict(model, optimizer)
    with _single_process_quietly():
        dcp.save(state, checkpoint_id=str(tmp / DCP_DIR), no_dist=not (dist.is_available() and dist.is_initialized()))


def save_sharded_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, state: dict | None,
                            rng_states: dict[str, torch.Tensor], keep: int, is_main: bool) -> Path | None:
    """Write sharded checkpoint `step` of `run_dir` (every process calls this; `state`, the JSON
    training state, only the main process needs) and keep only the last `keep`. Returns the
    checkpoint's path in the main process, else None."""
    from safetensors.torch import save_file

    from ..data.tokenizer import ready_for_generation
    from ..jsonfiles import write_json
    from .checkpoint import STATE_JSON, STATE_TENSORS, _remove_leftovers, checkpoint_dir, publish

    distributed = dist.is_available() and dist.is_initialized()
    final = checkpoint_dir(run_dir, step)
    if is_main:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(final.parent)
    pid = [os.getpid()]
    if distributed:  # one staging directory for every process: the main process's
        dist.broadcast_object_list(pid, src=0)
    tmp = final.parent / f".tmp-{final.name}-{pid[0]}"
    try:
        save_sharded(tmp, model, optimizer)  # a collective: every process writes its slices, then the metadata
        if not is_main:
            return None
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            ready_for_generation(tmp, model.config.n_positions)
        save_file({name: t.detach().cpu().contiguous() for name, t in rng_states.items()}, tmp / STATE_TENSORS)
        write_json(tmp / STATE_JSON, {**state, "step": step, "optimizer": optimizer_json(model, optimizer), FORMAT_KEY: "sharded"})
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish(tmp, final, run_dir, keep)


def load_sharded(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Load a sharded checkpoint's weights into `model` (in place, each process reading the slices
    it holds, whatever the number of processes that wrote them) and return the optimizer's tensors
    ({"optimizer.<param>.<key>": tensor placed as its parameter}) for `load_optimizer_state`."""
    import torch.distributed.checkpoint as dcp

    saved = metadata(checkpoint)
    once = _unique_state_names(model)
    state = {f"model.{name}": t for name, t in model.state_dict().items() if name in once}
    missing = sorted(set(state) - set(saved))
    if missing:
        raise ValueError(f"{checkpoint} lacks the tensor {missing[0][len('model.'):]} that this model has; resume with the same recipe")
    params = dict(model.named_parameters())
    for key, entry in saved.items():
        if not key.startswith("optimizer."):
            continue
        name, _, field = key[len("optimizer."):].rpartition(".")
        param = params.get(name)
        if param is None:
            raise ValueError(f"{checkpoint} holds optimizer state for {name}, which this model does not have; resume with the same recipe")
        if tuple(entry.size) == tuple(param.shape):
            state[key] = torch.zeros_like(param)  # placed (sharded) as the parameter is
        else:  # AdamW's step count: a plain scalar
            state[key] = torch.zeros(tuple(entry.size), dtype=entry.properties.dtype)
    with _single_process_quietly():
        dcp.load(state, storage_reader=dcp_reader(checkpoint), no_dist=not (dist.is_available() and dist.is_initialized()))
    with torch.no_grad():  # model.state_dict()'s tensors share the parameters' storage; copy anyway for safety
        for name, t in model.state_dict().items():
            if name in once and state[f"model.{name}"].data_ptr() != t.data_ptr():
                t.copy_(state[f"model.{name}"])
    return {key: t for key, t in state.items() if key.startswith("optimizer.")}


# --- consolidation ---------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def write_safetensors_streamed(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], read) -> None:
    """Write a safetensors file whose tensors are `entries` (name, dtype, shape), in that order,
    asking `read(name)` for one tensor at a time: memory is that of the largest tensor."""
    header, offset = {}, 0
    for name, dtype, shape in entries:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, dtype, shape in entries:
            tensor = read(name)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"tensor {name} read back as {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {tuple(shape)}")
            if tensor.numel():  # written from the tensor's own memory, not a copy of it
                f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensor  # before the next one is read
        f.flush()
        os.fsync(f.fileno())


@writes("dst", option="the destination")  # one writer per destination, for the whole consolidation
@reads(lambda a: checkpoint_to_read(a["src"]))  # the checkpoint is not pruned or replaced meanwhile
def consolidate(src: str | Path, dst: str | Path, force: bool = False) -> Path:
    """Write the sharded checkpoint `src` (a `step-N` directory or a run directory: its latest
    checkpoint) as a whole checkpoint at `dst`: model.safetensors, training_state.safetensors (the
    AdamW moments whole, the RNG states), its JSON and tokenizer files, so that convert, export,
    info, generate and transition read it, and a run resumes from it on any number of processes.
    One tensor is in memory at a time. Returns `dst`."""
    from ..checkpoint_io import check_tensors, load_config, resolve_checkpoint
    from ..checks import check_writable_folder
    from ..destinations import check_destination, clean_after_killed_runs, staged
    from ..jsonfiles import read_json_object, write_json
    from .checkpoint import STATE_JSON, STATE_TENSORS, check_training_checkpoint

    src, dst = resolve_checkpoint(src), Path(dst)
    if not is_sharded(src):
        load_config(src)  # not a checkpoint at all: says what is missing
        raise ValueError(f"{src} is not a sharded checkpoint (no {DCP_DIR}/.metadata); it is already whole")
    state = check_training_checkpoint(src)
    config = load_config(src)
    saved = metadata(src)
    check_tensors(model_shapes(src), config, where=str(src))
    clean_after_killed_runs(dst)
    check_destination(src, dst, force)
    check_writable_folder(dst.parent, "the destination", shown=dst)
    reader = _TensorReader(src, saved)
    with staged(dst) as staging:
        for path in src.iterdir():
            if path.is_file() and path.name not in (STATE_JSON, STATE_TENSORS):
                shutil.copy2(path, staging / path.name)
        model_keys = sorted(k for k in saved if k.startswith("model."))
        write_safetensors_streamed(staging / "model.safetensors", reader.entries(model_keys, strip="model."), reader.read("model."))
        with safe_open(src / STATE_TENSORS, "pt") as rng:
            rng_tensors = {name: rng.get_tensor(name) for name in rng.keys()}  # small: a few KB a process
        optimizer_keys = sorted(k for k in saved if k.startswith("optimizer."))
        entries = reader.entries(optimizer_keys) + [(n, t.dtype, tuple(t.shape)) for n, t in rng_tensors.items()]
        write_safetensors_streamed(staging / STATE_TENSORS, entries, lambda n: rng_tensors[n] if n in rng_tensors else reader.read("")(n))
        whole_state = {k: v for k, v in read_json_object(src / STATE_JSON).items() if k != FORMAT_KEY}
        write_json(staging / STATE_JSON, whole_state)
        files = sorted([p.name for p in staging.iterdir()] + [CONSOLIDATION_REPORT])
        write_json(staging / CONSOLIDATION_REPORT, {"source": str(src.resolve()), "step": state["step"], "files": files})
    return dst


CONSOLIDATION_REPORT = "consolidation_report.json"


class _TensorReader:
    """Reads one whole tensor of a DCP checkpoint at a time, in one process without a process group."""

    def __init__(self, checkpoint: Path, saved: dict):
        self.reader = dcp_reader(checkpoint)  # one reader: its checked metadata read once
        self.saved = saved

    def entries(self, keys: list[str], strip: str = "") -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return [(key[len(strip):], self.saved[key].properties.dtype, tuple(self.saved[key].size)) for key in keys]

    def read(self, prefix: str):
        import torch.distributed.checkpoint as dcp

        def one(name: str) -> torch.Tensor:
            entry = self.saved[prefix + name]
            tensor = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
            with _single_process_quietly():
                dcp.load({prefix + name: tensor}, storage_reader=self.reader, no_dist=True)
            return tensor

        return one


__all__ = ["is_sharded", "save_sharded", "load_sharded", "consolidate", "model_shapes", "write_safetensors_streamed"]
