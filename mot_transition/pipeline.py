"""The main job, end to end: train MoT, convert it, transition-tune it, train the Token Choice
baseline for the same total steps, and compare (docs/design.md §9 and §10).

    OUT/mot/            the MoT training run (checkpoints, metrics.jsonl)
    OUT/token_choice/   the converted checkpoint and its conversion_report.json
    OUT/transition/     the transition run: transition.json, checkpoint, comparison.json, loss_curves.png
    OUT/baseline/       the Token Choice run from scratch
"""

import dataclasses
import json
import os
import time
from pathlib import Path

from .checks import check_writable_folder
from .config import as_written
from .compare import compare_runs, plot_curves
from .convert import convert_checkpoint, default_top_k, token_choice_config
from .destinations import not_ours
from .jsonfiles import read_json_object, write_json
from .locks import writes
from .options import check_options, with_option
from .train import Recipe, load_recipe, prepare_run_data, train
from .transition import calibration_batches, check_calibration, check_heldout_groups, transition

PIPELINE_FILE = "pipeline.json"  # the recipe and options the run was started with: --resume must match them


def baseline_recipe(recipe: Recipe, top_k: int, steps: int) -> Recipe:
    """A Token Choice model of the MoT model's shape (same E and expert_size), trained from scratch."""
    model = dataclasses.replace(recipe.model, ffn_type="token_choice", num_experts_per_tok=top_k)
    return dataclasses.replace(
        recipe, name=f"{recipe.name}-token-choice", model=model, train=dataclasses.replace(recipe.train, steps=steps, switch_at_step=None)
    )


def _pipeline_dir(args: dict) -> Path:
    """The OUT that a `run_pipeline` call writes (as it computes it), to be locked before anything."""
    if args["out_dir"] is not None:
        return Path(args["out_dir"])
    return Path("runs") / f"{load_recipe(args['recipe'], args['overrides']).name}-pipeline"


@writes(_pipeline_dir, option="--out")  # one pipeline per OUT, for its whole life (its stages lock their own folders inside it)
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
    resume: bool = False,
) -> dict:
    """Run every stage and return the comparison (also written to OUT/transition/comparison.json).

    `resume=True` continues a pipeline in OUT that stopped part-way, with the recipe and options
    it was started with (OUT/pipeline.json): finished stages are kept, a stopped training or
    transition run continues from its newest checkpoint.
    """
    mot_recipe = load_recipe(recipe, overrides)
    if mot_recipe.model.ffn_type != "mot":
        raise ValueError(f"the pipeline starts from a MoT model; recipe {recipe} has model.ffn_type={mot_recipe.model.ffn_type!r}")
    if mot_recipe.train.switch_at_step is not None:
        raise ValueError("the pipeline converts after the MoT run; remove train.switch_at_step (that is the in-run switch of `train`)")
    if mot_recipe.train.checkpoint_format != "whole":
        raise ValueError("the pipeline converts the MoT run's whole checkpoint; remove train.checkpoint_format=sharded "
                         "(or train sharded with `train`, then `consolidate` and `convert`)")
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"{mot_recipe.name}-pipeline"
    if not resume and out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already exists and is not empty; pass --resume to continue the run in it, or choose another --out")
    # every option is checked before the first stage starts
    check_options(transition_steps=transition_steps, top_k=top_k, calibrate=calibrate)
    check_writable_folder(out, "--out")
    mot_config = mot_recipe.model_config()
    k = default_top_k(mot_config) if top_k is None else top_k
    token_choice_config(mot_config, k)  # --top-k in range
    steps = max(1, round(0.1 * mot_recipe.train.steps)) if transition_steps is None else transition_steps
    check_heldout_groups(mot_recipe.data.eval_batch_size * mot_recipe.data.eval_batches, mot_config.group_size)
    base = baseline_recipe(mot_recipe, k, mot_recipe.train.steps + steps)
    base.model_config()
    started = {"recipe": mot_recipe.to_dict(), "options": {"transition_steps": steps, "top_k": k, "calibrate": calibrate, "baseline": baseline}}
    if resume and out.exists() and any(out.iterdir()):
        _check_same_pipeline(out, json.loads(json.dumps(started)))
    if calibrate:  # the data is cached: the MoT run reads it back
        check_calibration(mot_recipe, prepare_run_data(mot_recipe)[1], calibrate)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / PIPELINE_FILE).is_file():
        write_json(out / PIPELINE_FILE, started)

    log(f"[1/5] training MoT ({mot_recipe.train.steps} steps) -> {out / 'mot'}")
    mot = train(mot_recipe, out / "mot", resume=resume, progress=progress)
    log(f"      held-out loss {mot.eval_loss:.4f} nats/token (unigram baseline {mot.unigram_entropy:.4f}), {mot.train_seconds:.0f} s")

    calibrated = f", calibrated on {calibrate} batches" if calibrate else ""
    if resume and converted_already(out / "token_choice", mot.checkpoint, k, calibrate):
        log(f"[2/5] converted to Token Choice (top-{k}{calibrated}) already: {out / 'token_choice'} kept")
    else:
        log(f"[2/5] converting to Token Choice (top-{k}{calibrated}) -> {out / 'token_choice'}")
        problem = not_ours(out / "token_choice") if resume and (out / "token_choice").is_dir() else None
        if problem:  # not a conversion --force may replace: kept aside, never deleted
            aside = out / f".token_choice.incomplete-{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(out / "token_choice", aside)
            log(f"      {out / 'token_choice'} was not a complete conversion ({problem}): moved aside to {aside}")
        batches = calibration_batches(mot.checkpoint, calibrate) if calibrate else None
        convert_checkpoint(mot.checkpoint, out / "token_choice", num_experts_per_tok=k, calibration=batches, force=resume)

    log(f"[3/5] transition tuning ({steps} steps) -> {out / 'transition'}")
    result = transition(out / "token_choice", steps, out / "transition", progress=progress, resume=resume)
    log(f"      post-switch loss {result.post_switch_loss:.4f} at step 0, {result.final_loss:.4f} at step {steps}")

    if baseline:
        log(f"[4/5] training the Token Choice baseline from scratch ({base.train.steps} steps) -> {out / 'baseline'}")
        train(base, out / "baseline", resume=resume, progress=progress)
    else:
        log("[4/5] Token Choice baseline skipped")

    log("[5/5] comparing")
    comparison = compare_runs([out])
    write_json(out / "transition" / "comparison.json", comparison)
    try:
        comparison["plot"] = str(plot_curves(comparison, out / "transition" / "loss_curves.png"))
    except ImportError:
        comparison["plot"] = None
    return comparison


