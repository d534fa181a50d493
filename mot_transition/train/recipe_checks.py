"""The checks of a recipe that involve several keys (one-line ValueErrors naming the key), and the
micro-batch size its batch keys give on a number of processes."""

from __future__ import annotations

from ..config import as_written
from .recipe_types import RECIPE_RULES, Recipe, TrainRecipe
from .tracking import check_report_to


def check_recipe(recipe: Recipe) -> None:
    """Raise a one-line ValueError naming the key for any value that cannot work."""

    def need(condition: bool, key: str, rule: str) -> None:
        if not condition:
            section, _, leaf = key.rpartition(".")
            value = getattr(getattr(recipe, section) if section else recipe, leaf)
            raise ValueError(f"recipe key {key!r} {rule}, got {as_written(value)}")

    for key, rule in RECIPE_RULES.items():  # each key alone (a Recipe built in Python skipped load_recipe)
        section, _, leaf = key.rpartition(".")
        rule.check(f"recipe key {key!r}", getattr(getattr(recipe, section) if section else recipe, leaf))
    d, t = recipe.data, recipe.train
    need(
        t.micro_batch_size == 0 or t.batch_size % t.micro_batch_size == 0,
        "train.micro_batch_size",
        f"must divide train.batch_size={t.batch_size}",
    )
    need(t.grad_accum == 0 or t.batch_size % t.grad_accum == 0, "train.grad_accum", f"must divide train.batch_size={t.batch_size}")
    need(
        t.grad_accum == 0 or t.micro_batch_size == 0 or t.grad_accum * t.micro_batch_size <= t.batch_size,
        "train.grad_accum",
        f"times train.micro_batch_size={t.micro_batch_size} must be at most train.batch_size={t.batch_size} "
        f"(set one of the two and leave the other 0)",
    )
    check_report_to(t.report_to)
    need(_device_kind(t.device) in ("auto", "cpu", "cuda", "mps"), "train.device", "must be auto, cpu, cuda, cuda:N or mps")
    need(
        t.switch_at_step is None or t.switch_at_step < t.steps,
        "train.switch_at_step",
        f"must be between 1 and train.steps - 1 = {t.steps - 1} (or none)",
    )
    need(
        t.parallel == "ddp" or t.switch_at_step is None,
        "train.switch_at_step",
        f"cannot be set with train.parallel='{t.parallel}' yet (the switch converts whole weights; switch under ddp)",
    )
    need(t.checkpoint_format == "whole" or t.switch_at_step is None, "train.switch_at_step",
         "cannot be set with train.checkpoint_format='sharded' yet (the switch reads whole checkpoints)")
    if t.expert_parallel > 1:
        need(t.parallel == "ddp", "train.expert_parallel", f"cannot be over 1 with train.parallel='{t.parallel}' yet (expert parallelism runs with ddp)")
        for key, ok in (("train.compile", not t.compile), ("train.switch_at_step", t.switch_at_step is None)):
            need(ok, key, "cannot be set with train.expert_parallel over 1 yet")
        need(recipe.model.n_expert % t.expert_parallel == 0, "train.expert_parallel", f"must divide model.n_expert={recipe.model.n_expert}")
        need(recipe.model.ffn_type != "dense", "train.expert_parallel", "needs a model with expert layers (model.ffn_type is 'dense')")
    need(t.parallel == "ddp" or not t.compile, "train.compile", f"cannot be on with train.parallel='{t.parallel}' yet (turn one of them off)")
    need(
        recipe.model.n_positions is None or recipe.model.n_positions >= d.seq_len,
        "model.n_positions",
        f"must be at least data.seq_len={d.seq_len}",
    )
    try:
        recipe.model_config()
    except (ValueError, TypeError) as error:
        message = str(error).strip().splitlines()[0]
        raise ValueError(f"recipe [model]: {message}") from None


def micro_batch_size(train: TrainRecipe, world_size: int = 1) -> int:
    """Rows per forward pass on one rank: `train.micro_batch_size`, or what `train.grad_accum` gives,
    or the whole per-rank batch. A one-line ValueError when the keys and the world size do not fit."""
    b, m, k = train.batch_size, train.micro_batch_size, train.grad_accum
    processes = f" x {world_size} processes" if world_size > 1 else ""
    if k:
        if b % (k * world_size):
            raise ValueError(f"recipe key 'train.batch_size' ({b}) must be a multiple of train.grad_accum{processes} ({k * world_size})")
        if m and m * k * world_size != b:
            raise ValueError(
                f"recipe keys 'train.micro_batch_size' ({m}) x 'train.grad_accum' ({k}){processes} must equal train.batch_size "
                f"({b}); set one of the two and leave the other 0"
            )
        return b // (k * world_size)
    if not m:
        if b % world_size:
            raise ValueError(f"recipe key 'train.batch_size' ({b}) must be a multiple of the number of processes ({world_size})")
        return b // world_size
    if b % (m * world_size):
        raise ValueError(
            f"recipe key 'train.batch_size' ({b}) must be a multiple of train.micro_batch_size{processes} "
            f"({m * world_size}); change train.batch_size or train.micro_batch_size"
        )
    return m


def _device_kind(name: str) -> str | None:
    """"auto", or the kind of a device torch can name ("cuda:1" -> "cuda"); None for anything else."""
    if name == "auto":
        return name
    import torch

    try:
        return torch.device(name).type
    except RuntimeError:
        return None
