"""Benchmarks 6 and 8: throughput of the trainer.

6. MoT and Token Choice against dense at equal active FLOPs. All three train with
   `mot_transition.train.Trainer` (fused AdamW, clipping, the real loop) on the same random token
   sequences; MoT with the flop-matched expert width, and Token Choice top-1 with the same experts,
   have the FLOPs per token of the dense model but E times its feed-forward parameters in the MoE
   blocks, which the optimizer step pays for. The forward + backward alone is timed too, to tell
   the layers' cost from the optimizer's; a step of 4 micro-batches (train.grad_accum=4), over
   which the optimizer's cost is spread; and a step of one 4x larger micro-batch, in which every
   expert matmul also sees 4x the rows (512 instead of 128: the shape of benchmark 3).
8. `train.compile` on against off, for every feed-forward type.
"""

import time

import torch
from report import Benchmark, Figure
from timing import side_by_side

from mot_transition import MoTLMHeadModel
from mot_transition.train.recipe import DataRecipe, ModelRecipe, OptimRecipe, Recipe, TrainRecipe
from mot_transition.train import Trainer

VOCAB = 4096
ACCUM = 4  # micro-batches a step in benchmark 6's larger-batch rows
MICRO = 32  # sequences a micro-batch (ACCUM * MICRO in the rows of one larger micro-batch)
KEEP_FREED_MEMORY = True  # the trainers' train.keep_freed_memory; run.py --malloc default sets it False


def _trainer(ffn_type: str, quick: bool, sequences: torch.Tensor, d: int | None = None, compile: bool = False,
             grad_accum: int = 1, micro: int = MICRO) -> Trainer:
    d = d or (128 if quick else 512)
    batch = micro * grad_accum
    recipe = Recipe(
        name=f"bench-{ffn_type}",
        model=ModelRecipe(ffn_type=ffn_type, n_embd=d, n_layer=4, n_head=8, n_expert=32, group_size=32),
        data=DataRecipe(seq_len=sequences.shape[1], eval_batches=1, eval_batch_size=micro),
        optim=OptimRecipe(warmup_steps=10),
        train=TrainRecipe(steps=1000, batch_size=batch, micro_batch_size=micro, device="cpu", precision="fp32",
                          compile=compile, log_every=10**6, keep_freed_memory=KEEP_FREED_MEMORY),
    )
    torch.manual_seed(0)
    model = MoTLMHeadModel(recipe.model_config(VOCAB))
    return Trainer(model, recipe, sequences, sequences[:micro])


def _forward_backward(trainer: Trainer, batch: torch.Tensor):
    def run():
        trainer.model.zero_grad(set_to_none=True)
        trainer.model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
    return run


