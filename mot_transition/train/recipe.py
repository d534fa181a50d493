"""Training recipes: a TOML file, typed by the dataclasses below, with `key=value` overrides.

A recipe has top-level keys (`name`, `seed`) and four sections, `[model]`, `[data]`, `[optim]`,
`[train]`. Every field has a default, so a recipe file only states what differs. Overrides on the
command line use dotted keys for sections (`train.steps=100`, `model.group_size=16`, `seed=1`)
and their values are TOML literals (`optim.lr=3e-4`, `model.moe_layers=[2,3]`,
`data.source="corpus.txt"`); a value that is not a TOML literal is taken as a string, and `none`
sets an optional field back to None. A key that takes a list takes one item alone as the list of
it, in a file as on the command line (`train.report_to=tensorboard`, `model.moe_layers=3`).

Anything wrong (an unknown key, a value of the wrong type, a value that cannot work) raises a
ValueError of one line that names the key. The `[model]` section is checked by building the
`MoTConfig` it describes.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..config import AT_LEAST_ZERO, MODEL_RULES, POSITIVE, POSITIVE_INT, PROBABILITY, Rule, as_written
from ..options import VOCAB_SIZE
from .tracking import check_report_to

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class ModelRecipe:
    """The `MoTConfig` fields a recipe may set (docs/design.md §7.1). Defaults are MoTConfig's.

    `vocab_size` is not here: it is the size of the tokenizer trained for `[data]`.
    `n_positions=None` means the data's `seq_len`.
    """

    ffn_type: str = "mot"
    block: str = "gpt2"  # "gpt2" or "llama" (RMSNorm, rotary positions, SwiGLU, qk_norm; exports to Qwen3)
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # dense FFN width; None = 4 * n_embd ("gpt2"), 8/3 * n_embd ("llama")
    n_positions: int | None = None  # None = data.seq_len
    moe_layers: list[int] | None = None  # None = the second half of the blocks
    n_expert: int = 32
    group_size: int = 32
    expert_size: int | None = None  # None = flop-matched, 4 * n_embd * group_size / n_expert (2/3 of it for SwiGLU)
    mot_temperature: float = 1.0
    emit_softmax_over_experts: bool = False
    use_discrete_routing: bool = False
    num_experts_per_tok: int = 1
    capacity_factor: float | None = None  # None = dropless
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    router_bias_update_rate: float = 0.0  # Token Choice balancing by a selection bias (DeepSeek-V3); 0 = off
    activation_function: str | None = None  # None = "relu" ("gpt2"), "silu" ("llama")
    rope_theta: float = 10000.0
    qk_norm: bool | None = None  # None = on for "llama"
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True


@dataclass
class DataRecipe:
    """Corpus, tokenizer and sequences (see `mot_transition.data`)."""

    source: str = "stdlib"  # "stdlib" (built-in corpus) or a path: text file, folder, JSONL, parquet
    text_field: str = "text"  # the field holding the text in JSONL / parquet
    heldout_fraction: float = 0.05
    max_bytes: int | None = None  # cap on the corpus size read, None = all of it
    vocab_size: int = 4096  # byte-level BPE vocabulary to train
    seq_len: int = 256
    eval_batches: int = 8  # fixed held-out batches evaluated every `train.eval_every` steps
    eval_batch_size: int = 32
    cache_dir: str | None = None  # tokenizer / token cache; None = the data module's default


@dataclass
class OptimRecipe:
    """AdamW with linear warmup, then cosine decay to `final_lr_fraction * lr`."""

    lr: float = 7e-4
    weight_decay: float = 0.1  # applied to matrices only (no biases, no LayerNorm gains)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 2500
    final_lr_fraction: float = 0.1
    grad_clip: float = 0.5  # max global gradient norm; 0 = no clipping


@dataclass
class TrainRecipe:
    """The loop: how many steps, how big a batch, how often to evaluate and save."""

    steps: int = 1000
    batch_size: int = 256  # sequences per optimizer step, summed over all ranks
    micro_batch_size: int = 0  # sequences per forward pass on one rank; 0 = batch_size / (grad_accum x world_size)
    grad_accum: int = 0  # micro-batches accumulated per optimizer step on each rank; 0 = batch_size / (micro_batch_size x world_size)
    eval_every: int = 100
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    precision: str = "auto"  # "auto" = bf16 autocast on CUDA with bf16 support, float32 otherwise
    device: str = "auto"  # "auto" = cuda if available, else cpu; or "cpu", "cuda", ...
    log_every: int = 10  # progress bar refresh and expert-load measurement; every step is written to metrics.jsonl anyway
    # where per-step metrics go: "jsonl" (metrics.jsonl, always), "tensorboard", "trackio", "wandb" (offline)
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])
    threads: int = 0  # torch CPU threads of this process (torch.set_num_threads); 0 = torch's default
    compile: bool = False  # torch.compile the model's forward (and so its backward); the first steps compile
    # under torchrun: "ddp" (every process holds every weight), "fsdp" (FSDP2: parameters, gradients and
    # optimizer state sharded over the processes; train/sharding.py) or "hsdp" (sharded over the
    # processes of one node, replicated across nodes)
    parallel: str = "ddp"
    # under torchrun with "ddp": processes that share out each expert layer's experts, tokens sent to their
    # experts' process (train/expert_parallel.py); 1 = off. Divides the number of processes and model.n_expert
    expert_parallel: int = 1
    # "whole": the main process writes model.safetensors and the whole optimizer state (gathered one
    # tensor at a time); "sharded": every process writes its slices at once through
    # torch.distributed.checkpoint (train/sharded_checkpoint.py; `mot-transition consolidate` makes it whole)
    checkpoint_format: str = "whole"
    keep_freed_memory: bool = True  # CPU, glibc: keep freed memory for reuse (devices.keep_freed_memory)
    # Step after which the MoT model is switched to Token Choice inside this run. The switch
    # itself is the converter stage's: `train(..., switch=hook)` calls `hook(trainer)` there.
    switch_at_step: int | None = None


@dataclass
class Recipe:
    name: str = "run"
    seed: int = 0
    model: ModelRecipe = field(default_factory=ModelRecipe)
    data: DataRecipe = field(default_factory=DataRecipe)
    optim: OptimRecipe = field(default_factory=OptimRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def model_config(self, vocab_size: int | None = None, **special_tokens):
        """The MoTConfig of `[model]`, with `vocab_size` from the tokenizer (default: data.vocab_size)."""
        from ..config import MoTConfig

        fields = dataclasses.asdict(self.model)
        if fields["n_positions"] is None:
            fields["n_positions"] = self.data.seq_len
        return MoTConfig(vocab_size=vocab_size or self.data.vocab_size, **fields, **special_tokens)


SECTIONS = {"model": ModelRecipe, "data": DataRecipe, "optim": OptimRecipe, "train": TrainRecipe}
TOP_LEVEL = ("name", "seed")

# Every key's type and range, declared once (the [model] keys are MoTConfig's own rules); the checks
# that involve several keys are in check_recipe.
RECIPE_RULES: dict[str, Rule] = {
    "name": Rule(str),
    "seed": Rule(int, low=0, high=2**47, high_open=True),  # the trainer seeds (seed << 16) + rank + 1
    **{f"model.{f.name}": MODEL_RULES[f.name] for f in dataclasses.fields(ModelRecipe) if f.name != "n_positions"},
    "model.n_positions": Rule(int, low=1, optional=True),
    "data.source": Rule(str),
    "data.text_field": Rule(str),
    "data.heldout_fraction": Rule(float, low=0, high=1, low_open=True, high_open=True),
    "data.max_bytes": Rule(int, low=1, optional=True),
    "data.vocab_size": VOCAB_SIZE,  # 256 bytes and <|endoftext|>, at most 2^20: options.VOCAB_SIZE says why
    "data.seq_len": Rule(int, low=2),
    "data.eval_batches": POSITIVE_INT,
    "data.eval_batch_size": POSITIVE_INT,
    "data.cache_dir": Rule(str, optional=True),
    "optim.lr": POSITIVE,
    "optim.weight_decay": AT_LEAST_ZERO,
    "optim.beta1": PROBABILITY,
    "optim.beta2": PROBABILITY,
    "optim.eps": POSITIVE,
    "optim.warmup_steps": Rule(int, low=0),
    "optim.final_lr_fraction": Rule(float, low=0, high=1),
    "optim.grad_clip": AT_LEAST_ZERO,  # 0 turns clipping off
    "train.steps": POSITIVE_INT,
    "train.batch_size": POSITIVE_INT,
    "train.micro_batch_size": Rule(int, low=0),  # 0 = from batch_size, grad_accum and the world size
    "train.grad_accum": Rule(int, low=0),  # 0 = from batch_size, micro_batch_size and the world size
    "train.eval_every": POSITIVE_INT,
    "train.checkpoint_every": POSITIVE_INT,
    "train.keep_checkpoints": POSITIVE_INT,
    "train.precision": Rule(str, choices=PRECISIONS),
    "train.device": Rule(str),  # a name torch knows: checked in check_recipe
    "train.log_every": POSITIVE_INT,
    "train.report_to": Rule(list, item=str),
    # 0 = torch's default; at most 256: torch.set_num_threads(100_000) segfaults at the first matmul (exit 139)
    # (measured, torch 2.13), and threads past the cores only slow a step
    "train.threads": Rule(int, low=0, high=256),
    "train.compile": Rule(bool),
    "train.parallel": Rule(str, choices=("ddp", "fsdp", "hsdp")),
    "train.checkpoint_format": Rule(str, choices=("whole", "sharded")),
    "train.expert_parallel": POSITIVE_INT,
    "train.keep_freed_memory": Rule(bool),
    "train.switch_at_step": Rule(int, low=1, optional=True),
}


def resolve_recipe_path(recipe: str | Path) -> Path:
    """A path as given, or a bare name such as `tiny` looked up as `recipes/tiny.toml` in the repo."""
    path = Path(recipe)
    if path.is_file():
        return path
    if path.suffix == "" and len(path.parts) == 1 and (RECIPES_DIR / f"{path.name}.toml").is_file():
        return RECIPES_DIR / f"{path.name}.toml"
    known = sorted(p.stem for p in RECIPES_DIR.glob("*.toml")) if RECIPES_DIR.is_dir() else []
    hint = f"; built-in recipes: {', '.join(known)}" if known else ""
    raise FileNotFoundError(f"recipe {str(recipe)!r} not found (give a .toml path or a built-in name{hint})")


def load_recipe(recipe: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a recipe (a path, a built-in name, or None for all defaults) and apply `key=value` overrides."""
    raw: dict = {}
    name = "run"
    if recipe is not None:
        path = resolve_recipe_path(recipe)
        name = path.stem
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"recipe {path} is not valid TOML: {error}") from None
        except RecursionError:  # tomllib recurses per level of nesting: [[[[...]]]] 100,000 deep
            raise ValueError(f"recipe {path} is not a recipe: its values nest deeper than Python's recursion limit") from None
    raw.setdefault("name", name)
    for override in overrides:
        key, value = parse_override(override)
        *section, leaf = key.split(".")
        target = raw
        for part in section:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ValueError(f"recipe key {part!r} is a value, not a section, so {key!r} cannot be set")
        target[leaf] = value
    checked = recipe_from_dict(raw)
    if recipe is not None and not raw.get("model") and not any(o.strip().startswith("model.") for o in overrides):
        import warnings

        warnings.warn(
            f"recipe {recipe} sets nothing in [model]: the default model is trained (GPT-2 small's shape, 12 blocks of "
            f"768 with 32 experts: about 1B parameters); see recipes/tiny.toml for a small one",
            stacklevel=2,
        )
    return checked


