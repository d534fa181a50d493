"""`mot-transition compare RUN...`: the pre/post-switch table of docs/design.md §10.2 and a plot."""

from contextlib import nullcontext
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..compare import add_task_scores, compare_runs, plot_curves
from ..jsonfiles import write_json
from ..locks import hold
from .app import app


@app.command(epilog="Example: mot-transition compare runs/tc-transition")
def compare(
    runs: list[Path] = typer.Argument(..., help="A `run` output directory, or a transition run and a Token Choice baseline run."),
    plot: Path = typer.Option(None, "--plot", help="Where to write the plot of the loss curves: .png, .pdf, .svg, ... (default: loss_curves.png in the transition run)."),
    tasks: str = typer.Option(None, "--tasks", help="Also score the models on these lm-eval tasks (comma-separated; the eval extra)."),
    include_path: Path = typer.Option(None, "--include-path", help="A folder of lm-eval task YAML files."),
    limit: int = typer.Option(None, "--limit", help="Score only the first N examples of each task."),
    force: bool = typer.Option(False, "--force", help="Replace the file --plot names if it exists."),
) -> None:
    """Compare pre-switch, unbatched, post-switch and baseline losses on the same held-out batches."""
    from ..checks import check_writable_file
    from ..compare import check_image_format

    if plot is not None:  # before the models are evaluated
        check_writable_file(plot, "--plot", example="loss_curves.png", replace=force)
        check_image_format(plot)
    if tasks:
        from ..harness import require_harness

        require_harness()
    if tasks and include_path is not None:
        from ..harness import check_task_files

        if not include_path.is_dir():
            raise FileNotFoundError(f"--include-path {include_path}: no task folder there")
        check_task_files(include_path)
    from ..compare import find_runs

    transition_dir = Path(find_runs(runs)["transition"])
    # for its whole life: not while a transition or a run writes that folder, or another compare that plot
    with hold(transition_dir), (hold(plot) if plot is not None else nullcontext()):
        comparison = compare_runs(runs)
        if tasks:
            from ..harness import task_names

            add_task_scores(comparison, task_names(tasks), include_path, limit)
        show_comparison(comparison, Console())
        write_json(transition_dir / "comparison.json", comparison)
        try:
            path = plot_curves(comparison, plot or transition_dir / "loss_curves.png")
            Console().print(f"loss curves: {path}")
        except ImportError:
            Console().print("no plot: matplotlib is not installed (pip install 'mot-transition[plot]')")


def show_comparison(comparison: dict, console: Console) -> None:
    table = Table(title="held-out loss, nats/token (same batches, float32)")
    for column in ("measure", "loss", "perplexity", "vs pre-switch"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    for row in comparison["rows"]:
        loss = "-" if row["loss"] is None else f"{row['loss']:.4f}"
        ppl = "-" if row["perplexity"] is None else f"{row['perplexity']:.2f}"
        rel = "-" if row["vs_pre_switch"] is None else f"{100 * row['vs_pre_switch']:+.1f}%"
        table.add_row(row["measure"], loss, ppl, rel)
    console.print(table)
    for key, what in (("recovery_step", "recovery (loss <= pre-switch x 1.02)"), ("full_recovery_step", "full recovery (loss <= pre-switch)")):
        step = comparison.get(key)
        where = f"not within the {comparison['transition_steps']} transition steps" if step is None else f"at transition step {step}"
        console.print(f"{what}: {where}")
    if comparison.get("task_scores"):
        scores = Table(title="lm-eval task scores")
        for column in ("model", "task", "metric", "value"):
            scores.add_column(column, justify="right" if column == "value" else "left")
        for model, by_task in comparison["task_scores"].items():
            for task, metrics in by_task.items():
                for metric, value in metrics.items():
                    scores.add_row(model, task, metric, f"{value:.4f}")
        console.print(scores)
