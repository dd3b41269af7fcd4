"""MLflow conventions shared by train.py (2D) and conv3d.py (3D): one logging path for all runs.

- `tracked_run(...)`: a run that always ends with the right status: FINISHED, FAILED on an
  exception, KILLED on Ctrl-C or SIGTERM (never left RUNNING), with the metrics logged so far kept;
- `TrackedRun`: what the run logs goes through it, and it counts the seconds spent in MLflow, logged
  at the end as `tracking_seconds` (bench.py reads it: MLflow's share of a run);
- `EpochLogger`: one printed line and one MLflow value per metric and epoch (`step` = epoch, from
  1);
- `TrackedRun.log_results(...)`: final metrics, configuration, figures and the model (Keras flavor,
  with signature and input example).

The store is MLflow's default (SQLite `mlflow.db` in the working directory) unless
MLFLOW_TRACKING_URI says otherwise.
"""

import contextlib
import os
import signal
import threading
import time
import types

import keras
import mlflow
import mlflow.keras
import numpy as np
import tensorflow as tf
from mlflow.models import Model, infer_signature

EPOCH_METRICS = ("loss", "dice", "iou", "val_loss", "val_dice", "val_iou")


class TrackingError(OSError):
    """The tracking store cannot be used (unreachable server, unwritable file)."""


class TrackedRun:
    """The active MLflow run, and the seconds this process has spent in MLflow calls for it."""

    def __init__(self, run):
        self.info = run.info
        self.seconds = 0.0

    @contextlib.contextmanager
    def timed(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start

    def log_metrics(self, values, step=None):
        with self.timed():
            mlflow.log_metrics(values, step=step)

    def log_results(
        self, model, results, example, figures, config, registered_name=None, tables=None
    ):
        """Final metrics, resolved configuration, model configuration, figures, JSON tables, model.

        `example`: (input, output) of the model for one example, for its signature and input
        example.
        """
        with self.timed():
            mlflow.log_metrics(results)
            mlflow.log_dict(config, "config.json")
            for name, table in (tables or {}).items():
                mlflow.log_dict(table, name)
            mlflow.log_text(model.to_json(indent=2), "model_config.json")
            for name, figure in figures.items():
                mlflow.log_figure(figure, name)
            info = log_keras_model(model, example, registered_name)
            mlflow.set_tag("model_uri", info.model_uri)
        return info


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def tracked_run(experiment, run_name, params):
    """Start a run in `experiment`, log `params`, yield a TrackedRun; end with FINISHED, FAILED or
    KILLED."""
    uri = mlflow.get_tracking_uri()
    start = time.perf_counter()
    try:
        experiment_id = mlflow.set_experiment(experiment).experiment_id
    # MLflow raises many types here (HTTP, SQL, permissions): all mean the same
    except Exception as error:
        raise TrackingError(
            f"cannot use the MLflow tracking store {uri}: {_first_line(error)}"
        ) from None
    # By id: when another process creates the experiment at the same moment, MLflow 3.17's
    # set_experiment returns it without making it active, and start_run() alone would log to the
    # Default experiment (set_experiment races: mlflow/mlflow#12259, #10334).
    tracked = TrackedRun(mlflow.start_run(experiment_id=experiment_id, run_name=run_name))
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    status = "FAILED"
    try:
        mlflow.log_params(params)
        tracked.seconds += time.perf_counter() - start
        yield tracked
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        print(f"run {tracked.info.run_id} marked KILLED, its metrics so far kept", flush=True)
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)
        if status == "FINISHED":
            mlflow.log_metric("tracking_seconds", tracked.seconds)
        mlflow.end_run(status)


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


class EpochLogger(keras.callbacks.Callback):
    """Prints one line per epoch and logs loss, dice, iou, their val_ twins, lr, epoch_seconds and
    images_per_second (training examples per second of training, validation excluded), step=epoch.
    """

    def __init__(self, run: TrackedRun, n_train, epochs, unit="img"):
        super().__init__()
        self.run, self.n_train, self.epochs, self.unit = run, n_train, epochs, unit

    def on_epoch_begin(self, epoch, logs=None):
        self.start, self.train_end = time.perf_counter(), None

    def on_test_begin(self, logs=None):
        self.train_end = self.train_end or time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        values = {key: float(logs[key]) for key in EPOCH_METRICS if key in logs}
        values["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        values["epoch_seconds"] = now - self.start
        values["images_per_second"] = self.n_train / ((self.train_end or now) - self.start)
        self.run.log_metrics(values, step=epoch + 1)
        shown = "  ".join(f"{key} {values[key]:.4f}" for key in EPOCH_METRICS if key in values)
        print(
            f"epoch {epoch + 1:>3}/{self.epochs}  {shown}  lr {values['lr']:.1e}  "
            f"{values['epoch_seconds']:.1f}s  {values['images_per_second']:.1f} {self.unit}/s",
            flush=True,
        )


def log_keras_model(model, example, registered_name=None):
    """Log `model` in the Keras flavor, with its signature and input example; returns MLflow's
    ModelInfo.

    The public `mlflow.keras.log_model(..., input_example=...)` fails (MLflow issue #16183, still
    open in MLflow 3.17: its save_model writes the example before creating the model's folder), so
    the model goes through `Model.log` with a flavor whose save_model creates the folder first.
    tests/test_tracking.py fails once MLflow fixes it: then call mlflow.keras.log_model here.

    Requirements are explicit (inferring them would load the model again in a subprocess), and
    MLflow's serving check of the input example is off (it reloads the model and predicts, and only
    warns on failure): tests/test_train.py loads the logged model back and predicts instead.
    """

    def save_model(path, validate_serving_input=None, **kwargs):  # that option is Model.log's
        os.makedirs(path, exist_ok=True)
        mlflow.keras.save_model(path=path, **kwargs)

    flavor = types.ModuleType("mlflow.keras")  # Model.log records the flavor's module name
    flavor.save_model = save_model
    requirements = [
        f"keras=={keras.__version__}",
        f"tensorflow=={tf.__version__}",
        f"numpy=={np.__version__}",
    ]
    return Model.log(
        artifact_path=None,
        name="model",
        flavor=flavor,
        model=model,
        signature=infer_signature(*example),
        input_example=example[0],
        pip_requirements=requirements,
        registered_model_name=registered_name,
        validate_serving_input=False,
    )
