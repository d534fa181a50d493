"""`mot-transition train RECIPE [--out DIR] [--resume] [KEY=VALUE ...]`: a thin layer over `train()`."""

import time
from pathlib import Path

import typer

from .app import app


@app.command(epilog="Example: mot-transition train tiny-llama train.steps=120 --out runs/llama")
def train(
    recipe: str = typer.Argument(..., help="A recipe .toml file, or a built-in name from recipes/ (e.g. tiny)."),
    overrides: list[str] = typer.Argument(None, help="Recipe overrides key=value, e.g. train.steps=100 model.group_size=16."),
    out: Path = typer.Option(None, "--out", help="Run directory (default: runs/<recipe name>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its newest checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Pretrain a MoT, dense or Token Choice model from a recipe; checkpoints go to --out."""
    from rich.console import Console
    from rich.table import Table

    from ..train import load_recipe
    from ..train import train as run_training

    start = time.perf_counter()
    config = load_recipe(recipe, overrides or [])
    if resume:
        say_when_nothing_to_resume(out if out is not None else Path("runs") / config.name)
    switch = None
    if config.train.switch_at_step is not None:  # the in-run MoT -> Token Choice switch
        from ..transition import in_run_switch as switch
    result = run_training(config, out, resume=resume, progress=not quiet, switch=switch)
    if result.rank != 0:  # under torchrun, rank 0 reports
        return
    table = Table(title=f"{config.name}: {result.step} steps")
    table.add_column("measure")
    table.add_column("value", justify="right", overflow="fold")
    table.add_row("held-out loss (nats/token)", f"{result.eval_loss:.4f}")
    table.add_row("unigram entropy (nats/token)", f"{result.unigram_entropy:.4f}")
    table.add_row("held-out perplexity", f"{_exp(result.eval_loss):,.2f}")
    table.add_row("time, training (s)", f"{result.train_seconds:.1f}")
    table.add_row("time, with data preparation (s)", f"{time.perf_counter() - start:.1f}")
    table.add_row("tokens/s", f"{result.tokens_per_second:,.0f}")
    table.add_row("checkpoint", str(result.checkpoint))
    table.add_row("metrics", str(result.metrics))
    table.add_row("loss curves", str(result.plot) if result.plot else "(needs matplotlib: pip install 'mot-transition[plot]')")
    Console().print(table)


def say_when_nothing_to_resume(out: Path) -> None:
    """`--resume` with no checkpoint in `out` starts a new run (so that a job restarted after a crash
    before its first checkpoint goes on), and says so: a mistyped --out is seen at once."""
    from ..locks import OutputInUse, hold
    from ..train import latest_checkpoint

    try:  # another process writing `out` is refused next, in one line: no warning before it
        with hold(out):
            pass
    except (OutputInUse, OSError, ValueError):
        return
    if latest_checkpoint(out) is None:
        import warnings

        warnings.warn(f"--resume: {out} holds no checkpoint to resume; starting a new run there")


def _exp(x: float) -> float:
    import math

    return math.exp(x) if x < 700 else float("inf")
