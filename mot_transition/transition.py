"""Transition tuning (docs/design.md §9.6): fine-tune a converted Token Choice checkpoint on the
data of its MoT run, with the load-balancing loss on, and measure what the switch cost and how
fast the fine-tuning won it back (the measures of design.md §10.2).

    transition(ckpt, steps, out)   the fine-tuning run; writes OUT/transition.json and checkpoints
                                   (every checkpoint_every steps; resume=True continues a killed run)
    in_run_switch(trainer)         the paper's in-run switch (recipe key train.switch_at_step)
    calibration_batches(ckpt, n)   batches of the MoT run's training data, for `convert --calibrate`

Every loss is the mean cross-entropy in nats/token, float32, on the MoT run's fixed held-out
batches: the pre-switch loss with the MoT model's training group size, the MoT unbatched loss with
group_size=1, the post-switch losses one sequence at a time (and batched, which must agree).
"""

import json
import math
import warnings
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .checkpoint_io import checkpoint_to_read, load_checked, load_config, resolve_checkpoint
from .checks import check_writable_folder, load_tokenizer_folder
from .config import Rule
from .jsonfiles import read_json_object, write_json
from .locks import reads, writes
from .options import check_options, with_option
from .train import Recipe, Trainer, evaluate, latest_checkpoint, load_training_state, prepare_run_data, recipe_from_dict
from .train.checkpoint import check_training_checkpoint, resumable_checkpoint, set_aside
from .train.recipe import micro_batch_size
from .train.tracking import Reporters

TRANSITION_FILE = "transition.json"
FINITE = Rule(float)  # a loss in transition.json


@dataclass
class TransitionResult:
    source: str | None  # the MoT checkpoint that was converted, when known
    checkpoint: str  # the fine-tuned Token Choice checkpoint
    steps: int
    lr: float
    pre_switch_loss: float | None  # MoT, grouped inference with its training group_size
    mot_unbatched_loss: float | None  # MoT with group_size=1
    curve: list[dict] = field(default_factory=list)  # {"step", "loss", "loss_batched"}; loss is one sequence at a time
    recovery_step: int | None = None  # first step with loss <= pre_switch_loss * 1.02 (design.md §10.2)
    full_recovery_step: int | None = None  # first step with loss <= pre_switch_loss

    @property
    def post_switch_loss(self) -> float:
        return self.curve[0]["loss"]

    @property
    def final_loss(self) -> float:
        return self.curve[-1]["loss"]


def run_recipe(checkpoint: Path) -> Recipe:
    """The recipe of the MoT run behind a checkpoint: its training state, or the conversion report."""
    if (checkpoint / "training_state.json").is_file():
        return recipe_from_dict(check_training_checkpoint(checkpoint, weights=False)["recipe"])
    if (checkpoint / "conversion_report.json").is_file():
        raw = read_json_object(checkpoint / "conversion_report.json")
        if isinstance(raw.get("recipe"), dict):
            return recipe_from_dict(raw["recipe"])
    raise ValueError(
        f"{checkpoint} does not say which data its MoT run was trained on (no training_state.json, and no recipe in "
        f"conversion_report.json); convert a checkpoint written by `mot-transition train`"
    )


def calibration_batches(checkpoint: str | Path, num_batches: int) -> list[torch.Tensor]:
    """The first `num_batches` batches of the MoT run's training split, each of the run's
    micro-batch size (a multiple of group_size), for fitting the conversion scales."""
    checkpoint = resolve_checkpoint(checkpoint)
    recipe = run_recipe(checkpoint)
    _, train_seq, _, _ = prepare_run_data(recipe, load_tokenizer_folder(checkpoint, f"the checkpoint {checkpoint}"))
    rows = check_calibration(recipe, train_seq, num_batches)
    return list(train_seq[: rows * num_batches].split(rows))


def check_calibration(recipe: Recipe, train_seq: torch.Tensor, num_batches: int) -> int:
    """The rows of one calibration batch; ValueError when the training split has fewer than
    `num_batches` of them (`run` checks this before its first stage)."""
    rows = micro_batch_size(recipe.train)  # the MoT run's micro-batch (of a single-process run)
    available = train_seq.shape[0] // rows
    if num_batches > available:
        raise ValueError(
            f"--calibrate {num_batches}: the MoT run's training split has only {available} batches of {rows} sequences; "
            f"ask for at most {available}"
        )
    return rows


def check_heldout_groups(sequences: int, group_size: int) -> None:
    """The pre-switch loss groups the held-out sequences as the MoT run did: their number
    (data.eval_batch_size x data.eval_batches) must be a multiple of group_size (`run` checks
    this before its first stage)."""
    if sequences % group_size:
        raise ValueError(
            f"{sequences} held-out sequences (data.eval_batch_size x data.eval_batches) cannot form groups of "
            f"{group_size}; set data.eval_batch_size to a multiple of {group_size}"
        )


