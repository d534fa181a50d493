"""The typer application that every CLI command module registers itself on."""

import typer

from .._version import __version__

app = typer.Typer(
    name="mot-transition",
    help="Mixture of Tokens models and their transition tuning into Token Choice sparse MoE.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(given: bool) -> None:
    if given:
        print(f"mot-transition {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", is_eager=True, expose_value=False, callback=_print_version,
                                 help="Print the version of mot-transition and exit."),
) -> None:
    """Mixture of Tokens models and their transition tuning into Token Choice sparse MoE."""
