"""What the scripts tell a user: progress while they run, and what to do next when they are done."""

import os
import sys
import time

import keras
import mlflow
import numpy as np
import psutil
import pytest
from helpers import TINY, crafted_run, refused_in_one_line

import conv3d
import data
import tp4
import train
from tp4 import cli
from tp4.tracking import epochs, runs


def test_time_left_is_the_median_epoch_times_the_epochs_left():
    assert epochs.time_left([9.0, 2.0, 3.0, 2.5], 10) == "0m25s left"  # first epoch compiles
    assert epochs.time_left([40.0], 3) == "2m00s left"  # one epoch: the only measure there is
    assert epochs.time_left([9.0, 2.0], 0) == "done"


def test_printed_commands_name_this_python_unless_a_shell_finds_it(monkeypatch, tmp_path):
    venv = os.path.dirname(sys.executable)
    monkeypatch.setenv("PATH", f"{venv}{os.pathsep}{os.environ['PATH']}")  # activated
    assert (cli.command(), cli.command("mlflow")) == ("python", "mlflow")
    # Not activated, a system python first on PATH (the venv's python links to the same file).
    (tmp_path / "python").symlink_to(os.path.realpath(sys.executable))
    monkeypatch.setenv("PATH", str(tmp_path))  # its path then, relative if inside
    environment = os.path.dirname(venv)  # .venv
    monkeypatch.chdir(os.path.dirname(environment))
    assert cli.command() == os.path.join(os.path.basename(environment), "bin", "python")
    monkeypatch.chdir(tmp_path)
    assert cli.command("mlflow") == os.path.join(venv, "mlflow")


def test_the_ui_address_opens_the_run_in_the_model_training_view(monkeypatch):
    monkeypatch.setenv("PATH", f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    page = "#/experiments/7/runs/abc?workflowType=machine_learning"
    assert cli.ui_address("http://lab:5000/", "7", "abc") == f"open http://lab:5000/{page}"
    assert cli.ui_address("sqlite:///mlflow.db", "7", "abc") == (
        f"mlflow ui   then open http://127.0.0.1:5000/{page}"
    )
    assert cli.ui_address("sqlite:////srv/runs.db", "7", "abc").startswith(
        "mlflow ui --backend-store-uri sqlite:////srv/runs.db   then open"
    )


@pytest.mark.slow
def test_a_run_prints_its_progress_and_what_to_do_next_and_saves_its_model(
    store, capsys, tmp_path, monkeypatch
):
    path = tmp_path / "unet.keras"
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv("PATH", f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    train.main(TINY + ["--epochs", "2", "--save-model", str(path)])
    out = capsys.readouterr().out.splitlines()
    run = store.search_runs([store.get_experiment_by_name("tiny").experiment_id])[0]
    model_uri = run.data.tags["model_uri"]
    assert "system/cpu_utilization_percentage" in run.data.metrics  # on by default
    assert out[0] == "generating 40 synthetic 32x32 scans (seed 1)"
    assert any(line.startswith("training: up to 2 epochs") for line in out)
    epochs = [line for line in out if line.startswith("epoch ")]
    assert epochs[0].endswith("s left") and epochs[1].endswith("done")
    assert f"run {run.info.run_id}, model {model_uri}" in out
    assert f"model file: {path}" in out
    assert (
        f"  segment images:  {cli.script('predict.py')} {path} IMAGE_OR_FOLDER --output "
        "predictions/" in out
    )
    page = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    see = f"  see the run:     mlflow ui   then open http://127.0.0.1:5000/{page}"
    assert f"{see}?workflowType=machine_learning" in out  # the store is ./mlflow.db
    # The saved file is the logged model: same predictions.
    images = data.make_synthetic_2d(4, 32, seed=5)[0]
    saved = keras.models.load_model(path)
    logged = mlflow.keras.load_model(model_uri)
    np.testing.assert_allclose(saved.predict(images, verbose=0), logged.predict(images, verbose=0))
    assert not list(tmp_path.glob("*.partial.keras"))


@pytest.mark.parametrize(
    "path, message",
    [("unet.h5", "must end in .keras"), ("missing/unet.keras", "is not a folder")],
)
def test_a_model_path_that_cannot_be_written_is_refused_before_any_run(
    store, capsys, path, message
):
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--save-model", path])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.splitlines()[-1]
    assert store.search_runs([e.experiment_id for e in store.search_experiments()]) == []


@pytest.mark.parametrize("on", [True, False])
def test_a_run_records_the_machines_use_in_system_metrics_unless_told_not_to(
    store, tmp_path, monkeypatch, on
):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    with runs.tracked_run("sys", "run", str(tmp_path / "checkpoints"), system_metrics=on) as run:
        time.sleep(1.0)  # about ten samples
    metrics = store.get_run(run.info.run_id).data.metrics
    system = {key for key in metrics if key.startswith("system/")}
    if not on:
        assert system == set()
        return
    names = {"cpu_utilization_percentage", "system_memory_usage_megabytes"}
    assert {f"system/{name}" for name in names} <= system
    assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100
    total = psutil.virtual_memory().total / 1e6
    assert 0 < metrics["system/system_memory_usage_megabytes"] < total
    history = store.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 3  # sampled along the run, one step per sample


def test_no_system_metrics_is_a_flag_of_both_scripts_that_reaches_the_run(store, monkeypatch):
    assert not train.parse_args([]).no_system_metrics
    assert conv3d.parse_args(["--no-system-metrics"]).no_system_metrics
    asked = {}

    def stop_at_the_run(*args, **options):
        asked.update(options)
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "tracked_run", stop_at_the_run)
    with pytest.raises(SystemExit):
        train.main(TINY + ["--no-system-metrics"])
    assert asked["system_metrics"] is False


def test_a_resume_on_data_that_changed_since_is_refused_in_one_line(store, capsys):
    run_id, _ = crafted_run("tiny", TINY, "KILLED")
    store.log_param(run_id, "data_hash", "0123abcd")  # what it trained on: other examples
    store.log_param(run_id, "data_count", "40")
    line = refused_in_one_line(["--resume", run_id], capsys)
    assert line.startswith(f"train.py: error: run {run_id} trained on 40 examples of ")
    assert line.endswith("files changed since, so it cannot be resumed; start a new run")
    assert store.get_run(run_id).info.status == "KILLED"


def test_printed_scripts_have_their_path_from_here(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tp4.ROOT)
    assert cli.script("predict.py") == "python predict.py"
    monkeypatch.chdir(tmp_path)  # outside the checkout: the script's own path
    assert cli.script("predict.py") == f"python {os.path.join(tp4.ROOT, 'predict.py')}"
    assert cli.script(str(tmp_path / "mine.py")) == "python mine.py"
