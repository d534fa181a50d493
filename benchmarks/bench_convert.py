"""Benchmark 4: converting a MoT checkpoint against copying the same safetensors file.

The checkpoint is written once (random float32 tensors of the shapes a MoT model of the chosen
config holds, at least 1 GB); then `convert_checkpoint` and a plain copy of its files (with the same
fsync the converter does) are timed side by side. Peak memory is measured in a fresh process, as the
rise of its peak resident set (VmHWM) over what it held after imports.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from report import Benchmark, Figure
from safetensors.torch import save_file
from timing import side_by_side

from mot_transition import MoTConfig
from mot_transition.convert import convert_checkpoint, expected_shapes

MEMORY_CONSTANT = 256 << 20  # allowance on top of two largest tensors: buffers, chunked copies, Python


def _config(quick: bool) -> MoTConfig:
    d = 256 if quick else 1024  # full: expert_size 4096, lin1 and lin2 of 512 MiB each
    return MoTConfig(ffn_type="mot", n_embd=d, n_layer=2, n_head=8, n_expert=32, group_size=32, moe_layers=[1],
                     vocab_size=4096, n_positions=256)


def _write_checkpoint(directory: Path, config: MoTConfig) -> tuple[int, int]:
    """A MoT checkpoint with random weights; returns (total bytes, largest tensor bytes)."""
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.empty(shape).normal_(0.0, 0.02, generator=generator) for name, shape in expected_shapes(config).items()}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(directory)
    sizes = [t.numel() * t.element_size() for t in tensors.values()]
    return sum(sizes), max(sizes)


def _copy(src: Path, dst: Path) -> None:
    """What a user would do instead: copy the files (and fsync them, as the converter does)."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir()
    for file in src.iterdir():
        shutil.copyfile(file, dst / file.name)
        with open(dst / file.name, "rb+") as handle:
            os.fsync(handle.fileno())


_MEASURE = """
import json, sys
from mot_transition.convert import convert_checkpoint
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
before = status("VmRSS:")
convert_checkpoint(sys.argv[1], sys.argv[2], force=True)
print(json.dumps({"before": before, "peak": status("VmHWM:")}))
"""


def _peak_memory(src: Path, dst: Path) -> int | None:
    """Peak resident memory that one conversion adds to a fresh process (None off Linux)."""
    if not Path("/proc/self/status").exists():
        return None
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(src), str(dst)], check=True, capture_output=True, text=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    return figures["peak"] - figures["before"]


def convert_vs_copy(quick: bool = False) -> Benchmark:
    config = _config(quick)
    with tempfile.TemporaryDirectory(prefix="mot-bench-convert-") as tmp:
        src, dst, copied = Path(tmp) / "mot", Path(tmp) / "converted", Path(tmp) / "copied"
        src.mkdir()
        total, largest = _write_checkpoint(src, config)
        t = side_by_side(
            {"convert": lambda: convert_checkpoint(src, dst, force=True), "copy": lambda: _copy(src, copied)},
            **({"rounds": 2, "warmup": 1} if quick else {"rounds": 9, "warmup": 1}),  # disk time varies: more rounds
        )
        peak = _peak_memory(src, dst)
    mib = 1 << 20
    bound = 2 * largest + MEMORY_CONSTANT
    return Benchmark(
        4, "Converting a checkpoint against copying it",
        f"A MoT checkpoint of {total / mib:,.0f} MiB in one safetensors file (d={config.n_embd}, E=32, expert width "
        f"{config.expert_size}, float32; largest tensor {largest / mib:,.0f} MiB), converted with `convert_checkpoint` "
        f"(no calibration) and copied file by file with `shutil.copyfile` + fsync, on the same disk. Peak memory: a fresh process's peak "
        f"resident set (VmHWM) minus its resident set after imports; the bound is 2 x largest tensor + "
        f"{MEMORY_CONSTANT // mib} MiB.",
        f"Median times: convert {t.median('convert'):.2f} s, copy {t.median('copy'):.2f} s; peak memory of a conversion "
        f"{'not measured (needs /proc)' if peak is None else f'{peak / mib:,.0f} MiB'}.",
        [
            Figure("convert / copy time", t.ratio("convert", "copy"), "x", 1.50, spread=t.spread("convert", "copy")),
            Figure(
                "peak memory / (2 x largest tensor + constant)", None if peak is None else peak / bound, "x", 1.00,
                note="" if peak is None else f"peak {peak / mib:,.0f} MiB; largest tensor {largest / mib:,.0f} MiB",
            ),
        ],
    )
