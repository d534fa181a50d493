"""Transition tuning (SPEC 3 and 4): fine-tune a converted Token Choice checkpoint on the data of
its MoT run, with the load-balancing loss on, and measure what the switch cost and how fast the
fine-tuning won it back.

    transition(ckpt, steps, out)   the fine-tuning run; writes OUT/transition.json and a checkpoint
    in_run_switch(trainer)         the paper's in-run switch (recipe key train.switch_at_step)
    calibration_batches(ckpt, n)   batches of the MoT run's training data, for `convert --calibrate`

Every loss is the mean cross-entropy in nats/token, float32, on the MoT run's fixed held-out
batches: the pre-switch loss with the MoT model's training group size, the MoT unbatched loss with
group_size=1, the post-switch losses one sequence at a time (and batched, which must agree).
"""

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .checkpoint_io import load_checked, load_config, resolve_checkpoint
from .train import Recipe, Trainer, evaluate, load_training_state, prepare_run_data, recipe_from_dict
from .train.tracking import Reporters

TRANSITION_FILE = "transition.json"


@dataclass
class TransitionResult:
    source: str | None  # the MoT checkpoint that was converted, when known
    checkpoint: str  # the fine-tuned Token Choice checkpoint
    steps: int
    lr: float
    pre_switch_loss: float | None  # MoT, grouped inference with its training group_size
    mot_unbatched_loss: float | None  # MoT with group_size=1
    curve: list[dict] = field(default_factory=list)  # {"step", "loss", "loss_batched"}; loss is one sequence at a time
    recovery_step: int | None = None  # first step with loss <= pre_switch_loss * 1.02 (SPEC 4)
    full_recovery_step: int | None = None  # first step with loss <= pre_switch_loss

    @property
    def post_switch_loss(self) -> float:
        return self.curve[0]["loss"]

    @property
    def final_loss(self) -> float:
        return self.curve[-1]["loss"]


def run_recipe(checkpoint: Path) -> Recipe:
    """The recipe of the MoT run behind a checkpoint: its training state, or the conversion report."""
    for name, key in (("training_state.json", "recipe"), ("conversion_report.json", "recipe")):
        if (checkpoint / name).is_file():
            raw = json.loads((checkpoint / name).read_text()).get(key)
            if raw:
                return recipe_from_dict(raw)
    raise ValueError(
        f"{checkpoint} does not say which data its MoT run was trained on (no training_state.json, and no recipe in "
        f"conversion_report.json); convert a checkpoint written by `mot-transition train`"
    )


def calibration_batches(checkpoint: str | Path, num_batches: int) -> list[torch.Tensor]:
    """The first `num_batches` batches of the MoT run's training split, each of the run's
    micro-batch size (a multiple of group_size), for fitting the conversion scales."""
    from transformers import AutoTokenizer

    checkpoint = resolve_checkpoint(checkpoint)
    recipe = run_recipe(checkpoint)
    _, train_seq, _, _ = prepare_run_data(recipe, AutoTokenizer.from_pretrained(checkpoint))
    rows = recipe.train.micro_batch_size or recipe.train.batch_size
    if train_seq.shape[0] < rows * num_batches:
        raise ValueError(f"--calibrate {num_batches}: the training split has only {train_seq.shape[0] // rows} batches of {rows}")
    return list(train_seq[: rows * num_batches].split(rows))


