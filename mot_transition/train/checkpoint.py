"""Training checkpoints that survive a crash and load without unpickling anything.

Layout of a run directory:

    RUN/
      recipe.toml                    the resolved recipe (file plus overrides)
      metrics.jsonl                  one JSON object per optimizer step
      checkpoints/
        step-000200/                 a `save_pretrained` directory ...
          config.json
          model.safetensors
          tokenizer.json, tokenizer_config.json, ...
          training_state.safetensors ... plus the training state: AdamW moments per parameter
                                     ("optimizer.<param>.exp_avg", ...) and RNG states
                                     ("rng.cpu.rank0", "rng.cuda.rank0", ...)
          training_state.json        step, data position, optimizer hyper-parameters, recipe

A checkpoint is written into `checkpoints/.tmp-step-...` and renamed into place with `os.replace`
only once every file is written and flushed, so a directory named `step-N` is always complete. A
write that dies half-way leaves a `.tmp-` directory that `latest_checkpoint` ignores and the next
save removes. Only the last `keep` checkpoints are kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint_io import (  # noqa: F401  (the run layout's functions are this module's API too)
    CHECKPOINTS,
    STATE_JSON,
    check_tensors,
    checked_config,
    checkpoint_dir,
    first_nonfinite,
    latest_checkpoint,
    list_checkpoints,
    load_checked,
    load_config,
    model_shapes,
    nonfinite_error,
    read_header,
)
from ..data.tokenizer import ready_for_generation
from ..destinations import unprivate_safetensors
from ..jsonfiles import json_kind, read_json_object, write_json
from ..locks import in_use

STATE_TENSORS = "training_state.safetensors"


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    state: dict,
    rng_states: dict[str, torch.Tensor],
    keep: int = 2,
    gathered: tuple[dict, tuple[dict, dict]] | None = None,
) -> Path:
    """Write checkpoint `step` of `run_dir` atomically and keep only the last `keep`.

    `model` is the bare model (not the DDP wrapper); `state` is JSON-able (step, data position,
    recipe, ...); `rng_states` are uint8 tensors. `gathered`: the whole state dict and
    `optimizer_state` of a sharded model (sharding.py), written instead of the model's and the
    optimizer's own. Returns the checkpoint's path.
    """
    weights = gathered[0] if gathered is not None else model.state_dict()
    bad = first_nonfinite(weights.items())
    if bad is not None:  # never write, and so never offer to resume from, a checkpoint of NaN
        raise nonfinite_error(f"step {step} of {run_dir}", bad)
    final = checkpoint_dir(run_dir, step)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(parent)
    tmp = parent / f".tmp-{final.name}-{os.getpid()}"
    try:
        with _quiet_transformers():
            model.save_pretrained(tmp, state_dict=weights if gathered is not None else None)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            ready_for_generation(tmp, model.config.n_positions)
        tensors, optimizer_json = gathered[1] if gathered is not None else optimizer_state(model, optimizer)
        tensors.update({name: t.detach().cpu().contiguous() for name, t in rng_states.items()})
        save_file(tensors, tmp / STATE_TENSORS)
        write_json(tmp / STATE_JSON, {**state, "step": step, "optimizer": optimizer_json})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish(tmp, final, run_dir, keep)


def publish(tmp: Path, final: Path, run_dir: Path, keep: int) -> Path:
    """Flush the complete checkpoint `tmp` to disk, rename it to `final` and keep only the last
    `keep` checkpoints of `run_dir`. Returns `final`."""
    parent = final.parent
    try:
        unprivate_safetensors(tmp)
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again (e.g. after a resume): move the old one aside
            final.rename(parent / f".trash-{final.name}-{os.getpid()}")
        os.replace(tmp, final)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        if in_use(old):  # another command reads it (convert, export, eval...): deleted by a later save
            continue
        trash = parent / f".trash-{old.name}-{os.getpid()}"
        old.rename(trash)  # atomic: a half-deleted checkpoint never looks like a complete one
        shutil.rmtree(trash, ignore_errors=True)
    _remove_leftovers(parent)
    return final


def load_model(checkpoint: Path, model_class=None):
    """The model saved in `checkpoint`, as `model_class` (default: `MoTLMHeadModel`), in float32,
    every tensor checked against the config first (`checkpoint_io.load_checked`)."""
    with _quiet_transformers():
        return load_checked(checkpoint, model_class)


def load_training_state(checkpoint: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the JSON state, the tensors) of a checkpoint written by `save_checkpoint`, both checked
    first (`check_training_checkpoint`)."""
    state = check_training_checkpoint(checkpoint, weights=False)
    return state, load_file(Path(checkpoint) / STATE_TENSORS)


