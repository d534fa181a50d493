"""`mot-transition convert SRC DST`: a MoT checkpoint becomes a Token Choice checkpoint."""

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..convert import ConversionReport, convert_checkpoint
from .app import app


@app.command(epilog="Example: mot-transition convert runs/llama runs/tc --top-k 2")
def convert(
    src: Path = typer.Argument(..., help="MoT checkpoint directory (or a run directory: its latest checkpoint)."),
    dst: Path = typer.Argument(..., help="Directory to write the Token Choice checkpoint to."),
    top_k: int = typer.Option(None, "--top-k", help="Experts per token; default max(1, round(E / g)) keeps FLOPs."),
    capacity_factor: float = typer.Option(None, "--capacity-factor", help="Expert capacity in training; default dropless."),
    calibrate: int = typer.Option(0, "--calibrate", help="Fit one output scale per MoE layer on this many batches of the MoT run's training data.", min=0),
    force: bool = typer.Option(False, "--force", help="Replace DST if it exists."),
) -> None:
    """Convert a trained MoT checkpoint into a Token Choice sparse MoE checkpoint (docs/design.md §9)."""
    from ..checkpoint_io import resolve_checkpoint

    src = resolve_checkpoint(src)
    batches = None
    if calibrate:
        from ..transition import calibration_batches

        batches = calibration_batches(src, calibrate)
    report = convert_checkpoint(src, dst, top_k, capacity_factor, batches, force)
    show_report(report, Console())
    Console().print(f"wrote {dst} (report: {dst / 'conversion_report.json'})")


def show_report(report: ConversionReport, console: Console) -> None:
    tensors = Table(title="tensors (every one: conversion_report.json)")
    tensors.add_column("tensor", overflow="fold")
    tensors.add_column("carried / transformed")
    tensors.add_column("how", overflow="fold")
    carried = []
    for row in report.tensors:  # the transformed ones by name; the rest, carried unchanged, counted
        if row["action"] == "carried" and row["detail"] == "unchanged":
            carried.append(row["name"])
        else:
            tensors.add_row(row["name"], row["action"], row["detail"], style="bold" if row["action"] == "transformed" else None)
    if carried:
        tensors.add_row(f"the other {len(carried)}", "carried", "unchanged")
    console.print(tensors)

    changes = Table(title="config")
    for column in ("field", "MoT", "Token Choice"):
        changes.add_column(column)
    for key, (before, after) in report.config_changes.items():
        changes.add_row(key, str(before), str(after))
    console.print(changes)

    params = Table(title="parameters")
    for column in ("", "MoT", "Token Choice"):
        params.add_column(column, justify="right")
    for key in ("total", "active_per_token"):
        params.add_row(key.replace("_", " "), f"{report.parameters_before[key]:,}", f"{report.parameters_after[key]:,}")
    console.print(params)

    if report.calibration and "mse_before" in report.calibration:
        calibration = Table(title=f"calibration on {report.calibration['batches']} batches")
        for column in ("block", "scale", "MSE before", "MSE after"):
            calibration.add_column(column, justify="right")
        for layer, scale in report.calibration["scales"].items():
            calibration.add_row(str(layer), f"{scale:.4f}", f"{report.calibration['mse_before'][layer]:.3e}",
                                f"{report.calibration['mse_after'][layer]:.3e}")
        console.print(calibration)
