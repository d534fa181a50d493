"""Run every benchmark, print one table, and write benchmarks/RESULTS.md.

    python benchmarks/run.py                # the full suite at torch's default thread count
    python benchmarks/run.py --threads 1 2  # the full suite twice, side by side in one table
    python benchmarks/run.py --quick        # smoke run in seconds: small shapes, one thread, no RESULTS.md
    python benchmarks/run.py --only 1 3     # a subset
    python benchmarks/run.py --malloc default   # leave glibc's malloc as it is (the trainer's train.keep_freed_memory=false)

The suite runs, as the trainer does on CPU, with malloc keeping freed memory for reuse
(`mot_transition.train.devices.keep_freed_memory`); `--malloc default` measures without it.
"""

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_convert
import bench_generation
import bench_layers
import bench_training
import torch
from report import markdown, print_table

from mot_transition.train.devices import keep_freed_memory
from rich.console import Console

BENCHMARKS = {
    1: bench_layers.token_choice_training,
    2: bench_layers.token_choice_decode,
    3: bench_layers.mot_training,
    4: bench_convert.convert_vs_copy,
    5: bench_generation.generation_speed,
    6: bench_training.training_speed,
    7: bench_generation.compiled_decode,
    8: bench_training.compiled_training,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes and few rounds: checks the suite runs")
    parser.add_argument("--only", type=int, nargs="+", choices=sorted(BENCHMARKS), help="run only these benchmarks")
    parser.add_argument("--threads", type=int, nargs="+", help="torch intra-op thread counts to run the suite at")
    parser.add_argument("--malloc", choices=["keep", "default"], default="keep",
                        help="keep: malloc keeps freed memory, as the trainer sets it on CPU (default); default: glibc as it is")
    parser.add_argument("--output", type=Path, help="where to write the markdown (default: benchmarks/RESULTS.md; none with --quick)")
    args = parser.parse_args(argv)
    if args.malloc == "keep" and not keep_freed_memory():
        sys.exit("error: --malloc keep needs glibc's mallopt (Linux); pass --malloc default")
    bench_training.KEEP_FREED_MEMORY = args.malloc == "keep"  # else its trainers would set it (train.keep_freed_memory)
    thread_counts = args.threads or ([1] if args.quick else [torch.get_num_threads()])
    console = Console(width=180)
    load_before = os.getloadavg()
    runs = {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        runs[threads] = []
        for number in args.only or sorted(BENCHMARKS):
            with console.status(f"benchmark {number} at {threads} thread(s) ..."):
                runs[threads].append(BENCHMARKS[number](quick=args.quick))
            console.log(f"benchmark {number} at {threads} thread(s) done")
    print_table(runs, console)
    output = args.output or (None if args.quick else HERE / "RESULTS.md")
    if output is not None:
        command = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
        output.write_text(markdown(runs, command.strip(), args.quick, (load_before, os.getloadavg()), args.malloc))
        console.print(f"wrote {output}")


if __name__ == "__main__":
    main()
