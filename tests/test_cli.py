"""The command line's own polish (issue 25): --version, an example at the end of every command's
help, and errors that speak of options as the user types them."""

import sys

import pytest

from conftest import run_cli
from test_readme import OLD_SPEC
from mot_transition import __version__


def test_version_prints_the_package_version_and_exits_0(capsys):
    code, out, err = run_cli(["--version"], capsys)
    assert (code, out, err) == (0, f"mot-transition {__version__}\n", "")


def test_version_comes_before_any_command(capsys):
    """--version is eager: it answers even with a command after it, and runs nothing."""
    code, out, _ = run_cli(["--version", "info", "/nonexistent"], capsys)
    assert (code, out) == (0, f"mot-transition {__version__}\n")


# ---------------------------------------------------------------------------------------------
# every command's help ends with one example, and the example is a command line the CLI takes


def commands() -> dict:
    """Every command registered on the app, by name, as click sees them."""
    import typer

    import mot_transition.cli  # noqa: F401  (registers the commands)
    from mot_transition.cli.app import app

    return typer.main.get_command(app).commands


def test_the_commands_are_all_found():
    """The loop below sees every command (a test over an empty set would pass for nothing)."""
    assert {"prepare", "train", "convert", "transition", "compare", "run", "study", "export", "eval", "generate",
            "info"} <= set(commands())


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_command_help_ends_with_an_example_the_cli_parses(name, capsys, monkeypatch):
    import shlex

    monkeypatch.setenv("COLUMNS", "200")  # the example is tested, not the terminal's wrapping
    code, out, _ = run_cli([name, "--help"], capsys)
    last = [line.strip() for line in out.splitlines() if line.strip()][-1]
    assert code == 0 and last.startswith(f"Example: mot-transition {name} "), out
    assert len(last) <= 78, f"{name}'s example does not fit on one line of an 80-column terminal"
    words = shlex.split(last.removeprefix("Example: "))
    command = commands()[name]
    context = command.make_context(name, words[2:])  # parsed as the CLI parses it: a usage error fails here
    assert not context.args  # every word was taken by an argument or an option


