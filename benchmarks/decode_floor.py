"""Where one-token Token Choice decode spends its time over a dense FFN of equal active FLOPs (benchmark 2's
layers: d=512, E=32, top-1, ReLU experts of width 1536), taken apart step by step, side by side in one run:

    dense layer                `DenseFFN` called as a module (benchmark 2's baseline)
    dense matmuls              act(x @ w1) @ w2 alone: the floor of both
    expert matmuls, own        the same on one expert's two matrices copied out as tensors of their own
    expert matmuls, slices     the same on lin1[e], lin2[e]: views into the (E, d, f) parameters
    + router                   x @ controller, softmax, top-1, the expert id read, then the slices
    + gate                     ... and the output scaled by its gate: every operation of the layer
    Token Choice layer         `TokenChoice` called as a module

Each line's ratio to "dense matmuls" says what that step adds. Run, on a quiet machine:
`python benchmarks/decode_floor.py --threads 1 2`.
"""

import argparse

import torch
from rich.console import Console
from rich.table import Table
from timing import side_by_side

from mot_transition import MoTConfig
from mot_transition.layers import DenseFFN, TokenChoice
from mot_transition.train.devices import keep_freed_memory

D, E, F = 512, 32, 1536
CALLS = 100


def candidates() -> dict:
    torch.manual_seed(0)
    config = dict(n_embd=D, n_head=8, n_layer=2, n_expert=E, vocab_size=256)
    layer = TokenChoice(MoTConfig(ffn_type="token_choice", expert_size=F, num_experts_per_tok=1, **config)).eval()
    dense = DenseFFN(MoTConfig(ffn_type="dense", n_inner=F, **config)).eval()
    x = torch.randn(1, 1, D)
    flat = x.view(1, -1)
    controller, lin1, lin2 = layer.controller.detach(), layer.lin1.detach(), layer.lin2.detach()
    e = int(torch.softmax(flat @ controller, dim=-1).argmax())
    own1, own2 = lin1[e].clone(), lin2[e].clone()
    w1, w2 = dense.w1.detach(), dense.w2.detach()

    def routed():
        gate, expert = torch.softmax(flat @ controller, dim=-1).topk(1, dim=-1)
        i = expert.item()
        return (flat @ lin1[i]).relu_() @ lin2[i], gate

    steps = {
        "dense layer": lambda: dense(x),
        "dense matmuls": lambda: (flat @ w1).relu_() @ w2,
        "expert matmuls, own": lambda: (flat @ own1).relu_() @ own2,
        "expert matmuls, slices": lambda: (flat @ lin1[e]).relu_() @ lin2[e],
        "+ router": routed,
        "+ gate": lambda: (lambda out, gate: out * gate)(*routed()),
        "Token Choice layer": lambda: layer(x),
    }
    with torch.inference_mode():  # every variant gives the layer's output
        expected = layer(x)[0].view(1, -1)
        assert torch.equal(steps["+ gate"](), expected), "the step-by-step decode must be the layer's"

    def repeat(fn):
        def run():
            with torch.inference_mode():
                for _ in range(CALLS):
                    fn()
        return run

    return {name: repeat(fn) for name, fn in steps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--rounds", type=int, default=31)
    args = parser.parse_args()
    keep_freed_memory()  # as the trainer and benchmarks/run.py run
    table = Table(title=f"one-token decode, d={D}, E={E}, top-1, expert width {F}: time / dense matmuls")
    table.add_column("step")
    for threads in args.threads:
        table.add_column(f"{threads} thread{'s' if threads > 1 else ''}", justify="right")
    columns = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        t = side_by_side(candidates(), rounds=args.rounds, warmup=3)
        low_high = {name: t.spread(name, "dense matmuls") for name in t.seconds}
        columns.append({name: f"{t.ratio(name, 'dense matmuls'):.3f} [{low_high[name][0]:.2f}-{low_high[name][1]:.2f}] "
                              f"({t.median(name) / CALLS * 1e6:.0f} us)" for name in t.seconds})
    for name in columns[0]:
        table.add_row(name, *(column[name] for column in columns))
    Console().print(table)


if __name__ == "__main__":
    main()
