"""The `mot-transition` command: a thin layer over the Python API, one module per command.

Bad input (a missing checkpoint, a recipe that does not fit, an impossible option) reaches the
user as one line on stderr and exit code 1; the library raises ValueError / OSError with a
message written for the user (ImportError, naming the extra to install, for a missing extra). Set MOT_TRANSITION_DEBUG=1 to see the traceback instead.
"""

import os
import re
import sys

from .app import app
from . import compare, consolidate, convert, eval, export, generate, info, prepare, run, study, transition  # noqa: F401  (each module registers its command on `app`)
from . import train  # noqa: F401


def main() -> None:
    import warnings

    from transformers.utils import logging

    warnings.formatwarning = _one_line_warning

    logging.disable_progress_bar()  # our own rich progress bars speak for long work
    from safetensors import SafetensorError

    import typer

    # typer raises click's exceptions, from click or (typer >= 0.28) from its own copy of click
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    no_args = getattr(sys.modules[usage_error.__module__], "NoArgsIsHelpError", ())
    try:
        code = app(standalone_mode=False)  # click's usage errors come here, to be said in one line
    except no_args as error:  # a bare `mot-transition` or command: its help, as click would show it
        print(error.ctx.get_help() if error.ctx else str(error), file=sys.stderr)
        sys.exit(2)
    except usage_error as error:
        where = error.ctx.command_path if error.ctx is not None else "mot-transition"
        message = error.format_message().strip().splitlines()[0]
        print(f"error: {message} (see {where} --help)", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):  # Ctrl-C that typer did not turn into 130 itself
        code = 130
    except Exception as error:
        # ImportError: an extra not installed; a bare Exception "... (os error N)": an I/O error the Rust side of
        # tokenizers raises (a full disk while a tokenizer is saved), which is the user's, not a bug of ours
        said = isinstance(error, (ValueError, OSError, KeyError, ImportError, SafetensorError)) or (
            type(error) is Exception and _RUST_IO_ERROR.search(str(error)) is not None)
        if not said or os.environ.get("MOT_TRANSITION_DEBUG"):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    if isinstance(code, int) and code:  # click's exit code (e.g. of ctx.exit(N)) outside standalone mode
        if code == 130:  # Ctrl-C: typer returns this code for it inside a command, silently
            print("interrupted", file=sys.stderr)
        sys.exit(code)


_RUST_IO_ERROR = re.compile(r"\(os error \d+\)")


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A library warning as a user reads it: `warning: MESSAGE`, without the source line."""
    return f"warning: {message}\n"
