"""Where a trainer step's time goes: forward, backward, clipping, AdamW and zero_grad timed apart
for MoT, Token Choice and dense at benchmark 6's shapes (1 thread; mean of 3 steps after one).

    python benchmarks/step_phases.py [--malloc default]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import bench_training
from bench_training import _trainer



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--malloc", choices=["keep", "default"], default="keep")
    args = parser.parse_args()
    if args.malloc == "default":
        bench_training.KEEP_FREED_MEMORY = False  # the trainers get train.keep_freed_memory=false
    torch.set_num_threads(1)
    sequences = torch.randint(0, 4096, (256, 128), generator=torch.Generator().manual_seed(0))
    for kind in ("mot", "token_choice", "dense"):
        trainer = _trainer(kind, False, sequences)
        model, optimizer, batch = trainer.model, trainer.optimizer, sequences[:32]
        phases = dict.fromkeys(("forward", "backward", "clip", "adamw", "zero_grad"), 0.0)
        for i in range(4):
            marks = [time.perf_counter()]
            out = model(input_ids=batch, labels=batch, use_cache=False)
            marks.append(time.perf_counter())
            out.loss.backward()
            marks.append(time.perf_counter())
            trainer._clip_gradients(trainer.recipe.optim.grad_clip)
            marks.append(time.perf_counter())
            optimizer.step()
            marks.append(time.perf_counter())
            optimizer.zero_grad(set_to_none=True)
            marks.append(time.perf_counter())
            if i:
                for name, a, b in zip(phases, marks, marks[1:]):
                    phases[name] += (b - a) / 3
        print(kind, " ".join(f"{name} {seconds:.3f}s" for name, seconds in phases.items()), f"total {sum(phases.values()):.3f}s")


if __name__ == "__main__":
    main()
