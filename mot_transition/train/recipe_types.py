"""The recipe's sections as typed dataclasses, and every key's type and range (`RECIPE_RULES`).

Reading a recipe file and its overrides is recipe.py's; the checks that involve several keys are
recipe_checks.py's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..config import AT_LEAST_ZERO, MODEL_RULES, POSITIVE, POSITIVE_INT, PROBABILITY, Rule
from ..options import VOCAB_SIZE

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
