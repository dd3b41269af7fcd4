"""crossval.py through train.py: a parent run with nested fold runs, the summary computed from
the folds' own metrics, every case out-of-fold once, the ensemble on the outer test split."""

import json

import mlflow
import numpy as np
import pytest
from helpers import TINY

import train
from tp4.inference import ensemble

# TINY, 2 epochs, at a learning rate and noise that learn in them.
CV = [*TINY[: TINY.index("--epochs")], "--epochs", "2", *TINY[TINY.index("--epochs") + 2 :]]
CV += ["--lr", "1e-2", "--noise", "0.02"]


@pytest.mark.slow
def test_two_folds_make_a_parent_with_nested_runs_and_its_summary(store):
    train.main(CV + ["--folds", "2"])
    experiment = store.get_experiment_by_name("tiny").experiment_id
    everything = store.search_runs([experiment])
    (parent,) = [r for r in everything if "mlflow.parentRunId" not in r.data.tags]
    children = [
        r for r in everything if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    ]
    assert parent.info.run_name == "UNet_CombinedLoss_Adam_cv2"
    assert (parent.data.params["encoder"], parent.data.params["cv_folds"]) == ("plain", "2")
    (logged,) = mlflow.get_run(parent.info.run_id).inputs.dataset_inputs  # report.py's Dataset
    assert logged.dataset.name == "synthetic-2d seed 1"
    assert sorted(r.info.run_name for r in children) == [
        "UNet_CombinedLoss_Adam_fold0",
        "UNet_CombinedLoss_Adam_fold1",
    ]
    assert all(r.info.status == "FINISHED" for r in everything)
    dice = [r.data.metrics["test_dice"] for r in children]
    metrics = parent.data.metrics
    assert metrics["test_dice_mean"] == pytest.approx(np.mean(dice))
    assert metrics["test_dice_std"] == pytest.approx(np.std(dice))
    assert metrics["ensemble_models"] == 2 and 0 <= metrics["ensemble_test_dice"] <= 1
    assert "single_test_dice_mean" in metrics and "test_hd95_std" in metrics

    # The 34 training + validation scans of the 40 (6 are the outer test split), held out once.
    oof = mlflow.artifacts.load_dict(f"{parent.info.artifact_uri}/oof_cases.json")
    cases = [row[1] for row in oof["data"]]
    assert oof["columns"][0] == "fold" and len(cases) == len(set(cases)) == 34
    splits = mlflow.artifacts.load_dict(f"{parent.info.artifact_uri}/splits.json")
    assert sorted(sum((fold["val"] for fold in splits), [])) == [f"case_{i:03d}" for i in range(34)]
    for child in children:  # each fold's run has its curves and its held-out cases
        assert len(store.get_metric_history(child.info.run_id, "val_dice")) == 2
        table = mlflow.artifacts.load_dict(f"{child.info.artifact_uri}/test_cases.json")
        fold = splits[int(child.data.params["cv_fold"])]
        assert sorted({row[0] for row in table["data"]}) == fold["val"]
    assert len(ensemble.fold_model_uris(parent.info.run_id)) == 2
    assert ensemble.size(ensemble.load(f"runs:/{parent.info.run_id}")) == 2  # predict.py's


@pytest.mark.slow
def test_one_fold_alone_with_a_users_splits_file(store, tmp_path):
    cases = [f"case_{i:03d}" for i in range(34)]
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([{"train": cases[10:], "val": cases[:10]}] * 2))
    train.main(CV + ["--fold", "1", "--splits", str(path)])
    found = store.search_runs([store.get_experiment_by_name("tiny").experiment_id])
    (run,) = [r for r in found if "cv_fold" in r.data.params]
    (parent,) = [r for r in found if r is not run]  # waiting for the other fold (cvparent.py)
    assert parent.info.status == "SCHEDULED"
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.info.run_name == "UNet_CombinedLoss_Adam_fold1" and run.data.params["cv_fold"] == "1"
    assert run.data.params["data_split"].endswith("/10")  # the 10 held-out cases
    with pytest.raises(SystemExit):
        train.main(CV + ["--fold", "2", "--splits", str(path)])
