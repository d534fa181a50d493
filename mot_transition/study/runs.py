"""The runs of a study, seed by seed, each done once: a stage whose final artifact is there is
kept, a stopped one continues from its newest checkpoint (`train`'s and `transition`'s resume).

    OUT/study.json                 the recipe and options the study was started with
    OUT/seed-I/dense/              dense, the MoT model's shape and active FLOPs, N steps
    OUT/seed-I/mot/                MoT (the recipe), N steps
    OUT/seed-I/token_choice/       Token Choice from scratch, the MoT model's shape, N + the longest
                                   transition's steps (design.md §10.2's baseline for it)
    OUT/seed-I/converted/          the MoT model converted, default top-k, no calibration
    OUT/seed-I/transition-Ppct/    the converted model transition-tuned for P% of N
    OUT/seed-I/spike.json          the loss right after the switch, no training: top-k 1, 2, 4
                                   (and the default), without and with calibration
    OUT/seed-I/mot-TX/, mot-TX.json  MoT at controller temperature X, and its switch losses

Seed I trains with the recipe's seed + I. Every model is evaluated on the recipe's fixed held-out
batches: MoT grouped as it trained (the pre-switch loss) and with group_size=1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint_io import load_checked
from ..convert import convert_checkpoint, convert_model, default_top_k
from ..data import heldout_batches
from ..jsonfiles import read_json_object, write_json
from ..locks import writes
from ..options import check_options
from ..pipeline import baseline_recipe, check_started_with, converted_already
from ..train import Recipe, evaluate, latest_checkpoint, load_recipe, prepare_run_data, train
from ..train.checkpoint import checkpoint_dir
from ..train.recipe import RECIPE_RULES
from ..transition import (
    TRANSITION_FILE, calibration_batches, check_calibration, check_heldout_groups, load_transition, mot_losses, transition,
)
from .accounting import training_curve, transition_curve
from .plots import write_plots
from .report import write_report

STUDY_FILE = "study.json"
OPTIONS = {"seeds": "--seeds", "transitions": "--transitions", "temperatures": "--temperatures", "calibrate": "--calibrate"}
SPIKE_TOP_K = (1, 2, 4)


@dataclass
class Plan:
    """What a study runs, every option checked."""

    recipe: Recipe  # the MoT recipe; its seed is the first seed's
    seeds: int
    transitions: dict[str, int]  # "5pct" -> fine-tuning steps
    temperatures: list[float]  # further MoT controller temperatures (the recipe's own is the MoT run)
    calibrate: int  # calibration batches of the spike's calibrated conversions (0: none)

    @property
    def top_k(self) -> int:
        return default_top_k(self.recipe.model_config())

    @property
    def spike_top_k(self) -> list[int]:
        experts = self.recipe.model.n_expert
        return sorted({k for k in SPIKE_TOP_K if k <= experts} | {self.top_k})

    @property
    def baseline_steps(self) -> int:
        return self.recipe.train.steps + max(self.transitions.values())

    def seed_recipe(self, index: int) -> Recipe:
        return dataclasses.replace(self.recipe, seed=self.recipe.seed + index)

    def started(self) -> dict:
        """What study.json records, as JSON reads it back."""
        options = {"seeds": self.seeds, "transitions": [float(label.removesuffix("pct")) for label in self.transitions],
                   "temperatures": self.temperatures, "calibrate": self.calibrate}
        return json.loads(json.dumps({"recipe": self.recipe.to_dict(), "options": options}))


def dense_recipe(recipe: Recipe) -> Recipe:
    """The dense model of the MoT recipe's shape whose FFN costs what a MoT token's experts cost:
    E/g experts of expert_size, i.e. width E * expert_size / g. With flop-matched experts (no
    expert_size in the recipe) that is the default width, 4d (8d/3 for SwiGLU), as tiny-dense is
    to tiny; an explicit expert_size sets the dense width (in every block) to match it."""
    m = recipe.model
    n_inner = m.n_inner if m.expert_size is None else round(m.n_expert * m.expert_size / m.group_size)
    model = dataclasses.replace(m, ffn_type="dense", n_inner=n_inner)
    return dataclasses.replace(recipe, name=f"{recipe.name}-dense", model=model)


def temperature_recipe(recipe: Recipe, temperature: float) -> Recipe:
    model = dataclasses.replace(recipe.model, mot_temperature=temperature)
    return dataclasses.replace(recipe, name=f"{recipe.name}-T{temperature:g}", model=model)


def plan_study(recipe: str | Path, overrides=(), seeds: int = 3, transitions=(5, 10, 20), temperatures=(0.5, 2.0),
               calibrate: int = 4) -> Plan:
    """Check the recipe and every option before anything runs; one-line ValueErrors."""
    check_options(seeds=seeds, transitions=list(transitions), temperatures=list(temperatures), calibrate=calibrate)
    mot = load_recipe(recipe, overrides)
    if mot.model.ffn_type != "mot":
        raise ValueError(f"a study starts from a MoT recipe; {recipe} has model.ffn_type={mot.model.ffn_type!r}")
    if mot.train.switch_at_step is not None:
        raise ValueError("a study converts after the MoT run; remove train.switch_at_step (that is the in-run switch of `train`)")
    if not transitions:
        raise ValueError("--transitions needs at least one length (percent of the MoT steps, e.g. 5,10,20)")
    RECIPE_RULES["seed"].check(f"the last seed (seed {mot.seed} + --seeds {seeds} - 1)", mot.seed + seeds - 1)
    lengths: dict[str, int] = {}
    for percent in sorted(float(p) for p in transitions):
        steps = max(1, round(percent / 100 * mot.train.steps))
        label = f"{percent:g}pct"
        same = next((other for other, s in lengths.items() if s == steps), None)
        if same is not None:
            raise ValueError(f"--transitions {same.removesuffix('pct')} and {percent:g} are both {steps} step{'s' if steps > 1 else ''} of train.steps="
                             f"{mot.train.steps}; give lengths that differ in steps")
        lengths[label] = steps
    config = mot.model_config()
    check_heldout_groups(mot.data.eval_batch_size * mot.data.eval_batches, config.group_size)
    others = sorted({float(t) for t in temperatures} - {float(mot.model.mot_temperature)})
    plan = Plan(mot, seeds, lengths, others, calibrate)
    for other in (dense_recipe(mot), baseline_recipe(mot, plan.top_k, plan.baseline_steps), *(temperature_recipe(mot, t) for t in others)):
        other.model_config()  # a shape that cannot be built is refused now, not after the first runs
    return plan


@writes(lambda a: Path(a["out_dir"]) if a["out_dir"] is not None else Path("runs") / f"{load_recipe(a['recipe'], a['overrides']).name}-study")
def run_study(
    recipe: str | Path = "tiny",
    out_dir: str | Path | None = None,
    overrides=(),
    seeds: int = 3,
    transitions=(5, 10, 20),
    temperatures=(0.5, 2.0),
    calibrate: int = 4,
    progress: bool = True,
    log=print,
) -> dict:
    """Run (or go on with) every run of every seed into OUT, then write OUT/results.json,
    OUT/report.md and the plots. Returns {"out", "report", "plots" (None without matplotlib),
    "results" (each seed's: see `seed_results`)}."""
    plan = plan_study(recipe, overrides, seeds, transitions, temperatures, calibrate)
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"{plan.recipe.name}-study"
    started = plan.started()
    if out.exists() and any(out.iterdir()):
        if not (out / STUDY_FILE).is_file():
            raise FileExistsError(f"{out} is not empty and holds no {STUDY_FILE}, so it is not a study to go on with; choose another --out")
        check_started_with(out / STUDY_FILE, started, OPTIONS, what="study", lead="", again="run it again with")
    if plan.calibrate:  # the data is prepared (and cached for the runs) first
        check_calibration(plan.recipe, prepare_run_data(plan.recipe)[1], plan.calibrate)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / STUDY_FILE).is_file():
        write_json(out / STUDY_FILE, started)
    results = [run_seed(plan, index, out / f"seed-{index}", progress, log) for index in range(plan.seeds)]
    results = json.loads(json.dumps(results))  # as results.json holds them (string keys)
    plots = write_plots(out, results)
    return {"out": out, "report": write_report(out, started, results, plots), "plots": plots, "results": results}


def run_seed(plan: Plan, index: int, folder: Path, progress: bool, log) -> dict:
    """Every run of one seed, then its results."""
    recipe = plan.seed_recipe(index)
    stages = 5 + len(plan.transitions) + len(plan.temperatures)
    count = iter(range(1, stages + 1))

    def say(text: str) -> None:
        log(f"[seed {recipe.seed} ({index + 1}/{plan.seeds}), {next(count)}/{stages}] {text}")

    n, k = recipe.train.steps, plan.top_k
    train_once(dense_recipe(recipe), folder / "dense", progress, say, "dense")
    mot = train_once(recipe, folder / "mot", progress, say, "MoT")
    train_once(baseline_recipe(recipe, k, plan.baseline_steps), folder / "token_choice", progress, say, "Token Choice from scratch")
    converted = folder / "converted"
    if converted_already(converted, mot, k, 0):
        say(f"converted to Token Choice (top-{k}) already: {converted} kept")
    else:
        say(f"converting MoT to Token Choice (top-{k}) -> {converted}")
        convert_checkpoint(mot, converted, num_experts_per_tok=k, force=True)
    for label, steps in plan.transitions.items():
        run = folder / f"transition-{label}"
        if (run / TRANSITION_FILE).is_file() and load_transition(run).steps == steps:
            say(f"transition tuning for {steps} steps ({label.replace('pct', '%')} of {n}) finished already: {run} kept")
        else:
            say(f"transition tuning for {steps} steps ({label.replace('pct', '%')} of {n}) -> {run}")
            transition(converted, steps, run, progress=progress, resume=True)
    measure_once(folder / "spike.json", say, f"the loss at the switch, top-k {', '.join(map(str, plan.spike_top_k))}",
                 lambda: switch_losses(mot, recipe, plan.spike_top_k, plan.calibrate))
    for temperature in plan.temperatures:
        other = temperature_recipe(recipe, temperature)
        name = f"mot-T{temperature:g}"
        checkpoint = train_once(other, folder / name, progress, say, f"MoT at temperature {temperature:g}")
        measure_once(folder / f"{name}.json", None, "", lambda: switch_losses(checkpoint, other, [k], 0))
    return seed_results(plan, recipe, folder)


def machine() -> dict:
    """Where a run was trained, for its results file: float rounding differs between CPUs (their math
    libraries pick other kernels), so the same run on another machine is another sample of it."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import transformers

    return {"cpu": cpu, "cpus": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "transformers": transformers.__version__}


def train_once(recipe: Recipe, run_dir: Path, progress: bool, say, what: str) -> Path:
    """The final checkpoint of `recipe` trained into `run_dir`: kept when it is there (the run
    finished), else trained, continuing from the run's newest checkpoint if it has one."""
    final = checkpoint_dir(run_dir, recipe.train.steps)
    if latest_checkpoint(run_dir) == final:
        say(f"{what}: {recipe.train.steps} steps finished already: {run_dir} kept")
        return final
    say(f"training {what} ({recipe.train.steps} steps) -> {run_dir}")
    return train(recipe, run_dir, resume=True, progress=progress).checkpoint


def measure_once(path: Path, say, what: str, measure) -> dict:
    """The measurement kept in `path`, or made now and written there."""
    if path.is_file():
        if say:
            say(f"{what}: measured already ({path})")
        return read_json_object(path)
    if say:
        say(f"measuring {what} -> {path}")
    return read_json_object(write_json(path, measure()))


def heldout_sequences(recipe: Recipe) -> torch.Tensor:
    """The recipe's fixed held-out batches, concatenated: what every run of it evaluates on."""
    _, _, heldout, _ = prepare_run_data(recipe)
    return torch.cat(heldout_batches(heldout, recipe.data.eval_batch_size, recipe.data.eval_batches))


def switch_losses(checkpoint: Path, recipe: Recipe, top_ks: list[int], calibrate: int) -> dict:
    """A MoT checkpoint's pre-switch loss (grouped), its loss with group_size=1, and the loss of its
    Token Choice conversion at each top-k before any training, without and (with `calibrate`
    batches) with the calibration scales: {"pre_switch_loss", "mot_unbatched_loss",
    "calibration_batches", "top_k": {k: {"plain", "calibrated", "scales"}}}."""
    heldout = heldout_sequences(recipe)
    pre, unbatched = mot_losses(Path(checkpoint), recipe, heldout)
    model = load_checked(checkpoint)
    batches = calibration_batches(checkpoint, calibrate) if calibrate else None
    rows = {}
    for k in top_ks:
        row = {"plain": evaluate(convert_model(model, k)[0], heldout, recipe.data.eval_batch_size)}
        if batches is not None:
            tc_model, report = convert_model(model, k, calibration=batches)
            row["calibrated"] = evaluate(tc_model, heldout, recipe.data.eval_batch_size)
            row["scales"] = {str(layer): scale for layer, scale in report.calibration["scales"].items()}
        rows[str(k)] = row
    return {"pre_switch_loss": pre, "mot_unbatched_loss": unbatched, "calibration_batches": calibrate, "top_k": rows}


def seed_results(plan: Plan, recipe: Recipe, folder: Path) -> dict:
    """One seed's numbers, read back from its finished runs: the curves of every run on the three
    axes (a transition's continuing the MoT run's), the switch losses, each transition's
    recovery, and the temperature runs."""
    curves = {name: training_curve(folder / name) for name in ("dense", "mot", "token_choice")}
    spike = read_json_object(folder / "spike.json")
    transitions = {}
    for label, steps in plan.transitions.items():
        run = folder / f"transition-{label}"
        result = load_transition(run)
        curves[f"transition-{label}"] = transition_curve(run, curves["mot"][-1])
        transitions[label] = {
            "steps": steps, "post_switch_loss": result.post_switch_loss, "final_loss": result.final_loss,
            "recovery_step": result.full_recovery_step,  # back at or below the pre-switch loss
            "spec_recovery_step": result.recovery_step,  # within 2% of it (design.md §10.2)
        }
    own = f"{recipe.model.mot_temperature:g}"
    temperatures = {own: {"grouped": spike["pre_switch_loss"], "unbatched": spike["mot_unbatched_loss"],
                          "converted": spike["top_k"][str(plan.top_k)]["plain"]}}
    for temperature in plan.temperatures:
        name = f"mot-T{temperature:g}"
        losses = read_json_object(folder / f"{name}.json")
        curves[name] = training_curve(folder / name)
        temperatures[f"{temperature:g}"] = {"grouped": losses["pre_switch_loss"], "unbatched": losses["mot_unbatched_loss"],
                                           "converted": losses["top_k"][str(plan.top_k)]["plain"]}
    return {
        "seed": recipe.seed, "top_k": plan.top_k, "mot_temperature": recipe.model.mot_temperature, "curves": curves,
        "pre_switch_loss": spike["pre_switch_loss"], "mot_unbatched_loss": spike["mot_unbatched_loss"],
        "spike": spike["top_k"], "transitions": transitions, "temperatures": temperatures,
    }


__all__ = ["Plan", "plan_study", "run_study", "dense_recipe", "temperature_recipe", "switch_losses", "STUDY_FILE"]
