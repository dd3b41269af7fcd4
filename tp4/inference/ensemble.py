"""Fold ensembles (nnU-Net's): the K models of a cross-validation predict together.

What this module teaches:
- an ensemble averages *probabilities*, not masks: a pixel is foreground when the models' mean
  probability is (majority votes on thresholded masks throw the confidence away);
- test-time mirroring composes with it: each model's prediction is itself the mean over the flips;
- where the models come from: a parent cross-validation run names its folds' runs (MLflow's
  `mlflow.parentRunId` tag), each of which logged its model.
"""

from collections.abc import Callable, Sequence

import numpy as np
from mlflow import MlflowClient

from tp4.images import geometry

Predict = Callable[[np.ndarray], np.ndarray]


class Ensemble:
    """Several predict functions (one per model) as one: the mean of their probabilities.

    Args:
        members: batch (N, *spatial, C) -> probabilities (N, *spatial, classes), one per model.
        tta: each member's prediction averaged over every flip of the spatial axes first.
    """

    def __init__(self, members: Sequence[Predict], tta: bool = False):
        if not members:
            raise ValueError("an ensemble needs at least one model")
        self.members, self.tta = list(members), tta

    def __len__(self) -> int:
        return len(self.members)

    def member(self, predict: Predict, batch: np.ndarray) -> np.ndarray:
        """One model's probabilities (mirrored with tta)."""
        return geometry.predict_mirrored(predict, batch) if self.tta else predict(batch)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """The mean of the members' probabilities, float32."""
        total = sum(self.member(predict, batch).astype(np.float64) for predict in self.members)
        return (total / len(self.members)).astype(np.float32)


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
    return [run.data.tags.get("model_uri", f"runs:/{run.info.run_id}/model") for run in children]