def mot_losses(source: Path, recipe: Recipe, heldout: torch.Tensor) -> tuple[float, float]:
    """(pre-switch loss, MoT unbatched loss) of a MoT checkpoint on the held-out sequences."""
    model = load_checked(source)
    g = model.config.group_size
    batch = max(g, recipe.data.eval_batch_size // g * g)
    if heldout.shape[0] % g:
        raise ValueError(f"{heldout.shape[0]} held-out sequences cannot form groups of {g}; set data.eval_batch_size to a multiple of {g}")
    grouped = evaluate(model, heldout, batch)
    model.set_group_size(1)
    return grouped, evaluate(model, heldout, 1)


def transition(
    checkpoint: str | Path,
    steps: int,
    out_dir: str | Path,
    lr: float | None = None,
    eval_every: int | None = None,
    warmup_steps: int | None = None,
    progress: bool = True,
) -> TransitionResult:
    """Fine-tune the converted Token Choice `checkpoint` for `steps` steps into `out_dir`.

    Defaults: lr = the MoT run's final learning rate (lr * final_lr_fraction), warmup = 10% of
    the steps, an evaluation every steps / 10 steps; data, batch size and optimizer settings are
    the MoT run's, and the data stream continues where the MoT run stopped when that is known.
    """
    from transformers import AutoTokenizer

    checkpoint = resolve_checkpoint(checkpoint)
    config = load_config(checkpoint)
    if config.ffn_type != "token_choice":
        raise ValueError(
            f"{checkpoint} is a {config.ffn_type} checkpoint; transition tuning fine-tunes a converted Token Choice "
            f"checkpoint (run `mot-transition convert SRC DST` first)"
        )
    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"--eval-every must be at least 1, got {eval_every}")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--lr must be a finite positive number, got {lr}")
    out_dir = Path(out_dir)
    if (out_dir / TRANSITION_FILE).exists() or (out_dir / "checkpoints").exists():
        raise FileExistsError(f"{out_dir} already holds a transition run; choose another --out")
    recipe = run_recipe(checkpoint)
    report = json.loads((checkpoint / "conversion_report.json").read_text()) if (checkpoint / "conversion_report.json").is_file() else {}
    o, t = recipe.optim, recipe.train
    lr = o.lr * o.final_lr_fraction if lr is None else lr
    eval_every = max(1, steps // 10) if eval_every is None else eval_every
    o.lr, o.warmup_steps = lr, max(1, steps // 10) if warmup_steps is None else warmup_steps
    t.steps, t.eval_every, t.checkpoint_every, t.switch_at_step = steps, eval_every, steps, None

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    _, train_seq, heldout_seq, _ = prepare_run_data(recipe, tokenizer)
    torch.manual_seed(recipe.seed)
    trainer = Trainer(load_checked(checkpoint), recipe, train_seq, heldout_seq, tokenizer=tokenizer, run_dir=out_dir)
    source = Path(report["source"]) if report.get("source") else None
    if source is not None and not (source / "config.json").is_file():
        raise FileNotFoundError(
            f"the MoT checkpoint {checkpoint} was converted from ({source}) is gone, so the pre-switch loss cannot be "
            f"measured; put it back, or edit 'source' in {checkpoint / 'conversion_report.json'}"
        )
    if source is not None and (source / "training_state.json").is_file():
        state, _ = load_training_state(source)
        if state.get("world_size", 1) == 1:
            trainer.batches.load_state_dict(state["data"])  # continue on the MoT run's data stream
    pre = unbatched = None
    if source is not None:
        pre, unbatched = mot_losses(source, recipe, trainer.eval_sequences)

    result = TransitionResult(str(source) if source else None, "", steps, lr, pre, unbatched)
    out_dir.mkdir(parents=True, exist_ok=True)
    reporters = Reporters(t.report_to, out_dir, f"transition-{out_dir.name}", asdict(recipe), 0)
    bar = _bar(steps, progress)
    try:
        result.curve.append(_evaluate(trainer))
        while trainer.step_count < steps:
            record = trainer.step()
            if trainer.step_count % eval_every == 0 or trainer.step_count == steps:
                result.curve.append(_evaluate(trainer))
                record["eval_loss"] = result.curve[-1]["loss"]  # post-switch: one sequence at a time
            reporters.log(record)
            if bar is not None:
                bar.update(bar.tasks[0].id, completed=trainer.step_count, status=f"loss {record['lm_loss']:.3f}  post-switch {result.curve[-1]['loss']:.3f}")
    finally:
        reporters.close()
        if bar is not None:
            bar.stop()
    result.checkpoint = str(trainer.save_checkpoint())
    if pre is not None:
        result.recovery_step = next((p["step"] for p in result.curve if p["loss"] <= pre * 1.02), None)
        result.full_recovery_step = next((p["step"] for p in result.curve if p["loss"] <= pre), None)
    (out_dir / TRANSITION_FILE).write_text(json.dumps(asdict(result), indent=1))
    return result


def _evaluate(trainer: Trainer) -> dict:
    return {"step": trainer.step_count, "loss": trainer.evaluate(batch_size=1), "loss_batched": trainer.evaluate()}


def _bar(steps: int, show: bool):
    if not show:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]transition"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                   TimeElapsedColumn(), console=Console(stderr=True))
    bar.add_task("transition", total=steps, status="")
    bar.start()
    return bar


def load_transition(run_dir: str | Path) -> TransitionResult:
    """The TransitionResult a transition run saved; a damaged or edited file is a one-line error."""
    path = Path(run_dir) / TRANSITION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a transition run (no {TRANSITION_FILE})")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); rerun the transition") from None
    names = [f.name for f in fields(TransitionResult)]
    problem = None
    if not isinstance(raw, dict):
        problem = "it is not a JSON object"
    elif unknown := sorted(set(raw) - set(names)):
        problem = f"it has the unknown key {unknown[0]!r}"
    elif missing := [name for name in ("checkpoint", "steps", "curve") if name not in raw]:
        problem = f"it lacks the key {missing[0]!r}"
    elif not isinstance(raw["curve"], list) or not raw["curve"]:
        problem = "its curve is empty"
    elif not all(isinstance(p, dict) and isinstance(p.get("step"), int) and _finite(p.get("loss")) and _finite(p.get("loss_batched"))
                 for p in raw["curve"]):
        problem = "its curve has a point without step, loss and loss_batched"
    if problem:
        raise ValueError(f"{path} is not a transition record: {problem}; rerun the transition")
    return TransitionResult(**raw)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def in_run_switch(trainer: Trainer, num_experts_per_tok: int | None = None, capacity_factor: float | None = None) -> None:
    """The paper's in-run switch (recipe key `train.switch_at_step`): convert the trainer's MoT
    model to Token Choice in memory and go on training it, carrying the AdamW state of every
    tensor the two models share. The router is the controller divided by T, so its gradient is
    T times the controller's: its first moment is carried times T and its second times T^2."""
    from .convert import convert_model

    old_model, old_optimizer = trainer.model, trainer.optimizer
    temperature = old_model.config.mot_temperature
    old_state = {name: old_optimizer.state.get(p) for name, p in old_model.named_parameters()}
    new_model, _ = convert_model(old_model, num_experts_per_tok, capacity_factor)
    trainer.switch_model(new_model)
    for name, param in trainer.model.named_parameters():
        state = old_state.get(name)
        if not state:
            continue
        state = {key: value.clone() for key, value in state.items()}
        if name.endswith("mlp.controller") and temperature != 1.0:
            state["exp_avg"] *= temperature
            state["exp_avg_sq"] *= temperature**2
        trainer.optimizer.state[param] = state
