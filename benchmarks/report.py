"""What a benchmark returns, and how the suite prints it and writes RESULTS.md.

A run may repeat the suite at several thread counts; the table then has one value (and one
PASS/MISS) per thread count, side by side.
"""

import platform
from dataclasses import dataclass, field

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mot_transition.study.runs import machine


@dataclass
class Figure:
    name: str
    value: float | None  # None: could not be measured (see note)
    unit: str  # "x" for a ratio, else a rate such as "tok/s"
    target: float | None = None  # value <= target passes (>= when at_least)
    at_least: bool = False
    spread: tuple[float, float] | None = None  # lowest and highest per-round ratio
    note: str = ""

    @property
    def status(self) -> str:
        if self.target is None:
            return ""
        if self.value is None:
            return "MISSING"
        ok = self.value >= self.target if self.at_least else self.value <= self.target
        return "PASS" if ok else "MISS"

    def value_text(self) -> str:
        if self.value is None:
            return "n/a"
        text = f"{self.value:.2f}x" if self.unit == "x" else f"{self.value:,.1f} {self.unit}"
        return text + (f" [{self.spread[0]:.2f}-{self.spread[1]:.2f}]" if self.spread else "")

    def target_text(self) -> str:
        if self.target is None:
            return ""
        bound = f"{self.target:.2f}x" if self.unit == "x" else f"{self.target:,.1f} {self.unit}"
        return (">= " if self.at_least else "<= ") + bound


@dataclass
class Benchmark:
    number: int
    title: str
    setup: str  # shapes and what exactly was timed
    measured: str  # median times and the like, of this run
    figures: list[Figure] = field(default_factory=list)


def machine_text() -> str:
    m = machine()
    return (
        f"{m['cpu']}, {m['cpus']} logical CPUs; Python {platform.python_version()}, torch {m['torch']}, "
        f"transformers {m['transformers']}, {platform.system()} {platform.release()}"
    )


def _rows(runs: dict[int, list[Benchmark]]):
    """(benchmark, figure name, {threads: figure}) in suite order."""
    first = next(iter(runs.values()))
    for i, bench in enumerate(first):
        for j, fig in enumerate(bench.figures):
            yield bench, fig, {threads: run[i].figures[j] for threads, run in runs.items()}


def _threads(n: int) -> str:
    return f"{n} thread" + ("s" if n > 1 else "")


def print_table(runs: dict[int, list[Benchmark]], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=escape("mot-transition benchmarks (ratios measured side by side in one run; [lowest-highest round])"))
    table.add_column("#")
    table.add_column("figure", overflow="fold")
    for threads in runs:
        table.add_column(_threads(threads))
    table.add_column("target")
    for threads in runs:
        table.add_column(f"@{threads}")
    table.add_column("note", overflow="fold")
    previous = None
    for bench, fig, by_threads in _rows(runs):
        if previous is not None and bench.number != previous:
            table.add_section()
        statuses = []
        for f in by_threads.values():
            style = {"PASS": "green", "MISS": "red", "MISSING": "yellow"}.get(f.status, "")
            statuses.append(f"[{style}]{f.status}[/]" if style else "")
        table.add_row(
            str(bench.number) if bench.number != previous else "", fig.name,
            *[escape(f.value_text()) for f in by_threads.values()], fig.target_text(), *statuses, fig.note,
        )
        previous = bench.number
    console.print(table)


def markdown(runs: dict[int, list[Benchmark]], command: str, quick: bool, load: tuple[tuple, tuple], malloc: str = "keep") -> str:
    memory = (
        "glibc's malloc keeps freed memory for reuse, as the trainer sets it on CPU (`train.keep_freed_memory`)"
        if malloc == "keep" else "glibc's malloc as it comes (every tensor over 32 MB mapped and unmapped)"
    )
    lines = [
        "# Benchmark results",
        "",
        f"Produced by `{command}`{' (quick smoke run: small shapes, few rounds; not a measurement)' if quick else ''}.",
        "",
        f"Machine: {machine_text()}; measured at {', '.join(_threads(t) for t in runs)} (torch intra-op threads); {memory}.",
        "",
        f"Load average (1, 5, 15 min) before the run {_load(load[0])}, after {_load(load[1])}. Other work on the",
        "machine slows every candidate, and those made of many short parallel regions (per-expert matmuls,",
        "small decode ops) most: with all cores busy elsewhere, a second torch thread mostly waits.",
        "",
        "Every ratio is the median over interleaved rounds of the per-round ratio of candidates timed side by",
        "side in the same run, after warm-up (see `benchmarks/timing.py`); [lowest-highest] is the range of the",
        "per-round ratios.",
        "",
    ]
    header = ["figure", *[_threads(t) for t in runs], "target", *[f"status @{t}" for t in runs], "note"]
    previous = None
    for bench, fig, by_threads in _rows(runs):
        if bench.number != previous:
            lines += ["", f"## {bench.number}. {bench.title}", "", bench.setup, ""]
            for threads, run in runs.items():
                measured = next(b for b in run if b.number == bench.number).measured
                lines.append(f"- {_threads(threads)}: {measured}")
            lines += ["", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
            previous = bench.number
        cells = [fig.name, *[f.value_text() for f in by_threads.values()], fig.target_text(), *[f.status for f in by_threads.values()], fig.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _load(values: tuple) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in values) + ")"
