"""cvparent.py: the folds of one cross-validation, trained apart (--fold I) or resumed, meet in one
parent run, whose summary the last of them writes."""

import mlflow
import numpy as np
import pytest
from helpers import TINY

import train
from tp4.tracking import epochs
from tp4.training import cvparent

FOLD = [*TINY[: TINY.index("--epochs")], "--epochs", "2", *TINY[TINY.index("--epochs") + 2 :]]
FOLD += ["--folds", "2", "--no-system-metrics"]


def _runs(store):
    everything = store.search_runs([store.get_experiment_by_name("tiny").experiment_id])
    parents = [r for r in everything if "mlflow.parentRunId" not in r.data.tags]
    return parents, [r for r in everything if r not in parents]


@pytest.mark.slow
def test_a_stopped_cross_validation_is_finished_by_a_fold_alone_and_a_resumed_fold(
    store, monkeypatch, capsys
):
    log_epoch = epochs.EpochLogger.on_epoch_end

    def interrupted(self, epoch, logs=None):  # --folds 2 killed in fold 0, after its first epoch
        log_epoch(self, epoch, logs)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(SystemExit):
        patch.setattr(epochs.EpochLogger, "on_epoch_end", interrupted)
        train.main(FOLD)
    (parent,), (killed,) = _runs(store)
    assert (parent.info.status, killed.info.status) == ("KILLED", "KILLED")
    assert parent.info.run_name == "UNet_CombinedLoss_Adam_cv2"

    train.main(FOLD + ["--fold", "1"])  # the fold that never ran: it joins the same parent
    (same,), children = _runs(store)
    assert same.info.run_id == parent.info.run_id and same.info.status == "KILLED"
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert "1 of 2 folds finished; waiting for 0" in capsys.readouterr().out

    train.main(["--resume", killed.info.run_id])  # the last fold: the summary is written
    (done,), children = _runs(store)
    assert done.info.status == "FINISHED" and {r.info.status for r in children} == {"FINISHED"}
    assert len(store.get_metric_history(killed.info.run_id, "loss")) == 2  # resumed, not rerun
    dice = [r.data.metrics["test_dice"] for r in children]
    assert done.data.metrics["test_dice_mean"] == pytest.approx(np.mean(dice))
    assert done.data.metrics["test_dice_std"] == pytest.approx(np.std(dice))
    assert done.data.metrics["ensemble_models"] == 2
    oof = mlflow.artifacts.load_dict(f"{done.info.artifact_uri}/oof_cases.json")
    assert sorted({row[0] for row in oof["data"]}) == [0, 1] and len(oof["data"]) == 34


def _crafted(status, tags, params=None):
    with mlflow.start_run(run_name="crafted", tags=tags) as run:
        mlflow.log_params(params or {})
    mlflow.MlflowClient().set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_parents_made_at_the_same_moment_are_merged_before_the_one_summary(store):
    mlflow.set_experiment("e")
    key = {cvparent.KEY_TAG: "k"}
    first, second = sorted(_crafted("SCHEDULED", key) for _ in range(2))
    other_recipe = _crafted("SCHEDULED", {cvparent.KEY_TAG: "other"})
    fold0 = _crafted("FINISHED", {"mlflow.parentRunId": second}, {"cv_fold": 0})
    fold1 = _crafted("FINISHED", {"mlflow.parentRunId": first}, {"cv_fold": 1})
    written = []

    assert not cvparent.complete(other_recipe, 2, lambda *args: written.append(args))
    assert cvparent.complete(second, 2, lambda p, folds: written.append((p, folds)))
    ((kept, folds),) = written
    assert kept == first and [r.info.run_id for r in folds] == [fold0, fold1]
    assert store.get_run(first).info.status == "FINISHED"
    assert store.get_run(second).info.lifecycle_stage == "deleted"
    assert store.get_run(fold0).data.tags["mlflow.parentRunId"] == first
    assert not cvparent.complete(first, 2, lambda *args: written.append(args))  # done: once


def test_the_key_tells_recipes_and_folds_apart_not_where_the_data_lies():
    folds = [{"train": ["a"], "val": ["b"]}, {"train": ["b"], "val": ["a"]}]
    data = {"data_hash": "h", "data_count": 2, "data_shape": "32x32x1", "data_source": "/here"}
    same = cvparent.key(folds, data, {"encoder": "plain"}, {"lr": 0.01})
    assert same == cvparent.key(
        folds, {**data, "data_source": "/there"}, {"encoder": "plain"}, {"lr": 0.01}
    )
    assert same != cvparent.key(folds, data, {"encoder": "plain"}, {"lr": 0.02})
    assert same != cvparent.key(folds[::-1], data, {"encoder": "plain"}, {"lr": 0.01})
    assert same != cvparent.key(
        folds, {**data, "data_hash": "g"}, {"encoder": "plain"}, {"lr": 0.01}
    )
