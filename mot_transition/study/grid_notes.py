"""What a study grid's report says its numbers rest on (grid_report.py): how many seeds have every run,
whether the verdict is interim, and the notes under its tables. Every deviation of the transitions'
comparison from equal compute favours the transition, and the notes say where."""

from __future__ import annotations

import statistics
from pathlib import Path

from ..jsonfiles import read_json_object
from .grid_verdict import KINDS, length, span
from .report import BEYOND, show

PAST_DENSE = "‡"  # a multiplier read off dense's power law past the losses dense reached
OTHER_SOURCE = "§"  # the transition's MoT run was trained again (another machine) and ended elsewhere than the recorded one
LR_CHECKS = "transition-lr"  # RESULTS/transition-lr/: one transition again at other learning rates (scripts/transition_lr_check.py)


def seeds_done(data: dict) -> list[tuple[dict, int]]:
    """Each size of the grid and how many of its seeds have every run: the three models and every transition."""
    grid = data["grid"]
    every = set(KINDS) | {f"transition-{p:g}pct" for p in grid.get("transitions", [])}
    return [(size, sum(1 for runs in data["sizes"].get(f"d{size['n_embd']}", {}).values() if every <= set(runs)))
            for size in grid["sizes"]]


def interim(data: dict) -> list[str]:
    """A first line while the grid is not finished: the verdict stands on what has run."""
    missing = [f"d{size['n_embd']} {done} of {size['seeds']}" for size, done in seeds_done(data) if done < size["seeds"]]
    return [f"- *Interim: the grid has not finished (seeds with every run: {', '.join(missing)}); this verdict stands on "
            "the runs above and may change.*"] if missing else []


def final_notes(summary: dict) -> list[str]:
    """What the final-loss table's numbers rest on: the sweep's seed 0, and multipliers past dense's losses."""
    lines = []
    if summary["lr"]:
        lines.append("\nSeed 0 of each model is the best run of its size's sweep, picked out of several learning rates: that "
                     "favours it a little over the further seeds, fresh runs at the picked rate.")
    dense = [statistics.fmean(row["dense"]["loss"]) for row in summary["table"].values() if "dense" in row]
    if any(cell.get("extrapolated") for row in summary["table"].values() for cell in row.values()):
        lines.append(f"\n{PAST_DENSE} The model's loss lies outside the final losses dense reached ({min(dense):.4f}-{max(dense):.4f}): "
                     "the dense FLOPs that would reach it are read off dense's power law past the sizes run, an extrapolation.")
    return lines


def schedule_note(table: dict) -> list[str]:
    """The paper's measure reads a run's curve at dense's steps; a run with more steps has its learning-rate
    schedule stretched over them, so it is read before its rate has decayed as far as dense's."""
    longer = [f for row in table.values() for f in row.get("token_choice", {}).get("reaching", {}).get("steps_over_dense", []) if f > 1]
    if not longer:
        return []
    return [f"\nToken Choice from scratch runs {span([100 * (f - 1) for f in longer], '{:.0f}')}% more steps than dense (for the "
            "transitions' comparison), its learning-rate schedule stretched over them: at dense's steps its rate has decayed less "
            "than dense's, so its fractions are somewhat pessimistic."]


def recovery(steps: list[int | None]) -> str:
    """Steps until the loss was back at the pre-switch loss, over the seeds that got there."""
    back = [s for s in steps if s is not None]
    if not back:
        return "not recovered" if steps else "—"
    return show(back, "step", compact=True) + ("" if len(back) == len(steps) else f" ({len(back)} of {len(steps)} seeds)")


def transition_notes(table: dict) -> list[str]:
    """How the transitions' comparison leans: every deviation from equal compute favours the transition."""
    cells = [cell for row in table.values() for name, cell in row.items() if name.startswith("transition-")]
    if not cells:
        return []
    lines = ["", "A recovery step is the first evaluation at or below the pre-switch loss (the loss got there between it "
             "and the evaluation before). Token Choice from scratch runs as many steps as MoT plus the longest transition: "
             "at a shorter transition's FLOPs it is read mid-run, before its learning rate has decayed as it would in a run "
             "ending there, which favours the transition."]
    for label, row in table.items():  # one line a size: its transitions share their MoT run
        apart = {tuple(pair) for name, cell in row.items() if name.startswith("transition-") for pair in cell.get("source_apart", [])}
        for recorded, source in sorted(apart):
            lines.append(f"\n{OTHER_SOURCE} {label}: the transitions' MoT run was trained again for its checkpoint on another machine "
                         f"than the recorded one (the same recipe, seed and data; other float rounding) and ended at {source:.4f}, where "
                         f"the recorded MoT run ended at {recorded:.4f}: the transitions and their differences carry that {source - recorded:+.4f}.")
    ended = [f for cell in cells for f in cell.get("baseline_ended_at", [])]
    if ended:
        lines.append(f"\n{BEYOND} Token Choice from scratch ended before the transition's FLOPs, at {span([100 * f for f in ended], '{:.1f}')}% "
                     "of them (a MoT step costs more than a Token Choice step): its final loss stands in, judged at less "
                     "compute, which also favours the transition.")
    return lines


