"""The comparison of docs/design.md §10.2: what the switch cost and how fast transition tuning won it back.

    compare_runs([...])   reads a pipeline directory, or a transition run and optionally a Token
                          Choice baseline run, and returns the table's rows
    plot_curves(...)      the loss curves with the switch marked (needs matplotlib)
    add_task_scores(...)  lm-eval task scores of the compared models (needs the eval extra)
"""

import math
from pathlib import Path

from .destinations import save_figure
from .train.tracking import read_metrics_file
from .transition import TRANSITION_FILE, TransitionResult, load_transition

RECOVERY_MARGIN = 1.02


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run (no metrics.jsonl)")
    return read_metrics_file(path)


def eval_curve(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["eval_loss"]) for r in read_metrics(run_dir) if r.get("eval_loss") is not None]


def run_ffn_type(run_dir: Path) -> str | None:
    import tomllib

    recipe = run_dir / "recipe.toml"
    return tomllib.loads(recipe.read_text()).get("model", {}).get("ffn_type", "mot") if recipe.is_file() else None


def find_runs(paths: list[str | Path]) -> dict[str, Path]:
    """{"transition", "baseline", "mot"} -> run directory, from the paths given (a pipeline
    directory stands for its `transition`, `baseline` and `mot` sub-directories)."""
    runs: dict[str, Path] = {}
    expanded = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"no run directory at {path}")
        subdirs = [path / name for name in ("mot", "transition", "baseline") if (path / name).is_dir()]
        expanded.extend(subdirs or [path])
    for path in expanded:
        if (path / TRANSITION_FILE).is_file():
            role = "transition"
        elif (path / "metrics.jsonl").is_file():
            role = "mot" if run_ffn_type(path) == "mot" else "baseline"
        else:
            raise ValueError(f"{path} is neither a transition run ({TRANSITION_FILE}) nor a training run (metrics.jsonl)")
        if role in runs and runs[role].resolve() != path.resolve():  # the same run twice is one run
            what = {"transition": "transition run", "mot": "MoT run", "baseline": "baseline (a dense or Token Choice run)"}[role]
            raise ValueError(f"two of a kind: {runs[role]} and {path} are each a {what}; compare takes one of each")
        runs[role] = path
    if "transition" not in runs:
        raise ValueError("compare needs a transition run (a directory written by `mot-transition transition` or `run`)")
    if "mot" not in runs:
        result = load_transition(runs["transition"])
        if result.source and (Path(result.source).parent.parent / "metrics.jsonl").is_file():
            runs["mot"] = Path(result.source).parent.parent
    return runs


def compare_runs(paths: list[str | Path]) -> dict:
    """The rows of the comparison: [{"measure", "loss", "perplexity", "vs_pre_switch"}], plus the
    recovery step and the runs used."""
    runs = find_runs(paths)
    result: TransitionResult = load_transition(runs["transition"])
    pre = result.pre_switch_loss
    measures = [
        ("pre-switch loss (MoT, grouped)", pre),
        ("MoT unbatched loss (group_size=1)", result.mot_unbatched_loss),
        ("post-switch loss at step 0", result.post_switch_loss),
        (f"post-switch loss at step {result.curve[-1]['step']}", result.final_loss),
    ]
    if "baseline" in runs:
        curve = eval_curve(runs["baseline"])
        if curve:
            measures.append((f"Token Choice from scratch, step {curve[-1][0]}", curve[-1][1]))
    rows = []
    for name, loss in measures:
        rows.append({
            "measure": name,
            "loss": loss,
            "perplexity": math.exp(loss) if loss is not None else None,
            "vs_pre_switch": (loss / pre - 1) if (loss is not None and pre) else None,
        })
    return {
        "rows": rows,
        "recovery_step": result.recovery_step,
        "full_recovery_step": result.full_recovery_step,
        "transition_steps": result.steps,
        "runs": {k: str(v) for k, v in runs.items()},
    }


# the formats matplotlib's Agg backend writes with nothing else installed (pgf needs LaTeX, avif and gif Pillow plugins)
IMAGE_FORMATS = ("png", "pdf", "svg", "svgz", "jpg", "jpeg", "eps", "ps", "tif", "tiff", "webp")


def check_image_format(path: str | Path) -> None:
    """`path` ends in an image format the plot is written in (IMAGE_FORMATS), or one line saying so."""
    suffix = Path(path).suffix.lower().removeprefix(".")
    if suffix not in IMAGE_FORMATS:
        said = f"ends in .{suffix}" if suffix else "has no file extension"
        raise ValueError(f"--plot {path} {said}; give an image file name, e.g. loss_curves.png (or .pdf, .svg, .jpg)")


def plot_curves(comparison: dict, path: Path) -> Path:
    """Held-out loss against total steps: MoT, then the transition after the switch, and the
    Token Choice baseline. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {k: Path(v) for k, v in comparison["runs"].items()}
    result = load_transition(runs["transition"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    switch = 0
    if "mot" in runs:
        mot = eval_curve(runs["mot"])
        switch = mot[-1][0] if mot else 0
        ax.plot(*zip(*mot), label="MoT (grouped)", color="tab:blue", marker=".")
    ax.plot([switch + p["step"] for p in result.curve], [p["loss"] for p in result.curve],
            label="after the switch: Token Choice, one sequence at a time", color="tab:red", marker=".")
    if "baseline" in runs:
        base = eval_curve(runs["baseline"])
        if base:
            ax.plot(*zip(*base), label="Token Choice from scratch", color="tab:gray", linestyle="--", marker=".")
    if result.mot_unbatched_loss is not None:
        ax.axhline(result.mot_unbatched_loss, color="tab:blue", linestyle=":", label="MoT with group_size=1")
    ax.axvline(switch, color="black", linewidth=0.8)
    ax.annotate("switch", (switch, ax.get_ylim()[1]), textcoords="offset points", xytext=(4, -12))
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def add_task_scores(comparison: dict, tasks: list[str], include_path=None, limit: int | None = None) -> dict:
    """comparison["task_scores"] = {model: {task: {metric: value}}} for the models that can be scored
    one sequence at a time: the transition-tuned model, the Token Choice baseline, and the MoT model
    with group_size=1 (its grouped self would score by which requests share a batch)."""
    from .checkpoint_io import resolve_checkpoint
    from .harness import evaluate_tasks

    runs = {k: Path(v) for k, v in comparison["runs"].items()}
    result = load_transition(runs["transition"])
    models = {}
    if result.source:
        models["MoT, one sequence at a time (group_size=1)"] = (Path(result.source), 1)
    models["after the switch (transition-tuned Token Choice)"] = (Path(result.checkpoint), None)
    if "baseline" in runs:
        models["Token Choice from scratch"] = (resolve_checkpoint(runs["baseline"]), None)
    comparison["task_scores"] = {
        name: evaluate_tasks(path, tasks, include_path, limit, group_size=group_size) for name, (path, group_size) in models.items()
    }
    return comparison
