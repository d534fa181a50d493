"""What a benchmark returns, and how the suite prints it and writes RESULTS.md."""

import platform
from dataclasses import dataclass, field

import torch
import transformers
from rich.console import Console
from rich.table import Table


@dataclass
class Figure:
    name: str
    value: float | None  # None: could not be measured (see note)
    unit: str  # "x" for a ratio, else a rate such as "tok/s"
    target: float | None = None  # value <= target passes (>= when at_least)
    at_least: bool = False
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
        return f"{self.value:.2f}{self.unit}" if self.unit == "x" else f"{self.value:,.1f} {self.unit}"

    def target_text(self) -> str:
        if self.target is None:
            return ""
        bound = f"{self.target:.2f}{self.unit}" if self.unit == "x" else f"{self.target:,.1f} {self.unit}"
        return (">= " if self.at_least else "<= ") + bound


@dataclass
class Benchmark:
    number: int
    title: str
    setup: str  # shapes and what exactly was timed
    figures: list[Figure] = field(default_factory=list)


def machine_text() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {torch.get_num_threads()} torch threads; Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.system()} {platform.release()}"
    )


def _load(values: tuple) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in values) + ")"


def print_table(benchmarks: list[Benchmark], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="mot-transition benchmarks (ratios measured side by side in one run)")
    for column in ("#", "figure", "value", "target", "", "note"):
        table.add_column(column, overflow="fold")
    for bench in benchmarks:
        for i, fig in enumerate(bench.figures):
            style = {"PASS": "green", "MISS": "red", "MISSING": "yellow"}.get(fig.status, "")
            table.add_row(
                f"{bench.number}" if i == 0 else "", fig.name, fig.value_text(), fig.target_text(),
                f"[{style}]{fig.status}[/]" if style else "", fig.note,
            )
        table.add_section()
    console.print(table)


def markdown(benchmarks: list[Benchmark], command: str, quick: bool, load: tuple[tuple, tuple]) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Produced by `{command}`{' (quick smoke run: small shapes, few rounds; not a measurement)' if quick else ''}.",
        "",
        f"Machine: {machine_text()}.",
        "",
        f"Load average (1, 5, 15 min) before the run {_load(load[0])}, after {_load(load[1])}: other work on the",
        "machine slows every candidate, and the ones with many short parallel regions most.",
        "",
        "Every ratio is the median over interleaved rounds of the per-round ratio of candidates timed side by",
        "side in the same run, after warm-up (see `benchmarks/timing.py`); the range after it is the lowest and",
        "highest per-round ratio.",
        "",
    ]
    for bench in benchmarks:
        lines += [f"## {bench.number}. {bench.title}", "", bench.setup, "", "| figure | value | target | status | note |", "| --- | --- | --- | --- | --- |"]
        for fig in bench.figures:
            lines.append(f"| {fig.name} | {fig.value_text()} | {fig.target_text()} | {fig.status} | {fig.note} |")
        lines.append("")
    return "\n".join(lines)
