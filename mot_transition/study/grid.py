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

`GridRun` (grid_run.py) runs it, and says where every run and results file goes.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Rule
from ..convert import default_top_k
from ..pipeline import baseline_recipe
from ..train import Recipe, load_recipe, resolve_recipe_path
from ..train.recipe import is_grid_toml
from .runs import dense_recipe

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


def grid_file(path: str | Path) -> Path | None:
    """The grid file `path` names (a .toml path, or a built-in name such as `study-data-rich`): a file
    with a grid's own keys ([[size]] tables, `sweep` or `results`; a recipe has none). None for a recipe."""
    try:
        path = resolve_recipe_path(path)
    except FileNotFoundError:
        return None
    return path if path.suffix == ".toml" and is_grid_toml(path) else None


def is_grid_file(path: str | Path) -> bool:
    return grid_file(path) is not None


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


__all__ = ["Grid", "Size", "SizePlan", "load_grid", "grid_file", "is_grid_file", "plan_size", "non_embedding_parameters", "KINDS"]
