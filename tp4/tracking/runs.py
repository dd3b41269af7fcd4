"""MLflow conventions shared by train.py (2D) and conv3d.py (3D): one logging path for all runs.

- `tracked_run(...)`: a run that always ends with the right status: FINISHED, FAILED on an
  exception (tag `failure`: why), KILLED on Ctrl-C, SIGTERM or SIGHUP (never left RUNNING), with
  the metrics logged so far kept; the resolved configuration is logged first (it also checks that
  the artifact store can be written, before any training); `run_id` continues a run (--resume);
  one process owns a run while it runs (ownership.py): another one resuming it is refused;
- `TrackedRun`: what the run logs goes through it. Epoch metrics go through a background sender
  (outbox.py: a tracking server that goes away does not stop training), a heartbeat thread tells
  other commands the run is alive (liveness.py), and it counts the seconds the training waited on
  MLflow, logged at the end as `tracking_seconds` (bench.py reads it: MLflow's share of a run);
- epochs.py's `EpochLogger` logs each epoch through the TrackedRun;
- `TrackedRun.results(model)`: the block where the script logs its final metrics, figures and the
  model (registry.py's `log_keras_model`: Keras flavor, signature, input example); if the store
  does not answer any more, or a disk is full, the model is saved in the run's folder instead and
  the run ends KILLED, with a line saying how to send it all later (faults.py);
- `dataset(...)`: the data a run trained on as an MLflow dataset (`mlflow.log_input`): the runs
  table's Dataset column tells runs of the same recipe on other data apart;
- `nested_under(parent_run_id)`: the runs started inside it are nested under a run that no
  process has active (a cross-validation's parent, whose folds train on other machines).

The store is MLflow's default (SQLite `mlflow.db` in the working directory) unless
MLFLOW_TRACKING_URI says otherwise (store.py makes it ready).
"""

import contextlib
import contextvars
import os
import shutil
import signal
import sys
import threading
import time
import warnings

import keras
import mlflow
import mlflow.data
import mlflow.keras
import numpy as np
import requests
from mlflow import MlflowClient
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.exceptions import MlflowException

from tp4 import cli
from tp4.tracking import faults, liveness, outbox, ownership, store

STORE_ERRORS = (MlflowException, requests.RequestException, OSError)


