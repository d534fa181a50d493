"""Benchmark 6: training throughput of the trainer, MoT against dense at equal FLOPs.

Both models train with `mot_transition.train.Trainer` (AdamW, clipping, the real loop) on the same
random token sequences; a MoT model with the flop-matched expert width has the FLOPs per token of the
dense model but E times its feed-forward parameters in the MoE blocks, which the optimizer step pays
for. The forward + backward alone is timed too, to tell the layers' cost from the optimizer's.
"""

import torch
from report import Benchmark, Figure
from timing import side_by_side

from mot_transition import MoTLMHeadModel
from mot_transition.train.recipe import DataRecipe, ModelRecipe, OptimRecipe, Recipe, TrainRecipe
from mot_transition.train import Trainer

VOCAB = 4096


def _trainer(ffn_type: str, quick: bool, sequences: torch.Tensor) -> Trainer:
    d, batch = (128, 32) if quick else (512, 32)
    recipe = Recipe(
        name=f"bench-{ffn_type}",
        model=ModelRecipe(ffn_type=ffn_type, n_embd=d, n_layer=4, n_head=8, n_expert=32, group_size=32),
        data=DataRecipe(seq_len=sequences.shape[1], eval_batches=1, eval_batch_size=batch),
        optim=OptimRecipe(warmup_steps=10),
        train=TrainRecipe(steps=1000, batch_size=batch, micro_batch_size=batch, device="cpu", precision="fp32"),
    )
    torch.manual_seed(0)
    model = MoTLMHeadModel(recipe.model_config(VOCAB))
    return Trainer(model, recipe, sequences, sequences[:batch])


def _forward_backward(trainer: Trainer, batch: torch.Tensor):
    def run():
        trainer.model.zero_grad(set_to_none=True)
        trainer.model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
    return run


def training_speed(quick: bool = False) -> Benchmark:
    seq_len = 32 if quick else 128
    sequences = torch.randint(0, VOCAB, (256, seq_len), generator=torch.Generator().manual_seed(0))
    mot, dense = _trainer("mot", quick, sequences), _trainer("dense", quick, sequences)
    batch_size = mot.micro_batch_size
    batch = sequences[:batch_size]
    t = side_by_side(
        {"mot_step": mot.step, "dense_step": dense.step,
         "mot_fwd_bwd": _forward_backward(mot, batch), "dense_fwd_bwd": _forward_backward(dense, batch)},
        **({"rounds": 1, "warmup": 1} if quick else {"rounds": 5, "warmup": 1}),
    )
    tokens = batch_size * seq_len
    c = mot.model.config
    params = {name: sum(p.numel() for p in trainer.model.parameters()) for name, trainer in (("mot", mot), ("dense", dense))}
    return Benchmark(
        6, "Training throughput of the trainer: MoT against dense at equal FLOPs",
        f"`Trainer.step()` (one AdamW step on a batch of {batch_size}x{seq_len} = {tokens:,} tokens, float32, gradient "
        f"clipping) for a MoT model (d={c.n_embd}, {c.n_layer} blocks, MoE blocks {c.moe_layers}, E={c.n_expert}, "
        f"g={c.group_size}, flop-matched expert width {c.expert_size}; {params['mot'] / 1e6:.1f}M parameters) and the "
        f"dense model of equal FLOPs (FFN width {4 * c.n_embd}; {params['dense'] / 1e6:.1f}M parameters). "
        f"Ratios are of tokens/s (above 1: faster).",
        f"Median step: "
        f"MoT {t.median('mot_step'):.2f} s, dense {t.median('dense_step'):.2f} s; forward + backward alone: MoT "
        f"{t.median('mot_fwd_bwd'):.2f} s, dense {t.median('dense_fwd_bwd'):.2f} s.",
        [
            Figure("MoT trainer", tokens / t.median("mot_step"), "tok/s"),
            Figure("dense trainer", tokens / t.median("dense_step"), "tok/s"),
            Figure("MoT / dense, trainer tokens/s", t.ratio("dense_step", "mot_step"), "x", spread=t.spread("dense_step", "mot_step"),
                   note="optimizer step included"),
            Figure("MoT / dense, forward + backward tokens/s", t.ratio("dense_fwd_bwd", "mot_fwd_bwd"), "x",
                   spread=t.spread("dense_fwd_bwd", "mot_fwd_bwd"), note="model only"),
        ],
    )
