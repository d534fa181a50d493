"""The report of a study grid, from its results files alone (RESULTS/report.md, RESULTS/summary.json
and, with matplotlib, RESULTS/loss-flops.png and RESULTS/lr-sweep.png). It can be written at any
point: what has not run yet is left out, and says so.

What it reads off the runs, per size (a mean over the seeds that finished, with the seed spread):
    final loss       held-out loss at the end of each run, and the run's training FLOPs
    power law        per kind, L = a * C^-b fitted (least squares in log-log) to the sizes' mean
                     final losses against their training FLOPs (two or more sizes)
    multiplier       the compute multiplier of a kind against dense: the dense FLOPs that reach the
                     kind's final loss on dense's fitted power law, divided by the kind's FLOPs
                     (> 1: the kind gets there with less compute); per seed, so it has a spread
    reaching         the paper's measure: the fraction of dense's steps at which a kind's curve first
                     reaches dense's final loss (same size, same seed); "not reached" counted
    transition       MoT -> Token Choice: the loss right after the switch, the steps until the loss
                     is back at the pre-switch loss, and its final loss against Token Choice from
                     scratch at the same training FLOPs (the MoT run's included), read off the
                     baseline's curve (it runs N + the longest transition's steps)
Wall-clock time is not compared: the grid's runs shared the machine with other work.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from ..jsonfiles import read_json_object, write_json
from .accounting import first_reaching, loss_at
from .grid_verdict import KINDS, label_of, length, line_fit, verdict
from .grid_notes import OTHER_SOURCE, PAST_DENSE, final_notes, gap_sources, interim, lr_checks, recovery, schedule_note, seeds_done, transition_notes
from .report import BEYOND, judge, show

REPORT, SUMMARY = "report.md", "summary.json"


def at_edge(row: dict) -> bool:
    """Whether a kind's picked learning rate is the smallest or the largest it tried."""
    tried = [float(v) for v in row["losses"]]
    return row["lr"] in (min(tried), max(tried))


def load_results(results: Path) -> dict:
    """{"grid", "lr" ({label: {kind: {"lr", "losses"}}} for the sizes whose sweep has ended), "sizes":
    {label: {seed: {name: record}}}} where a training run's name is its kind (at its size's picked
    learning rate) and a transition's `transition-Ppct`."""
    grid = read_json_object(results / "grid.json")
    lr = read_json_object(results / "lr.json") if (results / "lr.json").is_file() else {}
    sizes: dict[str, dict[int, dict]] = {}
    for size in grid["sizes"]:
        label = f"d{size['n_embd']}"
        sizes[label] = {}
        for folder in sorted((results / label).glob("seed-*")):
            runs, picked = {}, lr.get(label, {})
            for kind, row in picked.items():
                if (folder / f"{kind}-lr{row['lr']:g}.json").is_file():
                    runs[kind] = read_json_object(folder / f"{kind}-lr{row['lr']:g}.json")
            for path in sorted(folder.glob("transition-*.json")):
                runs[path.stem] = read_json_object(path)
            sizes[label][int(folder.name.removeprefix("seed-"))] = runs
    return {"grid": grid, "lr": lr, "sizes": sizes}


