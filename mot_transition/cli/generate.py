"""`mot-transition generate CKPT --prompt TEXT`: stream the continuation of one sequence."""

import sys
from pathlib import Path

import torch
import typer
from rich.console import Console
from transformers import TextStreamer

from ..generate import generate as generate_text
from ..generate import context_room, left_padded, load_for_inference
from ..options import check_options
from .app import app


@app.command(epilog="Example: mot-transition generate runs/tc-transition --prompt 'def main('")
def generate(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory (or a run directory: its latest checkpoint)."),
    prompt: str = typer.Option(..., "--prompt", help="Text to continue."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", show_default=False,
                                       help="New tokens at most (default: 64, or fewer where the model's context ends)."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Generate from one prompt with the KV cache, streaming tokens as they come."""
    check_options(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)  # before the model loads
    model, tokenizer, warning = load_for_inference(checkpoint)
    if warning:
        Console(stderr=True).print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True, highlight=False)
    room = context_room(model, left_padded(tokenizer, [prompt]))  # before the prompt is echoed
    if max_new_tokens is None:
        max_new_tokens = min(64, room)
    elif room < max_new_tokens:
        Console(stderr=True).print(
            f"[yellow]warning:[/yellow] the model's context ({model.config.n_positions} tokens) leaves room for {room} new "
            f"tokens after the prompt, not {max_new_tokens}", soft_wrap=True, highlight=False,
        )
        max_new_tokens = room
    torch.manual_seed(seed)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    generate_text(model, tokenizer, [prompt], max_new_tokens, temperature, top_p, streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
