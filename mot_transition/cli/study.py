"""`mot-transition study RECIPE --seeds N --out DIR [KEY=VALUE ...]`: MoT then Token Choice against
Token Choice or dense from scratch, over seeds, on steps, FLOPs and time (a thin layer over
`mot_transition.study.run_study`)."""

from pathlib import Path

import typer

from .app import app


def _numbers(option: str, text: str) -> list[float]:
    """"5,10,20" -> [5.0, 10.0, 20.0]; "" or "none" -> []; anything else is a usage error."""
    if text.strip().lower() in ("", "none"):
        return []
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"{option} takes numbers separated by commas (e.g. 5,10,20), got {text!r}") from None


@app.command(epilog="Example: mot-transition study tiny train.steps=120 --seeds 2 --out runs/study")
def study(
    recipe: str = typer.Argument(..., help="A MoT recipe (a .toml path or a built-in name, e.g. tiny), or a study grid: a .toml file with \\[\\[size]] tables, or a built-in grid's name (study-data-rich)."),
    overrides: list[str] = typer.Argument(None, help="Recipe overrides KEY=VALUE, applied to every run (e.g. train.steps=120)."),
    seeds: int = typer.Option(3, "--seeds", help="Seeds: the recipe's seed, +1, ... (set the first with seed=S)."),
    out: Path = typer.Option(None, "--out", help="Study directory (default runs/NAME-study); run the same command again to go on where it stopped."),
    transitions: str = typer.Option("5,10,20", "--transitions", help="Transition lengths, percent of the MoT steps."),
    temperatures: str = typer.Option("0.5,2", "--temperatures", help="Further MoT runs at these controller temperatures (none: skip)."),
    calibrate: int = typer.Option(4, "--calibrate", help="Batches for the calibrated conversions of the spike measurement (0: skip them)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    commit: bool = typer.Option(False, "--commit", help="Grid only: git-commit each finished run's results file as it is written."),
    report_only: bool = typer.Option(False, "--report-only", help="Grid only: write the report from the results there now; train nothing."),
) -> None:
    """Train dense, MoT and Token Choice from scratch, switch MoT to Token Choice, and report (report.md)."""
    from rich.console import Console
    from rich.table import Table

    from ..study import run_study
    from ..study.report import models, reaching_rows, show

    console = Console()
    log = lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    grid = _grid_file(recipe)
    if grid is not None:
        return _grid(str(grid), out, overrides or [], quiet, commit, report_only, log, console,
                     given={"--seeds": seeds != 3, "--transitions": transitions != "5,10,20", "--temperatures": temperatures != "0.5,2",
                            "--calibrate": calibrate != 4})
    if commit or report_only:
        raise typer.BadParameter(f"{'--commit' if commit else '--report-only'} is for a study grid (a .toml file with [[size]] tables)")
    lengths, others = _numbers("--transitions", transitions), _numbers("--temperatures", temperatures)
    summary = run_study(recipe, out, overrides or (), seeds, lengths, others, calibrate, progress=not quiet, log=log)
    results = summary["results"]
    table = Table(title=f"the end of each run, {len(results)} seed(s): mean ± std")
    for column in ("model", "steps", "training FLOPs", "wall-clock s", "held-out loss"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, label in models(results).items():
        ends = [seed["curves"][name][-1] for seed in results]
        table.add_row(label, *(show([e[axis] for e in ends], axis, compact=True) for axis in ("step", "flops", "seconds")),
                      show([e["loss"] for e in ends], compact=True))
    console.print(table)
    for row in reaching_rows(results):
        where = f" at step {show([p['step'] for p in row['points']], 'step', compact=True)}" if row["points"] else ""
        console.print(f"{row['model']} reached dense's final loss in {row['reached']} of {row['seeds']} seeds{where}", highlight=False)
    console.print(f"report: {summary['report']}")
    if summary["plots"] is None:
        console.print("no plots: matplotlib is not installed (pip install 'mot-transition[plot]')")


def _grid_file(recipe: str) -> Path | None:
    from ..study.grid import grid_file

    return grid_file(recipe)


def _grid(path: str, out: Path | None, overrides: list[str], quiet: bool, commit: bool, report_only: bool, log, console,
          given: dict) -> None:
    """`study GRID.toml`: the sweep, then every size and seed; results in the grid's `results`."""
    from rich.table import Table

    from ..study.grid import load_grid
    from ..study.grid_run import GridRun, git_committer

    for option, was_given in given.items():
        if was_given:
            raise typer.BadParameter(f"{option} is the grid file's to set (its seeds, transitions), not an option, for a grid")
    grid = load_grid(path)
    if report_only:
        from ..study.grid_report import write_grid_report

        if out is not None or overrides or commit:  # they would be silently ignored
            raise typer.BadParameter(f"--report-only reads and writes the grid's results folder ({grid.results}) only: "
                                     "drop --out, --commit and KEY=VALUE, which are for training")

        if not (grid.results / "grid.json").is_file():
            raise FileNotFoundError(f"{grid.results} holds no grid.json: the grid has not started, so there is nothing to report")
        console.print(f"report: {write_grid_report(grid.results)}")
        return
    out = out if out is not None else Path("runs") / f"{Path(path).stem}"
    on_result = git_committer(grid.results) if commit else None
    lrs = GridRun(grid, out, overrides, progress=not quiet, log=log, on_result=on_result).run()
    table = Table(title="learning rate per size and kind (the sweep's pick)")
    table.add_column("size")
    for kind in next(iter(lrs.values())):
        table.add_column(kind, justify="right")
    for size, picked in lrs.items():
        table.add_row(size, *(f"{lr:g}" for lr in picked.values()))
    console.print(table)
    console.print(f"results: {grid.results}")
