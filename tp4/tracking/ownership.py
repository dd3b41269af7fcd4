"""One process owns a run: an exclusive lock on a file in the run's folder, held while it trains.

Two `--resume RUN_ID` started at the same moment both find the run KILLED, and both would train
into it (twice the metrics, two models). So the process that trains a run holds an exclusive
`fcntl.flock` on `owner.lock` in the run's folder (next to its checkpoint) for as long as it runs;
another process asking for the run is refused in one line that names the owner. The kernel drops
the lock when its process ends, however it ends (`kill -9` too): a dead owner never blocks a
resume, and no stale lock is ever to be cleaned up by hand.

The lock holds between processes of one machine, containers included when they share the folder
(one kernel); the file tells who holds it: pid, host and PID namespace (a container's pid 1 is not
this machine's).
"""

import contextlib
import fcntl
import json
import os

from mlflow import MlflowClient

from tp4.tracking import liveness

FILE = "owner.lock"


class RunOwned(ValueError):
    """Another process owns the run (one line: who)."""


@contextlib.contextmanager
def own(run_id: str, folder: str):
    """Own run `run_id` while the block runs: its folder's lock, taken at once or refused.

    Args:
        run_id: the run, for the message.
        folder: the run's folder (created if needed), where its checkpoint is kept.

    Raises:
        RunOwned: another process holds the lock.
    """
    os.makedirs(folder, exist_ok=True)
    descriptor = os.open(os.path.join(folder, FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _lock(descriptor, run_id)
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(liveness.process_tags()).encode(), 0)
        yield
    finally:
        os.close(descriptor)  # the lock goes with it


def claim(run_id: str, folder: str, data: dict | None) -> contextlib.ExitStack:
    """To resume run `run_id`: its lock (`own`, in its `folder`), taken before start_run makes
    the run this process's; ValueError (one line) when another process owns it, took it since the
    command checked it, or when its data changed (`data`: data.describe's params)."""
    owned = contextlib.ExitStack()
    owned.enter_context(own(run_id, folder))
    try:
        status = MlflowClient().get_run(run_id).info.status
        if status in ("RUNNING", "FINISHED"):
            raise RunOwned(f"run {run_id} is {status}: another process resumed it")
        if data:
            _refuse_other_data(run_id, data)
    except BaseException:
        owned.close()
        raise
    return owned


def _refuse_other_data(run_id: str, description: dict) -> None:
    """ValueError (one line) unless run `run_id` logged the data_hash and data_count of
    `description`: the content of every example as the network sees it, and their number."""
    logged = MlflowClient().get_run(run_id).data.params
    if all(logged.get(key) in (None, str(description[key])) for key in ("data_hash", "data_count")):
        return
    raise ValueError(
        f"run {run_id} trained on {logged.get('data_count')} examples of "
        f"{logged.get('data_source')} (data_hash {logged.get('data_hash')}); they are now "
        f"{description['data_count']} (data_hash {description['data_hash']}): files changed "
        "since, so it cannot be resumed; start a new run"
    )


def refuse_if_owned(run_id: str, folder: str) -> None:
    """RunOwned when another process owns run `run_id` now: the early check of a --resume, before
    the data and the model are made (`own` is the one that holds)."""
    with contextlib.suppress(FileNotFoundError):  # no lock file: no owner ever
        descriptor = os.open(os.path.join(folder, FILE), os.O_RDONLY)
        try:
            _lock(descriptor, run_id)
        finally:
            os.close(descriptor)


def _lock(descriptor, run_id):
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunOwned(
            f"run {run_id} is being trained by {_owner(descriptor)}: one process owns a run; "
            "wait for it to end, or stop it first"
        ) from None


def _owner(descriptor):
    """Who holds the lock, as its file says: "process 4242 on host-a"."""
    try:
        tags = json.loads(os.pread(descriptor, 4096, 0))
        owner = f"process {tags['pid']} on {tags['host']}"
    except (ValueError, KeyError, TypeError):  # written at this very moment, or an older file
        return "another process"
    if tags.get("pid_namespace") != liveness.process_tags().get("pid_namespace"):
        owner += " (in another PID namespace: a container)"
    return owner
