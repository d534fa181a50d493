"""FSDP2 on one GPU (scripts/gpu-check.sh): the same recipe trained whole and sharded in a process
group of one, with bf16 gathers and float32 gradient reduction on a GPU; prints and saves both
runs' losses and the largest weight difference.

    python scripts/gpu_fsdp_check.py --out gpu-check [--device cpu --steps 3]   (cpu: a smoke test)
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from mot_transition.train import load_recipe, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    keys = [f"train.device={args.device}", f"train.steps={args.steps}", f"train.eval_every={args.steps}", f"train.checkpoint_every={args.steps}"]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs["whole"] = train(load_recipe("tiny-token-choice", keys), Path(tmp) / "whole", progress=False)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            runs["fsdp"] = train(load_recipe("tiny-token-choice", keys + ["train.parallel=fsdp"]), Path(tmp) / "fsdp", progress=False)
        finally:
            dist.destroy_process_group()
        weights = {name: load_file(run.checkpoint / "model.safetensors") for name, run in runs.items()}
        difference = max((weights["fsdp"][k] - weights["whole"][k]).abs().max().item() for k in weights["whole"])
        curves = {name: [json.loads(line)["loss"] for line in (run.checkpoint.parent.parent / "metrics.jsonl").read_text().splitlines()]
                  for name, run in runs.items()}
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device, "steps": args.steps,
              "final_loss": {name: c[-1] for name, c in curves.items()}, "eval_loss": {name: r.eval_loss for name, r in runs.items()},
              "max_weight_difference": difference}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fsdp.json").write_text(json.dumps({**result, "loss_curves": curves}, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
