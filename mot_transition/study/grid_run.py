"""Running a study grid (the grid file and its plans: grid.py): every size's sweep, seeds and transitions,
each finished run's results written to the grid's results folder as it ends, so that the grid goes on
from them on another machine.

    OUT/d64/seed-0/KIND-lrX/            a training run (checkpoints: not for committing)
    OUT/d64/seed-0/converted/, transition-Ppct/
    RESULTS/grid.json                   the grid as started: going on with another one is refused, but
                                        for a larger sweep_extend (edge picks then go on)
    RESULTS/d64/seed-0/KIND-lrX.json    a finished training run: its curve and what it was
    RESULTS/d64/seed-0/transition-Ppct.json
    RESULTS/lr.json                     per size, the sweep's losses and each kind's pick

A run whose results file is there is not run again; a MoT run whose transitions are still to do is
trained again when its checkpoint is not on this machine (the same run, bit for bit, on one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..config import as_written
from ..convert import convert_checkpoint, default_top_k
from ..jsonfiles import read_json_object, write_json
from ..pipeline import converted_already
from ..train import latest_checkpoint, prepare_run_data
from ..train.checkpoint import checkpoint_dir
from ..train.loop import TrainingDiverged
from ..transition import load_transition, transition
from .accounting import flops_per_step, training_curve, transition_curve
from .grid import GRID_FILE, HOW_KEYS, KINDS, LR_FILE, Grid, SizePlan, plan_size
from .grid_report import at_edge, write_grid_report
from .runs import machine, train_once


class GridRun:
    """Runs (or goes on with) a grid; `on_result(path, message)` is called after each results file is written."""

    def __init__(self, grid: Grid, out: Path, how=(), progress: bool = True, log=print,
                 on_result: Callable[[Path, str], None] | None = None):
        for override in how:
            if override.partition("=")[0].strip() not in HOW_KEYS:
                raise ValueError(f"a grid takes only overrides of how runs go ({', '.join(HOW_KEYS)}), not {override!r}: "
                                 "what they train is the grid file's")
        self.grid, self.out, self.progress, self.log = grid, Path(out), progress, log
        self.on_result = on_result or (lambda path, message: None)
        self.plans = [plan_size(grid, size, list(how)) for size in grid.sizes]

    def check(self) -> bool:
        """The grid already started in RESULTS must be this one, and the corpus the one it names. One
        change is taken: a larger `sweep_extend` (the sweeps whose pick lies at an edge go on), unless it
        could move a MoT pick whose transitions have run. Returns whether grid.json is to be written
        (new, or grown)."""
        started, write = self.grid.results / GRID_FILE, True
        if started.is_file():
            was, now = read_json_object(started), self.grid.started()
            changed = [k for k in dict.fromkeys([*now, *was]) if was.get(k) != now.get(k)]
            grown = changed == ["sweep_extend"] and isinstance(was.get("sweep_extend"), int) and now["sweep_extend"] > was["sweep_extend"]
            if changed and not grown:
                key = changed[0]
                raise ValueError(f"grid key {key!r} is {as_written(now.get(key))} but the grid in {self.grid.results} was started with "
                                 f"{as_written(was.get(key))}; go on with the grid file it was started with, or choose other results")
            if grown:
                self._check_growth(now["sweep_extend"])
                self.log(f"sweep_extend grows from {was['sweep_extend']} to {now['sweep_extend']}: "
                         "the sweeps whose pick lies at an edge of the rates tried go on")
            write = grown
        wanted = {"source_fingerprint": self.grid.corpus_fingerprint, "tokenizer_hash": self.grid.tokenizer_hash}
        if any(wanted.values()):
            manifest = prepare_run_data(self.plans[0].recipe)[3].manifest
            for key, value in wanted.items():
                if value is not None and manifest.get(key) != value:
                    raise ValueError(f"the corpus {self.plans[0].recipe.data.source} has {key} {manifest.get(key)}, not the grid's "
                                     f"{value}: prepare it with the grid's documented command")
        return write

    def _check_growth(self, extend: int) -> None:
        """A larger sweep_extend may move a MoT pick that lies at an edge; the transitions made from the
        MoT run at the old pick would then stand for the new one: refused where any has run."""
        path = self.grid.results / LR_FILE
        for label, table in (read_json_object(path) if path.is_file() else {}).items():
            mot = table["mot"]
            if at_edge(mot) and len(mot["losses"]) - len(self.grid.sweep) < extend:
                if any((self.grid.results / label).glob("seed-*/transition-*.json")):
                    raise ValueError(f"a larger sweep_extend would try MoT past its pick {mot['lr']:g} at {label}, whose transitions "
                                     f"have run from that pick; start the grid afresh in other results to sweep further")

    def run(self) -> dict:
        """Sweep, then every size and seed (seed 0 of every size first, then the further seeds); one
        grid at a time in OUT and in RESULTS (a second is refused, naming the first)."""
        from ..locks import hold

        with hold(self.out, option="--out"), hold(self.grid.results, option="the grid's results"):
            return self._run()

    def _run(self) -> dict:
        if self.check():
            self.grid.results.mkdir(parents=True, exist_ok=True)
            grown = (self.grid.results / GRID_FILE).is_file()
            self.on_result(write_json(self.grid.results / GRID_FILE, self.grid.started()),
                           f"sweep_extend {self.grid.sweep_extend}" if grown else f"started {self.grid.results}")
        lrs = {}
        for plan in self.plans:
            lrs[plan.size.label] = self.sweep(plan)
            self.transitions(plan, 0, lrs[plan.size.label]["mot"])
        for index in range(1, max(s.seeds for s in self.grid.sizes)):
            for plan in self.plans:
                if index < plan.size.seeds:
                    self.seed(plan, index, lrs[plan.size.label])
        report = write_grid_report(self.grid.results)
        self.on_result(report.parent, "the report of the whole grid")
        return lrs

    def sweep(self, plan: SizePlan) -> dict[str, float]:
        """Each kind at the sweep's learning rates (this size, first seed), extended past an edge
        while the best is there; writes this size's entry of RESULTS/lr.json. Returns {kind: the
        learning rate picked}."""
        picked, table = {}, {}
        for kind in KINDS:
            values, extended = list(self.grid.sweep), 0
            while True:
                losses = {lr: self.train(plan, kind, lr, 0, sweep=True)["final_loss"] for lr in values}
                finite = {lr: loss for lr, loss in losses.items() if loss is not None}
                if not finite:
                    raise ValueError(f"every learning rate of the sweep diverged for {kind}; give smaller ones in 'sweep'")
                best = min(finite, key=finite.get)
                if extended >= self.grid.sweep_extend or best not in (values[0], values[-1]):
                    break
                values = [values[0] ** 2 / values[1], *values] if best == values[0] else [*values, values[-1] ** 2 / values[-2]]
                values = [float(f"{v:.3g}") for v in values]
                extended += 1
            picked[kind] = best
            table[kind] = {"lr": best, "losses": {f"{lr:g}": losses[lr] for lr in values}}
        path = self.grid.results / LR_FILE
        every = read_json_object(path) if path.is_file() else {}
        if every.get(plan.size.label) != table:
            write_json(path, {**every, plan.size.label: table})
            self.on_result(path, f"learning-rate sweep at {plan.size.label}: " + ", ".join(f"{k} {v:g}" for k, v in picked.items()))
        return picked

    def seed(self, plan: SizePlan, index: int, lrs: dict[str, float]) -> None:
        """A further seed: MoT and at once its transitions, from its checkpoint on this machine (a machine
        replaced in between would train MoT again, and another machine's rounding makes another sample of
        it: docs/transition.md), then dense and Token Choice from scratch."""
        self.train(plan, "mot", lrs["mot"], index)
        self.transitions(plan, index, lrs["mot"])
        for kind in ("dense", "token_choice"):
            self.train(plan, kind, lrs[kind], index)

    def _paths(self, plan: SizePlan, index: int, name: str) -> tuple[Path, Path]:
        where = Path(plan.size.label) / f"seed-{index}"
        return self.out / where / name, self.grid.results / where / f"{name}.json"

    def train(self, plan: SizePlan, kind: str, lr: float, index: int, sweep: bool = False, again: bool = False) -> dict:
        """One training run's results, read back when they are there (unless `again`: its checkpoint is needed)."""
        recipe = plan.kind_recipe(kind, lr, index)
        run_dir, result = self._paths(plan, index, f"{kind}-lr{lr:g}")
        if result.is_file() and not again:
            return read_json_object(result)
        what = f"[{plan.size.label} seed {index}{' sweep' if sweep else ''}] {kind} at lr {lr:g}"
        try:
            train_once(recipe, run_dir, self.progress, self.log, what)
        except TrainingDiverged as error:
            if not sweep:
                raise
            record = {"kind": kind, "lr": lr, "seed": recipe.seed, "final_loss": None, "diverged": str(error)}
        else:
            curve = training_curve(run_dir)
            record = {
                "kind": kind, "lr": lr, "seed": recipe.seed, "n_embd": plan.size.n_embd, "steps": recipe.train.steps,
                "tokens": recipe.train.steps * recipe.train.batch_size * recipe.data.seq_len,
                "non_embedding_parameters_dense": plan.parameters,
                "flops_per_step": flops_per_step(recipe.model_config(), recipe.train.batch_size, recipe.data.seq_len),
                "final_loss": curve[-1]["loss"], "curve": curve, "recipe": recipe.to_dict(), "machine": machine(),
            }
        if result.is_file():  # trained again for its checkpoint: the results must be the same run's
            recorded = read_json_object(result)
            if recorded.get("final_loss") != record["final_loss"]:
                self.log(f"note: {run_dir} trained again ended at {record['final_loss']}, not the recorded "
                         f"{recorded.get('final_loss')} (another machine or library version)")
            return recorded
        result.parent.mkdir(parents=True, exist_ok=True)
        write_json(result, record)
        loss = "diverged" if record["final_loss"] is None else f"held-out loss {record['final_loss']:.4f}"
        self.on_result(result, f"{plan.size.label} seed {index}: {kind} at lr {lr:g} ({loss})")
        return record

    def transitions(self, plan: SizePlan, index: int, lr: float) -> None:
        pending = {label: steps for label, steps in plan.transitions.items() if not self._paths(plan, index, f"transition-{label}")[1].is_file()}
        if not pending:
            return
        mot_dir, _ = self._paths(plan, index, f"mot-lr{lr:g}")
        checkpoint = checkpoint_dir(mot_dir, plan.recipe.train.steps)
        mot = self.train(plan, "mot", lr, index, again=latest_checkpoint(mot_dir) != checkpoint)
        recipe = plan.kind_recipe("mot", lr, index)
        k = default_top_k(recipe.model_config())
        converted = self._paths(plan, index, "converted")[0]
        if not converted_already(converted, checkpoint, k, 0):
            self.log(f"[{plan.size.label} seed {index}] converting MoT to Token Choice (top-{k}) -> {converted}")
            convert_checkpoint(checkpoint, converted, num_experts_per_tok=k, force=True)
        for label, steps in pending.items():
            run, result = self._paths(plan, index, f"transition-{label}")
            self.log(f"[{plan.size.label} seed {index}] transition tuning for {steps} steps -> {run}")
            transition(converted, steps, run, progress=self.progress, resume=True)
            done = load_transition(run)
            record = {
                "label": label, "steps": steps, "seed": recipe.seed, "n_embd": plan.size.n_embd, "lr": done.lr,
                "pre_switch_loss": done.pre_switch_loss, "mot_unbatched_loss": done.mot_unbatched_loss,
                "post_switch_loss": done.post_switch_loss, "final_loss": done.final_loss,
                "recovery_step": done.full_recovery_step, "curve": transition_curve(run, mot["curve"][-1]), "machine": machine(),
            }
            result.parent.mkdir(parents=True, exist_ok=True)
            write_json(result, record)
            self.on_result(result, f"{plan.size.label} seed {index}: MoT -> Token Choice, {label.replace('pct', '%')} "
                                   f"(held-out loss {done.final_loss:.4f})")


def git_committer(results: Path) -> Callable[[Path, str], None]:
    """An `on_result` that commits each results file as it is written (`study GRID --commit`), so
    that the grid can go on from them on another machine. `results` must lie in a git work tree."""
    import subprocess

    where = results if results.is_dir() else results.parent
    while not where.is_dir():
        where = where.parent
    probe = subprocess.run(["git", "-C", str(where), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise ValueError(f"--commit: {results} does not lie in a git work tree")

    def commit(path: Path, message: str) -> None:
        top = probe.stdout.strip()
        for command in (["add", "--", str(path.resolve())], ["commit", "-q", "-m", f"study grid: {message}", "--", str(path.resolve())]):
            done = subprocess.run(["git", "-C", top, *command], capture_output=True, text=True)
            if done.returncode != 0:  # never lose a run for a commit: the file is written, commit it by hand
                print(f"warning: git {command[0]} of {path} failed: {done.stderr.strip() or done.stdout.strip()}")
                return

    return commit


__all__ = ["GridRun", "git_committer"]
