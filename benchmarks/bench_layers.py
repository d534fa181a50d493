"""Benchmarks 1-3: the expert layers against what a researcher would use instead.

1. Token Choice training step (forward + backward, 16,384 tokens) against transformers'
   MixtralSparseMoeBlock with its grouped_mm experts; each normalised by a dense FFN of its own
   kind with the same active FLOPs (ReLU, 2 matrices, for ours; SwiGLU, 3 matrices, for Mixtral's).
2. Token Choice at one-token decode (batch 1, eval) against a dense FFN of equal active FLOPs.
3. Mixture of Tokens training step against a dense FFN of equal FLOPs.
Benchmarks 1 and 2 also run the same Token Choice layer with its experts switched to transformers'
grouped_mm function, to check that ours are the right default. Every benchmark also runs the layers
of the "llama" block style (SwiGLU experts and dense FFN, docs/design.md §8.3) side by side with the same
targets: the fast paths must stay fast for both kinds of experts.
"""

import copy

import torch
from report import Benchmark, Figure
from timing import side_by_side
from torch import nn
from transformers import MistralConfig, MixtralConfig
from transformers.models.mistral.modeling_mistral import MistralMLP
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from mot_transition import MoTConfig
from mot_transition.layers import DenseFFN, MixtureOfTokens, TokenChoice

D, E = 512, 32
TC_EXPERT = 1536  # ReLU expert: 2 * d * 1536 multiply-adds per token ...
MIXTRAL_EXPERT = 1024  # ... equal to a SwiGLU expert: 3 * d * 1024


def _config(ffn_type: str, **fields) -> MoTConfig:
    return MoTConfig(ffn_type=ffn_type, n_embd=D, n_head=8, n_layer=2, n_expert=E, vocab_size=256, **fields)


def _mixtral_block(intermediate: int) -> nn.Module:
    config = MixtralConfig(
        hidden_size=D, intermediate_size=intermediate, num_local_experts=E, num_experts_per_tok=1,
        experts_implementation="grouped_mm",
    )
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():  # the block is built with torch.empty; initialise as a model would
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    return block


def _swiglu_dense(intermediate: int) -> nn.Module:
    return MistralMLP(MistralConfig(hidden_size=D, intermediate_size=intermediate, hidden_act="silu"))


def _training_step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, returns_tuple: bool):
    """One forward + backward of `module` on x, gradients cleared first (not accumulated)."""
    params = list(module.parameters())

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        y = module(x)
        (y[0] if returns_tuple else y).backward(dy)

    return step


def _with_transformers_experts(layer: TokenChoice) -> TokenChoice:
    """The same layer and weights, its experts run by transformers' grouped_mm function (the switch)."""
    twin = copy.deepcopy(layer)
    twin.config = copy.deepcopy(layer.config)
    twin.config._experts_implementation = "grouped_mm"
    return twin


def _rounds(quick: bool, full: int) -> dict:
    return {"rounds": 2, "warmup": 1} if quick else {"rounds": full, "warmup": 2}


