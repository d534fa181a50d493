"""`mot-transition consolidate SRC DST`: a sharded (DCP) training checkpoint becomes a whole one."""

from pathlib import Path

import typer
from rich.console import Console

from .app import app


@app.command(epilog="Example: mot-transition consolidate runs/big runs/big-whole")
def consolidate(
    src: Path = typer.Argument(..., help="A sharded checkpoint (train.checkpoint_format='sharded'), or a run directory: its latest checkpoint."),
    dst: Path = typer.Argument(..., help="Directory to write the whole checkpoint to."),
    force: bool = typer.Option(False, "--force", help="Replace DST if it is a checkpoint this command wrote."),
) -> None:
    """Write a sharded training checkpoint in the whole layout (model.safetensors, the optimizer state
    in training_state.safetensors), which convert, export, info, generate and transition read. One
    tensor is read at a time: memory is bounded by the largest tensor, not the model."""
    from ..train.sharded_checkpoint import consolidate as consolidate_checkpoint

    written = consolidate_checkpoint(src, dst, force)
    Console().print(f"wrote {written}")
