"""Task scores with lm-evaluation-harness (the `eval` extra): `evaluate_tasks(CKPT, ["hellaswag"])`.

A model is scored one task request at a time in batches that lm-eval forms by its own rules, so a
model whose output depends on the other rows of a batch (MoT, Expert Choice with g > 1) would get
scores that depend on which requests happen to share a batch, and on the right padding lm-eval
uses. Those checkpoints are refused unless `group_size=1` is asked for: exact per-sequence MoT,
where every token goes through all E experts instead of E / g of them, g times the expert FLOPs of
grouped inference (docs/design.md §3.5). Converting them to Token Choice first is the usual path.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from .checks import check_device, check_writable_file, load_tokenizer_folder, one_line
from .checkpoint_io import checkpoint_to_read, load_checked, load_config, resolve_checkpoint
from .jsonfiles import write_json
from .locks import reads, writes
from .options import check_options


def task_names(text: str) -> list[str]:
    """The task names of a comma-separated option value (`--tasks a,b`)."""
    return [name.strip() for name in text.split(",") if name.strip()]


@reads(lambda a: checkpoint_to_read(a["checkpoint"]))  # read under a reader's lock for the whole evaluation
def evaluate_tasks(
    checkpoint: str | Path,
    tasks: list[str],
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    group_size: int | None = None,
    device: str = "cpu",
) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for a dense or Token Choice checkpoint (or MoT with `group_size=1`).
    `include_path`: a folder of task YAML files (and their local data), for tasks lm-eval does not
    ship. Raises ValueError / OSError with one line for what cannot work (ImportError without lm-eval)."""
    require_harness()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    checkpoint = resolve_checkpoint(checkpoint)
    config = load_config(checkpoint)
    if not tasks:
        raise ValueError("name at least one task (--tasks)")
    check_options(limit=limit, batch_size=batch_size, group_size=group_size)
    check_device(device, "--device")
    if group_size is not None and group_size != 1:
        raise ValueError(f"--group-size takes 1 (per-sequence evaluation) only, got {group_size}")
    if config.mixes_batch_rows() and group_size != 1:
        raise ValueError(
            f"{checkpoint} is a {config.ffn_type} checkpoint: it mixes the {config.group_size} rows of a group, so its "
            f"scores would depend on which requests lm-eval batches together; convert it first (mot-transition convert), "
            f"or evaluate it one sequence at a time with --group-size 1"
        )
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include-path {include_path}: no task folder there")
    if include_path is not None:
        check_task_files(include_path)
    tokenizer = load_tokenizer_folder(checkpoint, f"the checkpoint {checkpoint}")  # before lm-eval indexes its tasks
    manager = None
    if include_path is not None:  # indexing lm-eval's own tasks takes ~20 s: only when the folder lacks one
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if any(task not in manager.all_tasks for task in tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; give a folder of task YAML files with --include-path")
    model = load_checked(checkpoint).eval().to(device)
    if group_size == 1:
        model.set_group_size(1)
    with _quiet("lm_eval.models.huggingface"):  # its notices on a model object passed in: what we do on purpose
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=config.n_positions,
                  device=device, backend="causal")
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit)["results"]
    scores = {}
    for task, metrics in results.items():
        scores[task] = {  # lm-eval names a score "metric,filter"
            name.split(",")[0]: float(value) for name, value in metrics.items()
            if "," in name and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
    return scores


def require_harness() -> None:
    """A one-line ImportError, saying how to install it, unless lm-evaluation-harness imports: `eval`
    and `compare --tasks` call it before any other work."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as error:  # not installed, or installed and broken: say which
        why = str(error).strip().splitlines()[0] if str(error).strip() else "it does not import"
        raise ImportError(f"task scores need lm-evaluation-harness, which does not import here ({why}): "
                          f"pip install 'mot-transition[eval]'") from None


def check_task_files(include_path: str | Path) -> None:
    """Every task YAML file under `include_path` reads as lm-eval reads it (its own loader: `include:`
    followed, `!function` tags kept), else one line naming the file and where it breaks; lm-eval
    itself skips such a file quietly, and the task in it is then reported as unknown."""
    try:
        from lm_eval.tasks._index import TaskIndex
        from lm_eval.tasks._yaml_loader import load_yaml

        files = TaskIndex._iter_yaml_files(Path(include_path))
        read = lambda path: load_yaml(path, resolve_func=False, recursive=True)  # noqa: E731
    except ImportError:  # lm-eval's earlier layout (0.4.10): the task manager reads each file with its utils
        from lm_eval import utils

        files = sorted(Path(include_path).rglob("*.yaml"))
        read = lambda path: utils.load_yaml_config(str(path), mode="simple")  # noqa: E731
    for path in files:
        try:
            read(path)
        except Exception as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
            why = getattr(error, "problem", None) or one_line(error)
            raise ValueError(f"--include-path {include_path}: {path} is not a task file lm-eval reads ({why}{where})") from None


@writes("path")
def write_scores(scores: dict, path: str | Path) -> Path:
    """The scores as JSON, written whole or not at all."""
    path = Path(path)
    check_writable_file(path, "--out")
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json(path, scores)


@contextmanager
def _quiet(logger_name: str):
    """`logger_name`'s warnings silenced (its errors still show) for the block."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
