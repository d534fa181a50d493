"""`mot-transition export SRC DST --to qwen3_moe`: a llama-style checkpoint becomes a native
transformers model (Qwen3-MoE or Qwen3) that loads without this package; `--to gguf` writes the
GGUF file that stock llama.cpp runs (mot_transition.gguf_export)."""

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .app import app


@app.command(epilog="Example: mot-transition export runs/tc-transition runs/export --to qwen3_moe")
def export(
    src: Path = typer.Argument(..., help="Checkpoint directory (or a run directory: its latest checkpoint), llama block style."),
    dst: Path = typer.Argument(..., help="Directory to write the native transformers model to (a .gguf file with --to gguf)."),
    to: str = typer.Option("qwen3_moe", "--to", help="qwen3_moe (Token Choice models), qwen3 (dense models) or gguf (llama.cpp; Token Choice)."),
    outtype: str = typer.Option("f16", "--outtype", help="--to gguf: f32, f16, bf16 or q8_0 (norms and routers stay f32)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16: the dtype of the written tensors."),
    dropless: bool = typer.Option(False, "--dropless", help="Export a model trained with a capacity factor (Qwen3-MoE never drops)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Load the export back with transformers and compare logits and greedy tokens."),
    force: bool = typer.Option(False, "--force", help="Replace DST if this toolkit wrote it."),
) -> None:
    """Export a llama-style checkpoint to a native transformers architecture (docs/design.md §8.4)."""
    from ..export import TARGETS, export_checkpoint

    console = Console()
    if to == "gguf":
        return _gguf(src, dst, outtype, force, dropless, console)
    if to in TARGETS and dst.suffix.lower() == ".gguf":  # a folder named like a file: surely meant --to gguf
        raise ValueError(f"{dst} ends in .gguf, but a {to} export is a folder of transformers files; pass --to gguf for a GGUF file")
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


def _gguf(src: Path, dst: Path, outtype: str, force: bool, dropless: bool, console) -> None:
    from ..gguf_export import export_gguf

    with console.status(f"exporting to GGUF ({outtype})"):
        report = export_gguf(src, dst, outtype, force=force, dropless=dropless)
    table = Table(title=f"GGUF, llama.cpp architecture {report.architecture} (gguf {report.gguf_version})", show_header=False)
    table.add_column("")
    table.add_column("", justify="right")
    table.add_row("matrices", outtype + (f" ({len(report.f16_instead_of_q8_0)} in f16: rows not a multiple of 32)" if report.f16_instead_of_q8_0 else ""))
    table.add_row("sparse blocks", ", ".join(map(str, report.sparse_layers)) or "none")
    table.add_row("dense blocks", ", ".join(map(str, report.dense_layers)) or "none")
    table.add_row("size", f"{report.bytes / 2**20:.1f} MiB")
    console.print(table)
    console.print(f"wrote {dst}: run it with llama-completion -m {dst} -p TEXT (docs/serving.md)")
