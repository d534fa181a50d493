"""The study's report: OUT/report.md, its numbers in OUT/results.json, and its plots.

Every figure is a mean over the seeds, with the sample standard deviation and the min-max range.
A comparison of two means says whether their difference is larger than the seed spread:

    |mean(A) - mean(B)| > max(half-range(A), half-range(B)),   half-range = (max - min) / 2

that is, whether the two means differ by more than either figure moves between seeds. This is a
plain reading aid, not a significance test (with 2 or 3 seeds no test has power); with one seed
no spread can be estimated and the report says so for every comparison. Beside each verdict: in
how many seeds the per-seed difference has the sign of the difference of the means. The runs of
one seed share its initialisation seed and data order, so the seeds pair them; a difference that
every seed agrees on but that stays within the spread is a lead for more seeds, not a result.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from ..jsonfiles import write_json
from .accounting import AXES, first_reaching, loss_at
from .grid_verdict import length

REPORT_FILE, RESULTS_FILE = "report.md", "results.json"
AT_EQUAL = {"step": "At equal steps", "flops": "At equal training FLOPs", "seconds": "At equal wall-clock time on this machine"}
LARGER, WITHIN, ONE_SEED = "larger than the seed spread", "within the seed spread", "one seed: no spread"
BEYOND = "†"  # the baseline's run ended before this budget: its final loss, reached with less, is shown


def spread(values: list[float]) -> dict:
    """{"n", "mean", "std" (sample; None for one value), "min", "max"}."""
    return {"n": len(values), "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}


def verdict(a: list[float], b: list[float]) -> str:
    """Whether the means of a and b differ by more than the seed spread (module docstring)."""
    if len(a) < 2 or len(b) < 2:
        return ONE_SEED
    half = max((max(a) - min(a)) / 2, (max(b) - min(b)) / 2)
    return LARGER if abs(statistics.fmean(a) - statistics.fmean(b)) > half else WITHIN


def agreeing(a: list[float], b: list[float]) -> str:
    """In how many seeds a_s - b_s has the sign of mean(a) - mean(b): "k of n seeds agree". The
    seeds pair the runs (one seed: one initialisation seed and one data order for every model)."""
    mean = statistics.fmean(a) - statistics.fmean(b)
    k = sum(1 for x, y in zip(a, b) if (x - y) * mean > 0)
    return f"{k} of {len(a)} seeds agree"


def judge(a: list[float], b: list[float]) -> str:
    """The verdict and, with several seeds, how many of them agree on the direction."""
    said = verdict(a, b)
    return said if said == ONE_SEED or not a else f"{said} ({agreeing(a, b)})"


def show(values: list[float], kind: str = "loss", compact: bool = False) -> str:
    """`mean ± std (min–max)` (`compact`: without the range); the value alone when every seed has
    the same; "—" for none. `kind`: loss, step, flops, seconds, percent (signed), fraction (a %)."""
    if not values:
        return "—"
    s = spread(values)
    number = {"loss": "{:.4f}", "flops": "{:.3g}", "seconds": "{:.1f}", "percent": "{:+.1f}%", "fraction": "{:.1f}%",
              "step": "{:.1f}" if any(v != int(v) for v in values) else "{:.0f}"}[kind].format
    if s["min"] == s["max"]:
        return number(s["mean"])
    deviation = number(s["std"]).lstrip("+")
    return f"{number(s['mean'])} ± {deviation}" + ("" if compact else f" ({number(s['min'])}–{number(s['max'])})")


def models(results: list[dict]) -> dict[str, str]:
    """curve name -> what the report calls it: the four models and every transition."""
    names = {"dense": "dense", "mot": "MoT", "token_choice": "Token Choice from scratch"}
    for name in results[0]["curves"]:
        if name.startswith("transition-"):
            names[name] = f"MoT → Token Choice, {length(name)} transition"
    return names


def equal_budget_rows(results: list[dict], axis: str) -> list[dict]:
    """For MoT and every transition, against dense and Token Choice from scratch: the model's final
    loss and the baseline's loss at the model's final budget on `axis`, per seed."""
    rows = []
    names = models(results)
    for target in [name for name in names if name == "mot" or name.startswith("transition-")]:
        for baseline in ("dense", "token_choice"):
            mine, theirs, beyond = [], [], 0
            for seed in results:
                end = seed["curves"][target][-1]
                curve = seed["curves"][baseline]
                loss = loss_at(curve, axis, end[axis])
                if loss is None and end[axis] > curve[-1][axis]:
                    loss, beyond = curve[-1]["loss"], beyond + 1
                if loss is not None:
                    mine.append(end["loss"])
                    theirs.append(loss)
            rows.append({"model": names[target], "baseline": names[baseline], "x": [s["curves"][target][-1][axis] for s in results],
                         "loss": mine, "baseline_loss": theirs, "beyond": beyond, "verdict": verdict(mine, theirs),
                         "judged": judge(mine, theirs)})
    return rows


def reaching_rows(results: list[dict]) -> list[dict]:
    """The paper's measure: where MoT (and Token Choice from scratch) first reach dense's final
    held-out loss, on each axis, and that as a fraction of dense's own steps, FLOPs and time."""
    rows = []
    for name in ("mot", "token_choice"):
        found = []
        for seed in results:
            dense = seed["curves"]["dense"][-1]
            hit = first_reaching(seed["curves"][name], dense["loss"])
            if hit is not None:
                found.append({**hit, **{f"{axis}_fraction": hit[axis] / dense[axis] for axis in AXES}})
        rows.append({"model": models(results)[name], "reached": len(found), "seeds": len(results), "points": found})
    return rows


