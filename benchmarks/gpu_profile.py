"""Why Token Choice trains slower than MoT on a GPU: a bare training step of each medium recipe, timed and
profiled (a script for a session that is lent a GPU; `scripts/gpu-check.sh --profile` runs it).

    python benchmarks/gpu_profile.py --out DIR                        # on the GPU machine: about a minute
    python benchmarks/gpu_profile.py --out DIR --device cpu --quick   # checks the script runs

For `medium-mot` and `medium-token-choice` (and their llama twins with --all): the model of the recipe
on random tokens, at the recipe's batch, bf16 autocast, AdamW; one step = forward, backward, optimizer.
It writes DIR/profile.md:
1. tokens/s of the bare step, to set beside the trainer's (benchmarks/gpu.py): if Token Choice is as far
   behind here, the model is slow; if not, the trainer's step around it is;
2. per recipe, how busy the GPU is (kernel time over wall time: well below 1 means the host's
   launches, not the kernels, set the pace), how many times a step waits for the GPU (host reads,
   torch.cuda's sync debug mode), and the operations that take the most GPU time and the most host time.
"""

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mot_transition import MoTLMHeadModel  # noqa: E402
from mot_transition.train import load_recipe  # noqa: E402

QUICK = ["model.n_embd=64", "model.n_layer=2", "model.n_head=2", "model.n_expert=4", "model.group_size=4",
         "model.moe_layers=[1]", "data.seq_len=32", "train.batch_size=8"]


def build(recipe: str, device: torch.device, quick: bool):
    r = load_recipe(recipe, QUICK if quick else [])
    model = MoTLMHeadModel(r.model_config(vocab_size=512 if quick else 32000)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, model.config.vocab_size, (r.train.batch_size, r.data.seq_len), device=device)
    bf16 = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, ids.numel()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device: torch.device, n: int) -> float:
    """Median seconds of a step over n steps, each synchronised."""
    times = []
    for _ in range(n):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def host_waits(step, device: torch.device) -> list[str]:
    """Where one step waits for the GPU (torch.cuda's sync debug mode warns at each): one line each."""
    if device.type != "cuda":
        return []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
            sync(device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


def profile(step, device: torch.device, rows: int) -> tuple[float | None, str, str]:
    """(the GPU's kernel time over wall time, or None on a CPU; the top operations by device time, by host time)"""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    start = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync(device)
    wall = (time.perf_counter() - start) / 3
    events = prof.key_averages()
    device_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    if device.type != "cuda":
        return None, "(no GPU)", events.table(sort_by="self_cpu_time_total", row_limit=rows)
    from torch.autograd import DeviceType

    # the kernels' own rows (a CPU operation's row repeats the time of the kernels it launched)
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    busy = sum(e.self_device_time_total for e in kernels) / 1e6 / 3 / wall
    return busy, events.table(sort_by=device_key, row_limit=rows), events.table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--all", action="store_true", help="the llama twins too")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; pass --device cpu --quick to check the script")
    args.out.mkdir(parents=True, exist_ok=True)
    recipes = ["medium-mot", "medium-token-choice"] + (["medium-llama-mot", "medium-llama-token-choice"] if args.all else [])
    lines = [f"# A bare training step, profiled: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}", "",
             f"torch {torch.__version__}; `python benchmarks/gpu_profile.py {' '.join(sys.argv[1:])}`", "",
             "| recipe | ms a step | tokens/s | GPU busy | host waits a step |", "| --- | ---: | ---: | ---: | ---: |"]
    details = []
    for recipe in recipes:
        step, tokens = build(recipe, device, args.quick)
        for _ in range(3):  # warm-up
            step()
        seconds = timed(step, device, 3 if args.quick else 10)
        waits = host_waits(step, device)
        busy, by_device, by_host = profile(step, device, 8 if args.quick else 15)
        shown = "n/a" if busy is None else f"{busy:.0%}"
        lines.append(f"| {recipe} | {seconds * 1e3:.1f} | {tokens / seconds:,.0f} | {shown} | {len(waits) if device.type == 'cuda' else 'n/a'} |")
        details += [f"## {recipe}", "", "Host waits: " + (", ".join(sorted(set(waits))) or "none"), "",
                    "Most device time:", "", "```", by_device, "```", "", "Most host time:", "", "```", by_host, "```", ""]
        (args.out / "profile.md").write_text("\n".join(lines + [""] + details) + "\n")  # after each recipe: a cut run keeps it
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
