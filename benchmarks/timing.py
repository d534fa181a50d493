"""Side-by-side timing: every figure is a ratio of candidates timed in one run, interleaved.

The machines this suite runs on are shared and noisy, so absolute times mean little. Candidates
are warmed up, then timed in rounds; each round runs every candidate once, in a rotating order,
so that a burst of load from elsewhere hits all of them alike. A ratio is the median over rounds
of the per-round ratio (both times taken seconds apart).
"""

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Timings:
    seconds: dict[str, list[float]] = field(default_factory=dict)  # name -> one time per round

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def ratio(self, name: str, baseline: str) -> float:
        """Median over rounds of time(name) / time(baseline)."""
        return statistics.median(a / b for a, b in zip(self.seconds[name], self.seconds[baseline]))

    def spread(self, name: str, baseline: str) -> tuple[float, float]:
        """(lowest, highest) per-round ratio: how much the machine moved during the run."""
        ratios = [a / b for a, b in zip(self.seconds[name], self.seconds[baseline])]
        return min(ratios), max(ratios)


def side_by_side(candidates: dict[str, Callable[[], object]], rounds: int = 7, warmup: int = 2, calls: int = 1) -> Timings:
    """Time each candidate `rounds` times, interleaved; one sample is `calls` back-to-back calls."""
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    timings = Timings({name: [] for name in names})
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
            fn = candidates[name]
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            timings.seconds[name].append((time.perf_counter() - start) / calls)
    return timings
