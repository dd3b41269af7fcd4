"""Faults around a run: the store's SQLite file locked or on a full disk, the artifacts' disk full.

Each one mid-run (at the first epoch's end): one line of ours (no MLflow traceback on stderr),
the run FINISHED when the store answers within the closing window, else KILLED (never FAILED)
with its epochs kept, and a --resume that sends them: every epoch's metrics in the store once.
The full disks are real (a filled tmpfs) where this machine lets the test mount one; elsewhere
ENOSPC is injected (the artifacts), or SQLite's full-disk error (the store, in its own process:
FULL_STORE_CHILD). A lock is short here: MLflow's SQLite sessions wait 20 s for a lock
before failing, cut to BUSY_MS.
"""

import errno
import os
import shutil
import sqlite3
import subprocess
import sys
import threading

import mlflow
import pytest
import sqlalchemy
from helpers import REPO, TINY, fill, small_disk, wait_for_line
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

import train
from tp4 import cli
from tp4.tracking import epochs, faults, outbox

EPOCHS = ["--epochs", "2"]
NO_SPACE = "No space left on device"
BUSY_MS = 300
# train.py's process, run as `python -c FULL_STORE_CHILD REPO train.py ARGS...` where no tmpfs can
# be mounted: once the file $FULL_STORE_MARK exists, every write to the store fails as SQLite's
# writes do on a full disk (SQLITE_FULL, "database or disk is full"); reads still answer. A page
# limit (SQLite's max_page_count) would not do: a tiny run's rows fit in the pages the file has.
FULL_STORE_CHILD = """
import os, runpy, sqlite3, sys
import sqlalchemy

def full_once_marked(connection, cursor, statement, parameters, context, executemany):
    writes = statement.split(None, 1)[0].upper() in ("INSERT", "UPDATE", "DELETE")
    if writes and os.path.exists(os.environ["FULL_STORE_MARK"]):
        raise sqlite3.OperationalError("database or disk is full")
    return statement, parameters

engine = sqlalchemy.engine.Engine
sqlalchemy.event.listen(engine, "before_cursor_execute", full_once_marked, retval=True)
sys.path.insert(0, sys.argv[1])
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def resume_command():
    """How our lines say to resume, from the test's folder: this Python, the checkout's train.py."""
    return f"{cli.script('train.py')} --resume"


@pytest.fixture()
def quick_busy_timeout():
    """MLflow's `PRAGMA busy_timeout = 20000` (each session's) as BUSY_MS, while the test runs."""

    def shorter(connection, cursor, statement, parameters, context, executemany):
        if statement.startswith("PRAGMA busy_timeout"):
            statement = f"PRAGMA busy_timeout = {BUSY_MS};"
        return statement, parameters

    engine = sqlalchemy.engine.Engine
    sqlalchemy.event.listen(engine, "before_cursor_execute", shorter, retval=True)
    yield
    sqlalchemy.event.remove(engine, "before_cursor_execute", shorter)


class Lock:
    """A connection holding `BEGIN EXCLUSIVE` on a SQLite file from a thread, until `release`."""

    def __init__(self, path):
        self.path, self.locked, self.released = path, threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._hold, daemon=True)

    def _hold(self):
        connection = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        connection.execute("BEGIN EXCLUSIVE")
        self.locked.set()
        self.released.wait(60)
        connection.execute("COMMIT")
        connection.close()

    def take(self):
        self.thread.start()
        assert self.locked.wait(60)

    def release(self):
        self.released.set()
        self.thread.join(60)


def at_the_first_epoch_end(monkeypatch, action):
    """Call `action()` once, when the first epoch ends, before it is saved and logged."""
    log_epoch = epochs.EpochLogger.on_epoch_end

    def then_act(logger, epoch, logs=None):
        if epoch == 0:
            action()
        log_epoch(logger, epoch, logs)

    monkeypatch.setattr(epochs.EpochLogger, "on_epoch_end", then_act)


def exit_code_and_stderr(argv, capsys):
    """train.py `argv` run here (sys.argv as the shell gives it): (exit code, stderr lines), no
    traceback and no word of SQLAlchemy's in stderr."""
    shell_argv, sys.argv = sys.argv, [str(REPO / "train.py"), *argv]
    try:
        train.main(argv)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    finally:
        sys.argv = shell_argv
    err = capsys.readouterr().err
    assert "Traceback" not in err and "sqlalchemy" not in err.lower(), err
    return code, err.strip().splitlines()


