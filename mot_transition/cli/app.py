"""The typer application that every CLI command module registers itself on."""

import typer

app = typer.Typer(
    name="mot-transition",
    help="Mixture of Tokens models and their transition tuning into Token Choice sparse MoE.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Mixture of Tokens models and their transition tuning into Token Choice sparse MoE."""
