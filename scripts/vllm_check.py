"""Compare vLLM's greedy output on an export with plain transformers', token for token.

Runs inside the vLLM venv (it never imports mot_transition); scripts/check-vllm-cpu.sh calls it.

    python scripts/vllm_check.py offline EXPORT_DIR [--dtype float32]   # vllm.LLM in this process
    python scripts/vllm_check.py server EXPORT_DIR [--url URL]          # a server already running

Both generate 20 tokens at temperature 0 from four prompts, with the end-of-text token ignored on
both sides (so every prompt gives 20 tokens), and compare prompt ids, generated ids and text with
transformers' greedy generate in float32. `offline` also compares the log-probability vLLM reports
for each chosen token, and checks that the comparison can fail: the same weights with the top-k
weights renormalised (norm_topk_prob=True) must change some greedy tokens. Exit status 0 when every
prompt agrees.
"""

import argparse
import json
import sys
import urllib.request

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = ["def main(", "import os\n", "for i in range(", "class Foo:\n    def __init__(self"]
NEW_TOKENS = 20


def load(path, **overrides):
    """The export in float32, generating exactly NEW_TOKENS tokens (no stop at end-of-text)."""
    config = transformers.AutoConfig.from_pretrained(path, **overrides)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def greedy(model, prompt_ids):
    """Transformers' greedy continuation and the log-probability of each chosen token."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                         do_sample=False, output_scores=True, return_dict_in_generate=True)
    new = out.sequences[0, len(prompt_ids):].tolist()
    logps = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, new)]
    return new, logps


def report(rows, extra=""):
    n = len(rows)
    for row in rows:
        print(json.dumps(row))
    same = {k: sum(r[k] for r in rows) for k in ("same_prompt_ids", "same_ids", "same_text")}
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"python {sys.version.split()[0]}: prompt ids equal {same['same_prompt_ids']}/{n}, "
          f"greedy ids equal {same['same_ids']}/{n}, text equal {same['same_text']}/{n}{extra}")
    return all(v == n for v in same.values())


def offline(args):
    tok = AutoTokenizer.from_pretrained(args.path)
    model = load(args.path)
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    ref = [greedy(model, ids) for ids in prompt_ids]
    renormalised = load(args.path, norm_topk_prob=True)
    sensitive = sum(greedy(renormalised, ids)[0] != r[0] for ids, r in zip(prompt_ids, ref))
    del model, renormalised

    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.path, dtype=args.dtype, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    rows, worst = [], 0.0
    for prompt, ids, (new, logps), out in zip(PROMPTS, prompt_ids, ref, llm.generate(PROMPTS, params)):
        got = list(out.outputs[0].token_ids)
        if got == new:
            got_logps = [step[t].logprob for step, t in zip(out.outputs[0].logprobs, got)]
            worst = max(worst, max(abs(a - b) for a, b in zip(got_logps, logps)))
        rows.append({"prompt": prompt, "same_prompt_ids": list(out.prompt_token_ids) == ids,
                     "same_ids": got == new, "same_text": out.outputs[0].text == tok.decode(new),
                     "vllm": out.outputs[0].text, "transformers": tok.decode(new)})
    ok = report(rows, f"; vllm {vllm.__version__} --dtype {args.dtype}; max |log-probability "
                      f"difference| of the chosen tokens {worst:.2e} (prompts whose ids agree); "
                      f"norm_topk_prob=True changes the greedy ids of {sensitive}/{len(PROMPTS)}")
    return ok


def server(args):
    tok = AutoTokenizer.from_pretrained(args.path)
    model = load(args.path)
    rows = []
    for prompt in PROMPTS:
        body = {"model": args.model or args.path, "prompt": prompt, "max_tokens": NEW_TOKENS,
                "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        request = urllib.request.Request(args.url, json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        choice = json.load(urllib.request.urlopen(request, timeout=600))["choices"][0]
        ids = tok(prompt)["input_ids"]
        new, _ = greedy(model, ids)
        rows.append({"prompt": prompt, "same_prompt_ids": choice.get("prompt_token_ids") == ids,
                     "same_ids": choice.get("token_ids") == new,
                     "same_text": choice["text"] == tok.decode(new), "server": choice["text"]})
    return report(rows, f"; server {args.url}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("offline")
    p.add_argument("path")
    p.add_argument("--dtype", default="float32")
    p = sub.add_parser("server")
    p.add_argument("path")
    p.add_argument("--url", default="http://localhost:8000/v1/completions")
    p.add_argument("--model", help="the served model name (default: PATH, as --model gave it)")
    args = parser.parse_args()
    sys.exit(0 if (offline if args.mode == "offline" else server)(args) else 1)


if __name__ == "__main__":
    main()
