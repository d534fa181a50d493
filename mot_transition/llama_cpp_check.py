"""Check a GGUF export against llama.cpp itself, through llama-cpp-python (not a dependency: it
builds llama.cpp from source; scripts/check-llama-cpp.sh installs it and runs this):

    python -m mot_transition.llama_cpp_check CHECKPOINT FILE.gguf [FILE.gguf ...]

For every file: the logits at every position of a few prompts against ours (max abs difference;
llama.cpp with a float32 KV cache), greedy continuations (llama.cpp's against ours), tokenisation of
text with code, whitespace runs, unicode and digits (llama.cpp's tokenizer against ours), and the
held-out perplexity of the checkpoint's own data where it has some (else of the prompts).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

TEXTS = [
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "import os\n\n\nclass Path:\n\t\"\"\"A path.\"\"\"\n    \n    def __init__(self, *parts):   \n        self.parts = parts\n",
    "naïve café, Ünïcödé, 東京, Ελληνικά, emoji 🙂🚀 and   runs   of    spaces\n\n\n\t\t",
    "0123456789 3.14159265 1e-3 0x7fff_ffff 1,000,000 -42 v2.13.0",
]


def _llama(path: Path, context: int, threads: int):
    from llama_cpp import Llama

    # type_k / type_v 0: a float32 KV cache (llama.cpp's default is float16)
    return Llama(model_path=str(path), n_ctx=context, n_batch=context, n_ubatch=context, n_threads=threads,
                 logits_all=True, type_k=0, type_v=0, verbose=False)


def _logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: llm.n_tokens], dtype=np.float64)


def _greedy(llm, ids: list[int], new: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(new):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def _nll(logits: np.ndarray, ids: list[int]) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and the number of predictions."""
    logits = torch.from_numpy(logits[:-1])
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum")), len(ids) - 1


def rounded_as(model, outtype: str):
    """A copy of `model` whose weights are rounded as the GGUF file of `outtype` holds them (its
    matrices in f16 or bf16; norms, routers and vectors in f32): what separates the mapping from the
    rounding. None for q8_0 (block quantisation has no torch dtype) and f32."""
    import copy

    dtype = {"f16": torch.float16, "bf16": torch.bfloat16}.get(outtype)
    if dtype is None:
        return None
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if p.ndim >= 2 and not name.endswith("controller"):
                p.copy_(p.to(dtype).float())
    return twin


def compare(checkpoint: str | Path, files: list[str | Path], new_tokens: int = 16, threads: int = 2,
            heldout: list[list[int]] | None = None) -> list[dict]:
    """One row a GGUF file: {"file", "max_abs_logit_difference", "same_greedy", "same_tokens",
    "perplexity", "our_perplexity"}; `heldout`: sequences to measure perplexity on (default: TEXTS)."""
    from transformers import AutoTokenizer

    from .checkpoint_io import load_checked, resolve_checkpoint

    checkpoint = resolve_checkpoint(checkpoint)
    model = load_checked(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    context = model.config.n_positions
    tokenized = [tokenizer(text)["input_ids"] for text in TEXTS]
    prompts = [ids[:context] for ids in tokenized]  # the logits' prompts; tokenisation is compared on the whole texts
    heldout = [ids[:context] for ids in heldout] if heldout else prompts
    with torch.no_grad():
        ours = {tuple(ids): model(torch.tensor([ids])).logits[0].double().numpy() for ids in prompts + heldout}
        our_greedy = [model.generate(torch.tensor([ids[:32]]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[0, 32:].tolist()
                      for ids in prompts]
    nll = [_nll(ours[tuple(ids)], ids) for ids in heldout]
    our_perplexity = math.exp(sum(n for n, _ in nll) / sum(c for _, c in nll))
    rows = []
    for path in files:
        llm = _llama(Path(path), context, threads)
        difference = max(float(np.abs(_logits(llm, ids) - ours[tuple(ids)]).max()) for ids in prompts)
        same_tokens = all(llm.tokenize(text.encode(), add_bos=False, special=False) == ids for text, ids in zip(TEXTS, tokenized))
        same_greedy = all(_greedy(llm, ids[:32], new_tokens) == want for ids, want in zip(prompts, our_greedy))
        nll = [_nll(_logits(llm, ids), ids) for ids in heldout]
        twin = rounded_as(model, _outtype(path))
        if twin is not None:
            with torch.no_grad():
                rounded = max(float(np.abs(_logits(llm, ids) - twin(torch.tensor([ids])).logits[0].double().numpy()).max()) for ids in prompts)
        else:
            rounded = difference if _outtype(path) == "f32" else None
        rows.append({"file": str(path), "max_abs_logit_difference": difference, "against_rounded_weights": rounded, "same_tokens": same_tokens, "same_greedy": same_greedy,
                     "perplexity": math.exp(sum(n for n, _ in nll) / sum(c for _, c in nll)), "our_perplexity": our_perplexity})
        llm.close()
    return rows


def _outtype(path) -> str | None:
    """The output type the export's report (FILE.gguf.json) names."""
    import json

    report = Path(str(path) + ".json")
    return json.loads(report.read_text()).get("outtype") if report.is_file() else None


def heldout_of(checkpoint: str | Path, sequences: int = 8) -> list[list[int]] | None:
    """The first `sequences` held-out rows of the run that trained `checkpoint`, if its recipe is there."""
    from .checkpoint_io import resolve_checkpoint
    from .train import prepare_run_data
    from .transition import run_recipe

    try:
        recipe = run_recipe(resolve_checkpoint(checkpoint))
    except (FileNotFoundError, ValueError, KeyError):
        return None
    heldout = prepare_run_data(recipe)[2]
    return [torch.as_tensor(heldout[i]).reshape(-1).tolist() for i in range(min(sequences, len(heldout)))]


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m mot_transition.llama_cpp_check CHECKPOINT FILE.gguf [FILE.gguf ...]", file=sys.stderr)
        return 2
    import llama_cpp

    rows = compare(argv[0], argv[1:], heldout=heldout_of(argv[0]))
    print(f"llama-cpp-python {llama_cpp.__version__}; ours: perplexity {rows[0]['our_perplexity']:.4f}")
    print("| file | max abs logit difference | against our weights rounded as the file's | same greedy tokens | same tokenisation | perplexity | vs ours |")
    print("| --- | ---: | ---: | --- | --- | ---: | ---: |")
    for r in rows:
        rounded = "—" if r["against_rounded_weights"] is None else f"{r['against_rounded_weights']:.2e}"
        print(f"| {Path(r['file']).name} | {r['max_abs_logit_difference']:.2e} | {rounded} | {'yes' if r['same_greedy'] else 'NO'} | "
              f"{'yes' if r['same_tokens'] else 'NO'} | {r['perplexity']:.4f} | {100 * (r['perplexity'] / r['our_perplexity'] - 1):+.2f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
