"""Where a GGUF export's logits part from ours when llama.cpp runs them (issue 28's f16 bound): for
each file, llama.cpp's logits (llama-cpp-python, float32 KV cache) against
  - ours (transformers, float32),
  - the plain hy_v3 graph of the file's own weights (tests/gguf_reference.py: the weights rounded
    as the file holds them, every product in float64),
  - the same graph rounding each product's input activations as ggml's CPU backend does for the
    weight's type (f16 / bf16 / q8_0: tests/gguf_reference.py's ggml_inputs); and that graph
    computed in float32 against float64 (how far rounding alone moves where one input element
    falls on the other side of a rounding boundary),
for the f16, bf16 and q8_0 files and for f16 files that keep one group of matrices in float32 (what
each group's rounding costs), and the scale of our logits on the same prompts. Needs llama-cpp-python.

    python scripts/llama_cpp_rounding.py CHECKPOINT OUT_FOLDER
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from gguf_reference import forward, ggml_inputs, read_gguf, read_types  # noqa: E402

from mot_transition.checkpoint_io import load_checked, resolve_checkpoint  # noqa: E402
from mot_transition.gguf_export import check_gguf_tokenizer, write_gguf  # noqa: E402
from mot_transition.llama_cpp_check import TEXTS, _llama, _logits  # noqa: E402

GROUPS = {  # f16 files with one group of matrices kept in float32
    "token_embd (the tied output head)": ("token_embd", "output.weight"),
    "attention (q, k, v, output)": ("attn_q.", "attn_k.", "attn_v.", "attn_output"),
    "dense FFN blocks": ("ffn_gate.", "ffn_up.", "ffn_down."),
    "experts": ("_exps",),
    "all but token_embd": ("attn_", "ffn_"),
}


def main(checkpoint: str, out: str) -> int:
    from transformers import AutoTokenizer

    checkpoint, out = resolve_checkpoint(checkpoint), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_checked(checkpoint).float().eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    spec = check_gguf_tokenizer(checkpoint)
    context = model.config.n_positions
    prompts = [tokenizer(text)["input_ids"][:context] for text in TEXTS]
    with torch.no_grad():
        ours = [model(torch.tensor([ids])).logits[0].double() for ids in prompts]
    every = torch.cat(ours)
    print(f"our logits on {len(prompts)} prompts ({sum(map(len, prompts))} positions, vocabulary {every.shape[1]}): "
          f"std {every.std():.3f}, max |logit| {every.abs().max():.3f}, mean per-position range (max - min) "
          f"{(every.max(1).values - every.min(1).values).mean():.3f}, mean top-1 minus top-2 "
          f"{(every.topk(2, dim=1).values[:, 0] - every.topk(2, dim=1).values[:, 1]).mean():.3f}")
    variants = [("f16", "f16", ()), ("bf16", "bf16", ()), ("q8_0", "q8_0", ())]
    variants += [(f"f16, f32 {group}", "f16", parts) for group, parts in GROUPS.items()]
    rows = []
    print("Max abs logit difference over all positions (in brackets: the share of positions whose logits all agree within 1e-5)")
    print("| file | llama.cpp vs ours | vs the file's weights, float64 | vs the file's weights, inputs rounded as ggml | "
          "that reference vs ours | that reference in float32 vs float64 | size |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, outtype, keep in variants:
        path = out / (label.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "") + ".gguf")
        write_gguf(model, spec, path, outtype, str(checkpoint), keep_f32=keep)
        fields, tensors = read_gguf(path)
        inputs_as = ggml_inputs(read_types(path))
        llm = _llama(path, context, 2)
        row = {"file": label, "outtype": outtype, "keep_f32": list(keep), "bytes": path.stat().st_size}
        gaps = {"vs_ours": [], "vs_weights": [], "vs_ggml_reference": [], "ggml_reference_vs_ours": [], "ggml_reference_f32_vs_f64": []}
        for ids, mine in zip(prompts, ours):
            theirs = torch.from_numpy(_logits(llm, ids))
            plain, rounded = forward(fields, tensors, ids), forward(fields, tensors, ids, inputs_as)
            rounded32 = forward(fields, tensors, ids, inputs_as, torch.float32)
            for key, value in (("vs_ours", theirs - mine), ("vs_weights", theirs - plain), ("vs_ggml_reference", theirs - rounded),
                               ("ggml_reference_vs_ours", rounded - mine), ("ggml_reference_f32_vs_f64", rounded32 - rounded)):
                gaps[key].append(value.abs().max(1).values)  # the largest difference at each position
        for key, values in gaps.items():
            values = torch.cat(values)
            row[key] = float(values.max())
            row[key + "_positions_within_1e-5"] = float((values < 1e-5).double().mean())
        llm.close()
        path.unlink()
        rows.append(row)
        cells = " | ".join(f"{row[key]:.2e} ({100 * row[key + '_positions_within_1e-5']:.0f}%)" for key in gaps)
        print(f"| {label} | {cells} | {row['bytes'] / 1e6:.1f} MB |", flush=True)
    (out / "rounding.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        sys.exit(2)
    sys.exit(main(*sys.argv[1:]))
