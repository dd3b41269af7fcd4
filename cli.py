"""What every script's main() shares: libraries set up for the command line, and errors as one line.

Library modules change nothing global when imported; a script calls `setup()` first thing in main().
"""

import contextlib
import logging
import os


def setup() -> None:
    """Settings for a command-line run: an unreachable tracking server fails in seconds (not after
    minutes of retries), and MLflow says nothing about creating its tables and experiments."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    logging.getLogger("mlflow").setLevel(logging.WARNING)


@contextlib.contextmanager
def command_line_errors(parser):
    """For a script's main(): bad input (ValueError) or an unusable file or store (OSError) is one
    line and exit status 2; Ctrl-C is exit status 130."""
    try:
        yield
    except (ValueError, OSError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: interrupted\n")
