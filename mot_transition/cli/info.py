"""`mot-transition info CKPT`: a checkpoint's config and parameter counts."""

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..checkpoint_io import checked_config, resolve_checkpoint
from ..counts import parameter_counts
from .app import app


@app.command(epilog="Example: mot-transition info runs/tc")
def info(checkpoint: Path = typer.Argument(..., help="A checkpoint directory, or a run directory (its latest checkpoint).")) -> None:
    """Print a checkpoint's config and its parameter counts: total, active per token, per layer kind.
    The weight files' headers are read and checked against the config first (cheap: no tensor is
    read), so a truncated, damaged or mismatched checkpoint is reported, not described."""
    checkpoint = resolve_checkpoint(checkpoint)
    config = checked_config(checkpoint)
    console = Console()
    settings = Table(title=f"{checkpoint}", show_header=True)
    settings.add_column("field")
    settings.add_column("value")
    for key, value in sorted(config.to_diff_dict().items()):
        if key not in ("architectures", "transformers_version", "dtype", "auto_map"):
            settings.add_row(key, str(value))
    console.print(settings)

    counts = parameter_counts(config)
    table = Table(title="parameters")
    for column in ("layer kind", "layers", "total", "active per token"):
        table.add_column(column, justify="left" if column == "layer kind" else "right")
    for kind, row in counts["by_kind"].items():
        table.add_row(kind, str(row["layers"] or ""), f"{row['total']:,}", f"{row['active_per_token']:,}")
    table.add_row("[bold]all[/bold]", "", f"[bold]{counts['total']:,}[/bold]", f"[bold]{counts['active_per_token']:,}[/bold]")
    console.print(table)
