"""Where a MoE layer's time goes at small batches: E expert matmuls against one dense matmul of equal FLOPs.

An expert layer runs one matmul per expert on the rows routed to it (MoT: tokens / g mixtures per
expert; Token Choice: tokens * k / E on average), against the dense layer's one matmul over all
tokens. This times the three matmuls of a training step (forward x @ W, input gradient dy @ W^T,
weight gradient x^T @ dy) for E experts of `rows` rows each, as one `bmm`, side by side with the
dense matmul of the same FLOPs (E * rows rows, one weight), and prints expert / dense per kind
and row count. Run: `python benchmarks/expert_rows.py --threads 1 2`.
"""

import argparse

import torch
from rich.console import Console
from rich.table import Table
from timing import side_by_side

from mot_transition.train.devices import keep_freed_memory


def _ratios(rows: int, experts: int, d: int, f: int, rounds: int) -> dict[str, float]:
    torch.manual_seed(0)
    w, x, dy = torch.randn(experts, d, f), torch.randn(experts, rows, d), torch.randn(experts, rows, f)
    wd, xd, dyd = w[0].clone(), x.reshape(-1, d), dy.reshape(-1, f)
    candidates = {
        "forward expert": lambda: torch.bmm(x, w), "forward dense": lambda: xd @ wd,
        "input grad expert": lambda: torch.bmm(dy, w.mT), "input grad dense": lambda: dyd @ wd.T,
        "weight grad expert": lambda: torch.bmm(x.mT, dy), "weight grad dense": lambda: xd.T @ dyd,
    }
    t = side_by_side(candidates, rounds=rounds, warmup=2, calls=3)
    return {kind: t.ratio(f"{kind} expert", f"{kind} dense") for kind in ("forward", "input grad", "weight grad")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--f", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    keep_freed_memory()  # as the trainer does on CPU: no page faults on every fresh output
    table = Table(title=f"E={args.experts} expert matmuls (d={args.d}, f={args.f}) / one dense matmul of equal FLOPs")
    for name in ("threads", "rows per expert", "forward", "input grad", "weight grad"):
        table.add_column(name, justify="right")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for rows in args.rows:
            r = _ratios(rows, args.experts, args.d, args.f, args.rounds)
            table.add_row(str(threads), str(rows), *(f"{v:.2f}x" for v in r.values()))
    Console().print(table)


if __name__ == "__main__":
    main()
