"""Fold ensembles (nnU-Net's): the K models of a cross-validation predict together.

What this module teaches:
- an ensemble averages *probabilities*, not masks: a pixel is foreground when the models' mean
  probability is (majority votes on thresholded masks throw the confidence away);
- an ensemble is itself a Keras model (`average_model`): whatever predicts with one model
  predicts with it, test-time mirroring included;
- where the models come from: a parent cross-validation run names its folds' runs (MLflow's
  `mlflow.parentRunId` tag), each of which logged its model.
"""

import re
from collections.abc import Sequence

import keras
from mlflow import MlflowClient

from tp4.inference import segment


def average_model(models: Sequence[keras.Model]) -> keras.Model:
    """One Keras model whose output is the mean of the `models`' probabilities on the same input:
    everything that takes a model (predict.py's fit to the network, sliding windows, --tta, the
    precision chosen for the machine) takes the ensemble as it is. Mirroring the mean is the mean of
    the mirrored members (the flips are linear).

    Args:
        models: same input and output shapes (the folds of one cross-validation); renamed
            member0, member1, ... inside the ensemble.

    Returns:
        The ensemble (its name says how many models), or the one model of a list of one.

    Raises:
        ValueError: no model, or shapes that differ.
    """
    if not models:
        raise ValueError("an ensemble needs at least one model")
    if len(models) == 1:
        return models[0]
    shapes = {(m.input_shape, m.output_shape) for m in models}
    if len(shapes) > 1:
        raise ValueError(
            f"the models of an ensemble must have one input and output shape: {shapes}"
        )
    inputs = keras.Input(models[0].input_shape[1:], name="image")
    for i, model in enumerate(models):
        model.name = f"member{i}"  # nested models need names of their own
    mean = keras.layers.Average(name="mean_probability", dtype="float32")(
        [model(inputs) for model in models]
    )
    return keras.Model(inputs, mean, name=f"Ensemble{len(models)}")


def size(model: keras.Model) -> int:
    """How many models `average_model` put in `model` (1 for a plain model)."""
    return sum(isinstance(layer, keras.Model) for layer in getattr(model, "layers", ())) or 1


def load(location: str, client: MlflowClient | None = None) -> keras.Model:
    """predict.py's model argument: one model (segment.load_model's), several separated by commas,
    or a cross-validation's parent run (`runs:/<parent run id>`, no path): its folds' ensemble.

    Raises:
        ValueError: for any model that does not load, or models that do not fit together.
    """
    locations = [part for part in location.split(",") if part]
    if len(locations) == 1 and re.fullmatch(r"runs:/[0-9a-f]{32}/?", location):
        locations = fold_model_uris(location.removeprefix("runs:/").strip("/"), client)
    return average_model([segment.load_model(part) for part in locations])


def fold_model_uris(parent_run_id: str, client: MlflowClient | None = None) -> list[str]:
    """The models of a cross-validation run's folds, in fold order.

    Args:
        parent_run_id: the parent run (train.py --folds K).
        client: an MlflowClient (default: of the current tracking URI).

    Returns:
        The model URI of each FINISHED fold run (its `model_uri` tag).

    Raises:
        ValueError: no such run, or no finished fold under it.
    """
    client = client or MlflowClient()
    try:
        parent = client.get_run(parent_run_id)
    except Exception as error:  # MLflow raises several types for an unknown id
        raise ValueError(f"no run {parent_run_id}: {str(error).splitlines()[0]}") from None
    children = client.search_runs(
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'FINISHED'",
    )
    children = sorted(children, key=lambda run: int(run.data.params.get("cv_fold", 0)))
    if not children:
        raise ValueError(f"run {parent_run_id} has no finished fold runs (train.py --folds K)")
    return [model_uri(run) for run in children]


def model_uri(run) -> str:
    """The model a fold's run logged: its `model_uri` tag (runs:/<id>/model where it lacks one)."""
    return run.data.tags.get("model_uri", f"runs:/{run.info.run_id}/model")