def parse_override(text: str) -> tuple[str, typing.Any]:
    """`train.steps=100` -> ("train.steps", 100); the value is a TOML literal, else a plain string."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override {text!r} is not of the form key=value (e.g. train.steps=100)")
    value = value.strip()
    if value.lower() in ("none", "null"):
        return key, None
    try:
        return key, tomllib.loads(f"v = {value}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):  # a plain string (its key's rule then says what it must be)
        return key, value


def recipe_from_dict(raw: dict) -> Recipe:
    """Build and check a Recipe from nested dicts (as read from TOML)."""
    top = {}
    sections = {}
    for key, value in raw.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ValueError(f"recipe key {key!r} must be a section ([{key}]), got {as_written(value)}")
            sections[key] = _build_section(SECTIONS[key], value, prefix=f"{key}.")
        elif key in TOP_LEVEL:
            top[key] = value
        else:
            raise ValueError(f"unknown recipe key {key!r}{_did_you_mean(key, [*TOP_LEVEL, *SECTIONS], '')}")
    for key, value in top.items():
        top[key] = RECIPE_RULES[key].read(f"recipe key {key!r}", value)
    recipe = Recipe(**top, **sections)
    check_recipe(recipe)
    return recipe


def _build_section(cls, values: dict, prefix: str):
    names = [f.name for f in dataclasses.fields(cls)]
    checked = {}
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"unknown recipe key {prefix + key!r}{_did_you_mean(key, names, prefix)}")
        checked[key] = RECIPE_RULES[prefix + key].read(f"recipe key {prefix + key!r}", value)  # one value for a list: [value]
    return cls(**checked)


def _did_you_mean(key: str, choices: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    return f" (did you mean {prefix + close[0]!r}?)" if close else f" (known: {', '.join(prefix + c for c in choices)})"


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


def recipe_to_toml(recipe: Recipe) -> str:
    """The recipe as TOML (None values left out, as TOML has no null), to store next to a run."""

    def literal(value) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(value, list):
            return "[" + ", ".join(literal(v) for v in value) + "]"
        return repr(value)

    data = recipe.to_dict()
    lines = [f"{key} = {literal(data[key])}" for key in TOP_LEVEL]
    for section in SECTIONS:
        lines.append(f"\n[{section}]")
        lines += [f"{k} = {literal(v)}" for k, v in data[section].items() if v is not None]
    return "\n".join(lines) + "\n"


__all__ = [
    "Recipe",
    "ModelRecipe",
    "DataRecipe",
    "OptimRecipe",
    "TrainRecipe",
    "load_recipe",
    "recipe_from_dict",
    "resolve_recipe_path",
    "parse_override",
    "check_recipe",
    "recipe_to_toml",
    "micro_batch_size",
]
