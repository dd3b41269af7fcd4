"""Faults of the run's surroundings (a full disk, a locked or unreachable store): one line of ours.

What this module teaches:
- a fault of the machine is not a fault of the run: a full disk under the store, the artifacts or
  the checkpoint, a SQLite file another process holds locked, a server that went away. Training
  goes on while the store does not answer (outbox.py keeps the epochs), and a run that cannot be
  finished for such a cause ends KILLED, not FAILED (`Resumable`): its checkpoint keeps what the
  store lacks, and `--resume` sends it once the store answers again;
- MLflow logs each failed database call with a full SQLAlchemy traceback (tens of lines, from the
  outbox's and the heartbeat's threads, once per retry). During a run those records go to a file
  in the run's folder (`MLFLOW_DETAIL`, kept with the checkpoint when the run is not FINISHED), and
  the user reads one line saying what happened and what to do;
- the cause is the database's or the system's own words ("database or disk is full", "database is
  locked", "No space left on device"), found under MLflow's wrapping of them.
"""

import contextlib
import errno
import logging
import os

from tp4 import cli

MLFLOW_DETAIL = "mlflow.log"  # in the run's folder: MLflow's tracebacks of the run's store faults
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# MLflow's loggers whose warnings and errors during a run are about its store: the database
# layer, and the system-metrics sampler that stops when the store does not answer.
STORE_LOGGERS = ("mlflow.store", "mlflow.system_metrics", "mlflow.tracking")


class Resumable(OSError):
    """The run cannot go on or end now, for a cause outside it (its store, a full disk); what it
    did is kept for --resume, and it ends KILLED."""


def cause(error: BaseException) -> str:
    """What went wrong, in the words of the layer that knew: the database's message under MLflow's
    and SQLAlchemy's wrappings (their first lines are often about autoflush), the system's
    message and file for an OSError, else the error's first line."""
    seen = error
    while seen is not None:
        database = getattr(seen, "orig", None)  # SQLAlchemy's DBAPIError keeps the driver's error
        if database is not None:
            return f"{type(database).__module__.split('.')[0]}: {cli.first_line(database)}"
        if isinstance(seen, OSError) and seen.strerror:
            where = f": {seen.filename}" if seen.filename else ""
            return f"{seen.strerror}{where}"
        seen = seen.__cause__ or seen.__context__
    return cli.first_line(error)


def is_disk_full(error: BaseException | None) -> bool:
    """Whether `error` (or what caused it) is a full disk or quota: the system's or SQLite's."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL:
            return True
        if "database or disk is full" in str(getattr(seen, "orig", "")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _ToFile(logging.Filter):
    """On MLflow's handlers: a record with a traceback, or a warning of its store's loggers, goes
    to `path` (opened at the first one) instead of the screen."""

    def __init__(self, path):
        super().__init__()
        self.file = logging.FileHandler(path, delay=True)
        self.file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.file.handleError = lambda record: None  # a full disk here too: the detail is lost

    def filter(self, record):
        of_the_store = record.name.startswith(STORE_LOGGERS) and record.levelno >= logging.WARNING
        if record.exc_info or of_the_store:
            self.file.handle(record)
            return False
        return True


@contextlib.contextmanager
def detail_to(folder: str):
    """While the block runs, MLflow's tracebacks and store warnings go to `folder`/MLFLOW_DETAIL
    (written only if there are any), not to the screen.

    Args:
        folder: the run's folder.
    """
    root = logging.getLogger()
    handlers = {*logging.getLogger("mlflow").handlers, *root.handlers, logging.lastResort} - {None}
    to_file = _ToFile(os.path.join(folder, MLFLOW_DETAIL))
    for handler in handlers:
        handler.addFilter(to_file)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(to_file)
        to_file.file.close()
