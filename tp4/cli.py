"""What every script's main() shares: libraries set up for the command line, and errors as one line.

Library modules change nothing global when imported; a script calls `setup()` first thing in main().
"""

import argparse
import atexit
import contextlib
import logging
import os
import shutil
import sys
import threading
import zipfile

import tp4

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


def run(main) -> None:
    """Run a script's `main()` and end the process with its exit status, as `sys.exit(main())`
    does, without the interpreter's teardown.

    That teardown frees the objects of TensorFlow, Keras and MLflow one by one, through several
    full garbage collections: 1.3 s after `import tensorflow` alone, 2.6 s after a run of
    train.py (a 2-core AMD EPYC, Zen 4), when nothing is left to do. What an exit must do is done:
    the threads that are not daemons are joined, the atexit handlers run (MLflow's, logging's) and
    the outputs are flushed. An exception other than SystemExit goes up as usual.
    """
    try:
        status = main()
    except SystemExit as stop:
        status = stop.code
    if status is not None and not isinstance(status, int):  # as sys.exit: the message, then 1
        print(status, file=sys.stderr)
        status = 1
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # what the interpreter calls at its exit (CPython's own name)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # a closed pipe (`| head`): exit status 120, as the interpreter's
        status = status or 120
    os._exit(status or 0)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, except where there is none to show: an on/off flag, or
    an option whose help text already says what happens without it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def at_least(minimum: float, kind: type = int):
    """An argparse type: a number of `kind` (int or float) not below `minimum`; argparse turns its
    refusal into one line (`argument --epochs: must be at least 1, got 0`)."""

    def parse(text):
        value = kind(text)  # ValueError: argparse says "invalid int value: 'x'"
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def positive(text: str) -> float:
    """An argparse type: a number above 0 (a learning rate)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def first_line(error: BaseException) -> str:
    """The first line of an error's message (MLflow's can be pages long), or its type."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def argument_parser(prog, doc, epilog=None):
    """The scripts' argument parser: the first paragraph of the module's docstring as the
    description, defaults in --help."""
    return argparse.ArgumentParser(
        prog=prog, description=doc.split("\n\n")[0], epilog=epilog, formatter_class=HelpFormatter
    )


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


def check_output_file(flag: str, path: str, suffix: str = "") -> None:
    """ValueError unless a file can be written at `path`, checked before the work whose result it
    will hold: a name ending in `suffix`, in a folder that exists and this user can write to."""
    if not path.endswith(suffix):
        raise ValueError(f"{flag} {path}: the file name must end in {suffix}")
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a folder, not a file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ValueError(f"{flag} {path}: {folder} is not a folder this user can write to")


def save_model(model, path, entries=None):
    """`model` as a .keras file at `path`, written under a temporary name and renamed: a crash never
    leaves half a file where a model is expected, and a failed write (a full disk) leaves none.
    `entries` ({name: text}) are added to the file's zip (Keras reads only its own): the plan.

    Raises:
        OSError: the file cannot be written (one line; the run, logged before, is not touched).
    """
    partial = f"{path}.partial.keras"  # Keras wants the suffix
    try:
        model.save(partial)
        with zipfile.ZipFile(partial, "a") as archive:
            for name, text in (entries or {}).items():
                archive.writestr(name, text)
        os.replace(partial, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
        if not isinstance(error, OSError):
            raise
        raise OSError(
            f"--save-model {path}: cannot write the model ({first_line(error)}); the run and its "
            "model are logged in MLflow all the same"
        ) from None


def ui_address(tracking_uri, experiment_id, run_id):
    """How to see a run in MLflow's UI: the server's page, or the `mlflow ui` command and the page
    it serves. `?workflowType=machine_learning`: MLflow 3 would open on its GenAI view."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri.rstrip('/')}/{page}"
    here = ("sqlite:///mlflow.db", f"sqlite:///{os.path.abspath('mlflow.db')}")  # MLflow's default
    store = "" if tracking_uri in here else f" --backend-store-uri {tracking_uri}"
    return f"{command('mlflow')} ui{store}   then open http://127.0.0.1:5000/{page}"


def command(name: str = "python") -> str:
    """How to call this Python's `name` (python, mlflow) in a printed command: the bare name where
    a shell finds this one (an activated virtual environment), else its path, relative to here if
    inside (.venv/bin/python): a printed command works as printed."""
    own = os.path.join(os.path.dirname(sys.executable), name)
    found = shutil.which(name)
    # The folders compared, not the files: a virtual environment's python is a link to the system's.
    same = found and os.path.basename(found) == name
    if same and os.path.realpath(os.path.dirname(found)) == os.path.realpath(os.path.dirname(own)):
        return name
    return _as_typed(own)


def script(name: str) -> str:
    """How to run a script from here, as printed: this Python (command()) and the script's path
    (`name`: a path, or a file of the checkout such as predict.py), relative to here if inside."""
    return f"{command()} {_as_typed(os.path.join(tp4.ROOT, name))}"


def _as_typed(path):
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def print_next_steps(outcome, tracking_uri, saved_model=None):
    """What to do with a finished run: its id and model, a ready predict.py command, the UI."""
    model = saved_model or outcome["model_uri"]
    print(f"\nrun {outcome['run_id']}, model {outcome['model_uri']}")
    if saved_model:
        print(f"model file: {saved_model}")
    print("next:")
    predict = script("predict.py")
    print(f"  segment images:  {predict} {model} IMAGE_OR_FOLDER --output predictions/")
    address = ui_address(tracking_uri, outcome["experiment_id"], outcome["run_id"])
    print(f"  see the run:     {address}")