OPTIONS = {"transition_steps": "--transition-steps", "top_k": "--top-k", "calibrate": "--calibrate", "baseline": "--baseline/--no-baseline"}


def _check_same_pipeline(out: Path, now: dict) -> None:
    """--resume continues the run in `out` only with the recipe and options it was started with."""
    if not (out / PIPELINE_FILE).is_file():
        raise FileExistsError(f"{out} holds no {PIPELINE_FILE}, so it is not a `mot-transition run` that --resume can continue; choose another --out")
    check_started_with(out / PIPELINE_FILE, now, OPTIONS)


def check_started_with(path: Path, now: dict, options: dict[str, str], what: str = "run", lead: str = "--resume: ",
                       again: str = "resume with") -> None:
    """`now` ({"recipe", "options"}) must be what the `what` in path's folder was started with, as
    the JSON file `path` recorded it; else a one-line ValueError naming the first option (by its
    command-line name in `options`) or recipe key that differs (`data.cache_dir` may). `run --resume`
    and `study` (which goes on where it stopped) share it."""
    out = path.parent
    try:
        saved = read_json_object(path)
    except ValueError:
        saved = None
    if not (isinstance(saved, dict) and isinstance(saved.get("options"), dict) and isinstance(saved.get("recipe"), dict)):
        raise ValueError(f"{path} is truncated or corrupted; it is what {lead.rstrip(': ') or 'a rerun'} compares against, so start a new --out")
    for name, option in options.items():
        if saved["options"].get(name) != now["options"][name]:
            raise ValueError(f"{lead}the {what} in {out} was started {with_option(option, saved['options'].get(name))}, "
                             f"not {with_option(option, now['options'][name])}; {again} the options it was started with")
    was, is_ = _flat(saved["recipe"]), _flat(now["recipe"])
    for key in [*is_, *(k for k in was if k not in is_)]:
        if key != "data.cache_dir" and was.get(key) != is_.get(key):
            raise ValueError(f"{lead}recipe key {key!r} is {as_written(is_.get(key))} but the {what} in {out} was started with "
                             f"{as_written(was.get(key))}; {again} the recipe it was started with")


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def converted_already(folder: Path, source: Path, top_k: int, calibrate: int) -> bool:
    """`folder` is a complete conversion of the MoT checkpoint `source` with these options."""
    try:
        config, report = read_json_object(folder / "config.json"), read_json_object(folder / "conversion_report.json")
    except (OSError, ValueError):
        return False
    calibration = report.get("calibration") or {}
    return isinstance(calibration, dict) and (
        report.get("source") == str(Path(source).resolve())
        and config.get("ffn_type") == "token_choice"
        and config.get("num_experts_per_tok") == top_k
        and config.get("capacity_factor") is None
        and calibration.get("batches", 0) == calibrate
    )


__all__ = ["run_pipeline", "baseline_recipe", "check_started_with", "converted_already"]
