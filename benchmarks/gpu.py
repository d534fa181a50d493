"""The GPU check of issue 10 (item 4), as one prepared script for a session that is lent a GPU.

    python benchmarks/gpu.py --out DIR                  # on the GPU machine: about 6 minutes on an H100
    python benchmarks/gpu.py --out DIR --device cpu --quick   # what CI-less machines can check: it runs

It writes DIR/gpu.md (and prints it):
1. the feed-forward layers in bfloat16, forward + backward: TFLOP/s of dense, MoT, Token Choice
   (ours, top-1) and transformers' Mixtral block (grouped_mm, SwiGLU experts of about equal FLOPs), at the
   medium recipes' width; and MoT and Token Choice as the trainer runs them (float32 weights under bf16
   autocast);
2. a few hundred training steps of `medium-mot` and `medium-token-choice` (bf16 autocast, the
   recipe's batch), and of `medium-mot` with `train.compile=true`: tokens/s, MFU and peak memory
   from the trainer's own metrics (median over the steps after the first 10).
Run the CUDA tests beside it: `pytest -m cuda tests/test_cuda.py tests/test_compile.py`.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mot_transition import MoTConfig  # noqa: E402
from mot_transition.layers.dense import DenseFFN  # noqa: E402
from mot_transition.layers.mot import MixtureOfTokens  # noqa: E402
from mot_transition.layers.token_choice import TokenChoice  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def layer_tflops(device: torch.device, quick: bool) -> list[tuple[str, float, float]]:
    """(layer, ms per forward + backward, TFLOP/s of the dense-equivalent FLOPs) in bfloat16."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    d, E, g, rows, seq = (128, 8, 8, 16, 64) if quick else (512, 32, 32, 64, 512)
    f = 4 * d  # flop-matched expert width with E = g; the dense FFN's width
    config = MoTConfig(vocab_size=16, n_embd=d, n_layer=2, n_head=max(1, d // 64), n_expert=E, group_size=g,
                       num_experts_per_tok=1, expert_size=f, n_inner=f, ffn_type="mot")
    swiglu = round(2 * f / 3 / 64) * 64  # SwiGLU experts of about equal FLOPs (3 matrices of width ~2f/3), rows of 16 bytes
    mixtral = MixtralSparseMoeBlock(MixtralConfig(hidden_size=d, intermediate_size=swiglu, num_local_experts=E,
                                                  num_experts_per_tok=1, experts_implementation="grouped_mm"))
    with torch.no_grad():
        for p in mixtral.parameters():
            p.normal_(0.0, 0.02)
    # (layer, under autocast): bf16 weights, or float32 weights under bf16 autocast as the trainer runs them
    layers = {"dense FFN": (DenseFFN(config), False), "MoT": (MixtureOfTokens(config), False),
              "Token Choice (ours)": (TokenChoice(config), False), "Mixtral block (grouped_mm)": (mixtral, False),
              "MoT, float32 under autocast": (MixtureOfTokens(config), True),
              "Token Choice (ours), float32 under autocast": (TokenChoice(config), True)}
    tokens = rows * seq
    flops = 3 * 2 * tokens * 2 * d * f  # forward + backward of one FFN of width f per token
    results = []
    for name, (layer, autocast) in layers.items():
        dtype = torch.float32 if autocast else torch.bfloat16
        layer = layer.to(device, dtype).train()
        x = torch.randn(rows, seq, d, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn_like(x)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out = layer(x)
            y = out[0] if isinstance(out, tuple) else out
            y.backward(dy.to(y.dtype))

        for _ in range(3):
            step()
        _sync(device)
        n = 3 if quick else 20
        start = time.perf_counter()
        for _ in range(n):
            step()
        _sync(device)
        seconds = (time.perf_counter() - start) / n
        results.append((name, seconds * 1e3, flops / seconds / 1e12))
    return results


def training(recipe: str, out: Path, steps: int, overrides: list[str], quick: bool) -> dict:
    """Train `recipe` for `steps` steps; the medians of its metrics after the first 10 steps."""
    from mot_transition.train import load_recipe, train

    keys = [f"train.steps={steps}", f"train.eval_every={steps}", f"train.checkpoint_every={steps}", "train.log_every=50",
            "data.eval_batches=4"]  # the built-in corpus's held-out split has fewer than the recipe's 16 x 32 sequences
    if quick:
        keys += ["train.batch_size=8", "data.max_bytes=300000", "data.vocab_size=300", "data.seq_len=32",
                 "model.n_embd=32", "model.n_layer=2", "model.n_head=2", "model.n_expert=4", "model.group_size=4",
                 "model.moe_layers=[1]", "data.eval_batch_size=8", "data.eval_batches=1", "train.device=cpu"]
    start = time.perf_counter()
    result = train(load_recipe(recipe, keys + overrides), out, progress=False)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    later = lines[min(10, len(lines) - 1):]
    row = {"recipe": " ".join([recipe, *overrides]), "steps": steps, "seconds": time.perf_counter() - start,
           "eval_loss": result.eval_loss}
    for key in ("tokens_per_s", "mfu", "peak_memory_gib"):
        values = [m[key] for m in later if m.get(key) is not None]
        row[key] = statistics.median(values) if values else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="small shapes and 12 steps: checks the script runs")
    parser.add_argument("--data", help="a prepared corpus for the training runs (data.source; default: the recipes' own)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; pass --device cpu --quick to check the script")
    args.out.mkdir(parents=True, exist_ok=True)
    steps = 12 if args.quick else args.steps
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"# GPU check: {card}", "", f"torch {torch.__version__}; `python benchmarks/gpu.py {' '.join(sys.argv[1:])}`", "",
             "## Feed-forward layers, bfloat16, forward + backward", "",
             "TFLOP/s of the dense FFN's FLOPs (3 x 2 x tokens x 2 d f): what each layer does for a token at equal active FLOPs.", "",
             "| layer | ms | TFLOP/s |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {ms:.2f} | {tflops:.2f} |" for name, ms, tflops in layer_tflops(device, args.quick)]
    data = [f"data.source={args.data!r}"] if args.data else []
    lines += ["", f"## Training, {steps} steps (bf16 autocast on CUDA)", "", f"Data: {args.data or 'as each recipe says'}.", "",
              "| run | s | tokens/s | MFU | peak memory GiB | held-out loss |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    write(args.out, lines)  # written after each part: a run cut short keeps what it measured
    with tempfile.TemporaryDirectory(prefix="gpu-runs-") as runs:  # the runs' checkpoints: not for --out
        for recipe, overrides in (("medium-mot", []), ("medium-token-choice", []), ("medium-mot", ["train.compile=true"])):
            name = recipe + ("-compiled" if overrides else "")
            row = training(recipe, Path(runs) / name, steps, data + overrides, args.quick)
            show = lambda v, fmt: "n/a" if v is None else format(v, fmt)  # noqa: E731
            lines.append(f"| {' '.join([recipe, *overrides])} | {row['seconds']:.0f} | {show(row['tokens_per_s'], ',.0f')} "
                         f"| {show(row['mfu'], '.1%')} | {show(row['peak_memory_gib'], '.2f')} | {row['eval_loss']:.4f} |")
            write(args.out, lines)
    print("\n".join(lines))


def write(out: Path, lines: list[str]) -> None:
    (out / "gpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
