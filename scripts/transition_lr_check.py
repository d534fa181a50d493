"""Does the study grid's verdict hang on the transition's learning rate? Runs one transition of a grid
again at other multiples of its learning rate (the grid's is the MoT run's final one), from the grid's
own converted checkpoint, and sets each against Token Choice from scratch at the same training FLOPs.

    python scripts/transition_lr_check.py recipes/study-data-rich.toml --size 48 --seed 0 --factors 0.25 4 10

It needs the grid's run directory of that size and seed on this machine (OUT/dSIZE/seed-I/converted:
the grid makes it for the transitions) and the grid's results of that seed. Each run goes to
OUT/dSIZE/seed-I/transition-Ppct-lrX, or under --runs while the grid runs (a killed check goes on from its
checkpoints when run again);
the comparison is written to RESULTS/transition-lr/dSIZE-seed-I-Ppct.json, which the grid's report
shows (`mot-transition study GRID --report-only`).
"""

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mot_transition.jsonfiles import write_json
from mot_transition.study.accounting import transition_curve
from mot_transition.study.grid import load_grid, plan_size
from mot_transition.study.grid_notes import LR_CHECKS
from mot_transition.study.grid_report import baseline_at, final, load_results
from mot_transition.transition import load_transition, transition


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", type=Path, help="the grid file (recipes/study-data-rich.toml)")
    parser.add_argument("--size", type=int, required=True, help="the size's n_embd")
    parser.add_argument("--seed", type=int, default=0, help="the seed index (default 0)")
    parser.add_argument("--length", type=float, help="the transition's length in percent (default: the grid's longest)")
    parser.add_argument("--factors", type=float, nargs="+", required=True, help="multiples of the grid's transition learning rate")
    parser.add_argument("--out", type=Path, default=None, help="the grid's run directory (default runs/ + the results folder's name)")
    parser.add_argument("--runs", type=Path, default=None,
                        help="where this check's runs go (default: the seed's folder in --out, which a running grid holds)")
    args = parser.parse_args(argv)
    try:
        return check(args)
    except (ValueError, OSError) as error:  # OSError: a missing file, an output another process writes
        sys.exit(f"error: {error}")


def check(args) -> Path:
    grid = load_grid(args.grid)
    size = next((s for s in grid.sizes if s.n_embd == args.size), None)
    if size is None:
        raise ValueError(f"the grid has no size with n_embd {args.size} (it has {', '.join(s.label for s in grid.sizes)})")
    if not 0 <= args.seed < size.seeds or any(f <= 0 for f in args.factors):
        raise ValueError(f"--seed must lie in 0..{size.seeds - 1} and every factor be > 0")
    plan = plan_size(grid, size, [])  # the runs themselves take the MoT run's recipe, threads included
    length = args.length if args.length is not None else max(grid.transitions)
    label = f"{length:g}pct"
    if label not in plan.transitions:
        raise ValueError(f"the grid has no {length:g}% transition (it has {', '.join(plan.transitions)})")
    out = (args.out or Path("runs") / grid.results.name) / size.label / f"seed-{args.seed}"
    data = load_results(grid.results)  # the runs at each size's picks, as the report reads them
    if size.label not in data["lr"]:
        raise ValueError(f"the grid's sweep at {size.label} has not finished")
    runs = data["sizes"][size.label].get(args.seed, {})
    for name in ("mot", "token_choice", f"transition-{label}"):
        if name not in runs:
            raise ValueError(f"the grid's {name} run at {size.label} seed {args.seed} has not finished: its results file is missing")
    converted = out / "converted"
    if not (converted / "config.json").is_file():
        raise ValueError(f"{converted} is not on this machine: run the grid through {size.label} seed {args.seed}'s transitions here first")
    mot, baseline, grid_run = runs["mot"], runs["token_choice"], runs[f"transition-{label}"]
    steps = plan.transitions[label]
    rows = [{**_row(1.0, grid_run["lr"], grid_run, grid_run["curve"], baseline), "grid": True}]
    for factor in args.factors:
        lr = grid_run["lr"] * factor
        run = (args.runs / size.label / f"seed-{args.seed}" if args.runs else out) / f"transition-{label}-lr{lr:.3g}"
        print(f"[{size.label} seed {args.seed}] transition {length:g}% at lr {lr:.3g} ({factor:g} x {grid_run['lr']:g}) -> {run}", flush=True)
        transition(converted, steps, run, lr=lr, resume=True)
        done = load_transition(run)
        record = {"pre_switch_loss": done.pre_switch_loss, "post_switch_loss": done.post_switch_loss,
                  "recovery_step": done.full_recovery_step, "final_loss": done.final_loss}
        rows.append({**_row(factor, lr, record, transition_curve(run, mot["curve"][-1]), baseline), "grid": False})
    path = grid.results / LR_CHECKS / f"{size.label}-seed-{args.seed}-{label}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"size": size.label, "seed": args.seed, "length": label, "steps": steps, "rows": sorted(rows, key=lambda r: r["factor"])})
    table = Table(title=f"{size.label} seed {args.seed}: the {length:g}% transition at other learning rates")
    for column in ("lr", "x grid's", "post-switch", "final", "Token Choice from scratch, same FLOPs", "difference"):
        table.add_column(column, justify="right")
    for r in sorted(rows, key=lambda r: r["factor"]):
        table.add_row(f"{r['lr']:.3g}", f"{r['factor']:g}", f"{r['post_switch_loss']:.4f}", f"{r['final_loss']:.4f}",
                      f"{r['baseline']:.4f}", f"{r['final_loss'] - r['baseline']:+.4f}")
    Console().print(table)
    print(f"wrote {path}")
    return path


def _row(factor: float, lr: float, record: dict, curve: list[dict], baseline: dict) -> dict:
    flops, loss = final({"curve": curve})
    at, ended = baseline_at(baseline["curve"], flops)
    return {"factor": factor, "lr": lr, "pre_switch_loss": record["pre_switch_loss"], "post_switch_loss": record["post_switch_loss"],
            "recovery_step": record["recovery_step"], "final_loss": loss, "flops": flops, "baseline": at, "baseline_ended_at": ended}


if __name__ == "__main__":
    main()