def training_speed(quick: bool = False) -> Benchmark:
    seq_len = 32 if quick else 128
    sequences = torch.randint(0, VOCAB, (256, seq_len), generator=torch.Generator().manual_seed(0))
    kinds = {"MoT": "mot", "Token Choice": "token_choice", "dense": "dense"}
    trainers = {name: _trainer(kind, quick, sequences) for name, kind in kinds.items()}
    # the same models at 4 micro-batches per optimizer step (train.grad_accum=4): the optimizer's
    # per-parameter work, E-fold in the MoE blocks, spread over 4x the tokens
    accumulating = {name: _trainer(kind, quick, sequences, grad_accum=ACCUM) for name, kind in kinds.items()}
    # ... and at one micro-batch of 4x the sequences: the same tokens a step, but every expert matmul
    # sees 4x the rows (tokens / g for MoT, tokens / E on average for Token Choice)
    wide = {name: _trainer(kind, quick, sequences, micro=ACCUM * MICRO) for name, kind in kinds.items()}
    batch_size, wide_batch = trainers["MoT"].micro_batch_size, wide["MoT"].micro_batch_size
    batch = sequences[:batch_size]
    candidates = {f"{name} step": trainer.step for name, trainer in trainers.items()}
    candidates |= {f"{name} step x{ACCUM}": trainer.step for name, trainer in accumulating.items()}
    candidates |= {f"{name} wide step": trainer.step for name, trainer in wide.items()}
    candidates |= {f"{name} fwd+bwd": _forward_backward(trainer, batch) for name, trainer in trainers.items()}
    t = side_by_side(candidates, **({"rounds": 1, "warmup": 1} if quick else {"rounds": 5, "warmup": 1}))
    tokens = batch_size * seq_len
    c = trainers["MoT"].model.config
    params = {name: sum(p.numel() for p in trainer.model.parameters()) / 1e6 for name, trainer in trainers.items()}
    figures = [Figure(f"{name} trainer", tokens / t.median(f"{name} step"), "tok/s") for name in trainers]
    for name in ("MoT", "Token Choice"):
        figures += [
            Figure(f"{name} / dense, trainer tokens/s", t.ratio("dense step", f"{name} step"), "x", target=0.85, at_least=True,
                   spread=t.spread("dense step", f"{name} step"), note=f"optimizer step included, {tokens:,} tokens a step"),
            Figure(f"{name} / dense, trainer tokens/s, grad_accum={ACCUM}", t.ratio(f"dense step x{ACCUM}", f"{name} step x{ACCUM}"),
                   "x", spread=t.spread(f"dense step x{ACCUM}", f"{name} step x{ACCUM}"),
                   note=f"optimizer step included, {ACCUM * tokens:,} tokens a step"),
            Figure(f"{name} / dense, trainer tokens/s, {wide_batch}x{seq_len} micro-batch",
                   t.ratio("dense wide step", f"{name} wide step"), "x", target=0.85, at_least=True,
                   spread=t.spread("dense wide step", f"{name} wide step"),
                   note=f"optimizer step included, {wide_batch * seq_len:,} tokens a step, "
                        f"{wide_batch // batch_size}x the rows per expert matmul"),
            Figure(f"{name} / dense, forward + backward tokens/s", t.ratio("dense fwd+bwd", f"{name} fwd+bwd"), "x",
                   spread=t.spread("dense fwd+bwd", f"{name} fwd+bwd"), note="model only"),
        ]
    return Benchmark(
        6, "Training throughput of the trainer: MoT and Token Choice against dense at equal active FLOPs",
        f"`Trainer.step()` (one fused AdamW step on a batch of {batch_size}x{seq_len} = {tokens:,} tokens, float32, gradient "
        f"clipping; with train.grad_accum={ACCUM}, {ACCUM} such micro-batches a step; and one micro-batch of {wide_batch}x{seq_len} a step) for a MoT model (d={c.n_embd}, "
        f"{c.n_layer} blocks, MoE blocks {c.moe_layers}, E={c.n_expert}, "
        f"g={c.group_size}, flop-matched expert width {c.expert_size}; {params['MoT']:.1f}M parameters), the Token Choice "
        f"model of the same experts (top-1, dropless, load-balancing loss; {params['Token Choice']:.1f}M parameters) and the "
        f"dense model of equal active FLOPs (FFN width {4 * c.n_embd}; {params['dense']:.1f}M parameters). "
        f"Ratios are of tokens/s (above 1: faster).",
        "Median step: " + ", ".join(f"{name} {t.median(f'{name} step'):.2f} s" for name in trainers)
        + f"; with grad_accum={ACCUM}: " + ", ".join(f"{name} {t.median(f'{name} step x{ACCUM}'):.2f} s" for name in trainers)
        + f"; one {wide_batch}x{seq_len} micro-batch: " + ", ".join(f"{name} {t.median(f'{name} wide step'):.2f} s" for name in trainers)
        + "; forward + backward alone: " + ", ".join(f"{name} {t.median(f'{name} fwd+bwd'):.2f} s" for name in trainers) + ".",
        figures,
    )


def compiled_training(quick: bool = False) -> Benchmark:
    """`train.compile=true` against eager, one Trainer step each, for every feed-forward type."""
    seq_len, d = (32, 64) if quick else (128, 256)
    sequences = torch.randint(0, VOCAB, (256, seq_len), generator=torch.Generator().manual_seed(0))
    kinds = ["dense", "mot", "token_choice", "expert_choice"]
    candidates, compile_seconds = {}, {}
    for kind in kinds:
        for compiled in (False, True):
            trainer = _trainer(kind, quick, sequences, d=d, compile=compiled)
            if compiled:  # the first step compiles: timed apart
                start = time.perf_counter()
                trainer.step()
                compile_seconds[kind] = time.perf_counter() - start
            candidates[f"{kind} {'compiled' if compiled else 'eager'}"] = trainer.step
    t = side_by_side(candidates, **({"rounds": 1, "warmup": 1} if quick else {"rounds": 5, "warmup": 1}))
    tokens = MICRO * seq_len
    return Benchmark(
        8, "torch.compile in the trainer (train.compile) against eager, every feed-forward type",
        f"`Trainer.step()` on {MICRO}x{seq_len} = {tokens:,} tokens, float32, d={d}, 4 blocks (MoE blocks [2, 3]), E=32, g=32 "
        f"(Token Choice top-1), eager and with `train.compile=true` after its first (compiling) step.",
        "Median step, eager / compiled: "
        + ", ".join(f"{kind} {t.median(f'{kind} eager') * 1e3:.0f} / {t.median(f'{kind} compiled') * 1e3:.0f} ms" for kind in kinds)
        + "; first (compiling) step: " + ", ".join(f"{kind} {s:.0f} s" for kind, s in compile_seconds.items()) + ".",
        [
            Figure(f"{kind}: compiled / eager, tokens/s", t.ratio(f"{kind} eager", f"{kind} compiled"), "x",
                   spread=t.spread(f"{kind} eager", f"{kind} compiled"), note="above 1: compiled is faster")
            for kind in kinds
        ],
    )