class TrackedRun:
    """The active MLflow run, its folder (checkpoint, and the model if the store goes away), and the
    seconds the training has waited on MLflow for it."""

    def __init__(self, run, folder):
        self.info = run.info
        self.folder = folder
        self.seconds = 0.0
        self.unreachable = False  # the store stopped answering: no more calls to it
        # Epochs the store had when training began: a resume from an older checkpoint (the newest
        # was damaged) trains some again, and they are not logged twice.
        self.stored_steps = set()
        client = MlflowClient()
        self.outbox = outbox.Outbox(client, run.info.run_id)
        self.heartbeat = liveness.Heartbeat(client, run.info.run_id)

    @contextlib.contextmanager
    def timed(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start

    def log_metrics(self, values, step):
        """One epoch's values, queued for the background sender, unless the store has them."""
        with self.timed():
            if step not in self.stored_steps:
                self.outbox.put(values, step)
            self.heartbeat.beat()

    def log_missing_epochs(self, history):
        """Log the epochs of `history` (metrics of epochs 1, 2, ...) that the store lacks: those a
        kill, or an unreachable store, kept from it."""
        if not history:
            return
        history_of_loss = MlflowClient().get_metric_history(self.info.run_id, "loss")
        self.stored_steps = {m.step for m in history_of_loss}
        for step, values in enumerate(history, 1):
            self.log_metrics(values, step)

    def close(self, seconds):
        """Stop the heartbeat and send the queued epochs (waiting up to `seconds`); returns how
        many were not sent."""
        self.heartbeat.stop()
        return self.outbox.close(seconds)

    @contextlib.contextmanager
    def results(self, model: keras.Model):
        """The block that logs a run's results: the queued epochs are sent first (waiting for a
        store that restarts or is locked: outbox.window), and a store that does not answer, or
        artifacts that cannot be written, raise faults.Resumable (the run ends KILLED) after saving
        the model in the run's folder, with a line saying how to send it all later (--resume)."""
        with self.timed():
            last_error = self.outbox.last_error
            unsent = self.close(outbox.window(mlflow.get_tracking_uri(), last_error))
        if unsent:
            error = self.outbox.last_error
            raise self._kept(model, error, f"{outbox.epochs(unsent)} unsent: {faults.cause(error)}")
        try:
            with self.timed():
                yield
        except STORE_ERRORS as error:
            raise self._kept(model, error, faults.cause(error)) from None

    def _kept(self, model, error, cause):
        """faults.Resumable: what failed (`error`, in words `cause`), where the model and the
        metrics are kept, and the command that sends them."""
        self.unreachable = True
        path = os.path.join(self.folder, "model.keras")
        saved = f"the model is saved in {path} and "
        try:
            os.makedirs(self.folder, exist_ok=True)
            cli.save_model(model, path)
        except OSError:  # a full disk there too: the checkpoint's weights are all there is
            saved = ""
        uri = mlflow.get_tracking_uri()
        local_file = isinstance(error, OSError) and not isinstance(error, requests.RequestException)
        what = f"the tracking store {uri} does not answer"
        if local_file:
            what = f"cannot write the run's artifacts to {self.info.artifact_uri}"
        then = "free space, then send" if faults.is_disk_full(error) else "send"
        return faults.Resumable(
            f"{what} ({cause}): {saved}the run's metrics in {self.folder}; {then} them with: "
            f"{_resume_command(self.info.run_id)}"
        )

    def location(self, model_info) -> dict[str, object]:
        """Where the run is: run_id, experiment_id, model_uri (of `model_info`, log_keras_model's),
        and tracking_seconds (the time the training waited on MLflow)."""
        return {
            "run_id": self.info.run_id,
            "experiment_id": self.info.experiment_id,
            "model_uri": model_info.model_uri,
            "tracking_seconds": self.seconds,
        }

    def not_logged(self, metrics: dict[str, float]) -> dict[str, float]:
        """The metrics the run lacks: a resumed run whose results were partly logged before the
        store went away logs the rest, and nothing twice."""
        logged = MlflowClient().get_run(self.info.run_id).data.metrics
        return {key: value for key, value in metrics.items() if key not in logged}


def _resume_command(run_id):
    return f"{cli.script(os.path.abspath(sys.argv[0]))} --resume {run_id}"


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


_PARENT = contextvars.ContextVar("parent_run_id", default=None)


@contextlib.contextmanager
def nested_under(parent_run_id: str | None):
    """The runs tracked_run starts inside this block are nested under `parent_run_id` (its
    `mlflow.parentRunId` tag), a run no process has active; None: as outside the block."""
    token = _PARENT.set(parent_run_id)
    try:
        yield
    finally:
        _PARENT.reset(token)


@contextlib.contextmanager
def tracked_run(experiment, run_name, folder, run_id=None, data=None, system_metrics=True):
    """Start a run in `experiment` (or continue `run_id`, on the same `data` as it started with:
    data.describe's params) and yield a TrackedRun whose folder is `folder`/<run id>, removed once
    the run is FINISHED; end it FINISHED, FAILED or KILLED (also for a store that does not answer
    or a full disk: faults.Resumable). A store error inside the block (MLflow's many kinds)
    becomes one line: a TrackingError. `system_metrics`: MLflow samples the
    machine's CPU, memory, disk, network and GPU use into the run's `system/...` metrics."""
    uri = mlflow.get_tracking_uri()
    owned = (
        ownership.claim(run_id, os.path.join(folder, run_id), data)
        if run_id
        else contextlib.ExitStack()
    )
    start = time.perf_counter()
    try:
        experiment_id = mlflow.set_experiment(experiment).experiment_id
        # By id: when another process creates the experiment at the same moment, MLflow 3.17's
        # set_experiment returns it without making it active, and start_run() alone would log to
        # the Default experiment (set_experiment races: mlflow/mlflow#12259, #10334).
        run = mlflow.start_run(
            run_id,
            experiment_id=experiment_id,
            run_name=run_name,
            tags=liveness.process_tags(),
            log_system_metrics=system_metrics,
            nested=mlflow.active_run() is not None,  # a fold's run, inside cross-validation's
            parent_run_id=None if run_id else _PARENT.get(),  # or under one of another process
        )
    except Exception as error:  # MLflow raises many types here (HTTP, SQL, permissions)
        owned.close()
        raise store.TrackingError(
            f"cannot use the MLflow tracking store {uri}: {cli.first_line(error)}"
        ) from None
    tracked = TrackedRun(run, os.path.join(folder, run.info.run_id))
    in_main_thread = threading.current_thread() is threading.main_thread()
    handled = (signal.SIGTERM, signal.SIGHUP) if in_main_thread else ()
    previous_handlers = {s: signal.signal(s, _interrupt) for s in handled}
    status = "FAILED"
    try:
        if not run_id:  # a new run: this process's from the start
            owned.enter_context(ownership.own(run.info.run_id, tracked.folder))
        owned.enter_context(faults.detail_to(tracked.folder))  # MLflow's tracebacks off the screen
        tracked.seconds += time.perf_counter() - start
        try:
            yield tracked
        except faults.Resumable:
            raise
        except OSError as error:  # a file of the run's artifacts: say where they go
            if faults.is_disk_full(error):  # the checkpoint's: the previous one is whole
                raise faults.Resumable(
                    f"{faults.cause(error)}: free space, then continue the run with: "
                    f"{_resume_command(run.info.run_id)}"
                ) from None
            artifacts, path = run.info.artifact_uri.removeprefix("file://"), error.filename
            if not (path and (artifacts.startswith(str(path)) or str(path).startswith(artifacts))):
                raise
            raise store.TrackingError(
                f"cannot write the run's artifacts to {run.info.artifact_uri}: "
                f"{cli.first_line(error)}"
            ) from None
        except (MlflowException, requests.RequestException) as error:
            raise store.TrackingError(
                f"the tracking store {uri} refused a write: {cli.first_line(error)}"
            ) from None
        status = "FINISHED"
    except faults.Resumable:  # its store or its disk: what the store lacks waits for --resume
        status = "KILLED"
        raise
    except KeyboardInterrupt:
        status = "KILLED"
        with contextlib.suppress(OSError):  # SIGHUP: the terminal may be gone
            print(
                f"run {run.info.run_id} marked KILLED, its metrics so far kept; continue it with: "
                f"{_resume_command(run.info.run_id)}",
                flush=True,
            )
        raise
    except Exception as error:
        if not tracked.unreachable:
            with contextlib.suppress(*STORE_ERRORS):
                mlflow.set_tag("failure", cli.first_line(error))
        raise
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        tracked.close(outbox.window(uri, interrupted=True))
        try:
            if status == "FINISHED":
                mlflow.log_metric("tracking_seconds", tracked.seconds)
            mlflow.end_run(status)
            if status == "FINISHED":  # all of it is in MLflow: the checkpoint has done its work
                shutil.rmtree(tracked.folder, ignore_errors=True)
                with contextlib.suppress(OSError):  # and --checkpoint-dir too, once empty
                    os.rmdir(folder)
        except STORE_ERRORS as error:
            if status == "FINISHED":  # else the run's own error says more
                raise store.TrackingError(
                    f"the run could not be ended in {uri} ({cli.first_line(error)}); "
                    f"end it with: {_resume_command(run.info.run_id)}"
                ) from None
        finally:
            owned.close()  # another process may resume it now


def dataset(description: dict, splits: dict, seed: int):
    """The data of a run as an MLflow dataset, for `mlflow.log_input`: named after its source
    ("synthetic-2d seed 42", a folder's name, "mni-wm"), its digest the content hash of the examples
    (data.describe's `data_hash`: same digest, same data), its source the folder or the generator.

    Args:
        description: data.describe's params (data_source, data_hash, ...).
        splits: the examples as the network sees them: {"train": (images, masks), "val": ...}.
        seed: the seed of synthetic data.
    """
    images = np.concatenate([images for images, _ in splits.values()])
    masks = np.concatenate([masks for _, masks in splits.values()])
    source = description["data_source"]
    if os.path.isdir(source):
        name, where = os.path.basename(os.path.abspath(source)), os.path.abspath(source)
    else:  # generated (synthetic-2d, synthetic-3d) or built in (mni-wm)
        synthetic = source.startswith("synthetic")
        name = f"{source} seed {seed}" if synthetic else source
        where = CodeDatasetSource({"data": source, **({"seed": str(seed)} if synthetic else {})})
    # A local path matches two registered source types that are one: MLflow warns, and picks it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return mlflow.data.from_numpy(
            images, targets=masks, name=name, source=where, digest=description["data_hash"]
        )
