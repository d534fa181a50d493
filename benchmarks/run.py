"""Run every benchmark, print one table, and write benchmarks/RESULTS.md.

    python benchmarks/run.py            # the full suite (about ten minutes on 2 CPU cores)
    python benchmarks/run.py --quick    # smoke run in seconds: small shapes, few rounds, no RESULTS.md
    python benchmarks/run.py --only 1 3 # a subset
"""

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

import bench_layers  # noqa: E402
from report import markdown, print_table  # noqa: E402

BENCHMARKS = {
    1: bench_layers.token_choice_training,
    2: bench_layers.token_choice_decode,
    3: bench_layers.mot_training,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes and few rounds: checks the suite runs")
    parser.add_argument("--only", type=int, nargs="+", choices=sorted(BENCHMARKS), help="run only these benchmarks")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--output", type=Path, help="where to write the markdown (default: benchmarks/RESULTS.md; none with --quick)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=160)
    load_before = os.getloadavg()
    results = []
    for number in args.only or sorted(BENCHMARKS):
        with console.status(f"benchmark {number} ..."):
            results.append(BENCHMARKS[number](quick=args.quick))
        console.log(f"benchmark {number} done")
    print_table(results, console)
    output = args.output or (None if args.quick else HERE / "RESULTS.md")
    if output is not None:
        command = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
        output.write_text(markdown(results, command.strip(), args.quick, (load_before, os.getloadavg())))
        console.print(f"wrote {output}")


if __name__ == "__main__":
    main()