@pytest.mark.parametrize("name", sorted(commands()))
def test_help_cites_sections_of_docs_design_md_that_exist_never_the_old_spec(name, capsys, monkeypatch):
    import re
    from pathlib import Path

    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_cli([name, "--help"], capsys)
    assert code == 0 and not OLD_SPEC.search(out)
    design = (Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text()
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", design, flags=re.MULTILINE))
    for section in re.findall(r"design\.md §(\d+(?:\.\d+)?)", out):
        assert section in headings, f"{name} --help cites design.md §{section}, which has no such section"


# ---------------------------------------------------------------------------------------------
# a key that takes a list takes one item alone: on the command line, in a recipe file, in a grid file

# one valid item of every recipe key that takes a list (a new list key without one here fails below)
ONE_ITEM = {"model.moe_layers": ("3", 3), "train.report_to": ("jsonl", "jsonl")}


def list_keys() -> set[str]:
    from mot_transition.train.recipe import RECIPE_RULES

    return {key for key, rule in RECIPE_RULES.items() if rule.kind is list}


def test_every_list_key_is_tried():
    assert list_keys() == set(ONE_ITEM)


@pytest.mark.parametrize("key", sorted(ONE_ITEM))
def test_one_item_alone_is_a_list_of_one_in_an_override_and_in_a_recipe_file(key, tmp_path):
    from mot_transition.train import load_recipe
    from mot_transition.train.recipe import RECIPES_DIR

    written, item = ONE_ITEM[key]
    section, leaf = key.split(".")
    recipe = load_recipe("tiny", [f"{key}={written}"])
    assert getattr(getattr(recipe, section), leaf) == [item]
    # the same key in a recipe file, as a TOML value (a string quoted, a number as it is)
    literal = f'"{item}"' if isinstance(item, str) else str(item)
    text = (RECIPES_DIR / "tiny.toml").read_text().replace(f"[{section}]\n", f"[{section}]\n{leaf} = {literal}\n", 1)
    text = "\n".join(line for line in text.splitlines() if not line.startswith(f"{leaf} = [")) + "\n"  # tiny's own list
    (tmp_path / "one.toml").write_text(text)
    recipe = load_recipe(tmp_path / "one.toml")
    assert getattr(getattr(recipe, section), leaf) == [item]


def test_one_item_of_the_wrong_kind_is_refused_naming_the_key_and_the_value_as_written():
    from mot_transition.train import load_recipe

    with pytest.raises(ValueError, match=r"^recipe key 'model.moe_layers' must be a list of integers >= 0 or none, got 'x'$"):
        load_recipe("tiny", ["model.moe_layers=x"])
    with pytest.raises(ValueError, match=r"^recipe key 'train.report_to' has 'mlflow'; choose from jsonl, "):
        load_recipe("tiny", ["train.report_to=mlflow"])
    with pytest.raises(ValueError, match=r"^recipe key 'train.report_to' must be a list of strings, got \[1\]$"):
        load_recipe("tiny", ["train.report_to=[1]"])


def test_a_python_caller_still_gives_a_list():
    """Only what a person writes is read leniently: Python code that builds a recipe passes a list."""
    from mot_transition.train import Recipe
    from mot_transition.train.recipe import TrainRecipe, check_recipe

    with pytest.raises(ValueError, match=r"^recipe key 'train.report_to' must be a list of strings, got 'jsonl'$"):
        check_recipe(Recipe(train=TrainRecipe(report_to="jsonl")))


class Reached(Exception):
    """The recipe passed every check and training would start."""


def test_train_report_to_tensorboard_on_the_command_line_starts_training_with_tensorboard(capsys, monkeypatch):
    pytest.importorskip("tensorboard", reason="train.report_to=tensorboard needs the tensorboard extra")
    import mot_transition.train as train_package

    def reached(recipe, *args, **kwargs):
        raise Reached(recipe)

    monkeypatch.setattr(train_package, "train", reached)
    with pytest.raises(Reached) as started:
        run_cli(["train", "tiny", "train.report_to=tensorboard", "--out", "/nonexistent/never-written"], capsys)
    assert started.value.args[0].train.report_to == ["tensorboard"]  # metrics.jsonl is written whatever the list


def test_model_moe_layers_of_one_block_on_the_command_line_starts_training_with_that_list(capsys, monkeypatch):
    """The same through the CLI with no extra installed: one block number alone is a list of one."""
    import mot_transition.train as train_package

    def reached(recipe, *args, **kwargs):
        raise Reached(recipe)

    monkeypatch.setattr(train_package, "train", reached)
    with pytest.raises(Reached) as started:
        run_cli(["train", "tiny-llama", "model.moe_layers=3", "--out", "/nonexistent/never-written"], capsys)
    assert started.value.args[0].model.moe_layers == [3]


def test_a_grid_file_takes_one_item_for_its_lists(tmp_path):
    from mot_transition.study.grid import load_grid

    path = tmp_path / "grid.toml"
    path.write_text(f"recipe = 'tiny'\noverrides = 'train.threads=1'\nresults = '{tmp_path / 'results'}'\n"
                    "transitions = 10\nsweep = [1e-3, 3e-3]\n[[size]]\nn_embd = 16\ntokens_per_parameter = 2\nseeds = 1\n")
    grid = load_grid(path)
    assert (grid.transitions, grid.overrides) == ([10.0], ["train.threads=1"])


# ---------------------------------------------------------------------------------------------
# errors name options as typed and values as written (none, true, --no-baseline), never Python's


def error_line(code: int, err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("override, said", [
    ("train.steps=none", "recipe key 'train.steps' must be an integer >= 1, got none"),
    ("train.compile=1", "recipe key 'train.compile' must be true or false, got 1"),
    ("train.report_to=[true]", "recipe key 'train.report_to' must be a list of strings, got [true]"),
    ("model.moe_layers=[1, 2.5]", "recipe key 'model.moe_layers' must be a list of integers >= 0 or none, got [1, 2.5]"),
    ("train.switch_at_step=240", "recipe key 'train.switch_at_step' must be between 1 and train.steps - 1 = 239 (or none), got 240"),
])
def test_a_recipe_value_is_quoted_back_as_it_was_written(capsys, override, said):
    code, _, err = run_cli(["train", "tiny", override, "--out", "/nonexistent/never-written"], capsys)
    line = error_line(code, err)
    assert line == f"error: {said}"
    assert not {"None", "True", "False", "NoneType"} & set(line.replace(",", " ").replace("]", " ").replace("[", " ").split())


def test_a_damaged_training_state_is_described_in_json_words(tmp_path, capsys):
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "training_state.json").write_text('{"step": "two", "data": {}, "optimizer": {}, "recipe": {}}')
    (checkpoint / "training_state.safetensors").write_bytes(b"")
    code, _, err = run_cli(["train", "tiny", "--out", tmp_path / "run", "--resume"], capsys)
    line = error_line(code, err)
    assert line.endswith("training_state.json is corrupted: no 'step' (a number)"), line


def test_options_are_said_as_typed():
    from mot_transition.config import as_written
    from mot_transition.options import with_option

    assert with_option("--top-k", None) == "without --top-k"
    assert with_option("--top-k", 2) == "with --top-k 2"
    assert with_option("--lr", 0.003) == "with --lr 0.003"
    assert with_option("--transitions", [5.0, 10.0, 2.5]) == "with --transitions 5,10,2.5"
    assert with_option("--baseline/--no-baseline", False) == "with --no-baseline"
    assert with_option("--baseline/--no-baseline", True) == "with --baseline"
    assert as_written({"n_embd": 64, "seeds": [None, True, "x"]}) == "{n_embd = 64, seeds = [none, true, 'x']}"


# ---------------------------------------------------------------------------------------------
# an extra that is not installed is one line saying how to install it, before any work


@pytest.mark.parametrize("args", [["eval", "CKPT", "--tasks", "arc_easy"], ["compare", "RUN", "--tasks", "arc_easy"]])
def test_task_scores_without_lm_eval_are_one_line_before_any_work(tmp_path, capsys, monkeypatch, args):
    import mot_transition.cli.compare as compare_cli

    def evaluated(*args, **kwargs):
        raise AssertionError("the runs were read before lm-eval was found missing")

    monkeypatch.setattr(compare_cli, "compare_runs", evaluated)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError, as where it is not installed
    code, _, err = run_cli([tmp_path / "nothing-here" if a in ("CKPT", "RUN") else a for a in args], capsys)
    line = error_line(code, err)
    assert "lm-evaluation-harness" in line and "pip install 'mot-transition[eval]'" in line, line


def test_export_to_gguf_without_gguf_is_one_line(tmp_path, capsys, monkeypatch):
    from conftest import tiny_config
    from mot_transition.modeling import MoTLMHeadModel

    MoTLMHeadModel(tiny_config("token_choice")).save_pretrained(tmp_path / "tc")
    monkeypatch.setitem(sys.modules, "gguf", None)
    code, _, err = run_cli(["export", tmp_path / "tc", tmp_path / "m.gguf", "--to", "gguf"], capsys)
    assert "pip install 'mot-transition[gguf]'" in error_line(code, err)
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("option, value, said", [
    ("--transitions", "0,10", "--transitions must be a list of finite numbers > 0, got 0,10"),
    ("--temperatures", "2,-0.5", "--temperatures must be a list of finite numbers > 0, got 2,-0.5"),
    ("--seeds", "0", "--seeds must be an integer >= 1, got 0"),
])
def test_a_study_option_is_quoted_back_as_typed(tmp_path, capsys, option, value, said):
    code, _, err = run_cli(["study", "tiny", option, value, "--out", tmp_path / "study"], capsys)
    assert error_line(code, err) == f"error: {said}"
    assert not (tmp_path / "study").exists()
