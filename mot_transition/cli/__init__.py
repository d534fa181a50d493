"""The `mot-transition` command: a thin layer over the Python API, one module per command.

Bad input (a missing checkpoint, a recipe that does not fit, an impossible option) reaches the
user as one line on stderr and exit code 1; the library raises ValueError / OSError with a
message written for the user. Set MOT_TRANSITION_DEBUG=1 to see the traceback instead.
"""

import os
import sys

from .app import app
from . import compare, convert, eval, export, generate, info, run, transition  # noqa: F401  (each module registers its command on `app`)
from . import train  # noqa: F401


def main() -> None:
    import warnings

    from transformers.utils import logging

    warnings.formatwarning = _one_line_warning

    logging.disable_progress_bar()  # our own rich progress bars speak for long work
    from safetensors import SafetensorError

    try:
        app()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, KeyError, SafetensorError) as error:
        if os.environ.get("MOT_TRANSITION_DEBUG"):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A library warning as a user reads it: `warning: MESSAGE`, without the source line."""
    return f"warning: {message}\n"
