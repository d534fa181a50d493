"""A/B of gradient clipping folded into the fused AdamW step (the trainer's `_clip_gradients`)
against a pass of its own (`clip_grads_with_norm_`, as before): one MoT trainer of benchmark 6's
shapes with every step clipped (optim.grad_clip=0.01), the two alternated in one process.

    python benchmarks/clip_ab.py [--threads N] [--rounds R]
"""

import argparse
import dataclasses
import math
import statistics
import time

import torch
from bench_training import VOCAB, _trainer

from mot_transition.train.loop import Trainer


def clip_in_a_pass_of_its_own(self: Trainer, max_norm: float) -> float:
    """The clipping as it was: the norm, then a multiply over every gradient."""
    grads = [p.grad for p in self.model.parameters() if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    norm = total.item()
    if math.isfinite(norm) and max_norm / (norm + 1e-6) < 1.0:
        torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), max_norm, total)
    return norm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sequences = torch.randint(0, VOCAB, (256, 128), generator=torch.Generator().manual_seed(0))
    trainer = _trainer("mot", False, sequences)
    trainer.recipe = dataclasses.replace(trainer.recipe, optim=dataclasses.replace(trainer.recipe.optim, grad_clip=0.01))
    variants = {"folded into AdamW": Trainer._clip_gradients, "a pass of its own": clip_in_a_pass_of_its_own}
    seconds = {name: [] for name in variants}
    for r in range(args.rounds):
        for name in list(variants)[:: 1 if r % 2 else -1]:
            Trainer._clip_gradients = variants[name]
            start = time.perf_counter()
            trainer.step()
            seconds[name].append(time.perf_counter() - start)
    for name, times in seconds.items():  # the first round of each warms up
        print(f"{name}: median step {statistics.median(times[1:]):.3f} s  ({', '.join(f'{t:.2f}' for t in times)})")
    a, b = (statistics.median(times[1:]) for times in seconds.values())
    print(f"folded / separate step time: {a / b:.3f} at {args.threads} thread(s)")


if __name__ == "__main__":
    main()
