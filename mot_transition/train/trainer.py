"""The training loop, written out plainly: AdamW, warmup + cosine, clipping, accumulation, eval.

    train(recipe, out_dir)          build data, tokenizer and model from a recipe and train it
    Trainer(model, recipe, ...)     the loop's pieces, for callers that bring their own model
                                    (the transition stage fine-tunes a converted model with it)
    evaluate(model, sequences, b)   mean held-out cross-entropy, nats/token, float32

Distributed: under `torchrun` (WORLD_SIZE > 1) the same code runs with DistributedDataParallel,
gloo on CPU and nccl on GPU. `train.batch_size` is the global batch; each rank runs micro-batches
of `train.micro_batch_size` rows and accumulates gradients until the global batch is done. Rank r
takes its own slice of every global batch (`TrainBatches`). Mixture of Tokens groups are formed
inside each rank's micro-batch (g rows of that micro-batch at the same position), never across
ranks, so the micro-batch must be a multiple of `group_size`. Rank 0 writes the metrics and the
checkpoints; evaluation spreads the fixed held-out batches over the ranks and sums.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint_io import first_nonfinite
from ..config import GROUPING_FFN_TYPES, style_defaults
from ..convert import default_top_k
from .checkpoint import latest_checkpoint, load_model, load_optimizer_state, load_training_state, resumable_checkpoint, save_checkpoint
from .memory import check_fits
from .recipe import Recipe, recipe_to_toml
from .tracking import METRICS_FILE, Reporters, expert_load, load_record, plot_training

RECIPE_FILE = "recipe.toml"


class TrainingDiverged(ValueError):
    """The loss (or gradient norm) became NaN or infinite; the run stopped before the bad update."""


@dataclass
class TrainResult:
    step: int  # optimizer steps done
    eval_loss: float | None  # final held-out loss, nats/token
    unigram_entropy: float | None  # held-out loss of the train split's unigram model, nats/token
    checkpoint: Path | None  # the final checkpoint directory
    metrics: Path | None  # metrics.jsonl
    run_dir: Path
    train_seconds: float  # wall-clock time of the steps run in this call (eval and saves included)
    tokens_per_second: float  # training tokens per second over those steps (all ranks)
    rank: int = 0  # the process that returned this (under torchrun only rank 0 writes files)
    plot: Path | None = None  # loss_curves.png (None without matplotlib)


# ---------------------------------------------------------------------------------------------
# the pieces


def lr_at(step: int, lr: float, warmup_steps: int, total_steps: int, final_lr_fraction: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to a fraction."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    final = lr * final_lr_fraction
    return final + (lr - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (and expert tensors) only, not on biases and gains."""
    o = recipe.optim
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=True)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    sequences: torch.Tensor,
    batch_size: int,
    device: torch.device | str | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> float:
    """Mean cross-entropy (nats/token) of `model` on `sequences` (N, S), in float32, no autocast.

    The same sequences give the same tokens whatever `batch_size` is: `batch_size=1` evaluates
    one sequence at a time (what a user of a MoT model at inference would see), a larger batch
    lets a MoT model form its groups. With `world_size > 1` batch i runs on rank i % world_size
    and the sums are all-reduced. The model's train/eval mode is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"evaluation batch_size must be at least 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, tokens)
    try:
        for i, start in enumerate(range(0, sequences.shape[0], batch_size)):
            if i % world_size != rank:
                continue
            batch = sequences[start : start + batch_size].to(device)
            out = model(input_ids=batch, labels=batch, use_cache=False)
            tokens = batch.shape[0] * (batch.shape[1] - 1)  # the model shifts labels by one
            total += torch.stack([out.lm_loss.double() * tokens, torch.tensor(float(tokens), dtype=torch.float64, device=device)])
    finally:
        model.train(was_training)
    if world_size > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    started_here: bool = False  # we called init_process_group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_kind: str) -> Distributed:
    """Join the process group torchrun describes (WORLD_SIZE > 1), or the one already started."""
    if dist.is_available() and dist.is_initialized():
        return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return Distributed()
    dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), started_here=True)


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"recipe key 'train.device' is {name!r} but no CUDA device is available; use auto or cpu")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def use_bf16(precision: str, device: torch.device) -> bool:
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and not supported:
        raise ValueError(f"recipe key 'train.precision' is 'bf16' but {device} has no bf16 autocast here; use auto or fp32")
    return precision == "bf16" or (precision == "auto" and supported)


# ---------------------------------------------------------------------------------------------
# the loop


class Trainer:
    """One model, its optimizer and its data stream; `step()` is one optimizer step.

    `model` is any causal LM whose output has `.loss` (what is backpropagated), `.lm_loss`,
    `.aux_loss`, `.z_loss` (the last two may be None). The recipe's `[model]` section is not used
    here: the model is taken as given. `recipe.optim` and `recipe.train` drive the loop.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        recipe: Recipe,
        train_sequences: torch.Tensor,
        heldout_sequences: torch.Tensor,
        *,
        tokenizer=None,
        run_dir: Path | None = None,
        device: torch.device | None = None,
        distributed: Distributed | None = None,
    ):
        from ..data import TrainBatches, heldout_batches

        self.recipe = recipe
        if recipe.train.threads:
            torch.set_num_threads(recipe.train.threads)
        self.dist = distributed or Distributed()
        self.device = device or pick_device(recipe.train.device, self.dist.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # nccl collectives use the current device
        self.bf16 = use_bf16(recipe.train.precision, self.device)
        self.tokenizer = tokenizer
        self.run_dir = Path(run_dir) if run_dir is not None else None
        t = recipe.train
        world = self.dist.world_size
        self.micro_batch_size = t.micro_batch_size or t.batch_size // world
        if self.micro_batch_size < 1 or t.batch_size % (self.micro_batch_size * world):
            raise ValueError(
                f"recipe key 'train.batch_size' ({t.batch_size}) must be a multiple of micro_batch_size x processes "
                f"({self.micro_batch_size} x {world}); change train.batch_size or train.micro_batch_size"
            )
        self.accumulation = t.batch_size // (self.micro_batch_size * world)
        self.seq_len = train_sequences.shape[1]
        self._check_grouping(model)
        try:
            self.eval_sequences = torch.cat(heldout_batches(heldout_sequences, recipe.data.eval_batch_size, recipe.data.eval_batches))
        except ValueError as error:
            raise ValueError(f"{error} (recipe keys data.eval_batches, data.eval_batch_size)") from None
        self.batches = TrainBatches(train_sequences, self.micro_batch_size, recipe.seed, self.dist.rank, world)
        self.step_count = 0
        self._install(model)

    def _check_grouping(self, model) -> None:
        config = getattr(model, "config", None)
        ffn_type, g = getattr(config, "ffn_type", None), getattr(config, "group_size", 1)
        if ffn_type in GROUPING_FFN_TYPES and self.micro_batch_size % g:
            per_rank = f"{self.micro_batch_size} rows per process" if self.dist.world_size > 1 else f"{self.micro_batch_size} rows"
            fits = max(g, self.micro_batch_size // g * g)
            raise ValueError(
                f"{ffn_type} forms groups of group_size={g} batch rows inside each micro-batch, but the micro-batch is "
                f"{per_rank}; set train.micro_batch_size to a multiple of {g} (e.g. train.micro_batch_size={fits}, "
                f"with train.batch_size a multiple of it) or model.group_size to a divisor of {self.micro_batch_size}"
            )

    def _install(self, model: torch.nn.Module) -> None:
        """Put `model` on the device, wrap it for DDP and build a fresh optimizer over it."""
        self.model = model.to(self.device)
        self.model.train()
        if self.dist.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = DistributedDataParallel(self.model, device_ids=device_ids)
        else:
            self.forward_model = self.model
        self.optimizer = build_optimizer(self.model, self.recipe)

    def switch_model(self, model: torch.nn.Module) -> None:
        """Continue training on another model (the in-run MoT -> Token Choice switch,
        `train.switch_at_step`): a fresh AdamW over its parameters (a caller may copy state into
        `self.optimizer.state`), the same step count, learning-rate schedule and data stream.
        """
        self._check_grouping(model)
        self._install(model)

    def lr(self) -> float:
        o = self.recipe.optim
        return lr_at(self.step_count, o.lr, o.warmup_steps, self.recipe.train.steps, o.final_lr_fraction)

    def step(self) -> dict:
        """One optimizer step over one global batch; returns its metrics (averaged over ranks)."""
        lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        start = time.perf_counter()
        sums = torch.zeros(4, dtype=torch.float32, device=self.device)  # loss, lm_loss, aux, z
        has_aux = has_z = False
        layers, top_k = self._expert_layers()
        measure_load = bool(layers) and (self.step_count + 1) % self.recipe.train.log_every == 0
        load = torch.zeros(len(layers), self.model.config.n_expert, device=self.device) if measure_load else None
        for i in range(self.accumulation):
            batch = self.batches.next_batch().to(self.device)
            last = i == self.accumulation - 1
            sync = self.forward_model.no_sync() if self.dist.world_size > 1 and not last else contextlib.nullcontext()
            with sync:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    out = self.forward_model(input_ids=batch, labels=batch, use_cache=False, output_router_logits=measure_load)
                (out.loss / self.accumulation).backward()
            if measure_load:
                with torch.no_grad():
                    load += expert_load(out.router_logits, top_k)
            has_aux, has_z = out.aux_loss is not None, out.z_loss is not None
            sums += torch.stack([
                out.loss.detach().float(),
                out.lm_loss.detach().float(),
                out.aux_loss.detach().float() if has_aux else torch.zeros((), device=self.device),
                out.z_loss.detach().float() if has_z else torch.zeros((), device=self.device),
            ])
        sums /= self.accumulation
        if self.dist.world_size > 1:
            dist.all_reduce(sums)
            sums /= self.dist.world_size
            if measure_load:
                dist.all_reduce(load)
        loss, lm_loss, aux, z = sums.tolist()
        if not math.isfinite(loss):
            self._diverged(f"the training loss became {loss}")
        max_norm = self.recipe.optim.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item()
        if not math.isfinite(grad_norm):
            self._diverged(f"the gradient norm became {grad_norm}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        seconds = time.perf_counter() - start
        record = {
            "step": self.step_count,
            "lr": lr,
            "loss": loss,
            "lm_loss": lm_loss,
            "aux_loss": aux if has_aux else None,
            "z_loss": z if has_z else None,
            "grad_norm": grad_norm,
            "tokens_per_s": self.recipe.train.batch_size * self.seq_len / seconds,
        }
        if measure_load:
            record.update(load_record(load, layers))
        return record

    def _expert_layers(self) -> tuple[list[int], int]:
        """The expert layers and the k of their load: a Token Choice model's top-k, or for MoT and
        Expert Choice the top-k a conversion gives by default (E / g): the load it would route."""
        config = self.model.config
        layers = [i for i in range(config.n_layer) if config.ffn_type_of_layer(i) != "dense"]
        if config.ffn_type == "token_choice":
            return layers, config.num_experts_per_tok
        return layers, default_top_k(config)

    def _diverged(self, what: str, updated: bool = False) -> None:
        """Stop: `what` happened in step step_count + 1 (before its update), or with `updated`
        after step step_count (whose weights are then never saved)."""
        self.optimizer.zero_grad(set_to_none=True)
        last = latest_checkpoint(self.run_dir) if self.run_dir is not None else None
        where = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
        when = f"after step {self.step_count}; training stopped without saving it" if updated else (
            f"at step {self.step_count + 1}; training stopped before that update")
        raise TrainingDiverged(
            f"{what} {when} and {where} (try a lower optim.lr, more optim.warmup_steps or a smaller optim.grad_clip)"
        )

    def evaluate(self, batch_size: int | None = None) -> float:
        """Held-out loss, nats/token, float32, on the fixed eval sequences; batch_size=1 for one at a time."""
        batch_size = batch_size or self.recipe.data.eval_batch_size
        return evaluate(self.model, self.eval_sequences, batch_size, self.device, self.dist.rank, self.dist.world_size)

    # --- checkpoints -----------------------------------------------------------------------

    def rng_states(self) -> dict[str, torch.Tensor]:
        """Every rank's torch RNG states (CPU, and CUDA when used), gathered for rank 0 to save."""
        mine = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(self.device)
        everyone = [mine]
        if self.dist.world_size > 1:
            everyone = [None] * self.dist.world_size
            dist.all_gather_object(everyone, {k: v.cpu() for k, v in mine.items()})
        return {f"rng.{kind}.rank{rank}": t for rank, states in enumerate(everyone) for kind, t in states.items()}

    def save_checkpoint(self, extra: dict | None = None) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; every rank must call this).
        `extra` (JSON-able) is what a caller's own loop must carry across a resume (the transition
        stage's loss curve, say): it is kept in training_state.json and `load_checkpoint` returns it."""
        bad = first_nonfinite(self.model.named_parameters())  # every rank holds the same weights: all stop together
        if bad is not None:
            self._diverged(f"the parameter {bad} became NaN or infinite", updated=True)
        rng = self.rng_states()
        path = None
        if self.dist.is_main:
            state = {
                "data": self.batches.state_dict(),
                "world_size": self.dist.world_size,
                "recipe": self.recipe.to_dict(),
            }
            if extra is not None:
                state["extra"] = extra
            path = save_checkpoint(
                self.run_dir, self.step_count, self.model, self.tokenizer, self.optimizer, state, rng,
                keep=self.recipe.train.keep_checkpoints,
            )
        if self.dist.world_size > 1:
            dist.barrier()
        return path

    def load_checkpoint(self, checkpoint: Path) -> dict | None:
        """Restore optimizer, step, data position and RNG from `checkpoint`; the weights are the
        model's own (load the model from the same checkpoint with `from_pretrained`). Returns the
        `extra` that `save_checkpoint` was given (None if it was given none)."""
        state, tensors = load_training_state(checkpoint)
        if state.get("world_size") != self.dist.world_size:
            raise ValueError(
                f"{checkpoint} was written by a run of {state.get('world_size')} processes; resume it with the same "
                f"number of processes (this run has {self.dist.world_size})"
            )
        load_optimizer_state(self.model, self.optimizer, state, tensors)
        self.batches.load_state_dict(state["data"])
        self.step_count = state["step"]
        torch.set_rng_state(tensors[f"rng.cpu.rank{self.dist.rank}"])
        if self.device.type == "cuda" and f"rng.cuda.rank{self.dist.rank}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda.rank{self.dist.rank}"], self.device)
        return state.get("extra")


