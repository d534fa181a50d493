"""`mot-transition export SRC DST --to qwen3_moe`: a llama-style checkpoint becomes a native
transformers model (Qwen3-MoE or Qwen3) that loads without this package."""

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .app import app


@app.command()
def export(
    src: Path = typer.Argument(..., help="Checkpoint directory (or a run directory: its latest checkpoint), llama block style."),
    dst: Path = typer.Argument(..., help="Directory to write the native transformers model to."),
    to: str = typer.Option("qwen3_moe", "--to", help="qwen3_moe (Token Choice models) or qwen3 (dense models)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16: the dtype of the written tensors."),
    dropless: bool = typer.Option(False, "--dropless", help="Export a model trained with a capacity factor (Qwen3-MoE never drops)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Load the export back with transformers and compare logits and greedy tokens."),
    force: bool = typer.Option(False, "--force", help="Replace DST if this toolkit wrote it."),
) -> None:
    """Export a llama-style checkpoint to a native transformers architecture (SPEC section 5)."""
    from ..export import export_checkpoint

    console = Console()
    with console.status(f"exporting to {to}"):
        report = export_checkpoint(src, dst, to, force=force, dropless=dropless, verify=verify, dtype=dtype)
    table = Table(title=f"{report.architecture} (transformers {report.transformers_version})", show_header=False)
    table.add_column("")
    table.add_column("", justify="right")
    table.add_row("tensors", report.dtype)
    table.add_row("sparse blocks", ", ".join(map(str, report.sparse_layers)) or "none")
    table.add_row("dense blocks (mlp_only_layers)", ", ".join(map(str, report.dense_layers)) or "none")
    if report.max_abs_logit_difference is not None:
        table.add_row("max |logit difference|, float32", f"{report.max_abs_logit_difference:.2e}")
        table.add_row("same greedy tokens", "yes" if report.same_greedy_tokens else "no")
    console.print(table)
    console.print(f"wrote {dst}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(dst)!r})")
