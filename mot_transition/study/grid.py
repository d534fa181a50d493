"""A study grid: the study at several model sizes in the data-rich regime, each model kind trained
at its own best learning rate, every finished run's results kept in a folder meant to be committed,
so that the grid goes on from them on another machine.

A grid file (TOML) names a MoT recipe and what varies around it (recipes/study-data-rich.toml):

    recipe = "tiny"                    # the MoT recipe every size starts from
    overrides = ["data.source='runs/corpora/linux-6.1-c'"]  # applied to every run of the grid
    corpus_fingerprint = "..."         # optional: the prepared corpus must be this one (its manifest's
    tokenizer_hash = "..."             # source_fingerprint and tokenizer_hash)
    results = "docs/study-data-rich"   # where each finished run's results go (relative to the cwd)
    transitions = [5, 10]              # MoT -> Token Choice transition lengths, % of a size's MoT steps
    evaluations = 40                   # held-out evaluations per run
    warmup_fraction = 0.02             # warmup steps, a fraction of a run's steps
    sweep = [1e-3, 3e-3, 1e-2]         # learning rates tried per kind, at every size, first seed
    sweep_extend = 2                   # further values (the same factor apart) while the best is at an edge

    [[size]]                           # one table a size
    n_embd = 64
    tokens_per_parameter = 200         # training tokens per non-embedding parameter of the dense model
    seeds = 3

Every size trains dense, MoT and Token Choice from scratch (the MoT model's shape, N + the longest
transition's steps, as `study` does), each kind at the learning rate its sweep picked at that size
(seed 0 trains at every rate of the sweep, so the sweep's runs are seed 0's runs), and
transition-tunes the MoT model converted to Token Choice for each length; a transition's learning
rate is the MoT run's final one. Seed 0 of every size comes first, then the further seeds.

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

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import Rule, as_written
from ..convert import convert_checkpoint, default_top_k
from ..jsonfiles import read_json_object, write_json
from ..pipeline import baseline_recipe, converted_already
from ..train import Recipe, latest_checkpoint, load_recipe, prepare_run_data
from ..train.checkpoint import checkpoint_dir
from ..train.loop import TrainingDiverged
from ..transition import load_transition, transition
from .accounting import flops_per_step, training_curve, transition_curve
from .grid_report import at_edge, write_grid_report
from .runs import dense_recipe, machine, train_once

KINDS = ("dense", "mot", "token_choice")
GRID_FILE, LR_FILE = "grid.json", "lr.json"
# the keys of a grid file, each with its rule (None: a list of strings; checked below)
KEYS: dict[str, Rule | None] = {
    "recipe": Rule(str), "overrides": None, "corpus_fingerprint": Rule(str), "tokenizer_hash": Rule(str), "results": Rule(str),
    "transitions": Rule(list, item=float, low=0, low_open=True), "evaluations": Rule(int, low=1),
    "warmup_fraction": Rule(float, low=0, high=1), "sweep": Rule(list, item=float, low=0, low_open=True),
    "sweep_extend": Rule(int, low=0), "size": None,
}
SIZE_KEYS = {"n_embd": Rule(int, low=1), "tokens_per_parameter": Rule(float, low=0, low_open=True), "seeds": Rule(int, low=1)}
# recipe keys a command line may set for every run without making it another grid: how fast, not what
HOW_KEYS = ("train.threads", "train.device", "train.log_every", "data.cache_dir")


@dataclass
class Size:
    n_embd: int
    tokens_per_parameter: float
    seeds: int

    @property
    def label(self) -> str:
        return f"d{self.n_embd}"


@dataclass
class Grid:
    recipe: str
    results: Path
    sizes: list[Size]
    sweep: list[float]
    overrides: list[str] = dataclasses.field(default_factory=list)
    transitions: list[float] = dataclasses.field(default_factory=lambda: [5.0, 10.0])
    evaluations: int = 40
    warmup_fraction: float = 0.02
    sweep_extend: int = 2
    corpus_fingerprint: str | None = None
    tokenizer_hash: str | None = None

    def started(self) -> dict:
        """What grid.json records: the grid as its file gave it, less where its results go."""
        fields = dataclasses.asdict(self)
        del fields["results"]
        return fields


def is_grid_file(path: str | Path) -> bool:
    """A .toml file with a grid's own keys ([[size]] tables, `sweep` or `results`; a recipe has none)."""
    path = Path(path)
    if path.suffix != ".toml" or not path.is_file():
        return False
    try:
        return bool({"size", "sweep", "results"} & set(tomllib.loads(path.read_text())))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        return False


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file; a one-line ValueError names the key that is wrong."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"grid {path} is not valid TOML: {error}") from None
    for key, value in raw.items():
        if key not in KEYS:
            raise ValueError(f"grid {path}: unknown key {key!r} (known: {', '.join(KEYS)})")
        if KEYS[key] is not None:
            raw[key] = KEYS[key].read(f"grid key {key!r}", value)  # one value for a list: [value]
    for key in ("recipe", "results", "size", "sweep"):
        if key not in raw:
            raise ValueError(f"grid {path} has no {key!r}")
    overrides = raw.get("overrides", [])
    overrides = [overrides] if isinstance(overrides, str) else overrides
    if not (isinstance(overrides, list) and all(isinstance(o, str) for o in overrides)):
        raise ValueError(f"grid {path}: 'overrides' must be a list of KEY=VALUE strings")
    if not (isinstance(raw["size"], list) and raw["size"] and all(isinstance(s, dict) for s in raw["size"])):
        raise ValueError(f"grid {path}: 'size' must be one or more [[size]] tables")
    sizes = []
    for i, table in enumerate(raw["size"]):
        for key in SIZE_KEYS:
            if key not in table:
                raise ValueError(f"grid {path}: [[size]] number {i + 1} has no {key!r}")
        for key, value in table.items():
            if key not in SIZE_KEYS:
                raise ValueError(f"grid {path}: [[size]] number {i + 1}: unknown key {key!r} (known: {', '.join(SIZE_KEYS)})")
            SIZE_KEYS[key].check(f"[[size]] {key!r}", value)
        sizes.append(Size(table["n_embd"], float(table["tokens_per_parameter"]), table["seeds"]))
    if len({s.n_embd for s in sizes}) < len(sizes):
        raise ValueError(f"grid {path}: two [[size]] tables have the same n_embd")
    if len(raw["sweep"]) < 2 or len(set(raw["sweep"])) < len(raw["sweep"]):
        raise ValueError(f"grid {path}: 'sweep' needs two or more different learning rates")
    transitions = sorted(float(t) for t in raw.get("transitions", [5, 10]))
    if not transitions:
        raise ValueError(f"grid {path}: 'transitions' needs at least one length")
    return Grid(recipe=raw["recipe"], results=Path(raw["results"]), sizes=sizes, sweep=sorted(float(v) for v in raw["sweep"]),
                overrides=overrides, transitions=transitions, evaluations=raw.get("evaluations", 40),
                warmup_fraction=float(raw.get("warmup_fraction", 0.02)), sweep_extend=raw.get("sweep_extend", 2),
                corpus_fingerprint=raw.get("corpus_fingerprint"), tokenizer_hash=raw.get("tokenizer_hash"))


