"""`train.keep_freed_memory` on against off, in separate processes (malloc settings are per
process): trainer steps of MoT, Token Choice and dense at benchmark 6's shapes (1 thread), median
of 3 interleaved rounds, and the minor page faults of each step.

    python benchmarks/malloc_ab.py --pairs 2     # default, keep, default, keep: one line each
"""

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def one(mode: str) -> None:
    sys.path.insert(0, str(HERE))
    import bench_training
    import torch
    from bench_training import _trainer

    torch.set_num_threads(1)
    if mode == "default":
        bench_training.KEEP_FREED_MEMORY = False  # the trainers get train.keep_freed_memory=false
    sequences = torch.randint(0, 4096, (256, 128), generator=torch.Generator().manual_seed(0))
    trainers = {kind: _trainer(kind, False, sequences) for kind in ("mot", "token_choice", "dense")}
    for trainer in trainers.values():
        trainer.step()
    times, faults = {k: [] for k in trainers}, {k: [] for k in trainers}
    for _ in range(3):
        for kind, trainer in trainers.items():
            before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            trainer.step()
            times[kind].append(time.perf_counter() - start)
            faults[kind].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    t = {k: statistics.median(v) for k, v in times.items()}
    steps = " ".join(f"{k} {t[k]:.2f} s / {statistics.median(faults[k]):,.0f} faults" for k in trainers)
    print(f"{mode:7s} {steps}; MoT / dense tokens/s {t['dense'] / t['mot']:.2f}x, "
          f"Token Choice / dense {t['dense'] / t['token_choice']:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--one", choices=["default", "keep"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args.one)
        return
    for _ in range(args.pairs):
        for mode in ("default", "keep"):
            subprocess.run([sys.executable, __file__, "--one", mode], check=True)


if __name__ == "__main__":
    main()