def only_run(store):
    (run,) = store.search_runs([store.get_experiment_by_name("tiny").experiment_id])
    return run


def assert_complete(store, run_id, epochs=2):
    """The run FINISHED with every epoch's metrics once, its test metrics once, its model."""
    run = store.get_run(run_id)
    assert run.info.status == "FINISHED", run.info.status
    for key in ("loss", "val_dice", "lr"):
        steps = [m.step for m in store.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(1, epochs + 1)), key
    assert len(store.get_metric_history(run_id, "test_dice")) == 1
    assert "model_uri" in run.data.tags
    assert not os.path.exists(f"checkpoints/{run_id}")  # all of it in MLflow


def test_a_sqlite_lock_shorter_than_the_window_delays_the_metrics_and_the_run_finishes(
    store, monkeypatch, capsys, tmp_path, quick_busy_timeout
):
    lock = Lock(tmp_path / "mlflow.db")
    monkeypatch.setattr(outbox, "SQLITE_SECONDS", 120.0)

    def lock_for_a_while():
        lock.take()
        threading.Timer(3.0, lock.release).start()

    at_the_first_epoch_end(monkeypatch, lock_for_a_while)
    code, err = exit_code_and_stderr([*TINY, *EPOCHS], capsys)
    assert code == 0, err
    assert err[0] == (
        "the tracking store does not answer (sqlite3: database is locked): training goes on, its "
        "epochs are kept in the checkpoint and sent when it answers"
    )
    assert err[-1].startswith("the tracking store answers again after ") and len(err) <= 3, err
    assert_complete(store, only_run(store).info.run_id)


def test_a_sqlite_lock_longer_than_the_window_kills_the_run_and_resume_sends_its_epochs(
    store, capsys, tmp_path, quick_busy_timeout
):
    lock = Lock(tmp_path / "mlflow.db")
    close = outbox.Outbox.close

    def lock_gone_once_given_up(box, seconds):  # then the run can be ended, KILLED
        unsent = close(box, seconds)
        lock.release()
        return unsent

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(outbox, "SQLITE_SECONDS", 1.0)
        at_the_first_epoch_end(patch, lock.take)
        patch.setattr(outbox.Outbox, "close", lock_gone_once_given_up)
        code, err = exit_code_and_stderr([*TINY, *EPOCHS], capsys)
    run = only_run(store)
    run_id = run.info.run_id
    assert code == 2 and run.info.status == "KILLED"
    assert err[-1] == (
        f"train.py: error: the tracking store {mlflow.get_tracking_uri()} does not answer (2 "
        "epochs unsent: sqlite3: database is locked): the model is saved in "
        f"checkpoints/{run_id}/model.keras and the run's metrics in checkpoints/{run_id}; send "
        f"them with: {resume_command()} {run_id}"
    )
    assert len(err) == 3 and err[1] == "waiting up to 1 s for the tracking store to take 2 epochs"
    detail = tmp_path / f"checkpoints/{run_id}/{faults.MLFLOW_DETAIL}"
    assert "database is locked" in detail.read_text()  # MLflow's tracebacks: there
    assert not store.get_metric_history(run_id, "loss")  # both epochs wait in the checkpoint

    resumed = exit_code_and_stderr(["--resume", run_id], capsys)
    assert resumed[0] == 0 and "resuming after epoch" not in " ".join(resumed[1]), resumed
    assert_complete(store, run_id)


