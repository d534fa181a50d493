"""`mot-transition generate CKPT --prompt TEXT`: stream the continuation of one sequence."""

import sys
from pathlib import Path

import torch
import typer
from rich.console import Console
from transformers import TextStreamer

from ..generate import generate as generate_text
from ..generate import left_padded, load_for_inference
from ..options import check_options
from .app import app


@app.command(epilog="Example: mot-transition generate runs/tc-transition --prompt 'def main('")
def generate(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory (or a run directory: its latest checkpoint)."),
    prompt: str = typer.Option(..., "--prompt", help="Text to continue."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Generate from one prompt with the KV cache, streaming tokens as they come."""
    check_options(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)  # before the model loads
    model, tokenizer, warning = load_for_inference(checkpoint)
    if warning:
        Console(stderr=True).print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True, highlight=False)
    prompt_tokens = left_padded(tokenizer, [prompt])["input_ids"].shape[1]
    room = model.config.n_positions - prompt_tokens
    if room < 1:  # before the prompt is echoed
        raise ValueError(f"the prompt is {prompt_tokens} tokens; the model's context is {model.config.n_positions}")
    if room < max_new_tokens:
        Console(stderr=True).print(
            f"[yellow]warning:[/yellow] the model's context is {model.config.n_positions} tokens and the prompt {prompt_tokens}: "
            f"at most {room} new tokens, not {max_new_tokens}", soft_wrap=True, highlight=False,
        )
    torch.manual_seed(seed)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    generate_text(model, tokenizer, [prompt], max_new_tokens, temperature, top_p, streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