def gap_sources(table: dict) -> list[str]:
    """Where each transition's gap to Token Choice from scratch comes from: how far behind MoT already is at
    the switch (Token Choice from scratch read at the same FLOPs), and how much of that the transition closes."""
    rows = [(label, name, cell) for label, row in table.items() for name, cell in row.items()
            if name.startswith("transition-") and cell.get("behind_at_switch")]
    if not rows:
        return []
    lines = ["", "### Where the gap comes from", "",
             "The gap at the end is the gap MoT already has at the switch, less what the transition closes after it: its own "
             "gain (pre-switch loss to final loss) minus Token Choice from scratch's over the same FLOPs (its curve read at "
             "the switch's FLOPs and at the transition's end). Mean ± std over the seeds with both runs.", "",
             "| size | transition | MoT behind Token Choice from scratch at the switch | the transition's gain | "
             "Token Choice from scratch's gain | closed | gap at the end |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, name, cell in rows:
        end = [behind - closed for behind, closed in zip(cell["behind_at_switch"], cell["closed"])]
        shown = [show(cell[key], compact=True) for key in ("behind_at_switch", "own_gain", "baseline_gain", "closed")] + [show(end, compact=True)]
        if cell.get("source_apart"):  # measured from the MoT run its transitions started from
            shown[0] += f" {OTHER_SOURCE}"
        lines.append(f"| {label} | {length(name)} | " + " | ".join(shown) + " |")
    return lines + ([f"\n{OTHER_SOURCE} From the MoT run the transitions started from (trained again on another machine, above)."]
                    if any(cell.get("source_apart") for _, _, cell in rows) else [])


def lr_checks(results: Path, sizes: dict) -> list[str]:
    """The transitions run again at other multiples of their learning rate (scripts/transition_lr_check.py),
    each against Token Choice from scratch at its own training FLOPs; `sizes`: the grid's runs
    (grid_report.load_results), whose MoT run each check's rows should start from."""
    files = sorted((Path(results) / LR_CHECKS).glob("*.json"))
    if not files:
        return []
    lines = ["", "## The transition's learning rate", "",
             "The grid's transitions run at their MoT run's final learning rate. These ran one of them again at other "
             "multiples of it, from the same converted checkpoint (`scripts/transition_lr_check.py`), each set against Token "
             "Choice from scratch at its own final training FLOPs.", "",
             "| size | seed | transition | learning rate | x the grid's | steps back to the pre-switch loss | its final loss | "
             "Token Choice from scratch at the same FLOPs | difference |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    notes = []
    for path in files:
        check = read_json_object(path)
        mot = sizes.get(check["size"], {}).get(check["seed"], {}).get("mot")
        recorded = None if mot is None else mot["final_loss"]
        source = check["rows"][0]["pre_switch_loss"]
        mark = f" {OTHER_SOURCE}" if recorded is not None and source != recorded else ""
        if mark:
            notes.append(f"\n{OTHER_SOURCE} {check['size']} seed {check['seed']}: every rate starts from the MoT run trained again on "
                         f"another machine ({source:.4f}; the recorded one: {recorded:.4f}), so the rates compare among themselves; "
                         f"their differences to Token Choice from scratch carry {source - recorded:+.4f}.")
        for r in check["rows"]:
            factor = f"{r['factor']:g}" + (" (the grid's run)" if r["grid"] else "")
            baseline = f"{r['baseline']:.4f}" + (f" {BEYOND}" if r["baseline_ended_at"] else "")
            lines.append(f"| {check['size']} | {check['seed']} | {length(check['length'])} | {r['lr']:.3g} | {factor} | "
                         f"{recovery([r['recovery_step']])} | {r['final_loss']:.4f}{mark} | {baseline} | {r['final_loss'] - r['baseline']:+.4f} |")
    return lines + notes

