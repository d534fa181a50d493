"""The training loop, written out plainly: accumulation, eval, checkpoints (AdamW, the schedule and the clip: optimizer.py).

    Trainer(model, recipe, ...)     one model, its optimizer and data stream; step(), evaluate(),
                                    save_checkpoint(), load_checkpoint(); for callers that bring
                                    their own model (the transition stage fine-tunes with it)
    evaluate(model, sequences, b)   mean held-out cross-entropy, nats/token, float32

Distributed: `train.batch_size` is the global batch; each rank runs micro-batches of
`train.micro_batch_size` rows (or `train.grad_accum` micro-batches per step) and accumulates
gradients until the global batch is done. Rank r takes its own slice of every global batch
(`TrainBatches`). Mixture of Tokens groups are formed
inside each rank's micro-batch (g rows of that micro-batch at the same position), never across
ranks, so the micro-batch must be a multiple of `group_size`. Rank 0 writes the checkpoints;
evaluation spreads the fixed held-out batches over the ranks and sums.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint_io import first_nonfinite
from ..config import GROUPING_FFN_TYPES, MoTConfig
from ..convert import default_top_k
from .balance import batch_routing, routing_for_step, update_expert_bias
from .checkpoint import (
    latest_checkpoint,
    load_optimizer_state,
    load_training_state,
    save_checkpoint,
)
from .devices import Distributed, keep_freed_memory, pick_device, use_bf16
from .expert_parallel import (
    apply_expert_parallel,
    expert_parameter_names,
    sync_expert_gradients,
)
from .flops import mfu, peak_flops, training_flops_per_token
from .optimizer import build_optimizer, clip_gradients, lr_at
from .recipe import Recipe, micro_batch_size
from .sharded_checkpoint import is_sharded, load_sharded, save_sharded_checkpoint
from .sharding import (
    first_nonfinite_anywhere,
    gather_for_checkpoint,
    load_full_optimizer_state,
    shard_model,
)
from .tracking import expert_load, load_record


class TrainingDiverged(ValueError):
    """The loss, the gradient norm, the held-out loss or a weight became NaN or infinite; the run
    stopped before the bad update, or without saving the step that made it."""


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    sequences: torch.Tensor,
    batch_size: int,
    device: torch.device | str | None = None,
    rank: int = 0,
    world_size: int = 1,
    lockstep: bool = False,
) -> float:
    """Mean cross-entropy (nats/token) of `model` on `sequences` (N, S), in float32, no autocast.

    The same sequences give the same tokens whatever `batch_size` is: `batch_size=1` evaluates
    one sequence at a time (what a user of a MoT model at inference would see), a larger batch
    lets a MoT model form its groups. With `world_size > 1` batch i runs on rank i % world_size
    and the sums are all-reduced; with `lockstep` (a sharded model, whose forward is collective) every
    rank runs as many forward passes, the ones past the end weighted 0. The model's train/eval mode is
    restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"evaluation batch_size must be at least 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, tokens)
    starts = list(range(0, sequences.shape[0], batch_size))
    passes = -(-len(starts) // world_size) * world_size if lockstep else len(starts)
    try:
        for i in range(passes):
            if i % world_size != rank:
                continue
            start = starts[i] if i < len(starts) else starts[0]  # past the end (lockstep): a pass that counts 0
            batch = sequences[start : start + batch_size].to(device)
            out = model(input_ids=batch, labels=batch, use_cache=False)
            tokens = batch.shape[0] * (batch.shape[1] - 1) if i < len(starts) else 0  # the model shifts labels by one
            total += torch.stack([out.lm_loss.double() * tokens, torch.tensor(float(tokens), dtype=torch.float64, device=device)])
    finally:
        model.train(was_training)
    if world_size > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


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
        self.micro_batch_size = micro_batch_size(t, world)
        # FSDP2 (sharding.py) under torchrun, or in one process that joined a process group of one
        # (a GPU check of the sharded path on one device); else DDP under torchrun
        self.sharded = t.parallel in ("fsdp", "hsdp") and (world > 1 or (dist.is_available() and dist.is_initialized()))
        self.expert_parallel = t.expert_parallel > 1  # experts shared out over processes, tokens dispatched (expert_parallel.py)
        if self.expert_parallel and t.expert_parallel > world:
            raise ValueError(f"train.expert_parallel={t.expert_parallel} needs at least as many processes, but this run has {world}")
        # whether the model's tensors are spread over processes: gathered for a whole checkpoint, forward passes collective
        self.distributed_tensors = self.sharded or self.expert_parallel
        self.accumulation = t.batch_size // (self.micro_batch_size * world)
        self.seq_len = train_sequences.shape[1]
        self._check_grouping(model)
        try:
            self.eval_sequences = torch.cat(heldout_batches(heldout_sequences, recipe.data.eval_batch_size, recipe.data.eval_batches))
        except ValueError as error:
            raise ValueError(f"{error} (recipe keys data.eval_batches, data.eval_batch_size)") from None
        self.batches = TrainBatches(train_sequences, self.micro_batch_size, recipe.seed, self.dist.rank, world, self.accumulation)
        self.step_count = 0
        self.corpus_identity = None  # what names the data beyond the recipe (a prepared corpus: its manifest's hashes)
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
        e = self.recipe.data.eval_batch_size
        if ffn_type in GROUPING_FFN_TYPES and e % g:  # as transition and run refuse it: the losses compare like for like
            raise ValueError(
                f"{ffn_type} forms groups of group_size={g} batch rows, but data.eval_batch_size is {e}: the held-out loss "
                f"would mix some rows with fewer others than training does; set data.eval_batch_size to a multiple of {g} "
                f"(e.g. {max(g, e // g * g)})"
            )

    def _install(self, model: torch.nn.Module) -> None:
        """Put `model` on the device, wrap it for DDP (and torch.compile) and build a fresh optimizer over it."""
        t = self.recipe.train
        if self.device.type == "cpu" and t.keep_freed_memory:
            keep_freed_memory()
        self.model = model.to(self.device)
        self.model.train()
        if self.sharded:
            self.forward_model = shard_model(self.model, self.device, self.bf16, hybrid=t.parallel == "hsdp")
        elif self.dist.world_size > 1:
            if self.expert_parallel:  # each process's experts: left out of DDP, averaged by sync_expert_gradients
                apply_expert_parallel(self.model, t.expert_parallel, self.device)
                DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, expert_parameter_names(self.model))
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = DistributedDataParallel(self.model, device_ids=device_ids)
        else:
            self.forward_model = self.model
        if t.compile:  # training steps only: evaluation and checkpoints use self.model as it is
            self.forward_model = torch.compile(self.forward_model)
        self.optimizer = build_optimizer(self.model, self.recipe)
        config = getattr(model, "config", None)
        self.flops_per_token = training_flops_per_token(config, self.seq_len) if isinstance(config, MoTConfig) else None
        self.peak_flops = peak_flops(self.device)

    def switch_model(self, model: torch.nn.Module) -> None:
        """Continue training on another model (the in-run MoT -> Token Choice switch,
        `train.switch_at_step`): a fresh AdamW over its parameters (a caller may copy state into
        `self.optimizer.state`), the same step count, learning-rate schedule and data stream.
        """
        self._check_grouping(model)
        self._install(model)

    def _gradient_sync(self, last: bool):
        """Reduce the gradients over the processes after the last micro-batch of a step only."""
        if self.sharded:
            self.model.set_requires_gradient_sync(last)
        elif self.dist.world_size > 1 and not last:
            return self.forward_model.no_sync()
        return contextlib.nullcontext()

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
        batches = [self.batches.next_batch().to(self.device) for _ in range(self.accumulation)]
        routing = batch_routing(self.model, batches, self.dist.world_size, self.bf16)  # the router losses see the global batch
        with routing_for_step(self.model, routing):
            for i, batch in enumerate(batches):
                with self._gradient_sync(i == self.accumulation - 1):
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
        if self.expert_parallel:
            sync_expert_gradients(self.model)
        if self.dist.world_size > 1:
            dist.all_reduce(sums)
            sums /= self.dist.world_size
            if measure_load:
                dist.all_reduce(load)
        loss, lm_loss, aux, z = sums.tolist()
        if not math.isfinite(loss):
            self._diverged(f"the training loss became {loss}")
        grad_norm = self._clip_gradients(self.recipe.optim.grad_clip or float("inf"))
        if not math.isfinite(grad_norm):
            self._diverged(f"the gradient norm became {grad_norm}")
        self.optimizer.step()
        update_expert_bias(self.model, self.dist.world_size)  # Token Choice's selection bias, when the model has one
        self.optimizer.__dict__.pop("grad_scale", None)  # a clip folded into this step only (_clip_gradients)
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
            "step_seconds": seconds,  # wall time of this optimizer step (evaluation and saves not included)
        }
        if self.flops_per_token is not None and self.peak_flops:  # per device: this rank's share of the tokens
            record["mfu"] = mfu(record["tokens_per_s"] / self.dist.world_size, self.flops_per_token, self.peak_flops)
        if self.device.type == "cuda":
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if measure_load:
            record.update(load_record(load, layers))
        return record

    def _clip_gradients(self, max_norm: float) -> float:
        """The global gradient norm, the gradients clipped to `max_norm` (optimizer.clip_gradients)."""
        return clip_gradients(self.model, self.optimizer, max_norm)

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
        return evaluate(self.model, self.eval_sequences, batch_size, self.device, self.dist.rank, self.dist.world_size,
                        self.distributed_tensors)

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
        if self.distributed_tensors:  # each rank holds a shard: the finding is shared, and the whole tensors gathered for rank 0
            bad = first_nonfinite_anywhere(self.model)
        else:  # every rank holds the same weights: all stop together
            bad = first_nonfinite(self.model.named_parameters())
        if bad is not None:
            self._diverged(f"the parameter {bad} became NaN or infinite", updated=True)
        t = self.recipe.train
        rng = self.rng_states()
        state = {"data": self.batches.state_dict(), "world_size": self.dist.world_size, "recipe": self.recipe.to_dict()}
        if self.sharded:  # the device mesh the run was sharded over: (processes) or (nodes, processes a node)
            state["mesh"] = list(self.model.sharding_mesh)
        if self.expert_parallel:  # processes that shared out the experts (a resume may use any layout)
            state["expert_parallel"] = self.recipe.train.expert_parallel
        if self.corpus_identity is not None:
            state["corpus"] = self.corpus_identity
        if extra is not None:
            state["extra"] = extra
        if t.checkpoint_format == "sharded":  # every process writes its slices at once
            path = save_sharded_checkpoint(self.run_dir, self.step_count, self.model, self.tokenizer, self.optimizer, state, rng,
                                           t.keep_checkpoints, self.dist.is_main)
            if self.dist.world_size > 1:
                dist.barrier()
            return path
        gathered = gather_for_checkpoint(self.model, self.optimizer, self.dist.is_main) if self.distributed_tensors else None
        path = None
        if self.dist.is_main:
            path = save_checkpoint(
                self.run_dir, self.step_count, self.model, self.tokenizer, self.optimizer, state, rng,
                keep=self.recipe.train.keep_checkpoints, gathered=gathered,
            )
        if self.dist.world_size > 1:
            dist.barrier()
        return path

    def load_checkpoint(self, checkpoint: Path) -> dict | None:
        """Restore optimizer, step, data position and RNG from `checkpoint`; the weights are the
        model's own (load the model from the same checkpoint with `from_pretrained`), except from a
        sharded checkpoint, whose weights are loaded here into the model as placed. Returns the
        `extra` that `save_checkpoint` was given (None if it was given none)."""
        state, tensors = load_training_state(checkpoint)
        if "rows" not in state["data"] and state.get("world_size") != self.dist.world_size:
            raise ValueError(
                f"{checkpoint} was written by an older mot-transition with {state.get('world_size')} processes; resume it "
                f"with the same number of processes (this run has {self.dist.world_size})"
            )
        saved = state.get("corpus")
        if self.corpus_identity is not None and saved is not None and saved != self.corpus_identity:
            raise ValueError(
                f"--resume: {self.recipe.data.source} holds other data than the run in {checkpoint.parent.parent} trained on "
                f"(its manifest's source_fingerprint / tokenizer_hash differ); resume with the corpus the run started with"
            )
        if is_sharded(checkpoint):  # the weights too: the model was built from the config alone
            tensors = {**tensors, **load_sharded(checkpoint, self.model, self.optimizer)}
        (load_full_optimizer_state if self.distributed_tensors else load_optimizer_state)(self.model, self.optimizer, state, tensors)
        self.batches.load_state_dict(state["data"])
        self.step_count = state["step"]
        self._restore_rng(tensors)
        return state.get("extra")

    def _restore_rng(self, tensors: dict[str, torch.Tensor]) -> None:
        """This rank's saved RNG states; a rank the saved run did not have (resumed on more processes)
        starts generators seeded by (seed, step, rank) instead, so a resume stays deterministic."""
        rank = self.dist.rank
        if f"rng.cpu.rank{rank}" not in tensors:
            key = hashlib.sha256(f"mot-transition rng:{self.recipe.seed}:{self.step_count}:{rank}".encode()).digest()
            torch.manual_seed(int.from_bytes(key[:8], "little") >> 1)  # seeds every device
            return
        torch.set_rng_state(tensors[f"rng.cpu.rank{rank}"])
        if self.device.type == "cuda" and f"rng.cuda.rank{rank}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda.rank{rank}"], self.device)


__all__ = ["Trainer", "TrainingDiverged", "evaluate", "lr_at", "build_optimizer"]