# ---------------------------------------------------------------------------------------------
# a whole run from a recipe


def prepare_run_data(recipe: Recipe, tokenizer=None, distributed: Distributed | None = None):
    """(tokenizer, train sequences, held-out sequences, corpus) for `recipe.data`.

    Rank 0 trains the tokenizer and packs the data first (both are cached); the other ranks then
    read the cache.
    """
    from ..data import load_corpus, prepare_data, train_tokenizer

    d = recipe.data
    distributed = distributed or Distributed()
    cache = Path(d.cache_dir).expanduser() if d.cache_dir else None
    for turn in ("main", "others"):
        if (turn == "main") == distributed.is_main:
            corpus = load_corpus(d.source, text_field=d.text_field, heldout_fraction=d.heldout_fraction, max_bytes=d.max_bytes)
            if tokenizer is None:
                tokenizer = train_tokenizer(corpus, d.vocab_size, cache_dir=cache / "tokenizers" if cache else None)
            train_seq, heldout_seq = prepare_data(corpus, tokenizer, d.seq_len, cache_dir=cache / "packed" if cache else None)
        if turn == "main" and distributed.world_size > 1:
            dist.barrier()
    return tokenizer, train_seq, heldout_seq, corpus


def train(
    recipe: Recipe,
    out_dir: Path | str | None = None,
    resume: bool = False,
    progress: bool = True,
    model: torch.nn.Module | None = None,
    tokenizer=None,
    switch: Callable[[Trainer], None] | None = None,
) -> TrainResult:
    """Train `recipe` into `out_dir` (default `runs/<recipe.name>`) and return where things are.

    `model=None` builds a fresh `MoTLMHeadModel` from `recipe.model` (seeded by `recipe.seed`);
    a given model (e.g. a converted Token Choice model) is fine-tuned as it is, and
    `tokenizer` then should be the one it was trained with. `resume=True` continues from the
    newest checkpoint in `out_dir` exactly (same parameters, optimizer, data position, RNG) and
    starts fresh if there is none. `switch(trainer)` is called once, before step
    `train.switch_at_step + 1`, and swaps the model in place with `trainer.switch_model(...)`:
    the hook point of the in-run MoT -> Token Choice switch, which the converter stage provides
    (`mot_transition.transition.in_run_switch`).
    Under `torchrun` every rank calls this; rank 0 writes metrics and checkpoints.
    """
    from ..modeling import MoTLMHeadModel

    run_dir = Path(out_dir) if out_dir is not None else Path("runs") / recipe.name
    t = recipe.train
    if t.switch_at_step is not None and switch is None:
        raise ValueError(
            "recipe key 'train.switch_at_step' is set, but nothing performs the switch: pass train(..., switch=...) "
            "(e.g. mot_transition.transition.in_run_switch), or remove the key to train without it"
        )
    device_kind = "cuda" if t.device.startswith("cuda") or (t.device == "auto" and torch.cuda.is_available()) else "cpu"
    world = setup_distributed(device_kind)
    try:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is not None and not resume:
            raise ValueError(
                f"{run_dir} already holds checkpoints (latest: {checkpoint.name}); pass --resume to continue that run "
                f"or choose another --out"
            )
        if resume:
            checkpoint, skipped = resumable_checkpoint(run_dir)
            for damaged, why in skipped if world.is_main else ():
                _warn(f"skipping the damaged checkpoint {damaged.name} ({why}); resuming from {checkpoint.name}", progress)
        if checkpoint is not None:
            _check_resumable(recipe, checkpoint)
        tokenizer, train_seq, heldout_seq, corpus = prepare_run_data(recipe, tokenizer, world)
        eos = tokenizer.eos_token_id
        config = model.config if model is not None else recipe.model_config(len(tokenizer), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
        check_fits(config, t.micro_batch_size or t.batch_size // world.world_size, train_seq.shape[1], pick_device(t.device, world.local_rank))
        if checkpoint is not None:
            model = load_model(checkpoint, type(model) if model is not None else MoTLMHeadModel)
        elif model is None:
            torch.manual_seed(recipe.seed)
            model = MoTLMHeadModel(config)
        torch.manual_seed((recipe.seed << 16) + world.rank + 1)  # dropout stream, one per rank
        trainer = Trainer(model, recipe, train_seq, heldout_seq, tokenizer=tokenizer, run_dir=run_dir, distributed=world)
        if checkpoint is not None:
            trainer.load_checkpoint(checkpoint)
        return _run(trainer, corpus, checkpoint, progress and world.is_main, switch)
    finally:
        if world.started_here:
            dist.destroy_process_group()


def _warn(message: str, console: bool) -> None:
    if console:
        from rich.console import Console

        Console(stderr=True).print(f"[yellow]warning:[/yellow] {message}", soft_wrap=True, highlight=False)
    else:
        import warnings

        warnings.warn(message, stacklevel=3)


def _check_resumable(recipe: Recipe, checkpoint: Path) -> None:
    """The model, data, seed and batch layout must be those of the run being resumed."""
    saved = json.loads((checkpoint / "training_state.json").read_text())["recipe"]
    now, default = recipe.to_dict(), Recipe().to_dict()  # a key newer than the run: its default
    for fields in (saved.get("model", {}), now["model"], default["model"]):  # None means the block style's default: compare what it means
        for name, value in style_defaults(fields.get("block", "gpt2")).items():
            if fields.get(name) is None:
                fields[name] = value
    keys = [("seed",)] + [("model", k) for k in now["model"]] + [("data", k) for k in now["data"] if k != "cache_dir"]
    keys += [("train", "batch_size"), ("train", "micro_batch_size")]
    for key in keys:
        a, b, c = saved, now, default
        for part in key:
            a, b, c = a.get(part, c[part]) if isinstance(a, dict) else None, b[part], c[part]
        if a != b:
            raise ValueError(
                f"--resume: recipe key {'.'.join(key)!r} is {b!r} but the run in {checkpoint.parent.parent} used {a!r}; "
                f"resume with the recipe it was started with"
            )


def _run(trainer: Trainer, corpus, resumed_from: Path | None, show: bool, switch) -> TrainResult:
    from ..data import unigram_entropy

    recipe, run_dir, t = trainer.recipe, trainer.run_dir, trainer.recipe.train
    metrics_path = run_dir / METRICS_FILE
    unigram = unigram_entropy(trainer.batches.sequences, trainer.eval_sequences, len(trainer.tokenizer))
    reporters = None
    if trainer.dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RECIPE_FILE).write_text(recipe_to_toml(recipe))
        reporters = Reporters(t.report_to, run_dir, f"{recipe.name}-{run_dir.name}", asdict(recipe), trainer.step_count)
    console = _Progress(trainer, corpus, unigram, resumed_from) if show else None
    eval_loss = None
    start, steps_run = time.perf_counter(), 0
    try:
        while trainer.step_count < t.steps:
            if t.switch_at_step is not None and trainer.step_count == t.switch_at_step:
                switch(trainer)  # the in-run switch: the hook calls trainer.switch_model(new_model)
            record = trainer.step()
            steps_run += 1
            step = trainer.step_count
            if step % t.eval_every == 0 or step == t.steps:
                eval_loss = record["eval_loss"] = trainer.evaluate()
                if not math.isfinite(eval_loss):
                    trainer._diverged(f"the held-out loss became {eval_loss}", updated=True)
            if reporters is not None:
                reporters.log(record)
            if step % t.checkpoint_every == 0 or step == t.steps:
                trainer.save_checkpoint()
            if console is not None:
                console.update(record)
    finally:
        if reporters is not None:
            reporters.close()
        if console is not None:
            console.close()
    if eval_loss is None:  # resumed at the last step: nothing left to run
        eval_loss = trainer.evaluate()
    plot = plot_training(run_dir, t.switch_at_step) if trainer.dist.is_main else None
    seconds = time.perf_counter() - start
    tokens = steps_run * t.batch_size * trainer.seq_len
    return TrainResult(
        step=trainer.step_count,
        eval_loss=eval_loss,
        unigram_entropy=unigram,
        checkpoint=latest_checkpoint(run_dir) if trainer.dist.is_main else None,
        metrics=metrics_path,
        plot=plot,
        run_dir=run_dir,
        train_seconds=seconds,
        tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
        rank=trainer.dist.rank,
    )


class _Progress:
    """A rich progress bar with live loss, eval loss and tokens/s (rank 0 only)."""

    def __init__(self, trainer: Trainer, corpus, unigram: float, resumed_from: Path | None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        recipe, model = trainer.recipe, trainer.model
        n_params = sum(p.numel() for p in model.parameters())
        config = getattr(model, "config", None)
        console = Console(stderr=True)
        console.print(
            f"[bold]{recipe.name}[/]: {getattr(config, 'ffn_type', '?')} model, {n_params / 1e6:.2f}M parameters, "
            f"{trainer.device}{', bf16 autocast' if trainer.bf16 else ''}, "
            f"{trainer.dist.world_size} process(es) x micro-batch {trainer.micro_batch_size} x {trainer.accumulation} "
            f"accumulation = batch {recipe.train.batch_size} x {trainer.seq_len} tokens"
        )
        console.print(
            f"data: {corpus.name}, {trainer.batches.sequences.shape[0]} train / {trainer.eval_sequences.shape[0]} eval "
            f"sequences, vocabulary {len(trainer.tokenizer)}, unigram entropy {unigram:.3f} nats/token"
        )
        if resumed_from is not None:
            console.print(f"resumed from {resumed_from} (step {trainer.step_count})")
        self.every = recipe.train.log_every
        self.eval = "-"
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=recipe.train.steps, completed=trainer.step_count, status="")

    def update(self, record: dict) -> None:
        if "eval_loss" in record:
            self.eval = f"{record['eval_loss']:.3f}"
        if record["step"] % self.every == 0 or "eval_loss" in record:
            status = f"loss {record['lm_loss']:.3f}  eval {self.eval}  {record['tokens_per_s']:,.0f} tok/s"
            self.progress.update(self.task, completed=record["step"], status=status)
        else:
            self.progress.update(self.task, completed=record["step"])

    def close(self) -> None:
        self.progress.stop()


__all__ = [
    "train",
    "Trainer",
    "TrainResult",
    "TrainingDiverged",
    "evaluate",
    "lr_at",
    "build_optimizer",
    "prepare_run_data",
    "setup_distributed",
    "Distributed",
]