def write_report(out: Path, started: dict, results: list[dict], plots: list[Path] | None) -> Path:
    """OUT/results.json and OUT/report.md; `plots` None: matplotlib was missing, say so."""
    write_json(out / RESULTS_FILE, {"study": started, "seeds": results})
    lines = _header(started, results)
    lines += _runs_table(results)
    for axis in AXES:
        lines += _equal_budget(results, axis)
    lines += _reaching(results)
    lines += _figure(plots, "curves.png", "Held-out loss of every model on each axis, mean over seeds (band: min–max); the "
                     "vertical line is the switch from MoT to Token Choice.")
    lines += _spike(results, started["options"]["calibrate"])
    lines += _figure(plots, "spike.png", "The loss right after the switch, before any training.")
    lines += _recovery(results)
    lines += _temperatures(results)
    lines += _figure(plots, "temperature.png", "MoT at each controller temperature.")
    lines += _summary(results)
    (out / REPORT_FILE).write_text("\n".join(lines) + "\n")
    return out / REPORT_FILE


def _header(started: dict, results: list[dict]) -> list[str]:
    recipe, options = started["recipe"], started["options"]
    seeds = [seed["seed"] for seed in results]
    lines = [
        f"# Study: {recipe['name']}, {len(seeds)} seed{'s' if len(seeds) > 1 else ''}", "",
        f"Recipe `{recipe['name']}` (seeds {', '.join(map(str, seeds))}): MoT for {recipe['train']['steps']} steps, "
        f"E={recipe['model']['n_expert']}, g={recipe['model']['group_size']}, T={recipe['model']['mot_temperature']:g}; "
        f"converted at top-{results[0]['top_k']}; transitions of {', '.join(f'{p:g}%' for p in options['transitions'])} of the "
        f"MoT steps; further temperatures: {', '.join(f'{t:g}' for t in options['temperatures']) or 'none'}; "
        f"calibration batches: {options['calibrate']}.", "",
        "Every figure is the mean over seeds ± the sample standard deviation (min–max). Held-out loss is nats/token on "
        "the recipe's fixed held-out batches. A verdict compares two means: *larger than the seed spread* when "
        "|mean A − mean B| > max(half-range A, half-range B), half-range = (max − min) / 2; *within the seed spread* "
        "otherwise. It is a reading aid, not a significance test. Beside it, in how many seeds the difference has the "
        "sign of the difference of the means (a seed pairs the runs: one initialisation seed and one data order).", "",
    ]
    if len(seeds) == 1:
        lines += ["**One seed: no spread can be estimated**, so no difference below can be told apart from seed noise.", ""]
    return lines


