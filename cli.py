"""What every script's main() shares: libraries set up for the command line, and errors as one line.

Library modules change nothing global when imported; a script calls `setup()` first thing in main().
"""

import contextlib
import logging
import os

# MLflow's defaults suit a rate-limited cloud service: 7 retries of up to 120 s each, minutes before
# an error. Here a tracking server that does not answer a request within 3 s, twice, is down: every
# script (and MLflow's HTTP artifact repository, which reads the same settings) gives up after about
# 6 s of silence, at once when the connection is refused. A slow remote server: set a larger
# MLFLOW_HTTP_REQUEST_TIMEOUT in the environment, which wins over these.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "3", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}


def setup() -> None:
    """Settings for a command-line run: an unreachable tracking server fails in seconds (not after
    minutes of retries; MLFLOW_HTTP_DEFAULTS), and MLflow says nothing about creating its tables and
    experiments."""
    for name, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
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
