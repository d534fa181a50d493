"""The verdict of a study grid's report (grid_report.py): the plain answer first (is MoT -> Token Choice
ahead of Token Choice from scratch anywhere, where its gap goes with size, does MoT meet the paper's
measure), then every size and transition length on its own line."""

from __future__ import annotations

import math
import statistics

KINDS = {"dense": "dense", "mot": "MoT", "token_choice": "Token Choice from scratch"}


def length(name: str) -> str:
    """A transition's length as the report writes it: `transition-5pct` -> 5%."""
    return name.removeprefix("transition-").replace("pct", "%")


def label_of(name: str) -> str:
    return KINDS.get(name) or f"MoT → Token Choice, {length(name)}"


def line_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through (x, y) points, at least two distinct x."""
    mx, my = statistics.fmean(x for x, _ in points), statistics.fmean(y for _, y in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - slope * mx, slope


def verdict(verdicts: list[tuple[str, str, float, str]], summary: dict) -> list[str]:
    """The plain answer first (is the transition ahead anywhere, where does its gap go with size, does the
    paper's measure reproduce for MoT), then every size and transition length on its own line."""
    if not verdicts:
        return ["No transition has finished beside its Token Choice baseline yet: no verdict."]
    ahead = [f"{label} ({length(name)}: {said})" for label, name, d, said in verdicts if d < 0]
    lines = [f"- **MoT → Token Choice is ahead of Token Choice from scratch at equal training FLOPs at {', '.join(ahead)}**, "
             f"and behind in the other {len(verdicts) - len(ahead)} of the {len(verdicts)} size and transition pairs (mean over seeds)."
             if ahead else
             f"- **MoT → Token Choice beats Token Choice from scratch at equal training FLOPs nowhere here**: behind at every size "
             f"and transition length tried ({len(verdicts)} pairs, mean over seeds), by "
             f"{span([v[2] for v in verdicts], '{:.3f}')} nats."]
    for name in [n for n in summary["names"] if n in {v[1] for v in verdicts}]:  # 5% before 10%
        lines += gap_trend(name, [(label, d) for label, other, d, _ in verdicts if other == name], summary["table"])
    lines += gap_at_switch(summary["names"], summary["table"])
    lines += paper_measure(summary["table"])
    for label, name, difference, said in verdicts:
        better = "beats" if difference < 0 else "trails"
        lines.append(f"- {label}: MoT → Token Choice ({length(name)}) {better} Token Choice "
                     f"from scratch at equal training FLOPs by {abs(difference):.4f} nats ({said}).")
    return lines


def gap_trend(name: str, gaps: list[tuple[str, float]], table: dict) -> list[str]:
    """A transition's gap to Token Choice from scratch over size, and where a straight line through the
    gaps against log10(training FLOPs) takes it: the compute at which it would close, if it narrows."""
    if len(gaps) < 2:
        return []
    points = sorted((math.log10(statistics.fmean(table[label][name]["flops"])), d, label) for label, d in gaps)
    intercept, slope = line_fit([(x, d) for x, d, _ in points])
    text = (f"- {label_of(name)} minus Token Choice from scratch, over size: "
            + " → ".join(f"{d:+.4f} ({label})" for _, d, label in points) + f" nats (negative: the transition is ahead); "
            f"{slope:+.4f} nats per 10x training FLOPs")
    if len({d > 0 for _, d, _ in points}) > 1:
        return [text + ": the sign changes between sizes, no trend to carry further."]
    last_x, last = points[-1][0], points[-1][1]
    fitted = intercept + slope * last_x  # the line at the largest size
    what = "lead" if last < 0 else "gap"
    if slope != 0 and (last > 0) == (slope < 0) and (fitted > 0) == (last > 0):  # the line moves towards zero, still short of it
        decades = intercept / -slope - last_x  # past the largest size, in log10 FLOPs, where the line is 0
        text += (f": on that line the {what} would close at about {10 ** decades:.2g}x the largest size's training FLOPs"
                 if decades <= 3 else f": on that line the {what} would not close within 1000x the largest size's training FLOPs")
        text += " (a straight line through the sizes, no more)."
    elif slope != 0 and (last > 0) == (slope < 0):
        text += ": the line through the sizes reaches zero within them (they scatter): no trend to carry further."
    else:
        text += f": the {what} does not narrow with size."
    return [text]


def gap_at_switch(names: list[str], table: dict) -> list[str]:
    """Where the longest transition's gap comes from, over the sizes (mean over seeds each): MoT's deficit at the
    switch, and the part of it the transition closes, which MoT would have to end within to come out ahead."""
    lengths = [n for n in names if n.startswith("transition-")]  # shortest first
    if not lengths:
        return []
    longest = lengths[-1]
    cells = [row[longest] for row in table.values() if row.get(longest, {}).get("behind_at_switch")]
    if not cells:
        return []
    behind = [statistics.fmean(c["behind_at_switch"]) for c in cells]
    closed = [statistics.fmean(c["closed"]) for c in cells]
    return [f"- Where the gap comes from: at the switch, MoT's loss is {signed_span(behind)} nats from Token Choice from scratch's "
            f"at the same training FLOPs (mean over seeds, per size; positive: MoT behind), and the {length(longest)} transition "
            f"closes {signed_span(closed)} nats of it. For MoT → Token Choice to come out ahead, MoT would have to end its run "
            "about that close to Token Choice from scratch."]


def paper_measure(table: dict) -> list[str]:
    """MoT against dense as the paper measures it, beside Token Choice from scratch."""
    lines = []
    for name in ("mot", "token_choice"):
        cells = [row[name] for row in table.values() if "reaching" in row.get(name, {})]
        fractions = [f for c in cells for f in c["reaching"]["fraction"]]
        reached, of = sum(c["reaching"]["reached"] for c in cells), sum(c["reaching"]["of"] for c in cells)
        multipliers = [m for c in cells for m in c.get("multiplier", [])]
        if not of:
            continue
        text = f"- {KINDS[name]} against dense: reaches dense's final loss in {reached} of {of} runs (sizes and seeds)"
        if fractions:
            text += f", at {span([100 * f for f in fractions], '{:.0f}')}% of dense's steps"
        if multipliers:
            text += f"; compute multiplier {span(multipliers, '{:.2f}')}"
        if name == "mot":
            reproduced = reached == of and max(fractions) <= 1 / 3
            text += (". The paper reports a quarter to a third of dense's steps, from runs far larger than these (its medium "
                     "size: about 25M non-embedding parameters, about 390 training tokens per parameter): "
                     + ("reproduced here." if reproduced else "not reproduced at these sizes."))
        lines.append(text + ("" if text.endswith(".") else "."))
    return lines


def signed_span(values: list[float]) -> str:
    """A range of signed values, `+0.016 to +0.050` (a hyphen between signed numbers reads as a minus)."""
    low, high = f"{min(values):+.3f}", f"{max(values):+.3f}"
    return low if low == high else f"{low} to {high}"


def span(values: list[float], number: str) -> str:
    low, high = number.format(min(values)), number.format(max(values))
    return low if low == high else f"{low}-{high}"
