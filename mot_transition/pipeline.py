"""The main job, end to end: train MoT, convert it, transition-tune it, train the Token Choice
baseline for the same total steps, and compare (SPEC sections 3 and 4).

    OUT/mot/            the MoT training run (checkpoints, metrics.jsonl)
    OUT/token_choice/   the converted checkpoint and its conversion_report.json
    OUT/transition/     the transition run: transition.json, checkpoint, comparison.json, loss_curves.png
    OUT/baseline/       the Token Choice run from scratch
"""

import dataclasses
import json
from pathlib import Path

from .compare import compare_runs, plot_curves
from .convert import convert_checkpoint, default_top_k
from .train import Recipe, load_recipe, train
from .transition import calibration_batches, transition


def baseline_recipe(recipe: Recipe, top_k: int, steps: int) -> Recipe:
    """A Token Choice model of the MoT model's shape (same E and expert_size), trained from scratch."""
    model = dataclasses.replace(recipe.model, ffn_type="token_choice", num_experts_per_tok=top_k)
    return dataclasses.replace(
        recipe, name=f"{recipe.name}-token-choice", model=model, train=dataclasses.replace(recipe.train, steps=steps, switch_at_step=None)
    )


def run_pipeline(
    recipe: str | Path = "tiny",
    out_dir: str | Path | None = None,
    overrides: tuple[str, ...] | list[str] = (),
    transition_steps: int | None = None,
    top_k: int | None = None,
    calibrate: int = 0,
    baseline: bool = True,
    progress: bool = True,
    log=print,
) -> dict:
    """Run every stage and return the comparison (also written to OUT/transition/comparison.json)."""
    mot_recipe = load_recipe(recipe, overrides)
    if mot_recipe.model.ffn_type != "mot":
        raise ValueError(f"the pipeline starts from a MoT model; recipe {recipe} has model.ffn_type={mot_recipe.model.ffn_type!r}")
    if mot_recipe.train.switch_at_step is not None:
        raise ValueError("the pipeline converts after the MoT run; remove train.switch_at_step (that is the in-run switch of `train`)")
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"{mot_recipe.name}-pipeline"
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already exists and is not empty; choose another --out")
    # every option is checked before the first stage starts
    mot_config = mot_recipe.model_config()
    k = default_top_k(mot_config) if top_k is None else top_k
    if not 1 <= k <= mot_config.n_expert:
        raise ValueError(f"--top-k must be between 1 and the number of experts ({mot_config.n_expert}), got {k}")
    steps = max(1, round(0.1 * mot_recipe.train.steps)) if transition_steps is None else transition_steps
    if steps < 1:
        raise ValueError(f"--transition-steps must be at least 1, got {steps}")
    if calibrate < 0:
        raise ValueError(f"--calibrate must be >= 0, got {calibrate}")

    log(f"[1/5] training MoT ({mot_recipe.train.steps} steps) -> {out / 'mot'}")
    mot = train(mot_recipe, out / "mot", progress=progress)
    log(f"      held-out loss {mot.eval_loss:.4f} nats/token (unigram baseline {mot.unigram_entropy:.4f}), {mot.train_seconds:.0f} s")

    log(f"[2/5] converting to Token Choice (top-{k}{f', calibrated on {calibrate} batches' if calibrate else ''}) -> {out / 'token_choice'}")
    batches = calibration_batches(mot.checkpoint, calibrate) if calibrate else None
    convert_checkpoint(mot.checkpoint, out / "token_choice", num_experts_per_tok=k, calibration=batches)

    log(f"[3/5] transition tuning ({steps} steps) -> {out / 'transition'}")
    result = transition(out / "token_choice", steps, out / "transition", progress=progress)
    log(f"      post-switch loss {result.post_switch_loss:.4f} at step 0, {result.final_loss:.4f} at step {steps}")

    if baseline:
        base = baseline_recipe(mot_recipe, k, mot_recipe.train.steps + steps)
        log(f"[4/5] training the Token Choice baseline from scratch ({base.train.steps} steps) -> {out / 'baseline'}")
        train(base, out / "baseline", progress=progress)
    else:
        log("[4/5] Token Choice baseline skipped")

    log("[5/5] comparing")
    comparison = compare_runs([out])
    (out / "transition" / "comparison.json").write_text(json.dumps(comparison, indent=1))
    try:
        comparison["plot"] = str(plot_curves(comparison, out / "transition" / "loss_curves.png"))
    except ImportError:
        comparison["plot"] = None
    return comparison


__all__ = ["run_pipeline", "baseline_recipe"]