def non_embedding_parameters(config) -> int:
    """Parameters outside the token and position embeddings (and the LM head tied to them)."""
    from ..modeling import MoTLMHeadModel

    with torch.device("meta"):
        model = MoTLMHeadModel(config)
    embeddings = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) for p in m.parameters()}
    embeddings |= {id(p) for name, p in model.named_parameters() if name.endswith("wpe.weight")}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


@dataclass
class SizePlan:
    """One size's MoT recipe (steps, warmup, evaluations set from the grid) and its derived numbers."""

    size: Size
    recipe: Recipe
    parameters: int  # non-embedding parameters of the dense model of this shape
    transitions: dict[str, int]  # "5pct" -> steps

    @property
    def tokens(self) -> int:
        return self.recipe.train.steps * self.recipe.train.batch_size * self.recipe.data.seq_len

    def kind_recipe(self, kind: str, lr: float, seed_index: int) -> Recipe:
        mot = dataclasses.replace(self.recipe, seed=self.recipe.seed + seed_index, optim=dataclasses.replace(self.recipe.optim, lr=lr))
        if kind == "dense":
            return dense_recipe(mot)
        if kind == "token_choice":
            return baseline_recipe(mot, default_top_k(mot.model_config()), mot.train.steps + max(self.transitions.values()))
        return mot


def plan_size(grid: Grid, size: Size, how: list[str]) -> SizePlan:
    base = load_recipe(grid.recipe, [*grid.overrides, *how, f"model.n_embd={size.n_embd}"])
    if base.model.ffn_type != "mot":
        raise ValueError(f"a grid starts from a MoT recipe; {grid.recipe} has model.ffn_type={base.model.ffn_type!r}")
    parameters = non_embedding_parameters(dense_recipe(base).model_config())
    steps = math.ceil(size.tokens_per_parameter * parameters / (base.train.batch_size * base.data.seq_len))
    every = math.ceil(steps / grid.evaluations)
    steps = every * grid.evaluations  # the last step is an evaluation
    train = dataclasses.replace(base.train, steps=steps, eval_every=every, checkpoint_every=every * 5, keep_checkpoints=1)
    optim = dataclasses.replace(base.optim, warmup_steps=max(1, round(grid.warmup_fraction * steps)))
    recipe = dataclasses.replace(base, name=f"{base.name}-{size.label}", train=train, optim=optim)
    transitions = {f"{p:g}pct": max(1, round(p / 100 * steps)) for p in grid.transitions}
    if len(set(transitions.values())) < len(transitions):
        raise ValueError(f"grid: two transition lengths are the same number of steps at {size.label} ({steps} steps)")
    plan = SizePlan(size, recipe, parameters, transitions)
    for kind in KINDS:
        plan.kind_recipe(kind, 1e-3, 0).model_config()  # a shape that cannot be built is refused before any run
    return plan


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


__all__ = ["Grid", "Size", "SizePlan", "GridRun", "git_committer", "load_grid", "is_grid_file", "plan_size", "non_embedding_parameters", "KINDS"]
