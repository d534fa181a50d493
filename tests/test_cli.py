"""The command line's own polish (issue 25): --version, an example at the end of every command's
help, and errors that speak of options as the user types them."""

from conftest import run_cli

from mot_transition import __version__


def test_version_prints_the_package_version_and_exits_0(capsys):
    code, out, err = run_cli(["--version"], capsys)
    assert (code, out, err) == (0, f"mot-transition {__version__}\n", "")


def test_version_comes_before_any_command(capsys):
    """--version is eager: it answers even with a command after it, and runs nothing."""
    code, out, _ = run_cli(["--version", "info", "/nonexistent"], capsys)
    assert (code, out) == (0, f"mot-transition {__version__}\n")
