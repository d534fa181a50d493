"""The command line's own polish (issue 25): --version, an example at the end of every command's
help, and errors that speak of options as the user types them."""

import pytest
from conftest import run_cli

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
    assert code == 0 and "SPEC" not in out
    design = (Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text()
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", design, flags=re.MULTILINE))
    for section in re.findall(r"design\.md §(\d+(?:\.\d+)?)", out):
        assert section in headings, f"{name} --help cites design.md §{section}, which has no such section"
