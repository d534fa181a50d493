"""The study's plots (the `plot` extra): loss curves on the three axes, the spike at the switch,
the temperature effect. Each raises ImportError without matplotlib; `write_plots` then returns None.

Curves are averaged over seeds point by point (the seeds of a run evaluate at the same steps);
the band is the seeds' min-max.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from .accounting import AXES
from .report import models

COLORS = {"dense": "tab:gray", "mot": "tab:blue", "token_choice": "tab:green"}


def write_plots(out: Path, results: list[dict]) -> list[Path] | None:
    """OUT/curves.png, spike.png, temperature.png; None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    return [plot_curves(out / "curves.png", results), plot_spike(out / "spike.png", results),
            plot_temperatures(out / "temperature.png", results)]


def _mean_curve(results: list[dict], name: str, axis: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """(x, mean loss, min loss, max loss) by evaluation, over the seeds."""
    curves = [seed["curves"][name] for seed in results]
    length = min(len(c) for c in curves)
    x = [statistics.fmean(c[i][axis] for c in curves) for i in range(length)]
    losses = [[c[i]["loss"] for c in curves] for i in range(length)]
    return x, [statistics.fmean(v) for v in losses], [min(v) for v in losses], [max(v) for v in losses]


def plot_curves(path: Path, results: list[dict]) -> Path:
    import matplotlib.pyplot as plt

    fig, panels = plt.subplots(1, 3, figsize=(16, 4.8), sharey=True)
    names = models(results)
    transitions = [name for name in names if name.startswith("transition-")]
    shades = plt.cm.Reds([0.45 + 0.5 * i / max(1, len(transitions) - 1) for i in range(len(transitions))])
    colors = {**COLORS, **dict(zip(transitions, shades))}
    for ax, axis in zip(panels, AXES):
        for name in [n for n in names if n not in transitions] + transitions[::-1]:  # the shorter transitions on top
            x, mean, low, high = _mean_curve(results, name, axis)
            ax.plot(x, mean, label=names[name], color=colors[name], marker=".", linestyle="--" if name == "token_choice" else "-")
            if len(results) > 1:
                ax.fill_between(x, low, high, color=colors[name], alpha=0.15)
        switch = statistics.fmean(seed["curves"]["mot"][-1][axis] for seed in results)
        ax.axvline(switch, color="black", linewidth=0.8)
        ax.annotate("switch", (switch, 1), xycoords=("data", "axes fraction"), textcoords="offset points", xytext=(4, -12))
        ax.set_xlabel(AXES[axis] + (" (this machine)" if axis == "seconds" else ""))
        ax.grid(alpha=0.3)
    panels[0].set_ylabel("held-out loss (nats/token)")
    panels[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_spike(path: Path, results: list[dict]) -> Path:
    """The loss right after the switch, percent above the pre-switch loss, per top-k (bars: the
    mean over seeds; whiskers: min-max)."""
    import matplotlib.pyplot as plt

    ks = list(results[0]["spike"])
    kinds = [kind for kind in ("plain", "calibrated") if kind in results[0]["spike"][ks[0]]]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    width = 0.8 / len(kinds)
    for j, kind in enumerate(kinds):
        values = [[100 * (seed["spike"][k][kind] / seed["pre_switch_loss"] - 1) for seed in results] for k in ks]
        means = [statistics.fmean(v) for v in values]
        errors = [[m - min(v) for m, v in zip(means, values)], [max(v) - m for m, v in zip(means, values)]]
        ax.bar([i + j * width for i in range(len(ks))], means, width, yerr=errors, capsize=3,
               label="without calibration" if kind == "plain" else "with calibration")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks([i + (len(kinds) - 1) * width / 2 for i in range(len(ks))], [f"top-{k}" for k in ks])
    ax.set_ylabel("loss right after the switch, % above pre-switch")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_temperatures(path: Path, results: list[dict]) -> Path:
    import matplotlib.pyplot as plt

    temperatures = sorted(results[0]["temperatures"], key=float)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for key, label in (("grouped", "MoT, grouped"), ("unbatched", "MoT, group_size=1"), ("converted", "converted, no training")):
        means = [statistics.fmean(seed["temperatures"][t][key] for seed in results) for t in temperatures]
        ax.plot([float(t) for t in temperatures], means, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("MoT controller temperature T")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["write_plots"]