def power_law(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(a, b) of L = a * C^-b through (C, L) points by least squares in log-log; None for fewer than two."""
    if len({c for c, _ in points}) < 2:
        return None
    intercept, slope = line_fit([(math.log(c), math.log(loss)) for c, loss in points])
    return math.exp(intercept), -slope


def flops_for(law: tuple[float, float], loss: float) -> float:
    """The compute at which L = a * C^-b reaches `loss`."""
    a, b = law
    return (loss / a) ** (-1 / b)


def final(record: dict) -> tuple[float, float]:
    """(training FLOPs, held-out loss) at a run's end (a transition's FLOPs include its MoT run's)."""
    return record["curve"][-1]["flops"], record["curve"][-1]["loss"]


def summarise(data: dict) -> dict:
    """Every number the report shows, by size and model."""
    names = sorted({name for seeds in data["sizes"].values() for runs in seeds.values() for name in runs},
                   key=lambda n: (n not in KINDS, list(KINDS).index(n) if n in KINDS else _percent(n), n))
    table: dict[str, dict] = {}
    for label, seeds in data["sizes"].items():
        row = {}
        for name in names:
            done = [runs[name] for runs in seeds.values() if name in runs]
            if done:
                row[name] = {"seeds": len(done), "loss": [final(r)[1] for r in done], "flops": [final(r)[0] for r in done]}
        table[label] = row
    laws = {}
    for name in names:
        points = [(statistics.fmean(row[name]["flops"]), statistics.fmean(row[name]["loss"])) for row in table.values() if name in row]
        laws[name] = power_law(points)
    dense = laws.get("dense")
    # the dense losses its law was fitted to: a kind's loss outside them is read off the law past the sizes run
    dense_range = [statistics.fmean(row["dense"]["loss"]) for row in table.values() if "dense" in row]
    for label, row in table.items():
        for name, cell in row.items():
            if dense is not None and dense[1] > 0:
                cell["multiplier"] = [flops_for(dense, loss) / flops for loss, flops in zip(cell["loss"], cell["flops"])]
                cell["extrapolated"] = name != "dense" and not min(dense_range) <= statistics.fmean(cell["loss"]) <= max(dense_range)
        seeds = data["sizes"][label]
        for name in ("mot", "token_choice"):
            if name in row:
                paired = [runs for runs in seeds.values() if name in runs and "dense" in runs]
                hits = [(first_reaching(runs[name]["curve"], final(runs["dense"])[1]), runs["dense"]) for runs in paired]
                row[name]["reaching"] = {
                    "reached": sum(h is not None for h, _ in hits), "of": len(hits),
                    "fraction": [h["step"] / d["steps"] for h, d in hits if h is not None],
                    "flops_fraction": [h["flops"] / final(d)[0] for h, d in hits if h is not None],
                    "steps_over_dense": [runs[name]["steps"] / runs["dense"]["steps"] for runs in paired],
                }
        for name in [n for n in row if n.startswith("transition-")]:
            done = [runs[name] for runs in seeds.values() if name in runs]
            pairs = [(runs[name], runs["token_choice"]) for runs in seeds.values() if name in runs and "token_choice" in runs]
            baseline = [baseline_at(tc["curve"], final(tr)[0]) for tr, tc in pairs]
            row[name]["baseline_at_equal_flops"] = [loss for loss, _ in baseline]
            row[name]["baseline_ended_at"] = [short for _, short in baseline if short is not None]
            row[name]["own_loss_paired"] = [final(tr)[1] for tr, _ in pairs]
            # where the gap comes from: MoT at the switch against the baseline at the same FLOPs, and what each gains after
            at_switch = [baseline_at(tc["curve"], tr["curve"][0]["flops"])[0] for tr, tc in pairs]
            row[name]["behind_at_switch"] = [tr["pre_switch_loss"] - at for (tr, _), at in zip(pairs, at_switch)]
            row[name]["own_gain"] = [tr["pre_switch_loss"] - final(tr)[1] for tr, _ in pairs]
            row[name]["baseline_gain"] = [at - end for at, (end, _) in zip(at_switch, baseline)]
            row[name]["closed"] = [own - base for own, base in zip(row[name]["own_gain"], row[name]["baseline_gain"])]
            row[name]["recovery_step"] = [r["recovery_step"] for r in done]  # None: never back at the pre-switch loss
            row[name]["evaluated_every"] = max((b["step"] - a["step"] for r in done for a, b in zip(r["curve"], r["curve"][1:])), default=None)
            row[name]["spike"] = [r["post_switch_loss"] - r["pre_switch_loss"] for r in done]
            # a MoT run trained again for its checkpoint on another machine (other float rounding) may end elsewhere
            row[name]["source_apart"] = [[final(runs["mot"])[1], runs[name]["pre_switch_loss"]] for runs in seeds.values()
                                         if name in runs and "mot" in runs and runs[name]["pre_switch_loss"] != final(runs["mot"])[1]]
    return {"names": names, "table": table, "laws": laws, "lr": data["lr"]}


def _percent(name: str) -> float:
    """The transition length of `transition-Ppct`, for ordering (5% before 10%)."""
    try:
        return float(name.removeprefix("transition-").removesuffix("pct"))
    except ValueError:
        return math.inf


def baseline_at(curve: list[dict], flops: float) -> tuple[float, float | None]:
    """The baseline's loss at `flops`, and None; past its last evaluation (it runs as many steps as MoT
    plus the longest transition, and MoT's steps cost more than Token Choice's), its final loss and the
    fraction of `flops` it ended at: the baseline judged at less compute, in the transition's favour."""
    loss = loss_at(curve, "flops", flops)
    if loss is None and flops > curve[-1]["flops"]:
        return curve[-1]["loss"], curve[-1]["flops"] / flops
    return loss, None


def write_grid_report(results: Path) -> Path:
    """RESULTS/report.md and summary.json (and the plots, with matplotlib); returns the report's path."""
    results = Path(results)
    data = load_results(results)
    summary = summarise(data)
    write_json(results / SUMMARY, summary)
    plots = _plots(results, data, summary)
    grid, table = data["grid"], summary["table"]
    lines = ["# Study grid: the data-rich regime", "",
             f"Recipe `{grid['recipe']}` with {', '.join(f'`{o}`' for o in grid['overrides'])}; corpus fingerprint "
             f"`{grid.get('corpus_fingerprint')}`, tokenizer `{grid.get('tokenizer_hash')}`. Written from the results files "
             "alone (`mot-transition study GRID --report-only`); wall-clock time is not compared (the runs shared the machine).", ""]
    lines += _at_a_glance(summary)
    lines += ["## Sizes", "", "| size | tokens per non-embedding parameter (dense) | seeds asked | seeds done (every model and transition) |",
              "| --- | ---: | ---: | ---: |"]
    for size, done in seeds_done(data):
        lines.append(f"| d{size['n_embd']} | {size['tokens_per_parameter']:g} | {size['seeds']} | {done} |")
    lines += ["", "## Learning rates (the sweep at every size, seed 0)", ""]
    if not data["lr"]:
        lines.append("No sweep has finished: no learning rate is picked yet, so no run below is at its pick.")
    else:
        values = sorted({float(v) for picks in data["lr"].values() for row in picks.values() for v in row["losses"]})
        lines += ["| size | model | " + " | ".join(f"lr {v:g}" for v in values) + " | picked |", "| --- | --- |" + " ---: |" * (len(values) + 1)]
        for label, picks in _by_size(grid, data["lr"]):
            for kind, row in picks.items():
                cells = [row["losses"].get(f"{v:g}") for v in values]
                shown = ["—" if c is None and f"{v:g}" not in row["losses"] else ("diverged" if c is None else f"{c:.4f}") for c, v in zip(cells, values)]
                lines.append(f"| {label} | {KINDS[kind]} | " + " | ".join(shown) + f" | {row['lr']:g}{' (edge)' if at_edge(row) else ''} |")
        if any(at_edge(row) for picks in data["lr"].values() for row in picks.values()):
            lines.append("\nA pick marked (edge) is the smallest or largest rate that kind tried, the sweep's extensions spent "
                         "(`sweep_extend`): its best rate may lie past it, and its loss may be higher than at its best.")
        pending = [f"d{size['n_embd']}" for size in grid["sizes"] if f"d{size['n_embd']}" not in data["lr"]]
        if pending:
            lines.append(f"\nThe sweep has not finished at {', '.join(pending)}: no run there is at its pick yet.")
    lines += _figure(plots, "lr-sweep.png", "Held-out loss at the end of each sweep run against its learning rate (line style: size).")
    lines += ["", "## Final held-out loss and training FLOPs (mean ± std over seeds)", ""]
    lines += ["| size | model | seeds | held-out loss | training FLOPs | compute multiplier vs dense |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for label, row in table.items():
        for name, cell in row.items():
            multiplier = show(cell["multiplier"], "loss", compact=True).replace(".0000", "") if cell.get("multiplier") else "—"
            lines.append(f"| {label} | {label_of(name)} | {cell['seeds']} | {show(cell['loss'], compact=True)} | "
                         f"{show(cell['flops'], 'flops', compact=True)} | {multiplier}{' ' + PAST_DENSE if cell.get('extrapolated') else ''} |")
    lines += final_notes(summary)
    lines += ["", "Power laws L = a · C^-b (C: training FLOPs), fitted to the sizes' mean final losses:", ""]
    for name, law in summary["laws"].items():
        sizes = sum(1 for row in table.values() if name in row)
        lines.append(f"- {label_of(name)}: " + ("fewer than two sizes so far" if law is None else f"a = {law[0]:.4g}, b = {law[1]:.4f} ({sizes} sizes)"))
    lines += _figure(plots, "loss-flops.png", "Final held-out loss against training FLOPs, per kind and size (mean and seed range), with each kind's power law.")
    lines += _multiplier_trend(summary)
    lines += ["", "## The paper's measure: the fraction of dense's steps to reach dense's final loss", "",
              "| size | model | reached in | fraction of dense's steps | fraction of dense's training FLOPs |", "| --- | --- | ---: | ---: | ---: |"]
    for label, row in table.items():
        for name in ("mot", "token_choice"):
            if "reaching" in row.get(name, {}):
                r = row[name]["reaching"]
                lines.append(f"| {label} | {KINDS[name]} | {r['reached']} of {r['of']} seeds | {show([100 * f for f in r['fraction']], 'fraction', compact=True)} | "
                             f"{show([100 * f for f in r.get('flops_fraction', [])], 'fraction', compact=True)} |")
    lines += schedule_note(table)
    lines += ["", "## The transition: MoT → Token Choice against Token Choice from scratch at equal training FLOPs", "",
              "| size | transition | spike at the switch (nats) | steps back to the pre-switch loss | its final loss | Token Choice from scratch at the same FLOPs | difference |",
              "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    verdicts = []
    for label, row in table.items():
        for name in [n for n in row if n.startswith("transition-")]:
            cell = row[name]
            own, base = cell["own_loss_paired"], cell["baseline_at_equal_flops"]
            difference = [o - b for o, b in zip(own, base)]
            compared = f"{show(difference, compact=True)} nats, {judge(own, base)}" if own else "no baseline yet"
            if own and len(own) < len(cell["spike"]):
                compared += f"; {len(own)} of {len(cell['spike'])} seeds have their baseline yet"
            every, apart = cell.get("evaluated_every"), cell.get("source_apart")
            lines.append(f"| {label} | {length(name)} | {show(cell['spike'], compact=True)} | "
                         f"{recovery(cell['recovery_step'])}{f' (evaluated every {every} steps)' if every else ''} | "
                         f"{show(own, compact=True)}{' ' + OTHER_SOURCE if apart else ''} | "
                         f"{show(base, compact=True)}{' ' + BEYOND if cell.get('baseline_ended_at') else ''} | {compared} |")
            if difference:
                said = judge(own, base) + "".join(f"; its MoT run, trained again on another machine, ended {s - r:+.4f} from the recorded one"
                                                  for r, s in apart or [])
                verdicts.append((label, name, statistics.fmean(difference), said))
    lines += transition_notes(table)
    lines += gap_sources(table)
    lines += lr_checks(results, data["sizes"])
    lines += ["", "## Verdict", ""] + interim(data) + verdict(verdicts, summary)
    path = results / REPORT
    path.write_text("\n".join(lines) + "\n")
    return path


def _at_a_glance(summary: dict) -> list[str]:
    """One row a size, one column a model: the final held-out losses (the table the README shows)."""
    names, table = summary["names"], summary["table"]
    if not any(table.values()):
        return []
    lines = ["## At a glance", "",
             "Final held-out loss (nats/token), mean ± std over the seeds done; Token Choice from scratch runs as many "
             "steps as MoT plus its longest transition (they are compared at equal FLOPs under The transition).", "",
             "| size | " + " | ".join(label_of(n) for n in names) + " |", "| --- |" + " ---: |" * len(names)]
    for label, row in table.items():
        if row:
            lines.append(f"| {label} | " + " | ".join(
                f"{show(row[n]['loss'], compact=True)} ({row[n]['seeds']})" if n in row else "—" for n in names) + " |")
    return lines + ["", "(in brackets: seeds)", ""]


def multiplier_law(law: tuple[float, float], dense: tuple[float, float]) -> tuple[float, float]:
    """The compute multiplier against dense that two power laws imply, as M(C) = m * C^e: the dense
    FLOPs reaching the kind's loss L(C) = a C^-b on dense's law a_d C^-b_d, over C."""
    (a, b), (a_d, b_d) = law, dense
    return (a / a_d) ** (-1 / b_d), b / b_d - 1


def _multiplier_trend(summary: dict) -> list[str]:
    """The multiplier over size (the sizes' means) and where the fitted laws carry it past the largest size."""
    table, laws, dense = summary["table"], summary["laws"], summary["laws"].get("dense")
    lines = ["", "The compute multiplier against dense over size (mean over seeds; > 1: less compute for the same loss), "
             "and where the power laws carry it (an extrapolation from the sizes above, no more):", ""]
    shown = False
    for name in [n for n in summary["names"] if n != "dense"]:
        cells = [(label, row[name]) for label, row in table.items() if row.get(name, {}).get("multiplier")]
        if not cells:
            continue
        shown = True
        text = " → ".join(f"{statistics.fmean(cell['multiplier']):.3g} ({label})" for label, cell in cells)
        law = laws.get(name)
        if law is not None and dense is not None and dense[1] > 0:
            m, e = multiplier_law(law, dense)
            largest = max(statistics.fmean(cell["flops"]) for _, cell in cells)
            text += (f"; fitted M(C) = {m:.3g} · C^{e:+.3f}: {m * largest ** e:.3g} at the largest size's FLOPs, "
                     f"{m * (10 * largest) ** e:.3g} at 10x, {m * (100 * largest) ** e:.3g} at 100x")
        lines.append(f"- {label_of(name)}: {text}")
    return lines if shown else []


def _by_size(grid: dict, per_size: dict) -> list[tuple[str, dict]]:
    """A {size label: ...} table's rows in the grid's order of sizes (its files keep the order they ran in)."""
    order = [f"d{size['n_embd']}" for size in grid["sizes"]]
    return sorted(per_size.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order))


def _figure(plots: dict | None, name: str, caption: str) -> list[str]:
    if plots is None:
        return ["", f"(no {name}: matplotlib is not installed: pip install 'mot-transition[plot]')"]
    return ["", f"![{caption}]({name})", "", caption] if name in plots else []


def _plots(results: Path, data: dict, summary: dict) -> dict | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colors = {"dense": "tab:gray", "mot": "tab:blue", "token_choice": "tab:green"}
    written = {}
    if data["lr"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        styles = iter(["-", "--", ":", "-."] * 4)
        for label, picks in _by_size(data["grid"], data["lr"]):
            style = next(styles)
            for kind, row in picks.items():
                pairs = sorted((float(v), loss) for v, loss in row["losses"].items() if loss is not None)
                ax.plot([p[0] for p in pairs], [p[1] for p in pairs], marker="o", linestyle=style, label=f"{KINDS[kind]}, {label}",
                        color=colors[kind])
        ax.set_xscale("log")
        ax.set(xlabel="learning rate", ylabel="held-out loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(results / "lr-sweep.png", dpi=120)
        plt.close(fig)
        written["lr-sweep.png"] = results / "lr-sweep.png"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    shades = iter(plt.cm.Reds([0.5, 0.7, 0.9, 1.0]))
    for name in summary["names"]:
        cells = [row[name] for row in summary["table"].values() if name in row]
        x = [statistics.fmean(c["flops"]) for c in cells]
        y = [statistics.fmean(c["loss"]) for c in cells]
        errors = [[m - min(c["loss"]) for m, c in zip(y, cells)], [max(c["loss"]) - m for m, c in zip(y, cells)]]
        color = colors.get(name) or next(shades)
        ax.errorbar(x, y, yerr=errors, marker="o", linestyle="none", color=color, label=label_of(name))
        law = summary["laws"].get(name)
        if law is not None:
            span = [min(x) * 0.8, max(x) * 1.25]
            ax.plot(span, [law[0] * c ** -law[1] for c in span], color=color, linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):  # 2.6, not 2.6 x 10^0
        axis(matplotlib.ticker.FormatStrFormatter("%.1f"))
    ax.set(xlabel="training FLOPs", ylabel="final held-out loss (nats/token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(results / "loss-flops.png", dpi=120)
    plt.close(fig)
    written["loss-flops.png"] = results / "loss-flops.png"
    return written


__all__ = ["load_results", "power_law", "flops_for", "multiplier_law", "summarise", "write_grid_report"]
