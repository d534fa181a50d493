"""A whole training run from a recipe: data, tokenizer, model, the loop, checkpoints, resume.

    train(recipe, out_dir)          build data, tokenizer and model from a recipe and train it
    prepare_run_data(recipe)        the tokenizer and packed sequences of `recipe.data` (cached)

The loop itself is `loop.Trainer`; devices and torchrun are `devices`. Under `torchrun` every rank
calls `train`; rank 0 writes the metrics and the checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ..checks import check_writable_folder
from ..config import as_written, style_defaults
from ..locks import hold_for_job
from ..checkpoint_io import load_config
from .checkpoint import latest_checkpoint, load_model, resumable_checkpoint, set_aside
from .sharded_checkpoint import is_sharded
from .devices import Distributed, pick_device, setup_distributed
from .loop import Trainer, TrainingDiverged, build_optimizer, evaluate, lr_at
from .memory import check_fits
from .recipe import Recipe, micro_batch_size, recipe_to_toml
from .sharding import local_world_size
from .tracking import METRICS_FILE, Reporters, plot_training

RECIPE_FILE = "recipe.toml"


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



def prepare_run_data(recipe: Recipe, tokenizer=None, distributed: Distributed | None = None, readers=None):
    """(tokenizer, train rows, held-out rows, prepared corpus) of `recipe.data`.

    One data path: the rows are always those of a prepared corpus (`mot-transition prepare`),
    memory-mapped. `data.source` may be one (its folder); anything else (the built-in corpus, a
    file, a folder, a glob, ...) is prepared once into the cache (`data.cached.cached_corpus`) and
    read from there. Rank 0 prepares first; the other ranks then read the cache. With `readers` (an
    ExitStack), the corpus is held under a reader's lock until it closes: no `prepare --force`
    replaces it meanwhile (locks.py).
    """
    from ..data.cached import cached_corpus
    from ..data.prepare import INCOMPLETE
    from ..data.shards import MANIFEST

    d = recipe.data
    distributed = distributed or Distributed()
    source = Path(d.source).expanduser()
    looks_prepared = (source / MANIFEST).is_file() or (source / INCOMPLETE).exists() or (source / "train").is_dir() and (source / "tokenizer").is_dir()
    if d.source != "stdlib" and looks_prepared:
        return _prepared_run_data(recipe, source, tokenizer, distributed, given=True, readers=readers)  # an unfinished one: PreparedData says so
    for turn in ("main", "others"):
        if (turn == "main") == distributed.is_main:
            source = cached_corpus(
                d.source, text_field=d.text_field, heldout_fraction=d.heldout_fraction, max_bytes=d.max_bytes,
                vocab_size=d.vocab_size, tokenizer=tokenizer, cache_dir=d.cache_dir,
            )
        if turn == "main" and distributed.world_size > 1:
            dist.barrier()
    return _prepared_run_data(recipe, source, tokenizer, distributed, given=False, readers=readers)


def _prepared_run_data(recipe: Recipe, source: Path, tokenizer, distributed: Distributed, given: bool, readers=None):
    """The run's data from a prepared corpus: its tokenizer and its splits, read from the
    memory-mapped shards as the rows are needed (every rank maps the same files). `given`: the
    recipe named this corpus (not one the cache prepared from its keys)."""
    import warnings

    from ..data.batches import tokenizer_hash
    from ..data.shards import PackedSequences, PreparedData
    from .recipe import DataRecipe

    if readers is not None:  # read for the run's whole life: nothing replaces it meanwhile
        readers.enter_context(hold_for_job(source, distributed, shared=True))
    prepared = PreparedData(source)
    own = prepared.tokenizer()
    if tokenizer is None:
        tokenizer = own
    elif tokenizer_hash(tokenizer) != tokenizer_hash(own):
        raise ValueError(f"{source} was tokenised with another tokenizer than the checkpoint's; use the corpus its run trained on")
    d, default = recipe.data, DataRecipe()
    ignored = [f"data.{key}" for key in ("vocab_size", "heldout_fraction", "max_bytes", "text_field") if getattr(d, key) != getattr(default, key)]
    if given and ignored and distributed.is_main:
        warnings.warn(
            f"data.source is the prepared corpus {source}: its tokenizer (vocabulary {len(tokenizer)}) and its splits are "
            f"the run's, so {', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored",
            stacklevel=3,
        )
    return tokenizer, PackedSequences(prepared.train, d.seq_len), PackedSequences(prepared.heldout, d.seq_len), prepared


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
    check_writable_folder(run_dir, "--out")  # before the data is prepared
    t = recipe.train
    if t.switch_at_step is not None and switch is None:
        raise ValueError(
            "recipe key 'train.switch_at_step' is set, but nothing performs the switch: pass train(..., switch=...) "
            "(e.g. mot_transition.transition.in_run_switch), or remove the key to train without it"
        )
    device_kind = "cuda" if t.device.startswith("cuda") or (t.device == "auto" and torch.cuda.is_available()) else "cpu"
    world = setup_distributed(device_kind)
    lock, finished = ExitStack(), False
    try:
        device = pick_device(t.device, world.local_rank)  # before the data is prepared: a device this machine lacks is one line
        lock.enter_context(hold_for_job(run_dir, world))  # one writer per run directory; torchrun's ranks share it
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is not None and not resume:
            raise ValueError(
                f"{run_dir} already holds checkpoints (latest: {checkpoint.name}); pass --resume to continue that run "
                f"or choose another --out"
            )
        if resume:
            checkpoint, skipped = resumable_checkpoint(run_dir)
            for damaged, why in skipped if world.is_main else ():
                aside = set_aside(damaged)
                _warn(f"skipping the damaged checkpoint {damaged.name} ({why}), set aside as {aside.name}; resuming from {checkpoint.name}", progress)
        if checkpoint is not None:
            _check_resumable(recipe, checkpoint)
        tokenizer, train_seq, heldout_seq, corpus = prepare_run_data(recipe, tokenizer, world, readers=lock)
        eos = tokenizer.eos_token_id
        config = model.config if model is not None else recipe.model_config(len(tokenizer), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
        here = local_world_size() if world.world_size > 1 else 1
        check_fits(
            config, micro_batch_size(t, world.world_size), train_seq.shape[1], device,
            shards={"ddp": 1, "fsdp": world.world_size, "hsdp": here}[t.parallel] if world.world_size > 1 else 1,
            expert_parallel=t.expert_parallel, processes_here=here,
        )
        if checkpoint is not None and is_sharded(checkpoint):  # its weights are loaded once the model is placed
            model = (type(model) if model is not None else MoTLMHeadModel)(load_config(checkpoint))
        elif checkpoint is not None:
            model = load_model(checkpoint, type(model) if model is not None else MoTLMHeadModel)
        elif model is None:
            torch.manual_seed(recipe.seed)
            model = MoTLMHeadModel(config)
        torch.manual_seed((recipe.seed << 16) + world.rank + 1)  # dropout stream, one per rank
        trainer = Trainer(model, recipe, train_seq, heldout_seq, tokenizer=tokenizer, run_dir=run_dir, device=device, distributed=world)
        manifest = getattr(corpus, "manifest", None)
        if manifest is not None:  # a prepared corpus: the same path must hold the same data to resume
            trainer.corpus_identity = {key: manifest[key] for key in ("source_fingerprint", "tokenizer_hash")}
        if checkpoint is not None:
            trainer.load_checkpoint(checkpoint)
        result = _run(trainer, corpus, checkpoint, progress and world.is_main, switch)
        finished = True
        return result
    finally:
        lock.close()
        if world.started_here and finished:
            # Every rank arrives before any tears the group down: a rank destroying it while a peer
            # still uses it can hang the job at its very end (pytorch#75097). After a failure the
            # group is left alone, as torchtitan does: a peer may be inside a collective, so tearing
            # down could deadlock; the process exits and torchrun stops the others.
            dist.barrier()
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
    keys += [("train", "batch_size"), ("train", "micro_batch_size"), ("train", "grad_accum")]
    for key in keys:
        a, b, c = saved, now, default
        for part in key:
            a, b, c = a.get(part, c[part]) if isinstance(a, dict) else None, b[part], c[part]
        if a != b:
            raise ValueError(
                f"--resume: recipe key {'.'.join(key)!r} is {as_written(b)} but the run in {checkpoint.parent.parent} used {as_written(a)}; "
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
        tmp = run_dir / f".{RECIPE_FILE}.tmp-{os.getpid()}"  # whole or not at all, as every file we write
        tmp.write_text(recipe_to_toml(recipe))
        os.replace(tmp, run_dir / RECIPE_FILE)
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
            f"{trainer.dist.world_size} process(es){f' sharded ({trainer.recipe.train.parallel})' if trainer.sharded else ''}"
            f"{f', experts shared out over {trainer.recipe.train.expert_parallel}' if trainer.expert_parallel else ''} x micro-batch {trainer.micro_batch_size} x {trainer.accumulation} "
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


__all__ = [  # the loop's and the devices' names too, as before they had modules of their own
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