def mot_losses(source: Path, recipe: Recipe, heldout: torch.Tensor) -> tuple[float, float]:
    """(pre-switch loss, MoT unbatched loss) of a MoT checkpoint on the held-out sequences."""
    model = load_checked(source)
    g = model.config.group_size
    batch = max(g, recipe.data.eval_batch_size // g * g)
    check_heldout_groups(heldout.shape[0], g)
    grouped = evaluate(model, heldout, batch)
    model.set_group_size(1)
    return grouped, evaluate(model, heldout, 1)


@writes("out_dir", option="--out")  # one writer per run directory, for the whole run
@reads(lambda a: checkpoint_to_read(a["checkpoint"]))  # no convert --force replaces it meanwhile
def transition(
    checkpoint: str | Path,
    steps: int,
    out_dir: str | Path,
    lr: float | None = None,
    eval_every: int | None = None,
    warmup_steps: int | None = None,
    progress: bool = True,
    checkpoint_every: int | None = None,
    resume: bool = False,
) -> TransitionResult:
    """Fine-tune the converted Token Choice `checkpoint` for `steps` steps into `out_dir`.

    Defaults: lr = the MoT run's final learning rate (lr * final_lr_fraction), warmup = 10% of
    the steps, an evaluation every steps / 10 steps, a checkpoint at every evaluation; data, batch
    size and optimizer settings are the MoT run's, and the data stream continues where the MoT run
    stopped when that is known. `resume=True` continues the run in `out_dir` from its newest
    checkpoint exactly as if it had never stopped (the same curve, the same final weights); lr,
    eval_every and warmup_steps left None are then the run's own, and given ones must match it.
    """
    checkpoint = resolve_checkpoint(checkpoint)
    config = load_config(checkpoint)
    if config.ffn_type != "token_choice":
        raise ValueError(
            f"{checkpoint} is a {config.ffn_type} checkpoint; transition tuning fine-tunes a converted Token Choice "
            f"checkpoint (run `mot-transition convert SRC DST` first)"
        )
    check_options(steps=steps, eval_every=eval_every, checkpoint_every=checkpoint_every, lr=lr)
    out_dir = Path(out_dir)
    check_writable_folder(out_dir, "--out")  # before the pre-switch losses are measured
    last = None
    if resume:
        last, skipped = resumable_checkpoint(out_dir)
        for damaged, why in skipped:
            aside = set_aside(damaged)
            warnings.warn(f"skipping the damaged checkpoint {damaged.name} ({why}), set aside as {aside.name}; resuming from {last.name}", stacklevel=2)
    if not resume and ((out_dir / TRANSITION_FILE).exists() or (out_dir / "checkpoints").exists()):
        raise FileExistsError(f"{out_dir} already holds a transition run; pass --resume to continue it or choose another --out")
    saved = None
    if last is not None:
        saved = _resumable(last, checkpoint, steps, {"--lr": lr, "--eval-every": eval_every, "warmup_steps": warmup_steps})
        lr, eval_every, warmup_steps = saved["lr"], saved["eval_every"], saved["warmup_steps"]
    recipe = run_recipe(checkpoint)
    report = read_json_object(checkpoint / "conversion_report.json") if (checkpoint / "conversion_report.json").is_file() else {}
    o, t = recipe.optim, recipe.train
    lr = o.lr * o.final_lr_fraction if lr is None else lr
    eval_every = max(1, steps // 10) if eval_every is None else eval_every
    warmup_steps = max(1, steps // 10) if warmup_steps is None else warmup_steps
    checkpoint_every = eval_every if checkpoint_every is None else checkpoint_every
    o.lr, o.warmup_steps = lr, warmup_steps
    t.steps, t.eval_every, t.checkpoint_every, t.switch_at_step = steps, eval_every, checkpoint_every, None
    # one process: its checkpoints are read as whole ones (convert, export, --resume), its experts all its own
    t.checkpoint_format, t.expert_parallel = "whole", 1

    with ExitStack() as readers:  # the run's data, read for its whole life under a reader's lock
        tokenizer = load_tokenizer_folder(checkpoint, f"the checkpoint {checkpoint}")
        _, train_seq, heldout_seq, _ = prepare_run_data(recipe, tokenizer, readers=readers)
        torch.manual_seed(recipe.seed)
        model = load_checked(last if saved is not None else checkpoint)
        trainer = Trainer(model, recipe, train_seq, heldout_seq, tokenizer=tokenizer, run_dir=out_dir)
        if saved is not None:  # the source MoT checkpoint is no longer needed: its losses are in the checkpoint
            trainer.load_checkpoint(last)
            result = TransitionResult(saved["source"], "", steps, lr, saved["pre_switch_loss"], saved["mot_unbatched_loss"], saved["curve"])
        else:
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
        carried = {"converted": str(checkpoint.resolve()), "eval_every": eval_every, "warmup_steps": warmup_steps}

        out_dir.mkdir(parents=True, exist_ok=True)
        reporters = Reporters(t.report_to, out_dir, f"transition-{out_dir.name}", asdict(recipe), trainer.step_count)
        bar = _bar(steps, trainer.step_count, progress)
        try:
            if not result.curve:
                result.curve.append(_evaluate(trainer))
            while trainer.step_count < steps:
                record = trainer.step()
                step = trainer.step_count
                if step % eval_every == 0 or step == steps:
                    result.curve.append(_evaluate(trainer))
                    if not all(math.isfinite(result.curve[-1][key]) for key in ("loss", "loss_batched")):
                        trainer._diverged(f"the held-out loss became {result.curve[-1]['loss']}", updated=True)
                    record["eval_loss"] = result.curve[-1]["loss"]  # post-switch: one sequence at a time
                reporters.log(record)
                if step % checkpoint_every == 0 or step == steps:
                    trainer.save_checkpoint(extra={"transition": {**asdict(result), **carried}})
                if bar is not None:
                    bar.update(bar.tasks[0].id, completed=step, status=f"loss {record['lm_loss']:.3f}  post-switch {result.curve[-1]['loss']:.3f}")
        finally:
            reporters.close()
            if bar is not None:
                bar.stop()
        result.checkpoint = str(latest_checkpoint(out_dir))
        if result.pre_switch_loss is not None:
            pre = result.pre_switch_loss
            result.recovery_step = next((p["step"] for p in result.curve if p["loss"] <= pre * 1.02), None)
            result.full_recovery_step = next((p["step"] for p in result.curve if p["loss"] <= pre), None)
        write_json(out_dir / TRANSITION_FILE, asdict(result))
        return result


def _resumable(last: Path, checkpoint: Path, steps: int, options: dict) -> dict:
    """What the run being resumed carried in its checkpoint `last`; ValueError when this call
    asks for another checkpoint, --steps, or another given option than that run used."""
    run = last.parent.parent
    state = json.loads((last / "training_state.json").read_text())  # the JSON only: the tensors load on resume
    extra = state.get("extra")
    saved = extra.get("transition") if isinstance(extra, dict) else None
    if not isinstance(saved, dict):
        raise ValueError(f"{run} holds checkpoints that are not of a transition run; choose another --out")
    needed = ("converted", "steps", "lr", "eval_every", "warmup_steps", "curve", "source", "pre_switch_loss", "mot_unbatched_loss")
    if any(key not in saved for key in needed) or not isinstance(saved["curve"], list):
        raise ValueError(f"{last / 'training_state.json'} is corrupted: its transition record is incomplete; resume from an earlier checkpoint")
    if saved.get("converted") != str(checkpoint.resolve()):
        raise ValueError(f"--resume: the run in {run} fine-tunes {saved.get('converted')}, not {checkpoint}; resume it with that CHECKPOINT")
    if steps != saved.get("steps"):
        raise ValueError(f"--resume: the run in {run} was started {with_option('--steps', saved.get('steps'))}, not "
                         f"{with_option('--steps', steps)}; resume {with_option('--steps', saved.get('steps'))}")
    for option, value in options.items():
        used = saved.get(option.lstrip("-").replace("-", "_"))
        if value is not None and value != used:
            raise ValueError(f"--resume: the run in {run} was started {with_option(option, used)}, not {with_option(option, value)}; "
                             f"resume {with_option(option, used)}{'' if used is None else f' or leave {option} out'}")
    return saved


def _evaluate(trainer: Trainer) -> dict:
    return {"step": trainer.step_count, "loss": trainer.evaluate(batch_size=1), "loss_batched": trainer.evaluate()}


def _bar(steps: int, done: int, show: bool):
    if not show:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]transition"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                   TimeElapsedColumn(), console=Console(stderr=True))
    bar.add_task("transition", total=steps, completed=done, status="")
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
    except RecursionError:
        raise ValueError(f"{path} is not valid JSON (nested deeper than Python's recursion limit); rerun the transition") from None
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
    elif not all(isinstance(p, dict) and isinstance(p.get("step"), int) and FINITE.accepts(p.get("loss")) and FINITE.accepts(p.get("loss_batched"))
                 for p in raw["curve"]):
        problem = "its curve has a point without step, loss and loss_batched"
    if problem:
        raise ValueError(f"{path} is not a transition record: {problem}; rerun the transition")
    return TransitionResult(**raw)



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
