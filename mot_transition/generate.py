"""Unbatched inference: one sequence at a time, with the KV cache.

A Token Choice (converted) checkpoint serves a sequence alone exactly as it would inside a batch.
A MoT checkpoint needs a batch to mix across; alone it runs with `group_size=1` (no mixing), where
every token passes through all E experts: E times the expert FLOPs of a dense FFN of width f, and
a regime the model was not trained in. Convert and transition-tune it to serve it sparsely.
"""

from pathlib import Path

import torch
from transformers import BatchEncoding, PreTrainedTokenizerBase

from .checkpoint_io import checkpoint_to_read, load_checked, load_config, resolve_checkpoint
from .checks import load_tokenizer_folder
from .locks import reads
from .options import check_options
from .modeling import MoTLMHeadModel


@reads(lambda a: checkpoint_to_read(a["checkpoint"]))  # read under a reader's lock: never replaced while loading
def load_for_inference(checkpoint: str | Path, device: str = "cpu") -> tuple[MoTLMHeadModel, PreTrainedTokenizerBase, str | None]:
    """(model in eval mode, tokenizer, warning or None) for one-sequence inference."""
    checkpoint = resolve_checkpoint(checkpoint)
    config = load_config(checkpoint)
    if not (checkpoint / "tokenizer.json").is_file() and not (checkpoint / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{checkpoint} has no tokenizer files; generation needs the tokenizer the model was trained with")
    tokenizer = load_tokenizer_folder(checkpoint, f"the checkpoint {checkpoint}")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_checked(checkpoint).to(device).eval()
    warning = None
    if config.mixes_batch_rows():
        model.set_group_size(1)
        warning = (
            f"{config.ffn_type} checkpoint: running with group_size=1 (no mixing), so every token passes through "
            f"all {config.n_expert} experts ({config.group_size}x the expert FLOPs of grouped inference) in a regime "
            "it was not trained for; convert it with `mot-transition convert` and `transition` to serve it sparsely"
        )
    return model, tokenizer, warning


def sampling_options(max_new_tokens: int, temperature: float, top_p: float, tokenizer) -> dict:
    check_options(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    options = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if temperature == 0:
        return {**options, "do_sample": False}
    return {**options, "do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}


@torch.no_grad()
def generate(
    model: MoTLMHeadModel,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    streamer=None,
) -> list[str]:
    """Continue each prompt (left-padded into one batch); returns the new text of each.

    A Token Choice model gives every prompt the same tokens alone or in the batch, as long as the
    padded batch leaves room in the context: new tokens are capped at n_positions minus the
    longest prompt. An empty prompt starts a new document: from the bos (else eos) token, the
    document separator the model was trained with."""
    options = sampling_options(max_new_tokens, temperature, top_p, tokenizer)
    inputs = left_padded(tokenizer, prompts).to(model.device)
    options["max_new_tokens"] = min(options["max_new_tokens"], context_room(model, inputs))
    output = model.generate(**inputs, **options, streamer=streamer)
    new = output[:, inputs["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new, skip_special_tokens=True)


def context_room(model, inputs) -> int:
    """How many new tokens the model's context leaves after the (padded) prompts `inputs`; a one-line
    ValueError when none."""
    length, context = inputs["input_ids"].shape[1], model.config.n_positions
    if length >= context:
        raise ValueError(f"the prompt is {length} tokens; the model's context is {context}")
    return context - length


def left_padded(tokenizer, prompts: list[str]):
    """The prompts as one left-padded batch (input_ids, attention_mask); an empty prompt (no tokens)
    is the bos token, or the eos token where there is no bos."""
    if not prompts:
        raise ValueError("no prompt to continue")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    # verbose=False: a prompt past the context is the caller's one-line error, not also the tokenizer's warning
    rows = [tokenizer(prompt, verbose=False)["input_ids"] for prompt in prompts]
    if any(not row for row in rows):
        if start is None:
            raise ValueError("an empty prompt needs a bos or eos token to start from, and this tokenizer has neither")
        rows = [row or [start] for row in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    if pad is None and len({len(row) for row in rows}) > 1:
        raise ValueError("prompts of different lengths need a pad token, and this tokenizer has none")
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad if pad is not None else 0, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row)
        attention_mask[i, width - len(row):] = 1
    return BatchEncoding({"input_ids": input_ids, "attention_mask": attention_mask})
