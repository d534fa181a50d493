"""Fair accounting: every held-out loss curve of a study on three axes, and the readings taken
from them.

A curve is a list of points {"step", "flops", "seconds", "loss"}, one per evaluation:
    step      optimizer steps done (a transitioned model counts its MoT steps first)
    flops     training FLOPs spent so far: `training_flops_per_token` (attention, the active
              feed-forward FLOPs, MoT's controller, mixing and emitting included) x the tokens of
              a step (batch_size x seq_len) x the steps; a transitioned model adds its MoT run's
    seconds   wall-clock seconds of the optimizer steps so far on this machine (metrics.jsonl's
              `step_seconds`: forward, backward, optimizer; evaluation and checkpoint writes are not
              counted, they depend on how often one evaluates, not on the model)
    loss      held-out cross-entropy, nats/token, on the recipe's fixed held-out batches

    training_curve(run_dir)          a `train` run's curve (its metrics.jsonl and final checkpoint)
    transition_curve(run_dir, start) a transition run's curve, continuing from the MoT point `start`
    loss_at(curve, axis, x)          the loss at x on an axis, linear between evaluations
    first_reaching(curve, target)    where the loss first gets down to `target`, on every axis
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint_io import load_config
from ..train import latest_checkpoint
from ..train.flops import training_flops_per_token
from ..train.tracking import METRICS_FILE, read_metrics_file
from ..transition import load_transition, run_recipe

AXES = {"step": "steps", "flops": "training FLOPs", "seconds": "wall-clock seconds"}
ORIGIN = {"step": 0, "flops": 0.0, "seconds": 0.0}


def flops_per_step(config, batch_size: int, seq_len: int) -> float:
    """Training FLOPs of one optimizer step: FLOPs per token x batch_size x seq_len tokens."""
    return training_flops_per_token(config, seq_len) * batch_size * seq_len


def step_seconds(records: list[dict], tokens_per_step: int) -> dict[int, float]:
    """{step: wall seconds of that optimizer step}: `step_seconds`, or for runs written before it
    was recorded, the step's tokens over its `tokens_per_s` (the same number, rounded)."""
    return {r["step"]: r["step_seconds"] if r.get("step_seconds") is not None else tokens_per_step / r["tokens_per_s"] for r in records}


def points(losses: list[tuple[int, float]], seconds: dict[int, float], per_step: float, start: dict = ORIGIN) -> list[dict]:
    """The curve of evaluations (step, loss) of a run whose steps cost `per_step` FLOPs and
    `seconds[step]` seconds each, continuing from the point `start` (steps, FLOPs and seconds
    already spent, e.g. by the MoT run before a transition)."""
    elapsed, total, curve = 0.0, 0, []
    for step, loss in losses:
        while total < step:
            total += 1
            if total not in seconds:
                raise ValueError(f"metrics.jsonl has no record of step {total}, so its time is unknown; rerun that run")
            elapsed += seconds[total]
        curve.append({"step": start["step"] + step, "flops": start["flops"] + step * per_step,
                      "seconds": start["seconds"] + elapsed, "loss": loss})
    return curve


def training_curve(run_dir: str | Path) -> list[dict]:
    """The held-out loss curve of a finished `train` run, on every axis."""
    run_dir = Path(run_dir)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint: the run did not finish")
    recipe = run_recipe(checkpoint)
    records = read_metrics_file(run_dir / METRICS_FILE)
    tokens = recipe.train.batch_size * recipe.data.seq_len
    losses = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    return points(losses, step_seconds(records, tokens), flops_per_step(load_config(checkpoint), recipe.train.batch_size, recipe.data.seq_len))


def transition_curve(run_dir: str | Path, start: dict) -> list[dict]:
    """The curve of a finished transition run (from its step 0, the loss right after the switch),
    continuing from `start`, the MoT run's last point: its steps, FLOPs and seconds come first."""
    run_dir = Path(run_dir)
    result = load_transition(run_dir)
    checkpoint = Path(result.checkpoint)
    recipe = run_recipe(checkpoint)  # the MoT run's batch and sequence length
    tokens = recipe.train.batch_size * recipe.data.seq_len
    seconds = step_seconds(read_metrics_file(run_dir / METRICS_FILE), tokens)
    per_step = flops_per_step(load_config(checkpoint), recipe.train.batch_size, recipe.data.seq_len)
    return points([(p["step"], p["loss"]) for p in result.curve], seconds, per_step, start)


def loss_at(curve: list[dict], axis: str, x: float) -> float | None:
    """The held-out loss at `x` on `axis` ("step", "flops" or "seconds"), linear between the two
    evaluations around it; None when x lies before the first evaluation or past the last one."""
    tolerance = 1e-9 * max(1.0, abs(x))
    for a, b in zip(curve, curve[1:]):
        if a[axis] - tolerance <= x <= b[axis] + tolerance:
            if b[axis] == a[axis]:
                return b["loss"]
            t = min(1.0, max(0.0, (x - a[axis]) / (b[axis] - a[axis])))
            return a["loss"] + t * (b["loss"] - a["loss"])
    if curve and abs(curve[-1][axis] - x) <= tolerance:
        return curve[-1]["loss"]
    return None


def first_reaching(curve: list[dict], target: float) -> dict | None:
    """Where the curve's loss first gets down to `target`: {"step", "flops", "seconds",
    "first_evaluation"}, each axis interpolated linearly between the evaluation before (loss
    above the target) and the first at or below it. `first_evaluation` is True when the first
    evaluation is already there (it was reached then or earlier: nothing was measured before).
    None when the curve never gets there ("not reached")."""
    for i, point in enumerate(curve):
        if point["loss"] <= target:
            if i == 0:
                return {**{axis: point[axis] for axis in AXES}, "first_evaluation": True}
            before = curve[i - 1]
            t = (before["loss"] - target) / (before["loss"] - point["loss"])
            return {**{axis: before[axis] + t * (point[axis] - before[axis]) for axis in AXES}, "first_evaluation": False}
    return None


__all__ = ["AXES", "flops_per_step", "points", "training_curve", "transition_curve", "loss_at", "first_reaching"]
