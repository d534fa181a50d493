"""`mot-transition eval CKPT --tasks A,B [--include-path DIR]`: lm-evaluation-harness task scores."""

from pathlib import Path

import typer

from .app import app


@app.command("eval", epilog="Example: mot-transition eval runs/tc-transition --tasks arc_easy --limit 100")
def eval_command(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory (or a run directory: its latest checkpoint)."),
    tasks: str = typer.Option(..., "--tasks", help="Comma-separated lm-eval task names."),
    include_path: Path = typer.Option(None, "--include-path", help="A folder of task YAML files (and their data)."),
    limit: int = typer.Option(None, "--limit", help="Score only the first N examples of each task."),
    batch_size: int = typer.Option(8, "--batch-size"),
    group_size: int = typer.Option(None, "--group-size", help="1: score a MoT checkpoint one sequence at a time."),
    device: str = typer.Option("cpu", "--device"),
    out: Path = typer.Option(None, "--out", help="Also write the scores to this JSON file."),
    force: bool = typer.Option(False, "--force", help="Replace the file --out names if it exists."),
) -> None:
    """Score a dense or Token Choice checkpoint on lm-eval tasks (MoT: convert first, or --group-size 1)."""
    from contextlib import nullcontext

    from rich.console import Console
    from rich.table import Table

    from ..checks import check_writable_file
    from ..harness import evaluate_tasks, task_names, write_scores
    from ..locks import hold

    if out is not None:  # before the evaluation, not after it
        check_writable_file(out, "--out", replace=force)
    with hold(out) if out is not None else nullcontext():  # one writer of --out, from the start
        scores = evaluate_tasks(checkpoint, task_names(tasks), include_path, limit, batch_size, group_size, device)
        if out is not None:
            out = write_scores(scores, out)
    table = Table(title=f"{checkpoint}: lm-eval")
    for column in ("task", "metric", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for task, metrics in scores.items():
        for metric, value in metrics.items():
            table.add_row(task, metric, f"{value:.4f}")
    Console().print(table)
    if out is not None:
        Console().print(f"scores written to {out}")
