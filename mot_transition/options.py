"""The rules of the command-line options (config.Rule), declared once and checked by the library
functions behind the commands, so that a Python caller gets the same one-line error as the CLI.
(The rules of config and recipe keys are config.MODEL_RULES and train.recipe.RECIPE_RULES.)"""

import os

from .config import AT_LEAST_ZERO, POSITIVE, POSITIVE_INT, Rule, as_written

# Upper bounds, each with its reason: a value past it would exhaust the machine or crash a library.
# A vocabulary: every byte and the eos token, and at most 2^20 entries, four times the largest in use
# (262,144): the tokenizers library's BPE trainer aborts the process (a Rust panic, exit 134) when
# asked for 10^9, and the model's embedding grows with it.
VOCAB_SIZE = Rule(int, low=257, high=2**20)
# CPU cores this process may use: each worker is a process with its own tokenizer; more than the
# cores only adds processes (--workers 1000 would fork 1000) and their memory.
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

OPTION_RULES: dict[str, Rule] = {
    "--steps": POSITIVE_INT,
    "--lr": POSITIVE,
    "--eval-every": POSITIVE_INT,
    "--checkpoint-every": POSITIVE_INT,
    "--transition-steps": POSITIVE_INT,
    "--top-k": POSITIVE_INT,  # and at most the number of experts: checked with the checkpoint's config
    "--capacity-factor": POSITIVE,
    "--calibrate": Rule(int, low=0),
    "--max-new-tokens": POSITIVE_INT,
    "--temperature": AT_LEAST_ZERO,  # 0 = greedy
    "--top-p": Rule(float, low=0, high=1, low_open=True),
    "--limit": POSITIVE_INT,
    "--batch-size": Rule(int, low=1, high=4096),  # eval: a batch holds batch x context x vocabulary logits
    "--group-size": POSITIVE_INT,
    "--vocab-size": VOCAB_SIZE,
    "--sample-bytes": POSITIVE_INT,
    "--max-bytes": POSITIVE_INT,
    "--heldout-fraction": Rule(float, low=0, high=1, low_open=True, high_open=True),
    "--shard-tokens": POSITIVE_INT,
    "--workers": Rule(int, low=1, high=CORES),  # one process per core at most (above)
    "--seed": Rule(int, low=0),  # generate's sampling seed (below 2**63, as every integer rule)
    "--seeds": POSITIVE_INT,  # study: how many seeds
    "--transitions": Rule(list, item=float, low=0, low_open=True),  # study: transition lengths, % of the MoT steps
    "--temperatures": Rule(list, item=float, low=0, low_open=True),  # study: further MoT controller temperatures
}


def check_options(**values) -> None:
    """Check options given by their Python names (`eval_every=...` is `--eval-every`); None means
    not given and passes. A one-line ValueError naming the option otherwise."""
    for name, value in values.items():
        option = "--" + name.replace("_", "-")
        if value is not None and not OPTION_RULES[option].accepts(value):
            # a list as it is typed (--transitions 0,10), anything else as config.Rule says it
            shown = ",".join(map(_typed, value)) if isinstance(value, (list, tuple)) else as_written(value)
            raise ValueError(f"{option} must be {OPTION_RULES[option].describe()}, got {shown}")


def with_option(option: str, value) -> str:
    """How a command line that gave `option` the value `value` reads, for a message: "with --top-k 2",
    "with --transitions 5,10", "with --no-baseline" (`option` a flag pair "--baseline/--no-baseline"),
    "without --top-k" (None: not given)."""
    if "/" in option:
        yes, no = option.split("/")
        return f"with {yes if value else no}"
    if value is None:
        return f"without {option}"
    items = value if isinstance(value, (list, tuple)) else [value]
    return f"with {option} {','.join(_typed(v) for v in items)}"


def _typed(number) -> str:
    """5.0 as 5, 0.003 as 0.003: a number as it is typed."""
    if isinstance(number, float) and number.is_integer() and abs(number) < 1e16:
        return str(int(number))
    return str(number)


__all__ = ["OPTION_RULES", "VOCAB_SIZE", "CORES", "check_options", "with_option"]