def token_choice_training(quick: bool = False) -> Benchmark:
    B, S = (2, 512) if quick else (16, 1024)
    torch.manual_seed(0)
    ours = TokenChoice(_config("token_choice", expert_size=TC_EXPERT, num_experts_per_tok=1)).train()
    theirs = _with_transformers_experts(ours)
    ours_dense = DenseFFN(_config("dense", n_inner=TC_EXPERT)).train()
    mixtral = _mixtral_block(MIXTRAL_EXPERT).train()
    mixtral_dense = _swiglu_dense(MIXTRAL_EXPERT).train()
    swiglu = TokenChoice(_config("token_choice", block="llama", expert_size=MIXTRAL_EXPERT, num_experts_per_tok=1)).train()
    swiglu_dense = DenseFFN(_config("dense", block="llama", n_inner=MIXTRAL_EXPERT)).train()
    x = torch.randn(B, S, D, requires_grad=True)
    dy = torch.randn(B, S, D)
    t = side_by_side(
        {
            "token_choice": _training_step(ours, x, dy, True),
            "tc_grouped_mm": _training_step(theirs, x, dy, True),
            "dense_relu": _training_step(ours_dense, x, dy, True),
            "mixtral": _training_step(mixtral, x, dy, False),
            "dense_swiglu": _training_step(mixtral_dense, x, dy, False),
            "tc_swiglu": _training_step(swiglu, x, dy, True),
            "ours_dense_swiglu": _training_step(swiglu_dense, x, dy, True),
        },
        **_rounds(quick, 7),
    )
    ours_ratio, mixtral_ratio = t.ratio("token_choice", "dense_relu"), t.ratio("mixtral", "dense_swiglu")
    # ratio of ratios, per round, so that both normalisations come from the same moment
    per_round = [
        (a / b) / (c / e)
        for a, b, c, e in zip(*(t.seconds[n] for n in ("token_choice", "dense_relu", "mixtral", "dense_swiglu")))
    ]
    per_round.sort()
    versus = per_round[len(per_round) // 2]
    return Benchmark(
        1, "Token Choice training step against Mixtral's block",
        f"Forward + backward (gradients of input and weights) at {B * S:,} tokens ({B}x{S}), float32, d={D}, E={E}, "
        f"top-1, dropless. Ours: `TokenChoice`, ReLU experts of width {TC_EXPERT}; normalised by `DenseFFN` "
        f"(ReLU) of width {TC_EXPERT}. Mixtral: `MixtralSparseMoeBlock` with `experts_implementation=\"grouped_mm\"`, "
        f"SwiGLU experts of width {MIXTRAL_EXPERT} (3 x {MIXTRAL_EXPERT} = 2 x {TC_EXPERT}: equal expert FLOPs); "
        f"normalised by `MistralMLP` (SwiGLU) of width {MIXTRAL_EXPERT}. Ours, llama style: `TokenChoice` with SwiGLU "
        f"experts of width {MIXTRAL_EXPERT} (the shapes of Mixtral's), normalised by our SwiGLU `DenseFFN` of that width.",
        f"Median times: ours {t.median('token_choice') * 1e3:.0f} ms, dense ReLU {t.median('dense_relu') * 1e3:.0f} ms, Mixtral "
        f"{t.median('mixtral') * 1e3:.0f} ms, dense SwiGLU {t.median('dense_swiglu') * 1e3:.0f} ms, ours SwiGLU "
        f"{t.median('tc_swiglu') * 1e3:.0f} ms, our dense SwiGLU {t.median('ours_dense_swiglu') * 1e3:.0f} ms.",
        [
            Figure("Token Choice / dense ReLU FFN", ours_ratio, "x", 1.10, spread=t.spread("token_choice", "dense_relu")),
            Figure("Mixtral block (grouped_mm) / dense SwiGLU FFN", mixtral_ratio, "x", spread=t.spread("mixtral", "dense_swiglu")),
            Figure("Token Choice normalised / Mixtral normalised", versus, "x", 1.00, spread=(per_round[0], per_round[-1]),
                   note="below 1: faster than Mixtral's block"),
            Figure("Token Choice / Mixtral block, raw time", t.ratio("token_choice", "mixtral"), "x", 0.90,
                   spread=t.spread("token_choice", "mixtral"), note="equal expert FLOPs (target: issue 26)"),
            Figure("Token Choice, transformers' grouped_mm experts / ours", t.ratio("tc_grouped_mm", "token_choice"), "x",
                   spread=t.spread("tc_grouped_mm", "token_choice"), note="above 1: ours (the default) is faster"),
            Figure("SwiGLU Token Choice / our dense SwiGLU FFN", t.ratio("tc_swiglu", "ours_dense_swiglu"), "x", 1.10,
                   spread=t.spread("tc_swiglu", "ours_dense_swiglu")),
            Figure("SwiGLU Token Choice / Mixtral block, raw time", t.ratio("tc_swiglu", "mixtral"), "x", 1.00,
                   spread=t.spread("tc_swiglu", "mixtral"), note="the same expert shapes"),
        ],
    )


def token_choice_decode(quick: bool = False) -> Benchmark:
    torch.manual_seed(0)
    ours = TokenChoice(_config("token_choice", expert_size=TC_EXPERT, num_experts_per_tok=1)).eval()
    theirs = _with_transformers_experts(ours)
    ours_dense = DenseFFN(_config("dense", n_inner=TC_EXPERT)).eval()
    mixtral = _mixtral_block(MIXTRAL_EXPERT).eval()
    mixtral_dense = _swiglu_dense(MIXTRAL_EXPERT).eval()
    swiglu = TokenChoice(_config("token_choice", block="llama", expert_size=MIXTRAL_EXPERT, num_experts_per_tok=1)).eval()
    swiglu_dense = DenseFFN(_config("dense", block="llama", n_inner=MIXTRAL_EXPERT)).eval()
    x = torch.randn(1, 1, D)
    calls = 20 if quick else 100

    def call(module):
        def run():
            with torch.inference_mode():
                module(x)
        return run

    t = side_by_side(
        {
            "token_choice": call(ours), "tc_grouped_mm": call(theirs), "dense_relu": call(ours_dense),
            "mixtral": call(mixtral), "dense_swiglu": call(mixtral_dense), "tc_swiglu": call(swiglu),
            "ours_dense_swiglu": call(swiglu_dense),
        },
        calls=calls, **_rounds(quick, 31),
    )
    return Benchmark(
        2, "Token Choice at one-token decode",
        f"Batch 1, one token, eval, `torch.inference_mode`, float32; same layers as benchmark 1 "
        f"(d={D}, E={E}, top-1, expert width {TC_EXPERT}; SwiGLU: {MIXTRAL_EXPERT}); {calls} calls per sample.",
        f"Median per call: ours {t.median('token_choice') * 1e6:.0f} us, dense ReLU {t.median('dense_relu') * 1e6:.0f} us, Mixtral "
        f"{t.median('mixtral') * 1e6:.0f} us, dense SwiGLU {t.median('dense_swiglu') * 1e6:.0f} us, ours SwiGLU "
        f"{t.median('tc_swiglu') * 1e6:.0f} us, our dense SwiGLU {t.median('ours_dense_swiglu') * 1e6:.0f} us.",
        [
            Figure("Token Choice / dense ReLU FFN", t.ratio("token_choice", "dense_relu"), "x", 1.30, spread=t.spread("token_choice", "dense_relu")),
            Figure("Mixtral block (grouped_mm) / dense SwiGLU FFN", t.ratio("mixtral", "dense_swiglu"), "x", spread=t.spread("mixtral", "dense_swiglu")),
            Figure("Token Choice, transformers' grouped_mm experts / ours", t.ratio("tc_grouped_mm", "token_choice"), "x",
                   spread=t.spread("tc_grouped_mm", "token_choice"), note="above 1: ours (the default) is faster"),
            Figure("SwiGLU Token Choice / our dense SwiGLU FFN", t.ratio("tc_swiglu", "ours_dense_swiglu"), "x", 1.30,
                   spread=t.spread("tc_swiglu", "ours_dense_swiglu")),
        ],
    )


def mot_training(quick: bool = False) -> Benchmark:
    B, S = (64, 16) if quick else (128, 128)
    g, f = 32, 4 * D * 32 // E  # flop-matched expert width: 2048
    torch.manual_seed(0)
    ours = MixtureOfTokens(_config("mot", group_size=g)).train()
    assert ours.lin1.shape[-1] == f
    dense = DenseFFN(_config("dense", n_inner=4 * D)).train()
    swiglu = MixtureOfTokens(_config("mot", block="llama", group_size=g)).train()  # flop-matched SwiGLU experts
    swiglu_dense = DenseFFN(_config("dense", block="llama", n_inner=swiglu.lin2.shape[1])).train()  # equal FLOPs
    x = torch.randn(B, S, D, requires_grad=True)
    dy = torch.randn(B, S, D)
    # the expert matmuls alone, on already mixed tokens: the floor any MoT layout can reach
    mixed = torch.randn(E, B // g * S, D, requires_grad=True)
    dmixed = torch.randn(E, B // g * S, D)

    def experts_only():
        for p in ours.parameters():
            p.grad = None
        mixed.grad = None
        ours.experts(mixed).backward(dmixed)

    t = side_by_side(
        {
            "mot": _training_step(ours, x, dy, True), "dense": _training_step(dense, x, dy, True), "experts_only": experts_only,
            "mot_swiglu": _training_step(swiglu, x, dy, True), "dense_swiglu": _training_step(swiglu_dense, x, dy, True),
        },
        **_rounds(quick, 7),
    )
    return Benchmark(
        3, "Mixture of Tokens training step against a dense FFN",
        f"Forward + backward at {B}x{S} = {B * S:,} tokens, float32, d={D}, g={g}, E={E}, flop-matched expert width {f}; "
        f"against `DenseFFN` of width {4 * D} (equal FLOPs). Llama style: SwiGLU experts of flop-matched width "
        f"{swiglu.lin2.shape[1]} against our SwiGLU `DenseFFN` of that width.",
        f"Median times: MoT {t.median('mot') * 1e3:.0f} ms, dense "
        f"{t.median('dense') * 1e3:.0f} ms, expert matmuls alone {t.median('experts_only') * 1e3:.0f} ms, MoT SwiGLU "
        f"{t.median('mot_swiglu') * 1e3:.0f} ms, dense SwiGLU {t.median('dense_swiglu') * 1e3:.0f} ms.",
        [
            Figure("MoT / dense FFN", t.ratio("mot", "dense"), "x", 1.15, spread=t.spread("mot", "dense")),
            Figure("expert matmuls alone / dense FFN", t.ratio("experts_only", "dense"), "x", spread=t.spread("experts_only", "dense"),
                   note="floor: mixing and emitting excluded"),
            Figure("SwiGLU MoT / dense SwiGLU FFN", t.ratio("mot_swiglu", "dense_swiglu"), "x", 1.15,
                   spread=t.spread("mot_swiglu", "dense_swiglu")),
        ],
    )
