"""A run's model, logged and registered; the registry by aliases: names that point at a version.

What this module teaches: a run logs its model once (`log_keras_model`: the Keras flavor, served
with its preprocessing, with a signature and an input example) and may register it as a new
version of a named model. MLflow's stages (Staging, Production) are deprecated; a version is named
by aliases instead (`models:/tp4-unet@champion`). `train.py --register NAME` adds a version and
points `@candidate` at it; `report.py --promote RUN NAME@champion` points an alias at the version
a run logged. predict.py and `mlflow models serve` load `models:/NAME@ALIAS` as any model URI, so
that moving an alias changes the model they use, with no change to their command lines.
"""

import os
import types

import mlflow
import mlflow.keras
from mlflow import MlflowClient
from mlflow.models import Model, infer_signature

from tp4.serving import pyfunc

CANDIDATE = "candidate"


def set_alias(name: str, alias: str, version) -> None:
    """Point `alias` of the registered model `name` at `version` (MLflow moves it if it is set)."""
    MlflowClient().set_registered_model_alias(name, alias, str(version))


def promote(run_id: str, target: str) -> tuple[str, str]:
    """Point the alias of `target` (NAME@ALIAS) at the version of NAME that run `run_id` logged;
    returns (the version, the model URI that names it). ValueError (one line) if no such version.

    Args:
        run_id: a run whose model was registered under NAME (train.py --register NAME).
        target: NAME@ALIAS, e.g. tp4-unet@champion.
    """
    name, _, alias = target.partition("@")
    if not (name and alias):
        raise ValueError(f"{target!r}: give the registered model and its alias as NAME@ALIAS")
    client = MlflowClient()
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if not versions:
        raise ValueError(
            f"no version of the registered model {name!r} comes from run {run_id} "
            f"(train.py --register {name} registers a run's model)"
        )
    version = max(versions, key=lambda v: int(v.version)).version
    set_alias(name, alias, version)
    return version, f"models:/{name}@{alias}"


def log_keras_model(model, example, registered_name=None):
    """Log `model` in the Keras flavor and as a served segmentation (tp4/serving/pyfunc.py: its
    signature and input example are the service's), tag the run with its `model_uri`, and with
    `registered_name` register it, the new version marked `@candidate`; returns MLflow's ModelInfo.

    The public `mlflow.keras.log_model(..., input_example=...)` fails (MLflow issue #16183, still
    open in MLflow 3.17: its save_model writes the example before creating the model's folder), so
    the model goes through `Model.log` with a flavor whose save_model creates the folder first.
    tests/test_structure.py fails once MLflow fixes it: then call mlflow.keras.log_model here.

    Requirements are explicit (inferring them would load the model again in a subprocess), and
    MLflow's serving check of the input example is off (it reloads the model and predicts, and only
    warns on failure): tests/test_train.py loads the logged model back and predicts instead.
    """

    def save_model(path, validate_serving_input=None, **kwargs):  # that option is Model.log's
        os.makedirs(path, exist_ok=True)
        mlflow.keras.save_model(path=path, **kwargs)
        pyfunc.add_to(path, kwargs["mlflow_model"], model)  # served with its preprocessing

    flavor = types.ModuleType("mlflow.keras")  # Model.log records the flavor's module name
    flavor.save_model = save_model
    info = Model.log(
        artifact_path=None,
        name="model",
        flavor=flavor,
        model=model,
        signature=infer_signature(*example),  # the network's; add_to gives the service's
        input_example=pyfunc.input_example(model, example[0]),
        metadata=pyfunc.description(model),
        pip_requirements=pyfunc.requirements(),
        registered_model_name=registered_name,
        validate_serving_input=False,
    )
    mlflow.set_tag("model_uri", info.model_uri)  # the run's page names its model
    if registered_name:
        set_alias(registered_name, CANDIDATE, info.registered_model_version)
    return info