def _runs_table(results: list[dict]) -> list[str]:
    lines = ["## The runs", "",
             "Training FLOPs count attention and the feed-forward FLOPs a token uses (MoT's controller, mixing and emitting "
             "included), 3 x forward; a transitioned model's include its MoT run. Wall-clock seconds are those of the "
             "optimizer steps on this machine (evaluation and checkpoints not counted).", "",
             "| model | steps | training FLOPs | wall-clock s (this machine) | held-out loss |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, label in models(results).items():
        ends = [seed["curves"][name][-1] for seed in results]
        lines.append(f"| {label} | {show([e['step'] for e in ends], 'step')} | {show([e['flops'] for e in ends], 'flops')} | "
                     f"{show([e['seconds'] for e in ends], 'seconds')} | {show([e['loss'] for e in ends])} |")
        if name == "mot":
            lines.append(f"| MoT with group_size=1 (the same model, one sequence at a time) | | | | "
                         f"{show([seed['mot_unbatched_loss'] for seed in results])} |")
    return lines + [""]


def _equal_budget(results: list[dict], axis: str) -> list[str]:
    unit = {"step": "steps", "flops": "FLOPs", "seconds": "s"}[axis]
    lines = [f"## {AT_EQUAL[axis]}", "",
             f"Each model's final held-out loss against the baseline's loss at the same {AXES[axis]} (linear between its "
             f"evaluations).", "",
             f"| model | its {unit} | its loss | baseline | baseline's loss at those {unit} | difference | verdict |",
             "| --- | ---: | ---: | --- | ---: | ---: | --- |"]
    notes = False
    for row in equal_budget_rows(results, axis):
        diff = statistics.fmean(row["loss"]) - statistics.fmean(row["baseline_loss"]) if row["loss"] else None
        mark = f" {BEYOND}" if row["beyond"] else ""
        notes |= bool(row["beyond"])
        lines.append(f"| {row['model']} | {show(row['x'], axis)} | {show(row['loss'])} | {row['baseline']} | "
                     f"{show(row['baseline_loss'])}{mark} | {'—' if diff is None else f'{diff:+.4f}'} | {row['judged']} |")
    lines.append("")
    if notes:
        lines += [f"{BEYOND} The baseline's run ended before this budget in some seeds: its final loss there, reached with "
                  "less, is compared.", ""]
    return lines + ["Token Choice from scratch trains for the MoT steps plus the longest transition's (design.md §10.2's baseline for "
                    "that transition): at a smaller budget its loss is read mid-run, before its learning rate has decayed, "
                    "which favours the model it is compared with.", ""]


def _reaching(results: list[dict]) -> list[str]:
    lines = ["## The paper's measure: when a model first reaches dense's final loss", "",
             "The step, training FLOPs and wall-clock time at which the held-out loss first gets down to the dense "
             "model's final held-out loss (interpolated between evaluations), and each as a fraction of what dense "
             "spent for it.", "",
             "| model | reached in | step | training FLOPs | wall-clock s | fraction of dense's steps | of its FLOPs | of its time |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    first = False
    for row in reaching_rows(results):
        points = row["points"]
        if not points:
            lines.append(f"| {row['model']} | not reached (0 of {row['seeds']} seeds) | | | | | | |")
            continue
        first |= any(p["first_evaluation"] for p in points)
        cells = [show([p[axis] for p in points], axis) for axis in AXES]
        fractions = [show([100 * p[f"{axis}_fraction"] for p in points], "fraction") for axis in AXES]
        lines.append(f"| {row['model']} | {row['reached']} of {row['seeds']} seeds | {' | '.join(cells)} | {' | '.join(fractions)} |")
    lines.append("")
    if first:
        lines += ["In some seeds the model was there at its first evaluation already: that evaluation is shown (it got "
                  "there then or earlier).", ""]
    return lines


def _spike(results: list[dict], calibrate: int) -> list[str]:
    pre = [seed["pre_switch_loss"] for seed in results]
    lines = ["## The switch: the loss right after conversion", "",
             f"No training: the MoT model converted to Token Choice and evaluated. Pre-switch loss (MoT, grouped) {show(pre)}; "
             f"the same MoT with group_size=1 {show([s['mot_unbatched_loss'] for s in results])}.", "",
             f"| top-k | without calibration | vs pre-switch | with calibration ({calibrate} batches) | vs pre-switch | calibration vs none |",
             "| ---: | ---: | ---: | ---: | ---: | --- |"]
    for k in results[0]["spike"]:
        plain = [seed["spike"][k]["plain"] for seed in results]
        row = f"| {k}{' (default)' if int(k) == results[0]['top_k'] else ''} | {show(plain)} | {_relative(plain, pre)} |"
        if calibrate:
            calibrated = [seed["spike"][k]["calibrated"] for seed in results]
            row += f" {show(calibrated)} | {_relative(calibrated, pre)} | {judge(calibrated, plain)} |"
        else:
            row += " not measured (--calibrate 0) | | |"
        lines.append(row)
    return lines + [""]


def _relative(values: list[float], reference: list[float]) -> str:
    return show([100 * (v / r - 1) for v, r in zip(values, reference)], "percent")


def _recovery(results: list[dict]) -> list[str]:
    lines = ["## Transition tuning: recovery", "",
             "The recovery step is the first transition step whose held-out loss (one sequence at a time) is back at or "
             "below the pre-switch MoT loss; the looser one of design.md §10.2, within 2% of it, beside it. Evaluations come every "
             "tenth of the transition.", "",
             "| transition | steps | loss at step 0 | final loss | final vs pre-switch | back at or below pre-switch | within 2% |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    pre = [seed["pre_switch_loss"] for seed in results]
    for label in results[0]["transitions"]:
        rows = [seed["transitions"][label] for seed in results]
        final = [r["final_loss"] for r in rows]
        lines.append(f"| {label.replace('pct', '%')} | {rows[0]['steps']} | {show([r['post_switch_loss'] for r in rows])} | "
                     f"{show(final)} | {_relative(final, pre)} | {_recovered(rows, 'recovery_step')} | {_recovered(rows, 'spec_recovery_step')} |")
    return lines + [""]


def _recovered(rows: list[dict], key: str) -> str:
    steps = [r[key] for r in rows if r[key] is not None]
    if not steps:
        return "not recovered"
    return show(steps, "step") + ("" if len(steps) == len(rows) else f" ({len(steps)} of {len(rows)} seeds; not recovered in the others)")


def _temperatures(results: list[dict]) -> list[str]:
    own = f"{results[0]['mot_temperature']:g}"
    lines = ["## The MoT controller temperature", "",
             f"The same MoT recipe at other controller temperatures (the recipe's is {own}), same steps; the converted "
             f"loss is top-{results[0]['top_k']} before any training.", "",
             f"| T | MoT, grouped | MoT, group_size=1 | converted | grouped vs T={own} |", "| ---: | ---: | ---: | ---: | --- |"]
    for t in sorted(results[0]["temperatures"], key=float):
        rows = [seed["temperatures"][t] for seed in results]
        grouped = [r["grouped"] for r in rows]
        mine = [seed["temperatures"][own]["grouped"] for seed in results]
        lines.append(f"| {t}{' (recipe)' if t == own else ''} | {show(grouped)} | {show([r['unbatched'] for r in rows])} | "
                     f"{show([r['converted'] for r in rows])} | {'' if t == own else judge(grouped, mine)} |")
    return lines + [""]


def _figure(plots: list[Path] | None, name: str, caption: str) -> list[str]:
    if plots is None:
        return [f"(Plot {name} skipped: matplotlib is not installed; pip install 'mot-transition[plot]'.)", ""]
    return [f"![{caption}]({name})", "", caption, ""] if any(p.name == name for p in plots) else []


def _summary(results: list[dict]) -> list[str]:
    """Every comparison of the report in one sentence, sorted by what the seeds can tell apart."""
    said = {LARGER: [], WITHIN: [], ONE_SEED: []}
    for axis in AXES:
        for row in equal_budget_rows(results, axis):
            if row["loss"]:
                better = "lower" if statistics.fmean(row["loss"]) < statistics.fmean(row["baseline_loss"]) else "higher"
                said[row["verdict"]].append(f"{AT_EQUAL[axis][0].lower()}{AT_EQUAL[axis][1:]}, {row['model']} has a {better} loss than "
                                            f"{row['baseline']} ({agreeing(row['loss'], row['baseline_loss'])})")
    pre = [seed["pre_switch_loss"] for seed in results]
    for k in results[0]["spike"]:
        rows = [seed["spike"][k] for seed in results]
        if "calibrated" in rows[0]:
            calibrated, plain = [r["calibrated"] for r in rows], [r["plain"] for r in rows]
            better = "lowers" if statistics.fmean(calibrated) < statistics.fmean(plain) else "raises"
            said[verdict(calibrated, plain)].append(f"at top-{k}, calibration {better} the loss right after the switch ({agreeing(calibrated, plain)})")
    for label in results[0]["transitions"]:
        final = [seed["transitions"][label]["final_loss"] for seed in results]
        better = "below" if statistics.fmean(final) < statistics.fmean(pre) else "above"
        said[verdict(final, pre)].append(f"after the {label.replace('pct', '%')} transition the loss is {better} the pre-switch loss "
                                         f"({agreeing(final, pre)})")
    own = f"{results[0]['mot_temperature']:g}"
    for t in results[0]["temperatures"]:
        if t != own:
            grouped = [seed["temperatures"][t]["grouped"] for seed in results]
            mine = [seed["temperatures"][own]["grouped"] for seed in results]
            better = "lower" if statistics.fmean(grouped) < statistics.fmean(mine) else "higher"
            said[verdict(grouped, mine)].append(f"MoT at T={t} has a {better} grouped loss than at T={own} ({agreeing(grouped, mine)})")
    lines = ["## What the seeds can tell apart", ""]
    if len(results) == 1:
        return lines + ["With one seed no spread can be estimated: none of these differences can be told apart from seed "
                        "noise. Run with --seeds 2 or more.", ""]
    lines += ["Differences larger than the seed spread:", ""] + [f"- {s}" for s in said[LARGER]] + (["- none"] if not said[LARGER] else [])
    lines += ["", "Differences within the seed spread (not told apart by these seeds):", ""]
    lines += [f"- {s}" for s in said[WITHIN]] + (["- none"] if not said[WITHIN] else [])
    if said[ONE_SEED]:  # a budget that only one seed's runs reached (a wall-clock time, say): no spread there
        lines += ["", "Measured in one seed only (the others' runs did not reach that budget; no spread):", ""]
        lines += [f"- {s}" for s in said[ONE_SEED]]
    return lines + [""]


__all__ = ["write_report", "spread", "verdict", "agreeing", "judge", "equal_budget_rows", "reaching_rows", "REPORT_FILE", "RESULTS_FILE"]