def test_a_full_disk_under_the_artifacts_kills_the_run_and_resume_logs_its_results(
    store, capsys, tmp_path
):
    with small_disk(tmp_path / "mlruns", "4m") as mounted, pytest.MonkeyPatch.context() as patch:
        if mounted:
            fill_it = lambda: fill(tmp_path / "mlruns")  # noqa: E731
        else:

            def no_space(*args, **kwargs):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def fill_it():
                patch.setattr(LocalArtifactRepository, "log_artifact", no_space)

        at_the_first_epoch_end(patch, fill_it)
        code, err = exit_code_and_stderr([*TINY, *EPOCHS], capsys)
        run = only_run(store)
        run_id = run.info.run_id
        assert code == 2 and run.info.status == "KILLED", err
        assert len(err) == 1 and err[0].startswith(
            f"train.py: error: cannot write the run's artifacts to {run.info.artifact_uri} "
            f"({NO_SPACE}"
        ), err
        assert err[0].endswith(
            f"the model is saved in checkpoints/{run_id}/model.keras and the run's metrics in "
            f"checkpoints/{run_id}; free space, then send them with: {resume_command()} {run_id}"
        )
        assert "test_dice" in run.data.metrics  # logged before the fault: kept, not FAILED
        patch.undo()
        if mounted:
            (tmp_path / "mlruns" / "filler").unlink()
        resumed = exit_code_and_stderr(["--resume", run_id], capsys)
        assert resumed[0] == 0, resumed
        assert_complete(store, run_id)
        artifacts = {a.path for a in store.list_artifacts(run_id)}
        assert {"training_curves.png", "test_predictions.png", "config.json"} <= artifacts


def test_a_full_disk_under_the_store_is_one_line_and_resume_sends_the_kept_epochs(
    tmp_path, monkeypatch, capsys, _empty_store_file
):
    with small_disk(tmp_path / "disk", "4m") as mounted:
        shutil.copy(_empty_store_file, tmp_path / "disk" / "mlflow.db")
        uri = f"sqlite:///{tmp_path}/disk/mlflow.db"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_TIMEOUT": "1"}
        command, mark = [str(REPO / "train.py"), *TINY, "--epochs", "4"], tmp_path / "full"
        if not mounted:
            env["FULL_STORE_MARK"] = str(mark)
            command = ["-c", FULL_STORE_CHILD, str(REPO), *command]
        process = subprocess.Popen(
            [sys.executable, *command],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for_line(process, "epoch   1/")
            if mounted:
                filler = fill(tmp_path / "disk")
            else:
                filler = mark
                mark.touch()
            err = process.communicate(timeout=120)[1]
        finally:
            process.kill()
            process.wait()
        assert process.returncode == 2 and "Traceback" not in err, err
        err = err.strip().splitlines()
        assert len(err) <= 3 and err[0].startswith("the tracking store does not answer"), err
        assert err[-1].startswith(f"train.py: error: the tracking store {uri} does not answer (")
        assert "sqlite3: database or disk is full" in err[-1]
        run_id = err[-1].split()[-1]
        assert err[-1].endswith(f"free space, then send them with: {resume_command()} {run_id}")

        filler.unlink()  # space again: the resume sends what the store lacks
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        try:
            client = mlflow.MlflowClient(uri)
            # Its last write (KILLED) goes through where its failed transactions' journals gave back
            # a few blocks (20-32 KiB free after the exit in 3 runs of 4 on a tmpfs), else the run
            # is left RUNNING and the resume marks it first.
            status = client.get_run(run_id).info.status
            assert status in ("RUNNING", "KILLED")
            code, err = exit_code_and_stderr(["--resume", run_id], capsys)
            assert code == 0, err
            if status == "RUNNING":
                assert f"run {run_id} (UNet_CombinedLoss_Adam) ended without a word" in err[0]
            assert_complete(client, run_id, epochs=4)
        finally:
            mlflow.set_tracking_uri(None)
