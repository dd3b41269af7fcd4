"""The MLflow tracking store made ready before any run: created safely, checked, dead runs swept.

What this module teaches:
- MLflow creates the tables of a new SQLite store on first use, in about a second (several on a
  busy machine); two processes doing it at once, or an interrupt in the middle, break the file for
  good ("table ... already exists"). Here the store is created, or upgraded to MLflow's current
  schema, once, under a file lock (the `filelock` package), in a temporary file renamed into place:
  other processes wait for it, and an interrupt leaves no half-made store;
- a store that cannot be written is one line in seconds (MLflow would retry for minutes);
- runs whose process died without a word are marked KILLED before anything else (liveness.py).

The store is MLflow's default (SQLite `mlflow.db` in the working directory) unless
MLFLOW_TRACKING_URI says otherwise; only a SQLite store is created here, any other is used as it is.
"""

import os
import shutil
import sys
from urllib.parse import unquote

import filelock
import mlflow
from mlflow import MlflowClient
from mlflow.store.db import utils as db_utils

from tp4 import cli
from tp4.tracking import liveness

LOCK_TIMEOUT = 300  # seconds to wait for another process creating or upgrading the store


class TrackingError(OSError):
    """The tracking store cannot be used (unreachable server, unwritable file)."""


def open_store() -> MlflowClient:
    """The tracking store, ready for runs: the SQLite file created or upgraded if needed, and the
    runs whose process died marked KILLED, one line each on stderr (with how to resume them).

    Returns:
        An MlflowClient of the store (MLFLOW_TRACKING_URI, or ./mlflow.db).

    Raises:
        TrackingError: the store cannot be created, written or reached.
    """
    uri = mlflow.get_tracking_uri()
    try:
        if uri.startswith("sqlite:///"):
            prepare_sqlite(unquote(uri.removeprefix("sqlite:///")))
        client = MlflowClient(uri)
        for line in liveness.mark_dead_runs(client):
            print(line, file=sys.stderr, flush=True)
    except Exception as error:  # MLflow raises many types here (HTTP, SQL, permissions)
        raise TrackingError(
            f"cannot use the MLflow tracking store {uri}: {cli.first_line(error)}"
        ) from None
    return client


def prepare_sqlite(path: str) -> None:
    """Create the SQLite store at `path`, or upgrade its schema, once and atomically.

    Args:
        path: the database file.

    Raises:
        OSError: its folder or the file cannot be written.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise PermissionError(f"{path} cannot be written")
    with filelock.FileLock(f"{path}.lock", timeout=LOCK_TIMEOUT):
        if not os.path.exists(path):
            _rebuild(path, upgrade=False)
        elif _schema_is_outdated(path):
            _rebuild(path, upgrade=True)


def _schema_is_outdated(path):
    engine = db_utils.create_sqlalchemy_engine(f"sqlite:///{path}")
    try:
        return db_utils._get_schema_version(engine) != db_utils._get_latest_schema_revision()
    finally:
        engine.dispose()


def _rebuild(path, upgrade):
    """Create (or copy and upgrade) the store in a temporary file, then rename it into place."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        if upgrade:  # what `mlflow db upgrade` does, on a copy
            shutil.copyfile(path, temporary)
            engine = db_utils.create_sqlalchemy_engine(f"sqlite:///{temporary}")
            try:
                db_utils._upgrade_db(engine)
            finally:
                engine.dispose()
        else:  # MLflow creates its tables and default experiment on first use
            MlflowClient(f"sqlite:///{temporary}").search_experiments()
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
