"""MLflow conventions shared by train.py (2D) and conv3d.py (3D): one logging path for every experiment.

- `tracked_run(...)`: a run that always ends with the right status: FINISHED, FAILED on an exception, KILLED on
  Ctrl-C or SIGTERM (never left RUNNING), with the metrics logged so far kept;
- `EpochLogger`: one printed line and one MLflow value per metric and epoch (`step` = epoch, from 1);
- `log_results(...)`: final metrics, configuration, figures and the model (Keras flavor, with signature).

The store is MLflow's default (SQLite `mlflow.db` in the working directory) unless MLFLOW_TRACKING_URI says
otherwise.
"""

import contextlib
import logging
import os
import signal
import threading
import time
import types

# Fail fast on an unreachable tracking server instead of retrying for minutes.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import matplotlib
import mlflow
import mlflow.keras
import numpy as np
from mlflow.models import Model, infer_signature

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the non-interactive backend)

EPOCH_METRICS = ("loss", "dice", "iou", "val_loss", "val_dice", "val_iou")
logging.getLogger("mlflow").setLevel(logging.WARNING)  # no INFO lines about creating tables and experiments


def _save_keras_model(path, validate_serving_input=True, **kwargs):  # that option is for Model.log, not the flavor
    os.makedirs(path, exist_ok=True)
    mlflow.keras.save_model(path=path, **kwargs)


# mlflow.keras.log_model with an input example fails (MLflow issue #16183: its save_model writes the example
# before creating the model folder). This flavor is mlflow.keras with the folder made first.
_KERAS_FLAVOR = types.SimpleNamespace(__name__="mlflow.keras", save_model=_save_keras_model)


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, unwritable file)."""


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def tracked_run(experiment, run_name, params):
    """Start a run in `experiment`, log `params`, and end it with FINISHED, FAILED or KILLED."""
    uri = mlflow.get_tracking_uri()
    try:
        mlflow.set_experiment(experiment)
    except Exception as error:  # MLflow raises many types here (HTTP, SQL, permissions): all mean the same
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise TrackingError(f"cannot use the MLflow tracking store {uri}: {reason}") from None
    run = mlflow.start_run(run_name=run_name)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    status = "FAILED"
    try:
        mlflow.log_params(params)
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)
        mlflow.end_run(status)


@contextlib.contextmanager
def command_line_errors(parser):
    """For a script's main(): bad input or an unusable store is one line and exit 2, Ctrl-C exit 130."""
    try:
        yield
    except (ValueError, TrackingError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: interrupted; an MLflow run in progress is marked KILLED\n")


class EpochLogger(keras.callbacks.Callback):
    """Prints one line per epoch and logs loss, dice, iou, their val_ twins, lr, epoch_seconds and
    images_per_second (training examples per second of training, validation excluded) with step=epoch."""

    def __init__(self, n_train, epochs, unit="img"):
        super().__init__()
        self.n_train, self.epochs, self.unit = n_train, epochs, unit

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
        mlflow.log_metrics(values, step=epoch + 1)
        shown = "  ".join(f"{key} {values[key]:.4f}" for key in EPOCH_METRICS if key in values)
        print(f"epoch {epoch + 1:>3}/{self.epochs}  {shown}  lr {values['lr']:.1e}  "
              f"{values['epoch_seconds']:.1f}s  {values['images_per_second']:.1f} {self.unit}/s", flush=True)


def training_curves(history, best_epoch):
    """Loss and overlap metrics per epoch, training vs validation, best epoch marked."""
    epochs = np.arange(1, len(history["loss"]) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(epochs, history["loss"], label="train")
    left.plot(epochs, history["val_loss"], label="validation")
    left.set(title="loss", xlabel="epoch")
    for key, style in (("dice", "-"), ("iou", "--")):
        right.plot(epochs, history[key], style, color="C0", label=f"train {key}")
        right.plot(epochs, history[f"val_{key}"], style, color="C1", label=f"validation {key}")
    right.set(title="Dice and IoU", xlabel="epoch", ylim=(0, 1))
    for ax in (left, right):
        ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch ({best_epoch})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def contour_panel(ax, image, mask, probability, title):
    """A grey-level image with the ground truth (green) and predicted (red) contours."""
    ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    for outline, color in ((mask, "lime"), (probability >= 0.5, "red")):
        if outline.any():
            ax.contour(outline.astype(float), levels=[0.5], colors=color, linewidths=1)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def log_results(run, model, results, history, example, figures, config, registered_name=None, tables=None):
    """Final metrics, resolved configuration, model configuration, figures, JSON tables and the model itself.

    `example`: (input, output) of the model for one example, for the model's signature and input example.
    """
    mlflow.log_metrics(results)
    mlflow.log_dict(config, "config.json")
    for name, table in (tables or {}).items():
        mlflow.log_dict(table, name)
    mlflow.log_text(model.to_json(indent=2), "model_config.json")
    figures = {"training_curves.png": training_curves(history, results["best_epoch"]), **figures}
    for name, figure in figures.items():
        mlflow.log_figure(figure, name)
        plt.close(figure)
    # Explicit requirements: inferring them would load the model again in a subprocess. No serving check of the
    # input example either (MLflow would reload the model and predict, about 1.5 s, and only warn on failure):
    # tests/test_train.py loads the logged model back and predicts.
    requirements = [f"keras=={keras.__version__}", f"tensorflow=={_tensorflow_version()}",
                    f"numpy=={np.__version__}"]
    info = Model.log(artifact_path=None, name="model", flavor=_KERAS_FLAVOR, model=model,
                     signature=infer_signature(*example), input_example=example[0], pip_requirements=requirements,
                     registered_model_name=registered_name, validate_serving_input=False)
    mlflow.set_tag("model_uri", info.model_uri)
    return info


def _tensorflow_version():
    import tensorflow as tf

    return tf.__version__
