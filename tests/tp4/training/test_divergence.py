"""A diverged training stops at once: run FAILED with the reason, one line, no model logged."""

import keras
import numpy as np
import pytest
from helpers import TINY

import train
from tp4.training import divergence


def _guard(model=None):
    guard = divergence.DivergenceGuard()
    guard.set_model(model or keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))
    guard.on_epoch_begin(2)
    return guard


@pytest.mark.parametrize(
    "loss, shown",
    [(float("nan"), "loss nan"), (float("inf"), "loss inf"), (1.2e11, "loss 1.2e+11")],
)
def test_a_batch_loss_not_finite_or_beyond_the_limit_stops_training(loss, shown):
    with pytest.raises(divergence.Diverged) as error:
        _guard().on_train_batch_end(0, {"loss": loss})
    assert str(error.value) == f"training diverged at epoch 3 ({shown}); try a lower --lr"


def test_a_large_but_possible_loss_passes():
    _guard().on_train_batch_end(0, {"loss": divergence.LOSS_LIMIT})


def test_weights_not_finite_stop_training_at_the_epoch_end():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    guard = _guard(model)
    guard.on_epoch_end(2, {"loss": 0.5, "val_loss": 0.5})  # finite: nothing happens
    model.layers[0].bias.assign(np.array([np.nan], np.float32))
    with pytest.raises(divergence.Diverged, match=r"epoch 3 \(weights not finite\)"):
        guard.on_epoch_end(2, {"loss": 0.5, "val_loss": 0.5})
    with pytest.raises(divergence.Diverged, match=r"epoch 3 \(val_loss nan\)"):
        guard.on_epoch_end(2, {"loss": 0.5, "val_loss": float("nan")})


@pytest.mark.slow
def test_sgd_at_lr_1000_is_a_failed_run_with_one_line_and_no_model(store, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--optimizer", "sgd", "--lr", "1e3"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    (line,) = [line for line in captured.err.splitlines() if "train.py" in line]
    assert line.startswith("train.py: error: training diverged at epoch 1 (loss ")
    assert line.endswith("); try a lower --lr")
    assert "epoch   1/" not in captured.out  # stopped within the epoch: no epoch logged
    (run,) = store.search_runs([store.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["failure"] == line.removeprefix("train.py: error: ")
    assert "model_uri" not in run.data.tags
    assert not store.search_logged_models([run.info.experiment_id])