def check_training_checkpoint(checkpoint: Path, weights: bool = True) -> dict:
    """The JSON training state of a checkpoint whose files are whole, else a one-line ValueError /
    FileNotFoundError naming the damaged file: training_state.json must be an object with the step,
    data position, optimizer and recipe; the safetensors headers must match their files' sizes (and,
    with `weights`, the model's tensors its config)."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / STATE_JSON).is_file() or not (checkpoint / STATE_TENSORS).is_file():
        raise FileNotFoundError(f"{checkpoint} is not a training checkpoint (no {STATE_JSON} / {STATE_TENSORS})")
    state = read_json_object(checkpoint / STATE_JSON)
    kinds = {"step": int, "data": dict, "optimizer": dict, "recipe": dict}
    for key, kind in kinds.items():
        if not isinstance(state.get(key), kind):  # the kind said in JSON's words, the file's language
            raise ValueError(f"{checkpoint / STATE_JSON} is corrupted: no {key!r} ({json_kind(kind())})")
    read_header(checkpoint / STATE_TENSORS)
    if weights and state.get("checkpoint_format") == "sharded":
        check_tensors(model_shapes(checkpoint), load_config(checkpoint), where=str(checkpoint))
    elif weights:
        checked_config(checkpoint)
    return state


def set_aside(damaged: Path) -> Path:
    """Rename a damaged checkpoint to `.damaged-step-N` beside it: kept for a look, but no longer
    counted among the run's checkpoints (which the pruning of old ones would otherwise do, deleting
    good checkpoints in favour of damaged newer ones)."""
    target = damaged.with_name(f".damaged-{damaged.name}")
    if target.exists():
        target = damaged.with_name(f".damaged-{damaged.name}-{os.getpid()}")
    damaged.rename(target)
    return target


def resumable_checkpoint(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest checkpoint of a run whose files are whole, [(newer damaged checkpoint, why)]).
    (None, []) when the run has no checkpoint; a ValueError naming the damage when none is whole."""
    skipped = []
    for checkpoint in reversed(list_checkpoints(run_dir)):
        try:
            check_training_checkpoint(checkpoint)
        except (ValueError, OSError) as error:
            skipped.append((checkpoint, str(error).strip().splitlines()[0]))
            continue
        return checkpoint, skipped
    if skipped:
        raise ValueError(f"no intact checkpoint to resume in {run_dir}: {skipped[0][1]}")
    return None, []


def optimizer_state(model, optimizer: torch.optim.Optimizer, whole=None) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state keyed by parameter name: tensors for safetensors, the rest for JSON.
    `whole(tensor)`: how a tensor becomes a whole CPU tensor (a sharded one is gathered: sharding.full)."""
    whole = whole or (lambda t: t.detach().cpu().contiguous())
    names = {param: name for name, param in model.named_parameters()}
    tensors, scalars, groups = {}, {}, []
    for group in optimizer.param_groups:
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": [names[p] for p in group["params"]]})
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.{names[param]}.{key}"] = whole(value)
                else:
                    scalars[f"{names[param]}.{key}"] = value
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_state(model, optimizer: torch.optim.Optimizer, state_json: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Restore what `optimizer_state` saved into an optimizer built over the same parameters, grouped
    as the saved one was or otherwise (expert parallelism gives the experts a group of their own): each
    group takes the settings of the saved group of its parameters, which must agree."""
    saved_groups = state_json["optimizer"]["param_groups"]
    scalars = state_json["optimizer"]["scalars"]
    names = {param: name for name, param in model.named_parameters()}
    current_groups = [[names[p] for p in group["params"]] for group in optimizer.param_groups]
    saved_group_of = {name: i for i, group in enumerate(saved_groups) for name in group["params"]}
    if sorted(saved_group_of) != sorted(name for group in current_groups for name in group):
        raise ValueError("the checkpoint's optimizer was built over other parameters than this model's; resume with the same recipe")
    settings = [{k: _json_value(v) for k, v in group.items() if k != "params"} for group in saved_groups]
    state, index, param_groups = {}, 0, []
    for own, group_names in zip(optimizer.param_groups, current_groups):
        of_group = {json.dumps(settings[saved_group_of[name]], sort_keys=True, default=str) for name in group_names}
        if len(of_group) > 1:
            raise ValueError("the checkpoint's optimizer gave different settings to parameters that share a group here; resume with the same recipe")
        indices = []
        for name in group_names:
            entry = {key[len(f"optimizer.{name}.") :]: t for key, t in tensors.items() if key.startswith(f"optimizer.{name}.")}
            entry.update({key[len(f"{name}.") :]: v for key, v in scalars.items() if key.startswith(f"{name}.")})
            if entry:
                state[index] = entry
            indices.append(index)
            index += 1
        taken = settings[saved_group_of[group_names[0]]] if group_names else {k: v for k, v in own.items() if k != "params"}
        param_groups.append({**taken, "params": indices})
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def _json_value(value):
    return tuple(value) if isinstance(value, list) else value  # betas come back from JSON as a list


@contextlib.contextmanager
def _quiet_transformers():
    """No tqdm bar from transformers while saving / loading (the trainer has its own progress bar)."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def _remove_leftovers(parent: Path) -> None:
    """Remove `.tmp-` / `.trash-` directories left by a save that was killed."""
    for path in parent.iterdir():
        if path.name.startswith((".tmp-", ".trash-")) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = [
    "save_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "checkpoint_dir",
    "load_training_state",
    "check_training_checkpoint",
    "resumable_checkpoint",
    "set_aside",
    "load_model",
    "optimizer_state",
    "load_optimizer_state",
]
