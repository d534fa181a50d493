"""`mot-transition transition CKPT --steps N [--resume]`: fine-tune a converted Token Choice checkpoint."""

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..transition import transition as run_transition
from .app import app
from .train import say_when_nothing_to_resume


@app.command(epilog="Example: mot-transition transition runs/tc --steps 24")
def transition(
    checkpoint: Path = typer.Argument(..., help="A converted Token Choice checkpoint (from `mot-transition convert`)."),
    steps: int = typer.Option(..., "--steps", help="Fine-tuning steps (the paper: about 10% of the MoT run's)."),
    out: Path = typer.Option(None, "--out", help="Run directory (default: CHECKPOINT-transition)."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (default: the MoT run's final learning rate)."),
    eval_every: int = typer.Option(None, "--eval-every", help="Evaluate every M steps (default steps / 10)."),
    checkpoint_every: int = typer.Option(None, "--checkpoint-every", help="Save a checkpoint every C steps (default: at every evaluation) and at the end."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its newest checkpoint (the same CHECKPOINT and --steps)."),
) -> None:
    """Transition-tune with the load-balancing loss on; evaluate batched and one sequence at a time."""
    out = out or checkpoint.resolve().with_name(checkpoint.resolve().name + "-transition")
    if resume:
        say_when_nothing_to_resume(out)
    result = run_transition(checkpoint, steps, out, lr=lr, eval_every=eval_every, checkpoint_every=checkpoint_every, resume=resume)
    table = Table(title=f"post-switch held-out loss (nats/token), lr {result.lr:g}")
    for column in ("step", "one sequence at a time", "batched"):
        table.add_column(column, justify="right")
    for point in result.curve:
        table.add_row(str(point["step"]), f"{point['loss']:.4f}", f"{point['loss_batched']:.4f}")
    console = Console()
    console.print(table)
    if result.pre_switch_loss is not None:
        console.print(f"pre-switch loss (MoT, grouped) {result.pre_switch_loss:.4f}; MoT with group_size=1 {result.mot_unbatched_loss:.4f}")
    console.print(f"wrote {out} (checkpoint {result.checkpoint})")
