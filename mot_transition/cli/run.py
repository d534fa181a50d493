"""`mot-transition run [RECIPE]`: the whole pipeline on one recipe (default: tiny)."""

from pathlib import Path

import typer
from rich.console import Console

from ..pipeline import run_pipeline
from .app import app
from .compare import show_comparison


@app.command(epilog="Example: mot-transition run tiny train.steps=120 --out runs/quick")
def run(
    recipe: str = typer.Argument("tiny", help="Recipe path or built-in name (recipes/NAME.toml)."),
    overrides: list[str] = typer.Argument(None, help="Recipe overrides KEY=VALUE, e.g. train.steps=100."),
    out: Path = typer.Option(None, "--out", help="Output directory (default runs/NAME-pipeline)."),
    transition_steps: int = typer.Option(None, "--transition-steps", help="Fine-tuning steps after the switch (default 10% of the MoT steps)."),
    top_k: int = typer.Option(None, "--top-k", help="Experts per token after conversion (default max(1, round(E / g)))."),
    calibrate: int = typer.Option(0, "--calibrate", help="Fit conversion scales on this many batches (0 = off).", min=0),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="Train the Token Choice baseline from scratch."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out that stopped part-way (the same recipe, overrides and options); finished stages are kept."),
) -> None:
    """Train MoT, convert it, transition-tune it, train the Token Choice baseline, and compare."""
    console = Console()
    comparison = run_pipeline(recipe, out, overrides or (), transition_steps, top_k, calibrate, baseline, log=console.print, resume=resume)
    show_comparison(comparison, console)
    if comparison.get("plot"):
        console.print(f"loss curves: {comparison['plot']}")
    else:
        console.print("no plot: matplotlib is not installed (pip install 'mot-transition[plot]')")
