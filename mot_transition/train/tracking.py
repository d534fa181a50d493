"""Where a run's per-step metrics go (recipe key `train.report_to`): metrics.jsonl always (the
`compare` and `run` commands read it), and on request TensorBoard, trackio and Weights & Biases
through their own libraries (optional extras), all working offline.

A record is the dict `Trainer.step` returns (plus `eval_loss` on evaluation steps); the trackers
get it flattened to scalars: `expert_load` {layer: [fraction of tokens per expert]} becomes
`expert_load/layer_3/expert_0`..., `expert_load_entropy` {layer: nats} `expert_load_entropy/layer_3`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ..destinations import save_figure
from ..layers.balance import routing_counts
from ..jsonfiles import dumps
METRICS_FILE = "metrics.jsonl"
REPORTERS = ("jsonl", "tensorboard", "trackio", "wandb")  # each tracker is its own package and extra


def check_report_to(names: list[str]) -> None:
    """One-line ValueError for an unknown reporter or a library not installed. "jsonl" may be left
    out: metrics.jsonl is written whatever the list says (`train.report_to=tensorboard` adds TensorBoard)."""
    for name in names:
        if name not in REPORTERS:
            raise ValueError(f"recipe key 'train.report_to' has {name!r}; choose from {', '.join(REPORTERS)}")
    import importlib.util

    for name in names:
        if name != "jsonl" and importlib.util.find_spec(name) is None:
            raise ValueError(
                f"recipe key 'train.report_to' has {name!r}, which needs the {name} package: "
                f"pip install 'mot-transition[{name}]'"
            )


def scalars(record: dict) -> dict[str, float]:
    """A record flattened to name -> number (None and non-numbers left out)."""
    flat = {}
    for key, value in record.items():
        if key == "step" or value is None:
            continue
        if key == "expert_load":
            for layer, fractions in value.items():
                flat.update({f"expert_load/layer_{layer}/expert_{e}": f for e, f in enumerate(fractions)})
        elif key == "expert_load_entropy":
            flat.update({f"expert_load_entropy/layer_{layer}": h for layer, h in value.items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[key] = float(value)
    return flat


def expert_load(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Tokens that have each expert among their top k, per expert layer: (layers, E) counts."""
    return routing_counts(list(router_logits), top_k, None)[:, :-1]


def load_record(counts: torch.Tensor, layers: list[int]) -> dict:
    """{"expert_load": {layer: fractions}, "expert_load_entropy": {layer: nats}} from (layers, E) counts.
    A fraction is of all (token, choice) pairs, so the fractions of a layer sum to 1; uniform load has
    entropy log E."""
    load, entropy = {}, {}
    for layer, row in zip(layers, counts.double().cpu()):
        fractions = row / row.sum().clamp(min=1)
        load[str(layer)] = [round(f, 6) for f in fractions.tolist()]
        entropy[str(layer)] = round(-sum(f * math.log(f) for f in fractions.tolist() if f > 0), 6)
    return {"expert_load": load, "expert_load_entropy": entropy}


class Reporters:
    """Every reporter of a run, opened on the main rank at `step` (0, or the step resumed from)."""

    def __init__(self, names: list[str], run_dir: Path, run_name: str, config: dict, step: int):
        check_report_to(names)
        run_dir = Path(run_dir)
        _truncate_metrics(run_dir / METRICS_FILE, step)
        self._jsonl, self._trackers = open(run_dir / METRICS_FILE, "a"), []
        try:
            for name in names:
                if name != "jsonl":
                    self._trackers.append(_OPEN[name](run_dir, run_name, config, step))
        except BaseException:
            self.close()
            raise

    def log(self, record: dict) -> None:
        self._jsonl.write(dumps(record, indent=None) + "\n")
        self._jsonl.flush()
        values = scalars(record)
        for tracker in self._trackers:
            tracker.log(values, record["step"])

    def close(self) -> None:
        self._jsonl.close()
        for tracker in self._trackers:
            tracker.close()


def read_metrics_file(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. A last line cut short (the process was killed while writing
    it) is dropped; any other line that is not a record is a one-line ValueError naming the line."""
    return [record for _, record in _metric_lines(path)]


def _metric_lines(path: Path) -> list[tuple[str, dict]]:
    lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError
        except (ValueError, RecursionError):
            if number == len(lines):
                break  # half-written by a killed run
            raise ValueError(f"{path} line {number} is not a metrics record; fix or delete that line") from None
        records.append((line, record))
    return records


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past `step` (a resumed run rewrites the steps after its checkpoint) and a
    half-written last line; the file is replaced whole, never left half-rewritten."""
    if not path.exists():
        return
    kept = [line for line, record in _metric_lines(path) if record["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class _TensorBoard:
    def __init__(self, run_dir: Path, run_name: str, config: dict, step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1 if step else None)
        if not step:
            self.writer.add_text("recipe", "```\n" + json.dumps(config, indent=1) + "\n```")

    def log(self, values: dict, step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class _Trackio:
    """trackio keeps its runs in a local database (TRACKIO_DIR, else its own default)."""

    def __init__(self, run_dir: Path, run_name: str, config: dict, step: int):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "mot-transition"), name=run_name,
                                config=config, resume="allow" if step else "never")

    def log(self, values: dict, step: int) -> None:
        self.trackio.log(values, step=step)

    def close(self) -> None:
        self.trackio.finish()


class _Wandb:
    """Offline unless WANDB_MODE says otherwise: the run lands in RUN_DIR/wandb, `wandb sync` uploads it."""

    def __init__(self, run_dir: Path, run_name: str, config: dict, step: int):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mot-transition"), name=run_name, config=config,
                              dir=str(run_dir), mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


_OPEN = {"tensorboard": _TensorBoard, "trackio": _Trackio, "wandb": _Wandb}


def plot_training(run_dir: Path, switch_at_step: int | None = None) -> Path | None:
    """RUN_DIR/loss_curves.png from metrics.jsonl: the training loss of every step, the held-out loss
    where it was measured, the in-run switch marked. None without matplotlib (the `plot` extra)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics_file(Path(run_dir) / METRICS_FILE)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r["step"] for r in records], [r["lm_loss"] for r in records], label="training loss", color="tab:blue",
            alpha=0.6, linewidth=0.8)
    held_out = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if held_out:
        ax.plot(*zip(*held_out), label="held-out loss", color="tab:red", marker=".")
    if switch_at_step is not None:
        ax.axvline(switch_at_step, color="black", linewidth=0.8, label="switch to Token Choice")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(run_dir) / "loss_curves.png"
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path
